"""The benchmark driver of tsgb_ext: every measurement of benchmarks/RESULTS.md, one command.

    python benchmarks/bench.py --device cpu --bench timing --models resnet50,vgg16 --batch 4
    python benchmarks/bench.py --device cuda --bench timing --out gpu.md    # + floors, goals
    python benchmarks/bench.py --device cpu --bench memory --batch 1,8
    python benchmarks/bench.py --device cpu --bench profile|layer|host|phases
    python benchmarks/bench.py --device cuda --bench ops
    python benchmarks/bench.py --device cpu --bench accuracy|amp|storage|maps
    compute-sanitizer --tool memcheck python benchmarks/bench.py --device cuda --bench memcheck
    python -m pytest benchmarks/bench.py -k resnet50                       # pytest-benchmark

Kinds (``--bench``; benchmarks/README.md says what each measures): timing and memory
(whole-model rows of ``_rows.ROWS``: ``_timing.py``), profile, layer, host, phases (op-level,
``_profile.py``), ops and memcheck (per op, ``_ops.py``), accuracy, amp, storage, maps (map
quality, ``_accuracy.py``). Every kind prints its tables (markdown) headed by the machine, the
versions, threads and date, and rewrites ``--out`` (markdown), ``--json`` and ``--csv`` after
each row, so a crash or a timeout keeps the rows done. A row that fails says ``FAILED <error>``.
Options a kind does not use are ignored; unset ones take the kind's defaults (``DEFAULTS``).
``--device cuda`` without a GPU says so, writes that to ``--out`` and exits with status 3.
"""
from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import importlib  # noqa: E402

import torch  # noqa: E402

import _timing  # noqa: E402
from _common import Report, header, load_average  # noqa: E402
from _rows import CUDA_ROWS, DEFAULT_ROWS, ROWS  # noqa: E402

#: --bench: ("module.function" that runs it as f(args, report), title, needs the compiled ops);
#: the module is imported when its kind runs (the GPU image has no numpy for _accuracy, say)
KINDS = {
    "timing": ("_timing.run_timing", "TSGB timing", False),
    "memory": ("_timing.run_memory", "TSGB peak memory", False),
    "profile": ("_profile.run_profile", "torch.profiler of native TSGB calls", True),
    "layer": ("_profile.run_layer", "One layer's TSGB backward ops", True),
    "host": ("_profile.run_host", "Host time per layer", True),
    "phases": ("_profile.run_phases", "Forward / backward phases of native calls", True),
    "ops": ("_ops.run_ops", "Per-op times of the TSGB rules", True),
    "memcheck": ("_ops.run_memcheck", "Every op once (for compute-sanitizer)", True),
    "accuracy": ("_accuracy.run_accuracy", "float32 maps against the float64 spec", False),
    "amp": ("_accuracy.run_amp", "--amp maps against float32", False),
    "storage": ("_accuracy.run_storage", "Map storage dtypes", False),
    "maps": ("_accuracy.run_maps", "Map differences", True),
    "targets": ("_targets.run_targets", "Many targets: factorised vs batched", True),
}

#: the defaults of unset options, per kind and device ("*": any device)
DEFAULTS = {
    ("timing", "cpu"): dict(models="vgg16,resnet50", batch="1,4,8", repeats=7,
                            rows=",".join(DEFAULT_ROWS), method="interleaved"),
    ("timing", "cuda"): dict(models="vgg16,resnet50", batch="64", dtype="fp32,bf16", repeats=0,
                             rows=",".join(CUDA_ROWS + ["hooks_compile", "native_compile"]),
                             method="autorange"),
    ("memory", "*"): dict(models="vgg16,resnet50", batch="1,4,8"),
    ("profile", "*"): dict(repeats=1),
    ("phases", "*"): dict(repeats=25),
    ("layer", "*"): dict(min_time=2.0),
    ("host", "*"): dict(min_time=2.0),
    ("ops", "*"): dict(batch="8", dtype="fp16,fp32", repeats=5, warmup=3),
    ("amp", "*"): dict(backends="native,hooks"),
    ("targets", "*"): dict(models="resnet50,vgg16", repeats=3),
}
BASE = dict(models="resnet50", batch="4", dtype="fp32", repeats=0, rows="", method="interleaved",
            min_time=0.25, warmup=2, backends="hooks,native")
