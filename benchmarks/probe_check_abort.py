"""Where does an exception from extension code die? A one-minute probe for gpu_check.sh.

On one GPU image (torch 2.11, an H200 run) every TORCH_CHECK raised inside tsgb_ext's ops crashed
the process with a segfault, while the same wheel raises them normally elsewhere. Each case
below runs in a subprocess of its own and the exit code is printed (0: behaved, -11 / 139:
segfault, -6 / 134: abort); the first case that dies names the cause:

  inline extension (torch.utils.cpp_extension.load_inline, built here, C++17 and the project's
  other flags: -O3 -fopenmp):
    backtrace          c10::get_backtrace() (the unwinder alone, nothing thrown)
    check_caught       TORCH_CHECK thrown and caught inside the .so
    runtime_error      std::runtime_error thrown through pybind11 (-> Python RuntimeError)
    check_pybind       TORCH_CHECK (c10::Error) thrown through pybind11
    check_op_cpu       a TORCH_LIBRARY op that TORCH_CHECKs, called via torch.ops (CPU tensor)
    check_op_cuda      the same op on a CUDA tensor (skipped without CUDA)
  the prebuilt tsgb_ext._C (--so), loaded with torch.ops.load_library:
    prebuilt_op_cpu    tsgb_ext.conv2d_backward with a 3-D x (the shared argument check)
    prebuilt_op_cuda   the same on CUDA tensors (skipped without CUDA)
    prebuilt_isa       tsgb_ext.cpu_isa("no-such-isa") (a check in an op without tensors)
  control:
    aten_empty         torch.ops.aten.empty([-1]) (a TORCH_CHECK inside libtorch itself)
  and the libstdc++ / libgcc_s the process maps (from /proc/self/maps) after loading both.

    python benchmarks/probe_check_abort.py [--so PATH] [--build-dir DIR] [--out FILE]

Exit status 0 when every case that ran exited 0, 1 otherwise (the table says which).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

CPP = r"""
#include <torch/extension.h>
#include <torch/library.h>
#include <c10/util/Backtrace.h>
#include <stdexcept>

int64_t probe_backtrace() { return static_cast<int64_t>(c10::get_backtrace().size()); }

int64_t probe_check_caught() {
  try {
    TORCH_CHECK(false, "probe: caught inside");
  } catch (const c10::Error& e) {
    return 1;
  }
  return 0;
}

void probe_runtime_error() { throw std::runtime_error("probe: std::runtime_error through pybind11"); }

void probe_check_pybind() { TORCH_CHECK(false, "probe: TORCH_CHECK through pybind11"); }

at::Tensor probe_check_op(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 4, "probe: TORCH_CHECK in a torch.ops op, x has shape ", x.sizes());
  return x;
}

