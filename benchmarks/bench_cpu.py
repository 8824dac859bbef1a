"""CPU benchmark of TSGB saliency: tsgb_ext (native, hooks, hooks+compile) against the
authors' formulation, a plain input gradient and the forward pass.

Script:
    python benchmarks/bench_cpu.py --models vgg16,resnet50 --batch 1,4,8 --size 224 \
        --repeat 5 --out cpu_results.md
    python benchmarks/bench_cpu.py --quick                  # tiny sizes, harness check
    python benchmarks/bench_cpu.py --memory --batch 1,8     # peak RSS per row, subprocesses

pytest-benchmark (sizes from env TSGB_BENCH_SIZE / TSGB_BENCH_BATCH / TSGB_BENCH_ROUNDS):
    python -m pytest benchmarks/bench_cpu.py --benchmark-group-by=param:model_name
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import _models  # noqa: E402
from _rows import (COMPILE_WARMUP, DEFAULT_ROWS, ROWS, compile_stats, cpu_model_name, fmt_err, run_cleanup,  # noqa: E402
                   make_row, make_targets, measure)

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
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    rows = [r for r in args.rows.split(",") if r]
    if args.no_compile:
        rows = [r for r in rows if not r.endswith("_compile")]
    how = (f"{args.repeat} timed single calls" if args.repeat > 0
           else f"blocked_autorange(min_run_time={args.min_time})")
    head = header(threads, f"- timing: torch.utils.benchmark.Timer, median of {how}, after "
                           f"{args.warmup} warm-up call(s); x forward = median / forward median "
                           f"of the same model and batch\n")
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
            fwd = None
            for row in rows:
                note, cleanup = "", None
                try:
                    fn, cleanup, note = make_row(row, model, x, t)
                    warm = COMPILE_WARMUP if row.endswith("_compile") else 0
                    tc = time.perf_counter()
                    for _ in range(warm):
                        fn()
                    if warm:
                        note = (f"first {warm} calls (eager, then compile) {time.perf_counter() - tc:.1f} s, "
                                f"{compile_stats()}; " + note)
                    med, n = measure(fn, threads, args.repeat, args.min_time, args.warmup)
                    if row == "forward":
                        fwd = med
                    ratio = f"{med / fwd:.2f}" if fwd else "-"
                    lines.append(f"| {name} | {batch} | {row} | {med * 1e3:.1f} | "
                                 f"{med * 1e3 / batch:.1f} | {batch / med:.2f} | {ratio} | {n} | "
                                 f"{note} |")
                except Exception as e:  # one failing row must not lose the table
                    lines.append(f"| {name} | {batch} | {row} | - | - | - | - | - | "
                                 f"FAILED {fmt_err(e)} |")
                finally:
                    run_cleanup(cleanup, lines)
                print(lines[-1], flush=True)
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
    p.add_argument("--repeat", type=int, default=0,
                   help="timed single calls per row (0: blocked_autorange with --min-time)")
    p.add_argument("--min-time", type=float, default=2.0)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: current)")
    p.add_argument("--rows", default=None, help=f"comma list of {list(ROWS)}")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
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
        args.size, args.batch, args.repeat = 64, "1,2", 2
    return args


def main(argv=None):
    args = parse(argv)
    if args.child:
        return child(args)
    print(run_memory(args) if args.memory else run_timing(args))


# --- pytest-benchmark ------------------------------------------------------------------------
try:
    import pytest

    _SIZE = int(os.environ.get("TSGB_BENCH_SIZE", "224"))
    _BATCH = int(os.environ.get("TSGB_BENCH_BATCH", "1"))
    _ROUNDS = int(os.environ.get("TSGB_BENCH_ROUNDS", "3"))

    @pytest.mark.parametrize("row", DEFAULT_ROWS)
    @pytest.mark.parametrize("model_name", ["vgg16", "resnet50"])
    def test_cpu(benchmark, model_name, row):
        import tsgb_ext
        if row.startswith("native") and not tsgb_ext.native_available():
            pytest.skip("tsgb_ext._C not built")
        model, x, t = _inputs(model_name, _BATCH, _SIZE)
        fn, cleanup, _ = make_row(row, model, x, t)
        try:
            benchmark.extra_info.update(batch=_BATCH, size=_SIZE, threads=torch.get_num_threads())
            benchmark.pedantic(fn, rounds=_ROUNDS, warmup_rounds=1)
        finally:
            cleanup()
except ImportError:  # pragma: no cover
    pass


if __name__ == "__main__":
    main()
