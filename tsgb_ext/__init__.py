"""tsgb_ext: fast Target-Selective Gradient Backprop (TSGB) saliency for PyTorch CNNs.

    import tsgb_ext
    sal = tsgb_ext.TSGB(model).attribute(x, target=None)   # (N, 1, H, W)

Backends: "native" (compiled C++/CUDA ops, tsgb_ext._C), "hooks" (pure PyTorch, the
tsgb_hooks package), "auto" (native where available for the input's device).

Layout (imports point one way: cli -> data / evaluation / viz -> core, io -> convert, ops):
``core`` (the explainer, input checks, backends), ``convert`` (converting a model and restoring
it), ``ops`` (the compiled ops), ``io`` (image files, preprocessing, labels, the map store),
``data`` (models, images, the batch pipeline), ``evaluation`` (metrics, baselines, benchmarks,
Quantus / Captum adapters), ``viz`` (figures), ``cli`` (the ``tsgb`` command). Each module has
one import path, the one of its part: ``tsgb_ext.data.models``, ``tsgb_ext.evaluation.metrics``
... (deprecated flat spellings of an earlier layout, ``tsgb_ext.models`` and the like, still
import for this release and warn; see :data:`MOVED`).
"""
import importlib

from .core.backend import native_available
from .core.explainer import TSGB, RuleReport
from .io.maps import open_maps
from .ops.loader import cuda_built, load_error

__version__ = "0.1.0"

#: the flat spellings of an earlier layout, deprecated, and the modules they name now: each is
#: a small module here (``tsgb_ext/models.py`` ...) that warns (DeprecationWarning) and hands
#: on the module at its place; they go in the next release
MOVED = {
    "models": "tsgb_ext.data.models",
    "pipeline": "tsgb_ext.data.pipeline",
    "imagenet": "tsgb_ext.data.imagenet",
    "metrics": "tsgb_ext.evaluation.metrics",
    "baselines": "tsgb_ext.evaluation.baselines",
    "quantus": "tsgb_ext.evaluation.quantus",
    "captum": "tsgb_ext.evaluation.captum",
}


def __getattr__(name: str):
    """``tsgb_ext.viz`` and the deprecated ``tsgb_ext.models`` ...: the submodule, imported on
    first use (PEP 562), so ``import tsgb_ext`` stays light."""
    if name in MOVED or name == "viz":
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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


__all__ = ["TSGB", "RuleReport", "native_available", "backend_info", "open_maps",
           "__version__"]
