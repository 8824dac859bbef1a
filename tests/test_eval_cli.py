"""`tsgb eval grid` / `tsgb eval pointing` on the bundled VOC-format fixture (real photos, boxes
drawn by hand; see tests/data/make_voc_small.py) with the pretrained EfficientNet-Lite0."""
import json
import os

import pytest

from tsgb_ext import cli
from tsgb_ext.data import models

VOC = os.path.join(os.path.dirname(__file__), "data", "voc_small")

pytestmark = pytest.mark.skipif(not models.efficientnet_lite0_available(),
                                reason="needs the pretrained EfficientNet-Lite0 packages")


def test_eval_pointing_on_voc_fixture(tmp_path, capsys):
    out, plot = tmp_path / "p.json", tmp_path / "p.png"
    assert cli.main(["eval", "pointing", VOC, "--methods", "tsgb,gradcam", "--json", str(out),
                     "--plot", str(plot)]) == 0
    res = json.loads(out.read_text())
    assert list(res) == ["tsgb", "gradcam"]
    for r in res.values():
        assert r["n"] == 6   # 6 images; flower's 2 daisy boxes are one class; 2 'person' skipped
        assert 0 <= r["pointing_game"] <= 1 and 0 <= r["energy_pointing_game"] <= 1
        assert r["images_per_s"] > 0
    # the boxes are real: Grad-CAM's coarse maxima land on the objects
    assert res["gradcam"]["pointing_game"] >= 0.7
    printed = capsys.readouterr().out
    assert "pointing_game" in printed and "skipped 2" in printed
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_grid_on_fixture_photos(tmp_path, capsys):
    out = tmp_path / "g.json"
    assert cli.main(["eval", "grid", os.path.join(VOC, "JPEGImages"), "--methods",
                     "tsgb,gradient", "--grids", "1", "--seed", "1", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res) == {"tsgb", "gradient"}
    for r in res.values():
        assert r["n_grids"] == 1 and 0 <= r["grid_pointing_game"] <= 1
    assert res["tsgb"]["grid_pointing_game"] > 0.5          # target-selective
    assert "grid_pointing_game" in capsys.readouterr().out


def test_eval_grid_needs_four_classes(tmp_path, capsys):
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"{n} 281\n" for n in ("chelsea", "coffee", "rocket"))
                      + "camera tabby\n")
    with pytest.raises(SystemExit) as e:
        cli.main(["eval", "grid", os.path.join(VOC, "JPEGImages"), "--labels", str(labels),
                  "--methods", "gradient", "--grids", "1"])
    assert e.value.code == 2
    assert "at least 4 different classes" in capsys.readouterr().err


def test_eval_rejects_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["eval", "grid", VOC, "--methods", "tsgb,lime"])
    assert e.value.code == 2 and "lime" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["eval", "pointing", str(tmp_path)])
    assert e.value.code == 2 and "Pascal VOC layout" in capsys.readouterr().err
