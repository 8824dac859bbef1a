"""Fake kernels of the compiled ops (torch.compile, opcheck): output shapes, dtypes and memory
formats without computing anything. Registered by :mod:`.loader` when tsgb_ext._C loads.
"""
from __future__ import annotations

import torch
from torch._prims_common import suggest_memory_format as _suggest_memory_format

_lib = "tsgb_ext::"


# ---- fake kernels ---------------------------------------------------------------------
# Output memory formats must match the real kernels stride for stride (opcheck compares them):
#  * forward conv2d / avg_pool2d call torch's own op, so the fake runs torch's own meta kernel
#    (whose format choice, e.g. channels_last for a channels_last weight, is the real one);
#  * batch_norm and the backward ops allocate in x.suggest_memory_format() (the kernels'
#    pick_memory_format / torch's eval batch_norm), which is channels_last also for sliced or
#    otherwise non-dense channels_last views.
def _suggest_format(x):
    return _suggest_memory_format(x) if x.dim() == 4 else torch.contiguous_format


@torch.library.register_fake(_lib + "conv2d")
def _(x, weight, bias, stride, padding, dilation, groups):
    return torch.ops.aten.conv2d(x, weight, bias, stride, padding, dilation, groups)


@torch.library.register_fake(_lib + "conv2d_relu")
def _(x, weight, bias, stride, padding, dilation, groups):
    return torch.ops.aten.conv2d(x, weight, bias, stride, padding, dilation, groups)


@torch.library.register_fake(_lib + "conv2d_bn_act")
def _(x, weight, bias, stride, padding, dilation, groups, running_mean, running_var, bn_weight,
      bn_bias, bn_eps, act):
    y = torch.ops.aten.conv2d(x, weight, bias, stride, padding, dilation, groups)
    out = torch.empty(y.shape, dtype=y.dtype, device=y.device, memory_format=_suggest_format(y))
    return out, y


@torch.library.register_fake(_lib + "batch_norm")
def _(x, running_mean, running_var, weight, bias, eps):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device,
                       memory_format=_suggest_format(x))


@torch.library.register_fake(_lib + "avg_pool2d")
def _(x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
    return torch.ops.aten.avg_pool2d(x, kernel_size, stride, padding, ceil_mode,
                                     count_include_pad, divisor_override)


@torch.library.register_fake(_lib + "linear")
def _(x, weight, bias):
    return x.new_empty(tuple(x.shape[:-1]) + (weight.shape[0],))


def _grad_like_x(grad, x):
    return torch.empty((grad.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device,
                       memory_format=_suggest_format(x))


@torch.library.register_fake(_lib + "conv2d_backward")
def _(grad, x, y, kernel_size, stride, padding, dilation, groups, eps):
    return _grad_like_x(grad, x)


@torch.library.register_fake(_lib + "conv2d_bn_backward")
def _(grad, x, y, running_mean, running_var, bn_weight, bn_bias, bn_eps, act, kernel_size, stride,
      padding, dilation, groups, eps):
    return _grad_like_x(grad, x)


@torch.library.register_fake(_lib + "batch_norm_backward")
def _(grad, x, scale, shift, eps):
    return _grad_like_x(grad, x)


@torch.library.register_fake(_lib + "avg_pool2d_backward")
def _(grad, x, y, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override, eps):
    return _grad_like_x(grad, x)


@torch.library.register_fake(_lib + "linear_backward")
def _(grad, x, weight_pos, weight_neg, eps):
    return x.new_empty((grad.shape[0], x.shape[1]))


@torch.library.register_fake(_lib + "max_pool2d")
def _(x, kernel_size, stride, padding, dilation, ceil_mode):
    # the kernels' first check (common/checks.h): torch's max_pool2d would also take 3-D x
    torch._check(x.dim() == 4, lambda: "tsgb_ext.max_pool2d: x must be 4-D (N, C, H, W), got "
                 f"shape {list(x.shape)}")
    y = torch.ops.aten.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode)
    return torch.empty(y.shape, dtype=x.dtype, device=x.device, memory_format=_suggest_format(x))


@torch.library.register_fake(_lib + "max_pool2d_backward")
def _(grad, x, y, kernel_size, stride, padding, dilation, ceil_mode):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=_suggest_format(x))
