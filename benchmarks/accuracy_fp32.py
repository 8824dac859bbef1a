"""Float32 TSGB maps against the float64 transcription of the spec (``tests/reference.py``).

    python benchmarks/accuracy_fp32.py [--backends hooks,native] [--families a,b,...] [--no-photos]

Models: the 14 random-weight torchvision families of ``tests/test_models.py`` (same
construction: ``torch.manual_seed(0)``, 10 classes, BN statistics randomised with seed 1, eval
mode; input ``randn(2, 3, S, S)`` with seed 0, targets [3, 7]), and, unless ``--no-photos``, the
ImageNet-pretrained EfficientNet-Lite0 (BN eps 1e-3) on the 8 photos of
``benchmarks/make_photo_dir.py`` at 224, each photo's top-1 class.

Columns, per model and backend (float32 model and input, the backend's map):

* ``same fwd``: relative L2 ``||a - b|| / ||b||`` to the literal rules computed in float64 on the
  model's own float32 forward (``reference_saliency_same_forward``): the error of the backend's
  float32 rule arithmetic alone;
* ``vs f64 L2`` and ``vs f64 max``: relative L2 and ``max|a - b| / max|b|`` to the float64 map
  (model and input in float64, ``reference_saliency``);
* ``f64 L2``: the backend run in float64 (model and input) against the float64 map;
* ``plain f32 L2``: what float32 costs a plain transcription of the spec (the reference run
  entirely in float32) against the float64 map; ``tests/test_models.py`` bounds a backend's
  float32 error by ``max(1e-4, 3 x`` this ``)``; ``ok`` says whether ``vs f64 L2`` is within it.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, HERE)


def families():
    """name -> (factory, input size): the families of ``tests/test_models.py``."""
    from test_models import FAMILIES
    return FAMILIES


def randomise_bn(model):
    """As ``tests/test_models.py``: non-trivial eval statistics (fresh BN is the identity)."""
    from test_models import randomise_bn as rb
    return rb(model)


def rel_l2(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def rel_max(a, b):
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def photo_case():
    import tempfile
    from make_photo_dir import write_photo_dir
    from tsgb_ext import models, pipeline
    lm = models.load_model("efficientnet-lite0")
    with tempfile.TemporaryDirectory() as d:
        write_photo_dir(d)
        ds = pipeline.ImageFileDataset(pipeline.list_images([d]), lm.size)
        rgb = torch.stack([ds[i]["image"] for i in range(len(ds))])
    x = (rgb - torch.tensor(lm.mean).view(1, 3, 1, 1)) / torch.tensor(lm.std).view(1, 3, 1, 1)
    with torch.no_grad():
        target = lm.model(x).argmax(1)
    return lm.model.eval(), x.float(), target


def measure(name, model, x, target, backends):
    import reference as ref
    import tsgb_ext
    want64 = ref.reference_saliency(model, x, target)
    same = ref.reference_saliency_same_forward(model, x, target)
    plain = ref.plain_float32_saliency(model, x, target)
    plain_err = rel_l2(plain, want64)
    bound = max(1e-4, 3 * plain_err)
    rows = []
    for b in backends:
        got = tsgb_ext.TSGB(copy.deepcopy(model), backend=b).attribute(x, target)
        assert got.dtype == torch.float32
        e = rel_l2(got, want64)
        got64 = tsgb_ext.TSGB(copy.deepcopy(model).double(), backend=b).attribute(x.double(),
                                                                                 target)
        rows.append((name, b, rel_l2(got, same), e, rel_max(got, want64), plain_err,
                     "yes" if e <= bound else "NO", bool(torch.isfinite(got).all()),
                     rel_l2(got64, want64)))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backends", default="hooks,native")
    p.add_argument("--families", default=None, help="comma-separated subset of the 14 families")
    p.add_argument("--no-photos", action="store_true",
                   help="skip the pretrained EfficientNet-Lite0 on the bundled photos")
    a = p.parse_args(argv)
    warnings.filterwarnings("ignore", message="tsgb_ext: using the pure-PyTorch")
    torch.set_grad_enabled(True)
    backends = a.backends.split(",")
    fams = families()
    names = a.families.split(",") if a.families else list(fams)
    print(f"torch {torch.__version__}, CPU threads {torch.get_num_threads()}, "
          f"backends {', '.join(backends)}")
    print("\n| model | backend | same fwd L2 | vs f64 L2 | vs f64 max | plain f32 L2 "
          "| ok (<= max(1e-4, 3x plain)) | f64 L2 |")
    print("|---|---|---|---|---|---|---|---|")

    def emit(rows):
        for r in rows:
            fin = "" if r[7] else " (non-finite!)"
            print(f"| {r[0]} | {r[1]} | {r[2]:.1e} | {r[3]:.1e} | {r[4]:.1e} | {r[5]:.1e} "
                  f"| {r[6]}{fin} | {r[8]:.1e} |", flush=True)

    for n in names:
        factory, size = fams[n]
        torch.manual_seed(0)
        model = randomise_bn(factory()).eval()
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
        emit(measure(n, model, x, torch.tensor([3, 7]), backends))
    if not a.no_photos:
        model, x, target = photo_case()
        emit(measure("efficientnet_lite0 (pretrained, 8 photos)", model, x, target, backends))
    return 0


if __name__ == "__main__":
    sys.exit(main())
