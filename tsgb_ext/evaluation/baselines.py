"""Single-pass saliency baselines with the call shape of :class:`tsgb_ext.TSGB`.

``Method(model).attribute(x, target)`` -> (N, 1, H, W) maps (or (N, T, H, W) for an (N, T)
integer ``target``), with the same ``target`` conventions as ``TSGB.attribute``: None (top-1),
an int, N class indices, or an (N, T) tensor (T backward passes share one forward pass).

* :class:`Gradient`: the gradient of the target score w.r.t. the input (Simonyan et al. 2014),
  reduced over colour channels by ``max_c |grad|`` (default) or ``sum_c grad``.
* :class:`GradientXInput`: ``sum_c grad * x`` (Shrikumar et al. 2016).
* :class:`GuidedBackprop`: the gradient where every ReLU / ReLU6 module also zeroes negative
  incoming gradients (Springenberg et al. 2015), reduced like :class:`Gradient`.
* :class:`GradCAM`: ``relu(sum_k mean_hw(dS/dA_k) * A_k)`` at a 4-D feature layer, bilinearly
  upsampled to the input (Selvaraju et al. 2017).

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


def _default_cam_layer(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """The last leaf module whose output is a (N, C, h, w) map with h * w > 1."""
    last = []

    def rec(mod, inp, out):
        if isinstance(out, torch.Tensor) and out.dim() == 4 and out.shape[-1] * out.shape[-2] > 1:
            last.append(mod)

    forward_with_hooks(model, x[:1], [m for m in model.modules() if not list(m.children())], rec)
    if not last:
        raise ValueError("GradCAM found no module with a 4-D (N, C, h, w) output; pass layer=")
    return last[-1]


class GradCAM(_GradMethod):
    """Grad-CAM at ``layer`` (a module or its name; default: the last leaf module with a 4-D
    spatial output, e.g. the final activation before global pooling). If the layer runs more than
    once per forward, its last call is used. Maps are >= 0, upsampled bilinearly to (H, W)."""

    def __init__(self, model: nn.Module, layer: Union[None, str, nn.Module] = None):
        super().__init__(model)
        if isinstance(layer, str):
            mods = dict(model.named_modules())
            if layer not in mods:
                raise ValueError(f"layer {layer!r} is not a module of the model")
            layer = mods[layer]
        if layer is not None and not isinstance(layer, nn.Module):
            raise TypeError("layer must be an nn.Module, its name, or None")
        self.layer = layer
        self._acts: List[torch.Tensor] = []
        self._size = None

    def attribute(self, x, target=None):
        if self.layer is None:
            check_x(x)
            self.layer = _default_cam_layer(self.model, x)
        self._size = tuple(x.shape[-2:])
        return super().attribute(x, target)

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
            cam = F.relu((w * a.detach()).sum(1, keepdim=True))
            return F.interpolate(cam, size=self._size, mode="bilinear", align_corners=False)

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
