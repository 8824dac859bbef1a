"""tsgb_ext: fast Target-Selective Gradient Backprop (TSGB) saliency for PyTorch CNNs.

    import tsgb_ext
    sal = tsgb_ext.TSGB(model).attribute(x, target=None)   # (N, 1, H, W)

Backends: "native" (compiled C++/CUDA ops, tsgb_ext._C), "hooks" (pure PyTorch, the
tsgb_hooks package), "auto" (native where available for the input's device).
"""
from ._native import cuda_built, load_error
from .explainer import TSGB, native_available

if native_available():
    from . import _ops  # noqa: F401  (fake kernels and autograd of the compiled ops)

__version__ = "0.1.0"


def backend_info() -> dict:
    """Which backends this installation can use."""
    import torch
    return {
        "native": native_available(),
        "native_cuda": cuda_built(),
        "native_error": load_error(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
    }


__all__ = ["TSGB", "native_available", "backend_info", "__version__"]
