"""The per-pixel class figure of the docs: a 2x2 mosaic of four bundled photographs, and at
every pixel the class (of the mosaic's four) whose TSGB map is largest there
(``TSGB.pixel_classes``), from the ImageNet-pretrained EfficientNet-Lite0.

    python benchmarks/pixel_class_figure.py [--out docs/pixel_classes.png] [--tile 160]

Prints, per tile, the share of its pixels with positive evidence that are assigned to the
tile's own class (chance: 25%)."""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_photo_dir import sample_photos  # noqa: E402

from tsgb_ext import TSGB  # noqa: E402
from tsgb_ext.data import imagenet, models  # noqa: E402
from tsgb_ext.evaluation.benchmarks import make_mosaic  # noqa: E402

TILES = ("chelsea", "coffee", "rocket", "china")


def pixel_class_mosaic(tile: int = 160, device: str = "cpu"):
    """(mosaic rgb (1, 3, 2t, 2t), classes (4,), ids (2t, 2t), values (2t, 2t))."""
    model = models.load_efficientnet_lite0(device)
    photos = sample_photos()
    tiles = [models.load_rgb(photos[n], tile, device) for n in TILES]
    with torch.no_grad():
        classes = [int(model(models.normalize(t)).argmax()) for t in tiles]
    rgb = make_mosaic(tiles, (2, 2))
    ids, vals = TSGB(model).pixel_classes(models.normalize(rgb), classes=classes, k=1)
    return rgb, classes, ids[0, 0], vals[0, 0]


def tile_scores(ids: torch.Tensor, vals: torch.Tensor, classes) -> list:
    """Per tile: the share of its pixels with positive evidence assigned to its own class."""
    h, w = ids.shape[0] // 2, ids.shape[1] // 2
    out = []
    for i, c in enumerate(classes):
        r, q = divmod(i, 2)
        ti, tv = ids[r * h:(r + 1) * h, q * w:(q + 1) * w], vals[r * h:(r + 1) * h, q * w:(q + 1) * w]
        pos = tv > 0
        out.append(float((ti[pos] == c).float().mean()) if pos.any() else float("nan"))
    return out


def draw(rgb, classes, ids, vals, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    colours = np.array([[0.90, 0.30, 0.20], [0.20, 0.60, 0.90], [0.95, 0.80, 0.20],
                        [0.40, 0.80, 0.40]])
    lab = np.zeros(ids.shape + (3,)) + 0.15  # no positive evidence: dark grey
    for j, c in enumerate(classes):
        lab[(ids == c).numpy() & (vals > 0).numpy()] = colours[j]
    fig, axes = plt.subplots(1, 2, figsize=(8.4, 4.6))
    axes[0].imshow(rgb[0].permute(1, 2, 0).cpu().numpy())
    axes[0].set_title("2x2 mosaic of four photographs")
    axes[1].imshow(lab, interpolation="nearest")
    axes[1].set_title("per-pixel class (largest TSGB map)")
    for a in axes:
        a.axis("off")
    names = [imagenet.class_name(c) for c in classes]
    fig.legend(handles=[Patch(color=colours[j], label=n) for j, n in enumerate(names)],
               loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 0.96))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join("docs", "pixel_classes.png"))
    p.add_argument("--tile", type=int, default=160)
    args = p.parse_args(argv)
    rgb, classes, ids, vals = pixel_class_mosaic(args.tile)
    draw(rgb, classes, ids, vals, args.out)
    for name, c, s in zip(TILES, classes, tile_scores(ids, vals, classes)):
        print(f"{name:10s} {imagenet.class_name(c):24s} own-class share of positive pixels: "
              f"{100 * s:.0f}%")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