QUICK = {  # --quick: a harness check
    "timing": dict(size=64, batch="1,2", repeats=2, min_time=0.05, warmup=1),
    "memory": dict(size=64, batch="1"),
    "profile": dict(size=64, batch="1"), "phases": dict(size=64, batch="1", repeats=2, calls=2,
                                                        alternations=1),
    "layer": dict(batch="1", min_time=0.05), "host": dict(layers=5, min_time=0.05),
    "ops": dict(batch="2", iters=2, repeats=1, warmup=1),
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("every kind")
    g.add_argument("--bench", choices=list(KINDS), default="timing")
    g.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    g.add_argument("--models", help="comma list: vgg11, vgg16, resnet18, resnet50, "
                                    "efficientnet-lite0 (profile, phases: the first)")
    g.add_argument("--batch", help="comma list of batch sizes")
    g.add_argument("--size", type=int, default=224, help="input height and width")
    g.add_argument("--dtype", help="comma list: fp32, bf16, fp16 (autocast for timing)")
    g.add_argument("--threads", type=int, default=0, help="torch threads (default: current)")
    g.add_argument("--repeats", type=int, help="timing: interleaved rounds (or, autorange, "
                   "single-call timings; 0: blocked_autorange); phases: rounds; ops: averages "
                   "per row; profile: profiled calls")
    g.add_argument("--quick", action="store_true", help="tiny sizes: a harness check")
    g.add_argument("--out", help="write the markdown tables here")
    g.add_argument("--json", help="write the rows as JSON here")
    g.add_argument("--csv", help="write the rows as CSV here")
    g = p.add_argument_group("timing and memory")
    g.add_argument("--rows", help=f"comma list of {list(ROWS)}")
    g.add_argument("--no-compile", action="store_true", help="drop the *_compile rows")
    g.add_argument("--authors-full", action="store_true", help="add the authors_full row")
    g.add_argument("--method", choices=["interleaved", "autorange"],
                   help="interleaved rounds (cpu default) or one row at a time (cuda default)")
    g.add_argument("--floors", action="store_true", default=None,
                   help="autorange: add the memory-traffic floor and goals tables (cuda default)")
    g.add_argument("--min-time", type=float, help="blocked_autorange per row, seconds")
    g.add_argument("--warmup", type=int, help="warm-up calls per row")
    g.add_argument("--budget", type=float, default=170.0,
                   help="autorange: seconds after which no compile row is started")
    g.add_argument("--compile-dtypes", default="fp32", help="autorange: dtypes with compile rows")
    g.add_argument("--tf32", action="store_true", help="allow TF32 for float32 (off by default)")
    g.add_argument("--warm-compile-cache", action="store_true",
                   help="use inductor's on-disk cache (default: a fresh one per run)")
    g.add_argument("--timeout", type=float, default=900, help="memory: seconds per subprocess")
    g.add_argument("--child", help=argparse.SUPPRESS)
    g = p.add_argument_group("targets")
    g.add_argument("--targets", default="1,5,20,100,1000", help="comma list of T")
    g.add_argument("--batched-max", type=int, default=100,
                   help="time the batched path only up to this many targets")
    _kind_options(p)
    return p


def _kind_options(p) -> None:
    g = p.add_argument_group("profile, layer, host, phases, ops")
    g.add_argument("--no-fuse", action="store_true", help="profile: TSGB(..., fuse=False)")
    g.add_argument("--top", type=int, default=15, help="profile: ops listed by self CPU time")
    g.add_argument("--layers", type=int, default=50, help="host: chained layers")
    g.add_argument("--calls", type=int, default=12, help="phases: calls per with-block")
    g.add_argument("--alternations", type=int, default=2, help="phases: fused/unfused pairs")
    g.add_argument("--iters", type=int, default=20, help="ops: calls per measurement")
    g.add_argument("--layouts", default="nchw,cl", help="ops: nchw and/or cl (channels_last)")
    g = p.add_argument_group("accuracy, amp, storage, maps")
    g.add_argument("--backends", help="comma list of hooks, native")
    g.add_argument("--families", help="accuracy: subset of the 14 torchvision families")
    g.add_argument("--no-photos", action="store_true", help="accuracy: skip the photos")
    g.add_argument("--amp", default="bf16,fp16", help="amp: autocast dtypes")
    g.add_argument("--photos", help="storage: a photo folder (default: tests' voc_small)")
    g.add_argument("--top-k", type=int, default=3, help="storage: classes per photo")
    g.add_argument("--parts", default="compile,fusion", help="maps: compile and/or fusion")


def resolve(args) -> argparse.Namespace:
    """Fill unset options from DEFAULTS (and QUICK) and split the comma lists."""
    chosen = dict(BASE)
    chosen.update(DEFAULTS.get((args.bench, "*"), {}))
    chosen.update(DEFAULTS.get((args.bench, args.device), {}))
    if args.quick:
        chosen.update(QUICK.get(args.bench, {}))
        for k in ("size", "layers", "calls", "alternations", "iters"):
            if k in chosen:
                setattr(args, k, chosen[k])
    for k, v in chosen.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if args.floors is None:
        args.floors = args.device == "cuda" and args.bench == "timing"
    split = lambda s: [v for v in str(s).split(",") if v]  # noqa: E731
    args.model_list, args.dtype_list = split(args.models), split(args.dtype)
    args.batch_list = [int(b) for b in split(args.batch)]
    args.backend_list = split(args.backends)
    rows = split(args.rows)
    if args.authors_full and "authors_full" not in rows:
        rows.insert(rows.index("authors") + 1 if "authors" in rows else len(rows), "authors_full")
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"bench.py: unknown row(s) {unknown}; rows: {list(ROWS)}")
    if args.no_compile:
        rows = [r for r in rows if not ROWS[r].compiled]
    args.row_list = rows
    args.device_obj = torch.device(args.device)
    return args


