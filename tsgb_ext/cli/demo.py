"""``tsgb demo``: explain real photographs with a pretrained EfficientNet-Lite0: scikit-image's
chelsea (cat) and coffee (espresso), and a cat|espresso mosaic; one PNG figure per image."""
from __future__ import annotations

import argparse
import os
import warnings
from typing import Any, Dict, List, Optional, Sequence

import torch

from .. import viz
from ..core.explainer import TSGB
from ..data import imagenet, models
from ..evaluation.benchmarks import make_mosaic
from ._common import (BACKENDS, DEVICE_HELP, CLIError, check_backend, full_fp32, int_arg,
                      prepare_out_dir, resolve_device)

MAX_TOP_K = 10
#: Layout of the demo mosaic: one row, the cat (left tile) then the coffee (right tile).
MOSAIC_GRID = (1, 2)


def demo_images() -> Dict[str, Any]:
    """The demo's photographs (RGB uint8 arrays): scikit-image's ``chelsea`` and ``coffee``."""
    try:
        from skimage import data
    except ImportError as e:
        raise CLIError(f"the demo's photographs come from scikit-image "
                       f"(pip install scikit-image): {e}") from None
    return {"chelsea": data.chelsea(), "coffee": data.coffee()}


def predict(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Softmax class probabilities (N, classes) of the model's input ``x``."""
    with torch.no_grad():
        return torch.softmax(model(x).float(), dim=1)


def pick_class(probs: torch.Tensor, allowed: Sequence[int], k: int = 5,
               fallback: Optional[int] = None) -> int:
    """The highest-ranked class of ``allowed`` among the top-``k`` of ``probs`` (C,), else
    ``fallback`` (if given), else the best of ``allowed``."""
    allowed = set(int(a) for a in allowed)
    for c in probs.topk(k).indices.tolist():
        if c in allowed:
            return c
    if fallback is not None:
        return int(fallback)
    idx = torch.tensor(sorted(allowed), device=probs.device)
    return int(idx[probs[idx].argmax()])


def explain_mosaic(explainer, model, cat_rgb: torch.Tensor, coffee_rgb: torch.Tensor,
                   cat_fallback: Optional[int] = None, coffee_fallback: Optional[int] = None):
    """Explain the cat|coffee mosaic for its top cat class and its top espresso/cup class.

    ``cat_rgb`` and ``coffee_rgb``: (1, 3, h, w) [0, 1] RGB tiles. The classes are the best cat
    class and the best coffee class among the mosaic's top-5 (else the fallbacks: the single
    images' top-1). Both maps come from one forward pass.

    Returns a dict: ``rgb`` (1, 3, h, 2w), ``maps`` (1, 2, h, 2w), ``classes`` [cat, coffee],
    ``probs`` (their softmax scores on the mosaic), ``top5`` [(class, score)] of the mosaic,
    ``fractions`` [positive mass of the cat map in
    the cat tile, of the coffee map in the coffee tile], ``tile_mass`` (2, rows, cols).
    """
    rgb = make_mosaic([cat_rgb, coffee_rgb], MOSAIC_GRID)
    x = models.normalize(rgb)
    probs = predict(model, x)[0]
    top5 = probs.topk(5)
    cat = pick_class(probs, imagenet.CAT_CLASSES, 5, cat_fallback)
    coffee = pick_class(probs, imagenet.COFFEE_CLASSES, 5, coffee_fallback)
    target = torch.tensor([[cat, coffee]], device=x.device)
    maps = explainer.attribute(x, target)                       # (1, 2, H, W), one forward
    mass = viz.tile_positive_mass(maps[0], MOSAIC_GRID)        # (2, rows, cols)
    fractions = [float(mass[0, 0, 0]), float(mass[1, 0, 1])]
    return {"rgb": rgb, "maps": maps, "classes": [cat, coffee],
            "probs": [float(probs[cat]), float(probs[coffee])],
            "top5": list(zip(top5.indices.tolist(), top5.values.tolist())),
            "fractions": fractions, "tile_mass": mass}


def run_demo(out: str, top_k: int = 3, device: str = "cpu", backend: str = "auto",
             log=print) -> List[str]:
    """The work of ``tsgb demo``; returns the paths written. ``out`` must exist and be writable."""
    with full_fp32(torch.device(device)):
        return _run_demo(out, top_k, device, backend, log)


def _run_demo(out, top_k, device, backend, log) -> List[str]:
    dev = torch.device(device)
    model = models.load_efficientnet_lite0(dev)
    explainer = TSGB(model, backend=backend)
    names = imagenet.class_names()
    images = demo_images()
    rgb = torch.cat([models.load_rgb(img, models.IMAGE_SIZE, dev) for img in images.values()])
    top_i, written = _explain_photos(explainer, model, images, rgb, top_k, names, out, log,
                                     dev)
    keys = list(images)
    written.append(_explain_the_mosaic(explainer, model, rgb[keys.index("chelsea")][None],
                                       rgb[keys.index("coffee")][None],
                                       int(top_i[keys.index("chelsea"), 0]),
                                       int(top_i[keys.index("coffee"), 0]), names, out, log))
    return written


def _explain_photos(explainer, model, images, rgb, top_k, names, out, log, dev):
    """The single photographs, batched: top-k by a no-grad forward, then all N x k maps from
    one TSGB forward with an (N, k) target; one figure each. Returns (top-k classes, paths)."""
    x = models.normalize(rgb)
    probs = predict(model, x)
    top_p, top_i = probs.topk(top_k, dim=1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="tsgb_ext: using the pure-PyTorch")
        maps = explainer.attribute(x, top_i)                    # (N, k, H, W)
    log(f"TSGB backend: {explainer.last_backend}, device: {dev}")
    written = []
    for n, key in enumerate(images):
        classes = top_i[n].tolist()
        scores = top_p[n].tolist()
        log(f"{key}: top-{top_k}: " + ", ".join(f"{names[c]} {p:.3f}" for c, p in zip(classes, scores)))
        titles = [f"#{j + 1} {names[c]}  p={p:.2f}" for j, (c, p) in enumerate(zip(classes, scores))]
        fig = viz.explanation_figure(rgb[n], maps[n], titles, image_title=key,
                                     suptitle=f"TSGB, top-{top_k}: red = evidence for the class, "
                                              f"blue = against")
        path = viz.save_figure(fig, os.path.join(out, f"{key}.png"))
        written.append(path)
        log(f"wrote {path}")
    return top_i, written


def _explain_the_mosaic(explainer, model, cat_rgb, coffee_rgb, cat_fallback, coffee_fallback,
                        names, out, log) -> str:
    """The mosaic: cat | coffee, one map for the cat class and one for the coffee class."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="tsgb_ext: using the pure-PyTorch")
        res = explain_mosaic(explainer, model, cat_rgb, coffee_rgb, cat_fallback=cat_fallback,
                             coffee_fallback=coffee_fallback)
    log("mosaic: top-5: " + ", ".join(f"{names[c]} {p:.3f}" for c, p in res["top5"]))
    tiles = ("cat", "cup")
    titles = []
    for c, p, f, tile in zip(res["classes"], res["probs"], res["fractions"], tiles):
        titles.append(f"{names[c]}  p={p:.2f}\npositive mass in {tile} tile: {f:.0%}")
        log(f"mosaic: {names[c]} (p={p:.3f}): {f:.1%} of the positive map mass is in the "
            f"{tile} tile")
    h, w = res["rgb"].shape[-2:]
    fig = viz.explanation_figure(res["rgb"][0], res["maps"][0], titles, image_title="mosaic",
                                 dividers=[("v", w // MOSAIC_GRID[1])],
                                 suptitle="TSGB on a cat | espresso mosaic: red = evidence "
                                          "for the class, blue = against")
    path = viz.save_figure(fig, os.path.join(out, "mosaic.png"))
    log(f"wrote {path}")
    return path


def run(args: argparse.Namespace) -> int:
    """``tsgb demo``: explain real photographs with a pretrained EfficientNet-Lite0."""
    dev = resolve_device(args.device)
    check_backend(args.backend, dev)
    out = prepare_out_dir(args.out)
    require_model()
    run_demo(out, top_k=args.top_k, device=str(dev), backend=args.backend)
    return 0


def require_model() -> None:
    """The pretrained EfficientNet-Lite0's packages are installed (else a CLIError)."""
    try:
        models.require_efficientnet_lite0()
    except models.ModelUnavailableError as e:
        raise CLIError(str(e)) from None


def register(sub) -> None:
    """Add ``tsgb demo`` to the ``tsgb`` subcommands."""
    p = sub.add_parser(
        "demo", help="explain real photographs with a pretrained EfficientNet-Lite0",
        description="Explain scikit-image's chelsea (cat) and coffee (espresso) photographs and "
                    "a cat|espresso mosaic with TSGB on an ImageNet-pretrained EfficientNet-Lite0 "
                    "(offline); write one PNG figure per image to DIR: the photo, then the map of "
                    "each top class overlaid (red: positive evidence, blue: negative).")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="directory for the PNG figures (created if missing)")
    p.add_argument("--top-k", type=int_arg(1, MAX_TOP_K), default=3, metavar="K",
                   help=f"explain each photo's K top classes, 1..{MAX_TOP_K} (default: 3)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="TSGB backend: auto (native where available, else hooks), native (the "
                        "compiled ops) or hooks (pure PyTorch); default: auto")
    p.set_defaults(func=run)
