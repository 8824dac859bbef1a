"""EfficientNet-Lite0 (the demo model, depthwise convs): forward, plain gradient, hooks and
native TSGB (conv -> BN -> ReLU6 fused, and unfused) on CPU, batch 8, 224x224.

    python benchmarks/bench_effnet_cpu.py [--rounds 7]

The rows are interleaved: every round times one call of each row, in turn, after one warm-up
call of each; the line gives each row's median over the rounds. TSGB rows are single
`attribute` calls (conversion and restore included). (Timed one row after another,
the same rows moved by up to 40% with their position on the 2-core CI machine: the first large
allocations of a process are slower, and later rows inherit a warmer heap.)
"""
import argparse

import torch

import tsgb_ext
from _rows import interleaved_medians
from tsgb_ext import models


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    m = models.load_model("efficientnet-lite0", device="cpu").model.eval()
    x = torch.randn(args.batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    params = list(m.parameters())

    def fwd():
        with torch.no_grad():
            m(x)

    def grad():
        req = [q.requires_grad for q in params]
        for q in params:
            q.requires_grad_(False)
        try:
            xi = x.clone().requires_grad_(True)
            torch.autograd.grad(m(xi)[:, 1].sum(), xi)
        finally:
            for q, r in zip(params, req):
                q.requires_grad_(r)

    # one un-converted call per timing (conversion and restore included; the traced graph of
    # the fused explainer is cached after its first call)
    exs = {name: tsgb_ext.TSGB(m, backend=be, fuse=fuse)
           for name, be, fuse in [("hooks", "hooks", True), ("native", "native", True),
                                  ("native_unfused", "native", False)]}
    rows = {"forward": fwd, "gradient": grad}
    rows.update({k: (lambda ex=ex: ex.attribute(x, 1)) for k, ex in exs.items()})
    med = interleaved_medians(rows, args.rounds)
    chains = exs["native"]._fusion_cache.get("plan")
    f0 = med["forward"]
    print(f"fused conv -> BN (-> act) chains: {chains.chains if chains else 0}")
    print(f"EfficientNet-Lite0 batch {args.batch} 224 CPU {args.threads} threads, median of "
          f"{args.rounds} interleaved rounds: " +
          ", ".join(f"{k} {v * 1000:.0f} ms ({v / f0:.2f}x)" for k, v in med.items()))


if __name__ == "__main__":
    main()
