"""``--bench ops``: per-op times of the native TSGB rules against torch's own conv input
gradient; ``--bench memcheck``: every CUDA op once, for ``compute-sanitizer --tool memcheck``.

ops: the conv rule (``tsgb_ext::conv2d_backward``) of a 3x3 256 -> 256 conv on 56x56, of
ResNet's stem (7x7 stride 2, 3 -> 64, 224x224) and of a depthwise 3x3 conv with 384 channels on
28x28, each next to ``aten::convolution_backward`` (input gradient only: cuDNN), per dtype and
layout (``--layouts nchw,cl``); and the BN rule on Nx256x56x56 next to a device copy of the same
tensor, with the bytes each moves per second (BN rule: read grad and x, write gx; copy: read and
write x). Timing: CUDA events around ``--iters`` back-to-back calls (average per call), after
``--warmup`` calls; the median of ``--repeats`` such averages. cudnn.benchmark on, TF32 off. On
the CPU (a harness check) time.perf_counter replaces the events.

memcheck: both layouts, float32 and bfloat16, grouped, depthwise, T = 2 targets, the fused conv
-> BN rule, the BN, average-pool and linear rules, then a device synchronise.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from _common import DTYPES, EPS, event_median_us, fmt_err

# name: (in channels, out channels, size, kernel, stride, padding, groups)
CONV_CASES = {
    "conv rule, 3x3 256->256, 56x56": (256, 256, 56, 3, 1, 1, 1),
    "conv rule, stem 7x7 stride 2, 224x224": (3, 64, 224, 7, 2, 3, 1),
    "conv rule, depthwise 3x3, 384 ch, 28x28": (384, 384, 28, 3, 1, 1, 384),
}
LAYOUTS = {"nchw": torch.contiguous_format, "cl": torch.channels_last}


class _Rand:
    def __init__(self, device):
        self.device, self.gen = device, torch.Generator(device="cpu").manual_seed(0)

    def __call__(self, *shape, dtype, fmt):
        t = torch.randn(*shape, generator=self.gen).to(device=self.device, dtype=dtype)
        return t.contiguous(memory_format=fmt) if t.dim() == 4 else t


def _conv_case(case, dname, lname, args, rand, tm):
    ops = torch.ops.tsgb_ext
    cin, cout, size, k, s, pd, groups = CONV_CASES[case]
    dt, fmt, n = DTYPES[dname], LAYOUTS[lname], args.batch_list[0]
    x = rand(n, cin, size, size, dtype=dt, fmt=fmt)
    w = rand(cout, cin // groups, k, k, dtype=dt, fmt=fmt) * (cin // groups * k * k) ** -0.5
    w = w.contiguous(memory_format=fmt)
    with torch.no_grad():
        y = F.conv2d(x, w, None, s, pd, 1, groups).contiguous(memory_format=fmt)
    g = rand(*y.shape, dtype=dt, fmt=fmt)

    def tsgb():
        return ops.conv2d_backward(g, x, y, [k, k], [s, s], [pd, pd], [1, 1], groups, EPS)

    def torch_dx():
        return torch.ops.aten.convolution_backward(g, x, w, None, [s, s], [pd, pd], [1, 1], False,
                                                   [0, 0], groups, [True, False, False])[0]
    with torch.no_grad():
        ok = bool(torch.isfinite(tsgb()).all())
        a, b = event_median_us(tsgb, **tm), event_median_us(torch_dx, **tm)
    return [case, dname, lname, f"{a:.0f}", f"{b:.0f}", f"{a / b:.2f}",
            "" if ok else "non-finite gx"]


def _bn_case(case, dname, lname, args, rand, tm):
    ops = torch.ops.tsgb_ext
    dt, fmt, n, gen = DTYPES[dname], LAYOUTS[lname], args.batch_list[0], rand.gen
    x = rand(n, 256, 56, 56, dtype=dt, fmt=fmt)
    g = rand(n, 256, 56, 56, dtype=dt, fmt=fmt)
    scale = (torch.rand(256, generator=gen) + 0.5).to(rand.device)  # float32 statistics
    shift = (torch.randn(256, generator=gen) * 0.1).to(rand.device)
    with torch.no_grad():
        ok = bool(torch.isfinite(ops.batch_norm_backward(g, x, scale, shift, EPS)).all())
        a = event_median_us(lambda: ops.batch_norm_backward(g, x, scale, shift, EPS), **tm)
        c = event_median_us(lambda: x.clone(memory_format=torch.preserve_format), **tm)
    nbytes = x.numel() * x.element_size()
    return [case, dname, lname, f"{a:.1f}", f"{3 * nbytes / a / 1e3:.0f}", f"{c:.1f}",
            f"{2 * nbytes / c / 1e3:.0f}", "" if ok else "non-finite gx"]


def run_ops(args, report) -> int:
    import tsgb_ext
    if args.device_obj.type == "cuda" and not tsgb_ext.cuda_built():
        raise SystemExit("bench.py --bench ops: tsgb_ext was built without CUDA kernels "
                         "(rebuild with FORCE_CUDA=1); nothing measured.")
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    clock = ("CUDA events" if args.device_obj.type == "cuda" else
             "time.perf_counter: a harness check")
    report.head.append(f"- batch {args.batch_list[0]}; per row the median of {args.repeats} "
                       f"averages of {args.iters} back-to-back calls after {args.warmup} "
                       f"warm-up calls ({clock}); cudnn.benchmark on, TF32 off; "
                       f"torch dx = aten::convolution_backward, input gradient only")
    conv = report.table("Conv rule against torch's conv input gradient",
                        ["case", "dtype", "layout", "tsgb us", "torch dx us", "tsgb / torch dx",
                         "note"])
    bn = report.table("BN rule against a device copy",
                      ["case", "dtype", "layout", "BN rule us", "BN rule GB/s", "copy us",
                       "copy GB/s", "note"])
    rand = _Rand(args.device_obj)
    tm = dict(device=args.device_obj, warmup=args.warmup, iters=args.iters, reps=args.repeats)
    cases = [(conv, c, _conv_case, 3) for c in CONV_CASES]
    cases.append((bn, f"BN rule, {args.batch_list[0]}x256x56x56", _bn_case, 4))
    for title, case, fn, blanks in cases:
        for dname in args.dtype_list:
            for lname in args.layouts.split(","):
                try:
                    report.add(title, fn(case, dname, lname, args, rand, tm))
                except Exception as e:  # one failing row must not lose the table
                    report.add(title, [case, dname, lname] + ["-"] * blanks +
                               [f"FAILED {fmt_err(e)}"])
    return 0


def run_memcheck(args, report) -> int:
    """Every op once on small inputs; the count is the only output."""
    ops, dev = torch.ops.tsgb_ext, args.device_obj
    gen = torch.Generator().manual_seed(0)
    n_calls = 0
    for dtype in (torch.float32, torch.bfloat16):
        for cl in (False, True):
            def prep(t):
                t = t.to(dev, dtype)
                return t.contiguous(memory_format=torch.channels_last) if cl else t
            for C, K, G, k, s, p_, d in [(6, 8, 2, 3, 2, 1, 1), (8, 8, 8, 3, 1, 1, 2),
                                         (3, 5, 1, 7, 2, 3, 1), (4, 4, 1, 1, 1, 0, 1)]:
                x = torch.randn(2, C, 13, 11, generator=gen)
                w = torch.randn(K, C // G, k, k, generator=gen)
                y = F.conv2d(x, w, None, s, p_, d, G)
                g = torch.randn((4,) + tuple(y.shape[1:]), generator=gen)
                x, y, g = prep(x), prep(y), prep(g)
                geom = ([k, k], [s, s], [p_, p_], [d, d], G, EPS)
                ops.conv2d_backward(g, x, y, *geom)
                rm, rv = torch.randn(K).to(dev), (torch.rand(K) + 0.5).to(dev)
                bw, bb = torch.randn(K).to(dev), torch.randn(K).to(dev)
                for act in (0, 1, 2):
                    ops.conv2d_bn_backward(g, x, y, rm, rv, bw, bb, 1e-5, act, *geom)
                n_calls += 4
            xa = prep(torch.rand(2, 6, 9, 7, generator=gen) + 0.5)
            sc, sh = torch.randn(6).to(dev), torch.randn(6).to(dev)
            ops.batch_norm_backward(prep(torch.randn(4, 6, 9, 7, generator=gen)), xa, sc, sh, 1e-5)
            yp = F.avg_pool2d(xa, 3, 2, 1, True, False)
            ops.avg_pool2d_backward(prep(torch.randn((4,) + tuple(yp.shape[1:]), generator=gen)),
                                    xa, yp, [3, 3], [2, 2], [1, 1], True, False, None, EPS)
            W = torch.randn(5, 8, generator=gen).to(dev, dtype)
            ops.linear_backward(torch.randn(4, 5, generator=gen).to(dev, dtype),
                                torch.rand(2, 8, generator=gen).to(dev, dtype),
                                W.clamp(min=0), W.clamp(max=0), EPS)
            n_calls += 3
    if dev.type == "cuda":
        torch.cuda.synchronize()
    report.note(f"memcheck: {n_calls} op calls on {dev} done")
    return 0
