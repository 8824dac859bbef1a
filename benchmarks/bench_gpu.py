"""GPU benchmark of TSGB saliency (no torchvision needed): VGG16 and ResNet50 (random weights,
benchmarks/_models.py), batch 64, 224x224, float32 (TF32 off unless --tf32) and bf16 autocast.

Rows (see benchmarks/README.md): forward, plain gradient, the authors' formulation, tsgb_ext
hooks, hooks under torch.compile (float32 only), native, native without the conv -> BN -> ReLU
fusion (A/B), native with 5 targets per image and one un-converted native call. Per row: median ms (torch.utils.benchmark.Timer, which
synchronises), images/s, ratio to the forward pass, peak GPU memory above the model+input
baseline. Then a memory-bandwidth floor for the TSGB backward per model and dtype.

    python benchmarks/bench_gpu.py --out gpu_results.md
    python benchmarks/bench_gpu.py --quick --no-compile          # small sizes
    python benchmarks/bench_gpu.py --device cpu --quick          # harness check without a GPU

The table is rewritten to --out after every row, so a timeout or a crash keeps what was done.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import sys
import time
from collections import defaultdict

import torch
import torch.nn as nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import _models  # noqa: E402
from _rows import ROWS, compile_stats, compile_warmup, fmt_err, make_row, make_targets, measure, run_cleanup  # noqa: E402

EAGER_ROWS = ["forward", "gradient", "authors", "hooks", "native", "native_unfused", "native_t5",
              "native_percall"]
DTYPES = {"fp32": None, "bf16": torch.bfloat16}


# --- memory-traffic floor --------------------------------------------------------------------
def record_shapes(model: nn.Module, x: torch.Tensor, autocast):
    """(kind, input numel, output numel, element size) of every leaf layer the forward runs."""
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
        elif kind == "BatchNorm2d":
            per[kind] += 3 * n_in * es_in
        elif kind == "ReLU":
            per[kind] += 3 * n_in * es_in
        elif kind == "MaxPool2d":
            per[kind] += n_out * (es_out + 8) + n_in * es_in
    return sum(per.values()), dict(per)


_CONV_RULES = ("conv2d_backward", "conv2d_bn_backward")


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

    ex = tsgb_ext.TSGB(model, backend="native", fuse=fuse)
    with ex:  # as the native rows run: model kept converted, counted on the second call
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


# --- running ---------------------------------------------------------------------------------
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default="vgg16,resnet50")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--rows", default=None, help=f"comma list of {list(ROWS)}")
    p.add_argument("--authors-full", action="store_true",
                   help="add the authors' ones_like(W) fallback row")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile rows")
    p.add_argument("--compile-dtypes", default="fp32", help="dtypes that get a compile row")
    p.add_argument("--min-time", type=float, default=0.25, help="blocked_autorange per row, s")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--budget", type=float, default=170.0,
                   help="seconds since start after which no compile row is started")
    p.add_argument("--tf32", action="store_true", help="allow TF32 for float32 (off by default)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="batch 4, 64x64, shorter timings")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.size, args.min_time, args.warmup = 4, 64, 0.05, 1
    t_start = time.perf_counter()
    device = torch.device(args.device)
    text_head = "# TSGB GPU benchmark\n\n"
    if device.type == "cuda" and not torch.cuda.is_available():
        msg = (f"CUDA is not available (torch {torch.__version__}, built for CUDA "
               f"{torch.version.cuda}); nothing measured. Use --device cpu for a harness check.")
        print(msg, file=sys.stderr)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text_head + msg + "\n")
        return 3

    import tsgb_ext

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    torch.backends.cudnn.allow_tf32 = args.tf32
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.benchmark = True
    if device.type == "cuda":
        dev_name = torch.cuda.get_device_name(device)
        cap = ".".join(map(str, torch.cuda.get_device_capability(device)))
        dev_line = (f"{dev_name} (sm {cap}), CUDA {torch.version.cuda}, cuDNN "
                    f"{torch.backends.cudnn.version()}")
    else:
        from _rows import cpu_model_name
        dev_line = f"{cpu_model_name()} (CPU harness check, not a GPU measurement)"
    info = tsgb_ext.backend_info()
    bw = None
    try:
        bw = bandwidth_gbs(device, (1 << 30) if device.type == "cuda" else (1 << 26))
    except Exception as e:
        print("bandwidth measurement failed:", fmt_err(e), file=sys.stderr)
    head = (text_head +
            f"- device: {dev_line}\n"
            f"- torch {torch.__version__}; tsgb_ext {tsgb_ext.__version__}, native "
            f"{info['native']}, native CUDA kernels {info['native_cuda']}\n"
            f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}\n"
            f"- batch {args.batch}, {args.size}x{args.size}, NCHW; models: "
            f"benchmarks/_models.py (torchvision architectures, random weights, eval)\n"
            f"- float32: TF32 {'ON' if args.tf32 else 'OFF'} (cudnn.allow_tf32 = "
            f"matmul.allow_tf32 = {args.tf32}); bf16: torch.autocast(dtype=torch.bfloat16) "
            f"around each call, float32 weights and input\n"
            f"- cudnn.benchmark = True; timing: torch.utils.benchmark.Timer.blocked_autorange("
            f"min_run_time={args.min_time}) median after {args.warmup} warm-up calls; "
            f"peak = max_memory_allocated during one call minus the allocation before it "
            f"(model, input)\n"
            f"- copy bandwidth (1 GiB device copy, read+write): "
            f"{f'{bw:.0f} GB/s' if bw else 'n/a'}\n\n")
    lines = ["| model | dtype | row | median ms | images/s | x forward | peak MiB | note |",
             "|---|---|---|---|---|---|---|---|"]
    floors = []
    fwd, med_of, peak_of = {}, {}, {}

    def goals_table() -> str:
        """Issue 4's goals per model and dtype, from this run's medians (and peaks)."""
        out = ["| model | dtype | native / forward (<= 1.5) | native / gradient (<= 0.8) | "
               "authors / native (>= 2) | hooks_compile / native (>= 1.5) | peak native / "
               "gradient MiB (<=) | native images/s |", "|---|---|---|---|---|---|---|---|"]
        for name in models:
            for dname in dtypes:
                m = {r: med_of.get((name, dname, r)) for r in
                     ("forward", "gradient", "authors", "hooks_compile", "native")}
                if m["native"] is None:
                    continue

                def ratio(a, b, goal, higher):
                    if a is None or b is None:
                        return "-"
                    v = a / b
                    ok = v >= goal if higher else v <= goal
                    return f"{v:.2f} {'met' if ok else 'MISSED'}"
                pn, pg = (peak_of.get((name, dname, r), "-") for r in ("native", "gradient"))
                mem = "-"
                if pn not in ("-", None) and pg not in ("-", None):
                    mem = f"{pn} / {pg} {'met' if float(pn) <= float(pg) else 'MISSED'}"
                out.append(f"| {name} | {dname} | {ratio(m['native'], m['forward'], 1.5, False)} "
                           f"| {ratio(m['native'], m['gradient'], 0.8, False)} "
                           f"| {ratio(m['authors'], m['native'], 2.0, True)} "
                           f"| {ratio(m['hooks_compile'], m['native'], 1.5, True)} | {mem} "
                           f"| {args.batch / m['native']:.0f} |")
        return "\n".join(out) + "\n"

    def flush():
        text = head + "\n".join(lines) + "\n"
        if floors:
            text += ("\n## Memory-traffic floor of the TSGB backward\n\n"
                     "Floor = bytes an unfused TSGB backward must move (bench_gpu.floor_bytes: "
                     "per Conv2d read g, y, x twice and write gx; per BN read g, x, write gx; "
                     "per ReLU read g, y, write gx; per MaxPool read g and int64 indices, write "
                     "gx) / measured copy bandwidth. Measured: row median minus the forward "
                     "median.\n\n"
                     "Op floor: the bytes the native backward's ops move, counted from the "
                     "ops it runs in a with-block call (bench_gpu.backward_op_bytes: each op reads "
                     "its operands once, writes its result once; conv rules read x twice; views "
                     "free) / the same "
                     "bandwidth, with the conv -> BN -> ReLU fusion (fused) and without "
                     "(unfused).\n\n"
                     "| model | dtype | floor GB | floor ms | op floor fused GB / ms | "
                     "op floor unfused GB / ms | native - forward ms | native_unfused - "
                     "forward ms | hooks - forward ms | authors - forward ms | bytes by layer "
                     "kind (GB) | fused backward bytes by op (GB) |\n"
                     "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
                     + "\n".join(floors) + "\n")
        text += "\n## Goals (issue 4), this run\n\n" + goals_table()
        if args.out:
            with open(args.out, "w") as f:
                f.write(text)
        return text

    dtypes = [d for d in args.dtypes.split(",") if d]
    models = [m for m in args.models.split(",") if m]
    rows = args.rows.split(",") if args.rows else list(EAGER_ROWS)
    if args.authors_full and "authors_full" not in rows:
        rows.insert(rows.index("authors") + 1 if "authors" in rows else len(rows), "authors_full")
    # hooks_compile first (a goal of issue 4 compares against it), native_compile if time is left
    compile_rows = [] if args.no_compile else [r for r in ("hooks_compile", "native_compile")
                                               if r not in rows]
    compile_dtypes = [d for d in args.compile_dtypes.split(",") if d in dtypes]
    threads = torch.get_num_threads()

    def run_one(name, model, x, t, dname, row, autocast):
        cleanup, note = None, ""
        try:
            if row.endswith("_compile"):
                torch._dynamo.reset()  # rows run one at a time here: each compiles afresh
            fn, cleanup, note = make_row(row, model, x, t, autocast)
            counts = None
            if row.endswith("_compile"):
                # the row's own warm-up calls, each timed: the eager first call, then the one
                # that compiles (TSGB(compile=True) compiles on its second call)
                warm, counts = compile_warmup(fn, sync)
                note = warm + "; " + note
            med, _ = measure(fn, threads, 0, args.min_time, args.warmup)
            if counts is not None:
                # graphs compiled over the whole row (warm-up and timing): more than in the
                # compile call means a recompile while timed
                note = f"row total {compile_stats(counts)}; " + note
            pk = peak_mib(fn, device)
            med_of[(name, dname, row)] = med
            peak_of[(name, dname, row)] = pk
            if row == "forward":
                fwd[(name, dname)] = med
            f0 = fwd.get((name, dname))
            ratio = f"{med / f0:.2f}" if f0 else "-"
            lines.append(f"| {name} | {dname} | {row} | {med * 1e3:.2f} | {x.shape[0] / med:.0f} "
                         f"| {ratio} | {pk} | {note} |")
        except Exception as e:
            lines.append(f"| {name} | {dname} | {row} | - | - | - | - | FAILED {fmt_err(e)} |")
        finally:
            run_cleanup(cleanup, lines)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        print(lines[-1], f"[{time.perf_counter() - t_start:.0f} s]", flush=True)
        flush()

    def autocast_for(dname):
        dt = DTYPES[dname]
        if dt is None:
            return contextlib.nullcontext
        return lambda: torch.autocast(device.type, dtype=dt)

    built = {}
    for name in models:
        try:
            model = _models.build(name).to(device)
        except Exception as e:
            lines.append(f"| {name} | - | build | - | - | - | - | FAILED {fmt_err(e)} |")
            flush()
            continue
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(args.batch, 3, args.size, args.size, generator=gen).to(device)
        t = make_targets(args.batch, 1000, device=device)
        built[name] = (model, x, t)
        for dname in dtypes:
            ac = autocast_for(dname)
            for row in rows:
                run_one(name, model, x, t, dname, row, ac)
            try:
                total, per = floor_bytes(record_shapes(model, x, ac))
                fms = f"{total / (bw * 1e9) * 1e3:.2f}" if bw else "-"

                def minus(row):
                    m, f0 = med_of.get((name, dname, row)), fwd.get((name, dname))
                    return f"{(m - f0) * 1e3:.2f}" if m is not None and f0 else "-"
                kinds = ", ".join(f"{k} {v / 1e9:.2f}" for k, v in sorted(per.items()))

                def op_floor(fuse):
                    ob, oper = backward_op_bytes(model, x, t, ac, fuse)
                    oms = f"{ob / (bw * 1e9) * 1e3:.2f}" if bw else "-"
                    return f"{ob / 1e9:.2f} / {oms}", oper
                fused_cell, oper = op_floor(True)
                unfused_cell, _ = op_floor(False)
                ops_txt = ", ".join(f"{k} {v / 1e9:.2f}" for k, v in
                                    sorted(oper.items(), key=lambda kv: -kv[1]) if v >= 1e7)
                floors.append(f"| {name} | {dname} | {total / 1e9:.2f} | {fms} | {fused_cell} | "
                              f"{unfused_cell} | {minus('native')} | {minus('native_unfused')} | "
                              f"{minus('hooks')} | {minus('authors')} | {kinds} | {ops_txt} |")
            except Exception as e:
                floors.append(f"| {name} | {dname} | - | - | - | - | - | - | - | - | - | "
                              f"FAILED {fmt_err(e)} |")
            flush()
    for row in compile_rows:
        for dname in compile_dtypes:
            for name, (model, x, t) in built.items():
                if time.perf_counter() - t_start > args.budget:
                    lines.append(f"| {name} | {dname} | {row} | - | - | - | - | skipped: time "
                                 f"budget {args.budget:.0f} s spent |")
                    flush()
                    continue
                run_one(name, model, x, t, dname, row, autocast_for(dname))
    lines.append("")
    lines.append(f"total wall time {time.perf_counter() - t_start:.0f} s")
    text = flush()
    print()
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
