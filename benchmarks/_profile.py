"""Op-level CPU measurements of the native backend: ``--bench profile`` (torch.profiler per op),
``layer`` (one ResNet50 layer's backward ops alone), ``host`` (host time per layer of a chain of
tiny layers, 1 thread) and ``phases`` (per-call A/B and the forward / backward / map split,
fused vs unfused).

* profile: torch.profiler over ``--repeats`` native TSGB calls (model kept converted, after
  ``--warmup`` calls), per call: the top ops by self CPU time, then the TSGB backward ops, ReLU
  backward and the forward ops with self and total CPU time (children included: the depthwise
  conv rule calls ATen convs) and call counts; the conv rules' total and the ATen convolution
  kernels' self time. ``--no-fuse``: TSGB(..., fuse=False).
* layer: ResNet50 layer1.0's conv3 (1x1, 64 -> 256, 56x56) and bn3, float32, NCHW, with the
  layer's real input: conv2d_backward, batch_norm_backward, threshold_backward and
  conv2d_bn_backward with the ReLU folded in (act 1), Timer medians.
* host: a chain of ``--layers`` conv 3x3 -> BN -> ReLU layers on a 1x4x6x6 tensor, 1 thread,
  forward + autograd.grad, time per layer: the fused op, the unfused native ops and plain torch
  ops; then one fused forward call with and without autograd.
* phases: (a) no-grad forward, fused and unfused per-call ``attribute``, one call of each per
  round, ``--repeats`` rounds, medians; (b) with-blocks of ``--calls`` calls, fused then
  unfused, ``--alternations`` times: time up to torch.autograd.grad (forward with autograd),
  inside it (backward) and after it (the map).
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

import _models
from _common import EPS, fused_chains, interleaved_medians, make_targets, timer_median

BACKWARD_OPS = ["tsgb_ext::conv2d_backward", "tsgb_ext::conv2d_bn_backward",
                "tsgb_ext::batch_norm_backward", "tsgb_ext::avg_pool2d_backward",
                "tsgb_ext::linear_backward", "aten::threshold_backward",
                "aten::hardtanh_backward", "aten::max_pool2d_with_indices_backward"]
FORWARD_OPS = ["tsgb_ext::conv2d", "tsgb_ext::conv2d_relu", "tsgb_ext::conv2d_bn_act",
               "tsgb_ext::batch_norm", "tsgb_ext::avg_pool2d", "tsgb_ext::linear"]
CONV_KERNELS = {"aten::mkldnn_convolution", "aten::_slow_conv2d_forward",
                "aten::_nnpack_spatial_convolution", "aten::slow_conv_dilated2d",
                "aten::_mkldnn_convolution_transpose", "aten::slow_conv_transpose2d",
                "aten::mkldnn_convolution_transpose"}
OP_COLUMNS = ["op", "self CPU ms", "total CPU ms", "calls"]


def _model_input(args):
    name, batch = args.model_list[0], args.batch_list[0]
    model = _models.build(name)
    x = torch.randn(batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    return name, batch, model, x, make_targets(batch, 1000)


def run_profile(args, report) -> int:
    import tsgb_ext
    from torch.profiler import ProfilerActivity, profile
    name, batch, model, x, t = _model_input(args)
    report.head.append(f"- profile: {name}, batch {batch}, "
                       f"{'unfused' if args.no_fuse else 'fused'}")
    with tsgb_ext.TSGB(model, backend="native", fuse=not args.no_fuse) as ex:
        for _ in range(args.warmup):
            ex.attribute(x, t)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            for _ in range(args.repeats):
                ex.attribute(x, t)
            wall = (time.perf_counter() - t0) / args.repeats
        chains = fused_chains(ex)
    n = args.repeats
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total_self = sum(e.self_cpu_time_total for e in events) / n / 1e3
    report.note(f"wall time per call under the profiler: {wall * 1e3:.1f} ms; sum of self CPU "
                f"times {total_self:.1f} ms per call (averaged over {n} call(s)); fused conv -> "
                f"BN chains: {chains}")

    def op_row(key, e):
        return [f"`{key}`", f"{e.self_cpu_time_total / n / 1e3:.1f}",
                f"{e.cpu_time_total / n / 1e3:.1f}", e.count // n]
    top = report.table(f"Top {args.top} ops by self CPU time, per call", OP_COLUMNS)
    for e in events[:args.top]:
        report.add(top, op_row(e.key, e))
    by_key = {e.key: e for e in events}
    for title, keys in (("TSGB backward ops and activation backwards", BACKWARD_OPS),
                        ("forward ops of the converted model", FORWARD_OPS)):
        title = report.table(f"{title}, per call (total = children included)", OP_COLUMNS)
        for k in keys:
            if k in by_key:
                report.add(title, op_row(k, by_key[k]))
    rules = [by_key[k] for k in ("tsgb_ext::conv2d_backward", "tsgb_ext::conv2d_bn_backward")
             if k in by_key]
    convs = [e for e in events if e.key in CONV_KERNELS]
    report.note(f"all conv rules (conv2d_backward + conv2d_bn_backward, total CPU): "
                f"{sum(e.cpu_time_total for e in rules) / n / 1e3:.1f} ms per call; ATen "
                f"convolution kernels (self CPU: " + " + ".join(e.key for e in convs) + f"): "
                f"{sum(e.self_cpu_time_total for e in convs) / n / 1e3:.1f} ms, "
                f"{sum(e.count for e in convs) // n} calls per call (the forward's convs, and "
                f"the depthwise conv rule's ones-kernel convs where there are any)")
    report.note("(an op whose autograd kernel re-dispatches to itself is counted twice: "
                "tsgb_ext::batch_norm shows 2 calls per BN layer)")
    return 0


def _layer_tensors(batch):
    """ResNet50 layer1.0's conv3 and bn3 with the layer's real input (forward hook on a random
    image batch): conv, bn, x, y = conv(x), BN scale and shift, yb = BN(y), a gradient g."""
    model = _models.build("resnet50")
    conv, bn = model.layer1[0].conv3, model.layer1[0].bn3
    seen = {}

    def keep_input(mod, inp, out):  # returns None: the output stays as it is
        seen.setdefault("x", inp[0].detach().clone())
    h = conv.register_forward_hook(keep_input)
    with torch.no_grad():
        model(torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0)))
    h.remove()
    x = seen["x"].contiguous()
    with torch.no_grad():
        y = F.conv2d(x, conv.weight)
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        shift = bn.bias - bn.running_mean * scale
        yb = y * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    return conv, bn, x, y, scale, shift, yb, g


def run_layer(args, report) -> int:
    ops = torch.ops.tsgb_ext
    batch = args.batch_list[0]
    conv, bn, x, y, scale, shift, yb, g = _layer_tensors(batch)
    k, geo = list(conv.kernel_size), ([1, 1], [0, 0], [1, 1], 1)  # stride, pad, dil, groups
    report.head.append(f"- layer: ResNet50 layer1.0 conv3 + bn3 + ReLU, x {tuple(x.shape)}, y "
                       f"{tuple(y.shape)}, 1x1 conv, float32, NCHW; medians of "
                       f"blocked_autorange(min_run_time={args.min_time})")
    cases = [
        ("conv2d_backward (conv rule alone)",
         lambda: ops.conv2d_backward(g, x, y, k, *geo, EPS)),
        ("batch_norm_backward on y (BN rule alone)",
         lambda: ops.batch_norm_backward(g, y, scale, shift, EPS)),
        ("threshold_backward on yb (ReLU backward alone)",
         lambda: torch.ops.aten.threshold_backward(g, yb, 0.0)),
        ("conv2d_bn_backward, ReLU folded in (act 1)",
         lambda: ops.conv2d_bn_backward(g, x, y, bn.running_mean, bn.running_var, bn.weight,
                                        bn.bias, bn.eps, 1, k, *geo, EPS)),
    ]
    title = report.table("One layer's backward ops", ["op", "median ms", "runs"])
    res = {}
    with torch.no_grad():
        for name, fn in cases:
            med, n = timer_median(fn, torch.get_num_threads(), 0, args.min_time)
            res[name] = med
            report.add(title, [name, f"{med * 1e3:.2f}", n])
    unf = sum(v for kk, v in res.items() if not kk.startswith("conv2d_bn_backward"))
    report.note(f"unfused sum (conv + BN + ReLU rules): {unf * 1e3:.2f} ms")
    return 0


def _host_chains(layers):
    """The fused, unfused-native and plain-torch chains of ``layers`` conv3x3 -> BN -> ReLU
    layers on 4 channels, their input and the fused op's arguments for one layer."""
    ops = torch.ops.tsgb_ext
    gen = torch.Generator().manual_seed(0)
    c = 4
    ws = [torch.randn(c, c, 3, 3, generator=gen) * (2.0 / (c * 9)) ** 0.5 for _ in range(layers)]
    bns = [(torch.randn(c, generator=gen) * 0.1, torch.rand(c, generator=gen) + 0.5,
            torch.rand(c, generator=gen) + 0.5, torch.randn(c, generator=gen) * 0.1)
           for _ in range(layers)]  # running_mean, running_var, weight, bias
    x0 = torch.randn(1, c, 6, 6, generator=gen)
    geo, bn_eps = ([1, 1], [1, 1], [1, 1], 1), 1e-5

    def fused(h):
        for w, (rm, rv, bw, bb) in zip(ws, bns):
            h = ops.conv2d_bn_act(h, w, None, *geo, rm, rv, bw, bb, bn_eps, 1)[0]
        return h

    def unfused(h):
        for w, (rm, rv, bw, bb) in zip(ws, bns):
            h = torch.relu(ops.batch_norm(ops.conv2d(h, w, None, *geo), rm, rv, bw, bb, bn_eps))
        return h

    def plain(h):
        for w, (rm, rv, bw, bb) in zip(ws, bns):
            h = F.relu(F.batch_norm(F.conv2d(h, w, None, 1, 1), rm, rv, bw, bb, False, 0.0,
                                    bn_eps))
        return h
    one = (ws[0], None, *geo, *bns[0], bn_eps, 1)
    return {"fused conv2d_bn_act": fused, "unfused conv2d + batch_norm + ReLU": unfused,
            "plain F.conv2d + F.batch_norm + F.relu": plain}, x0, one


