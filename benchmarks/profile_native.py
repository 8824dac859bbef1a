"""Op-level measurements of the native backend on the CPU: the figures of RESULTS.md that
bench_cpu.py does not produce (profiles, one layer's ops, host time per layer, the forward /
backward phase split, and the map differences quoted beside them).

    python benchmarks/profile_native.py profile [--no-fuse] [--model resnet50] [--batch 4]
    python benchmarks/profile_native.py layer
    python benchmarks/profile_native.py host
    python benchmarks/profile_native.py phases
    python benchmarks/profile_native.py maps

Subcommands:

* ``profile``: torch.profiler over ``--calls`` native TSGB calls (model kept converted, after
  ``--warmup`` calls), per call: the top ops by self CPU time, then the TSGB backward ops
  (``tsgb_ext::conv2d_backward``, ``conv2d_bn_backward``, ``batch_norm_backward``,
  ``avg_pool2d_backward``, ``linear_backward``), ReLU backward (``aten::threshold_backward``)
  and the forward ops (``tsgb_ext::conv2d*``, ``batch_norm``) with their total CPU time
  (children included: the depthwise conv rule calls ATen convs) and call counts.
  ``--model`` is one of benchmarks/_models.py's (random weights) or ``efficientnet-lite0`` (the
  demo's pretrained model).
* ``layer``: one ResNet50 layer's backward ops alone (torch.utils.benchmark, medians):
  layer1.0's conv3 (1x1, 64 -> 256 channels, 56x56) and bn3, batch 4, float32, NCHW, with the
  layer's real input (forward hook on a random image batch): ``conv2d_backward``,
  ``batch_norm_backward`` on the conv output, ``threshold_backward`` (ReLU) and
  ``conv2d_bn_backward`` with the ReLU folded in (act 1).
* ``host``: host (per-op) overhead: a chain of ``--layers`` conv 3x3 -> BN -> ReLU layers on a
  1x4x6x6 tensor, 1 thread, forward + ``autograd.grad`` to the input, time per layer: the fused
  op (``conv2d_bn_act``), the unfused native ops (``conv2d`` + ``batch_norm`` + torch ReLU) and
  plain torch ops (``F.conv2d`` + ``F.batch_norm`` + ``F.relu``); then one ``conv2d_bn_act``
  forward call with autograd (input requires grad) and without (``no_grad``).
* ``phases``: ResNet50 batch 4 in one process. (a) per-call ``attribute`` A/B: no-grad forward,
  fused, unfused, one call of each per round, ``--rounds`` rounds, medians. (b) phase split,
  model kept converted: ``--alternations`` times a with-block of ``--calls`` calls fused, then
  one unfused; per call the time up to ``torch.autograd.grad`` (forward with autograd,
  conversion bookkeeping and target selection included), inside it (the backward) and after
  it (the map); medians of each.
* ``maps``: relative L2 differences of maps (not timings): hooks backend under
  ``torch.compile`` against eager and eager float32 against float64 (ResNet50, batch 4), and
  the native fused against unfused maps on the pretrained EfficientNet-Lite0 (float64 and
  float32, batch 2).

Every subcommand prints the CPU, thread count, torch version, date and the load average at
start and end (timings taken with a load average above ~1.5 on the 2-core machine are not
reliable).
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import _models  # noqa: E402
from _rows import cpu_model_name, interleaved_medians, make_targets  # noqa: E402

EPS = 1e-10  # the spec's stabiliser (the ops' eps argument)


def header(what: str, threads: int) -> None:
    import tsgb_ext
    la = os.getloadavg()
    print(f"# profile_native.py {what}")
    print(f"- CPU: {cpu_model_name()}, {os.cpu_count()} logical cores, {threads} torch threads")
    print(f"- torch {torch.__version__}, tsgb_ext {tsgb_ext.__version__} (native available: "
          f"{tsgb_ext.native_available()})")
    print(f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}, load average at "
          f"start {la[0]:.2f} / {la[1]:.2f} / {la[2]:.2f} (1/5/15 min)")
    sys.stdout.flush()


def footer() -> None:
    la = os.getloadavg()
    warn = "  (above 1.5: timings unreliable)" if la[0] > 1.5 else ""
    print(f"- load average at end {la[0]:.2f} / {la[1]:.2f} / {la[2]:.2f}{warn}")


def need_native() -> None:
    import tsgb_ext
    if not tsgb_ext.native_available():
        sys.exit("profile_native.py: the compiled tsgb_ext ops are not available "
                 "(tsgb_ext.native_available() is False); build the extension first")


def build_model(name: str):
    if name.replace("_", "-").lower() == "efficientnet-lite0":
        from tsgb_ext import models
        return models.load_model("efficientnet-lite0", device="cpu").model.eval()
    return _models.build(name)


def timer_median(fn, threads: int, min_time: float) -> tuple:
    from torch.utils.benchmark import Timer
    fn()
    m = Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads).blocked_autorange(
        min_run_time=min_time)
    return m.median, len(m.times) * m.number_per_run


# --- profile ----------------------------------------------------------------------------------
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


def cmd_profile(args) -> None:
    import tsgb_ext
    from torch.profiler import ProfilerActivity, profile
    need_native()
    torch.set_num_threads(args.threads)
    header(f"profile ({args.model}, batch {args.batch}, {'unfused' if args.no_fuse else 'fused'})",
           args.threads)
    model = build_model(args.model)
    x = torch.randn(args.batch, 3, args.size, args.size,
                    generator=torch.Generator().manual_seed(0))
    t = make_targets(args.batch, 1000)
    with tsgb_ext.TSGB(model, backend="native", fuse=not args.no_fuse) as ex:
        for _ in range(args.warmup):
            ex.attribute(x, t)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            for _ in range(args.calls):
                ex.attribute(x, t)
            wall = (time.perf_counter() - t0) / args.calls
        plan = (ex._fusion_cache or {}).get("plan")
    n = args.calls
    events = list(prof.key_averages())
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    total_self = sum(e.self_cpu_time_total for e in events) / n / 1e3
    print(f"\nwall time per call under the profiler: {wall * 1e3:.1f} ms; sum of self CPU times "
          f"{total_self:.1f} ms per call (averaged over {n} call(s)); fused conv -> BN chains: "
          f"{getattr(plan, 'chains', 0) if plan else 0}\n")
    print(f"Top {args.top} ops by self CPU time, per call:\n")
    print("| op | self CPU ms | total CPU ms | calls |")
    print("|---|---|---|---|")
    for e in events[:args.top]:
        print(f"| `{e.key}` | {e.self_cpu_time_total / n / 1e3:.1f} | "
              f"{e.cpu_time_total / n / 1e3:.1f} | {e.count // n} |")
    by_key = {e.key: e for e in events}
    for title, keys in (("TSGB backward ops and activation backwards", BACKWARD_OPS),
                        ("forward ops of the converted model", FORWARD_OPS)):
        print(f"\n{title}, per call (total = children included):\n")
        print("| op | self CPU ms | total CPU ms | calls |")
        print("|---|---|---|---|")
        for k in keys:
            e = by_key.get(k)
            if e is not None:
                print(f"| `{k}` | {e.self_cpu_time_total / n / 1e3:.1f} | "
                      f"{e.cpu_time_total / n / 1e3:.1f} | {e.count // n} |")
    rules = [by_key[k] for k in ("tsgb_ext::conv2d_backward", "tsgb_ext::conv2d_bn_backward")
             if k in by_key]
    convs = [e for e in events if e.key in CONV_KERNELS]
    print(f"\nall conv rules (conv2d_backward + conv2d_bn_backward, total CPU): "
          f"{sum(e.cpu_time_total for e in rules) / n / 1e3:.1f} ms per call; ATen convolution "
          f"kernels (self CPU: " + " + ".join(e.key for e in convs) + f"): "
          f"{sum(e.self_cpu_time_total for e in convs) / n / 1e3:.1f} ms, "
          f"{sum(e.count for e in convs) // n} calls per call (the forward's convs, and the "
          f"depthwise conv rule's ones-kernel convs where there are any)")
    print("(an op whose autograd kernel re-dispatches to itself is counted twice: "
          "tsgb_ext::batch_norm shows 2 calls per BN layer)")
    footer()


# --- one layer --------------------------------------------------------------------------------
def cmd_layer(args) -> None:
    need_native()
    ops = torch.ops.tsgb_ext
    torch.set_num_threads(args.threads)
    header(f"layer (ResNet50 layer1.0 conv3 + bn3 + ReLU, batch {args.batch})", args.threads)
    model = _models.build("resnet50")
    blk = model.layer1[0]
    conv, bn = blk.conv3, blk.bn3
    seen = {}

    def keep_input(mod, inp, out):  # returns None: the output stays as it is
        seen.setdefault("x", inp[0].detach().clone())
    h = conv.register_forward_hook(keep_input)
    with torch.no_grad():
        model(torch.randn(args.batch, 3, 224, 224, generator=torch.Generator().manual_seed(0)))
    h.remove()
    x = seen["x"].contiguous()
    with torch.no_grad():
        y = F.conv2d(x, conv.weight)
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        shift = bn.bias - bn.running_mean * scale
        yb = y * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    k = list(conv.kernel_size)
    geo = ([1, 1], [0, 0], [1, 1], 1)  # stride, padding, dilation, groups
    print(f"\nx {tuple(x.shape)}, y {tuple(y.shape)}, 1x1 conv, float32, NCHW; medians of "
          f"blocked_autorange(min_run_time={args.min_time})\n")
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
    print("| op | median ms | runs |")
    print("|---|---|---|")
    res = {}
    with torch.no_grad():
        for name, fn in cases:
            med, n = timer_median(fn, args.threads, args.min_time)
            res[name] = med
            print(f"| {name} | {med * 1e3:.2f} | {n} |", flush=True)
    unf = sum(v for kk, v in res.items() if not kk.startswith("conv2d_bn_backward"))
    print(f"\nunfused sum (conv + BN + ReLU rules): {unf * 1e3:.2f} ms")
    footer()


# --- host time per layer ----------------------------------------------------------------------
def cmd_host(args) -> None:
    need_native()
    ops = torch.ops.tsgb_ext
    torch.set_num_threads(1)
    header(f"host ({args.layers} chained conv3x3 -> BN -> ReLU layers, 1x4x6x6, 1 thread)", 1)
    gen = torch.Generator().manual_seed(0)
    c, L = 4, args.layers
    ws = [torch.randn(c, c, 3, 3, generator=gen) * (2.0 / (c * 9)) ** 0.5 for _ in range(L)]
    bns = [(torch.randn(c, generator=gen) * 0.1, torch.rand(c, generator=gen) + 0.5,
            torch.rand(c, generator=gen) + 0.5, torch.randn(c, generator=gen) * 0.1)
           for _ in range(L)]  # running_mean, running_var, weight, bias
    bn_eps = 1e-5
    x0 = torch.randn(1, c, 6, 6, generator=gen)
    geo = ([1, 1], [1, 1], [1, 1], 1)

    def fused(h):
        for w, (rm, rv, bw, bb) in zip(ws, bns):
            h = ops.conv2d_bn_act(h, w, None, *geo, rm, rv, bw, bb, bn_eps, 1)[0]
        return h

    def unfused(h):
        for w, (rm, rv, bw, bb) in zip(ws, bns):
            h = ops.conv2d(h, w, None, *geo)
            h = ops.batch_norm(h, rm, rv, bw, bb, bn_eps)
            h = torch.relu(h)
        return h

    def plain(h):
        for w, (rm, rv, bw, bb) in zip(ws, bns):
            h = F.relu(F.batch_norm(F.conv2d(h, w, None, 1, 1), rm, rv, bw, bb, False, 0.0,
                                    bn_eps))
        return h

    def fwd_bwd(chain):
        def f():
            xi = x0.clone().requires_grad_(True)
            out = chain(xi)
            return torch.autograd.grad(out.sum(), xi)[0]
        return f

    print(f"\nforward + autograd.grad to the input, per layer (median of "
          f"blocked_autorange(min_run_time={args.min_time}) / {L}):\n")
    print("| chain | us per layer | runs | output finite |")
    print("|---|---|---|---|")
    for name, chain in (("fused conv2d_bn_act", fused),
                        ("unfused conv2d + batch_norm + ReLU", unfused),
                        ("plain F.conv2d + F.batch_norm + F.relu", plain)):
        f = fwd_bwd(chain)
        ok = bool(torch.isfinite(f()).all())
        med, n = timer_median(f, 1, args.min_time)
        print(f"| {name} | {med / L * 1e6:.1f} | {n} | {ok} |", flush=True)

    w, (rm, rv, bw, bb) = ws[0], bns[0]
    xg = x0.clone().requires_grad_(True)

    def op_grad():
        return ops.conv2d_bn_act(xg, w, None, *geo, rm, rv, bw, bb, bn_eps, 1)

    def op_nograd():
        with torch.no_grad():
            return ops.conv2d_bn_act(x0, w, None, *geo, rm, rv, bw, bb, bn_eps, 1)

    print("\none conv2d_bn_act forward call (the op's own compute included):\n")
    print("| call | us | runs |")
    print("|---|---|---|")
    for name, f in (("with autograd (input requires grad)", op_grad),
                    ("without (no_grad)", op_nograd)):
        med, n = timer_median(f, 1, args.min_time)
        print(f"| {name} | {med * 1e6:.1f} | {n} |", flush=True)
    footer()


# --- forward / backward phases ----------------------------------------------------------------
def cmd_phases(args) -> None:
    import tsgb_ext
    need_native()
    torch.set_num_threads(args.threads)
    header(f"phases ({args.model}, batch {args.batch})", args.threads)
    model = build_model(args.model)
    x = torch.randn(args.batch, 3, args.size, args.size,
                    generator=torch.Generator().manual_seed(0))
    t = make_targets(args.batch, 1000)

    # (a) per-call A/B, rows interleaved
    exs = {"fused": tsgb_ext.TSGB(model, backend="native", fuse=True),
           "unfused": tsgb_ext.TSGB(model, backend="native", fuse=False)}

    def fwd():
        with torch.no_grad():
            model(x)
    rows = {"no-grad forward": fwd}
    rows.update({k: (lambda ex=ex: ex.attribute(x, t)) for k, ex in exs.items()})
    med = interleaved_medians(rows, args.rounds)
    f0 = med["no-grad forward"]
    print(f"\n(a) per-call attribute (conversion and restore included), one call of each row per "
          f"round, {args.rounds} rounds, medians:\n")
    print("| row | median ms | x no-grad forward |")
    print("|---|---|---|")
    for k, v in med.items():
        print(f"| {k} | {v * 1e3:.1f} | {v / f0:.2f} |", flush=True)

    # (b) phase split inside with-blocks
    real_grad = torch.autograd.grad
    marks = []

    def timed_grad(*a, **kw):
        t1 = time.perf_counter()
        try:
            return real_grad(*a, **kw)
        finally:
            marks.append((t1, time.perf_counter()))

    print(f"\n(b) phases, model kept converted, {args.calls} calls per with-block after 1 "
          f"warm-up call, {args.alternations} alternation(s) fused / unfused, medians:\n")
    print("| alternation | variant | call ms | forward with autograd ms | backward ms | "
          "after backward ms |")
    print("|---|---|---|---|---|---|")
    torch.autograd.grad = timed_grad
    try:
        for alt in range(args.alternations):
            for name, fuse in (("fused", True), ("unfused", False)):
                with tsgb_ext.TSGB(model, backend="native", fuse=fuse) as ex:
                    ex.attribute(x, t)
                    call, fw, bw, rest = [], [], [], []
                    for _ in range(args.calls):
                        marks.clear()
                        t0 = time.perf_counter()
                        ex.attribute(x, t)
                        t3 = time.perf_counter()
                        if len(marks) != 1:
                            raise RuntimeError(f"expected one torch.autograd.grad call per "
                                               f"attribute, saw {len(marks)}: the explainer "
                                               f"changed, update this script")
                        (t1, t2), = marks
                        call.append(t3 - t0)
                        fw.append(t1 - t0)
                        bw.append(t2 - t1)
                        rest.append(t3 - t2)
                c, a, b, r = (statistics.median(v) * 1e3 for v in (call, fw, bw, rest))
                print(f"| {alt + 1} | {name} | {c:.1f} | {a:.1f} | {b:.1f} | {r:.1f} |",
                      flush=True)
    finally:
        torch.autograd.grad = real_grad
    footer()


# --- map differences --------------------------------------------------------------------------
def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def cmd_maps(args) -> None:
    import copy

    import tsgb_ext
    need_native()
    torch.set_num_threads(args.threads)
    header("maps (relative L2 = ||a - b|| / ||b||)", args.threads)
    print()
    if "compile" in args.parts:
        model = _models.build("resnet50")
        x = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(0))
        t = make_targets(4, 1000)
        eager = tsgb_ext.TSGB(model, backend="hooks").attribute(x, t)
        m64 = copy.deepcopy(model).double()
        ref = tsgb_ext.TSGB(m64, backend="hooks").attribute(x.double(), t)
        clf = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)][-1]
        with tsgb_ext.TSGB(model, backend="hooks", classifier=clf) as ex:
            orig = ex.model
            torch._dynamo.reset()
            ex.model = torch.compile(model)
            try:
                comp = ex.attribute(x, t)
            finally:
                ex.model = orig
                torch._dynamo.reset()
        print(f"ResNet50 (random weights, batch 4), hooks backend: torch.compile float32 vs "
              f"eager float32 {rel_l2(comp, eager):.2e}; eager float32 vs float64 "
              f"{rel_l2(eager, ref):.2e}; compiled float32 vs float64 {rel_l2(comp, ref):.2e}",
              flush=True)
    if "fusion" in args.parts:
        model = build_model("efficientnet-lite0")
        x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
        t = make_targets(2, 1000)
        out = []
        for dt in (torch.float64, torch.float32):
            m = copy.deepcopy(model).to(dt)
            xf = x.to(dt)
            ex_f = tsgb_ext.TSGB(m, backend="native", fuse=True)
            fused = ex_f.attribute(xf, t)
            plan = (ex_f._fusion_cache or {}).get("plan")
            unfused = tsgb_ext.TSGB(m, backend="native", fuse=False).attribute(xf, t)
            out.append(f"{str(dt).replace('torch.', '')} {rel_l2(fused, unfused):.1e}")
        print(f"EfficientNet-Lite0 (pretrained, batch 2), native fused vs unfused "
              f"({getattr(plan, 'chains', 0) if plan else 0} fused chains): " + ", ".join(out))
    footer()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp, model=True, threads=2):
        sp.add_argument("--threads", type=int, default=threads)
        if model:
            sp.add_argument("--model", default="resnet50",
                            help="vgg11|vgg16|resnet18|resnet50|efficientnet-lite0")
            sp.add_argument("--batch", type=int, default=4)
            sp.add_argument("--size", type=int, default=224)

    sp = sub.add_parser("profile", help="torch.profiler self CPU time per op of native calls")
    common(sp)
    sp.add_argument("--no-fuse", action="store_true", help="TSGB(..., fuse=False)")
    sp.add_argument("--calls", type=int, default=1, help="profiled calls (averaged)")
    sp.add_argument("--warmup", type=int, default=2)
    sp.add_argument("--top", type=int, default=15)
    sp.set_defaults(fn=cmd_profile)

    sp = sub.add_parser("layer", help="one ResNet50 layer's backward ops alone")
    common(sp, model=False)
    sp.add_argument("--batch", type=int, default=4)
    sp.add_argument("--min-time", type=float, default=2.0)
    sp.set_defaults(fn=cmd_layer)

    sp = sub.add_parser("host", help="host time per layer of a chain of tiny layers, 1 thread")
    sp.add_argument("--layers", type=int, default=50)
    sp.add_argument("--min-time", type=float, default=2.0)
    sp.set_defaults(fn=cmd_host)

    sp = sub.add_parser("phases", help="per-call A/B and forward/backward split, fused/unfused")
    common(sp)
    sp.add_argument("--rounds", type=int, default=25, help="per-call A/B rounds")
    sp.add_argument("--calls", type=int, default=12, help="calls per with-block")
    sp.add_argument("--alternations", type=int, default=2)
    sp.set_defaults(fn=cmd_phases)

    sp = sub.add_parser("maps", help="map differences: compile vs eager, float32 vs float64, "
                                     "fused vs unfused")
    common(sp, model=False)
    sp.add_argument("--parts", default="compile,fusion")
    sp.set_defaults(fn=cmd_maps)

    args = p.parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    main()
