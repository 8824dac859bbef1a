"""Saliency metrics of the field, batched on the device of the tensors they get.

Maps are (N, 1, h, w), (N, h, w) tensors (or (N, T, h, w) where noted); masks are boolean
(N, H, W) tensors at image resolution (:func:`boxes_to_mask` draws them from boxes). Maps are
resized bilinearly to the mask's size, as TorchRay does. Nothing loops over pixels in Python.

* :func:`pointing_game` -- TorchRay's pointing game (Zhang et al. 2016 as implemented in
  TorchRay): the map's maximum is a hit when a mask pixel lies within ``tolerance`` (15) pixels.
* :func:`energy_pointing_game` -- share of the positive saliency mass inside the mask
  (Wang et al., Score-CAM 2020).
* :func:`grid_pointing_game` -- on 2x2 mosaics: for the map of each tile's class, the share of
  positive mass in that tile (and whether its maximum falls in it).
* :func:`deletion_insertion` -- RISE's deletion / insertion curves and their AUC (Petsiuk et al.
  2018), every step of every image run as large forward batches.
* :func:`model_randomization` -- the cascading model-parameter randomisation sanity check
  (Adebayo et al. 2018): maps after re-initialising layers top-down, compared to the original
  ones by Spearman rank correlation and SSIM.
* :func:`explain_func` -- Quantus's ``explain_func(model, inputs, targets, **kwargs)``
  (numpy in, numpy out); also importable as ``tsgb_ext.evaluation.quantus.explain_func``.
"""
from __future__ import annotations

import copy
import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.inputs import logits as model_logits

__all__ = ["pointing_game", "pointing_hits", "energy_pointing_game", "grid_pointing_game",
           "boxes_to_mask", "deletion_insertion", "rise_auc", "gaussian_blur",
           "model_randomization", "spearman", "ssim", "explain_func"]

TOLERANCE = 15


# ------------------------------------------------------------------------------ helpers ----
def _as_maps(sal: torch.Tensor) -> torch.Tensor:
    """(N, h, w) or (N, 1, h, w) -> (N, 1, h, w) float."""
    if not isinstance(sal, torch.Tensor):
        sal = torch.as_tensor(np.asarray(sal))
    if sal.dim() == 3:
        sal = sal[:, None]
    if sal.dim() != 4 or sal.shape[1] != 1:
        raise ValueError(f"expected (N, h, w) or (N, 1, h, w) maps, got {tuple(sal.shape)}")
    return sal.detach().float()


def _as_masks(masks, device) -> torch.Tensor:
    if not isinstance(masks, torch.Tensor):
        masks = torch.as_tensor(np.asarray(masks))
    if masks.dim() == 4 and masks.shape[1] == 1:
        masks = masks[:, 0]
    if masks.dim() != 3:
        raise ValueError(f"expected (N, H, W) masks, got {tuple(masks.shape)}")
    return masks.to(device=device).bool()