TORCH_LIBRARY(tsgb_probe, m) { m.def("check(Tensor x) -> Tensor"); }
TORCH_LIBRARY_IMPL(tsgb_probe, CompositeExplicitAutograd, m) { m.impl("check", &probe_check_op); }
"""
def inline_module(build_dir: str):
    """The built probe extension, imported from its file (a child never runs the build, so a
    child killed by its timeout leaves no build lock behind)."""
    import importlib.util
    import torch  # noqa: F401  (the extension links against the loaded libtorch)
    path = os.path.join(build_dir, "tsgb_probe_ext.so")
    spec = importlib.util.spec_from_file_location("tsgb_probe_ext", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


FUNCTIONS = ["probe_backtrace", "probe_check_caught", "probe_runtime_error", "probe_check_pybind"]
CFLAGS = ["-O3", "-std=c++17", "-fopenmp"]  # the project's flags (setup.py), at C++17

CASES = ["backtrace", "check_caught", "runtime_error", "check_pybind", "check_op_cpu",
         "check_op_cuda", "prebuilt_op_cpu", "prebuilt_op_cuda", "prebuilt_isa", "aten_empty"]


def build_inline(build_dir: str):
    """Build (or reuse) the probe extension; only the parent process builds."""
    from torch.utils.cpp_extension import load_inline
    os.makedirs(build_dir, exist_ok=True)
    lock = os.path.join(build_dir, "lock")
    if os.path.exists(lock):  # left by a probe killed mid-build: load_inline would wait forever
        os.remove(lock)
    return load_inline("tsgb_probe_ext", cpp_sources=[CPP], functions=FUNCTIONS,
                       extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"], build_directory=build_dir,
                       verbose=False)


def expect_raise(fn, pattern: str) -> str:
    try:
        fn()
    except RuntimeError as e:
        if pattern not in str(e):
            raise AssertionError(f"raised, but without {pattern!r}: {str(e)[:200]}")
        return f"RuntimeError raised ({pattern!r})"
    raise AssertionError("no exception")


def run_case(case: str, so: str | None, build_dir: str) -> str:
    """Body of one subprocess; returns the line to print (a crash never returns)."""
    import torch
    if case == "aten_empty":
        return expect_raise(lambda: torch.ops.aten.empty([-1]), "negative")
    if case.startswith("prebuilt"):
        if not so:
            return "SKIP no prebuilt .so given"
        torch.ops.load_library(so)
        ops = torch.ops.tsgb_ext
        if case == "prebuilt_isa":
            return expect_raise(lambda: ops.cpu_isa("no-such-isa"), "cpu_isa")
        dev = "cuda" if case.endswith("cuda") else "cpu"
        if dev == "cuda" and not (torch.cuda.is_available() and ops.built_with_cuda()):
            return "SKIP no CUDA device or no CUDA kernels in the .so"
        x = torch.rand(3, 5, 5, device=dev)  # 3-D: the shared check rejects it
        y = torch.rand(1, 3, 3, 3, device=dev)
        return expect_raise(lambda: ops.conv2d_backward(y, x, y, [3, 3], [1, 1], [0, 0], [1, 1],
                                                        1, 1e-10), "x must be 4-D (N, C, H, W)")
    mod = inline_module(build_dir)
    if case == "backtrace":
        return f"backtrace of {mod.probe_backtrace()} characters"
    if case == "check_caught":
        assert mod.probe_check_caught() == 1
        return "caught inside the .so"
    if case == "runtime_error":
        return expect_raise(mod.probe_runtime_error, "std::runtime_error through pybind11")
    if case == "check_pybind":
        return expect_raise(mod.probe_check_pybind, "TORCH_CHECK through pybind11")
    if case in ("check_op_cpu", "check_op_cuda"):
        dev = "cuda" if case.endswith("cuda") else "cpu"
        if dev == "cuda" and not torch.cuda.is_available():
            return "SKIP no CUDA device"
        return expect_raise(lambda: torch.ops.tsgb_probe.check(torch.zeros(3, device=dev)),
                            "TORCH_CHECK in a torch.ops op")
    raise ValueError(f"unknown case {case!r}; cases: {CASES}")


def mapped_runtime(so: str | None, build_dir: str) -> list[str]:
    """The libstdc++ / libgcc_s files mapped once torch and both extensions are loaded."""
    import torch
    try:
        inline_module(build_dir)
    except Exception as e:  # the table has the build error already
        print(f"  (inline extension not loaded: {type(e).__name__})")
    if so:
        torch.ops.load_library(so)
    seen = []
    with open("/proc/self/maps") as f:
        for line in f:
            path = line.split()[-1] if len(line.split()) >= 6 else ""
            if ("libstdc++" in path or "libgcc_s" in path) and path not in seen:
                seen.append(path)
    return seen


def compiler_line() -> str:
    for cc in (os.environ.get("CXX", ""), "c++", "g++"):
        if not cc:
            continue
        try:
            out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=10)
            return f"{cc}: {out.stdout.splitlines()[0] if out.stdout else out.stderr.strip()}"
        except (OSError, subprocess.TimeoutExpired):
            continue
    return "no C++ compiler found"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--so", default=None, help="the prebuilt tsgb_ext._C to probe")
    p.add_argument("--build-dir", default=os.path.join("build", "probe_check_abort"),
                   help="where load_inline builds the probe extension")
    p.add_argument("--case", default=None, help=argparse.SUPPRESS)  # one case, in the child
    p.add_argument("--maps", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help="also write the table here")
    p.add_argument("--case-timeout", type=float, default=15.0)
    args = p.parse_args(argv)
    so = os.path.abspath(args.so) if args.so else None
    if args.case:
        print("RESULT", run_case(args.case, so, args.build_dir), flush=True)
        return 0
    if args.maps:
        for path in mapped_runtime(so, args.build_dir):
            print("MAPPED", path)
        return 0

    import torch
    out = open(args.out, "w") if args.out else None

    def emit(line: str) -> None:  # printed and written as it comes: a timeout keeps the lines
        print(line, flush=True)
        if out:
            out.write(line + "\n")
            out.flush()

    emit(f"torch {torch.__version__} (git {torch.version.git_version}), CUDA "
         f"{torch.version.cuda}, available {torch.cuda.is_available()}; {compiler_line()}")
    emit(f"prebuilt .so: {so or 'none'}")
    base = [sys.executable, os.path.abspath(__file__), "--build-dir", args.build_dir]
    if so:
        base += ["--so", so]
    bad = 0

    def run(case: str) -> None:
        nonlocal bad
        try:
            r = subprocess.run(base + ["--case", case], capture_output=True, text=True,
                               timeout=args.case_timeout)
            rc, lines = r.returncode, (r.stdout + r.stderr).strip().splitlines()
            res = [ln[7:] for ln in lines if ln.startswith("RESULT ")]
            what = res[-1] if res else (lines[-1][:200] if lines else "")
            meaning = {0: "", -11: " SEGFAULT", 139: " SEGFAULT", -6: " ABORT",
                       134: " ABORT"}.get(rc, " FAILED")
        except subprocess.TimeoutExpired:
            rc, what, meaning = 124, f"no answer in {args.case_timeout:.0f} s", " TIMEOUT"
        bad += rc != 0
        emit(f"{case:18s} exit {rc}{meaning}: {what}")

    # first the cases that need no compiler (the prebuilt .so, libtorch's own check) ...
    for case in CASES:
        if case.startswith(("prebuilt", "aten")):
            run(case)
    # ... then the inline extension, built once in this process (building runs no probe code)
    t0 = time.perf_counter()
    try:
        build_inline(args.build_dir)
        emit(f"inline extension built with {' '.join(CFLAGS)} in {time.perf_counter() - t0:.0f} s")
        built = True
    except Exception as e:
        emit(f"inline extension FAILED to build: {type(e).__name__}: {str(e)[-400:]}")
        built = False
        bad += 1
    for case in CASES:
        if case.startswith(("prebuilt", "aten")):
            continue
        if built:
            run(case)
        else:
            emit(f"{case:18s} skipped (the inline extension did not build)")
    r = subprocess.run(base + ["--maps"], capture_output=True, text=True, timeout=60)
    maps = [ln[7:] for ln in r.stdout.splitlines() if ln.startswith("MAPPED ")]
    for m in maps or [f"none found (exit {r.returncode}: {r.stderr.strip()[-200:]})"]:
        emit(f"mapped: {m}")
    emit(f"probe: {bad} case(s) did not exit 0")
    if out:
        out.close()
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
