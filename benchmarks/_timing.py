"""``--bench timing`` and ``--bench memory``: whole-model rows of ``_rows.ROWS``.

timing, ``--method interleaved`` (the CPU default): for each model and batch every row is built
on its own copy of the model, every row makes its warm-up calls (a compile row two: eager, then
the compile, timed and stated in the note), then ``--repeats`` rounds time one call of each row
in turn and each row reports its median (timed one row after another, the same rows moved by
10-40% with their position in the process on the 2-core machine).

timing, ``--method autorange`` (the CUDA default): one row at a time on one model,
``--warmup`` calls then ``blocked_autorange(--min-time)`` (or ``--repeats`` single calls), peak
memory above the model and input on CUDA; the compile rows after every eager row, each only
while ``--budget`` seconds are not spent; ``--floors`` adds the memory-traffic floor and the
goals tables (default on CUDA).

memory: each row in a fresh subprocess; the extra peak resident memory one call needs
(ru_maxrss after the call minus ru_maxrss after model load, one one-image forward and
``import tsgb_ext``).
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

import _floors
import _models
from _common import DTYPES, fmt_err, interleaved_medians, make_targets, sync_for, timer_median
from _rows import (MEMORY_ROWS, ROWS, compile_counts, compile_stats, compile_warmup, make_row,
                   run_cleanup, warm_up)

COLUMNS = ["model", "batch", "dtype", "row", "median ms", "ms / image", "images/s", "x forward",
           "n", "peak MiB", "note"]
TITLE = "Rows"
FLOOR_TITLE = "Memory-traffic floor of the TSGB backward"


def inputs(name, batch, size, device, seed=0):
    model = _models.build(name).to(device)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, size, size, generator=gen).to(device)
    return model, x, make_targets(batch, 1000, seed=seed, device=device)


def autocast_for(device, dname):
    if dname not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"--dtype for timing: fp32, bf16 or fp16 (autocast), got {dname!r}")
    if dname == "fp32":
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=DTYPES[dname])


def cells(name, batch, dname, row, med, n, fwd, peak="-", note=""):
    ratio = f"{med / fwd:.2f}" if fwd else "-"
    return [name, batch, dname, row, f"{med * 1e3:.2f}", f"{med * 1e3 / batch:.2f}",
            f"{batch / med:.2f}", ratio, n, peak, note]


def failed(name, batch, dname, row, why):
    return [name, batch, dname, row] + ["-"] * 6 + [f"FAILED {why}"]


def heads(args):
    lines = [f"models: benchmarks/_models.py (torchvision architectures, random weights, "
             f"randomised BN, eval; efficientnet-lite0: the bundled pretrained model), "
             f"{args.size}x{args.size}, NCHW"]
    if args.method == "interleaved":
        lines.append(f"timing: rows interleaved, median of {args.repeats} rounds of one call per "
                     f"row (after warm-up calls of every row); x forward = median / the forward "
                     f"row's median")
    else:
        lines.append(f"timing: torch.utils.benchmark.Timer, after {args.warmup} warm-up calls, "
                     + (f"median of {args.repeats} single calls" if args.repeats else
                        f"blocked_autorange(min_run_time={args.min_time}) median")
                     + "; peak = max_memory_allocated during one call minus the allocation "
                       "before it (model, input); cudnn.benchmark = True")
    lines.append(f"float32: TF32 {'ON' if args.tf32 else 'OFF'}; bf16 / fp16: torch.autocast "
                 f"around each call, float32 weights and input")
    return lines


def run_timing(args, report) -> int:
    torch.backends.cudnn.allow_tf32 = args.tf32
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.benchmark = True
    if not args.warm_compile_cache and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        # compile times as a first compile on a new machine has them (an inductor cache left
        # by earlier runs makes them several times shorter)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="tsgb_bench_inductor_")
    report.head += [f"- {h}" for h in heads(args)]
    report.table(TITLE, COLUMNS, [f"`{r}`: {ROWS[r].what}" for r in args.row_list])
    if args.method == "interleaved":
        for name in args.model_list:
            for batch in args.batch_list:
                for dname in args.dtype_list:
                    interleaved(args, report, name, batch, dname)
    else:
        autorange(args, report)
    return 0


def interleaved(args, report, name, batch, dname) -> None:
    """One model, batch and dtype: every row on its own copy, interleaved rounds, medians."""
    model, x, t = inputs(name, batch, args.size, args.device_obj)
    ac = autocast_for(args.device_obj, dname)
    fns, notes, cleanups, why = {}, {}, [], {}
    for row in args.row_list:
        try:
            fn, cleanup, note = make_row(row, copy.deepcopy(model), x, t, ac)
            cleanups.append(cleanup)
            if ROWS[row].compiled:
                counts = compile_counts()
                calls, secs = warm_up(row, fn)
                note = (f"first {calls} calls (eager, then compile) {secs:.1f} s, "
                        f"{compile_stats(counts)}; " + note)
            fns[row], notes[row] = fn, note
        except Exception as e:  # one failing row must not lose the table
            why[row] = fmt_err(e)
    try:
        med = interleaved_medians(fns, args.repeats)
    except Exception as e:
        med = {}
        why.update({r: fmt_err(e) for r in fns})
    for row in args.row_list:
        if row in med:
            report.add(TITLE, cells(name, batch, dname, row, med[row], args.repeats,
                                    med.get("forward"), note=notes[row]))
        else:
            report.add(TITLE, failed(name, batch, dname, row, why.get(row, "?")))
    for c in cleanups:
        run_cleanup(c, report, f"{name} batch {batch}")


def peak_mib(fn, device) -> str:
    if device.type != "cuda":
        return "-"
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return f"{peak / 2**20:.0f}"


class _Autorange:
    """The state of an autorange run: medians and peaks by (model, batch, dtype, row)."""

    def __init__(self, args, report):
        self.args, self.report, self.dev = args, report, args.device_obj
        self.med_of, self.peak_of = {}, {}
        self.t_start = time.perf_counter()

    def one(self, name, batch, model, x, t, dname, row) -> None:
        args, cleanup, note = self.args, None, ""
        try:
            if ROWS[row].compiled:
                torch._dynamo.reset()  # rows run one at a time here: each compiles afresh
            ac = autocast_for(self.dev, dname)
            fn, cleanup, note = make_row(row, model, x, t, ac)
            counts = None
            if ROWS[row].compiled:
                warm, counts = compile_warmup(fn, sync_for(self.dev))
                note = warm + "; " + note
            med, n = timer_median(fn, torch.get_num_threads(), args.repeats, args.min_time,
                                  args.warmup)
            if counts is not None:  # more graphs than in the compile call: a recompile
                note = f"row total {compile_stats(counts)}; " + note
            pk = peak_mib(fn, self.dev)
            key = (name, batch, dname, row)
            self.med_of[key], self.peak_of[key] = med, pk
            self.report.add(TITLE, cells(name, batch, dname, row, med, n,
                                         self.med_of.get((name, batch, dname, "forward")), pk,
                                         note))
        except Exception as e:
            self.report.add(TITLE, failed(name, batch, dname, row, fmt_err(e)))
        finally:
            run_cleanup(cleanup, self.report, f"{name} {dname} {row}")
            if self.dev.type == "cuda":
                torch.cuda.empty_cache()

    def goals(self) -> None:
        """The goals table, rebuilt from the medians so far."""
        title = "Goals (issue 4), this run"
        self.report.table(title, _floors.GOAL_COLUMNS, echo=False)
        for name in self.args.model_list:
            for batch in self.args.batch_list:
                for dname in self.args.dtype_list:
                    row = _floors.goal_row(name, dname, batch, self.med_of, self.peak_of)
                    if row is not None:
                        self.report.add(title, row, echo=False)

    def spent(self) -> bool:
        return time.perf_counter() - self.t_start > self.args.budget


def autorange(args, report) -> None:
    run = _Autorange(args, report)
    bw = None
    if args.floors:
        try:
            bw = _floors.bandwidth_gbs(run.dev, (1 << 30) if run.dev.type == "cuda" else 1 << 26)
        except Exception as e:
            print("bandwidth measurement failed:", fmt_err(e), file=sys.stderr)
        report.head.append(f"- copy bandwidth (device copy, read+write): "
                           f"{f'{bw:.0f} GB/s' if bw else 'n/a'}")
        report.table(FLOOR_TITLE, _floors.FLOOR_COLUMNS,
                     _floors.FLOOR_NOTES)
    eager = [r for r in args.row_list if not ROWS[r].compiled]
    late = [r for r in args.row_list if ROWS[r].compiled]
    built = []
    for name in args.model_list:
        for batch in args.batch_list:
            try:
                model, x, t = inputs(name, batch, args.size, run.dev)
            except Exception as e:
                report.add(TITLE, failed(name, batch, "-", "build", fmt_err(e)))
                continue
            built.append((name, batch, model, x, t))
            for dname in args.dtype_list:
                for row in eager:
                    run.one(name, batch, model, x, t, dname, row)
                if args.floors:
                    report.add(FLOOR_TITLE, _floors.floor_row(
                        name, batch, dname, model, x, t, autocast_for(run.dev, dname), bw,
                        run.med_of))
                run.goals()
    for row in late:  # hooks_compile first (a goal of issue 4 compares against it)
        for dname in [d for d in args.compile_dtypes.split(",") if d in args.dtype_list]:
            for name, batch, model, x, t in built:
                if run.spent():
                    report.add(TITLE, [name, batch, dname, row] + ["-"] * 6 +
                               [f"skipped: time budget {args.budget:.0f} s spent"])
                    continue
                run.one(name, batch, model, x, t, dname, row)
    if built:
        run.goals()
    report.note(f"total wall time {time.perf_counter() - run.t_start:.0f} s")


# --- peak resident memory ---------------------------------------------------------------------
def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def memory_child(args) -> int:
    """One row in this (fresh) process: prints {"base_mib", "peak_mib"} as JSON."""
    import tsgb_ext  # noqa: F401  (loaded before the baseline: its import is not a row's cost)
    model, x, t = inputs(args.model_list[0], args.batch_list[0], args.size, args.device_obj)
    with torch.no_grad():  # touch the weights once, outside the measured peak
        model(x[:1])
    base = _maxrss_mib()
    fn, cleanup, _ = make_row(args.child, model, x, t)
    out = fn()
    del out
    peak = _maxrss_mib()
    cleanup()
    print(json.dumps({"base_mib": base, "peak_mib": peak}))
    return 0


def run_memory(args, report) -> int:
    rows = args.row_list if args.rows else MEMORY_ROWS
    report.head.append("- peak memory: each row in a fresh subprocess: ru_maxrss after one call "
                       "minus ru_maxrss after model load and one no-grad forward of one image "
                       "(the model's weights excluded)")
    title = report.table("Peak resident memory", ["model", "batch", "row",
                                                  "peak RSS above baseline MiB", "baseline MiB",
                                                  "note"])
    bench = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench.py")
    for name in args.model_list:
        for batch in args.batch_list:
            for row in rows:
                cmd = [sys.executable, bench, "--bench", "memory", "--child", row, "--models",
                       name, "--batch", str(batch), "--size", str(args.size), "--threads",
                       str(torch.get_num_threads()), "--device", "cpu"]
                try:
                    p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                    if p.returncode:
                        raise RuntimeError(p.stderr.strip().splitlines()[-1] if p.stderr
                                           else f"exit {p.returncode}")
                    r = json.loads(p.stdout.strip().splitlines()[-1])
                    report.add(title, [name, batch, row, f"{r['peak_mib'] - r['base_mib']:.0f}",
                                       f"{r['base_mib']:.0f}", ""])
                except Exception as e:
                    report.add(title, [name, batch, row, "-", "-", f"FAILED {fmt_err(e)}"])
    return 0
