"""tsgb_ext: fast Target-Selective Gradient Backprop (TSGB) saliency for PyTorch CNNs.

    import tsgb_ext
    sal = tsgb_ext.TSGB(model).attribute(x, target=None)   # (N, 1, H, W)

Backends: "native" (compiled C++/CUDA ops, tsgb_ext._C), "hooks" (pure PyTorch, the
tsgb_hooks package), "auto" (native where available for the input's device).

Layout (imports point one way: cli -> data / evaluation / viz -> core -> convert, ops):
``core`` (the explainer, input checks, backends), ``convert`` (converting a model and restoring
it), ``ops`` (the compiled ops), ``data`` (models, images, the batch pipeline), ``evaluation``
(metrics, baselines, benchmarks, Quantus / Captum adapters), ``viz`` (figures), ``cli`` (the
``tsgb`` command). ``tsgb_ext.models``, ``tsgb_ext.pipeline``, ``tsgb_ext.metrics``, ... still
work: they are imported lazily from their parts on first use.
"""
import importlib
import importlib.abc
import importlib.util
import sys

from .core.backend import native_available
from .core.explainer import TSGB
from .io.maps import open_maps  # noqa: F401 (the reader of map folders; see tsgb_ext.io)
from .ops.loader import cuda_built, load_error

__version__ = "0.1.0"

#: the modules of the flat layout, by their place now (``tsgb_ext.<name>`` still imports them)
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
    """``tsgb_ext.models``, ``from tsgb_ext import metrics``, ...: the module at its new place,
    imported on first use (PEP 562), so ``import tsgb_ext`` stays light."""
    if name in MOVED:
        module = importlib.import_module(MOVED[name])
        globals()[name] = module
        return module
    if name == "viz":  # a submodule not imported yet
        return importlib.import_module(".viz", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(MOVED) | {"viz"})


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``import tsgb_ext.captum`` / ``from tsgb_ext.metrics import ...``: the dotted names of
    the flat layout resolve to the same module objects at their new places."""

    def find_spec(self, fullname, path=None, target=None):
        head, _, tail = fullname.rpartition(".")
        if head != __name__ or tail not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        return importlib.import_module(MOVED[spec.name.rpartition(".")[2]])

    def exec_module(self, module):
        pass  # already executed at its new place


if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
    sys.meta_path.append(_MovedModules())


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
