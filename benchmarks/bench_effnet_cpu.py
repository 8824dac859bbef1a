"""EfficientNet-Lite0 (the demo model, depthwise convs): forward, plain gradient, hooks and
native TSGB (conv -> BN -> ReLU6 fused, and unfused) on CPU, batch 8, 224x224, median of 5 calls
each.    python benchmarks/bench_effnet_cpu.py"""
import torch, time, tsgb_ext
from tsgb_ext import models
torch.set_num_threads(2)
lm = models.load_model("efficientnet-lite0", device="cpu")
m = lm.model.eval()
x = torch.randn(8,3,224,224)
def med(f, n=5):
    f(); ts=[]
    for _ in range(n):
        t0=time.perf_counter(); f(); ts.append(time.perf_counter()-t0)
    return sorted(ts)[n//2]
def fwd():
    with torch.no_grad(): m(x)
params=[p for p in m.parameters()]
def grad():
    for p in params: p.requires_grad_(False)
    xi = x.clone().requires_grad_(True)
    out = m(xi); torch.autograd.grad(out[:, 1].sum(), xi)
res = {"forward": med(fwd), "gradient": med(grad)}
for name, be, fuse in [("hooks", "hooks", True), ("native", "native", True),
                       ("native_unfused", "native", False)]:
    with tsgb_ext.TSGB(m, backend=be, fuse=fuse) as ex:
        res[name] = med(lambda: ex.attribute(x, 1))
        if name == "native":
            plan = ex._fusion_cache.get("plan")
            print("fused conv -> BN (-> act) chains:", plan.chains if plan else 0)
f = res["forward"]
print("EfficientNet-Lite0 batch 8 224 CPU 2 threads:", ", ".join(f"{k} {v*1000:.0f} ms ({v/f:.2f}x)" for k, v in res.items()))
