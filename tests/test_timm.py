"""timm models and layers, safetensors weights in the CLI, the Captum drop-in (issue 13).

The oracle is tests/reference.py (float64, its own TorchFunctionMode catching every conv2d /
batch_norm / avg_pool2d call inside Conv2d / BatchNorm2d / AvgPool2d forwards, so it knows
timm's BatchNormAct2d, AvgPool2dSame, Conv2dSame, StdConv2d, ScaledStdConv2d as the spec's
layers). Random weights, random BN statistics, float64, both backends, relative L2 <= 1e-9.

Every model of the issue runs (under a minute on two CPU cores, one intra-op thread).
"""
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

timm = pytest.importorskip("timm")

import reference as ref  # noqa: E402
from conftest import assert_same, backends, snapshot  # noqa: E402
from timm.layers import (AvgPool2dSame, BatchNormAct2d, Conv2dSame, CondConv2d,  # noqa: E402
                         MixedConv2d, ScaledStdConv2d, StdConv2d)
from timm.layers import Linear as TimmLinear  # noqa: E402

import tsgb_ext  # noqa: E402

TOL = 1e-9

# (name, input size): every model of issue 13, and the timm layer classes each one covers
MODELS = [
    ("efficientnet_b0", 48),        # BatchNormAct2d (SiLU), squeeze-excitation
    ("mobilenetv3_large_100", 64),  # hard-swish, conv_head after pooling (not degenerate)
    ("regnety_008", 64),
    ("densenet121", 64),            # AvgPool2d transitions, BatchNormAct2d before convs
    ("mixnet_s", 64),               # MixedConv2d
    ("tf_efficientnet_b0", 64),     # Conv2dSame (dynamic "same" padding), BN eps 1e-3
    ("tf_mobilenetv3_small_100", 64),
    ("rexnet_100", 64),
    ("cspdarknet53", 64),
    ("cspresnet50", 64),
    ("inception_v3", 107),          # (at 75 its last map is 1x1 and the map nearly cancels)
    ("nf_resnet26", 48),            # ScaledStdConv2d
]
# exact map zero: a single-position conv hands on the classifier's zero-sum relevance
DEGENERATE = [("vgg11_bn", 32, "pre_logits.fc2"), ("ghostnet_100", 32, "conv_head"),
              ("tf_mobilenetv3_small_minimal_100", 32, "conv_head"),
              # LayerNorm after the stem conv: zero-sum relevance at every position
              ("convnext_atto", 64, "stem.0")]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small float64 inputs gain nothing from intra-op threads, and on a busy 2-core machine
    (other jobs running) OpenMP's spinning threads made these tests up to 100x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def randomise(model, seed=0):
    """Random BN statistics and affine parameters (fresh BNs are nearly the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
                    m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                    m.bias.copy_(torch.rand(n, generator=g) - 0.5)
    return model


def build(name, seed=0):
    torch.manual_seed(seed)
    return randomise(timm.create_model(name, pretrained=False, num_classes=10), seed).double().eval()


def tsgb_warnings(record):
    return [str(w.message) for w in record if "tsgb_ext" in str(w.message)]


_CACHE = {}
TARGETS = torch.tensor([[1, 3]])  # two classes of one image, from one forward pass


def model_and_reference(name, size):
    if name not in _CACHE:
        model = build(name)
        x = torch.randn(1, 3, size, size, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(1))
        _CACHE.clear()  # one model at a time in memory
        _CACHE[name] = (model, x, ref.reference_saliency(model, x, TARGETS))
    return _CACHE[name]


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("name,size", MODELS, ids=[m[0] for m in MODELS])
def test_timm_model_matches_reference(name, size, backend):
    model, x, want = model_and_reference(name, size)
    before = snapshot(model)
    with torch.no_grad():
        out = model(x)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        got = tsgb_ext.TSGB(model, backend=backend).attribute(x, TARGETS)
    assert tsgb_warnings(rec) == []
    assert got.shape == want.shape == (1, 2) + x.shape[2:]
    assert want.norm() > 1e-8  # a real map, not a degenerate one
    assert rel(got, want) <= TOL
    assert_same(before, snapshot(model))
    with torch.no_grad():
        assert torch.equal(model(x), out)


@pytest.mark.parametrize("name,size,layer", DEGENERATE, ids=[d[0] for d in DEGENERATE])
def test_degenerate_timm_model_is_detected(name, size, layer):
    """The exact map is zero; both the reference and ours are rounding noise. The first call
    for a model (and input shape) warns once per conv where the relevance collapses; later
    calls and explainers of the same model do not check or warn again, and report() marks
    the conv."""
    model = build(name)
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    want = ref.reference_saliency(model, x, [1, 3])
    names = [b if isinstance(b, str) else b.values[0] for b in backends()]
    names = [b for b in names if b == "hooks" or tsgb_ext.native_available()]
    for i, backend in enumerate(names):
        ex = tsgb_ext.TSGB(model, backend=backend)
        if i == 0:
            with pytest.warns(UserWarning, match="zero up to rounding") as rec:
                got = ex.attribute(x, [1, 3])
            msgs = [str(w.message) for w in rec if "zero up to rounding" in str(w.message)]
            assert len([m for m in msgs if f"through {layer} (" in m]) == 1
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # checked once per model and input shape
                got = ex.attribute(x, [1, 3])
        assert float(got.abs().max()) < 1e-12 and float(want.abs().max()) < 1e-12
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ex.attribute(x, [1, 3])
        row = [r for r in ex.report() if r[0] == layer][0]
        assert row[2] == "conv" and "DEGENERATE" in row[3]


# ---- hand-made models from timm's layer classes ------------------------------------------------
class TimmLayersNet(nn.Module):
    def __init__(self, running_stats=True):
        super().__init__()
        self.stem = Conv2dSame(3, 8, 3, stride=2)
        self.bn1 = BatchNormAct2d(8, act_layer=nn.SiLU, drop_layer=nn.Dropout)
        self.std = StdConv2d(8, 8, 3, padding=1, groups=2)
        self.bn2 = BatchNormAct2d(8, eps=1e-3, act_layer=nn.ReLU,
                                  track_running_stats=running_stats)
        self.mixed = MixedConv2d(8, 12, [3, 5], stride=1, padding="", dilation=1)
        self.bn3 = BatchNormAct2d(12, apply_act=False)
        self.pool = AvgPool2dSame(3, stride=2)
        self.sstd = ScaledStdConv2d(12, 12, 3, padding=1, groups=3)
        self.cond = CondConv2d(12, 12, 3, padding=1)  # not an nn.Conv2d: ordinary gradient
        self.head = TimmLinear(12, 6)

    def forward(self, x):
        x = self.bn1(self.stem(x))
        x = self.bn2(self.std(x)) + x
        x = self.pool(self.bn3(self.mixed(x)))
        x = F.hardswish(self.sstd(x))
        x = self.cond(x, torch.ones(x.shape[0], self.cond.num_experts, dtype=x.dtype) / 4)
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def tiny(running_stats=True, seed=0):
    torch.manual_seed(seed)
    return randomise(TimmLayersNet(running_stats), seed).double().eval()


@pytest.mark.parametrize("running_stats", [True, False])
@pytest.mark.parametrize("backend", backends())
def test_timm_layers_get_their_rules(backend, running_stats):
    model = tiny(running_stats)
    x = torch.randn(3, 3, 15, 17, dtype=torch.float64)
    want = ref.reference_saliency(model, x, [0, 4, 5])
    before = snapshot(model)
    with torch.no_grad():
        out = model(x)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        got = tsgb_ext.TSGB(model, backend=backend).attribute(x, [0, 4, 5])
    assert tsgb_warnings(rec) == []
    assert rel(got, want) <= TOL
    assert_same(before, snapshot(model))
    with torch.no_grad():
        assert torch.equal(model(x), out)
    # the rules really act: a plain gradient x input differs
    xg = x.clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(model(xg)[:, 4].sum(), xg)
    assert rel((gx * x).sum(1, keepdim=True)[1], got[1]) > 1e-3


@pytest.mark.parametrize("backend", backends())
def test_timm_layers_with_block_and_named_classifier(backend):
    """timm's Linear (a subclass with its own forward) as the classifier: found by the first
    call of a with-block and then fixed, or named up front."""
    model = tiny()
    x = torch.randn(2, 3, 15, 17, dtype=torch.float64)
    want = ref.reference_saliency(model, x, [0, 4])
    before = snapshot(model)
    with tsgb_ext.TSGB(model, backend=backend) as ex:
        assert rel(ex.attribute(x, [0, 4]), want) <= TOL
        assert rel(ex.attribute(x, [0, 4]), want) <= TOL  # classifier fixed now
    assert rel(tsgb_ext.TSGB(model, backend=backend, classifier="head").attribute(x, [0, 4]),
               want) <= TOL
    assert_same(before, snapshot(model))


def test_each_timm_layer_rule_is_needed():
    """Skipping any one of the subclass rules (what the conversion did before) moves the map
    far from the reference: BatchNormAct2d, AvgPool2dSame, StdConv2d, ScaledStdConv2d."""
    from tsgb_ext.convert import conversion as _convert
    model = tiny()
    x = torch.randn(2, 3, 15, 17, dtype=torch.float64)
    want = ref.reference_saliency(model, x, [0, 4])
    for skipped in (BatchNormAct2d, AvgPool2dSame, StdConv2d, ScaledStdConv2d):
        orig = _convert.Conversion._patch_own

        def patch_own(self, m, kind, _orig=orig, _skipped=skipped):
            if type(m) is _skipped:
                return lambda: None
            return _orig(self, m, kind)
        _convert.Conversion._patch_own = patch_own
        try:
            got = tsgb_ext.TSGB(model, backend="hooks").attribute(x, [0, 4])
        finally:
            _convert.Conversion._patch_own = orig
        assert rel(got, want) > 1e-3, skipped.__name__


def test_report_lists_the_rules():
    model = tiny()
    x = torch.randn(1, 3, 15, 17, dtype=torch.float64)
    ex = tsgb_ext.TSGB(model, backend="hooks")
    static = {r[0]: r for r in ex.report()}
    assert static["head"][2] == "gradient" and "not known" in static["head"][3]
    rows = {r[0]: r for r in ex.report(x)}
    rule = {k: r[2] for k, r in rows.items()}
    assert rule["stem"] == rule["std"] == rule["sstd"] == "conv"
    assert rule["mixed.0"] == rule["mixed.1"] == "conv"
    assert rule["bn1"] == rule["bn2"] == rule["bn3"] == "batchnorm"
    assert rule["pool"] == "avgpool" and rule["head"] == "classifier"
    assert rule["cond"] == "gradient" and "not an nn.Conv2d" in rows["cond"][3]
    assert "1 conv2d call" in rows["std"][3] and "1 batch_norm call" in rows["bn1"][3]
    assert "ordinary gradients" in rows["bn1"][3]  # its drop and act
    text = str(ex.report())
    assert "BatchNormAct2d" in text and "AvgPool2dSame" in text
    assert ex.report().by_rule("avgpool") == ["pool"]


# ---- subclasses that cannot be handled are named, never skipped silently -----------------------
class ManualBN(nn.BatchNorm2d):
    """Computes its BN by hand: no batch_norm call for the rule to take."""

    def forward(self, x):
        v = lambda t: t.view(1, -1, 1, 1)  # noqa: E731
        return (x - v(self.running_mean)) / torch.sqrt(v(self.running_var) + self.eps) * \
            v(self.weight) + v(self.bias)


class ScaledConv(nn.Conv2d):
    def forward(self, x):
        return 2 * F.conv2d(x, self.weight, self.bias, self.stride, self.padding)


class BoxPool(nn.AvgPool2d):
    """An AvgPool2d subclass that averages with a conv: no avg_pool2d call."""

    def forward(self, x):
        c = x.shape[1]
        w = torch.full((c, 1, 2, 2), 0.25, dtype=x.dtype)
        return F.conv2d(x, w, stride=2, groups=c)


class Odd(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = ScaledConv(3, 6, 3, padding=1)
        self.bn = ManualBN(6)
        self.pool = BoxPool(2)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        x = self.pool(F.relu(self.bn(self.conv(x))))
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("backend", backends())
def test_unhandled_subclasses_are_named_in_warnings(backend):
    model = randomise(Odd()).double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    want = ref.reference_saliency(model, x, 1)
    ex = tsgb_ext.TSGB(model, backend=backend)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        got = ex.attribute(x, 1)
    msgs = tsgb_warnings(rec)
    assert any("bn (ManualBN)" in m and "batch_norm" in m for m in msgs)
    assert any("pool (BoxPool)" in m and "avg_pool2d" in m for m in msgs)
    assert any("conv (ScaledConv)" in m and "other than the result" in m for m in msgs)
    assert len(msgs) == 3
    assert rel(got, want) <= TOL  # the reference treats them the same way
    rows = {r[0]: r for r in ex.report()}
    assert rows["bn"][2] == "gradient" and rows["pool"][2] == "gradient"
    assert rows["conv"][2] == "conv"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per explainer and layer
        ex.attribute(x, 1)


class SingleConvHead(nn.Module):
    """conv -> BN -> ReLU -> global pool -> 1x1 conv (one output position) -> ReLU -> Linear:
    the 1x1 conv receives the classifier's zero-sum relevance whole. With ``se``: a
    squeeze-excitation (single-position convs that are not degenerate) and a 3x3 head conv
    before the pooling instead."""

    def __init__(self, se=False):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.se = nn.Sequential(nn.Conv2d(8, 4, 1), nn.ReLU(), nn.Conv2d(4, 8, 1)) if se else None
        self.head_conv = nn.Conv2d(8, 16, 3, padding=1) if se else nn.Conv2d(8, 16, 1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        if self.se is None:
            x = F.relu(self.head_conv(F.adaptive_avg_pool2d(x, 1)))
        else:
            x = x * torch.sigmoid(self.se(F.adaptive_avg_pool2d(x, 1)))
            x = F.adaptive_avg_pool2d(F.relu(self.head_conv(x)), 1)
        return self.fc(torch.flatten(x, 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", backends())
def test_degenerate_map_warns_once_naming_the_layer(backend, dtype):
    torch.manual_seed(0)
    model = randomise(SingleConvHead()).to(dtype).eval()
    x = torch.randn(2, 3, 8, 8, dtype=dtype)
    ex = tsgb_ext.TSGB(model, backend=backend)
    with pytest.warns(UserWarning, match="head_conv .*single output position"):
        ex.attribute(x, 2)


@pytest.mark.parametrize("backend", backends())
def test_squeeze_excitation_is_not_degenerate(backend):
    torch.manual_seed(0)
    model = randomise(SingleConvHead(se=True)).double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        got = tsgb_ext.TSGB(model, backend=backend).attribute(x, 2)
    assert tsgb_warnings(rec) == []
    assert rel(got, ref.reference_saliency(model, x, 2)) <= TOL


# ---- CLI: timm model, safetensors / .pth weights, the model's own preprocessing ------------------
@pytest.fixture(scope="module")
def timm_weights(tmp_path_factory):
    safetensors = pytest.importorskip("safetensors.torch")
    root = tmp_path_factory.mktemp("timm")
    torch.manual_seed(0)
    model = randomise(timm.create_model("mobilenetv3_small_050", num_classes=5)).eval()
    safetensors.save_file(model.state_dict(), str(root / "w.safetensors"))
    torch.save({"state_dict": model.state_dict()}, str(root / "w.pth"))
    from PIL import Image
    rng = torch.Generator().manual_seed(3)
    (root / "imgs").mkdir()
    for i, (h, w) in enumerate([(50, 70), (64, 48)]):
        arr = (torch.rand(h, w, 3, generator=rng) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(root / "imgs" / f"im{i}.png")
    return root, model


def test_load_model_timm_safetensors_and_pth(timm_weights):
    from tsgb_ext.data import models
    root, model = timm_weights
    x = torch.randn(1, 3, 64, 64)
    for f in ("w.safetensors", "w.pth"):
        lm = models.load_model("timm:mobilenetv3_small_050", str(root / f))
        assert lm.model.num_classes == 5
        assert (lm.size, lm.interpolation, lm.crop_pct) == ((224, 224), "bicubic", 0.875)
        assert lm.mean == (0.485, 0.456, 0.406)
        with torch.no_grad():
            assert torch.equal(lm.model(x), model(x))
    with pytest.raises(models.ModelSpecError, match="needs --weights"):
        models.load_model("timm:mobilenetv3_small_050")
    with pytest.raises(models.ModelSpecError, match="no architecture"):
        models.load_model("timm:no_such_net", str(root / "w.pth"))
    with pytest.raises(models.ModelSpecError, match="do not fit"):
        models.load_model("timm:efficientnet_b0", str(root / "w.safetensors"))
    (root / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(models.ModelSpecError, match="safetensors"):
        models.load_model("timm:mobilenetv3_small_050", str(root / "bad.safetensors"))


def test_cli_explain_timm_model_with_safetensors(timm_weights, tmp_path):
    import csv
    import json

    import numpy as np

    from tsgb_ext import cli
    from tsgb_ext.data import models, pipeline
    root, model = timm_weights
    out = tmp_path / "out"
    rc = cli.main(["explain", str(root / "imgs"), "--out", str(out), "--model",
                   "timm:mobilenetv3_small_050", "--weights", str(root / "w.safetensors"),
                   "--size", "64", "--top-k", "2", "--workers", "0", "--no-progress",
                   "--device", "cpu", "--backend", "hooks"])
    assert rc == 0
    with open(out / "index.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4
    # the map of the first image, from the model's own preprocessing (central 87.5% crop,
    # bicubic resize, ImageNet mean/std)
    r = [r for r in rows if r["image"].endswith("im0.png") and r["rank"] == "1"][0]
    got = np.load(out / r["shard"])[int(r["row"])].astype(np.float32) * float(r["scale"])
    np.testing.assert_array_equal(tsgb_ext.open_maps(out).get(r["image"], int(r["target"])), got)
    # run.json records that preprocessing
    pre = json.loads((out / "run.json").read_text())["preprocessing"]
    assert (pre["size"], pre["crop_pct"], pre["interpolation"], pre["resize_mode"]) == \
        ([64, 64], 0.875, "bicubic", "center")
    assert pre["mean"] == list(models.IMAGENET_MEAN) and pre["std"] == list(models.IMAGENET_STD)
    rgb = pipeline.open_rgb(str(root / "imgs" / "im0.png"), (64, 64), crop_pct=0.875,
                            interpolation="bicubic")[None]
    mean = torch.tensor(models.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(models.IMAGENET_STD).view(1, 3, 1, 1)
    want = tsgb_ext.TSGB(model, backend="hooks").attribute((rgb - mean) / std,
                                                           int(r["target"]))[0, 0]
    assert np.abs(got - want.numpy()).max() <= 1e-3 * np.abs(want.numpy()).max() + 1e-8
    plain = pipeline.open_rgb(str(root / "imgs" / "im0.png"), (64, 64))[None]
    assert not torch.allclose(plain, rgb)  # the crop and filter did change the input


# ---- Captum drop-in ------------------------------------------------------------------------------
captum_needed = pytest.mark.skipif(
    __import__("importlib").util.find_spec("captum") is None, reason="needs captum")


@captum_needed
@pytest.mark.parametrize("backend", backends())
def test_captum_attribute_is_relevance_per_element(backend):
    from tsgb_ext.evaluation.captum import TSGBAttribution as CaptumTSGB
    model = tiny()
    x = torch.randn(3, 3, 15, 17, dtype=torch.float64)
    before = snapshot(model)
    ct = CaptumTSGB(model, backend=backend)
    maps = tsgb_ext.TSGB(model, backend=backend).attribute(x, [0, 4, 5])
    for target in ([0, 4, 5], torch.tensor([0, 4, 5])):
        a = ct.attribute(x, target=target)
        assert a.shape == x.shape and a.dtype == x.dtype
        torch.testing.assert_close(a.sum(1, keepdim=True), maps, rtol=1e-12, atol=1e-15)
    (a,) = ct.attribute((x,), target=4)
    torch.testing.assert_close(a.sum(1, keepdim=True),
                               tsgb_ext.TSGB(model, backend=backend).attribute(x, 4))
    top1 = ct.attribute(x)
    torch.testing.assert_close(top1.sum(1, keepdim=True),
                               tsgb_ext.TSGB(model, backend=backend).attribute(x))
    assert ct.multiplies_by_inputs and not ct.has_convergence_delta()
    with pytest.raises(ValueError, match="one class per example"):
        ct.attribute(x, target=[1, 2])
    assert_same(before, snapshot(model))


class TwoArgs(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 3)

    def forward(self, x, scale):
        return self.fc(F.relu(self.conv(x * scale)).mean((2, 3)))


@captum_needed
def test_captum_additional_forward_args():
    from tsgb_ext.evaluation.captum import TSGBAttribution as CaptumTSGB
    model = TwoArgs().double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    a = CaptumTSGB(model, backend="hooks").attribute(x, target=1, additional_forward_args=2.0)

    class Bound(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m(x, 2.0)
    want = tsgb_ext.TSGB(Bound(model), backend="hooks").attribute(x, 1)
    torch.testing.assert_close(a.sum(1, keepdim=True), want)


@captum_needed
def test_captum_metrics_noise_tunnel_and_visualization():
    import numpy as np
    from captum.attr import NoiseTunnel
    from captum.attr import visualization as viz
    from captum.metrics import infidelity, sensitivity_max

    from tsgb_ext.evaluation.captum import TSGBAttribution as CaptumTSGB
    model = tiny().float()
    x = torch.randn(2, 3, 15, 17)
    ct = CaptumTSGB(model)
    a = ct.attribute(x, target=[1, 2])
    sens = sensitivity_max(ct.attribute, x, target=[1, 2], n_perturb_samples=3)
    assert sens.shape == (2,) and bool(torch.isfinite(sens).all())

    def perturb(inputs):
        noise = torch.randn_like(inputs) * 0.01
        return noise, inputs - noise
    infid = infidelity(model, perturb, x, a, target=[1, 2], n_perturb_samples=4)
    assert infid.shape == (2,) and bool(torch.isfinite(infid).all())
    nt = NoiseTunnel(ct).attribute(x, nt_samples=3, nt_type="smoothgrad", target=[1, 2])
    assert nt.shape == x.shape and bool(torch.isfinite(nt).all())
    fig, _ = viz.visualize_image_attr(a[0].permute(1, 2, 0).numpy(),
                                      np.clip(x[0].permute(1, 2, 0).numpy(), 0, 1),
                                      method="blended_heat_map", sign="all", use_pyplot=False)
    assert fig is not None
