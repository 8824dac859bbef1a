"""What goes into an explanation, checked: the input tensor, the target classes, the model's
scores (:func:`logits`), and the TF32 switch (:func:`tf32_off`) that keeps float32 CUDA
convolutions exact while maps are computed."""
from __future__ import annotations

import contextlib
import numbers
import threading
from typing import List, Optional, Sequence, Tuple, Union

import torch

TargetLike = Union[None, int, Sequence[int], torch.Tensor]


def logits(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        logits = out
    elif hasattr(out, "logits") and isinstance(out.logits, torch.Tensor):
        logits = out.logits
    elif isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        logits = out[0]
    else:
        raise TypeError(f"the model's forward must return a (N, classes) tensor of scores, got "
                        f"{type(out).__name__}")
    if logits.dim() != 2:
        raise ValueError(f"the model's output must be (N, classes) scores, got shape "
                         f"{tuple(logits.shape)}")
    return logits


def flag(name: str, value) -> bool:
    """A bool argument: ``True``/``False`` (numpy's bools too); anything else is refused rather
    than read by its truth value (``allow_tf32="no"`` is not ``True``)."""
    if isinstance(value, bool):
        return value
    if type(value).__module__ == "numpy" and type(value).__name__ == "bool":  # numpy.bool_
        return bool(value)
    raise TypeError(f"{name} must be a bool (True or False), got {type(value).__name__} "
                    f"{value!r:.40}")


def compile_options(compile) -> Optional[dict]:
    """``TSGB(compile=...)``: None (off) or the keyword arguments for ``torch.compile``
    (``True`` and ``{}``: its defaults). The arguments are checked against torch.compile's
    signature, and its own checks (mode, backend names) run on a stand-in module, so a bad
    value fails at construction, never half-way through converting a model."""
    if compile is False:
        return None
    if compile is True:
        return {}
    if not isinstance(compile, dict):
        raise TypeError(f"compile must be a bool or a dict of torch.compile keyword "
                        f"arguments, got {type(compile).__name__}")
    opts = dict(compile)
    bad = [k for k in opts if not isinstance(k, str)]
    if bad:
        raise TypeError(f"compile: keyword names must be strings, got {bad!r:.80}")
    import inspect
    params = inspect.signature(torch.compile).parameters
    unknown = sorted(set(opts) - set(params) - {"model"})
    if "model" in opts or unknown:
        raise TypeError(f"compile: {sorted(set(unknown) | ({'model'} & set(opts)))} are not "
                        f"torch.compile keyword arguments (it takes "
                        f"{[p for p in params if p != 'model']})")
    try:
        torch.compile(torch.nn.Identity(), **opts)
    except Exception as e:
        raise ValueError(f"compile: torch.compile refused {opts!r:.120}: {e}") from e
    return opts


def uncompiled(model):
    """The module a ``torch.compile(model)`` wrapper (``OptimizedModule``) wraps, else
    ``model``."""
    while hasattr(model, "_orig_mod") and type(model).__name__ == "OptimizedModule":
        model = model._orig_mod
    return model


def check_x(x, values: bool = True) -> None:
    """Type, dtype and shape of ``x``; with ``values``, also that it is finite (a host read:
    the explainer defers it for CUDA tensors, see ``deferred_checks``)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor of shape (N, C, H, W), got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating tensor (N, C, H, W), got dtype {x.dtype}")
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    if values and x.numel() and not bool(torch.isfinite(x).all()):
        raise ValueError(_NOT_FINITE)


_NOT_FINITE = "x must be finite: it contains NaN or inf"


def target_tensor(target: TargetLike, n: int, device) -> Optional[torch.Tensor]:
    """Validate ``target`` against the batch size: None, or an int64 (N, T) tensor on
    ``device`` (``None``: where it is, a CPU tensor for ints and sequences). The values of a
    CUDA tensor are not read when ``device`` is None (``deferred_checks`` does that)."""
    if target is None:
        return None
    if isinstance(target, bool):
        raise TypeError("target must be an int, a sequence of ints or an integer tensor, got bool")
    if isinstance(target, numbers.Integral):
        t = torch.full((n, 1), int(target), dtype=torch.long)
    else:
        if isinstance(target, torch.Tensor):
            t = target.detach()
        else:
            try:
                import numpy as np
                arr = np.asarray(target)
            except Exception as e:  # pragma: no cover
                raise TypeError(f"target must be integers, got {type(target).__name__}") from e
            if arr.dtype == object or arr.dtype.kind not in "iu":
                if arr.size == 0 and arr.ndim == 1:
                    arr = arr.astype("int64")
                else:
                    raise TypeError(f"target must be an int, a sequence of ints or an integer "
                                    f"tensor, got {target!r:.80}")
            t = torch.as_tensor(arr)
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise TypeError(f"target must be an integer tensor, got dtype {t.dtype}")
        if t.dim() == 0:
            t = t.reshape(1, 1).expand(n, 1)
        elif t.dim() == 1:
            if t.shape[0] != n:
                raise ValueError(f"target has {t.shape[0]} entries but x has {n} samples; expected "
                                 f"one class per sample (length {n}), an int, or an (N, T) tensor")
            t = t.reshape(n, 1)
        elif t.dim() == 2:
            if t.shape[0] != n:
                raise ValueError(f"target of shape {tuple(t.shape)} must be (N, T) with N = {n}")
            if t.shape[1] == 0:
                raise ValueError("target of shape (N, 0) asks for no class; give T >= 1")
        else:
            raise ValueError(f"target must be an int, 1-D (N,) or 2-D (N, T), got shape "
                             f"{tuple(t.shape)}")
        t = t.to(torch.long)
    if t.numel() and (device is not None or not t.is_cuda) and int(t.min()) < 0:
        raise IndexError(f"target must be class indices >= 0, got {int(t.min())}")
    return t if device is None else t.to(device)


def deferred_checks(x: torch.Tensor, tgt: Optional[torch.Tensor], classes: int) -> None:
    """The value checks of a CUDA call, read once at its end (after its work is queued), not
    before the forward: a host read there would wait for the input's transfer and stall the
    pipeline. Not run while a CUDA graph is being captured (nothing can be read then)."""
    if not x.is_cuda or torch.cuda.is_current_stream_capturing():
        return
    parts = [torch.isfinite(x).all().logical_not().double().reshape(1)]
    if tgt is not None and tgt.numel():
        parts += [tgt.min().double().reshape(1), tgt.max().double().reshape(1)]
    vals = torch.cat(parts).tolist()  # the one host read
    if vals[0]:
        raise ValueError(_NOT_FINITE)
    if len(vals) > 1 and vals[1] < 0:
        raise IndexError(f"target must be class indices >= 0, got {int(vals[1])}")
    if len(vals) > 1 and vals[2] >= classes:
        raise IndexError(f"target must be class indices in [0, {classes}), got {int(vals[2])}")


# TF32 flags are process-wide: saved on the first entry, restored on the last exit (calls on
# several threads overlap)
_tf32_guard = threading.Lock()
_tf32_depth = 0
_tf32_saved: Optional[List[Tuple[object, str, object]]] = None


def _has_fp32_precision(obj) -> bool:
    """Whether ``obj`` (a torch.backends settings object) has the ``fp32_precision`` API of
    torch >= 2.9."""
    try:
        return obj is not None and isinstance(getattr(obj, "fp32_precision"), str)
    except (AttributeError, RuntimeError):
        return False


def _tf32_switches() -> List[Tuple[object, str, object]]:
    """(settings object, attribute, value that turns TF32 off) for each switch to set.

    torch >= 2.9: ``fp32_precision = "ieee"`` on ``torch.backends.cudnn.conv`` and on
    ``torch.backends.cuda.matmul``. Once a user has set one of those, the legacy
    ``allow_tf32`` getter raises (torch refuses to read a state the new API set), so the new
    API is used wherever it exists and the legacy flags only where it does not. (Inside the
    block the legacy getters may raise for the same reason; outside it every switch is what
    the user left.)"""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    switches: List[Tuple[object, str, object]] = []
    conv = getattr(cudnn, "conv", None)
    if _has_fp32_precision(conv):
        switches.append((conv, "fp32_precision", "ieee"))
    else:
        switches.append((cudnn, "allow_tf32", False))
    if _has_fp32_precision(matmul):
        switches.append((matmul, "fp32_precision", "ieee"))
    else:
        switches.append((matmul, "allow_tf32", False))
    return switches


def _restore(saved: List[Tuple[object, str, object]]) -> None:
    for obj, name, value in reversed(saved):
        setattr(obj, name, value)


@contextlib.contextmanager
def tf32_off(active: bool):
    """No TF32 in cuDNN convolutions and cuBLAS matmuls inside the block (when ``active``):
    every switch's value is saved on the first entry and put back, exactly, on the last exit."""
    global _tf32_depth, _tf32_saved
    if not active:
        yield
        return
    with _tf32_guard:
        if _tf32_depth == 0:
            switches = _tf32_switches()
            saved = [(obj, name, getattr(obj, name)) for obj, name, _ in switches]
            try:
                for obj, name, off in switches:
                    setattr(obj, name, off)
            except BaseException:
                _restore(saved)
                raise
            _tf32_saved = saved
        _tf32_depth += 1
    try:
        yield
    finally:
        with _tf32_guard:
            _tf32_depth -= 1
            if _tf32_depth == 0:
                saved, _tf32_saved = _tf32_saved, None
                _restore(saved)


def check_call(x) -> None:
    """``check_x`` (its value check only for CPU tensors: CUDA inputs are checked by
    ``deferred_checks``), and autograd must be on (no ``torch.inference_mode()``)."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError("TSGB.attribute needs autograd and cannot run under "
                           "torch.inference_mode(); call it outside that block "
                           "(torch.no_grad() is fine)")
    check_x(x, values=not (isinstance(x, torch.Tensor) and x.is_cuda))
