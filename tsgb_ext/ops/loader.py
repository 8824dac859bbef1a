"""Loading the compiled ops (tsgb_ext._C) without ever breaking ``import tsgb_ext``.

Pattern of torchvision's ``_has_ops``: if the extension is missing or was built for another
torch, the package still imports, ``native_available()`` is False, and one warning says how to
rebuild. When the ops load, their fake kernels (:mod:`.fake`) and the classifier op's autograd
(:mod:`.autograd`) are registered, once (module imports run once).
"""
from __future__ import annotations

import os
import warnings
from typing import Optional

import torch

_REBUILD = ("rebuild it with `pip install --no-build-isolation -e .` in the tsgb_ext checkout "
            "(FORCE_CUDA=1 for the CUDA kernels)")

_load_error: Optional[str] = None
_loaded = False


def _load() -> None:
    global _loaded, _load_error
    try:
        from .. import _C  # noqa: F401  (registers torch.ops.tsgb_ext.*)
        for name in ("conv2d_backward", "batch_norm_backward", "avg_pool2d_backward",
                     "linear_backward", "conv2d"):
            getattr(torch.ops.tsgb_ext, name)
        _loaded = True
    except ImportError as e:  # not built: quiet unless native is asked for
        _load_error = f"tsgb_ext._C is not built ({e}); {_REBUILD}"
    except (OSError, RuntimeError, AttributeError) as e:  # built for another torch, ...
        _load_error = f"tsgb_ext._C could not be loaded ({e}); {_REBUILD}"
        warnings.warn(f"tsgb_ext: native backend unavailable: {_load_error}", RuntimeWarning,
                      stacklevel=3)


def _register() -> None:
    """The Python side of the loaded ops: fake kernels and the classifier op's autograd."""
    from . import autograd, fake  # noqa: F401  (torch.library registrations, run once)


_CPU_ISAS = ("auto", "default", "avx2", "avx512")


def _check_cpu_isa_env() -> None:
    """``TSGB_CPU_ISA`` picks the instruction set of the CPU kernels compiled more than once
    (csrc/cpu/cpu_isa.cpp reads it once, on first use). A value it cannot use is ignored there
    without a word (the widest set this CPU runs is used); it is reported here, once, as a
    Python warning, so warning filters and ``pytest.warns`` see it and stderr stays clean."""
    value = os.environ.get("TSGB_CPU_ISA")
    if value is None:
        return
    accepted = ", ".join(repr(v) for v in _CPU_ISAS)
    if value in _CPU_ISAS:
        try:
            torch.ops.tsgb_ext.cpu_isa(value)  # what the kernels' first use picks too
            return
        except RuntimeError as e:  # e.g. avx512 on a CPU without it
            reason = str(e).splitlines()[0].split(": ", 1)[-1]
    else:
        reason = "not an instruction-set name"
    warnings.warn(f"tsgb_ext: ignoring TSGB_CPU_ISA={value!r} ({reason}); accepted values: "
                  f"{accepted}; the CPU kernels use {torch.ops.tsgb_ext.cpu_isa()!r}",
                  RuntimeWarning, stacklevel=2)


_load()
if _loaded:
    _register()
    _check_cpu_isa_env()


def native_available(device: Optional[torch.device | str] = None) -> bool:
    """True when the compiled ops are loaded and usable (for ``device``, when given)."""
    if not _loaded:
        return False
    if device is None:
        return True
    device = torch.device(device)
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        return cuda_built()
    return False


def cuda_built() -> bool:
    """True when the compiled ops include the CUDA kernels."""
    return _loaded and bool(torch.ops.tsgb_ext.built_with_cuda())


def load_error() -> Optional[str]:
    """Why the native backend is unavailable (None when it is loaded)."""
    return _load_error
