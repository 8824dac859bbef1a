"""The oracle: a literal float64 transcription of TSGB_SPEC.md, independent of the backends.

Nothing here imports tsgb_ext or tsgb_hooks. The rules are unfold-based, per output channel k
(no channel-summed shortcut), and the saliency map is computed by this module's own model
patching, from the spec alone:

* which calls get a rule: inside the forward of every ``nn.Conv2d`` (any subclass) each
  ``conv2d`` call, inside every ``nn.BatchNorm2d`` each ``batch_norm`` call, inside every
  ``nn.AvgPool2d`` each ``avg_pool2d`` call, inside the classifier (the last ``nn.Linear`` the
  forward runs, found by a first forward pass) its ``linear`` call. The calls are caught with a
  ``TorchFunctionMode`` active only while that module's own forward runs, so a subclass that
  pads (TF "same" padding) or calls the functional op itself is covered as the spec's layer;
  a padding module's ordinary gradient folds padded positions back;
* every other operation keeps its ordinary autograd gradient;
* several targets: one backward per target (no tiling, no shared graph tricks);
* map = sum over colour channels of gx * x.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

EPS = 1e-10
COMPUTE = torch.float64
"""The rules' arithmetic dtype (``saliency(..., rule_dtype=torch.float32)`` makes the whole
transcription float32: the yardstick of what float32 arithmetic costs on a model)."""
JITTER = None
"""``saliency(..., jitter=(generator, rel))`` sets this: every rule's output gradient, and the
classifier rule's ``beta``, are multiplied elementwise by ``1 + rel * s`` with random signs
``s = +-1`` (the same map with a rounding-sized error at each rule: the yardstick of what float64
rounding costs a map on a model, see ``float64_rounding_spread``)."""


def _jitter(t):
    """``t`` with the relative error ``JITTER`` asks for (``t`` itself when none)."""
    if JITTER is None:
        return t
    gen, rel = JITTER
    sign = torch.randint(0, 2, t.shape, generator=gen, device=t.device).to(t.dtype) * 2 - 1
    return t * (1 + rel * sign)


def _c(*ts):
    return tuple(t.to(COMPUTE) for t in ts)


def _tile(t, b):
    return t.repeat((b // t.shape[0],) + (1,) * (t.dim() - 1)) if b != t.shape[0] else t


# ---- the four rules, float64 ------------------------------------------------------------------
def conv_rule(g, x, y, kernel_size, stride, padding, dilation, groups, eps=EPS):
    """D[k,o] = sum_{c in group(k), i in window(o)} |x[c,i]|; R = g*y/(D+eps);
    gx[c,i] = sign(x[c,i]) * sum_{k in group(c), o: i in window(o)} R[k,o]."""
    g, x, y = _c(g, x, y)
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


def bn_rule(g, x, y, eps=EPS):
    """gx = g * y / (x + 1e-10); y is the module's own eval output (its eps inside the sqrt)."""
    g, x, y = _c(g, x, y)
    B = g.shape[0]
    return g * _tile(y, B) / (_tile(x, B) + eps)


def bn_eval(x, running_mean, running_var, weight, bias, module_eps):
    """The eval BatchNorm written out: (x - mean) / sqrt(var + module_eps) * weight + bias."""
    v = lambda t: t.double().view(1, -1, 1, 1)  # noqa: E731
    y = (x.double() - v(running_mean)) / torch.sqrt(v(running_var) + module_eps)
    if weight is not None:
        y = y * v(weight)
    if bias is not None:
        y = y + v(bias)
    return y


def bn_scale_shift(running_mean, running_var, weight, bias, module_eps):
    """The eval BatchNorm as y = x * scale + shift per channel, in float64."""
    scale = 1.0 / torch.sqrt(running_var.double() + module_eps)
    if weight is not None:
        scale = scale * weight.double()
    shift = -running_mean.double() * scale
    if bias is not None:
        shift = shift + bias.double()
    return scale, shift


ACT_MASK = {0: lambda yb: torch.ones_like(yb, dtype=torch.bool), 1: lambda yb: yb > 0,
            2: lambda yb: (yb > 0) & (yb < 6)}
"""Where the activation of a fused conv -> BN -> activation block passes its gradient: 0 none,
1 ReLU, 2 ReLU6 (the ``act`` codes of tsgb_ext's conv2d_bn ops)."""