def run_host(args, report) -> int:
    ops = torch.ops.tsgb_ext
    torch.set_num_threads(1)
    layers = args.layers
    chains, x0, one = _host_chains(layers)
    report.head.append(f"- host: {layers} chained conv3x3 -> BN -> ReLU layers, 1x4x6x6, 1 "
                       f"thread; medians of blocked_autorange(min_run_time={args.min_time})")
    title = report.table(f"forward + autograd.grad to the input, per layer (median / {layers})",
                         ["chain", "us per layer", "runs", "output finite"])
    for name, chain in chains.items():
        def f(chain=chain):
            xi = x0.clone().requires_grad_(True)
            return torch.autograd.grad(chain(xi).sum(), xi)[0]
        ok = bool(torch.isfinite(f()).all())
        med, n = timer_median(f, 1, 0, args.min_time)
        report.add(title, [name, f"{med / layers * 1e6:.1f}", n, ok])
    xg = x0.clone().requires_grad_(True)

    def op_nograd():
        with torch.no_grad():
            return ops.conv2d_bn_act(x0, *one)
    title = report.table("one conv2d_bn_act forward call (the op's own compute included)",
                         ["call", "us", "runs"])
    for name, f in (("with autograd (input requires grad)", lambda: ops.conv2d_bn_act(xg, *one)),
                    ("without (no_grad)", op_nograd)):
        med, n = timer_median(f, 1, 0, args.min_time)
        report.add(title, [name, f"{med * 1e6:.1f}", n])
    return 0


