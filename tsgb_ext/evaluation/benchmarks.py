"""The benchmarks behind ``tsgb eval``: the grid pointing game on 2x2 mosaics of photos
(:func:`run_grid`) and the pointing / energy pointing game on a Pascal VOC folder
(:func:`run_pointing`), with their inputs (:func:`read_voc`, :func:`read_labels`,
:func:`grid_images`, :func:`draw_grids`, :func:`make_mosaic`) and outputs (:func:`print_table`,
:func:`write_json`, :func:`write_plot`).

The classifier comes in as an :class:`ImageNetClassifier` (the model, its class names and its
preprocessing), so that this module needs nothing of :mod:`tsgb_ext.data`. Problems with the
inputs raise :class:`BenchmarkError`.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import random
import time
import warnings
import xml.etree.ElementTree as ET
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..io.images import list_images, read_rgb, rgb_tensor
from ..io.labels import LabelsError, class_id, read_labels as read_label_file

METHOD_NAMES = ("tsgb", "gradient", "gradxinput", "guided", "gradcam")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
TILE = 224


class BenchmarkError(ValueError):
    """A problem with a benchmark's inputs (folder, labels, annotations, images)."""


@dataclasses.dataclass
class ImageNetClassifier:
    """What a benchmark needs of the model: the model, its class names, ``load_rgb(image, size,
    device)`` (an RGB uint8 (H, W, 3) array -> a (1, 3, size, size) [0, 1] tensor, resized and
    cropped as the model expects) and ``normalize`` ([0, 1] RGB -> the model's input)."""

    model: nn.Module
    class_names: Sequence[str]
    load_rgb: Callable[..., torch.Tensor]
    normalize: Callable[[torch.Tensor], torch.Tensor]


#: VOC class -> ImageNet class names / index ranges that depict it (resolved by name at run time).
VOC_TO_IMAGENET = {
    "aeroplane": ["airliner", "warplane", "airship"],
    "bicycle": ["bicycle-built-for-two", "mountain bike", "tricycle"],
    "bird": list(range(7, 25)) + list(range(80, 101)) + list(range(127, 147)),
    "boat": ["canoe", "catamaran", "container ship", "fireboat", "gondola", "lifeboat",
             "liner", "schooner", "speedboat", "trimaran", "yawl", "pirate"],
    "bottle": ["beer bottle", "pill bottle", "pop bottle", "water bottle", "wine bottle",
               "whiskey jug", "water jug"],
    "bus": ["school bus", "trolleybus", "minibus"],
    "car": ["beach wagon", "cab", "convertible", "jeep", "limousine", "minivan", "Model T",
            "racer", "sports car", "police van", "pickup"],
    "cat": ["tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"],
    "chair": ["barber chair", "folding chair", "rocking chair", "throne"],
    "cow": ["ox", "water buffalo"],
    "diningtable": ["dining table"],
    "dog": list(range(151, 269)),
    "horse": ["sorrel"],
    "motorbike": ["moped", "motor scooter"],
    "pottedplant": ["pot"],
    "sheep": ["ram", "bighorn"],
    "sofa": ["studio couch"],
    "train": ["bullet train", "electric locomotive", "freight car", "passenger car",
              "steam locomotive", "streetcar"],
    "tvmonitor": ["monitor", "television", "screen", "desktop computer"],
}



# ------------------------------------------------------------------------ inputs ----
def class_index(value, names: Sequence[str], where: str) -> int:
    """An ImageNet class index or name (any case) -> its index."""
    try:
        return class_id(str(value), names, len(names), where)
    except LabelsError as e:
        raise BenchmarkError(str(e)) from None


def read_labels(path: Optional[str], names: Sequence[str]) -> Dict[str, int]:
    """``--labels``: a label file of :mod:`tsgb_ext.io.labels` (JSON ``{key: class}``, text
    lines ``key<whitespace>class``, or a CSV with columns image,class); class is an ImageNet
    index or name. Keys are file names (with or without extension) or object names."""
    if not path:
        return {}
    try:
        entries = read_label_file(path)
    except LabelsError as e:
        raise BenchmarkError(f"--labels {e}") from None
    return {e.key: class_index(e.value, names, f"--labels {path} [{e.key}]") for e in entries}


def load_image(path: str):
    """An image file -> RGB (H, W, 3) numpy array (uint8; float32 on [0, 1] for 16-bit
    grey), read with the package's one guarded reader (:func:`tsgb_ext.io.images.read_rgb`:
    regular files only, decompression-bomb guard, truncated files raise)."""
    try:
        return read_rgb(path)
    except Exception as e:  # noqa: BLE001 - PIL raises many kinds
        raise BenchmarkError(f"cannot read image {path}: {e}") from None


