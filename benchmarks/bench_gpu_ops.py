"""Per-op GPU timings of the native TSGB rules against torch's own conv input gradient.

    python benchmarks/bench_gpu_ops.py --out gpu_ops.md
    python benchmarks/bench_gpu_ops.py --device cpu --quick      # harness check without a GPU

Cases (batch N=8 unless --batch): the conv rule (``tsgb_ext::conv2d_backward``) of a 3x3
256 -> 256 conv on 56x56, of ResNet's stem (7x7 stride 2, 3 -> 64, 224x224) and of a depthwise
3x3 conv with 384 channels on 28x28, each next to torch's own input gradient of the same conv
(``aten::convolution_backward``, input gradient only: cuDNN), in float16 and float32, NCHW and
channels_last; and the BN rule (``tsgb_ext::batch_norm_backward``) on 8x256x56x56 next to a
device copy of the same tensor, with the bytes each moves per second (BN rule: read grad and
x, write gx; copy: read and write x).

Timing: CUDA events around --iters back-to-back calls (average per call), after --warmup calls;
the median of --reps such averages is reported. cudnn.benchmark on, TF32 off. On --device cpu
(a harness check only) time.perf_counter replaces the events. The table is rewritten to --out
after every row. Without CUDA the script says so, writes that to --out and exits with status 3.
"""
from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time

import torch
import torch.nn.functional as F

EPS = 1e-10
DTYPES = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}
# name: (in channels, out channels, size, kernel, stride, padding, groups)
CONV_CASES = {
    "conv rule, 3x3 256->256, 56x56": (256, 256, 56, 3, 1, 1, 1),
    "conv rule, stem 7x7 stride 2, 224x224": (3, 64, 224, 7, 2, 3, 1),
    "conv rule, depthwise 3x3, 384 ch, 28x28": (384, 384, 28, 3, 1, 1, 384),
}


def time_us(fn, device, warmup: int, iters: int, reps: int) -> float:
    """Median over ``reps`` of the average time per call of ``iters`` back-to-back calls."""
    for _ in range(warmup):
        fn()
    avgs = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            end.synchronize()
            avgs.append(start.elapsed_time(end) * 1e3 / iters)
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            avgs.append((time.perf_counter() - t0) * 1e6 / iters)
    return statistics.median(avgs)


