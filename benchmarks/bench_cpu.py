"""CPU benchmark of TSGB saliency: tsgb_ext (native, hooks, hooks+compile) against the
authors' formulation, a plain input gradient and the forward pass.

Script:
    python benchmarks/bench_cpu.py --models vgg16,resnet50,efficientnet-lite0 --batch 4 \
        --rounds 7 --out cpu_results.md       # rows interleaved, medians
    python benchmarks/bench_cpu.py --quick                  # tiny sizes, harness check
    python benchmarks/bench_cpu.py --memory --batch 1,8     # peak RSS per row, subprocesses

pytest-benchmark (sizes from env TSGB_BENCH_SIZE / TSGB_BENCH_BATCH; rounds, time and warm-up
from pytest-benchmark's own options, after untimed warm-up calls: one per row, two for a
*_compile row, its eager first call and the compile):
    python -m pytest benchmarks/bench_cpu.py --benchmark-group-by=param:model_name \
        --benchmark-min-rounds=5 --benchmark-max-time=10
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import _models  # noqa: E402
from _rows import (COMPILE_WARMUP, DEFAULT_ROWS, ROWS, compile_counts, compile_stats,  # noqa: E402
                   cpu_model_name, fmt_err, interleaved_medians, make_row, make_targets,
                   run_cleanup)

MEMORY_ROWS = ["forward", "gradient", "authors", "hooks", "native"]


def header(threads: int, extra: str = "") -> str:
    import tsgb_ext
    return (f"# TSGB CPU benchmark\n\n"
            f"- CPU: {cpu_model_name()}, {os.cpu_count()} logical cores visible, "
            f"{threads} torch threads\n"
            f"- torch {torch.__version__}, tsgb_ext {tsgb_ext.__version__} "
            f"(native available: {tsgb_ext.native_available()})\n"
            f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}\n"
            f"- models: self-contained torchvision architectures (benchmarks/_models.py), "
            f"random weights, eval, float32, NCHW\n{extra}\n")


def _inputs(name, batch, size, seed=0):
    model = _models.build(name)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, size, size, generator=gen)
    return model, x, make_targets(batch, 1000, seed=seed)


def run_timing(args) -> str:
    """Rows interleaved: every row gets its own copy of the model (explainers of different
    rows are active at once), warm-up calls of every row first (a compile row's two: eager,
    then the compile, timed and stated), then ``--rounds`` rounds of one timed call of each row
    in turn; each row's median. Timed one after another, the same rows moved by 10-40% with
    their position (heap state, first touch of fresh memory) on the 2-core machine."""
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    if not args.warm_compile_cache and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        # compile times as a first compile on a new machine has them (an inductor cache
        # left by earlier runs makes them several times shorter)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="tsgb_bench_inductor_")
    rows = [r for r in args.rows.split(",") if r]
    if args.no_compile:
        rows = [r for r in rows if not r.endswith("_compile")]
    head = header(threads, f"- timing: rows interleaved, median of {args.rounds} rounds of one "
                           f"call per row (after warm-up calls of every row); x forward = "
                           f"median / the forward row's median of the same round set\n")
    lines = ["| model | batch | row | median ms | ms / image | images/s | x forward | n | note |",
             "|---|---|---|---|---|---|---|---|---|"]

    def flush():
        text = head + "\n".join(lines) + "\n"
        if args.out:
            with open(args.out, "w") as f:
                f.write(text)
        return text

    for name in args.models.split(","):
        for batch in [int(b) for b in args.batch.split(",")]:
            model, x, t = _inputs(name, batch, args.size)
            fns, notes, cleanups, failed = {}, {}, [], {}
            for row in rows:
                try:
                    fn, cleanup, note = make_row(row, copy.deepcopy(model), x, t)
                    cleanups.append(cleanup)
                    if row.endswith("_compile"):
                        counts = compile_counts()
                        calls, secs = warm_up(row, fn)
                        note = (f"first {calls} calls (eager, then compile) "
                                f"{secs:.1f} s, {compile_stats(counts)}; " + note)
                    fns[row], notes[row] = fn, note
                except Exception as e:  # one failing row must not lose the table
                    failed[row] = fmt_err(e)
            try:
                med, n = interleaved_medians(fns, args.rounds), args.rounds
            except Exception as e:
                med, n = {}, 0
                failed.update({r: fmt_err(e) for r in fns})
            fwd = med.get("forward")
            for row in rows:
                if row in med:
                    v = med[row]
                    ratio = f"{v / fwd:.2f}" if fwd else "-"
                    lines.append(f"| {name} | {batch} | {row} | {v * 1e3:.1f} | "
                                 f"{v * 1e3 / batch:.1f} | {batch / v:.2f} | {ratio} | {n} | "
                                 f"{notes[row]} |")
                else:
                    lines.append(f"| {name} | {batch} | {row} | - | - | - | - | - | "
                                 f"FAILED {failed.get(row, '?')} |")
                print(lines[-1], flush=True)
            for c in cleanups:
                run_cleanup(c, lines)
            del fns, cleanups
            flush()
    return flush()


# --- peak memory -----------------------------------------------------------------------------
def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def child(args) -> None:
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    import tsgb_ext  # noqa: F401  (loaded before the baseline: its import is not a row's cost)
    model, x, t = _inputs(args.models, int(args.batch), args.size)
    with torch.no_grad():  # touch the weights once, outside the measured peak
        model(x[:1])
    base = _maxrss_mib()
    fn, cleanup, _ = make_row(args.child, model, x, t)
    out = fn()
    del out
    peak = _maxrss_mib()
    cleanup()
    print(json.dumps({"base_mib": base, "peak_mib": peak}))


def run_memory(args) -> str:
    threads = args.threads or torch.get_num_threads()
    rows = [r for r in (args.rows.split(",") if args.rows_given else MEMORY_ROWS) if r]
    head = header(threads, "- peak memory: each row in a fresh subprocess: ru_maxrss after one "
                           "call minus ru_maxrss after model load and one no-grad forward of one "
                           "image (the model's weights excluded)\n")
    lines = ["| model | batch | row | peak RSS above baseline MiB | baseline MiB | note |",
             "|---|---|---|---|---|---|"]
    for name in args.models.split(","):
        for batch in args.batch.split(","):
            for row in rows:
                cmd = [sys.executable, os.path.abspath(__file__), "--child", row, "--models",
                       name, "--batch", batch, "--size", str(args.size), "--threads",
                       str(threads)]
                try:
                    p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                    if p.returncode:
                        raise RuntimeError(p.stderr.strip().splitlines()[-1] if p.stderr
                                           else f"exit {p.returncode}")
                    r = json.loads(p.stdout.strip().splitlines()[-1])
                    lines.append(f"| {name} | {batch} | {row} | {r['peak_mib'] - r['base_mib']:.0f}"
                                 f" | {r['base_mib']:.0f} | |")
                except Exception as e:
                    lines.append(f"| {name} | {batch} | {row} | - | - | FAILED {fmt_err(e)} |")
                print(lines[-1], flush=True)
    text = head + "\n".join(lines) + "\n"
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return text


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default="vgg16,resnet50")
    p.add_argument("--batch", default="1,4,8")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=7,
                   help="interleaved rounds: one timed call of every row per round")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: current)")
    p.add_argument("--rows", default=None, help=f"comma list of {list(ROWS)}")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    p.add_argument("--warm-compile-cache", action="store_true",
                   help="use torch inductor's on-disk cache (default: a fresh one per run, so "
                        "the stated compile times are those of a first compile)")
    p.add_argument("--memory", action="store_true", help="peak RSS per row (subprocesses)")
    p.add_argument("--timeout", type=float, default=900, help="per subprocess, --memory")
    p.add_argument("--quick", action="store_true",
                   help="harness check: size 64, batch 1,2, 2 repeats")
    p.add_argument("--out", default=None, help="write the markdown table here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.rows_given = args.rows is not None
    if args.rows is None:
        args.rows = ",".join(DEFAULT_ROWS)
    if args.quick:
        args.size, args.batch, args.rounds = 64, "1,2", 2
    return args


def main(argv=None):
    args = parse(argv)
    if args.child:
        return child(args)
    print(run_memory(args) if args.memory else run_timing(args))


# --- pytest-benchmark ------------------------------------------------------------------------
def warm_up(row: str, fn) -> tuple:
    """The untimed calls before a row is timed: a compile row's COMPILE_WARMUP (its eager first
    call, then the call that compiles), one for the others (lazy set-up, first touch of
    memory). Returns (calls, seconds)."""
    calls = COMPILE_WARMUP if row.endswith("_compile") else 1
    tc = time.perf_counter()
    for _ in range(calls):
        fn()
    return calls, time.perf_counter() - tc


try:
    import pytest

    _SIZE = int(os.environ.get("TSGB_BENCH_SIZE", "224"))
    _BATCH = int(os.environ.get("TSGB_BENCH_BATCH", "1"))

    @pytest.mark.parametrize("row", DEFAULT_ROWS)
    @pytest.mark.parametrize("model_name", ["vgg16", "resnet50"])
    def test_cpu(benchmark, model_name, row):
        import tsgb_ext
        if "TSGB_BENCH_ROUNDS" in os.environ:
            pytest.fail("TSGB_BENCH_ROUNDS is no longer read: pass pytest-benchmark's "
                        "--benchmark-min-rounds=N (and --benchmark-max-time=SECONDS)")
        if row.startswith("native") and not tsgb_ext.native_available():
            pytest.skip("tsgb_ext._C not built")
        model, x, t = _inputs(model_name, _BATCH, _SIZE)
        fn, cleanup, _ = make_row(row, model, x, t)
        try:
            info = dict(batch=_BATCH, size=_SIZE, threads=torch.get_num_threads())
            if benchmark.enabled:  # (--benchmark-disable: one plain call, as pytest-benchmark does)
                counts = compile_counts()
                calls, secs = warm_up(row, fn)
                info.update(warmup_calls=calls, warmup_s=round(secs, 3))
                if row.endswith("_compile"):
                    info["compile"] = compile_stats(counts)
            benchmark.extra_info.update(info)
            # benchmark(fn), not pedantic: --benchmark-min-rounds / -max-time / -min-time /
            # -warmup apply, and the compile is not a timed round
            benchmark(fn)
        finally:
            cleanup()
except ImportError:  # pragma: no cover
    pass


if __name__ == "__main__":
    main()
