"""Single-pass saliency baselines with the call shape of :class:`tsgb_ext.TSGB`.

``Method(model).attribute(x, target)`` -> (N, 1, H, W) maps (or (N, T, H, W) for an (N, T)
integer ``target``), with the same ``target`` conventions as ``TSGB.attribute``: None (top-1),
an int, N class indices, or an (N, T) tensor (T backward passes share one forward pass).

* :class:`Gradient`: the gradient of the target score w.r.t. the input (Simonyan et al. 2014),
  reduced over colour channels by ``max_c |grad|`` (default) or ``sum_c grad``.
* :class:`GradientXInput`: ``sum_c grad * x`` (Shrikumar et al. 2016).
* :class:`GuidedBackprop`: the gradient where every ReLU / ReLU6 module also zeroes negative
  incoming gradients (Springenberg et al. 2015), reduced like :class:`Gradient`.
* :class:`GradCAM`: ``relu(sum_k mean_hw(dS/dA_k) * A_k)`` at the last conv block's output,
  bilinearly upsampled to the input (Selvaraju et al. 2017); the ReLU, the upsampling and a
  min-max scaling are options, to match Captum's ``LayerGradCam`` or pytorch-grad-cam.

All of them are pure PyTorch; hooks are removed and ``requires_grad`` of the input restored in
``finally`` blocks, so the model is left exactly as it was, also when a call fails.
"""
from __future__ import annotations

from typing import List, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.inputs import TargetLike, check_x, logits as model_logits, target_tensor

__all__ = ["Gradient", "GradientXInput", "GuidedBackprop", "GradCAM", "METHODS", "make_method"]