def run_phases(args, report) -> int:
    import tsgb_ext
    name, batch, model, x, t = _model_input(args)
    report.head.append(f"- phases: {name}, batch {batch}, one process")
    exs = {"fused": tsgb_ext.TSGB(model, backend="native", fuse=True),
           "unfused": tsgb_ext.TSGB(model, backend="native", fuse=False)}

    def fwd():
        with torch.no_grad():
            model(x)
    rows = {"no-grad forward": fwd}
    rows.update({k: (lambda ex=ex: ex.attribute(x, t)) for k, ex in exs.items()})
    med = interleaved_medians(rows, args.repeats)
    title = report.table(f"(a) per-call attribute (conversion and restore included), one call "
                         f"of each row per round, {args.repeats} rounds, medians",
                         ["row", "median ms", "x no-grad forward"])
    for k, v in med.items():
        report.add(title, [k, f"{v * 1e3:.1f}", f"{v / med['no-grad forward']:.2f}"])
    title = report.table(f"(b) phases, model kept converted, {args.calls} calls per with-block "
                         f"after 1 warm-up call, {args.alternations} alternation(s) fused / "
                         f"unfused, medians",
                         ["alternation", "variant", "call ms", "forward with autograd ms",
                          "backward ms", "after backward ms"])
    for alt in range(args.alternations):
        for variant, fuse in (("fused", True), ("unfused", False)):
            times = _phase_split(tsgb_ext.TSGB(model, backend="native", fuse=fuse), x, t,
                                 args.calls)
            report.add(title, [alt + 1, variant] + [f"{statistics.median(v) * 1e3:.1f}"
                                                    for v in times])
    return 0


def _phase_split(explainer, x, t, calls):
    """In a with-block, ``calls`` calls after one warm-up call: per call the whole call, the
    time up to torch.autograd.grad, inside it and after it (four lists of seconds)."""
    real_grad = torch.autograd.grad
    marks = []

    def timed_grad(*a, **kw):
        t1 = time.perf_counter()
        try:
            return real_grad(*a, **kw)
        finally:
            marks.append((t1, time.perf_counter()))
    out = ([], [], [], [])
    torch.autograd.grad = timed_grad
    try:
        with explainer as ex:
            ex.attribute(x, t)
            for _ in range(calls):
                marks.clear()
                t0 = time.perf_counter()
                ex.attribute(x, t)
                t3 = time.perf_counter()
                if len(marks) != 1:
                    raise RuntimeError(f"expected one torch.autograd.grad call per attribute, "
                                       f"saw {len(marks)}: the explainer changed, update "
                                       f"benchmarks/_profile.py")
                (t1, t2), = marks
                for lst, v in zip(out, (t3 - t0, t1 - t0, t2 - t1, t3 - t2)):
                    lst.append(v)
    finally:
        torch.autograd.grad = real_grad
    return out