def conv_bn_act_rule(g, x, y, scale, shift, act, kernel_size, stride, padding, dilation, groups,
                     eps=EPS):
    """The fused conv -> eval BN (y * scale + shift) -> activation rule as the three unfused
    rules in float64: the activation's gradient, the BN rule (divisor y + 1e-10; the BN's own
    eps is inside scale), the conv rule. The activation's mask tests the BN output rounded to
    y's dtype, as the forward stored it; the BN rule takes the unrounded value."""
    y64 = y.double()
    yb = y64 * scale.double().view(1, -1, 1, 1) + shift.double().view(1, -1, 1, 1)
    ga = g.double() * _tile(ACT_MASK[act](yb.to(y.dtype).double()), g.shape[0])
    return conv_rule(bn_rule(ga, y64, yb), x, y, kernel_size, stride, padding, dilation, groups,
                     eps)


def avgpool_rule(g, x, y, kernel_size, stride, padding, ceil_mode, count_include_pad,
                 divisor_override, eps=EPS):
    g, x, y = _c(g, x, y)
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
    g, x, W = _c(g, x, W)
    x = _tile(x, g.shape[0])
    Wp, Wn = W.clamp(min=0), W.clamp(max=0)
    zp, zn = x @ Wp.T, x @ Wn.T
    beta = torch.zeros_like(zp)
    ok = zn.abs() > eps
    beta[ok] = zp[ok] / zn.abs()[ok]
    # beta carries the rounding of two long sums: the one scalar per sample and class that
    # decides how exactly the classifier's relevance sums to zero
    return g @ Wp + (g * _jitter(beta)) @ Wn


# ---- autograd functions: output = the op's own output, backward = the rule -------------------
class _Rule(torch.autograd.Function):
    """y = the op's output (computed outside); backward sends rule(g) to x only."""

    @staticmethod
    def forward(ctx, x, y, rule):
        ctx.save_for_backward(x, y.clone())  # the model may change y in place later
        ctx.rule = rule
        return y.clone()

    @staticmethod
    def backward(ctx, g):
        x, y = ctx.saved_tensors
        return _jitter(ctx.rule(g, x, y)).to(g.dtype), None, None


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _arg(args, kwargs, i, name, default=None):
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


