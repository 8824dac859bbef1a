"""TSGB layers as autograd functions in plain PyTorch.

Each function's forward is torch's own functional op (so outputs are bit-identical to the
unconverted model); its backward applies the TSGB rule of ``rules.py``. Only ``x`` receives
a gradient; parameters never do.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F

from . import rules
from .backend import Backend


class _Conv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        y = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
        ctx.save_for_backward(x, y)
        ctx.geom = (tuple(weight.shape[2:]), stride, padding, dilation, groups)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, y = ctx.saved_tensors
        k, s, p, d, g = ctx.geom
        return rules.conv2d_rule(grad, x, y, k, s, p, d, g), None, None, None, None, None, None


class _BatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, running_mean, running_var, weight, bias, eps):
        y = F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)
        # Only x is saved: the output is often changed in place later (`out += identity`,
        # ReLU(inplace=True)); y is recomputed, bit-identically, in the backward.
        ctx.save_for_backward(x, running_mean, running_var, weight, bias)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx, grad):
        x, rm, rv, w, b = ctx.saved_tensors
        y = F.batch_norm(x, rm, rv, w, b, False, 0.0, ctx.eps)
        return rules.batch_norm_rule(grad, x, y), None, None, None, None, None


class _AvgPool2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, kernel_size, stride, padding, ceil_mode, count_include_pad,
                divisor_override):
        y = F.avg_pool2d(x, kernel_size, stride, padding, ceil_mode, count_include_pad,
                         divisor_override)
        ctx.save_for_backward(x, y)
        ctx.geom = (kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, y = ctx.saved_tensors
        return (rules.avg_pool2d_rule(grad, x, y, *ctx.geom),) + (None,) * 6


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        y = F.linear(x, weight, bias)
        ctx.save_for_backward(x, weight)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        return linear_rule(grad, x, w), None, None


def conv2d(x, weight, bias, stride, padding, dilation, groups):
    """``F.conv2d`` forward, TSGB-Conv backward. ``padding`` is a pair of ints."""
    return _Conv2d.apply(x, weight, bias, tuple(stride), tuple(padding), tuple(dilation),
                         int(groups))


def batch_norm(x, running_mean, running_var, weight, bias, eps):
    """Eval-mode ``F.batch_norm`` forward, TSGB BatchNorm backward."""
    return _BatchNorm.apply(x, running_mean, running_var, weight, bias, float(eps))


def avg_pool2d(x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
    """``F.avg_pool2d`` forward, TSGB AvgPool2d backward."""
    return _AvgPool2d.apply(x, kernel_size, stride, padding, ceil_mode, count_include_pad,
                            divisor_override)


def linear(x, weight, bias):
    """``F.linear`` forward, TSGB-FC backward (the classifier)."""
    return _Linear.apply(x, weight, bias)


def linear_rule(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """TSGB-FC backward for a 2-D or (..., in) input ``x``."""
    wp, wn = rules.split_weight(weight)
    shape = x.shape
    gx = rules.linear_rule(grad.reshape(-1, grad.shape[-1]), x.reshape(-1, shape[-1]), wp, wn)
    return gx.reshape(grad.shape[:-1] + shape[-1:])


class HooksBackend(Backend):
    """The pure-PyTorch backend: the rule ops, none of the optional ones (every capability
    keeps the base class's False)."""

    name = "hooks"
    conv2d = staticmethod(conv2d)
    batch_norm = staticmethod(batch_norm)
    avg_pool2d = staticmethod(avg_pool2d)
    linear = staticmethod(linear)
    linear_rule = staticmethod(linear_rule)


BACKEND = HooksBackend()
