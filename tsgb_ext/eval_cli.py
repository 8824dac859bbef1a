"""``tsgb eval``: score saliency methods with the field's metrics on real photographs.

    tsgb eval grid DIR --methods tsgb,gradient,gradxinput,guided,gradcam --json OUT
                       [--grids N] [--seed S] [--labels FILE] [--plot FILE.png]
    tsgb eval pointing DIR [--methods ...] [--json OUT] [--labels FILE] [--plot FILE.png]

``grid``: DIR holds single-object photos (jpg/png). Each photo's class is the model's top-1
(or ``--labels``); ``--grids`` 2x2 mosaics of four photos of four different classes are drawn
(``--seed``), each tile 224 x 224. For each tile's class the method's map of the mosaic is
scored by the share of its positive mass inside that tile (``grid_pointing_game``; random: 0.25)
and by whether its maximum falls in it (``grid_pointing_hit``).

``pointing``: DIR in Pascal VOC layout (``JPEGImages/*.jpg`` + ``Annotations/*.xml`` boxes).
Each image is resized (whole, no crop) to 224 x 224; the maps are resized back to the image.
Each (image, object class) pair is scored with TorchRay's pointing game (15 px tolerance) and the
energy pointing game over the union of that class's boxes. An object's name is mapped to an
ImageNet class by ``--labels`` (JSON ``{name: class index or ImageNet name}``), else by an
ImageNet class name (case-insensitive), else, for VOC's class names, by the best-scoring of the
matching ImageNet classes; other objects (e.g. ``person``) are skipped and counted.

Both print a table, write ``{method: {metric: value, ..., "images_per_s": ...}}`` with
``--json`` and a bar plot with ``--plot``. The model is the ImageNet-pretrained EfficientNet-Lite0.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import random
import re
import time
import warnings
import xml.etree.ElementTree as ET
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .cli import BACKENDS, DEVICE_HELP, CLIError, check_backend, full_fp32, resolve_device

METHOD_NAMES = ("tsgb", "gradient", "gradxinput", "guided", "gradcam")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
TILE = 224

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


# ---------------------------------------------------------------------------- helpers ----
def parse_methods(text: str) -> List[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in names if m not in METHOD_NAMES]
    if not names or bad:
        raise argparse.ArgumentTypeError(
            f"unknown method(s) {', '.join(bad) or '(none)'}; choose from {', '.join(METHOD_NAMES)}")
    return list(dict.fromkeys(names))


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _class_index(value, names: Sequence[str], where: str) -> int:
    if isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
        i = int(value)
        if not 0 <= i < len(names):
            raise CLIError(f"{where}: class index {i} is not in [0, {len(names)})")
        return i
    lower = {n.lower(): i for i, n in enumerate(names)}
    if isinstance(value, str) and value.strip().lower() in lower:
        return lower[value.strip().lower()]
    raise CLIError(f"{where}: {value!r} is neither a class index nor an ImageNet class name")


def read_labels(path: Optional[str], names: Sequence[str]) -> Dict[str, int]:
    """``--labels``: JSON ``{key: class}`` or text lines ``key<whitespace>class``; class is an
    ImageNet index or name. Keys are file names (with or without extension) or object names."""
    if not path:
        return {}
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise CLIError(f"--labels {path}: {e.strerror or e}") from None
    try:
        raw = json.loads(text)
        if not isinstance(raw, dict):
            raise CLIError(f"--labels {path}: the JSON must be an object {{name: class}}")
    except json.JSONDecodeError:
        raw = {}
        for ln, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split(None, 1)
            if len(parts) != 2:
                raise CLIError(f"--labels {path}:{ln}: expected 'name class', got {line!r}")
            raw[parts[0]] = parts[1]
    return {str(k): _class_index(v, names, f"--labels {path} [{k}]") for k, v in raw.items()}


def _load_image(path: str):
    """An image file -> writable RGB uint8 (H, W, 3) numpy array."""
    import numpy as np
    from PIL import Image
    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"))
    except Exception as e:  # noqa: BLE001 - PIL raises many kinds
        raise CLIError(f"cannot read image {path}: {e}") from None


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


def _print_table(results: Dict[str, Dict[str, float]], metrics: Sequence[str], log) -> None:
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


def _write_json(path: str, results) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
        f.write("\n")


# ------------------------------------------------------------------------------- grid ----
def list_images(directory: str) -> List[str]:
    if not os.path.isdir(directory):
        raise CLIError(f"{directory}: not a directory")
    files = sorted(p for p in glob.glob(os.path.join(directory, "*"))
                   if os.path.splitext(p)[1].lower() in IMAGE_EXTS and os.path.isfile(p))
    if not files:
        raise CLIError(f"{directory}: no images ({', '.join(IMAGE_EXTS)})")
    return files


def draw_grids(classes: Sequence[int], n_grids: int, seed: int) -> List[List[int]]:
    """``n_grids`` lists of 4 photo indices of 4 different classes, row-major tile order."""
    by_class: Dict[int, List[int]] = {}
    for i, c in enumerate(classes):
        by_class.setdefault(c, []).append(i)
    if len(by_class) < 4:
        raise CLIError(f"2x2 mosaics need photos of at least 4 different classes; the photos "
                       f"have {len(by_class)}")
    rng = random.Random(seed)
    keys = sorted(by_class)
    return [[rng.choice(by_class[c]) for c in rng.sample(keys, 4)] for _ in range(n_grids)]


def run_grid(directory: str, methods: Sequence[str], n_grids: int = 20, seed: int = 0,
             labels: Optional[str] = None, device: str = "cpu", backend: str = "auto",
             batch_size: int = 4, log=print) -> Tuple[Dict[str, Dict[str, float]], Dict]:
    """The work of ``tsgb eval grid``; returns (results, info)."""
    from . import imagenet, metrics, models
    from .cli import make_mosaic

    dev = torch.device(device)
    names = imagenet.class_names()
    files = list_images(directory)
    lab = read_labels(labels, names)
    model = models.load_efficientnet_lite0(dev)
    rgb = torch.cat([models.load_rgb(_load_image(p), TILE, dev) for p in files])
    with torch.no_grad():
        top1 = model(models.normalize(rgb)).argmax(1).tolist()
    classes = []
    for p, t in zip(files, top1):
        base = os.path.basename(p)
        c = lab.get(base, lab.get(os.path.splitext(base)[0], t))
        classes.append(c)
        log(f"{base}: {names[c]} ({'label' if c != t or base in lab else 'top-1'})")
    grids = draw_grids(classes, n_grids, seed)
    mosaics = torch.cat([make_mosaic([rgb[i:i + 1] for i in g], (2, 2)) for g in grids])
    x_all = models.normalize(mosaics)
    tgt_all = torch.tensor([[classes[i] for i in g] for g in grids], device=dev)
    results: Dict[str, Dict[str, float]] = {}
    for name in methods:
        ex = _explainer(name, model, backend)
        shares, hits = [], []
        _sync(dev)
        t0 = time.perf_counter()
        ctx = _quiet()
        try:
            for a in range(0, len(grids), batch_size):
                maps = ex.attribute(x_all[a:a + batch_size], tgt_all[a:a + batch_size])
                r = metrics.grid_pointing_game(maps, (2, 2))
                shares.append(r["share"])
                hits.append(r["hit"])
        finally:
            ctx.__exit__(None, None, None)
        _sync(dev)
        dt = time.perf_counter() - t0
        share, hit = torch.cat(shares), torch.cat(hits)
        results[name] = {"grid_pointing_game": float(share.mean()),
                         "grid_pointing_hit": float(hit.float().mean()),
                         "n_grids": len(grids), "images_per_s": len(grids) / dt}
    info = {"photos": [os.path.basename(p) for p in files],
            "classes": [names[c] for c in classes], "grids": grids}
    return results, info


def _setup(args) -> torch.device:
    """Check --device, --backend and the pretrained model up front; the device."""
    from . import models
    dev = resolve_device(args.device)
    check_backend(args.backend, dev)
    try:
        models.require_efficientnet_lite0()
    except models.ModelUnavailableError as e:
        raise CLIError(str(e)) from None
    return dev


def _report(results, metric_names, args, plot_title, chance=None) -> int:
    """Print the table; write --json and --plot when asked."""
    _print_table(results, metric_names, print)
    if args.json:
        _write_json(args.json, results)
        print(f"wrote {args.json}")
    if args.plot:
        write_plot(results, metric_names, args.plot, plot_title, chance=chance)
        print(f"wrote {args.plot}")
    return 0


def cmd_eval_grid(args) -> int:
    dev = _setup(args)
    with full_fp32(dev):
        results, info = run_grid(args.dir, args.methods, args.grids, args.seed, args.labels,
                                 str(dev), args.backend, args.batch_size)
    print(f"grid pointing game: {args.grids} 2x2 mosaics (seed {args.seed}) of "
          f"{len(info['photos'])} photos, EfficientNet-Lite0, {dev}; random = 0.250")
    return _report(results, ["grid_pointing_game", "grid_pointing_hit"], args,
                   f"Grid pointing game, {args.grids} 2x2 mosaics, EfficientNet-Lite0", 0.25)


# --------------------------------------------------------------------------- pointing ----
def read_voc(directory: str, include_difficult: bool = False):
    """[(image path, (H, W), {object name: [(x0, y0, x1, y1) 0-based inclusive]})]."""
    ann = os.path.join(directory, "Annotations")
    jpg = os.path.join(directory, "JPEGImages")
    if not os.path.isdir(ann) or not os.path.isdir(jpg):
        raise CLIError(f"{directory}: expected Pascal VOC layout (JPEGImages/ and Annotations/)")
    out = []
    for xml in sorted(glob.glob(os.path.join(ann, "*.xml"))):
        try:
            root = ET.parse(xml).getroot()
        except ET.ParseError as e:
            raise CLIError(f"{xml}: {e}") from None
        fn = root.findtext("filename") or os.path.splitext(os.path.basename(xml))[0] + ".jpg"
        path = os.path.join(jpg, fn)
        if not os.path.isfile(path):
            raise CLIError(f"{xml}: image {path} not found")
        objs: Dict[str, list] = {}
        for o in root.iter("object"):
            if not include_difficult and (o.findtext("difficult") or "0").strip() == "1":
                continue
            b = o.find("bndbox")
            try:
                box = tuple(float(b.findtext(k)) - 1 for k in ("xmin", "ymin", "xmax", "ymax"))
            except (TypeError, ValueError, AttributeError):
                raise CLIError(f"{xml}: an object has no valid bndbox") from None
            objs.setdefault(o.findtext("name").strip(), []).append(box)
        out.append((path, objs))
    if not out:
        raise CLIError(f"{ann}: no .xml annotations")
    return out


def _resolve_object(name: str, probs: torch.Tensor, lab: Dict[str, int],
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


def run_pointing(directory: str, methods: Sequence[str], labels: Optional[str] = None,
                 device: str = "cpu", backend: str = "auto", batch_size: int = 8,
                 tolerance: float = 15, log=print):
    """The work of ``tsgb eval pointing``; returns (results, info)."""
    from . import imagenet, metrics, models

    dev = torch.device(device)
    names = imagenet.class_names()
    lab = read_labels(labels, names)
    voc = read_voc(directory)
    model = models.load_efficientnet_lite0(dev)
    imgs = [_load_image(p) for p, _ in voc]
    rgb = torch.cat([_resize_whole(im, dev) for im in imgs])
    x_img = models.normalize(rgb)
    with torch.no_grad():
        probs = torch.softmax(model(x_img).float(), 1)
    pairs, skipped = [], []          # (image index, class, mask)
    for i, ((path, objs), im) in enumerate(zip(voc, imgs)):
        H, W = im.shape[:2]
        for obj, boxes in objs.items():
            c = _resolve_object(obj, probs[i], lab, names)
            if c is None:
                skipped.append(f"{os.path.basename(path)}:{obj}")
                continue
            pairs.append((i, c, metrics.boxes_to_mask(boxes, (H, W), dev)))
            log(f"{os.path.basename(path)}: {obj} -> {names[c]} (p={float(probs[i, c]):.2f})")
    if skipped:
        log(f"skipped {len(skipped)} object class(es) with no ImageNet class: "
            f"{', '.join(skipped)}")
    if not pairs:
        raise CLIError(f"{directory}: no object could be mapped to an ImageNet class")
    idx = torch.tensor([p[0] for p in pairs], device=dev)
    tgt = torch.tensor([p[1] for p in pairs], device=dev)
    results = {}
    for name in methods:
        ex = _explainer(name, model, backend)
        _sync(dev)
        t0 = time.perf_counter()
        ctx = _quiet()
        try:
            maps = torch.cat([ex.attribute(x_img[idx[a:a + batch_size]], tgt[a:a + batch_size])
                              for a in range(0, len(pairs), batch_size)])
            hits, energy = [], []
            for k, (_, _, mask) in enumerate(pairs):
                hits.append(metrics.pointing_hits(maps[k:k + 1], mask[None], tolerance))
                energy.append(metrics.energy_in_mask(maps[k:k + 1], mask[None]))
        finally:
            ctx.__exit__(None, None, None)
        hits_t, energy_t = torch.cat(hits), torch.cat(energy)
        _sync(dev)
        dt = time.perf_counter() - t0
        results[name] = {"pointing_game": float(hits_t.float().mean()),
                         "energy_pointing_game": float(energy_t.mean()),
                         "n": len(pairs), "images_per_s": len(pairs) / dt}
    return results, {"skipped": skipped, "n_images": len(voc)}


def _resize_whole(im, dev) -> torch.Tensor:
    """The whole image (no crop) resized to TILE x TILE, [0, 1] RGB (1, 3, TILE, TILE)."""
    import numpy as np
    import torch.nn.functional as F
    t = torch.from_numpy(np.ascontiguousarray(im, dtype=np.uint8)).permute(2, 0, 1)[None]
    t = t.to(dev).float() / 255.0
    return F.interpolate(t, size=(TILE, TILE), mode="bilinear", align_corners=False,
                         antialias=True).clamp_(0, 1)


def cmd_eval_pointing(args) -> int:
    dev = _setup(args)
    with full_fp32(dev):
        results, info = run_pointing(args.dir, args.methods, args.labels, str(dev), args.backend,
                                     args.batch_size, args.tolerance)
    print(f"pointing game ({args.tolerance:g} px) and energy pointing game: "
          f"{next(iter(results.values()))['n']} (image, class) pairs from {info['n_images']} "
          f"images, EfficientNet-Lite0, {dev}")
    return _report(results, ["pointing_game", "energy_pointing_game"], args,
                   "Pointing game, EfficientNet-Lite0")


# ----------------------------------------------------------------------- registration ----
def _common(p, batch_default: int) -> None:
    p.add_argument("--methods", type=parse_methods, default=list(METHOD_NAMES),
                   help=f"comma-separated methods from {','.join(METHOD_NAMES)} (default: all)")
    p.add_argument("--json", metavar="OUT", help="write {method: {metric: value}} to OUT")
    p.add_argument("--labels", metavar="FILE",
                   help="JSON {name: class} or lines 'name class' (ImageNet index or name)")
    p.add_argument("--plot", metavar="FILE.png", help="write a bar plot (matplotlib)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--backend", choices=BACKENDS, default="auto", help="TSGB backend")
    p.add_argument("--batch-size", type=_positive_int, default=batch_default, metavar="B",
                   help=f"images per forward pass (default: {batch_default})")


def _doc_part(i: int) -> str:
    """Paragraph i of this module's docstring as plain help text (no reST markup)."""
    return re.sub(r"``(.*?)``", r"\1", __doc__.split("\n\n")[i])


