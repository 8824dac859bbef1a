"""The oracle: a literal float64 transcription of TSGB_SPEC.md, written independently of the
backends (unfold-based, per output channel k, no channel-summed shortcut).

``ReferenceBackend`` plugs these rules into the same model conversion, so a model converted with
it computes the spec's saliency in float64.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-10


def _tile(t, b):
    return t.repeat((b // t.shape[0],) + (1,) * (t.dim() - 1)) if b != t.shape[0] else t


def conv_rule(g, x, y, kernel_size, stride, padding, dilation, groups, eps=EPS):
    """D[k,o] = sum_{c in group(k), i in window(o)} |x[c,i]|; R = g*y/(D+eps);
    gx[c,i] = sign(x[c,i]) * sum_{k in group(c), o: i in window(o)} R[k,o]."""
    g, x, y = g.double(), x.double(), y.double()
    B = g.shape[0]
    x, y = _tile(x, B), _tile(y, B)
    N, C, H, W = x.shape
    K, Ho, Wo = y.shape[1:]
    G = groups
    kh, kw = kernel_size
    cols = F.unfold(x.abs(), (kh, kw), dilation=dilation, padding=padding, stride=stride)
    cols = cols.view(N, G, (C // G) * kh * kw, Ho * Wo)
    Dg = cols.sum(2)  # (N, G, L): the same for every k of a group
    D = Dg.repeat_interleave(K // G, dim=1)  # (N, K, L)
    R = g.reshape(N, K, -1) * y.reshape(N, K, -1) / (D + eps)
    # distribute R[k,o] to every (c, i) of k's group and window
    Rg = R.view(N, G, K // G, -1).sum(2)  # (N, G, L)
    spread = Rg.unsqueeze(2).expand(N, G, (C // G) * kh * kw, Ho * Wo).reshape(N, C * kh * kw, -1)
    t = F.fold(spread, (H, W), (kh, kw), dilation=dilation, padding=padding, stride=stride)
    return x.sign() * t


def bn_rule(g, x, y, eps):
    g, x, y = g.double(), x.double(), y.double()
    B = g.shape[0]
    return g * _tile(y, B) / (_tile(x, B) + eps)


def avgpool_rule(g, x, y, kernel_size, stride, padding, ceil_mode, count_include_pad,
                 divisor_override, eps=EPS):
    g, x, y = g.double(), x.double(), y.double()
    B = g.shape[0]
    x, y = _tile(x, B), _tile(y, B)
    # avg_pool2d_backward(g*y) is the vector-Jacobian product of avg_pool2d
    xx = x.detach().requires_grad_(True)
    with torch.enable_grad():
        out = F.avg_pool2d(xx, kernel_size, stride, padding, ceil_mode, count_include_pad,
                           divisor_override)
        (back,) = torch.autograd.grad(out, xx, g * y)
    return back / (x + eps)


def fc_rule(g, x, W, eps=EPS):
    g, x, W = g.double(), x.double(), W.double()
    x = _tile(x, g.shape[0])
    Wp, Wn = W.clamp(min=0), W.clamp(max=0)
    zp, zn = x @ Wp.T, x @ Wn.T
    beta = torch.zeros_like(zp)
    ok = zn.abs() > eps
    beta[ok] = zp[ok] / zn.abs()[ok]
    return g @ Wp + (g * beta) @ Wn


class _Conv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, stride, padding, dilation, groups):
        y = F.conv2d(x, w, b, stride, padding, dilation, groups)
        ctx.save_for_backward(x, y)
        ctx.args = (tuple(w.shape[2:]), stride, padding, dilation, groups)
        return y

    @staticmethod
    def backward(ctx, g):
        x, y = ctx.saved_tensors
        return (conv_rule(g, x, y, *ctx.args).to(g.dtype),) + (None,) * 6


class _BN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, rm, rv, w, b, eps):
        y = F.batch_norm(x, rm, rv, w, b, False, 0.0, eps)
        ctx.save_for_backward(x, y.clone())
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx, g):
        x, y = ctx.saved_tensors
        return (bn_rule(g, x, y, ctx.eps).to(g.dtype),) + (None,) * 5


class _Pool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, *args):
        y = F.avg_pool2d(x, *args)
        ctx.save_for_backward(x, y)
        ctx.args = args
        return y

    @staticmethod
    def backward(ctx, g):
        x, y = ctx.saved_tensors
        return (avgpool_rule(g, x, y, *ctx.args).to(g.dtype),) + (None,) * 6


class _FC(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w)
        return F.linear(x, w, b)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        return fc_rule(g, x, w).to(g.dtype), None, None


class ReferenceBackend:
    name = "reference"

    @staticmethod
    def conv2d(x, w, b, stride, padding, dilation, groups):
        return _Conv.apply(x, w, b, tuple(stride), tuple(padding), tuple(dilation), groups)

    @staticmethod
    def batch_norm(x, rm, rv, w, b, eps):
        return _BN.apply(x, rm, rv, w, b, eps)

    @staticmethod
    def avg_pool2d(x, k, s, p, ceil_mode, cip, div):
        return _Pool.apply(x, tuple(k), tuple(s), tuple(p), ceil_mode, cip, div)

    @staticmethod
    def linear(x, w, b):
        return _FC.apply(x, w, b)

    @staticmethod
    def linear_rule(g, x, w):
        return fc_rule(g, x, w).to(g.dtype)


REFERENCE = ReferenceBackend()


def reference_saliency_same_forward(model, x, target):
    """The literal rules, computed in float64, on the model's own (e.g. float32) forward."""
    import tsgb_ext
    ex = tsgb_ext.TSGB(model, backend="hooks")
    ex._backend_for = lambda device: REFERENCE
    return ex.attribute(x, target)


def reference_saliency(model, x, target):
    """The spec's map in float64: model and x are converted to double copies."""
    import copy

    import tsgb_ext
    m64 = copy.deepcopy(model).double().eval()
    ex = tsgb_ext.TSGB(m64, backend="hooks")
    orig = ex._backend_for

    ex._backend_for = lambda device: REFERENCE  # the same conversion, the literal rules
    try:
        return ex.attribute(x.double(), target)
    finally:
        ex._backend_for = orig
