"""tsgb_ext.evaluation.baselines: each baseline against a direct autograd computation (toy CNN, float64)."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tsgb_ext.evaluation.baselines import GradCAM, Gradient, GradientXInput, GuidedBackprop, make_method


def _cnn(act=nn.ReLU):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), act(), nn.Conv2d(6, 8, 3, padding=1),
                         act(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1), act(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).double().eval()


def _grad(model, x, t):
    x = x.clone().requires_grad_(True)
    out = model(x)
    (g,) = torch.autograd.grad(out[torch.arange(len(t)), t].sum(), x)
    return g


def _no_hooks(model):
    return all(not m._forward_hooks and not m._backward_hooks and not m._forward_pre_hooks
               for m in model.modules())


X = torch.randn(3, 3, 12, 12, dtype=torch.float64)
T = torch.tensor([1, 4, 0])


def test_gradient_equals_autograd():
    model = _cnn()
    g = _grad(model, X, T)
    assert torch.allclose(Gradient(model, reduce="sum").attribute(X, T), g.sum(1, keepdim=True))
    assert torch.allclose(Gradient(model).attribute(X, T), g.abs().amax(1, keepdim=True))
    assert torch.allclose(GradientXInput(model).attribute(X, T), (g * X).sum(1, keepdim=True))
    assert not X.requires_grad and _no_hooks(model)


def test_multi_target_equals_separate_calls_and_default_top1():
    model = _cnn()
    tt = torch.tensor([[1, 2], [3, 4], [0, 0]])
    m = GradientXInput(model).attribute(X, tt)
    assert m.shape == (3, 2, 12, 12)
    for j in range(2):
        assert torch.allclose(m[:, j:j + 1], GradientXInput(model).attribute(X, tt[:, j]))
    top1 = model(X).argmax(1)
    assert torch.allclose(Gradient(model).attribute(X), Gradient(model).attribute(X, top1))
    with pytest.raises(IndexError):
        Gradient(model).attribute(X, 5)


class _GuidedReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp_min(0)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g.clamp_min(0) * (x > 0).to(g)


class _GuidedMod(nn.Module):
    def forward(self, x):
        return _GuidedReLU.apply(x)


def test_guided_backprop_matches_reference_and_restores_hooks():
    model = _cnn()
    ref_model = copy.deepcopy(model)
    for i, m in enumerate(ref_model):
        if isinstance(m, nn.ReLU):
            ref_model[i] = _GuidedMod()
    ref = _grad(ref_model, X, T)
    out = GuidedBackprop(model, reduce="sum").attribute(X, T)
    assert torch.allclose(out, ref.sum(1, keepdim=True))
    assert torch.allclose(GuidedBackprop(model).attribute(X, T), ref.abs().amax(1, keepdim=True))
    assert _no_hooks(model)
    # the model's ordinary gradient is back
    assert torch.allclose(Gradient(model, reduce="sum").attribute(X, T),
                          _grad(model, X, T).sum(1, keepdim=True))
    # hooks are removed when the call fails, too
    with pytest.raises(IndexError):
        GuidedBackprop(model).attribute(X, 7)
    assert _no_hooks(model)


def test_guided_backprop_relu6_and_no_relu_error():
    model = _cnn(nn.ReLU6)
    gb = GuidedBackprop(model, reduce="sum").attribute(X, T)
    assert gb.shape == (3, 1, 12, 12) and torch.isfinite(gb).all()
    lin = nn.Sequential(nn.Flatten(), nn.Linear(3 * 12 * 12, 4)).double()
    with pytest.raises(ValueError, match="ReLU"):
        GuidedBackprop(lin).attribute(X, 0)


def test_gradcam_matches_manual_and_is_nonnegative():
    model = _cnn()
    cam = GradCAM(model).attribute(X, T)
    assert cam.shape == (3, 1, 12, 12) and (cam >= 0).all() and cam.sum() > 0
    assert _no_hooks(model)
    # default layer: the last ReLU (index 6, 6x6 maps); manual Grad-CAM there
    feats = model[:7](X).detach().requires_grad_(True)
    out = model[7:](feats)
    (g,) = torch.autograd.grad(out[torch.arange(3), T].sum(), feats)
    manual = F.relu((g.mean((2, 3), keepdim=True) * feats).sum(1, keepdim=True))
    manual = F.interpolate(manual, size=(12, 12), mode="bilinear", align_corners=False)
    assert torch.allclose(cam, manual)
    assert torch.allclose(GradCAM(model, layer="6").attribute(X, T), manual)


def test_make_method_names():
    model = _cnn()
    for name in ("tsgb", "gradient", "gradxinput", "guided", "gradcam"):
        m = make_method(name, model).attribute(X.float().double(), T)
        assert m.shape == (3, 1, 12, 12), name
    with pytest.raises(ValueError):
        make_method("lime", model)
