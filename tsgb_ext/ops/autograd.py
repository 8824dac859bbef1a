"""Autograd of the classifier op (``torch.ops.tsgb_ext.linear``), and the W+ / W- cache of its
rule. The per-layer ops have theirs in C++ (csrc/autograd.cpp). Registered by :mod:`.loader`
when tsgb_ext._C loads.
"""
from __future__ import annotations

import weakref
from typing import Tuple

import torch

from tsgb_hooks import rules as _rules

EPS = _rules.EPS
ops = torch.ops.tsgb_ext
_lib = "tsgb_ext::"


# ---- autograd -------------------------------------------------------------------------
# conv2d, conv2d_relu, conv2d_bn_act, batch_norm and avg_pool2d have their autograd in C++
# (csrc/autograd.cpp: one node per layer, no Python on the per-layer path). The classifier's
# linear op keeps a Python formula (below): its rule selects rows of W in Python.

# W+ and W- are prepared once per weight version, not per call. Keyed by id(weight) with a
# weak reference to check identity (tensors compare elementwise, so they cannot be dict keys).
_split_cache: dict = {}


def _capturing(t: torch.Tensor) -> bool:
    """True inside a CUDA-graph capture on the current stream (kernels launched now only run
    at replay)."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def _split_fresh(weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        w = weight.detach()
        w = w.double() if w.dtype == torch.float32 else w
        wp, wn = _rules.split_weight(w)
        return wp.contiguous(), wn.contiguous()


def split_weight(weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """W+ and W- of ``weight`` (float32 weights in float64), cached per weight version.

    Inside a CUDA-graph capture they are computed fresh and the cache is neither read nor
    written: tensors made there are filled only when the graph replays, so a cached pair would
    be garbage for an eager call before the first replay; and a cached pair read there would
    tie the graph to memory the cache frees (and to values it no longer updates) when the
    weight changes. Computed in the graph, the split follows the weight at every replay."""
    if torch.compiler.is_compiling() or torch._guards.detect_fake_mode((weight,)) is not None:
        w = weight.double() if weight.dtype == torch.float32 else weight
        return _rules.split_weight(w)
    if _capturing(weight):
        return _split_fresh(weight)
    key = (weight._version, weight.data_ptr(), weight.dtype, weight.device)
    hit = _split_cache.get(id(weight))
    if hit is not None and hit[0]() is weight and hit[1] == key:
        return hit[2], hit[3]
    wp, wn = _split_fresh(weight)
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
    return not _capturing(t)


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
