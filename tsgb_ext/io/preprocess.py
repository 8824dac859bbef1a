"""What maps input pixels to model (and map) pixels: :class:`Preprocessing`.

An image of H x W pixels becomes the model's h x w input in three steps, and a TSGB map has
the model input's h x w pixels:

1. crop: the largest central box with the aspect ratio of ``size`` (``resize_mode="center"``),
   or the whole image (``"squash"``); with ``crop_pct`` < 1 only the central ``crop_pct`` of
   that box (timm's eval transform: resize to ``size / crop_pct``, central crop of ``size``);
2. resize the box to ``size`` = (h, w) with ``interpolation`` (antialiased when shrinking,
   except ``nearest``);
3. normalise the [0, 1] RGB with ``(x - mean) / std``.

:meth:`Preprocessing.crop_box` gives the box of step 1 in the image's pixels and
:meth:`Preprocessing.place` puts a map back there: resampled to the box and padded to H x W.
``run.json`` of a ``tsgb explain`` folder holds :meth:`Preprocessing.to_dict`.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

#: Resampling filters (timm's ``interpolation`` names).
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
#: ``resize_mode`` values: central aspect-ratio crop, or the whole image squashed to ``size``.
RESIZE_MODES = ("center", "squash")


def _pair(size: Union[int, Sequence[int]], what: str = "size") -> Tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        h = w = int(size)
    else:
        try:
            h, w = (int(v) for v in size)
        except (TypeError, ValueError):
            raise ValueError(f"{what} must be an int or (h, w), got {size!r}") from None
    if h < 1 or w < 1:
        raise ValueError(f"{what} must be positive, got {(h, w)}")
    return h, w


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """The transform from an image file's pixels to the model's input (see the module doc).

    ``size`` (h, w); ``resize_mode`` ``"center"`` or ``"squash"``; ``crop_pct`` in (0, 1];
    ``interpolation`` one of :data:`INTERPOLATIONS`; ``mean``, ``std``: per channel on [0, 1]
    RGB (None: the images are not normalised)."""

    size: Tuple[int, int]
    resize_mode: str = "center"
    crop_pct: float = 1.0
    interpolation: str = "bilinear"
    mean: Optional[Tuple[float, float, float]] = None
    std: Optional[Tuple[float, float, float]] = None

    def __post_init__(self):
        object.__setattr__(self, "size", _pair(self.size))
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got "
                             f"{self.resize_mode!r}")
        if not 0 < float(self.crop_pct) <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct}")
        object.__setattr__(self, "crop_pct", float(self.crop_pct))
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got "
                             f"{self.interpolation!r}")
        for name in ("mean", "std"):
            v = getattr(self, name)
            if v is not None:
                v = tuple(float(x) for x in v)
                if len(v) != 3 or not all(np.isfinite(v)):
                    raise ValueError(f"{name} must be 3 finite numbers, got {v}")
                object.__setattr__(self, name, v)
        if self.std is not None and not all(s > 0 for s in self.std):
            raise ValueError(f"std must be > 0, got {self.std}")

    # ---- the record in run.json
    def to_dict(self) -> dict:
        return {"size": list(self.size), "resize_mode": self.resize_mode,
                "crop_pct": self.crop_pct, "interpolation": self.interpolation,
                "mean": list(self.mean) if self.mean is not None else None,
                "std": list(self.std) if self.std is not None else None}

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        if not isinstance(d, dict) or "size" not in d:
            raise ValueError(f"a preprocessing record needs at least 'size', got {d!r}")
        return cls(size=tuple(d["size"]), resize_mode=d.get("resize_mode", "center"),
                   crop_pct=d.get("crop_pct", 1.0),
                   interpolation=d.get("interpolation", "bilinear"),
                   mean=d.get("mean"), std=d.get("std"))

    def resize_options(self) -> dict:
        """``crop_pct``, ``interpolation``, ``crop_mode``: keyword arguments of
        ``pipeline.ImageFileDataset`` / :func:`tsgb_ext.io.images.open_rgb`."""
        return {"crop_pct": self.crop_pct, "interpolation": self.interpolation,
                "crop_mode": self.resize_mode}

    # ---- geometry
    def crop_box(self, height: int, width: int) -> Tuple[int, int, int, int]:
        """(top, left, box_height, box_width): the part of a ``height`` x ``width`` image that
        becomes the model's input (step 1 of the module doc)."""
        return crop_box(height, width, self.size, self.crop_pct, self.resize_mode)

    def apply(self, rgb: torch.Tensor) -> torch.Tensor:
        """[0, 1] RGB (N, 3, H, W) -> (N, 3, h, w) [0, 1] RGB: steps 1 and 2 (no normalisation)."""
        return crop_and_resize(rgb, self.size, self.crop_pct, self.interpolation,
                               self.resize_mode)

    def place(self, sal, image_size: Sequence[int], fill: float = 0.0) -> np.ndarray:
        """A map (h, w) of this preprocessing -> float32 (H, W) on the pixel grid of the
        ``image_size`` = (H, W) image it was computed from: resampled to the crop box
        (bilinear; antialiased when shrinking) and put at the box's offset; pixels outside
        the box (cropped away, the model never saw them) are ``fill``. Values are resampled,
        not summed: the map's total changes with the box's area."""
        H, W = _pair(image_size, "image_size")
        m = torch.as_tensor(np.asarray(sal, dtype=np.float32))
        if m.dim() != 2:
            raise ValueError(f"place: expected one (h, w) map, got shape {tuple(m.shape)}")
        if tuple(m.shape) != self.size:
            raise ValueError(f"place: the map is {tuple(m.shape)}, this preprocessing makes "
                             f"{self.size} maps")
        top, left, ch, cw = self.crop_box(H, W)
        box = m[None, None]
        if (ch, cw) != tuple(m.shape):
            shrink = ch < m.shape[0] or cw < m.shape[1]
            box = F.interpolate(box, size=(ch, cw), mode="bilinear", align_corners=False,
                                antialias=shrink)
        out = np.full((H, W), fill, dtype=np.float32)
        # a box larger than the image (crop_pct rounding) is clipped to it
        t0, l0 = max(top, 0), max(left, 0)
        t1, l1 = min(top + ch, H), min(left + cw, W)
        out[t0:t1, l0:l1] = box[0, 0, t0 - top:t1 - top, l0 - left:l1 - left].numpy()
        return out


