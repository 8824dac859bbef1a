"""The benchmark rows shared by bench_cpu.py and bench_gpu.py.

Every row is built by ``make_row(name, model, x, target)`` into ``(fn, cleanup, note)``:
``fn()`` does the timed work for the whole batch, ``cleanup()`` undoes any conversion.
The model is an eval-mode CNN with random weights; ``target`` is one class per image.
"""
from __future__ import annotations

import contextlib
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn as nn

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import authors  # noqa: E402

ROWS = {
    "forward": "no-grad forward (the model alone)",
    "gradient": "plain input gradient: forward + backward of the target logit to x, "
                "params requires_grad=False, map = sum_c(gx*x)",
    "authors": "authors' formulation (benchmarks/authors.py: autograd.Functions whose "
               "backward recomputes each conv/BN forward, channel-summed ones-kernel box sums)",
    "authors_full": "authors' commented-out fallback: ones_like(W) full convs for the box sums",
    "hooks": "tsgb_ext backend='hooks' (pure PyTorch), model kept converted (with-block)",
    "hooks_compile": "TSGB(backend='hooks', compile=True) in a with-block (torch.compile, default "
                     "mode)",
    "native": "tsgb_ext backend='native' (compiled ops), model kept converted (with-block)",
    "native_unfused": "backend='native' with fuse=False (no conv -> BN -> ReLU fusion; A/B row)",
    "native_noreuse": "backend='native' with reuse_memory=False (activation memory allocated "
                      "afresh each call; A/B row)",
    "native_t5": "backend='native', 5 targets per image ((N, 5) target): one forward, 5 backwards",
    "native_compile": "TSGB(backend='native', compile=True) in a with-block (torch.compile, "
                      "default mode; the TSGB ops stay opaque custom ops in the compiled graph)",
    "native_percall": "backend='native', one un-converted call (conversion + restore included)",
}
DEFAULT_ROWS = ["forward", "gradient", "authors", "hooks", "hooks_compile", "native",
                "native_noreuse", "native_compile", "native_t5", "native_percall"]


def make_targets(n: int, classes: int, t: int = 1, seed: int = 0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    tt = torch.randint(0, classes, (n, t), generator=gen)
    return (tt[:, 0] if t == 1 else tt).to(device)


def make_row(name: str, model: nn.Module, x: torch.Tensor, target: torch.Tensor,
             autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
             ) -> Tuple[Callable[[], object], Callable[[], None], str]:
    import tsgb_ext

    def wrap(f):
        def g():
            with autocast():
                return f()
        return g

    note = ""
    if name == "forward":
        def f():
            with torch.no_grad():
                return model(x)
        return wrap(f), lambda: None, note

    if name == "gradient":
        flags = [(p, p.requires_grad) for p in model.parameters()]
        for p, _ in flags:
            p.requires_grad_(False)

        def f():
            xi = x.detach().requires_grad_(True)
            with torch.enable_grad():
                logits = model(xi)
                sel = logits.gather(1, target.view(-1, 1)).sum()
                (gx,) = torch.autograd.grad(sel, xi)
            return (gx * x).sum(1, keepdim=True)

        def cleanup():
            for p, r in flags:
                p.requires_grad_(r)
        return wrap(f), cleanup, note

    if name in ("authors", "authors_full"):
        ex = authors.AuthorsTSGB(model, variant="full" if name == "authors_full" else
                                 "published")
        ex.__enter__()
        return wrap(lambda: ex.attribute(x, target)), lambda: ex.__exit__(None, None, None), note

    if name in ("hooks", "native", "native_t5", "native_unfused", "native_noreuse"):
        backend = "hooks" if name == "hooks" else "native"
        tgt = target
        if name == "native_t5":
            classes = _num_classes(model)
            tgt = torch.stack([(target + 37 * j) % classes for j in range(5)], 1)
        ex = tsgb_ext.TSGB(model, backend=backend, fuse=name != "native_unfused",
                           reuse_memory=name != "native_noreuse")
        ex.__enter__()
        return wrap(lambda: ex.attribute(x, tgt)), lambda: ex.__exit__(None, None, None), note

    if name == "native_percall":
        ex = tsgb_ext.TSGB(model, backend="native")
        return wrap(lambda: ex.attribute(x, target)), lambda: None, note

    if name in ("hooks_compile", "native_compile"):
        # TSGB(..., compile=True) in a with-block: the first call runs eagerly (and fixes the
        # classifier patch), the second compiles the converted forward; the harness makes
        # both warm-up calls (COMPILE_WARMUP) and reports their time
        # (no torch._dynamo.reset() here: the rows of bench_cpu are alive at the same time,
        # and a reset would throw away the other compile row's code)
        ex = tsgb_ext.TSGB(model, backend="hooks" if name == "hooks_compile" else "native",
                           compile=True)
        ex.__enter__()
        return (wrap(lambda: ex.attribute(x, target)), lambda: ex.__exit__(None, None, None),
                "compile time excluded")

    raise ValueError(f"unknown row {name!r}; rows: {list(ROWS)}")


def _num_classes(model: nn.Module) -> int:
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1].out_features


