"""tsgb_ext.evaluation.metrics against hand-computed cases (toy maps and toy models; fast, CPU)."""

import numpy as np
import pytest
import torch
import torch.nn as nn

from tsgb_ext.evaluation import metrics
from tsgb_ext.evaluation.baselines import Gradient


def _mask(H, W, box):
    return metrics.boxes_to_mask([box], (H, W))[None]


# ------------------------------------------------------------------------ pointing game ----
def test_boxes_to_mask_inclusive_union():
    m = metrics.boxes_to_mask([(1, 2, 3, 4), (0, 0, 0, 0)], (6, 5))
    assert m.sum() == 3 * 3 + 1
    assert m[2:5, 1:4].all() and m[0, 0] and not m[5].any()


def test_pointing_hit_inside_and_tolerance_edge():
    H, W = 64, 64
    mask = _mask(H, W, (40, 10, 50, 20))               # x 40..50, y 10..20
    sal = torch.zeros(3, 1, H, W)
    sal[0, 0, 15, 45] = 1                               # inside
    sal[1, 0, 15, 36] = 1                               # 4 px left of the box: within 15
    sal[2, 0, 15, 25] = 1                               # exactly 15 px left: TorchRay's "<" misses
    hits = metrics.pointing_hits(sal, mask.expand(3, H, W), tolerance=15)
    assert hits.tolist() == [True, True, False]
    assert metrics.pointing_game(sal, mask.expand(3, H, W)) == pytest.approx(2 / 3)
    sal[2, 0, 15, 26] = 2                               # 14 px: hit
    assert bool(metrics.pointing_hits(sal[2:], mask)[0])


def test_pointing_resizes_low_res_map_to_mask():
    # a 4x4 map whose maximum is its bottom-right cell lands in the bottom-right of 64x64
    sal = torch.zeros(1, 1, 4, 4)
    sal[0, 0, 3, 3] = 1
    assert metrics.argmax_points(sal, (64, 64))[0].tolist()[0] >= 48
    assert bool(metrics.pointing_hits(sal, _mask(64, 64, (48, 48, 63, 63)), tolerance=1)[0])
    assert not bool(metrics.pointing_hits(sal, _mask(64, 64, (0, 0, 20, 20)), tolerance=15)[0])


def test_pointing_empty_mask_is_a_miss():
    assert not bool(metrics.pointing_hits(torch.rand(1, 8, 8), torch.zeros(1, 8, 8, dtype=bool))[0])


# ------------------------------------------------------------------------------- energy ----
def test_energy_all_inside_scores_one_uniform_scores_area_share():
    H, W = 20, 30
    mask = _mask(H, W, (5, 4, 14, 9))                   # 10 x 6 = 60 px of 600
    inside = torch.zeros(1, 1, H, W)
    inside[0, 0, 4:10, 5:15] = torch.rand(6, 10) + 0.1
    inside[0, 0, 0, 0] = -5.0                           # negative values do not count
    assert metrics.energy_pointing_game(inside, mask) == pytest.approx(1.0)
    uniform = torch.ones(1, 1, H, W)
    assert metrics.energy_pointing_game(uniform, mask) == pytest.approx(60 / 600)
    assert float(metrics.energy_in_mask(-uniform, mask)[0]) == 0.0   # no positive mass
    # maps (N, h, w) at another resolution are resized first: uniform stays uniform
    assert metrics.energy_pointing_game(torch.ones(1, 5, 7), mask) == pytest.approx(0.1)


# --------------------------------------------------------------------------------- grid ----
def test_grid_pointing_game_perfect_uniform_and_swapped():
    H = W = 8
    maps = torch.zeros(1, 4, H, W)
    for j in range(4):
        r, c = divmod(j, 2)
        maps[0, j, r * 4:(r + 1) * 4, c * 4:(c + 1) * 4] = 1 + j
    res = metrics.grid_pointing_game(maps)
    assert torch.allclose(res["share"], torch.ones(1, 4)) and res["hit"].all()
    res = metrics.grid_pointing_game(torch.ones(2, 4, H, W))
    assert torch.allclose(res["share"], torch.full((2, 4), 0.25))
    swapped = maps[:, [1, 0, 3, 2]]
    res = metrics.grid_pointing_game(swapped)
    assert torch.allclose(res["share"], torch.zeros(1, 4)) and not res["hit"].any()
    # 3/4 of map 0's positive mass in tile 0, 1/4 in tile 3
    m = torch.zeros(1, 4, H, W)
    m[0, 0, 0, 0], m[0, 0, 7, 7] = 3.0, 1.0
    assert float(metrics.grid_pointing_game(m)["share"][0, 0]) == pytest.approx(0.75)
    with pytest.raises(ValueError):
        metrics.grid_pointing_game(torch.ones(1, 3, H, W))


# ------------------------------------------------------------------- deletion / insertion ----
class ShareModel(nn.Module):
    """P(class 0) = sum(w * x) / sum(w) exactly (softmax of the logs), for x in [0, 1]."""

    def __init__(self, w):
        super().__init__()
        self.register_buffer("w", w)

    def forward(self, x):
        s = (x[:, 0] * self.w).flatten(1).sum(1) / self.w.sum()
        s = s.clamp(1e-12, 1 - 1e-12)
        return torch.stack([s.log(), (1 - s).log()], 1)


