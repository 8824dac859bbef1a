"""``bench.py --bench targets``: many targets, the factorised backward (``TSGB(factorize=True)``)
against the batched one (``factorize=False``: T backward passes over one forward).

Per model (random weights with randomised BN statistics, or the bundled pretrained
efficientnet-lite0; float32, batch 1, native backend, one with-block, the path chosen per
call), medians of ``--repeats`` timed calls after one warm-up (one call from T = 100 on), in one
run: the model's no-grad forward, one target by the batched path, and per T the batched path
(up to ``--batched-max`` targets: above it the batched path takes minutes) and the factorised
one, each in ms, x one target and x forward; the two paths' maps are compared (relative L2)."""
from __future__ import annotations

import statistics
import time

import torch

import _models
from _common import randomise_bn, rel_l2


def _build(name: str):
    """The driver's models (vgg*, resnet18/50, efficientnet-lite0), else a torchvision model
    of that name with random weights and randomised BN statistics (densenet121, googlenet)."""
    try:
        return _models.build(name)
    except ValueError:
        import torchvision.models as tvm
        kw = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
        torch.manual_seed(0)
        return randomise_bn(getattr(tvm, name)(**kw)).eval()


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up: first-call checks, tracing, memory
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(ts)


def _model_rows(name: str, args, report, title: str) -> None:
    import tsgb_ext
    model = _build(name).eval()
    x = torch.randn(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fwd = _median_ms(lambda: model(x), max(args.repeats, 5))
    g = torch.Generator().manual_seed(1)
    with tsgb_ext.TSGB(model, factorize=True) as ex:  # one with-block, the path per call

        def call(tg, factorise):
            ex.factorize = factorise
            return ex.attribute(x, tg)
        one = _median_ms(lambda: call(torch.tensor([[3]]), False), args.repeats)
        for T in [int(t) for t in args.targets.split(",")]:
            tg = torch.randperm(1000, generator=g)[:T].view(1, T)
            r = args.repeats if T < 100 else 1
            f = _median_ms(lambda: call(tg, True), r)
            path = ex.last_path
            b = err = None
            if T <= args.batched_max:
                b = _median_ms(lambda: call(tg, False), r)
                err = rel_l2(call(tg, True), call(tg, False))
            report.add(title, [name, f"{fwd:.0f}", f"{one:.0f} ({one / fwd:.2f}x)", T,
                               "" if b is None else f"{b:.0f} ({b / one:.2f}x)",
                               f"{f:.0f}", f"{f / one:.2f}", f"{f / fwd:.2f}",
                               "" if b is None else f"{b / f:.2f}",
                               "" if err is None else f"{err:.1e}", path])


def run_targets(args, report) -> int:
    if args.device != "cpu":
        print("bench.py --bench targets: CPU only for now (the factorised path runs on CUDA, "
              "but this table has not been prepared for it)")
        return 3
    title = report.table(
        "Many targets: factorised vs batched backward (batch 1, float32)",
        ["model", "forward ms", "one target ms", "T", "batched ms (x one)", "factorised ms",
         "x one", "x forward", "speed-up", "rel L2", "path"],
        notes=["one target: the batched path, T = 1; x one / x forward: the factorised "
               "call over those; speed-up: batched / factorised"])
    for name in args.models.split(","):
        _model_rows(name, args, report, title)
    return 0
