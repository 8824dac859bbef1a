"""Plotting TSGB maps with matplotlib: a photo, then its maps overlaid, one panel per class.

Maps stay torch tensors on their device (scaling, smoothing and the mass statistics run there)
until a panel is drawn. Figures are built with ``matplotlib.figure.Figure`` and the Agg canvas, so
nothing here touches pyplot's global state or needs a display.

Colours: a diverging map (``RdBu_r``): red is positive evidence for the class, blue negative,
drawn with an opacity that grows with ``|value|`` over a greyed copy of the photo. The map is
divided by a high percentile (99th by default) of its *positive* values, so the strongest
positive evidence saturates and a few extreme pixels cannot wash the rest out.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

PathLike = Union[str, "os.PathLike[str]"]


# ---------------------------------------------------------------------------------- maps ----
def _as_hw(sal: torch.Tensor) -> torch.Tensor:
    """A single map given as (H, W), (1, H, W) or (1, 1, H, W) -> (H, W)."""
    if not isinstance(sal, torch.Tensor):
        sal = torch.as_tensor(np.asarray(sal))
    while sal.dim() > 2 and sal.shape[0] == 1:
        sal = sal[0]
    if sal.dim() != 2:
        raise ValueError(f"expected one (H, W) map, got shape {tuple(sal.shape)}")
    return sal


def smooth_map(sal: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur (std ``sigma`` pixels) of (..., H, W) maps, on their device; 0: unchanged."""
    if sigma <= 0:
        return sal
    r = max(1, int(round(3 * sigma)))
    k = torch.arange(-r, r + 1, device=sal.device, dtype=torch.float32)
    k = torch.exp(-0.5 * (k / sigma) ** 2)
    k = (k / k.sum()).to(sal.dtype)
    shape = sal.shape
    x = sal.reshape(-1, 1, shape[-2], shape[-1])
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))
    return x.reshape(shape)


def normalize_map(sal: torch.Tensor, percentile: float = 99.0, sigma: float = 0.0,
                  clip_percentile: Optional[float] = 99.5) -> torch.Tensor:
    """Scale (..., H, W) maps to [-1, 1] for display, each map on its own.

    1. ``clip_percentile``: clip each map to +-(that percentile of its ``|values|``), so a few
       isolated extreme pixels (TSGB's BatchNorm rule divides by the BN input, which can be
       close to 0) neither dominate nor get spread by the blur; None: no clipping.
    2. ``sigma``: Gaussian blur of that std in pixels (0: none), which hides the checkerboard
       of strided convolutions.
    3. Divide by the ``percentile``-th percentile of the map's positive values (a map with no
       positive value: by its largest ``|value|``) and clip to [-1, 1].

    Runs on the maps' device.
    """
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    if clip_percentile is not None and not 0 < clip_percentile <= 100:
        raise ValueError(f"clip_percentile must be in (0, 100] or None, got {clip_percentile}")
    sal = sal.detach().float()
    shape = sal.shape
    flat = sal.reshape(-1, shape[-2] * shape[-1])
    if clip_percentile is not None and clip_percentile < 100:
        lim = torch.quantile(flat.abs(), clip_percentile / 100.0, dim=1, keepdim=True)
        flat = torch.maximum(torch.minimum(flat, lim), -lim)
    flat = smooth_map(flat.reshape(shape), sigma).reshape(flat.shape)
    scales = []
    for row in flat:  # per map: quantile of a variable number of positive values
        pos = row[row > 0]
        scales.append(torch.quantile(pos, percentile / 100.0) if pos.numel()
                      else row.abs().max())
    scale = torch.stack(scales).clamp_min(torch.finfo(torch.float32).tiny)
    out = flat / scale[:, None]
    return out.clamp_(-1, 1).reshape(shape)