W4 = torch.tensor([[0.4, 0.3], [0.2, 0.1]], dtype=torch.float64)


def test_deletion_insertion_hand_computed():
    model = ShareModel(W4)
    x = torch.ones(2, 1, 2, 2, dtype=torch.float64)
    perfect = W4[None, None].clone()
    reverse = -perfect
    sal = torch.cat([perfect, reverse])
    d = metrics.deletion_insertion(model, x, sal, 0, "deletion", n_steps=4, batch_size=3)
    assert torch.allclose(d["curve"].double(), torch.tensor([[1, .6, .3, .1, 0], [1, .9, .7, .4, 0]],
                                                           dtype=torch.float64), atol=1e-6)
    assert d["auc"].tolist() == pytest.approx([(2.0 - 0.5) / 4, (3.0 - 0.5) / 4], abs=1e-6)
    i = metrics.deletion_insertion(model, x, sal, torch.tensor([0, 0]), "insertion", n_steps=4,
                                   substrate="zero")
    assert torch.allclose(i["curve"].double(), torch.tensor([[0, .4, .7, .9, 1], [0, .1, .3, .6, 1]],
                                                           dtype=torch.float64), atol=1e-6)
    assert i["auc"].tolist() == pytest.approx([0.625, 0.375], abs=1e-6)
    # the batch size does not change anything
    d2 = metrics.deletion_insertion(model, x, sal, 0, "deletion", n_steps=4, batch_size=64)
    assert torch.equal(d["curve"], d2["curve"])


def test_deletion_steps_larger_than_one_pixel_and_default_blur_substrate():
    model = ShareModel(W4)
    x = torch.ones(1, 1, 2, 2, dtype=torch.float64)
    d = metrics.deletion_insertion(model, x, W4[None, None], 0, "deletion", n_steps=2)
    assert d["curve"][0].tolist() == pytest.approx([1, .3, 0], abs=1e-6)   # 2 px per step
    i = metrics.deletion_insertion(model, x, W4[None, None], 0, "insertion", n_steps=2)
    assert float(i["curve"][0, -1]) == pytest.approx(1.0, abs=1e-6)      # all of x inserted
    assert 0 < float(i["curve"][0, 0]) < 1                                # from the blurred x


def test_rise_auc_and_blur():
    assert metrics.rise_auc(torch.full((3, 11), 0.7)).tolist() == pytest.approx([0.7] * 3)
    assert float(metrics.rise_auc(torch.linspace(0, 1, 101))) == pytest.approx(0.5)
    x = torch.ones(1, 3, 32, 32)
    b = metrics.gaussian_blur(x)
    assert torch.allclose(b[..., 10:22, 10:22], torch.ones(1, 3, 12, 12), atol=1e-6)


# ----------------------------------------------------------------- randomisation check ----
def test_spearman_and_ssim():
    a = torch.rand(2, 1, 16, 16)
    assert torch.allclose(metrics.spearman(a, a), torch.ones(2))
    assert torch.allclose(metrics.spearman(a, -a), -torch.ones(2))
    assert torch.allclose(metrics.spearman(a, 3 * a ** 3 + 1), torch.ones(2))  # monotone
    assert torch.allclose(metrics.ssim(a, a), torch.ones(2), atol=1e-6)
    assert float(metrics.ssim(a, torch.rand(2, 1, 16, 16)).mean()) < 0.5


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).eval()


def test_model_randomization_cascade_leaves_model_alone():
    model = _cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 16, 16)
    res = metrics.model_randomization(model, Gradient, x, n_stages=None)
    assert [r["layer"] for r in res] == ["", "6", "2", "0"]          # top-down
    assert res[0]["spearman"] == 1.0 and res[0]["n_randomized"] == 0
    assert res[-1]["spearman"] < 0.9 and res[-1]["ssim"] < 0.9
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


# ------------------------------------------------------------------------------ Quantus ----
def test_explain_func_numpy_in_numpy_out():
    from tsgb_ext import TSGB
    from tsgb_ext.evaluation.quantus import explain_func

    model = _cnn()
    x = np.random.RandomState(0).randn(3, 3, 16, 16).astype(np.float32)
    y = np.array([0, 4, 2])
    a = explain_func(model=model, inputs=x, targets=y, softmax=False, device="cpu")
    assert isinstance(a, np.ndarray) and a.shape == (3, 1, 16, 16) and a.dtype == np.float32
    ref = TSGB(model).attribute(torch.from_numpy(x), torch.from_numpy(y)).numpy()
    np.testing.assert_allclose(a, ref, rtol=1e-5, atol=1e-7)
    b = explain_func(model, x.transpose(0, 2, 3, 1), y)          # channel-last input
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)
    g = explain_func(model, x, 1, method="gradcam")
    assert g.shape == (3, 1, 16, 16) and (g >= 0).all()