class _GradMethod:
    """Shared forward / per-target backward; subclasses turn (gx, x) into a map."""

    #: how (N, C, H, W) input gradients become one map per sample: "abs_max" or "sum"
    reduce = "abs_max"

    def __init__(self, model: nn.Module, reduce: Optional[str] = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if reduce is not None:
            if reduce not in ("abs_max", "sum"):
                raise ValueError(f"reduce must be 'abs_max' or 'sum', got {reduce!r}")
            self.reduce = reduce
        self.model = model

    # hooks installed around the forward / backward (guided backprop, Grad-CAM)
    def _install(self) -> List:
        return []

    def _map(self, gx: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.reduce == "sum":
            return gx.sum(1, keepdim=True)
        return gx.abs().amax(1, keepdim=True)

    def attribute(self, x: torch.Tensor, target: TargetLike = None) -> torch.Tensor:
        if torch.is_inference_mode_enabled():
            raise RuntimeError(f"{type(self).__name__}.attribute needs autograd; call it outside "
                               f"torch.inference_mode()")
        check_x(x)
        n = x.shape[0]
        tgt = target_tensor(target, n, x.device)
        if n == 0:
            t = tgt.shape[1] if tgt is not None else 1
            return x.new_zeros((0, t) + tuple(x.shape[2:]))
        xin = x.detach().clone().requires_grad_(True)
        handles = self._install()
        try:
            with torch.enable_grad():
                logits = model_logits(self.model(xin))
                k = logits.shape[1]
                if tgt is None:
                    tgt = logits.detach().argmax(1, keepdim=True)
                elif int(tgt.max()) >= k:
                    raise IndexError(f"target must be class indices in [0, {k}), got "
                                     f"{int(tgt.max())}")
                T = tgt.shape[1]
                maps = []
                for j in range(T):
                    g = torch.zeros_like(logits)
                    g.scatter_(1, tgt[:, j:j + 1], 1.0)
                    maps.append(self._one(logits, xin, g, retain=j < T - 1))
        finally:
            for h in handles:
                h.remove()
            self._cleanup()
        out = maps[0] if len(maps) == 1 else torch.cat(maps, 1)
        return out.to(x.dtype)

    __call__ = attribute

    def _one(self, logits, xin, g, retain) -> torch.Tensor:
        (gx,) = torch.autograd.grad(logits, xin, g, retain_graph=retain)
        with torch.no_grad():
            return self._map(gx, xin.detach())

    def _cleanup(self) -> None:
        pass


class Gradient(_GradMethod):
    """Plain input gradient; map ``max_c |dS_t/dx|`` (``reduce="abs_max"``) or ``sum_c``."""


class GradientXInput(_GradMethod):
    """Gradient x input: ``sum_c x * dS_t/dx`` (signed)."""

    def __init__(self, model: nn.Module):
        super().__init__(model)

    def _map(self, gx, x):
        return (gx * x).sum(1, keepdim=True)


class _GuidedFn(torch.autograd.Function):
    """Identity forward; backward lets only positive gradients through."""

    @staticmethod
    def forward(ctx, y):
        return y.view_as(y)

    @staticmethod
    def backward(ctx, g):
        return g.clamp_min(0)


_GUIDED_TYPES = (nn.ReLU, nn.ReLU6)


class GuidedBackprop(_GradMethod):
    """Guided backpropagation: at every ``nn.ReLU`` / ``nn.ReLU6`` module the gradient is
    ``1[0 < x (< 6)] * max(g, 0)``: the activation's own gradient mask (kept by autograd) times
    the positive part of the incoming gradient (added by a forward hook around its output).
    ReLUs applied functionally (``F.relu`` in ``forward``) cannot be hooked and keep their
    ordinary gradient; a model with no ReLU module is an error."""

    def _install(self):
        mods = [m for m in self.model.modules() if isinstance(m, _GUIDED_TYPES)]
        if not mods:
            raise ValueError("GuidedBackprop needs nn.ReLU / nn.ReLU6 modules in the model; "
                             "this one has none (functional ReLUs cannot be hooked)")
        hook = lambda mod, inp, out: _GuidedFn.apply(out)  # noqa: E731
        return [m.register_forward_hook(hook) for m in mods]


def forward_with_hooks(model: nn.Module, x: torch.Tensor, modules, hook) -> None:
    """One no-grad forward of ``x`` with ``hook`` as a forward hook on ``modules`` (removed
    afterwards, also when the forward raises)."""
    hs = [m.register_forward_hook(hook) for m in modules]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hs:
            h.remove()


#: pooling modules that end the feature part of a CNN: a Grad-CAM default layer is never one of
#: them (torchvision VGG's ``AdaptiveAvgPool2d(7)`` resamples a 4x4 map at 128 px to 7x7)
_GLOBAL_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


def _default_cam_layer(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """The last conv block's output: of the modules that return a (N, C, h, w) tensor with
    h * w > 1 (any module but the model itself, adaptive pooling excluded), the one whose forward
    finishes last. A container finishes after its children, so among the modules returning the
    same tensor it is the outermost one: torchvision VGG's ``features``, ResNet's ``layer4``,
    DenseNet's ``features``, Inception v3's ``Mixed_7c`` (Captum's and pytorch-grad-cam's usual
    choices)."""
    last = []

    def rec(mod, inp, out):
        if (isinstance(out, torch.Tensor) and out.dim() == 4 and out.shape[-1] * out.shape[-2] > 1
                and not isinstance(mod, _GLOBAL_POOLS)):
            last.append(mod)

    forward_with_hooks(model, x[:1], [m for m in model.modules() if m is not model], rec)
    if not last:
        raise ValueError("GradCAM found no module with a 4-D (N, C, h, w) output of more than one "
                         "position; pass layer=")
    return last[-1]


_UPSAMPLE = ("bilinear", "nearest", None)
_NORMALIZE = (None, "minmax")
#: pytorch-grad-cam's stabiliser in its min-max scaling (``img / (1e-7 + max(img))``)
MINMAX_EPS = 1e-7


class GradCAM(_GradMethod):
    """Grad-CAM at ``layer`` (a module or its name; default: the last conv block's output, see
    :func:`_default_cam_layer`). If the layer runs more than once per forward, its last call is
    used.

    ``cam = sum_k mean_hw(dS_t/dA_k) * A_k`` at the layer, then, in this order:

    * ``relu=True``: ``max(cam, 0)`` (Selvaraju et al.; maps are >= 0);
    * ``upsample``: ``"bilinear"`` (``F.interpolate``, ``align_corners=False``) or ``"nearest"``
      to the input's (H, W); ``None`` returns the layer's (h, w) map;
    * ``normalize="minmax"``: per sample and target ``(cam - min) / (max - min + 1e-7)``.

    Conventions of the two common implementations, with the layer they are given:

    * Captum ``LayerGradCam(model, layer).attribute(x, t)`` is ``relu=False, upsample=None``
      (its ``relu_attributions`` defaults to False; it returns the layer-resolution map);
      ``relu_attributions=True`` is ``relu=True``; its ``LayerAttribution.interpolate(attr,
      (H, W))`` is ``upsample="nearest"`` (its default mode) or ``"bilinear"`` with that mode.
      The defaults here equal ``relu_attributions=True`` + ``interpolate(..., "bilinear")``.
    * pytorch-grad-cam ``GradCAM(model, target_layers=[layer])`` is ``relu=True,
      upsample="bilinear", normalize="minmax"``: it scales to [0, 1] (``img - min``, then
      ``/ (1e-7 + max)``) before resizing with ``cv2.resize`` (bilinear, pixel centres as
      ``align_corners=False``) and once more after; bilinear resizing commutes with that affine
      scaling, so one scaling after the upsampling gives the same map up to the 1e-7 stabiliser
      (and up to OpenCV's float32 arithmetic).
    """

    def __init__(self, model: nn.Module, layer: Union[None, str, nn.Module] = None,
                 relu: bool = True, upsample: Optional[str] = "bilinear",
                 normalize: Optional[str] = None):
        super().__init__(model)
        if isinstance(layer, str):
            mods = dict(model.named_modules())
            if layer not in mods:
                raise ValueError(f"layer {layer!r} is not a module of the model")
            layer = mods[layer]
        if layer is not None and not isinstance(layer, nn.Module):
            raise TypeError("layer must be an nn.Module, its name, or None")
        if not isinstance(relu, bool):
            raise TypeError(f"relu must be True or False, got {relu!r}")
        if upsample not in _UPSAMPLE:
            raise ValueError(f"upsample must be one of {_UPSAMPLE}, got {upsample!r}")
        if normalize not in _NORMALIZE:
            raise ValueError(f"normalize must be one of {_NORMALIZE}, got {normalize!r}")
        self.layer = layer
        self.relu, self.upsample, self.normalize = relu, upsample, normalize
        self._acts: List[torch.Tensor] = []
        self._size = None

    def attribute(self, x, target=None):
        if self.layer is None:
            check_x(x)
            self.layer = _default_cam_layer(self.model, x)
        self._size = tuple(x.shape[-2:])
        return super().attribute(x, target)

    __call__ = attribute

    def _install(self):
        self._acts = []

        def hook(mod, inp, out):
            self._acts.append(out)
        return [self.layer.register_forward_hook(hook)]

    def _one(self, logits, xin, g, retain):
        if not self._acts:
            raise RuntimeError("GradCAM's layer did not run in the forward pass")
        a = self._acts[-1]
        (ga,) = torch.autograd.grad(logits, a, g, retain_graph=retain)
        with torch.no_grad():
            w = ga.mean((-2, -1), keepdim=True)
            cam = (w * a.detach()).sum(1, keepdim=True)
            if self.relu:
                cam = F.relu(cam)
            if self.upsample == "bilinear":
                cam = F.interpolate(cam, size=self._size, mode="bilinear", align_corners=False)
            elif self.upsample == "nearest":
                cam = F.interpolate(cam, size=self._size, mode="nearest")
            if self.normalize == "minmax":
                flat = cam.flatten(1)
                lo = flat.amin(1).view(-1, 1, 1, 1)
                cam = cam - lo
                cam = cam / (cam.flatten(1).amax(1).view(-1, 1, 1, 1) + MINMAX_EPS)
            return cam

    def _cleanup(self):
        self._acts = []


def _tsgb(model, **kw):
    from ..core.explainer import TSGB
    return TSGB(model, **kw)


#: name -> factory ``f(model) -> object with .attribute(x, target)``
METHODS = {
    "tsgb": _tsgb,
    "gradient": Gradient,
    "gradxinput": GradientXInput,
    "guided": GuidedBackprop,
    "gradcam": GradCAM,
}


def make_method(name: str, model: nn.Module, **kwargs):
    """An explainer by name (``tsgb``, ``gradient``, ``gradxinput``, ``guided``, ``gradcam``)."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return METHODS[name](model, **kwargs)
