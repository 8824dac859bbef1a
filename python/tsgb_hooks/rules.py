"""The four TSGB backward rules of TSGB_SPEC.md, in plain PyTorch.

Each rule maps the gradient ``grad`` arriving at a layer's output to the gradient sent to its
input. They are written for any floating dtype; half types are computed in float32 and cast
back. ``grad`` may hold ``T * N`` samples for ``N`` saved activations (sample ``b`` of the
gradient pairs with activation ``b % N``), so that ``T`` targets can share one forward pass.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

EPS = 1e-10
"""The spec's stabiliser of every division in the four rules (the BatchNorm rule's too: a BN
module's own eps belongs only inside its forward)."""

_HALF = (torch.float16, torch.bfloat16)


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float32 if t.dtype in _HALF else t.dtype


def _store(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast a rule's result back to ``dtype``. Half types saturate at their largest finite
    value instead of becoming inf (the rules divide by activations, so a float32-finite
    result can exceed float16's 65504, and inf * 0 in the next layer would be NaN); the
    compiled kernels do the same."""
    if dtype in _HALF:
        m = torch.finfo(dtype).max
        t = t.clamp(-m, m)
    return t.to(dtype)


def _tile(t: torch.Tensor, batch: int) -> torch.Tensor:
    """Repeat saved activations along the batch to match a T*N gradient batch."""
    n = t.shape[0]
    if batch == n:
        return t
    if n == 0 or batch % n:
        raise ValueError(f"grad batch {batch} is not a multiple of the activation batch {n}")
    return t.repeat((batch // n,) + (1,) * (t.dim() - 1))


def _pair(v) -> Tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    v = tuple(int(a) for a in v)
    return (v[0], v[0]) if len(v) == 1 else (v[0], v[1])


def conv2d_rule(grad: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                dilation: Sequence[int], groups: int, eps: float = EPS) -> torch.Tensor:
    """TSGB-Conv, group-aware (the groups == 1 case is the channel-summed form).

    Per group: s = sum_k grad*y, d = box sum of sum_c |x|, r = s / (d + eps),
    t = transposed box sum of r, gx = sign(x) * t. No weights, no convolution recomputed.
    """
    out_dtype = grad.dtype
    cd = _compute_dtype(x)
    x = x.to(cd)
    y = y.to(cd)
    grad = grad.to(cd)
    B = grad.shape[0]
    N, C, H, W = x.shape
    K, Ho, Wo = y.shape[1:]
    G = int(groups)
    kh, kw = _pair(kernel_size)
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)

    s = (grad * _tile(y, B)).reshape(B, G, K // G, Ho, Wo).sum(2)
    a = x.abs().reshape(N, G, C // G, H, W).sum(2)
    ones = torch.ones(G, 1, kh, kw, dtype=cd, device=x.device)
    d = F.conv2d(a, ones, None, stride, padding, dilation, G)
    r = s / (_tile(d, B) + eps)
    t = torch.nn.grad.conv2d_input((B, G, H, W), ones, r, stride, padding, dilation, G)
    gx = _tile(x.sign(), B).reshape(B, G, C // G, H, W) * t.unsqueeze(2)
    return _store(gx.reshape(B, C, H, W), out_dtype)


def bn_scale_shift(running_mean: torch.Tensor, running_var: torch.Tensor,
                   weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                   eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """The eval-mode BatchNorm as an affine map per channel: y = x * scale + shift (float32+)."""
    cd = torch.float32 if running_var.dtype in _HALF else running_var.dtype

    def as_cd(t):  # no-op casts would hand the same tensor back (an alias torch.library flags)
        return t if t.dtype == cd else t.to(cd)
    scale = torch.rsqrt(as_cd(running_var) + eps)
    if weight is not None:
        scale = scale * as_cd(weight)
    shift = -as_cd(running_mean) * scale
    if bias is not None:
        shift = shift + as_cd(bias)
    return scale, shift


def batch_norm_rule(grad: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                    eps: float = EPS) -> torch.Tensor:
    """BatchNorm2d: gx = grad * y / (x + 1e-10), y the module's own eval output.

    The divisor's stabiliser is the spec's eps, never the module's: ``x * gx = grad * y`` then
    holds (relevance passes unchanged) for all but ``|x| < ~1e-9``, and there is no pole at
    ``x = -module.eps`` (TSGB_SPEC.md, BatchNorm2d)."""
    cd = _compute_dtype(x)
    B = grad.shape[0]
    gx = grad.to(cd) * _tile(y.to(cd), B) / (_tile(x.to(cd), B) + eps)
    return _store(gx, grad.dtype)


def avg_pool2d_rule(grad: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                    kernel_size, stride, padding, ceil_mode: bool, count_include_pad: bool,
                    divisor_override: Optional[int], eps: float = EPS) -> torch.Tensor:
    """AvgPool2d: gx = avg_pool2d_backward(grad * y) / (x + eps)."""
    cd = _compute_dtype(x)
    B = grad.shape[0]
    xt = _tile(x.to(cd), B)
    kernel_size = _pair(kernel_size)
    stride = _pair(stride) if stride else kernel_size
    gy = grad.to(cd) * _tile(y.to(cd), B)
    back = torch.ops.aten.avg_pool2d_backward(gy, xt, list(kernel_size), list(stride),
                                              list(_pair(padding)), bool(ceil_mode),
                                              bool(count_include_pad), divisor_override)
    return _store(back / (xt + eps), grad.dtype)


def split_weight(weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """W+ = max(W, 0) and W- = min(W, 0)."""
    return weight.clamp(min=0), weight.clamp(max=0)


def linear_rule(grad: torch.Tensor, x: torch.Tensor, weight_pos: torch.Tensor,
                weight_neg: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """TSGB-FC: gx = grad W+ + (grad * beta) W-, beta = zp / |zn|.

    Where ``|zn| <= eps`` (no negative evidence to balance, e.g. the input is zero on every
    negative weight of that class) beta is defined as 0: the rule then reduces to ``grad W+``.
    The negative term's relevance ``x . W- * beta = zn * beta`` is zero there in any case, so
    this choice loses nothing and keeps every output finite.

    float32 inputs are computed in float64: the rule balances positive against negative
    evidence, and float32 cancellation here was the largest error of a whole float32 map
    (5e-5 relative on ResNet50, 4e-6 with this layer in float64). It is one small layer.
    """
    cd = torch.float64 if x.dtype == torch.float32 else _compute_dtype(x)
    B = grad.shape[0]
    x = _tile(x.to(cd), B)
    wp, wn = weight_pos.to(cd), weight_neg.to(cd)
    zp = x @ wp.t()
    azn = (x @ wn.t()).abs()
    ok = azn > eps
    beta = torch.where(ok, zp / torch.where(ok, azn, torch.ones_like(azn)), torch.zeros_like(zp))
    g = grad.to(cd)
    return _store(g @ wp + (g * beta) @ wn, grad.dtype)
