"""Memory-traffic floors of the TSGB backward (``bench.py --bench timing --floors``): the bytes
a backward must move over the measured device-copy bandwidth, and the goals table of issue 4.
"""
from __future__ import annotations

import time
from collections import defaultdict

import torch
import torch.nn as nn

from _common import fmt_err

FLOOR_NOTES = [
    "Floor = bytes an unfused TSGB backward must move (_floors.floor_bytes: per Conv2d read g, "
    "y, x twice and write gx; per BN read g, x, write gx; per ReLU read g, y, write gx; per "
    "MaxPool read g and int64 indices, write gx) / measured copy bandwidth. Measured: row "
    "median minus the forward median.",
    "",
    "Op floor: the bytes the native backward's ops move, counted from the ops it runs in a "
    "with-block call (_floors.backward_op_bytes: each op reads its operands once, writes its "
    "result once; conv rules read x twice; views free) / the same bandwidth, with the conv -> "
    "BN -> ReLU fusion (fused) and without (unfused).",
]
FLOOR_COLUMNS = ["model", "batch", "dtype", "floor GB", "floor ms", "op floor fused GB / ms",
                 "op floor unfused GB / ms", "native - forward ms", "native_unfused - forward ms",
                 "hooks - forward ms", "authors - forward ms", "bytes by layer kind (GB)",
                 "fused backward bytes by op (GB)"]
GOAL_COLUMNS = ["model", "batch", "dtype", "native / forward (<= 1.5)",
                "native / gradient (<= 0.8)",
                "authors / native (>= 2)", "hooks_compile / native (>= 1.5)",
                "peak native / gradient MiB (<=)", "native images/s"]
_CONV_RULES = ("conv2d_backward", "conv2d_bn_backward")


def record_shapes(model: nn.Module, x: torch.Tensor, autocast):
    """(kind, input numel, output numel, output and input element size) of every leaf layer
    the forward runs."""
    recs, hooks = [], []

    def hook(m, inp, out):
        if isinstance(inp[0], torch.Tensor) and isinstance(out, torch.Tensor):
            recs.append((type(m).__name__, inp[0].numel(), out.numel(), out.element_size(),
                         inp[0].element_size()))
    for m in model.modules():
        if not list(m.children()):
            hooks.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad(), autocast():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return recs


def floor_bytes(recs):
    """Bytes an unfused TSGB backward must move at least, layer by layer (each layer's backward
    reads what its rule needs and writes its input gradient once, activations in the dtype the
    forward produced them in):
      Conv2d: read g and y (output size), read x twice (|x| box sum, sign(x)), write gx
      BatchNorm2d: read g and x, write gx  (y = x*scale + shift is recomputed)
      ReLU: read g and y, write gx
      MaxPool2d: read g and the int64 argmax indices (output size), write gx
    Residual additions, the pools to 1x1/7x7, Linear layers and the final map are not counted
    (small or free when fused). Returns (total, per-kind dict)."""
    per = defaultdict(int)
    for kind, n_in, n_out, es_out, es_in in recs:
        if kind == "Conv2d":
            per[kind] += 2 * n_out * es_out + 3 * n_in * es_in
        elif kind in ("BatchNorm2d", "ReLU"):
            per[kind] += 3 * n_in * es_in
        elif kind == "MaxPool2d":
            per[kind] += n_out * (es_out + 8) + n_in * es_in
    return sum(per.values()), dict(per)


