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
import os
import re

import torch

from ..data import imagenet, models
from ..evaluation import benchmarks
from ..evaluation.benchmarks import METHOD_NAMES, BenchmarkError
from ._common import (BACKENDS, DEVICE_HELP, CLIError, check_backend, full_fp32, positive_int,
                      resolve_device)


def run(args: argparse.Namespace) -> int:
    """``tsgb eval grid`` / ``tsgb eval pointing``."""
    dev = resolve_device(args.device)
    check_backend(args.backend, dev)
    check_inputs(args)  # a bad DIR or --labels is reported before the model loads
    classifier = load_classifier(dev)
    with full_fp32(dev):
        try:
            results, info = _BENCHMARKS[args.metric](args, classifier, dev)
        except BenchmarkError as e:
            raise CLIError(str(e)) from None
    return report(results, args, info, dev)


def check_inputs(args: argparse.Namespace) -> None:
    """The folder (and --labels file) exist and have the expected layout."""
    if not os.path.isdir(args.dir):
        raise CLIError(f"{args.dir}: not a directory")
    if args.metric == "pointing":
        for sub in ("JPEGImages", "Annotations"):
            if not os.path.isdir(os.path.join(args.dir, sub)):
                raise CLIError(f"{args.dir}: expected Pascal VOC layout (JPEGImages/ and "
                               f"Annotations/)")
    if args.labels is not None and not os.path.isfile(args.labels):
        raise CLIError(f"--labels {args.labels}: no such file")


def parse_methods(text: str) -> List[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in names if m not in METHOD_NAMES]
    if not names or bad:
        raise argparse.ArgumentTypeError(
            f"unknown method(s) {', '.join(bad) or '(none)'}; choose from {', '.join(METHOD_NAMES)}")
    return list(dict.fromkeys(names))


def load_classifier(dev: torch.device) -> benchmarks.ImageNetClassifier:
    """The ImageNet-pretrained EfficientNet-Lite0 with its class names and preprocessing."""
    try:
        models.require_efficientnet_lite0()
    except models.ModelUnavailableError as e:
        raise CLIError(str(e)) from None
    return benchmarks.ImageNetClassifier(models.load_efficientnet_lite0(dev),
                                         imagenet.class_names(), models.load_rgb,
                                         models.normalize)


def _grid(args, classifier, dev):
    return benchmarks.run_grid(args.dir, args.methods, classifier, args.grids, args.seed,
                               args.labels, str(dev), args.backend, args.batch_size)


def _pointing(args, classifier, dev):
    return benchmarks.run_pointing(args.dir, args.methods, classifier, args.labels, str(dev),
                                   args.backend, args.batch_size, args.tolerance)


_BENCHMARKS = {"grid": _grid, "pointing": _pointing}


def report(results, args, info, dev) -> int:
    """Print the headline and the table; write --json and --plot when asked."""
    if args.metric == "grid":
        print(f"grid pointing game: {args.grids} 2x2 mosaics (seed {args.seed}) of "
              f"{len(info['photos'])} photos, EfficientNet-Lite0, {dev}; random = 0.250")
        names, chance = ["grid_pointing_game", "grid_pointing_hit"], 0.25
        title = f"Grid pointing game, {args.grids} 2x2 mosaics, EfficientNet-Lite0"
    else:
        print(f"pointing game ({args.tolerance:g} px) and energy pointing game: "
              f"{next(iter(results.values()))['n']} (image, class) pairs from "
              f"{info['n_images']} images, EfficientNet-Lite0, {dev}")
        names, chance = ["pointing_game", "energy_pointing_game"], None
        title = "Pointing game, EfficientNet-Lite0"
    benchmarks.print_table(results, names, print)
    if args.json:
        benchmarks.write_json(args.json, results)
        print(f"wrote {args.json}")
    if args.plot:
        benchmarks.write_plot(results, names, args.plot, title, chance=chance)
        print(f"wrote {args.plot}")
    return 0


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
    p.add_argument("--batch-size", type=positive_int, default=batch_default, metavar="B",
                   help=f"images per forward pass (default: {batch_default})")


def _doc_part(i: int) -> str:
    """Paragraph i of this module's docstring as plain help text (no reST markup)."""
    return re.sub(r"``(.*?)``", r"\1", __doc__.split("\n\n")[i])


def register(sub) -> None:
    """Add ``tsgb eval grid`` and ``tsgb eval pointing`` to the ``tsgb`` subcommands."""
    raw = argparse.RawDescriptionHelpFormatter  # keep the usage lines and paragraphs apart
    p = sub.add_parser("eval", help="score saliency methods with the field's metrics",
                       description=_doc_part(0) + "\n\n" + _doc_part(1), formatter_class=raw)
    esub = p.add_subparsers(dest="metric", metavar="METRIC")
    esub.required = True
    g = esub.add_parser("grid", help="grid pointing game on 2x2 mosaics of photos in DIR",
                        description=_doc_part(2), formatter_class=raw)
    g.add_argument("dir", metavar="DIR", help="folder of single-object photos")
    g.add_argument("--grids", type=positive_int, default=20, metavar="N",
                   help="number of mosaics (default: 20)")
    g.add_argument("--seed", type=int, default=0, help="mosaic sampling seed (default: 0)")
    _common(g, 4)
    g.set_defaults(func=run)
    q = esub.add_parser("pointing", help="pointing game on a Pascal VOC layout folder",
                        description=_doc_part(3), formatter_class=raw)
    q.add_argument("dir", metavar="DIR", help="folder with JPEGImages/ and Annotations/")
    q.add_argument("--tolerance", type=float, default=15.0, metavar="PX",
                   help="pointing-game tolerance in pixels (default: 15, as TorchRay)")
    _common(q, 8)
    q.set_defaults(func=run)
