"""Helpers shared by every benchmark kind of ``bench.py``: errors as table cells, relative
errors, BN statistics, the machine header, timing (medians), the output table and the
photo batch.
"""
from __future__ import annotations

import csv
import datetime
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

EPS = 1e-10  # the spec's stabiliser (the ops' eps argument)
DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "fp16": torch.float16,
          "bf16": torch.bfloat16}


# --- values -----------------------------------------------------------------------------------
def fmt_err(e: BaseException) -> str:
    """An exception as one table cell: no newlines, no ``|``, at most 160 characters."""
    s = f"{type(e).__name__}: {e}".replace("\n", " ").replace("|", "/")
    return s[:160] + ("..." if len(s) > 160 else "")


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in float64."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def rel_max(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max|a - b| / max|b|`` in float64."""
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial eval statistics and affine parameters for every BatchNorm2d (a fresh BN is
    the identity, and the BN rule would do no work)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                    m.bias.copy_(torch.randn(c, generator=gen) * 0.1)
    return model


def make_targets(n: int, classes: int, t: int = 1, seed: int = 0, device="cpu"):
    """One class per image (``t == 1``: shape (n,)), else (n, t)."""
    gen = torch.Generator().manual_seed(seed)
    tt = torch.randint(0, classes, (n, t), generator=gen)
    return (tt[:, 0] if t == 1 else tt).to(device)


def fused_chains(explainer) -> int:
    """Fused conv -> BN (-> act) chains of an explainer that has run, from its public
    ``report()`` (one conv row per fused chain)."""
    return sum(1 for row in explainer.report() if row[2] == "conv" and "fused" in row[3])


# --- the machine ------------------------------------------------------------------------------
def cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def device_line(device: torch.device) -> str:
    if device.type == "cuda":
        cap = ".".join(map(str, torch.cuda.get_device_capability(device)))
        return (f"{torch.cuda.get_device_name(device)} (sm {cap}), CUDA {torch.version.cuda}, "
                f"cuDNN {torch.backends.cudnn.version()}")
    return f"{cpu_model_name()}, {os.cpu_count()} logical cores visible"


def load_average() -> str:
    la = os.getloadavg()
    return f"{la[0]:.2f} / {la[1]:.2f} / {la[2]:.2f} (1/5/15 min)"


def header(title: str, device: torch.device, extra: Sequence[str] = ()) -> List[str]:
    """The lines that head every table: hardware, torch and tsgb_ext versions, threads, date,
    load average at start, and the kind's own ``extra`` lines."""
    import tsgb_ext
    info = tsgb_ext.backend_info()
    lines = [f"# {title}", "",
             f"- device: {device_line(device)}; {torch.get_num_threads()} torch threads",
             f"- torch {torch.__version__}; tsgb_ext {tsgb_ext.__version__}, native "
             f"{info['native']}, native CUDA kernels {info['native_cuda']}",
             f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}, load average at "
             f"start {load_average()}"]
    return lines + [f"- {e}" for e in extra]