def resize_maps(sal: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """(N, 1, h, w) -> (N, 1, H, W), bilinear (``align_corners=False``, as TorchRay)."""
    sal = _as_maps(sal)
    if tuple(sal.shape[-2:]) == tuple(size):
        return sal
    return F.interpolate(sal, size=tuple(size), mode="bilinear", align_corners=False)


def boxes_to_mask(boxes: Sequence[Sequence[float]], size: Tuple[int, int],
                  device=None) -> torch.Tensor:
    """(H, W) bool mask of the union of boxes ``(xmin, ymin, xmax, ymax)``, pixel indices,
    inclusive on both ends (VOC's convention, 1-based coordinates converted by the caller)."""
    H, W = size
    m = torch.zeros(H, W, dtype=torch.bool, device=device)
    for x0, y0, x1, y1 in boxes:
        x0, y0 = max(0, int(math.floor(x0))), max(0, int(math.floor(y0)))
        x1, y1 = min(W - 1, int(math.ceil(x1))), min(H - 1, int(math.ceil(y1)))
        if x1 >= x0 and y1 >= y0:
            m[y0:y1 + 1, x0:x1 + 1] = True
    return m


# ------------------------------------------------------------------------ pointing game ----
def argmax_points(sal: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """(N, 2) integer (row, col) of each map's maximum after resizing to ``size`` (first one
    in row-major order on ties, like ``torch.argmax``)."""
    s = resize_maps(sal, size)
    idx = s.flatten(1).argmax(1)
    W = size[1]
    return torch.stack((idx // W, idx % W), 1)


def pointing_hits(sal: torch.Tensor, masks, tolerance: float = TOLERANCE) -> torch.Tensor:
    """(N,) bool: TorchRay's pointing-game hit of each map against its (N, H, W) mask.

    The map is resized to the mask's size; its maximum ``p`` is a hit when some mask pixel ``q``
    has ``|p - q|^2 < tolerance^2`` (TorchRay's acceptance disc). An empty mask is a miss.
    """
    masks = _as_masks(masks, _as_maps(sal).device)
    N, H, W = masks.shape
    pts = argmax_points(sal, (H, W)).to(masks.device)
    rows = torch.arange(H, device=masks.device, dtype=torch.float32)
    cols = torch.arange(W, device=masks.device, dtype=torch.float32)
    dr = (rows[None, :] - pts[:, :1].float()) ** 2          # (N, H)
    dc = (cols[None, :] - pts[:, 1:].float()) ** 2          # (N, W)
    accept = (dr[:, :, None] + dc[:, None, :]) < float(tolerance) ** 2
    return (accept & masks).flatten(1).any(1)


def pointing_game(sal: torch.Tensor, masks, tolerance: float = TOLERANCE) -> float:
    """Hit rate of :func:`pointing_hits` over the batch."""
    return float(pointing_hits(sal, masks, tolerance).float().mean())


def energy_in_mask(sal: torch.Tensor, masks) -> torch.Tensor:
    """(N,) share of each map's positive mass inside its mask (0 for a map with none)."""
    masks = _as_masks(masks, _as_maps(sal).device)
    s = resize_maps(sal, tuple(masks.shape[-2:]))[:, 0].clamp_min(0)
    total = s.flatten(1).sum(1)
    inside = (s * masks).flatten(1).sum(1)
    return torch.where(total > 0, inside / total.clamp_min(1e-30), torch.zeros_like(total))


def energy_pointing_game(sal: torch.Tensor, masks) -> float:
    """Mean over the batch of :func:`energy_in_mask`."""
    return float(energy_in_mask(sal, masks).mean())


def grid_pointing_game(maps: torch.Tensor, grid: Tuple[int, int] = (2, 2)) -> Dict[str, torch.Tensor]:
    """Grid pointing game on mosaics.

    ``maps``: (N, T, H, W) with T = rows * cols, map ``j`` explaining the class of tile ``j``
    (row-major). Returns ``{"share": (N, T)`` positive mass of map j in tile j,
    ``"hit": (N, T)`` bool, map j's maximum lies in tile j``}``. A random map scores 1/T.
    """
    if maps.dim() != 4:
        raise ValueError(f"expected (N, T, H, W) maps, got {tuple(maps.shape)}")
    rows, cols = grid
    N, T, H, W = maps.shape
    if T != rows * cols:
        raise ValueError(f"a {rows}x{cols} grid needs {rows * cols} maps per mosaic, got {T}")
    if H % rows or W % cols:
        raise ValueError(f"a {H}x{W} map does not split into a {rows}x{cols} grid")
    m = maps.detach().float()
    pos = m.clamp_min(0)
    tiles = pos.reshape(N, T, rows, H // rows, cols, W // cols).sum((3, 5)).flatten(2)  # (N,T,T)
    total = tiles.sum(-1)
    own = tiles.diagonal(dim1=1, dim2=2)
    share = torch.where(total > 0, own / total.clamp_min(1e-30), torch.zeros_like(own))
    idx = m.flatten(2).argmax(-1)                                            # (N, T)
    r, c = idx // W, idx % W
    tile = (r // (H // rows)) * cols + c // (W // cols)
    hit = tile == torch.arange(T, device=m.device)
    return {"share": share, "hit": hit}


# --------------------------------------------------------------- deletion / insertion ----
def gaussian_blur(x: torch.Tensor, klen: int = 11, sigma: float = 5.0) -> torch.Tensor:
    """RISE's insertion substrate: a depthwise ``klen`` x ``klen`` Gaussian (std ``sigma``),
    zero padding ``klen // 2`` (as RISE's ``conv2d(x, gkern(klen, nsig), padding=klen//2)``)."""
    r = klen // 2
    k = torch.arange(klen, device=x.device, dtype=x.dtype) - r
    k = torch.exp(-0.5 * (k / sigma) ** 2)
    k2 = torch.outer(k, k)
    k2 = k2 / k2.sum()
    C = x.shape[1]
    return F.conv2d(x, k2.expand(C, 1, klen, klen).contiguous(), padding=r, groups=C)


def rise_auc(curve: torch.Tensor) -> torch.Tensor:
    """RISE's ``auc``: trapezoids over ``n + 1`` equally spaced points on [0, 1]; (..., n+1)."""
    n = curve.shape[-1] - 1
    return (curve.sum(-1) - curve[..., 0] / 2 - curve[..., -1] / 2) / n


def _substrate(kind, x):
    if callable(kind):
        return kind(x)
    if isinstance(kind, torch.Tensor):
        return kind.to(x).expand_as(x)
    if kind == "zero":
        return torch.zeros_like(x)
    if kind == "blur":
        return gaussian_blur(x)
    raise ValueError(f"substrate must be 'zero', 'blur', a tensor or a callable, got {kind!r}")


@torch.no_grad()
def deletion_insertion(model: nn.Module, x: torch.Tensor, sal: torch.Tensor, target,
                       mode: str = "deletion", n_steps: int = 224, substrate=None,
                       batch_size: int = 64) -> Dict[str, torch.Tensor]:
    """RISE's causal metrics for a batch.

    Pixels are ranked by the map (resized to x's size; highest first, ties by index). Deletion
    starts from ``x`` and replaces ``ceil(H*W / n_steps)`` pixels per step by the substrate
    (default zeros in the model's input space, RISE's choice); insertion starts from the
    substrate (default RISE's blurred copy of ``x``) and copies pixels of ``x`` in. The target's
    softmax probability is read after each of the ``n_steps + 1`` states; all states of all
    images go through the model in batches of ``batch_size``.

    Returns ``{"curve": (N, n_steps + 1), "auc": (N,)}`` (:func:`rise_auc`).
    """
    if mode not in ("deletion", "insertion"):
        raise ValueError(f"mode must be 'deletion' or 'insertion', got {mode!r}")
    if substrate is None:
        substrate = "zero" if mode == "deletion" else "blur"
    N, C, H, W = x.shape
    s = resize_maps(sal, (H, W)).to(x.device).flatten(1)            # (N, HW)
    order = torch.sort(s, stable=True, dim=1, descending=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(H * W, device=x.device).expand(N, -1))
    step = math.ceil(H * W / n_steps)
    counts = (torch.arange(n_steps + 1, device=x.device) * step).clamp_max(H * W)  # (S,)
    base = _substrate(substrate, x)
    tgt = torch.as_tensor(target, device=x.device).reshape(-1).long()
    if tgt.numel() == 1:
        tgt = tgt.expand(N)
    S = n_steps + 1
    # flat list of (image, step) jobs, run in batches
    img_idx = torch.arange(N, device=x.device).repeat_interleave(S)
    step_idx = torch.arange(S, device=x.device).repeat(N)
    probs = torch.empty(N * S, device=x.device)
    src, dst = (base, x) if mode == "insertion" else (x, base)   # start state, revealed state
    for a in range(0, N * S, batch_size):
        ii, kk = img_idx[a:a + batch_size], step_idx[a:a + batch_size]
        changed = (rank[ii] < counts[kk][:, None]).view(-1, 1, H, W)   # (B, 1, H, W)
        xb = torch.where(changed, dst[ii], src[ii])
        p = torch.softmax(_logits_of(model(xb)).float(), 1)
        probs[a:a + batch_size] = p.gather(1, tgt[ii][:, None])[:, 0]
    curve = probs.view(N, S)
    return {"curve": curve, "auc": rise_auc(curve)}


def _logits_of(out):
    return model_logits(out)


# ------------------------------------------------------------- randomisation check ----
def _ranks(v: torch.Tensor) -> torch.Tensor:
    """Ranks along the last dim (ties broken by position; maps of floats rarely tie)."""
    r = torch.empty_like(v)
    idx = v.argsort(-1)
    r.scatter_(-1, idx, torch.arange(v.shape[-1], device=v.device, dtype=v.dtype)
               .expand_as(v).contiguous())
    return r


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N,) Spearman rank correlation between flattened maps a[i] and b[i]."""
    ra, rb = _ranks(a.flatten(1).double()), _ranks(b.flatten(1).double())
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    den = (ra.norm(dim=1) * rb.norm(dim=1)).clamp_min(1e-30)
    return ((ra * rb).sum(1) / den).float()


def ssim(a: torch.Tensor, b: torch.Tensor, win: int = 7) -> torch.Tensor:
    """(N,) mean SSIM of (N, 1, H, W) maps, each first scaled to [0, 1] by its own min/max
    (uniform ``win`` x ``win`` window, C1 = 0.01^2, C2 = 0.03^2, data range 1)."""
    def norm(m):
        m = _as_maps(m).double()
        lo = m.flatten(1).min(1).values.view(-1, 1, 1, 1)
        hi = m.flatten(1).max(1).values.view(-1, 1, 1, 1)
        return (m - lo) / (hi - lo).clamp_min(1e-30)
    a, b = norm(a), norm(b)
    pool = lambda t: F.avg_pool2d(t, win, 1)  # noqa: E731
    ma, mb = pool(a), pool(b)
    va, vb = pool(a * a) - ma * ma, pool(b * b) - mb * mb
    cov = pool(a * b) - ma * mb
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma * ma + mb * mb + c1) * (va + vb + c2))
    return s.flatten(1).mean(1).float()


def _param_layers_in_forward_order(model: nn.Module, x: torch.Tensor) -> List[str]:
    names = {m: n for n, m in model.named_modules()}
    seen: List[str] = []

    def hook(mod, inp, out):
        n = names[mod]
        if n not in seen:
            seen.append(n)
    from .baselines import forward_with_hooks
    forward_with_hooks(model, x[:1], [m for m in model.modules()
                                       if isinstance(m, (nn.Conv2d, nn.Linear))], hook)
    return seen


def _reinit_(mod: nn.Module, gen: torch.Generator) -> None:
    """Re-draw a Conv2d / Linear's weight (and bias) from N(0, std^2) with the std of the
    trained weight (so activations keep their scale), on the module's device."""
    with torch.no_grad():
        for p in (mod.weight, mod.bias):
            if p is None:
                continue
            std = float(p.float().std()) if p.numel() > 1 else 0.0
            std = std if std > 0 else 1e-2
            r = torch.randn(p.shape, generator=gen, dtype=torch.float32) * std
            p.copy_(r.to(p))


def model_randomization(model: nn.Module, method: Callable[[nn.Module], object], x: torch.Tensor,
                        target=None, n_stages: Optional[int] = 5, seed: int = 0,
                        absolute: bool = True) -> List[Dict[str, float]]:
    """Cascading randomisation (Adebayo et al. 2018): re-initialise Conv2d / Linear layers from
    the logits down and measure how far the maps move from the original model's.

    ``method(model)`` builds an explainer (e.g. ``tsgb_ext.TSGB`` or a baseline class). The
    original ``model`` is never changed: each stage works on a deep copy. Layers are taken in
    reverse forward order; with ``n_stages`` the cut points are spread evenly over them (None:
    one stage per layer). ``target`` defaults to the original model's top-1 and is kept fixed.
    Maps are compared as ``|map|`` when ``absolute`` (Adebayo's default), else signed.

    Returns one dict per stage: ``{"layer": the deepest layer re-initialised so far,
    "n_randomized": k, "spearman": mean rank correlation, "ssim": mean SSIM}``; the first entry
    (k = 0) compares the original with itself (1, 1). A method that passes the check shows both
    falling towards 0.
    """
    layers = _param_layers_in_forward_order(model, x)[::-1]
    if not layers:
        raise ValueError("the model has no Conv2d / Linear layer to randomise")
    if target is None:
        with torch.no_grad():
            target = _logits_of(model(x)).argmax(1)
    ref = method(model).attribute(x, target).detach()
    if absolute:
        ref = ref.abs()
    L = len(layers)
    if n_stages is None or n_stages >= L:
        cuts = list(range(1, L + 1))
    else:
        cuts = sorted(set(int(round(v)) for v in np.linspace(1, L, n_stages)))
    gen = torch.Generator().manual_seed(seed)
    out = [{"layer": "", "n_randomized": 0, "spearman": 1.0, "ssim": 1.0}]
    rnd = copy.deepcopy(model)
    mods = dict(rnd.named_modules())
    done = 0
    for k in cuts:
        for name in layers[done:k]:
            _reinit_(mods[name], gen)
        done = k
        m = method(rnd).attribute(x, target).detach()
        if absolute:
            m = m.abs()
        out.append({"layer": layers[k - 1], "n_randomized": k,
                    "spearman": float(spearman(ref, m).mean()), "ssim": float(ssim(ref, m).mean())})
    return out


# ------------------------------------------------------------------------------ Quantus ----
def explain_func(model, inputs, targets, method: str = "tsgb", device=None,
                 channel_first: Optional[bool] = None, **kwargs) -> np.ndarray:
    """Quantus's explanation function: ``explain_func(model, inputs, targets, **kwargs)``.

    ``inputs``: numpy (N, C, H, W) (or (N, H, W, C): detected when the last axis is 1 or 3 and
    the second is not, or forced with ``channel_first``); ``targets``: N class indices (numpy,
    list or int). ``method``: ``tsgb`` (default), ``gradient``, ``gradxinput``, ``guided`` or
    ``gradcam``; other keyword arguments (Quantus passes e.g. ``softmax``, ``device``) are
    accepted and ignored unless the method takes them. Returns float32 numpy (N, 1, H, W).
    ``model`` may be an ``nn.Module`` or a Quantus model wrapper (its ``get_model()`` is used).
    """
    from .baselines import make_method

    if not isinstance(model, nn.Module) and hasattr(model, "get_model"):
        model = model.get_model()
    if not isinstance(model, nn.Module):
        raise TypeError(f"explain_func needs a torch model, got {type(model).__name__}")
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    arr = inputs.detach().cpu().numpy() if isinstance(inputs, torch.Tensor) else np.asarray(inputs)
    if arr.ndim != 4:
        raise ValueError(f"inputs must be 4-D, got shape {arr.shape}")
    if channel_first is None:
        channel_first = not (arr.shape[-1] in (1, 3) and arr.shape[1] not in (1, 3))
    if not channel_first:
        arr = arr.transpose(0, 3, 1, 2)
    x = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).to(device)
    t = targets.detach().cpu().numpy() if isinstance(targets, torch.Tensor) else np.asarray(targets)
    t = np.broadcast_to(t.astype(np.int64).reshape(-1), (x.shape[0],)) if t.size == 1 \
        else t.astype(np.int64).reshape(-1)
    explainer = make_method(method, model)
    was_training = model.training
    model.eval()
    try:
        import warnings
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="tsgb_ext: using the pure-PyTorch")
            maps = explainer.attribute(x, torch.from_numpy(np.ascontiguousarray(t)))
    finally:
        model.train(was_training)
    return maps.detach().float().cpu().numpy()
