"""Cascading model-parameter randomisation sanity check (Adebayo et al. 2018) for TSGB and every
baseline of ``tsgb_ext.evaluation.baselines``, on the pretrained EfficientNet-Lite0 and real
photos.

    python benchmarks/sanity_randomization.py [--methods tsgb,gradient,...] [--stages N]
        [--json docs/sanity_randomization.json] [--plot docs/sanity_randomization.png]

The 8 photos of ``benchmarks/make_photo_dir.py`` (JPEGs read back with
``tsgb_ext.data.pipeline.ImageFileDataset`` at 224, as ``tsgb explain`` reads them) go through
``tsgb_ext.evaluation.metrics.model_randomization``: the model's Conv2d / Linear layers are
re-initialised from the logits down (each from N(0, std^2) with its trained weight's std, seed
0, the same draws for every method), and after each step the method's |map| is compared with
the trained model's |map| by Spearman rank correlation (mean over the photos; target fixed to
the trained model's top-1). ``--stages`` N spreads N steps over the layers (default: one step
per layer).

Printed (and written to ``--json``, SSIM included): Spearman per step and method; the same
cascade with each |map| first averaged over 2x2 pixel blocks (unless ``--no-pooled``); and
controls that say where a correlation that survives the cascade comes from: the fully
re-initialised model's |map| of the same photo, of another photo and of a Gaussian-noise input,
the trained model's |map| of another photo, and the image alone (``sum_c |x_c|``), each against
the trained model's |map| of the photo; and the ratio of the mean |map| at (even, even) pixels to
that at (odd, odd) pixels (the stem conv is 3x3 with stride 2: even positions lie in up to 4 of
its windows, odd ones in 1). A method whose maps depend on the model falls towards 0 as layers
are re-initialised; what stays comes from the image or from the architecture, and the controls
tell which.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def load_photos():
    from _common import photo_batch
    from tsgb_ext.data.models import load_model
    lm = load_model("efficientnet-lite0")
    batch, x = photo_batch(lm)
    names = [os.path.splitext(os.path.basename(p))[0] for p in batch["path"]]
    return lm.model.eval(), x, names


class _Pooled2x2:
    """A method whose map is its ``|map|`` averaged over 2x2 pixel blocks (the 2x2 grid of a
    stride-2 stem conv: pixels at even and odd positions lie in different numbers of its
    windows, which gives TSGB maps a fixed 2-pixel pattern whatever the weights)."""

    def __init__(self, inner):
        self.inner = inner

    def attribute(self, x, target=None):
        return torch.nn.functional.avg_pool2d(self.inner.attribute(x, target).abs(), 2)


def fully_randomised(model, x, seed):
    """The model with every Conv2d / Linear re-initialised: the last step of
    ``metrics.model_randomization`` (same layers, same order, same generator, same draws)."""
    import copy
    from tsgb_ext.evaluation import metrics
    layers = metrics._param_layers_in_forward_order(model, x)[::-1]
    rnd = copy.deepcopy(model)
    mods = dict(rnd.named_modules())
    gen = torch.Generator().manual_seed(seed)
    for name in layers:
        metrics._reinit_(mods[name], gen)
    return rnd


def write_plot(panels, path, title):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(11.0, 3.8))
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, len(panels), i + 1) for i in range(len(panels))]
    for ax, (sub, results) in zip(axes, panels):
        for m, steps in results.items():
            k = [s["n_randomized"] for s in steps]
            ax.plot(k, [s["spearman"] for s in steps], marker="o", ms=2.2, lw=1.2, label=m)
        ax.axhline(0, color="grey", lw=0.8, ls="--")
        n = max(s["n_randomized"] for st in results.values() for s in st)
        ax.set_xlim(0, n)
        ax.set_ylim(-0.2, 1.02)
        ax.set_xlabel(f"layers re-initialised from the logits down ({n} = all)", fontsize=8)
        ax.set_title(sub, fontsize=8)
        ax.tick_params(labelsize=8)
    axes[0].set_ylabel("Spearman of |map| with\nthe trained model's |map|", fontsize=8)
    axes[0].legend(fontsize=7, loc="upper right")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=90)
    return path


def _table(title, results, methods):
    print(f"\n{title}\n")
    print("| step | layers re-initialised | deepest layer re-initialised | "
          + " | ".join(methods) + " |")
    print("|---|---|---|" + "---|" * len(methods))
    for i, s in enumerate(results[methods[0]]):
        vals = " | ".join(f"{results[m][i]['spearman']:.3f}" for m in methods)
        print(f"| {i} | {s['n_randomized']} | {s['layer'] or '(none: trained model)'} | {vals} |")


def main(argv=None) -> int:
    from tsgb_ext.evaluation import baselines, metrics
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default=",".join(baselines.METHODS))
    p.add_argument("--stages", type=int, default=None,
                   help="number of cascade steps (default: one per layer)")
    p.add_argument("--backend", default="auto", help="TSGB backend (auto, native, hooks)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-pooled", action="store_true", help="skip the 2x2-pooled cascade")
    p.add_argument("--json", default=None, metavar="OUT")
    p.add_argument("--plot", default=None, metavar="PNG")
    a = p.parse_args(argv)
    warnings.filterwarnings("ignore", message="tsgb_ext: using the pure-PyTorch")
    torch.manual_seed(0)

    model, x, names = load_photos()
    with torch.no_grad():
        target = model(x).argmax(1)
    n = x.shape[0]
    other = torch.roll(torch.arange(n), 1)            # photo i is paired with photo i - 1
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(a.seed + 1))
    rnd = fully_randomised(model, x, a.seed)
    sp = lambda u, v: float(metrics.spearman(u, v).mean())  # noqa: E731
    results, pooled, controls, grid = {}, {}, {}, {}
    for m in a.methods.split(","):
        kw = {"backend": a.backend} if m == "tsgb" else {}
        factory = lambda mod, _m=m, _kw=kw: baselines.make_method(_m, mod, **_kw)  # noqa: E731
        trained = factory(model).attribute(x, target).detach().abs()
        rand_x = factory(rnd).attribute(x, target).detach().abs()
        rand_noise = factory(rnd).attribute(noise, target).detach().abs()
        controls[m] = {
            "all re-initialised, same photo (= last cascade step)": sp(rand_x, trained),
            "all re-initialised, another photo": sp(rand_x[other], trained),
            "all re-initialised, Gaussian-noise input": sp(rand_noise, trained),
            "trained model, another photo": sp(trained[other], trained),
            "the image alone, sum_c abs(x_c)": sp(x.abs().sum(1, keepdim=True), trained),
        }
        grid[m] = {lab: float(t[..., 0::2, 0::2].mean() / t[..., 1::2, 1::2].mean())
                   for lab, t in (("trained", trained), ("all re-initialised", rand_x))}
        results[m] = metrics.model_randomization(model, factory, x, target, n_stages=a.stages,
                                                 seed=a.seed, absolute=True)
        if not a.no_pooled:
            pooled[m] = metrics.model_randomization(
                model, lambda mod, _f=factory: _Pooled2x2(_f(mod)), x, target,
                n_stages=a.stages, seed=a.seed, absolute=True)
        print(f"{m}: done ({len(results[m]) - 1} steps; last: "
              f"{results[m][-1]['spearman']:.3f})", file=sys.stderr, flush=True)

    methods = list(results)
    print(f"torch {torch.__version__}, CPU, pretrained EfficientNet-Lite0, {n} photos "
          f"({', '.join(names)}) at 224, target = trained top-1, seed {a.seed}")
    _table("Spearman rank correlation of |map| with the trained model's |map| (mean over "
           "photos), per pixel", results, methods)
    if pooled:
        _table("The same, |map| averaged over 2x2 pixel blocks first", pooled, methods)
    print("\nControls: Spearman with the trained model's |map| of the photo\n")
    print("| compared map | " + " | ".join(methods) + " |")
    print("|---|" + "---|" * len(methods))
    for lab in controls[methods[0]]:
        print(f"| {lab} | " + " | ".join(f"{controls[m][lab]:.3f}" for m in methods) + " |")
    print("\nMean |map| at (even, even) pixels over mean |map| at (odd, odd) pixels\n")
    print("| model | " + " | ".join(methods) + " |")
    print("|---|" + "---|" * len(methods))
    for lab in ("trained", "all re-initialised"):
        print(f"| {lab} | " + " | ".join(f"{grid[m][lab]:.2f}" for m in methods) + " |")
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump({"photos": names, "seed": a.seed, "torch": torch.__version__,
                       "controls": controls, "even_odd_ratio": grid, "cascade": results,
                       "cascade_pooled_2x2": pooled}, f, indent=1)
        print(f"wrote {a.json}")
    if a.plot:
        panels = [("per pixel", results)] + ([("|map| averaged over 2x2 pixel blocks", pooled)]
                                             if pooled else [])
        write_plot(panels, a.plot, "Cascading model randomisation, pretrained EfficientNet-Lite0, "
                                   f"{n} photos: Spearman of |map| with the trained model's |map|")
        print(f"wrote {a.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
