"""Binding the functional calls the rules replace (conv2d, batch_norm, avg_pool2d, linear):
argument names and defaults, and conv padding resolved the way ATen does."""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F


def same_padding(x: torch.Tensor, weight: torch.Tensor, dilation) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """Resolve ``padding='same'`` exactly as ATen's ``_convolution_same`` does: symmetric
    padding where possible, the odd remainder padded explicitly on the right/bottom."""
    pad_l, pad_nd = [], [0, 0, 0, 0]
    for i in range(2):
        total = dilation[i] * (weight.shape[2 + i] - 1)
        left, right = total // 2, total - total // 2
        if right > left:
            pad_nd[2 * (1 - i) + 1] = right - left
        pad_l.append(left)
    if any(pad_nd):
        x = F.pad(x, pad_nd)
    return x, (pad_l[0], pad_l[1])


def conv_args(x: torch.Tensor, weight: torch.Tensor, padding, dilation):
    if isinstance(padding, str):
        if padding == "valid":
            return x, (0, 0)
        if padding == "same":
            return same_padding(x, weight, dilation)
        raise ValueError(f"unsupported conv padding {padding!r}")
    if isinstance(padding, int):
        return x, (padding, padding)
    padding = tuple(padding)
    return x, (padding * 2 if len(padding) == 1 else padding)


def pair(v):
    if isinstance(v, int):
        return (v, v)
    v = tuple(v)
    return v * 2 if len(v) == 1 else v


def pool_stride(stride, kernel_size):
    """avg_pool2d's stride argument: None or empty means the kernel size."""
    if stride is None or (not isinstance(stride, int) and len(stride) == 0):
        return kernel_size
    return stride


def bind_conv2d(args, kwargs):
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    defaults = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}
    bound = dict(defaults)
    bound.update(zip(names, args))
    bound.update(kwargs)
    return bound


def bind(names, defaults, args, kwargs):
    bound = dict(defaults)
    bound.update(zip(names, args))
    bound.update(kwargs)
    return bound


BN_NAMES = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum",
             "eps")
BN_DEFAULTS = {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5}
POOL_NAMES = ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
               "divisor_override")
POOL_DEFAULTS = {"stride": None, "padding": 0, "ceil_mode": False, "count_include_pad": True,
                  "divisor_override": None}
LINEAR_NAMES = ("input", "weight", "bias")