def fmt_err(e: BaseException) -> str:
    s = f"{type(e).__name__}: {e}".replace("\n", " ").replace("|", "/")
    return s[:160] + ("..." if len(s) > 160 else "")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--dtypes", default="fp16,fp32", help="comma list of fp16, fp32, bf16")
    p.add_argument("--layouts", default="nchw,cl", help="nchw and/or cl (channels_last)")
    p.add_argument("--iters", type=int, default=20, help="calls per CUDA-event measurement")
    p.add_argument("--reps", type=int, default=5, help="measurements per row (median)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="batch 2, 2 iters, 1 rep (harness check)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.iters, args.reps, args.warmup = 2, 2, 1, 1
    device = torch.device(args.device)
    head = "# TSGB per-op GPU benchmark (benchmarks/bench_gpu_ops.py)\n\n"

    def fail(msg: str, code: int) -> int:
        print(msg, file=sys.stderr)
        if args.out:
            with open(args.out, "w") as f:
                f.write(head + msg + "\n")
        return code

    if device.type == "cuda" and not torch.cuda.is_available():
        return fail(f"bench_gpu_ops.py: CUDA is not available (torch {torch.__version__}, built "
                    f"for CUDA {torch.version.cuda}); nothing measured. This benchmark needs a "
                    f"GPU; --device cpu --quick only checks the script.", 3)
    import tsgb_ext
    if not tsgb_ext.native_available():
        return fail("bench_gpu_ops.py: the compiled tsgb_ext ops are not available "
                    "(tsgb_ext.native_available() is False); nothing measured.", 3)
    ops = torch.ops.tsgb_ext
    if device.type == "cuda" and not ops.built_with_cuda():
        return fail("bench_gpu_ops.py: tsgb_ext was built without CUDA kernels (rebuild with "
                    "FORCE_CUDA=1); nothing measured.", 3)

    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    if device.type == "cuda":
        dev_line = (f"{torch.cuda.get_device_name(device)} (sm "
                    f"{'.'.join(map(str, torch.cuda.get_device_capability(device)))}), CUDA "
                    f"{torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}; timing: CUDA "
                    f"events")
    else:
        dev_line = f"{device} (harness check only; timing: time.perf_counter)"
    head += (f"- device: {dev_line}\n- torch {torch.__version__}, tsgb_ext {tsgb_ext.__version__}"
             f"\n- date: {datetime.datetime.now().isoformat(timespec='seconds')}\n"
             f"- batch {args.batch}; per row the median of {args.reps} averages of {args.iters} "
             f"back-to-back calls after {args.warmup} warm-up calls; cudnn.benchmark on, TF32 "
             f"off; torch dx = aten::convolution_backward, input gradient only\n\n")
    lines = ["| case | dtype | layout | tsgb us | torch dx us | tsgb / torch dx | note |",
             "|---|---|---|---|---|---|---|"]
    bn_lines = ["| case | dtype | layout | BN rule us | BN rule GB/s | copy us | copy GB/s | note |",
                "|---|---|---|---|---|---|---|---|"]

    def flush() -> str:
        text = head + "\n".join(lines) + "\n\n" + "\n".join(bn_lines) + "\n"
        if args.out:
            with open(args.out, "w") as f:
                f.write(text)
        return text

    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape, dtype, fmt):
        t = torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)
        return t.contiguous(memory_format=fmt) if t.dim() == 4 else t

    layouts = {"nchw": torch.contiguous_format, "cl": torch.channels_last}
    tm = dict(device=device, warmup=args.warmup, iters=args.iters, reps=args.reps)
    for case, (cin, cout, size, k, s, pd, groups) in CONV_CASES.items():
        for dname in args.dtypes.split(","):
            for lname in args.layouts.split(","):
                dt, fmt = DTYPES[dname], layouts[lname]
                try:
                    x = rand(args.batch, cin, size, size, dtype=dt, fmt=fmt)
                    w = rand(cout, cin // groups, k, k, dtype=dt, fmt=fmt) * (cin // groups * k * k) ** -0.5
                    w = w.contiguous(memory_format=fmt)
                    with torch.no_grad():
                        y = F.conv2d(x, w, None, s, pd, 1, groups).contiguous(memory_format=fmt)
                    g = rand(*y.shape, dtype=dt, fmt=fmt)

                    def tsgb():
                        return ops.conv2d_backward(g, x, y, [k, k], [s, s], [pd, pd], [1, 1],
                                                   groups, EPS)

                    def torch_dx():
                        return torch.ops.aten.convolution_backward(
                            g, x, w, None, [s, s], [pd, pd], [1, 1], False, [0, 0], groups,
                            [True, False, False])[0]
                    with torch.no_grad():
                        gx = tsgb()
                        ok = bool(torch.isfinite(gx).all())
                        a = time_us(tsgb, **tm)
                        b = time_us(torch_dx, **tm)
                    note = "" if ok else "non-finite gx"
                    lines.append(f"| {case} | {dname} | {lname} | {a:.0f} | {b:.0f} | "
                                 f"{a / b:.2f} | {note} |")
                except Exception as e:  # one failing row must not lose the table
                    lines.append(f"| {case} | {dname} | {lname} | - | - | - | FAILED {fmt_err(e)} |")
                print(lines[-1], flush=True)
                flush()

    case = f"BN rule, {args.batch}x256x56x56"
    for dname in args.dtypes.split(","):
        for lname in args.layouts.split(","):
            dt, fmt = DTYPES[dname], layouts[lname]
            try:
                x = rand(args.batch, 256, 56, 56, dtype=dt, fmt=fmt)
                g = rand(args.batch, 256, 56, 56, dtype=dt, fmt=fmt)
                scale = (torch.rand(256, generator=gen) + 0.5).to(device)  # float32 statistics
                shift = (torch.randn(256, generator=gen) * 0.1).to(device)
                with torch.no_grad():
                    gx = ops.batch_norm_backward(g, x, scale, shift, EPS)
                    ok = bool(torch.isfinite(gx).all())
                    a = time_us(lambda: ops.batch_norm_backward(g, x, scale, shift, EPS), **tm)
                    c = time_us(lambda: x.clone(memory_format=torch.preserve_format), **tm)
                nbytes = x.numel() * x.element_size()
                note = "" if ok else "non-finite gx"
                bn_lines.append(f"| {case} | {dname} | {lname} | {a:.1f} | "
                                f"{3 * nbytes / a / 1e3:.0f} | {c:.1f} | {2 * nbytes / c / 1e3:.0f} "
                                f"| {note} |")
            except Exception as e:
                bn_lines.append(f"| {case} | {dname} | {lname} | - | - | - | - | "
                                f"FAILED {fmt_err(e)} |")
            print(bn_lines[-1], flush=True)
            flush()
    print()
    print(flush(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
