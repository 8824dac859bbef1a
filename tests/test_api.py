"""The explainer API: targets, bad input, degenerate input, and the restore guarantees."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torchvision.models as tvm

import tsgb_ext
from conftest import native_skip_mark, assert_same, backends, snapshot  # noqa: F401


def small_net(classes=5):
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(inplace=True),
        nn.AvgPool2d(2), nn.Conv2d(6, 8, 3, padding=1, groups=2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, classes))


def resnet():
    torch.manual_seed(0)
    m = tvm.resnet18(num_classes=7)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.normal_(0, 0.1)
            mod.running_var.uniform_(0.5, 1.5)
    return m.eval()


# ---- targets ------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", backends())
def test_target_forms(backend):
    model = resnet()
    x = torch.randn(3, 3, 40, 40)
    ex = tsgb_ext.TSGB(model, backend=backend)
    top1 = model(x).argmax(1)
    by_none = ex.attribute(x)
    assert by_none.shape == (3, 1, 40, 40) and by_none.dtype == x.dtype
    torch.testing.assert_close(by_none, ex.attribute(x, top1))
    torch.testing.assert_close(ex.attribute(x, top1.tolist()), ex.attribute(x, top1))
    same = ex.attribute(x, 4)
    torch.testing.assert_close(same, ex.attribute(x, [4, 4, 4]))
    multi = ex.attribute(x, torch.tensor([[4, 1], [4, 2], [4, 6]]))
    assert multi.shape == (3, 2, 40, 40)
    torch.testing.assert_close(multi[:, :1], same)
    # samples never interact
    torch.testing.assert_close(ex.attribute(x[1:2], 4), same[1:2], rtol=1e-5, atol=1e-9)


def test_native_backend_unavailable_error(monkeypatch):
    from tsgb_ext.ops import loader
    monkeypatch.setattr(loader, "_loaded", False)
    monkeypatch.setattr(loader, "_load_error", "tsgb_ext._C is not built (test)")
    assert not tsgb_ext.native_available()
    with pytest.raises(RuntimeError, match="native.*not available"):
        tsgb_ext.TSGB(small_net(), backend="native")


def test_auto_falls_back_with_one_warning(monkeypatch):
    from tsgb_ext.core import backend
    from tsgb_ext.ops import loader
    monkeypatch.setattr(loader, "_loaded", False)
    monkeypatch.setattr(backend, "_warned_fallback", False)
    ex = tsgb_ext.TSGB(small_net(), backend="auto")
    x = torch.randn(1, 3, 8, 8)
    with pytest.warns(RuntimeWarning, match="hooks"):
        ex.attribute(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ex.attribute(x)
    assert ex.last_backend == "hooks"


@native_skip_mark()
def test_auto_picks_native_on_cpu():
    ex = tsgb_ext.TSGB(small_net(), backend="auto")
    ex.attribute(torch.randn(1, 3, 8, 8))
    assert ex.last_backend == "native"


# ---- bad input ----------------------------------------------------------------------------
@pytest.mark.parametrize("x,exc,match", [
    (torch.ones(1, 3, 8, 8, dtype=torch.long), TypeError, "x must be a floating"),
    (torch.ones(3, 8, 8), ValueError, r"x must be 4-D"),
    ([[1.0]], TypeError, "x must be a torch.Tensor"),
    (torch.full((1, 3, 8, 8), float("nan")), ValueError, "x must be finite"),
    (torch.full((1, 3, 8, 8), float("inf")), ValueError, "x must be finite"),
])
def test_bad_x(x, exc, match):
    model = small_net()
    before = snapshot(model)
    with pytest.raises(exc, match=match):
        tsgb_ext.TSGB(model, backend="hooks").attribute(x)
    assert_same(before, snapshot(model))


@pytest.mark.parametrize("target,exc,match", [
    (5, IndexError, r"target must be class indices in \[0, 5\)"),
    ([0, 9], IndexError, r"\[0, 5\)"),
    (-1, IndexError, "target must be class indices >= 0"),
    ([1, -2], IndexError, ">= 0"),
    (1.5, TypeError, "target must be"),
    ([0.5, 1.0], TypeError, "target must be"),
    (torch.tensor([0.0, 1.0]), TypeError, "integer tensor"),
    (True, TypeError, "bool"),
    ([1, 2, 3], ValueError, "target has 3 entries but x has 2 samples"),
    (torch.tensor([[1], [2], [3]]), ValueError, r"must be \(N, T\)"),
    (torch.zeros(2, 1, 1, dtype=torch.long), ValueError, "target must be an int, 1-D"),
    ("cat", TypeError, "target must be"),
])
def test_bad_target(target, exc, match):
    model = small_net()
    before = snapshot(model)
    with pytest.raises(exc, match=match):
        tsgb_ext.TSGB(model, backend="hooks").attribute(torch.randn(2, 3, 8, 8), target)
    assert_same(before, snapshot(model))


def test_bad_constructor_args():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        tsgb_ext.TSGB(lambda x: x)
    with pytest.raises(ValueError, match="backend must be one of"):
        tsgb_ext.TSGB(small_net(), backend="fast")
    with pytest.raises(ValueError, match="is not a module of the model"):
        tsgb_ext.TSGB(small_net(), classifier="head")
    with pytest.raises(TypeError, match="classifier must be an nn.Linear"):
        tsgb_ext.TSGB(small_net(), classifier="0")


def test_model_without_linear_says_how_to_name_one():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(ValueError, match="classifier="):
        tsgb_ext.TSGB(model)


def test_named_classifier_by_name_and_module():
    model = resnet()
    x = torch.randn(2, 3, 40, 40)
    a = tsgb_ext.TSGB(model, backend="hooks").attribute(x, 1)
    b = tsgb_ext.TSGB(model, backend="hooks", classifier="fc").attribute(x, 1)
    c = tsgb_ext.TSGB(model, backend="hooks", classifier=model.fc).attribute(x, 1)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)


def test_inference_mode_is_refused_no_grad_works():
    model = small_net()
    ex = tsgb_ext.TSGB(model, backend="hooks")
    x = torch.randn(1, 3, 8, 8)
    want = ex.attribute(x)
    with torch.no_grad():
        torch.testing.assert_close(ex.attribute(x), want)
    with torch.inference_mode():
        with pytest.raises(RuntimeError, match="inference_mode"):
            ex.attribute(x)
        xi = torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(ex.attribute(xi), ex.attribute(xi.clone()))  # inference tensor in


# ---- degenerate input ---------------------------------------------------------------------
@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("kind", ["zeros", "black_regions", "batch_of_one", "empty"])
def test_degenerate_input_is_finite(kind, backend):
    model = resnet()
    x = torch.randn(2, 3, 40, 40)
    if kind == "zeros":
        x = torch.zeros(2, 3, 40, 40)
    elif kind == "black_regions":
        x[:, :, :30] = 0
    elif kind == "batch_of_one":
        x = x[:1]
    elif kind == "empty":
        x = x[:0]
    sal = tsgb_ext.TSGB(model, backend=backend).attribute(x, 3)
    assert sal.shape == (x.shape[0], 1, 40, 40)
    assert torch.isfinite(sal).all()
    if kind == "zeros":
        assert (sal == 0).all()
    empty_multi = tsgb_ext.TSGB(model, backend=backend).attribute(x[:0], torch.zeros(0, 3, dtype=torch.long))
    assert empty_multi.shape == (0, 3, 40, 40)


@pytest.mark.parametrize("backend", backends())
def test_classifier_zero_negative_part_is_finite(backend):
    # non-negative features on non-negative weights: |zn| == 0 for every class
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3)).eval()
    with torch.no_grad():
        model[4].weight.abs_()
    sal = tsgb_ext.TSGB(model, backend=backend).attribute(torch.randn(2, 3, 9, 9), [0, 2])
    assert torch.isfinite(sal).all() and sal.abs().sum() > 0


# ---- restore guarantees -------------------------------------------------------------------
@pytest.mark.parametrize("backend", backends())
def test_model_restored_after_call_and_with_block(backend):
    model = resnet()
    model.layer1[0].register_forward_hook(lambda m, i, o: None)
    model.fc.register_full_backward_hook(lambda m, gi, go: None)
    model.train()
    model.layer2.eval()  # mixed training flags survive
    for p in model.layer3.parameters():
        p.requires_grad_(False)
    before = snapshot(model)
    x = torch.randn(2, 3, 40, 40)
    tsgb_ext.TSGB(model, backend=backend).attribute(x, [1, 2])
    assert_same(before, snapshot(model))
    with tsgb_ext.TSGB(model, backend=backend) as ex:
        a = ex.attribute(x, [1, 2])
        b = ex.attribute(x, [1, 2])
        torch.testing.assert_close(a, b)
        assert not model.training  # explained in eval mode
    assert_same(before, snapshot(model))
    assert model.training and not model.layer2.training


def test_training_model_explained_in_eval_mode_bn_stats_untouched():
    model = resnet()
    x = torch.randn(2, 3, 40, 40)
    want = tsgb_ext.TSGB(model, backend="hooks").attribute(x, 3)
    model.train()
    rm = model.bn1.running_mean.clone()
    nbt = model.bn1.num_batches_tracked.clone()
    got = tsgb_ext.TSGB(model, backend="hooks").attribute(x, 3)
    torch.testing.assert_close(got, want)
    assert model.training
    assert torch.equal(model.bn1.running_mean, rm) and torch.equal(model.bn1.num_batches_tracked, nbt)


def test_forward_that_raises_propagates_and_restores():
    class Boom(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = small_net()

        def forward(self, x):
            self.net(x)
            raise KeyError("boom in forward")

    model = Boom()
    before = snapshot(model)
    with pytest.raises(KeyError, match="boom in forward"):
        tsgb_ext.TSGB(model, backend="hooks").attribute(torch.randn(1, 3, 8, 8))
    assert_same(before, snapshot(model))
    ex = tsgb_ext.TSGB(model, backend="hooks")
    with pytest.raises(KeyError):
        with ex:
            ex.attribute(torch.randn(1, 3, 8, 8))
    assert_same(before, snapshot(model))


def test_parameters_receive_no_grad_and_user_input_untouched():
    model = resnet()
    for p in model.parameters():
        assert p.requires_grad
    x = torch.randn(1, 3, 40, 40, requires_grad=True)
    xc = x.detach().clone()
    tsgb_ext.TSGB(model, backend="hooks").attribute(x)
    assert all(p.grad is None for p in model.parameters())
    assert x.grad is None and torch.equal(x.detach(), xc)


def test_existing_instance_forward_is_restored():
    model = small_net()
    conv = model[0]
    custom = lambda inp: nn.Conv2d.forward(conv, inp)  # noqa: E731
    conv.forward = custom
    tsgb_ext.TSGB(model, backend="hooks").attribute(torch.randn(1, 3, 8, 8))
    assert conv.__dict__["forward"] is custom


def test_models_without_inplace_relu_are_equal():
    """In-place ReLU and `out += identity` give the same map as their out-of-place versions."""
    model = resnet()
    other = copy.deepcopy(model)
    for m in other.modules():
        if hasattr(m, "inplace"):
            m.inplace = False
    x = torch.randn(2, 3, 40, 40)
    torch.testing.assert_close(tsgb_ext.TSGB(model, backend="hooks").attribute(x, 2),
                               tsgb_ext.TSGB(other, backend="hooks").attribute(x, 2))


def test_with_block_is_not_reentrant():
    ex = tsgb_ext.TSGB(small_net(), backend="hooks")
    with ex:
        with pytest.raises(RuntimeError, match="already active"):
            ex.__enter__()


@pytest.mark.parametrize("backend", backends())
def test_explain_topk_from_one_forward_equals_attribute(backend):
    model = resnet()
    x = torch.randn(2, 3, 40, 40)
    calls = []
    model.register_forward_hook(lambda m, i, o: calls.append(1))
    with tsgb_ext.TSGB(model, backend=backend) as ex:
        maps, classes, logits = ex.explain(x, lambda lg: lg.topk(3).indices)
        assert len(calls) == 1  # one forward for all three targets
        assert maps.shape == (2, 3, 40, 40) and classes.shape == (2, 3)
        torch.testing.assert_close(classes, model(x).topk(3).indices)
        torch.testing.assert_close(maps, ex.attribute(x, classes))


# ---- arguments, autocast and hand-made backward passes (issue 19) ----------------------------
@pytest.mark.parametrize("name", ["allow_tf32", "fuse", "reuse_memory"])
def test_bool_arguments(name):
    np = pytest.importorskip("numpy")
    ex = tsgb_ext.TSGB(small_net(), **{name: np.True_})
    assert getattr(ex, name) is True
    assert getattr(tsgb_ext.TSGB(small_net(), **{name: np.False_}), name) is False
    for bad in ("no", 1, None, [True]):
        with pytest.raises(TypeError, match=f"{name} must be a bool"):
            tsgb_ext.TSGB(small_net(), **{name: bad})


@pytest.mark.parametrize("backend", backends())
def test_float64_model_under_autocast_stays_float64(backend):
    """torch.autocast never casts float64; neither do the rule ops: a float64 model explained
    with amp_dtype=bfloat16 gives its float64 map."""
    model = resnet().double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    want = tsgb_ext.TSGB(model, backend=backend).attribute(x, [1, 4])
    maps, _, logits = tsgb_ext.TSGB(model, backend=backend).explain(
        x, lambda lg: torch.tensor([[1], [4]]), amp_dtype=torch.bfloat16)
    assert maps.dtype == torch.float64 and logits.dtype == torch.float64
    assert float((maps - want).norm() / want.norm()) < 1e-10


class TwoLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = small_net(classes=9)
        self.head = nn.Linear(9, 4)

    def forward(self, x):
        return self.head(torch.relu(self.features(x)))


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("model_fn", [TwoLinears, resnet])
def test_backward_by_hand_in_a_with_block_is_tsgb(backend, model_fn):
    """Zennit-style use: inside the with-block, model(x) and torch.autograd.grad by hand, before
    and after any attribute() call, give TSGB's gradient (the classifier, the last Linear a
    forward runs, is decided at the end of each forward)."""
    torch.manual_seed(0)
    model = model_fn().eval().double()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    size = 64 if model_fn is resnet else 16  # resnet18's last stage: 2 x 2 positions
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    want = tsgb_ext.TSGB(model, backend=backend).attribute(x, 2)
    with tsgb_ext.TSGB(model, backend=backend) as ex:
        for _ in range(2):  # before the first attribute() call, then after it
            xi = x.clone().requires_grad_(True)
            out = model(xi)
            (gx,) = torch.autograd.grad(out[:, 2].sum(), xi)
            by_hand = (gx * x).sum(1, keepdim=True)
            assert float((by_hand - want).norm() / want.norm()) < 1e-10
            ex.attribute(x, 2)
