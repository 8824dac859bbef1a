"""Backends: what the model conversion needs of one (:class:`Backend`), and which one a call
uses (:func:`select`).

A backend computes each rule layer's forward with an op that records its TSGB backward rule.
Two exist: ``"native"`` (the compiled ops, :mod:`tsgb_ext.ops.native`) and ``"hooks"`` (pure
PyTorch autograd functions, the tsgb_hooks package), both subclasses of :class:`Backend`
(``tsgb_hooks.backend``). Optional ops are declared as capabilities, properties with a False
default on that base class (``supports_fusion``, ``supports_conv_relu``, ``supports_max_pool``,
``reuses_memory``), never probed for.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch

import tsgb_hooks
from tsgb_hooks.backend import Backend

from ..ops import loader

#: what ``TSGB(model, backend=...)`` accepts
BACKENDS = ("auto", "native", "hooks")
_warned_fallback = False


#: the pure-PyTorch backend object
HOOKS: Backend = tsgb_hooks.BACKEND


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


def load_error() -> Optional[str]:
    """Why the compiled ops are unavailable (None when they loaded)."""
    return loader.load_error()