def measure(fn, threads: int, repeat: int = 0, min_run_time: float = 1.0,
            warmup: int = 1) -> Tuple[float, int]:
    """Median seconds per call of ``fn`` with torch.utils.benchmark.Timer (which synchronises
    CUDA). ``repeat > 0``: that many single-call timings; else blocked_autorange."""
    from torch.utils.benchmark import Timer
    for _ in range(warmup):
        fn()
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
    if repeat > 0:
        times: List[float] = [timer.timeit(1).mean for _ in range(repeat)]
        return statistics.median(times), len(times)
    m = timer.blocked_autorange(min_run_time=min_run_time)
    return m.median, len(m.times) * m.number_per_run


def cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


COMPILE_WARMUP = 2
"""Warm-up calls of a *_compile row before timing: an eager first call, then the compile."""


def compile_warmup(fn, sync: Callable[[], None] = lambda: None,
                   calls: int = COMPILE_WARMUP) -> Tuple[str, Tuple[int, int]]:
    """Make a *_compile row's warm-up calls, each timed on its own (``sync`` waits for the
    device), and say which of them compiled: ``("eager first call 0.21 s; compile (call 2)
    38.4 s: 3 graph(s), 0 graph break(s)", counts)``. A call "compiled" when dynamo's graph
    count grew during it; the counts are differences over these calls only, so rows run one
    after another in one process each report their own (dynamo's counters are cumulative and
    ``torch._dynamo.reset()`` does not clear them). ``counts`` is compile_counts() before the
    first call: pass it to compile_stats() after timing to count any recompile there too."""
    start = compile_counts()
    parts = []
    for i in range(calls):
        before = compile_counts()
        t0 = time.perf_counter()
        fn()
        sync()
        dt = time.perf_counter() - t0
        g, b = (a - c for a, c in zip(compile_counts(), before))
        if g or b:
            parts.append(f"compile (call {i + 1}) {dt:.1f} s: {g} graph(s), {b} graph break(s)")
        else:
            parts.append(f"{'eager first call' if i == 0 else f'call {i + 1} (no compile)'} "
                         f"{dt:.2f} s")
    return "; ".join(parts), start


def compile_stats(since=(0, 0)) -> str:
    """Dynamo's counts of graphs compiled and graph breaks (since ``compile_counts()`` was
    ``since``)."""
    g, b = compile_counts()
    return f"{g - since[0]} graph(s), {b - since[1]} graph break(s)"


def compile_counts():
    """(graphs compiled, graph breaks) in this process so far (dynamo's counters)."""
    try:
        from torch._dynamo.utils import counters
        return counters["stats"].get("unique_graphs", 0), sum(counters["graph_break"].values())
    except Exception:  # pragma: no cover
        return 0, 0


def fmt_err(e: BaseException) -> str:
    s = f"{type(e).__name__}: {e}".replace("\n", " ").replace("|", "/")
    return s[:160] + ("..." if len(s) > 160 else "")


def run_cleanup(cleanup, lines: List[str]) -> None:
    """Run a row's cleanup; a failure is appended to the row's table line, never raised."""
    if cleanup is None:
        return
    try:
        cleanup()
    except Exception as e:
        lines[-1] = lines[-1][:-1] + f" cleanup failed: {fmt_err(e)} |"


def interleaved_medians(rows: Dict[str, Callable[[], object]], rounds: int) -> Dict[str, float]:
    """One warm-up call of each row, then ``rounds`` rounds of one call of each row in turn;
    the median seconds per row. Interleaving keeps slow drifts of the machine (heap state,
    other load) from favouring the rows timed first."""
    for f in rows.values():
        f()
    times: Dict[str, List[float]] = {k: [] for k in rows}
    for _ in range(rounds):
        for k, f in rows.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}
