"""tsgb_ext.evaluation.baselines: each baseline against a direct autograd computation (toy CNN, float64)."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tsgb_ext.evaluation.baselines import (MINMAX_EPS, GradCAM, Gradient, GradientXInput,
                                           GuidedBackprop, make_method)


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


# ---- Grad-CAM against Captum's LayerGradCam (torchvision VGG11, random weights, 128 px) -------
def test_gradcam_default_layer_is_the_last_conv_block_and_matches_captum():
    tvm = pytest.importorskip("torchvision.models")
    captum_attr = pytest.importorskip("captum.attr")
    torch.manual_seed(0)
    model = tvm.vgg11(num_classes=10).eval()
    x = torch.randn(2, 3, 128, 128)
    t = torch.tensor([3, 7])
    size = tuple(x.shape[-2:])
    # Captum's defaults: no ReLU (relu_attributions=False), the layer's 4x4 resolution
    raw = captum_attr.LayerGradCam(model, model.features).attribute(x, target=t)
    assert raw.shape == (2, 1, 4, 4) and (raw < 0).any() and (raw > 0).any()
    interp = captum_attr.LayerAttribution.interpolate
    def close(a, b):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * b.abs().max().item())

    cam = GradCAM(model)
    got = cam.attribute(x, t)
    # VGG's features (4x4 at 128 px), not its AdaptiveAvgPool2d(7) that resamples them to 7x7
    assert cam.layer is model.features
    want = interp(F.relu(raw), size, "bilinear")  # relu_attributions=True is F.relu
    assert got.shape == (2, 1, 128, 128)
    close(got, want)
    # the layer matters at this size: avgpool's Grad-CAM is another map
    at_pool = GradCAM(model, layer="avgpool").attribute(x, t)
    assert ((at_pool - want).norm() / want.norm()).item() > 0.1
    # Captum's conventions: raw, and its interpolate's default (nearest) mode
    close(GradCAM(model, relu=False, upsample=None).attribute(x, t), raw)
    close(GradCAM(model, relu=False, upsample="nearest").attribute(x, t), interp(raw, size))

    # pytorch-grad-cam (written out here, it is not a dependency): relu, per image
    # (img - min) / (1e-7 + max), bilinear resize (cv2.resize), then that scaling again
    def scale(c):
        c = c - c.flatten(1).amin(1).view(-1, 1, 1, 1)
        return c / (MINMAX_EPS + c.flatten(1).amax(1).view(-1, 1, 1, 1))
    up = F.interpolate(F.relu(raw), size=size, mode="bilinear", align_corners=False)
    pgc = scale(F.interpolate(scale(F.relu(raw)), size=size, mode="bilinear", align_corners=False))
    mm = GradCAM(model, normalize="minmax").attribute(x, t)
    assert mm.amin() == 0 and mm.amax() <= 1
    # the two pipelines differ only in where the stabiliser enters: by at most eps / range
    # (a sample whose map is 0 everywhere stays 0 in both)
    rng = up.flatten(1).amax(1) - up.flatten(1).amin(1)
    assert (rng > 0).any()
    tol = 2 * MINMAX_EPS / rng[rng > 0].min().item() + 1e-6
    torch.testing.assert_close(mm, pgc, rtol=0, atol=tol)
    assert _no_hooks(model)


def test_gradcam_default_layer_on_resnet_and_options_checked():
    tvm = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    model = tvm.resnet18(num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    cam = GradCAM(model)
    assert cam(x, 2).shape == (1, 1, 64, 64)  # calling the object resolves the layer as well
    assert cam.layer is model.layer4
    with pytest.raises(ValueError, match="upsample"):
        GradCAM(model, upsample="area")
    with pytest.raises(ValueError, match="normalize"):
        GradCAM(model, normalize="sum")
    with pytest.raises(TypeError, match="relu"):
        GradCAM(model, relu=1)