def backward_op_bytes(model: nn.Module, x: torch.Tensor, target: torch.Tensor, autocast,
                      fuse: bool = True):
    """Bytes the ops of one native TSGB backward move if each reads its tensor operands once and
    writes its result once (the conv rules read x twice: |x| box sums, sign(x)): the floor of
    this implementation's backward, counted from the ops it actually runs (TorchDispatchMode,
    ops inside the autograd engine only). Returns (total, per-op dict)."""
    import tsgb_ext
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    per = defaultdict(int)

    def nbytes(t):
        return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            rets = func._schema.returns
            view = bool(rets) and rets[0].alias_info is not None  # detach, view, ...: no bytes
            if torch._C._current_graph_task_id() != -1 and not view:  # inside the backward
                name = func.__name__.split(".")[0]
                b = sum(nbytes(t) for t in tree_leaves((args, kwargs or {}))) + \
                    sum(nbytes(t) for t in tree_leaves(out))
                if name in _CONV_RULES:
                    b += nbytes(args[1])
                per[name] += b
            return out

    with tsgb_ext.TSGB(model, backend="native", fuse=fuse) as ex:  # counted on the 2nd call
        with autocast():
            ex.attribute(x, target)
        with autocast(), Count():
            ex.attribute(x, target)
    return sum(per.values()), dict(per)


def bandwidth_gbs(device, nbytes=1 << 30, iters=10) -> float:
    """Device-to-device copy bandwidth (read + write bytes / time), GB/s (1e9)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    if device.type != "cuda":
        t0 = time.perf_counter()
        for _ in range(iters):
            dst.copy_(src)
        return 2 * nbytes * iters / (time.perf_counter() - t0) / 1e9
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    return 2 * nbytes * iters / (start.elapsed_time(end) / 1e3) / 1e9


def floor_row(name, batch, dname, model, x, t, autocast, bw, med_of) -> list:
    """One row of the floor table (FLOOR_COLUMNS) for a model, batch and dtype; ``med_of`` maps
    (model, batch, dtype, row) to its median seconds."""
    try:
        total, per = floor_bytes(record_shapes(model, x, autocast))

        def ms(nb):
            return f"{nb / (bw * 1e9) * 1e3:.2f}" if bw else "-"

        def minus(row):
            m, f0 = (med_of.get((name, batch, dname, r)) for r in (row, "forward"))
            return f"{(m - f0) * 1e3:.2f}" if m is not None and f0 else "-"
        fused, oper = backward_op_bytes(model, x, t, autocast, True)
        unfused, _ = backward_op_bytes(model, x, t, autocast, False)
        kinds = ", ".join(f"{k} {v / 1e9:.2f}" for k, v in sorted(per.items()))
        ops_txt = ", ".join(f"{k} {v / 1e9:.2f}" for k, v in
                            sorted(oper.items(), key=lambda kv: -kv[1]) if v >= 1e7)
        return [name, batch, dname, f"{total / 1e9:.2f}", ms(total),
                f"{fused / 1e9:.2f} / {ms(fused)}",
                f"{unfused / 1e9:.2f} / {ms(unfused)}", minus("native"),
                minus("native_unfused"), minus("hooks"), minus("authors"), kinds, ops_txt]
    except Exception as e:
        return [name, batch, dname] + ["-"] * 9 + [f"FAILED {fmt_err(e)}"]


def goal_row(name, dname, batch, med_of, peak_of):
    """Issue 4's goals for a model, batch and dtype from this run's medians and peaks
    (GOAL_COLUMNS), or None without a native median."""
    m = {r: med_of.get((name, batch, dname, r)) for r in
         ("forward", "gradient", "authors", "hooks_compile", "native")}
    if m["native"] is None:
        return None

    def ratio(a, b, goal, higher):
        if a is None or b is None:
            return "-"
        v = a / b
        ok = v >= goal if higher else v <= goal
        return f"{v:.2f} {'met' if ok else 'MISSED'}"
    pn, pg = (peak_of.get((name, batch, dname, r), "-") for r in ("native", "gradient"))
    mem = "-"
    if pn not in ("-", None) and pg not in ("-", None):
        mem = f"{pn} / {pg} {'met' if float(pn) <= float(pg) else 'MISSED'}"
    return [name, batch, dname, ratio(m["native"], m["forward"], 1.5, False),
            ratio(m["native"], m["gradient"], 0.8, False),
            ratio(m["authors"], m["native"], 2.0, True),
            ratio(m["hooks_compile"], m["native"], 1.5, True), mem,
            f"{batch / m['native']:.0f}"]
