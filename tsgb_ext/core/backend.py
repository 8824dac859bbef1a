"""Backends: what the model conversion needs of one (:class:`Backend`), and which one a call
uses (:func:`select`).

A backend computes each rule layer's forward with an op that records its TSGB backward rule.
Two exist: ``"native"`` (the compiled ops, :mod:`tsgb_ext.ops.native`) and ``"hooks"`` (pure
PyTorch autograd functions, the tsgb_hooks package). Optional ops are declared as capabilities
(``supports_fusion``, ``supports_conv_relu``), not probed for.
"""
from __future__ import annotations

import warnings
from typing import Optional, Protocol, runtime_checkable

import torch

import tsgb_hooks

from ..ops import loader

#: what ``TSGB(model, backend=...)`` accepts
BACKENDS = ("auto", "native", "hooks")
_warned_fallback = False


@runtime_checkable
class Backend(Protocol):
    """The interface of a backend, as the model conversion uses it (stride, padding and
    dilation are pairs of ints; every op computes the ordinary forward)."""

    name: str
    #: has ``conv2d_bn_act``: conv -> eval BatchNorm -> activation (0 none, 1 ReLU, 2 ReLU6)
    #: as one op whose backward folds the BN and activation rules into the conv rule
    supports_fusion: bool
    #: has ``conv2d_relu``: relu(conv(x)) with the conv rule
    supports_conv_relu: bool
    #: optional (``supports_max_pool = True``): ``max_pool2d(x, kernel_size, stride, padding,
    #: dilation, ceil_mode)``, torch's max pooling with its ordinary gradient, faster

    def conv2d(self, x, weight, bias, stride, padding, dilation, groups): ...

    def batch_norm(self, x, running_mean, running_var, weight, bias, eps): ...

    def avg_pool2d(self, x, kernel_size, stride, padding, ceil_mode, count_include_pad,
                   divisor_override): ...

    def linear(self, x, weight, bias): ...

    def linear_rule(self, grad, x, weight): ...

    # optional (``reuses_memory = True``): reuse of activation memory between CPU calls,
    # ``memory_hold()`` / ``memory_release()`` around a with-block (or one call) and
    # ``memory_scope()`` (a context manager) around each call's forward and backward


def reuses_memory(backend) -> bool:
    """Whether ``backend`` declares the CPU activation-memory cache."""
    return bool(getattr(backend, "reuses_memory", False))


class HooksBackend(tsgb_hooks.HooksBackend):
    """tsgb_hooks' backend with its capabilities declared: none of the optional ops."""

    supports_fusion = False
    supports_conv_relu = False
    supports_max_pool = False
    reuses_memory = False


HOOKS = HooksBackend()


def native_available(device=None) -> bool:
    """True when the compiled ops are loaded and usable (for ``device``, when given)."""
    return loader.native_available(device)


def native_backend() -> Backend:
    """The compiled ops' backend object (only when they loaded)."""
    from ..ops import native
    return native.BACKEND


def check_choice(backend: str) -> None:
    """Fail at construction for an unknown name, or for ``"native"`` without the ops."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "native" and not loader.native_available():
        raise RuntimeError(f"backend='native' was asked for but the compiled ops are not "
                           f"available: {loader.load_error()}")


def select(choice: str, device: torch.device) -> Backend:
    """The backend for ``choice`` (``"auto"``, ``"native"``, ``"hooks"``) on ``device``:
    ``"auto"`` falls back to hooks, with one warning per process, where the compiled ops
    cannot run; ``"native"`` raises there."""
    global _warned_fallback
    if choice == "hooks":
        return HOOKS
    if loader.native_available(device):
        return native_backend()
    if choice == "native":
        why = loader.load_error() or f"it was built without kernels for {device.type}"
        raise RuntimeError(f"backend='native' cannot run on {device}: {why}")
    if not _warned_fallback:
        _warned_fallback = True
        why = loader.load_error() or f"the compiled ops have no {device.type} kernels"
        warnings.warn(f"tsgb_ext: using the pure-PyTorch 'hooks' backend on {device}: {why}",
                      RuntimeWarning, stacklevel=4)
    return HOOKS


def supports_fusion(backend) -> bool:
    """Whether ``backend`` declares the fused conv -> BN -> activation op."""
    return bool(getattr(backend, "supports_fusion", False))


def load_error() -> Optional[str]:
    """Why the compiled ops are unavailable (None when they loaded)."""
    return loader.load_error()