# --- timing -----------------------------------------------------------------------------------
def sync_for(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def timer_median(fn, threads: int, repeats: int = 0, min_time: float = 1.0,
                 warmup: int = 1) -> Tuple[float, int]:
    """Median seconds per call of ``fn`` with torch.utils.benchmark.Timer (which synchronises
    CUDA), after ``warmup`` calls. ``repeats > 0``: that many single-call timings; else
    blocked_autorange(min_run_time=min_time). Returns (median, calls timed)."""
    from torch.utils.benchmark import Timer
    for _ in range(warmup):
        fn()
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
    if repeats > 0:
        times = [timer.timeit(1).mean for _ in range(repeats)]
        return statistics.median(times), len(times)
    m = timer.blocked_autorange(min_run_time=min_time)
    return m.median, len(m.times) * m.number_per_run


def interleaved_medians(rows: Dict[str, Callable[[], object]], rounds: int,
                        warmup: bool = True) -> Dict[str, float]:
    """One warm-up call of each row (unless ``warmup`` is False), then ``rounds`` rounds of one
    call of each row in turn; the median seconds per row. Interleaving keeps slow drifts of
    the machine (heap state, other load) from favouring the rows timed first."""
    if warmup:
        for f in rows.values():
            f()
    times: Dict[str, List[float]] = {k: [] for k in rows}
    for _ in range(rounds):
        for k, f in rows.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def event_median_us(fn, device: torch.device, warmup: int, iters: int, reps: int) -> float:
    """Median over ``reps`` of the average microseconds per call of ``iters`` back-to-back
    calls: CUDA events on a GPU, time.perf_counter on the CPU."""
    for _ in range(warmup):
        fn()
    avgs = []
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        if cuda:
            end.record()
            end.synchronize()
            avgs.append(start.elapsed_time(end) * 1e3 / iters)
        else:
            avgs.append((time.perf_counter() - t0) * 1e6 / iters)
    return statistics.median(avgs)


# --- output -----------------------------------------------------------------------------------
class Report:
    """The head lines and the tables of one run. ``add(table, row)`` appends a row (a dict or
    a sequence in the table's column order), prints it as a markdown line and rewrites every
    output file, so a crash or a timeout keeps the rows done. Outputs: ``--out`` (markdown),
    ``--json`` (``{"head": [...], "tables": {title: [row dicts]}}``), ``--csv`` (one file; a
    ``table`` column says which table a row belongs to)."""

    def __init__(self, head: Sequence[str], out: Optional[str] = None,
                 json_path: Optional[str] = None, csv_path: Optional[str] = None):
        self.head, self.out, self.json_path, self.csv_path = list(head), out, json_path, csv_path
        self.tables: Dict[str, Tuple[List[str], List[dict]]] = {}
        self.notes: Dict[str, List[str]] = {}
        self.tail: List[str] = []

    def table(self, title: str, columns: Sequence[str], notes: Sequence[str] = (),
              echo: bool = True) -> str:
        """Start (or restart, empty) the table ``title``; ``echo``: print its heading."""
        self.tables[title] = (list(columns), [])
        self.notes[title] = list(notes)
        if echo:
            print(f"\n## {title}\n\n| " + " | ".join(columns) + " |\n|" + "---|" * len(columns),
                  flush=True)
        return title

    def add(self, title: str, row, echo: bool = True) -> None:
        cols, rows = self.tables[title]
        if not isinstance(row, dict):
            row = dict(zip(cols, row))
        rows.append({c: row.get(c, "") for c in cols})
        if echo:
            print(self._line(rows[-1], cols), flush=True)
        self.flush()

    def note(self, text: str) -> None:
        self.tail.append(text)
        print(text, flush=True)
        self.flush()

    @staticmethod
    def _line(row: dict, cols: Sequence[str]) -> str:
        return "| " + " | ".join(str(row[c]) for c in cols) + " |"

    def markdown(self) -> str:
        parts = ["\n".join(self.head)]
        for title, (cols, rows) in self.tables.items():
            block = [f"## {title}", ""] + self.notes[title] + ([""] if self.notes[title] else [])
            block += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            block += [self._line(r, cols) for r in rows]
            parts.append("\n".join(block))
        if self.tail:
            parts.append("\n".join(self.tail))
        return "\n\n".join(parts) + "\n"

    def flush(self) -> str:
        text = self.markdown()
        if self.out:
            with open(self.out, "w") as f:
                f.write(text)
        if self.json_path:
            with open(self.json_path, "w") as f:
                json.dump({"head": self.head, "tables": {k: v[1] for k, v in self.tables.items()},
                           "notes": self.tail}, f, indent=1)
        if self.csv_path:
            self._write_csv()
        return text

    def _write_csv(self) -> None:
        cols = ["table"] + [c for cs, _ in self.tables.values() for c in cs]
        cols = list(dict.fromkeys(cols))
        with open(self.csv_path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            for title, (_, rows) in self.tables.items():
                for r in rows:
                    w.writerow({"table": title, **r})


# --- the photos -------------------------------------------------------------------------------
def photo_batch(loaded):
    """The 8 photos of make_photo_dir.py written as JPEGs and read back the way ``tsgb
    explain`` reads them (``ImageFileDataset`` at the model's size): the collated batch
    (``image`` in [0, 1] RGB, ``path``) and the normalised input ``x``."""
    import tempfile

    from make_photo_dir import write_photo_dir
    from tsgb_ext.data import pipeline
    from tsgb_ext.io.images import list_images
    with tempfile.TemporaryDirectory() as d:
        write_photo_dir(d)
        ds = pipeline.ImageFileDataset(list_images([d]), loaded.size)
        batch = pipeline.collate([ds[i] for i in range(len(ds))])
    mean = torch.tensor(loaded.mean).view(1, 3, 1, 1)
    std = torch.tensor(loaded.std).view(1, 3, 1, 1)
    return batch, ((batch["image"] - mean) / std).float().contiguous()