def refuse(args, msg: str) -> int:
    """Say why nothing is measured (stderr and --out); exit status 3."""
    print(msg, file=sys.stderr)
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"# {KINDS[args.bench][1]}\n\n{msg}\n")
    return 3


def main(argv=None) -> int:
    args = resolve(parser().parse_args(argv))
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        return refuse(args, f"bench.py --device cuda: CUDA is not available (torch "
                            f"{torch.__version__}, built for CUDA {torch.version.cuda}); nothing "
                            f"measured. --device cpu runs the same kinds on the CPU.")
    where, title, native = KINDS[args.bench]
    import tsgb_ext
    if native and not tsgb_ext.native_available():
        return refuse(args, f"bench.py --bench {args.bench}: the compiled tsgb_ext ops are not "
                            f"available ({tsgb_ext.load_error()}); nothing measured.")
    if args.child:
        return _timing.memory_child(args)
    if args.bench == "memory" and args.device != "cpu":
        return refuse(args, "bench.py --bench memory measures CPU resident memory; on CUDA the "
                            "timing table has each row's peak MiB.")
    module, func = where.split(".")
    run = getattr(importlib.import_module(module), func)
    report = Report(header(title, args.device_obj), args.out, args.json, args.csv)
    print("\n".join(report.head), flush=True)
    rc = run(args, report)
    report.head.append(f"- load average at end {load_average()}")
    print()
    print(report.flush(), end="")
    return rc


# --- pytest-benchmark ------------------------------------------------------------------------
try:
    import pytest

    _SIZE = int(os.environ.get("TSGB_BENCH_SIZE", "224"))
    _BATCH = int(os.environ.get("TSGB_BENCH_BATCH", "1"))

    @pytest.mark.parametrize("row", DEFAULT_ROWS)
    @pytest.mark.parametrize("model_name", ["vgg16", "resnet50"])
    def test_cpu(benchmark, model_name, row):
        """One row, timed by pytest-benchmark (rounds, time and warm-up from its own options,
        after the row's untimed warm-up calls: one, or two for a *_compile row)."""
        import tsgb_ext
        from _rows import compile_counts, compile_stats, make_row, warm_up
        if "TSGB_BENCH_ROUNDS" in os.environ:
            pytest.fail("TSGB_BENCH_ROUNDS is no longer read: pass pytest-benchmark's "
                        "--benchmark-min-rounds=N (and --benchmark-max-time=SECONDS)")
        if row.startswith("native") and not tsgb_ext.native_available():
            pytest.skip("tsgb_ext._C not built")
        model, x, t = _timing.inputs(model_name, _BATCH, _SIZE, torch.device("cpu"))
        fn, cleanup, _ = make_row(row, model, x, t)
        try:
            info = dict(batch=_BATCH, size=_SIZE, threads=torch.get_num_threads())
            if benchmark.enabled:  # (--benchmark-disable: one plain call, as pytest-benchmark does)
                counts = compile_counts()
                calls, secs = warm_up(row, fn)
                info.update(warmup_calls=calls, warmup_s=round(secs, 3))
                if ROWS[row].compiled:
                    info["compile"] = compile_stats(counts)
            benchmark.extra_info.update(info)
            benchmark(fn)  # not pedantic: --benchmark-min-rounds / -max-time / -warmup apply
        finally:
            cleanup()
except ImportError:  # pragma: no cover
    pass


if __name__ == "__main__":
    sys.exit(main())