class _Catch(TorchFunctionMode):
    """Replaces the backward of one functional op, while one module's own forward runs."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind

    MATCH = {"conv": (F.conv2d,), "bn": (F.batch_norm,), "pool": (F.avg_pool2d,),
             "fc": (F.linear,)}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in self.MATCH[self.kind]:
            return func(*args, **kwargs)  # every other op: its ordinary gradient
        with torch.no_grad():
            y = func(*args, **kwargs)
        if self.kind == "conv":
            x, w = args[0], _arg(args, kwargs, 1, "weight")
            stride = _pair(_arg(args, kwargs, 3, "stride", 1))
            padding = _arg(args, kwargs, 4, "padding", 0)
            dilation = _pair(_arg(args, kwargs, 5, "dilation", 1))
            groups = _arg(args, kwargs, 6, "groups", 1)
            if isinstance(padding, str):  # 'same' / 'valid': pad explicitly, as ATen does
                pads = []
                for d, k in zip(reversed(dilation), reversed(w.shape[2:])):
                    total = 0 if padding == "valid" else d * (k - 1)
                    pads += [total // 2, total - total // 2]
                xp = F.pad(x, pads)
                rule = lambda g, a, b: conv_rule(g, a, b, tuple(w.shape[2:]), stride, (0, 0),  # noqa
                                                 dilation, groups)
                return _Rule.apply(xp, y, rule)
            padding = _pair(padding)
            rule = lambda g, a, b: conv_rule(g, a, b, tuple(w.shape[2:]), stride, padding,  # noqa
                                             dilation, groups)
            return _Rule.apply(x, y, rule)
        if self.kind == "bn":
            return _Rule.apply(args[0], y, bn_rule)
        if self.kind == "pool":
            x = args[0]
            k = _pair(_arg(args, kwargs, 1, "kernel_size"))
            s = _arg(args, kwargs, 2, "stride", None)
            s = k if s is None or (not isinstance(s, int) and len(s) == 0) else _pair(s)
            p = _pair(_arg(args, kwargs, 3, "padding", 0))
            cm = _arg(args, kwargs, 4, "ceil_mode", False)
            cip = _arg(args, kwargs, 5, "count_include_pad", True)
            div = _arg(args, kwargs, 6, "divisor_override", None)
            rule = lambda g, a, b: avgpool_rule(g, a, b, k, s, p, cm, cip, div)  # noqa: E731
            return _Rule.apply(x, y, rule)
        x, w = args[0], _arg(args, kwargs, 1, "weight")  # fc
        return _Rule.apply(x, y, lambda g, a, b: fc_rule(g, a, w))


def _classifier(model, x):
    """The last nn.Linear the forward pass runs."""
    order = []
    hs = [m.register_forward_hook(lambda mod, i, o: order.append(mod))
          for m in model.modules() if isinstance(m, nn.Linear)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hs:
            h.remove()
    if not order:
        raise ValueError("reference: the model runs no nn.Linear")
    return order[-1]


def _patch(model, classifier):
    for m in model.modules():
        kind = ("conv" if isinstance(m, nn.Conv2d) else "bn" if isinstance(m, nn.BatchNorm2d)
                else "pool" if isinstance(m, nn.AvgPool2d) else "fc" if m is classifier else None)
        if kind is None:
            continue

        def fwd(*a, _m=m, _kind=kind, **kw):
            with _Catch(_kind):
                return type(_m).forward(_m, *a, **kw)
        m.forward = fwd


def _targets(target, logits):
    N = logits.shape[0]
    if target is None:
        return logits.argmax(1).view(N, 1)
    t = torch.as_tensor(target, dtype=torch.long)
    if t.dim() == 0:
        return t.expand(N).reshape(N, 1)
    return t.view(N, 1) if t.dim() == 1 else t.view(N, -1)


def saliency(model, x, target, dtype=torch.float64, rule_dtype=torch.float64, jitter=None):
    """The spec's map on a private copy of ``model`` in ``dtype``, the rules computed in
    ``rule_dtype`` (``jitter``: see ``JITTER``). Returns (N, T, H, W) for (N, T) targets, else
    (N, 1, H, W), as float64."""
    global COMPUTE, JITTER
    old, COMPUTE = COMPUTE, rule_dtype
    old_jitter, JITTER = JITTER, jitter
    try:
        return _saliency(model, x, target, dtype)
    finally:
        COMPUTE, JITTER = old, old_jitter


def _saliency(model, x, target, dtype):
    m = copy.deepcopy(model).to(dtype).eval()
    for p in m.parameters():
        p.requires_grad_(False)
    for mod in m.modules():  # saved activations must not be overwritten
        if hasattr(mod, "inplace"):
            mod.inplace = False
    xx = x.detach().to(dtype)
    classifier = _classifier(m, xx)
    _patch(m, classifier)
    xx = xx.clone().requires_grad_(True)
    with torch.enable_grad():
        logits = m(xx)
    tg = _targets(target, logits.detach())
    maps = []
    for j in range(tg.shape[1]):
        onehot = torch.zeros_like(logits).scatter_(1, tg[:, j:j + 1].to(logits.device), 1.0)
        (gx,) = torch.autograd.grad(logits, xx, onehot, retain_graph=True)
        maps.append((gx.double() * xx.detach().double()).sum(1, keepdim=True))
    t = torch.as_tensor(target) if target is not None else None
    multi = t is not None and t.dim() == 2
    return torch.cat(maps, 1) if multi else maps[0]


def reference_saliency(model, x, target):
    """The spec's map in float64: model and x as float64 copies."""
    return saliency(model, x, target, torch.float64)


def reference_saliency_same_forward(model, x, target):
    """The literal rules, computed in float64, on the model's own (e.g. float32) forward."""
    return saliency(model, x, target, x.dtype)


def plain_float32_saliency(model, x, target):
    """The whole transcription in float32 (forward and rules): a float32 map's yardstick."""
    return saliency(model, x, target, torch.float32, torch.float32)


FLOAT64_ULP = torch.finfo(torch.float64).eps  # 2**-52: one unit in the last place at 1.0


def float64_rounding_spread(model, x, target, want=None, seeds=(1, 2)):
    """What float64 rounding costs a map on this model and input: the largest relative L2
    difference, over ``seeds``, between the float64 reference and the same reference with every
    rule's output gradient and the classifier's beta given an independent relative error of
    2**-52 (one ulp at 1.0), of random sign, per element (``jitter``). Two correct float64
    implementations of the rules differ by errors of that size (other summation orders, fused
    multiply-adds, BLAS blockings: on inception_v3 the native backend's beta is 2.4 ulp from
    this module's); where the map amplifies them (the classifier rule makes relevance cancel,
    every conv rule divides channel sums that then cancel), a correct backend is that far from
    the reference, and no closer bound is honest."""
    if want is None:
        want = reference_saliency(model, x, target)
    worst = 0.0
    for seed in seeds:
        gen = torch.Generator().manual_seed(seed)
        got = saliency(model, x, target, torch.float64, torch.float64, (gen, FLOAT64_ULP))
        worst = max(worst, ((got - want).norm() / want.norm().clamp_min(1e-300)).item())
    return worst