def tile_positive_mass(sal: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """Fraction of each map's positive mass that falls in each tile of a ``grid`` mosaic.

    ``sal``: (..., H, W) maps; ``grid``: (rows, cols), tiles of equal size (H and W divisible by
    rows and cols). Returns (..., rows, cols) fractions summing to 1 over the tiles (all zeros for
    a map with no positive value). Runs on the maps' device.
    """
    rows, cols = grid
    H, W = sal.shape[-2:]
    if rows < 1 or cols < 1 or H % rows or W % cols:
        raise ValueError(f"a {H}x{W} map does not split into a {rows}x{cols} grid of equal tiles")
    pos = sal.detach().float().clamp_min(0)
    tiles = pos.reshape(*sal.shape[:-2], rows, H // rows, cols, W // cols).sum((-3, -1))
    total = tiles.sum((-2, -1), keepdim=True)
    return torch.where(total > 0, tiles / total.clamp_min(1e-30), torch.zeros_like(tiles))


# ------------------------------------------------------------------------------ drawing ----
def _rgb_hwc(image: torch.Tensor) -> np.ndarray:
    """A [0, 1] RGB image (3, H, W) / (1, 3, H, W) tensor or (H, W, 3) array -> (H, W, 3) numpy."""
    if isinstance(image, torch.Tensor):
        t = image.detach()
        if t.dim() == 4 and t.shape[0] == 1:
            t = t[0]
        if t.dim() != 3 or t.shape[0] != 3:
            raise ValueError(f"expected a (3, H, W) image tensor, got shape {tuple(image.shape)}")
        return t.permute(1, 2, 0).float().clamp(0, 1).cpu().numpy()
    arr = np.asarray(image)
    if arr.dtype == np.uint8:
        arr = arr.astype(np.float32) / 255.0
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {arr.shape}")
    return np.clip(arr, 0, 1)


def heat_rgba(norm: np.ndarray, cmap: str = "RdBu_r", alpha: float = 0.9,
              gamma: float = 0.7, negative: float = 0.5) -> np.ndarray:
    """[-1, 1] map (H, W) -> RGBA (H, W, 4): diverging colour, opacity ``alpha * |v|**gamma``,
    times ``negative`` where ``v < 0`` (1: as strong as the positive part, 0: hidden)."""
    from matplotlib import colormaps
    norm = np.asarray(norm, dtype=np.float64)
    rgba = colormaps[cmap]((norm + 1.0) / 2.0)
    rgba[..., 3] = alpha * np.abs(norm) ** gamma * np.where(norm < 0, negative, 1.0)
    return rgba


def overlay(ax, image, sal: torch.Tensor, title: Optional[str] = None, *,
            percentile: float = 99.0, sigma: float = 1.5, clip_percentile: Optional[float] = 99.5,
            alpha: float = 0.9, negative: float = 0.5, cmap: str = "RdBu_r", grey: bool = True,
            normalized: bool = False):
    """Draw one map over its image on a matplotlib ``ax``.

    ``image``: [0, 1] RGB, (3, H, W) tensor or (H, W, 3) array; ``sal``: one (H, W) map (raw, or
    already in [-1, 1] when ``normalized``; else scaled by :func:`normalize_map` with
    ``percentile``, ``sigma`` and ``clip_percentile``). The photo is shown greyed (``grey``) and
    faded so the colours read clearly; ``negative`` scales the opacity of negative evidence.
    """
    rgb = _rgb_hwc(image)
    sal = _as_hw(sal)
    if sal.shape != rgb.shape[:2]:
        raise ValueError(f"map of shape {tuple(sal.shape)} does not match the image "
                         f"{rgb.shape[:2]}")
    norm = sal if normalized else normalize_map(sal, percentile, sigma, clip_percentile)
    norm = norm.float().cpu().numpy()
    if grey:
        lum = rgb @ np.array([0.299, 0.587, 0.114], dtype=rgb.dtype)
        base = np.repeat((0.35 + 0.55 * lum)[..., None], 3, -1)
    else:
        base = rgb
    ax.imshow(base, interpolation="nearest")
    ax.imshow(heat_rgba(norm, cmap, alpha, negative=negative), interpolation="nearest")
    if title:
        ax.set_title(title, fontsize=9)
    ax.set_axis_off()
    return ax


def explanation_figure(image, maps: torch.Tensor, titles: Sequence[str],
                       suptitle: Optional[str] = None, *, percentile: float = 99.0,
                       sigma: float = 1.5, clip_percentile: Optional[float] = 99.5,
                       negative: float = 0.5, panel_height: float = 3.0,
                       image_title: str = "input", dividers: Sequence[Tuple[str, float]] = (),
                       colorbar: bool = True):
    """A figure for one image: the photo, then one overlaid panel per map.

    Args:
        image: [0, 1] RGB, a (3, H, W) tensor (any device) or an (H, W, 3) array.
        maps: (T, H, W) or (1, T, H, W) TSGB maps of that image (any device).
        titles: T panel titles (e.g. "tabby  p=0.41").
        suptitle: optional figure title.
        dividers: lines to draw on every panel, ("v", x) or ("h", y) in pixels (mosaic tiles).
        percentile, sigma, clip_percentile: display scaling, see :func:`normalize_map`.
        negative: opacity factor of negative evidence (blue), see :func:`heat_rgba`.
        colorbar: a colour bar beside the last panel (the display scale, -1 .. 1).
    Returns:
        a ``matplotlib.figure.Figure`` (Agg canvas); save it with :func:`save_figure`.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if maps.dim() == 4 and maps.shape[0] == 1:
        maps = maps[0]
    if maps.dim() == 2:
        maps = maps[None]
    if maps.dim() != 3:
        raise ValueError(f"maps must be (T, H, W), got shape {tuple(maps.shape)}")
    if len(titles) != maps.shape[0]:
        raise ValueError(f"{maps.shape[0]} maps but {len(titles)} titles")
    rgb = _rgb_hwc(image)
    H, W = rgb.shape[:2]
    norm = normalize_map(maps, percentile, sigma, clip_percentile)  # on the maps' device
    n = 1 + maps.shape[0]
    fig = Figure(figsize=(n * panel_height * W / H, panel_height + (0.8 if suptitle else 0.5)),
                 layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, n, squeeze=False)[0]
    axes[0].imshow(rgb, interpolation="nearest")
    axes[0].set_title(image_title, fontsize=9)
    axes[0].set_axis_off()
    for ax, m, title in zip(axes[1:], norm, titles):
        overlay(ax, rgb, m, title, normalized=True, negative=negative)
    for ax in axes:
        for kind, pos in dividers:
            (ax.axvline if kind == "v" else ax.axhline)(pos - 0.5, color="white", lw=1.2)
    if colorbar:
        from matplotlib import colormaps
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize
        sm = ScalarMappable(norm=Normalize(-1, 1), cmap=colormaps["RdBu_r"])
        fig.colorbar(sm, ax=axes[-1], fraction=0.046, pad=0.02, label="scaled evidence")
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    return fig


def save_figure(fig, path: PathLike, dpi: int = 100) -> str:
    """Write ``fig`` as a PNG (or the format of ``path``'s extension); returns the path."""
    path = os.fspath(path)
    fig.savefig(path, dpi=dpi)
    return path
