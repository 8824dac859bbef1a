"""The compiled backend object the model conversion uses (only imported when tsgb_ext._C
loaded)."""
from __future__ import annotations

import contextlib

import torch
from tsgb_hooks.backend import Backend

from .autograd import linear_rule

ops = torch.ops.tsgb_ext


# ---- the backend object ----------------------------------------------------------------
def _autocast(x: torch.Tensor, *tensors):
    """Under torch.autocast, cast like autocast does for conv/linear (to its lower-precision
    dtype); custom ops are not covered by autocast's own casting. As in autocast, only
    float32/float16/bfloat16 tensors are eligible, and nothing is cast unless the input is:
    a float64 call stays float64."""
    dev = x.device.type
    if dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev) and x.dtype in _ELIGIBLE:
        dt = torch.get_autocast_dtype(dev)
        return tuple(t.to(dt) if t is not None and t.dtype in _ELIGIBLE else t
                     for t in (x,) + tensors)
    return (x,) + tensors


#: what torch.autocast casts (its ``is_eligible``: floating, not float64)
_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)


class NativeBackend(Backend):
    """The compiled backend: the rule ops and every optional one (its capabilities, declared
    here, override the base class's False)."""

    name = "native"
    supports_fusion = True      # conv2d_bn_act: conv -> BN -> activation as one op
    supports_conv_relu = True   # conv2d_relu
    supports_max_pool = True    # max_pool2d: MaxPool2d computed without indices
    reuses_memory = True        # memory_hold / memory_release / memory_scope

    @staticmethod
    def conv2d(x, weight, bias, stride, padding, dilation, groups):
        x, weight, bias = _autocast(x, weight, bias)
        return ops.conv2d(x, weight, bias, list(stride), list(padding), list(dilation), int(groups))

    @staticmethod
    def conv2d_relu(x, weight, bias, stride, padding, dilation, groups):
        x, weight, bias = _autocast(x, weight, bias)
        return ops.conv2d_relu(x, weight, bias, list(stride), list(padding), list(dilation),
                               int(groups))

    @staticmethod
    def conv2d_bn_act(x, weight, bias, stride, padding, dilation, groups, running_mean,
                      running_var, bn_weight, bn_bias, bn_eps, act):
        """conv -> eval BatchNorm -> activation (0 none, 1 ReLU, 2 ReLU6), one autograd node."""
        x, weight, bias = _autocast(x, weight, bias)
        out, _y = ops.conv2d_bn_act(x, weight, bias, list(stride), list(padding), list(dilation),
                                    int(groups), running_mean, running_var, bn_weight, bn_bias,
                                    float(bn_eps), int(act))
        return out

    @staticmethod
    def batch_norm(x, running_mean, running_var, weight, bias, eps):
        return ops.batch_norm(x, running_mean, running_var, weight, bias, float(eps))

    @staticmethod
    def avg_pool2d(x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
        return ops.avg_pool2d(x, list(kernel_size), list(stride), list(padding), bool(ceil_mode),
                              bool(count_include_pad), divisor_override)

    @staticmethod
    def max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode):
        """``F.max_pool2d`` (same values, same gradient): on the CPU the compiled op (no
        int64 indices, vectorised; csrc/cpu/max_pool2d.cpp), elsewhere torch's own."""
        if x.device.type != "cpu" or x.dim() != 4 or not x.is_floating_point():
            return torch.nn.functional.max_pool2d(x, kernel_size, stride, padding, dilation,
                                                  ceil_mode=ceil_mode)
        return ops.max_pool2d(x, list(kernel_size), list(stride), list(padding), list(dilation),
                              bool(ceil_mode))

    @staticmethod
    def linear(x, weight, bias):
        x, weight, bias = _autocast(x, weight, bias)
        return ops.linear(x, weight, bias)

    linear_rule = staticmethod(linear_rule)

    # -- reuse of activation memory between CPU calls (csrc/cpu/activation_cache.cpp) ------
    @staticmethod
    def memory_hold() -> None:
        """Keep freed activation blocks for reuse until the matching ``memory_release``."""
        ops.activation_cache_hold()

    @staticmethod
    def memory_release() -> None:
        """Drop one hold; the last one frees every kept block."""
        ops.activation_cache_release()

    @staticmethod
    @contextlib.contextmanager
    def memory_scope():
        """This thread's CPU allocations of 64 KiB and more come from the kept blocks."""
        ops.activation_scope_enter()
        try:
            yield
        finally:
            ops.activation_scope_exit()

    @staticmethod
    def memory_stats() -> dict:
        """The cache's state: whether it is installed as torch's CPU allocator, holders, bytes
        kept and in use, reuse counts (hits: allocations served from kept blocks), and the
        bound on the bytes kept: the largest working set of a single call (the bytes that
        call's own allocations had in use at once) since the last holder released."""
        keys = ("installed", "holders", "cached_bytes", "in_use_bytes", "hits", "misses",
                "bound_bytes")
        return dict(zip(keys, ops.activation_cache_stats()))


BACKEND = NativeBackend()
