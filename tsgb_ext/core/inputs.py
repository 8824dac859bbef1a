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


def check_x(x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor of shape (N, C, H, W), got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating tensor (N, C, H, W), got dtype {x.dtype}")
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise ValueError("x must be finite: it contains NaN or inf")


def target_tensor(target: TargetLike, n: int, device) -> Optional[torch.Tensor]:
    """Validate ``target`` against the batch size: None, or an int64 (N, T) tensor."""
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
    if t.numel() and int(t.min()) < 0:
        raise IndexError(f"target must be class indices >= 0, got {int(t.min())}")
    return t.to(device)


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
    """``check_x``, and autograd must be on (no ``torch.inference_mode()``)."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError("TSGB.attribute needs autograd and cannot run under "
                           "torch.inference_mode(); call it outside that block "
                           "(torch.no_grad() is fine)")
    check_x(x)