def make_mosaic(tiles: Sequence[torch.Tensor], grid: Tuple[int, int]) -> torch.Tensor:
    """Tile equal-size (1, C, h, w) images row-major into one (1, C, rows*h, cols*w) image."""
    rows, cols = grid
    if len(tiles) != rows * cols:
        raise ValueError(f"a {rows}x{cols} mosaic needs {rows * cols} tiles, got {len(tiles)}")
    return torch.cat([torch.cat(list(tiles[r * cols:(r + 1) * cols]), -1) for r in range(rows)], -2)


# ------------------------------------------------------------------------ output ----
def _quiet():
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.filterwarnings("ignore", message="tsgb_ext: using the pure-PyTorch")
    return ctx


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _explainer(name: str, model, backend: str):
    from .baselines import make_method
    return make_method(name, model, backend=backend) if name == "tsgb" else make_method(name, model)


def print_table(results: Dict[str, Dict[str, float]], metrics: Sequence[str], log) -> None:
    cols = ["method"] + list(metrics) + ["images/s"]
    rows = [[m] + [f"{r[k]:.3f}" for k in metrics] + [f"{r['images_per_s']:.2f}"]
            for m, r in results.items()]
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    log("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    log("  ".join("-" * w for w in widths))
    for row in rows:
        log("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def write_plot(results: Dict[str, Dict[str, float]], metrics: Sequence[str], path: str,
               title: str, chance: Optional[float] = None) -> str:
    """Grouped bar plot (one group per method, one bar per metric) as a small PNG."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    methods = list(results)
    fig = Figure(figsize=(1.2 + 1.1 * len(methods) * max(1, len(metrics)) ** 0.5, 3.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    w = 0.8 / len(metrics)
    x = np.arange(len(methods))
    for j, k in enumerate(metrics):
        vals = [results[m][k] for m in methods]
        bars = ax.bar(x + (j - (len(metrics) - 1) / 2) * w, vals, w, label=k)
        for b, v in zip(bars, vals):
            ax.text(b.get_x() + b.get_width() / 2, v + 0.01, f"{v:.2f}", ha="center",
                    va="bottom", fontsize=7)
    if chance is not None:
        ax.axhline(chance, color="grey", ls="--", lw=1, label=f"random ({chance:.2f})")
    ax.set_xticks(x)
    ax.set_xticklabels(methods)
    ax.set_ylim(0, 1.25)  # headroom: the legend sits above bars that reach 1.0
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper center", ncol=len(metrics) + (chance is not None))
    fig.tight_layout()
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fig.savefig(path, dpi=90)
    return path


def write_json(path: str, results) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
        f.write("\n")


# -------------------------------------------------------------------------- grid ----
def grid_images(directory: str) -> List[str]:
    """The images directly in ``directory`` (not its subfolders), sorted."""
    if not os.path.isdir(directory):
        raise BenchmarkError(f"{directory}: not a directory")
    files = [it.path for it in list_images([directory], IMAGE_EXTS, recursive=False)]
    if not files:
        raise BenchmarkError(f"{directory}: no images ({', '.join(IMAGE_EXTS)})")
    return files


def draw_grids(classes: Sequence[int], n_grids: int, seed: int) -> List[List[int]]:
    """``n_grids`` lists of 4 photo indices of 4 different classes, row-major tile order."""
    by_class: Dict[int, List[int]] = {}
    for i, c in enumerate(classes):
        by_class.setdefault(c, []).append(i)
    if len(by_class) < 4:
        raise BenchmarkError(f"2x2 mosaics need photos of at least 4 different classes; the photos "
                       f"have {len(by_class)}")
    rng = random.Random(seed)
    keys = sorted(by_class)
    return [[rng.choice(by_class[c]) for c in rng.sample(keys, 4)] for _ in range(n_grids)]


def _timed_scores(name: str, clf: ImageNetClassifier, backend: str, dev: torch.device,
                  score: Callable[[object], Dict[str, float]], n: int) -> Dict[str, float]:
    """``score(explainer)`` for method ``name``, with ``images_per_s`` over its ``n`` images."""
    ex = _explainer(name, clf.model, backend)
    _sync(dev)
    t0 = time.perf_counter()
    ctx = _quiet()
    try:
        result = score(ex)
    finally:
        ctx.__exit__(None, None, None)
    _sync(dev)
    result["images_per_s"] = n / (time.perf_counter() - t0)
    return result


def photo_classes(files: Sequence[str], rgb: torch.Tensor, clf: ImageNetClassifier,
                  lab: Dict[str, int], log=print) -> List[int]:
    """Each photo's class: its ``--labels`` entry (file name with or without extension), else
    the model's top-1."""
    with torch.no_grad():
        top1 = clf.model(clf.normalize(rgb)).argmax(1).tolist()
    classes = []
    for p, t in zip(files, top1):
        base = os.path.basename(p)
        c = lab.get(base, lab.get(os.path.splitext(base)[0], t))
        classes.append(c)
        log(f"{base}: {clf.class_names[c]} ({'label' if c != t or base in lab else 'top-1'})")
    return classes


def score_grids(ex, x_all: torch.Tensor, tgt_all: torch.Tensor, batch_size: int
                ) -> Dict[str, float]:
    """Grid pointing game of one method over (G, 3, 2h, 2w) mosaics and their (G, 4) tile
    classes."""
    from . import metrics
    shares, hits = [], []
    for a in range(0, len(x_all), batch_size):
        maps = ex.attribute(x_all[a:a + batch_size], tgt_all[a:a + batch_size])
        r = metrics.grid_pointing_game(maps, (2, 2))
        shares.append(r["share"])
        hits.append(r["hit"])
    share, hit = torch.cat(shares), torch.cat(hits)
    return {"grid_pointing_game": float(share.mean()),
            "grid_pointing_hit": float(hit.float().mean()), "n_grids": len(x_all)}


def run_grid(directory: str, methods: Sequence[str], classifier: ImageNetClassifier,
             n_grids: int = 20, seed: int = 0, labels: Optional[str] = None,
             device: str = "cpu", backend: str = "auto", batch_size: int = 4,
             log=print) -> Tuple[Dict[str, Dict[str, float]], Dict]:
    """The work of ``tsgb eval grid``; returns (results, info)."""
    clf, dev = classifier, torch.device(device)
    names = clf.class_names
    files = grid_images(directory)
    lab = read_labels(labels, names)
    rgb = torch.cat([clf.load_rgb(load_image(p), TILE, dev) for p in files])
    classes = photo_classes(files, rgb, clf, lab, log)
    grids = draw_grids(classes, n_grids, seed)
    mosaics = torch.cat([make_mosaic([rgb[i:i + 1] for i in g], (2, 2)) for g in grids])
    x_all = clf.normalize(mosaics)
    tgt_all = torch.tensor([[classes[i] for i in g] for g in grids], device=dev)
    results = {name: _timed_scores(name, clf, backend, dev,
                                   lambda ex: score_grids(ex, x_all, tgt_all, batch_size),
                                   len(grids))
               for name in methods}
    info = {"photos": [os.path.basename(p) for p in files],
            "classes": [names[c] for c in classes], "grids": grids}
    return results, info


# ---------------------------------------------------------------------- pointing ----
def read_voc(directory: str, include_difficult: bool = False):
    """[(image path, (H, W), {object name: [(x0, y0, x1, y1) 0-based inclusive]})]."""
    ann = os.path.join(directory, "Annotations")
    jpg = os.path.join(directory, "JPEGImages")
    if not os.path.isdir(ann) or not os.path.isdir(jpg):
        raise BenchmarkError(f"{directory}: expected Pascal VOC layout (JPEGImages/ and Annotations/)")
    out = []
    for xml in sorted(glob.glob(os.path.join(ann, "*.xml"))):
        try:
            root = ET.parse(xml).getroot()
        except ET.ParseError as e:
            raise BenchmarkError(f"{xml}: {e}") from None
        fn = root.findtext("filename") or os.path.splitext(os.path.basename(xml))[0] + ".jpg"
        path = os.path.join(jpg, fn)
        if not os.path.isfile(path):
            raise BenchmarkError(f"{xml}: image {path} not found")
        objs: Dict[str, list] = {}
        for o in root.iter("object"):
            if not include_difficult and (o.findtext("difficult") or "0").strip() == "1":
                continue
            b = o.find("bndbox")
            try:
                box = tuple(float(b.findtext(k)) - 1 for k in ("xmin", "ymin", "xmax", "ymax"))
            except (TypeError, ValueError, AttributeError):
                raise BenchmarkError(f"{xml}: an object has no valid bndbox") from None
            objs.setdefault(o.findtext("name").strip(), []).append(box)
        out.append((path, objs))
    if not out:
        raise BenchmarkError(f"{ann}: no .xml annotations")
    return out


def resolve_object(name: str, probs: torch.Tensor, lab: Dict[str, int],
                    names: Sequence[str]) -> Optional[int]:
    if name in lab:
        return lab[name]
    lower = {n.lower(): i for i, n in enumerate(names)}
    if name.lower() in lower:
        return lower[name.lower()]
    cands = []
    for v in VOC_TO_IMAGENET.get(name.lower(), []):
        if isinstance(v, int):
            cands.append(v)
        elif v.lower() in lower:
            cands.append(lower[v.lower()])
    if not cands:
        return None
    idx = torch.tensor(cands, device=probs.device)
    return int(idx[probs[idx].argmax()])


def object_pairs(voc, imgs, probs: torch.Tensor, lab: Dict[str, int], names: Sequence[str],
                 dev: torch.device, log=print):
    """(image index, class, box mask) for each (image, object class) with an ImageNet class,
    and the skipped ``file:object`` names."""
    from . import metrics
    pairs, skipped = [], []
    for i, ((path, objs), im) in enumerate(zip(voc, imgs)):
        H, W = im.shape[:2]
        for obj, boxes in objs.items():
            c = resolve_object(obj, probs[i], lab, names)
            if c is None:
                skipped.append(f"{os.path.basename(path)}:{obj}")
                continue
            pairs.append((i, c, metrics.boxes_to_mask(boxes, (H, W), dev)))
            log(f"{os.path.basename(path)}: {obj} -> {names[c]} (p={float(probs[i, c]):.2f})")
    if skipped:
        log(f"skipped {len(skipped)} object class(es) with no ImageNet class: "
            f"{', '.join(skipped)}")
    return pairs, skipped


def score_pointing(ex, x_img: torch.Tensor, pairs, batch_size: int, tolerance: float
                   ) -> Dict[str, float]:
    """Pointing game and energy pointing game of one method over the (image, class, mask)
    pairs."""
    from . import metrics
    idx = torch.tensor([p[0] for p in pairs], device=x_img.device)
    tgt = torch.tensor([p[1] for p in pairs], device=x_img.device)
    maps = torch.cat([ex.attribute(x_img[idx[a:a + batch_size]], tgt[a:a + batch_size])
                      for a in range(0, len(pairs), batch_size)])
    hits, energy = [], []
    for k, (_, _, mask) in enumerate(pairs):
        hits.append(metrics.pointing_hits(maps[k:k + 1], mask[None], tolerance))
        energy.append(metrics.energy_in_mask(maps[k:k + 1], mask[None]))
    hits_t, energy_t = torch.cat(hits), torch.cat(energy)
    return {"pointing_game": float(hits_t.float().mean()),
            "energy_pointing_game": float(energy_t.mean()), "n": len(pairs)}


def run_pointing(directory: str, methods: Sequence[str], classifier: ImageNetClassifier,
                 labels: Optional[str] = None, device: str = "cpu", backend: str = "auto",
                 batch_size: int = 8, tolerance: float = 15, log=print):
    """The work of ``tsgb eval pointing``; returns (results, info)."""
    clf, dev = classifier, torch.device(device)
    lab = read_labels(labels, clf.class_names)
    voc = read_voc(directory)
    imgs = [load_image(p) for p, _ in voc]
    x_img = clf.normalize(torch.cat([resize_whole(im, dev) for im in imgs]))
    with torch.no_grad():
        probs = torch.softmax(clf.model(x_img).float(), 1)
    pairs, skipped = object_pairs(voc, imgs, probs, lab, clf.class_names, dev, log)
    if not pairs:
        raise BenchmarkError(f"{directory}: no object could be mapped to an ImageNet class")
    results = {name: _timed_scores(name, clf, backend, dev,
                                   lambda ex: score_pointing(ex, x_img, pairs, batch_size,
                                                             tolerance), len(pairs))
               for name in methods}
    return results, {"skipped": skipped, "n_images": len(voc)}


def resize_whole(im, dev) -> torch.Tensor:
    """The whole image (no crop) resized to TILE x TILE, [0, 1] RGB (1, 3, TILE, TILE)."""
    import torch.nn.functional as F
    t = rgb_tensor(im)[None].to(dev)
    return F.interpolate(t, size=(TILE, TILE), mode="bilinear", align_corners=False,
                         antialias=True).clamp_(0, 1)