def _add_eval(sub) -> None:
    raw = argparse.RawDescriptionHelpFormatter  # keep the usage lines and paragraphs apart
    p = sub.add_parser("eval", help="score saliency methods with the field's metrics",
                       description=_doc_part(0) + "\n\n" + _doc_part(1), formatter_class=raw)
    esub = p.add_subparsers(dest="metric", metavar="METRIC")
    esub.required = True
    g = esub.add_parser("grid", help="grid pointing game on 2x2 mosaics of photos in DIR",
                        description=_doc_part(2), formatter_class=raw)
    g.add_argument("dir", metavar="DIR", help="folder of single-object photos")
    g.add_argument("--grids", type=_positive_int, default=20, metavar="N",
                   help="number of mosaics (default: 20)")
    g.add_argument("--seed", type=int, default=0, help="mosaic sampling seed (default: 0)")
    _common(g, 4)
    g.set_defaults(func=cmd_eval_grid)
    q = esub.add_parser("pointing", help="pointing game on a Pascal VOC layout folder",
                        description=_doc_part(3), formatter_class=raw)
    q.add_argument("dir", metavar="DIR", help="folder with JPEGImages/ and Annotations/")
    q.add_argument("--tolerance", type=float, default=15.0, metavar="PX",
                   help="pointing-game tolerance in pixels (default: 15, as TorchRay)")
    _common(q, 8)
    q.set_defaults(func=cmd_eval_pointing)
