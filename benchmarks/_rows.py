"""The one table of benchmark rows: what each row times, and how it is built.

``make_row(name, model, x, target, autocast)`` builds a row into ``(fn, cleanup, note)``:
``fn()`` does the timed work for the whole batch, ``cleanup()`` undoes any conversion. The
model is an eval-mode CNN; ``target`` is one class per image. Every TSGB row is one entry of
``ROWS`` with its explainer's arguments; the others (forward, gradient, the authors' code) have
a builder of their own.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Tuple

import torch
import torch.nn as nn

import _common  # noqa: F401  (puts benchmarks/ on sys.path)
import authors


@dataclass(frozen=True)
class Row:
    """One row: ``what`` it times; ``build`` (forward, gradient, authors) or a TSGB explainer
    made with ``tsgb`` (keyword arguments of ``tsgb_ext.TSGB``), kept converted in a with-block
    unless ``percall``; ``targets`` per image."""
    what: str
    build: Optional[Callable] = None
    tsgb: dict = field(default_factory=dict)
    percall: bool = False
    targets: int = 1

    @property
    def compiled(self) -> bool:
        return bool(self.tsgb.get("compile"))


def _forward(model, x, target):
    def f():
        with torch.no_grad():
            return model(x)
    return f, lambda: None


def _gradient(model, x, target):
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
    return f, cleanup


def _authors(variant):
    def build(model, x, target):
        ex = authors.AuthorsTSGB(model, variant=variant)
        ex.__enter__()
        return lambda: ex.attribute(x, target), lambda: ex.__exit__(None, None, None)
    return build


ROWS = {
    "forward": Row("no-grad forward (the model alone)", _forward),
    "gradient": Row("plain input gradient: forward + backward of the target logit to x, params "
                    "requires_grad=False, map = sum_c(gx*x)", _gradient),
    "authors": Row("authors' formulation (benchmarks/authors.py: autograd.Functions whose "
                   "backward recomputes each conv/BN forward, channel-summed ones-kernel box "
                   "sums)", _authors("published")),
    "authors_full": Row("authors' commented-out fallback: ones_like(W) full convs for the box "
                        "sums", _authors("full")),
    "hooks": Row("tsgb_ext backend='hooks' (pure PyTorch), model kept converted (with-block)",
                 tsgb=dict(backend="hooks")),
    "hooks_compile": Row("TSGB(backend='hooks', compile=True) in a with-block (torch.compile, "
                         "default mode)", tsgb=dict(backend="hooks", compile=True)),
    "hooks_percall": Row("backend='hooks', one un-converted call (conversion + restore "
                         "included)", tsgb=dict(backend="hooks"), percall=True),
    "native": Row("tsgb_ext backend='native' (compiled ops), model kept converted (with-block)",
                  tsgb=dict(backend="native")),
    "native_unfused": Row("backend='native' with fuse=False (no conv -> BN -> ReLU fusion; A/B "
                          "row)", tsgb=dict(backend="native", fuse=False)),
    "native_noreuse": Row("backend='native' with reuse_memory=False (activation memory "
                          "allocated afresh each call; A/B row)",
                          tsgb=dict(backend="native", reuse_memory=False)),
    "native_t5": Row("backend='native', 5 targets per image ((N, 5) target): one forward, 5 "
                     "backwards", tsgb=dict(backend="native"), targets=5),
    "native_compile": Row("TSGB(backend='native', compile=True) in a with-block (torch.compile, "
                          "default mode; the TSGB ops stay opaque custom ops in the compiled "
                          "graph)", tsgb=dict(backend="native", compile=True)),
    "native_percall": Row("backend='native', one un-converted call (conversion + restore "
                          "included)", tsgb=dict(backend="native"), percall=True),
    "native_unfused_percall": Row("backend='native', fuse=False, one un-converted call",
                                  tsgb=dict(backend="native", fuse=False), percall=True),
}
DEFAULT_ROWS = ["forward", "gradient", "authors", "hooks", "hooks_compile", "native",
                "native_noreuse", "native_compile", "native_t5", "native_percall"]
CUDA_ROWS = ["forward", "gradient", "authors", "hooks", "native", "native_unfused", "native_t5",
             "native_percall"]
"""Eager rows of a CUDA run; its compile rows (hooks_compile, then native_compile) run after
all eager rows, within --budget."""
MEMORY_ROWS = ["forward", "gradient", "authors", "hooks", "native"]


def num_classes(model: nn.Module) -> int:
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1].out_features


def make_row(name: str, model: nn.Module, x: torch.Tensor, target: torch.Tensor,
             autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
             ) -> Tuple[Callable[[], object], Callable[[], None], str]:
    import tsgb_ext
    if name not in ROWS:
        raise ValueError(f"unknown row {name!r}; rows: {list(ROWS)}")
    row = ROWS[name]
    if row.build is not None:
        f, cleanup = row.build(model, x, target)
        note = ""
    else:
        tgt = target
        if row.targets > 1:
            classes = num_classes(model)
            tgt = torch.stack([(target + 37 * j) % classes for j in range(row.targets)], 1)
        # a compile row: the first call runs eagerly (and fixes the classifier patch), the
        # second compiles the converted forward; the harness makes both warm-up calls
        # (COMPILE_WARMUP) and reports their time (no torch._dynamo.reset() here: interleaved
        # rows are alive at the same time, and a reset would throw away another row's code)
        ex = tsgb_ext.TSGB(model, **row.tsgb)
        cleanup = lambda: None  # noqa: E731
        if not row.percall:
            ex.__enter__()
            cleanup = lambda: ex.__exit__(None, None, None)  # noqa: E731
        f = lambda: ex.attribute(x, tgt)  # noqa: E731
        note = "compile time excluded" if row.compiled else ""

    def wrapped():
        with autocast():
            return f()
    return wrapped, cleanup, note


def run_cleanup(cleanup, report, title: str) -> None:
    """Run a row's cleanup; a failure is added to the table's notes, never raised."""
    if cleanup is None:
        return
    try:
        cleanup()
    except Exception as e:
        from _common import fmt_err
        report.note(f"cleanup failed in {title}: {fmt_err(e)}")


# --- compile rows ---------------------------------------------------------------------------
COMPILE_WARMUP = 2
"""Warm-up calls of a *_compile row before timing: an eager first call, then the compile."""


def compile_counts():
    """(graphs compiled, graph breaks) in this process so far (dynamo's counters)."""
    try:
        from torch._dynamo.utils import counters
        return counters["stats"].get("unique_graphs", 0), sum(counters["graph_break"].values())
    except Exception:  # pragma: no cover
        return 0, 0


def compile_stats(since=(0, 0)) -> str:
    """Dynamo's counts of graphs compiled and graph breaks (since ``compile_counts()`` was
    ``since``)."""
    g, b = compile_counts()
    return f"{g - since[0]} graph(s), {b - since[1]} graph break(s)"


def compile_warmup(fn, sync: Callable[[], None] = lambda: None,
                   calls: int = COMPILE_WARMUP) -> Tuple[str, Tuple[int, int]]:
    """Make a *_compile row's warm-up calls, each timed on its own (``sync`` waits for the
    device), and say which of them compiled: ``("eager first call 0.21 s; compile (call 2)
    38.4 s: 3 graph(s), 0 graph break(s)", counts)``. A call "compiled" when dynamo's graph
    count grew during it; the counts are differences over these calls only (dynamo's counters
    are cumulative and ``torch._dynamo.reset()`` does not clear them). ``counts`` is
    compile_counts() before the first call: pass it to compile_stats() after timing to count
    any recompile there too."""
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


def warm_up(row: str, fn) -> Tuple[int, float]:
    """The untimed calls before a row is timed: a compile row's COMPILE_WARMUP (its eager first
    call, then the call that compiles), one for the others (lazy set-up, first touch of
    memory). Returns (calls, seconds)."""
    calls = COMPILE_WARMUP if ROWS[row].compiled else 1
    tc = time.perf_counter()
    for _ in range(calls):
        fn()
    return calls, time.perf_counter() - tc
