"""Model-level CUDA check (no torchvision needed): native vs hooks vs float64 on the GPU.

    python benchmarks/gpu_model_check.py
Prints one line per model: relative L2 difference of the native map (conv -> BN -> ReLU fused,
and unfused) to the hooks map and to the float64 hooks map, and whether every map is finite.
"""
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _models  # noqa: E402

import tsgb_ext  # noqa: E402


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def main():
    dev = sys.argv[1] if len(sys.argv) > 1 else "cuda"
    print(tsgb_ext.backend_info())
    for name in ("resnet18", "resnet50", "vgg11"):
        model = _models.build(name).to(dev)
        x = torch.randn(4, 3, 96, 96, device=dev, generator=torch.Generator(dev).manual_seed(0))
        tgt = torch.tensor([[1, 7], [3, 5], [0, 2], [9, 4]], device=dev)
        m64 = copy.deepcopy(model).double()
        want64 = tsgb_ext.TSGB(m64, backend="hooks").attribute(x.double(), tgt)
        hooks = tsgb_ext.TSGB(model, backend="hooks").attribute(x, tgt)
        native = tsgb_ext.TSGB(model, backend="native").attribute(x, tgt)
        unfused = tsgb_ext.TSGB(model, backend="native", fuse=False).attribute(x, tgt)
        cl = x.contiguous(memory_format=torch.channels_last)
        native_cl = tsgb_ext.TSGB(model.to(memory_format=torch.channels_last), backend="native").attribute(cl, tgt)
        model = model.to(memory_format=torch.contiguous_format)
        with torch.autocast(dev, dtype=torch.bfloat16):
            nat_bf = tsgb_ext.TSGB(model, backend="native").attribute(x, tgt)
            hk_bf = tsgb_ext.TSGB(model, backend="hooks").attribute(x, tgt)
        n64 = tsgb_ext.TSGB(m64, backend="native").attribute(x.double(), tgt)
        u64 = tsgb_ext.TSGB(m64, backend="native", fuse=False).attribute(x.double(), tgt)
        fin = all(torch.isfinite(t).all().item() for t in (hooks, native, native_cl, nat_bf, hk_bf))
        print(f"{name}: f64 native-vs-hooks {rel(n64, want64):.2e}, fused-vs-unfused "
              f"{rel(n64, u64):.2e} | f32 fused-vs-unfused {rel(native, unfused):.2e}, native-vs-hooks "
              f"{rel(native, hooks):.2e}, native-vs-f64 {rel(native, want64):.2e}, channels_last "
              f"{rel(native_cl, hooks):.2e} | bf16 autocast native-vs-f64 {rel(nat_bf, want64):.2e} "
              f"hooks-vs-f64 {rel(hk_bf, want64):.2e} | finite {fin}", flush=True)


if __name__ == "__main__":
    main()
