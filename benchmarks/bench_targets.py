"""Many targets: the factorised backward (``TSGB(factorize=...)``) against the batched one.

    python benchmarks/bench_targets.py [--models resnet50,vgg16] [--targets 1,5,20,100,1000]
                                       [--size 224] [--threads 2] [--repeats 3] [--json OUT]

Per model (random weights, BN statistics randomised, float32, batch 1, CPU, native backend, one
with-block per path), medians of ``--repeats`` timed calls after one warm-up, in one run:

* ``forward``: the model's own no-grad forward;
* ``one``: one target, the batched path (what ``attribute(x)`` runs);
* per T: the batched path (``factorize=False``: T backward passes over one forward; skipped
  above ``--batched-max`` targets, where it takes minutes) and the factorised path
  (``factorize=True``), each as ms, x one target and x forward.
The maps of both paths are compared (max relative L2 over the rows measured)."""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from typing import Dict, List

import torch
import torch.nn as nn
import torchvision.models as tvm

import tsgb_ext


def randomise_bn(model: nn.Module, seed: int = 1) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            if m.weight is not None:
                m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


def build(name: str) -> nn.Module:
    if name == "efficientnet_lite0":
        from tsgb_ext.data import models
        return models.load_efficientnet_lite0().eval()
    kw = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
    torch.manual_seed(0)
    return randomise_bn(getattr(tvm, name)(**kw)).eval()


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up (first-call checks, tracing, memory)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(ts)


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def bench_model(name: str, targets: List[int], size: int, repeats: int,
                batched_max: int) -> Dict:
    model = build(name)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fwd = median_ms(lambda: model(x), max(repeats, 5))
    row: Dict = {"model": name, "forward_ms": fwd, "rows": []}
    g = torch.Generator().manual_seed(1)
    with tsgb_ext.TSGB(model, factorize=True) as ex:  # one with-block; the path per call

        def call(tg, factorise):
            ex.factorize = factorise
            return ex.attribute(x, tg)
        one = median_ms(lambda: call(torch.tensor([[3]]), False), repeats)
        row["one_ms"] = one
        for T in targets:
            tg = torch.randperm(1000, generator=g)[:T].view(1, T)
            r = max(1, repeats if T <= 20 else 1)
            out = {"T": T}
            out["factorised_ms"] = median_ms(lambda: call(tg, True), r)
            out["factorised_path"] = ex.last_path
            if T <= batched_max:
                out["batched_ms"] = median_ms(lambda: call(tg, False), r)
                out["rel_l2"] = rel_l2(call(tg, True), call(tg, False))
            row["rows"].append(out)
    return row


def print_model(row: Dict) -> None:
    fwd, one = row["forward_ms"], row["one_ms"]
    print(f"\n{row['model']}: forward {fwd:.0f} ms; one target (batched) {one:.0f} ms "
          f"= {one / fwd:.2f}x forward")
    print(f"{'T':>5} {'batched ms':>11} {'x one':>6} {'factorised ms':>14} {'x one':>6} "
          f"{'x fwd':>6} {'speed-up':>8} {'rel L2':>8}")
    for r in row["rows"]:
        b = r.get("batched_ms")
        f = r["factorised_ms"]
        print(f"{r['T']:>5} {b if b is not None else float('nan'):>11.0f} "
              f"{(b / one) if b else float('nan'):>6.2f} {f:>14.0f} {f / one:>6.2f} "
              f"{f / fwd:>6.2f} {(b / f) if b else float('nan'):>8.2f} "
              f"{r.get('rel_l2', float('nan')):>8.1e}  {r['factorised_path']}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet50,vgg16")
    p.add_argument("--targets", default="1,5,20,100,1000")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batched-max", type=int, default=100,
                   help="time the batched path only up to this many targets")
    p.add_argument("--json", metavar="OUT")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, native={tsgb_ext.native_available()}, "
          f"{time.strftime('%Y-%m-%d')}, float32, batch 1, {args.size}x{args.size}")
    rows = []
    for name in args.models.split(","):
        row = bench_model(name, [int(t) for t in args.targets.split(",")], args.size,
                          args.repeats, args.batched_max)
        print_model(row)
        rows.append(row)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