def crop_box(height: int, width: int, size, crop_pct: float = 1.0,
             resize_mode: str = "center") -> Tuple[int, int, int, int]:
    """(top, left, box_height, box_width) of the central crop (see :class:`Preprocessing`)."""
    h, w = _pair(size)
    H, W = int(height), int(width)
    if resize_mode == "squash":
        ch, cw = H, W
    elif H * w > W * h:   # too tall: crop rows
        ch, cw = max(1, round(W * h / w)), W
    else:                 # too wide: crop columns
        ch, cw = H, max(1, round(H * w / h))
    if crop_pct < 1:
        ch, cw = max(1, round(ch * crop_pct)), max(1, round(cw * crop_pct))
    return (H - ch) // 2, (W - cw) // 2, ch, cw


def crop_and_resize(t: torch.Tensor, size, crop_pct: float = 1.0,
                    interpolation: str = "bilinear", resize_mode: str = "center"
                    ) -> torch.Tensor:
    """[0, 1] RGB (N, 3, H, W) -> (N, 3, h, w): the crop of :func:`crop_box` resized to
    ``size`` with ``interpolation`` (antialiased except ``nearest``), clipped to [0, 1]."""
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    h, w = _pair(size)
    top, left, ch, cw = crop_box(t.shape[-2], t.shape[-1], (h, w), crop_pct, resize_mode)
    t = t[..., top:top + ch, left:left + cw]
    if (ch, cw) != (h, w):
        if interpolation == "nearest":
            t = F.interpolate(t, size=(h, w), mode="nearest")
        else:
            t = F.interpolate(t, size=(h, w), mode=interpolation, align_corners=False,
                              antialias=True)
    return t.clamp(0, 1)
