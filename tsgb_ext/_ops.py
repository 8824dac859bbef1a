"""Python side of the compiled ops: fake kernels (for torch.compile / opcheck), the classifier
op's autograd formula (torch.library.register_autograd; the per-layer ops have theirs in C++,
csrc/autograd.cpp), and the native backend object the model conversion uses. Only imported
when tsgb_ext._C loaded.
"""
from __future__ import annotations

import weakref
from typing import Tuple

import torch
from torch._prims_common import suggest_memory_format as _suggest_memory_format

from tsgb_hooks import rules as _rules

EPS = _rules.EPS
ops = torch.ops.tsgb_ext
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


# ---- autograd -------------------------------------------------------------------------
# conv2d, conv2d_relu, conv2d_bn_act, batch_norm and avg_pool2d have their autograd in C++
# (csrc/autograd.cpp: one node per layer, no Python on the per-layer path). The classifier's
# linear op keeps a Python formula (below): its rule selects rows of W in Python.

# W+ and W- are prepared once per weight version, not per call. Keyed by id(weight) with a
# weak reference to check identity (tensors compare elementwise, so they cannot be dict keys).
_split_cache: dict = {}


def split_weight(weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    if torch.compiler.is_compiling() or torch._guards.detect_fake_mode((weight,)) is not None:
        w = weight.double() if weight.dtype == torch.float32 else weight
        return _rules.split_weight(w)
    key = (weight._version, weight.data_ptr(), weight.dtype, weight.device)
    hit = _split_cache.get(id(weight))
    if hit is not None and hit[0]() is weight and hit[1] == key:
        return hit[2], hit[3]
    with torch.no_grad():
        w = weight.detach()
        w = w.double() if w.dtype == torch.float32 else w
        wp, wn = _rules.split_weight(w)
        wp, wn = wp.contiguous(), wn.contiguous()
    if len(_split_cache) > 64:
        for k in [k for k, v in _split_cache.items() if v[0]() is None]:
            del _split_cache[k]
    _split_cache[id(weight)] = (weakref.ref(weight), key, wp, wn)
    return wp, wn


def _linear_setup(ctx, inputs, output):
    x, weight, _bias = inputs
    ctx.save_for_backward(x, weight)


def _eager(t: torch.Tensor) -> bool:
    if torch.compiler.is_compiling() or torch._guards.detect_fake_mode((t,)) is not None:
        return False
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def linear_rule(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """TSGB-FC backward. float32 is computed in float64 (see tsgb_hooks.rules.linear_rule:
    the rule's built-in cancellation made it the largest float32 error; it is one small layer).

    On the CPU, in eager mode, only the classes with a non-zero output gradient take part
    (one-hot targets: N*T rows of W instead of all of them): exactly the same result, and no
    float64 copy of the whole weight (65 MB for VGG16's classifier). On CUDA (finding those
    classes would synchronise with the device) and in traced or graph-captured calls, which
    cannot look at the gradient's values, W+ and W- are prepared once per weight version."""
    cd = torch.float64 if x.dtype == torch.float32 else x.dtype
    out_features, shape = grad.shape[-1], x.shape
    g2, x2 = grad.reshape(-1, out_features), x.reshape(-1, shape[-1])
    if not grad.is_cuda and _eager(grad):
        cols = (g2 != 0).any(0).nonzero().squeeze(1)
        if cols.numel() == 0:
            return torch.zeros(grad.shape[:-1] + shape[-1:], dtype=grad.dtype, device=grad.device)
        with torch.no_grad():
            wp, wn = _rules.split_weight(weight.detach().index_select(0, cols).to(cd))
        g2 = g2.index_select(1, cols)
    else:
        wp, wn = split_weight(weight)
        wp, wn = wp.to(cd), wn.to(cd)
    gx = ops.linear_backward(g2.to(cd), x2.to(cd), wp.contiguous(), wn.contiguous(), EPS)
    return gx.reshape(grad.shape[:-1] + shape[-1:]).to(grad.dtype)


def _linear_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    return linear_rule(grad, x, weight), None, None


torch.library.register_autograd(_lib + "linear", _linear_backward, setup_context=_linear_setup)


# ---- the backend object ----------------------------------------------------------------
def _autocast(x: torch.Tensor, *tensors):
    """Under torch.autocast, cast like autocast does for conv/linear (to its lower-precision
    dtype); custom ops are not covered by autocast's own casting."""
    dev = x.device.type
    if dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        return tuple(t.to(dt) if t is not None and t.is_floating_point() else t
                     for t in (x,) + tensors)
    return (x,) + tensors


class NativeBackend:
    """The compiled backend, as the interface tsgb_ext's model conversion expects."""

    name = "native"

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
    def linear(x, weight, bias):
        x, weight, bias = _autocast(x, weight, bias)
        return ops.linear(x, weight, bias)

    linear_rule = staticmethod(linear_rule)


BACKEND = NativeBackend()
