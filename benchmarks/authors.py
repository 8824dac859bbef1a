"""The authors' TSGB formulation, re-implemented in plain PyTorch as the benchmarks' "before".

A faithful transcription of the published code (github.com/123fxdx/CNNvisualizationTSGB,
``explainer/RGBP_cbp/functionsGBP.py`` and ``rgbp.py``), modernised only where old PyTorch
APIs are gone (``Variable``, ``ctx.saved_variables``) and made device/dtype-agnostic. As in
their code, every ``Conv2d``, ``BatchNorm2d``, ``AvgPool2d`` and the classifier ``Linear`` get
an instance ``forward`` that runs a ``torch.autograd.Function`` whose backward is the TSGB
rule; the Functions save only their *inputs*, so each backward **recomputes** the layer's
forward:

* Conv2d (``WoneConv2dG``): ``y = conv2d(x, W, b)`` is recomputed (a full convolution), then
  ``s = sum_k g*y``, ``d = conv2d(sum_c |x|, ones(1,1,kh,kw))``,
  ``gx = sign(x) * conv_transpose2d(s / (d + 1e-10), ones(1,1,kh,kw)).repeat(1, C, 1, 1)``.
  This is their active ("slim") code. ``variant="full"`` uses the fallback they left
  commented out: ``d = conv2d(|x|, ones_like(W), groups)`` and
  ``gx = sign(x) * conv_transpose2d((g*y) / (d + 1e-10), ones_like(W), groups)``, i.e. two
  more full-size convolutions. Both ignore nothing for ``groups == 1``; the slim code is
  wrong for ``groups > 1`` (the spec's group-aware rule is not what they ran).
* BatchNorm2d (``LRPBNG``): ``y = batch_norm(x, ..., training=False)`` is recomputed with
  ``F.batch_norm``'s default eps 1e-5 (the module's own eps is ignored, as in their code;
  ``bn_y_eps=None`` recomputes it with the module's eps, as TSGB_SPEC.md says), then
  ``gx = g * y / (x + 1e-10)`` (their literal divisor, ``BN_DIV_EPS``).
* AvgPool2d (``PreHook_AP`` / ``PostHook_AP``): ``gx = avg_pool2d_backward(g * y) / (x + 1e-10)``.
* classifier Linear (``CLinearG``): ``beta = (x W+^T) / |x W-^T|`` (no guard for ``|zn| = 0``),
  ``gx = g W+ + (g * beta) W-``.

Everything else keeps its ordinary gradient. The map is ``sum_c(gx * x)``. In-place ReLUs are
turned off while converted (the authors' model files do that), and restored afterwards.

Deviation from their driver (``rgbp.py``): they call ``output.backward`` with parameters that
require grad, which also computes weight gradients of the un-wrapped Linears (VGG16's first
two FC layers, ~120M parameters). Here the input gradient is taken with
``torch.autograd.grad(logits, x)`` so no parameter gradient is computed, exactly as for the
plain-gradient and tsgb_ext rows. The backward runs under the forward's autocast state
(``torch.amp.custom_fwd/custom_bwd``), so the recomputed convolutions can run in bf16.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # torch >= 2.4
    _custom_fwd = torch.amp.custom_fwd(device_type="cuda")
    _custom_bwd = torch.amp.custom_bwd(device_type="cuda")
except (AttributeError, TypeError):  # pragma: no cover
    _custom_fwd = torch.cuda.amp.custom_fwd
    _custom_bwd = torch.cuda.amp.custom_bwd

EPS = 1e-10
BN_DIV_EPS = 1e-10
"""The BN rule's denominator ``x + BN_DIV_EPS``: ``functionsGBP.py`` divides by ``inp + 1e-10``,
as TSGB_SPEC.md does (the module's eps belongs inside the forward only). ``bn_div_eps`` can
be changed to study the effect; an earlier version of this project used the module's eps."""
BN_Y_EPS = 1e-5
"""The eps of the BN output recomputed in the backward: ``F.batch_norm``'s default, as in
their code. ``None``: the module's own eps (the spec's reading; equal for eps-1e-5 models)."""


class CLinearG(torch.autograd.Function):
    @staticmethod
    @_custom_fwd
    def forward(ctx, inp, weight, bias=None):
        ctx.save_for_backward(inp, weight, bias)
        output = inp.matmul(weight.t())
        if bias is not None:
            output = output + bias
        return output

    @staticmethod
    @_custom_bwd
    def backward(ctx, grad_output):
        inp, weight, bias = ctx.saved_tensors
        w_pos = weight.clone().clamp(min=0)
        output_pos = inp.matmul(w_pos.t())
        w_neg = weight.clone().clamp(max=0)
        output_neg = inp.matmul(w_neg.t())
        beta = output_pos / output_neg.abs()
        gw_pos = grad_output.matmul(w_pos)
        gw_neg = (grad_output * beta).matmul(w_neg)
        return gw_pos + gw_neg, None, None


class LRPBNG(torch.autograd.Function):
    @staticmethod
    @_custom_fwd
    def forward(ctx, inp, running_mean, running_var, weight, bias, module_eps, div_eps, y_eps):
        ctx.div_eps = div_eps
        ctx.y_eps = module_eps if y_eps is None else y_eps
        output = F.batch_norm(inp, running_mean, running_var, weight=weight, bias=bias,
                              training=False, eps=module_eps)
        ctx.save_for_backward(inp, running_mean, running_var, weight, bias)
        return output

    @staticmethod
    @_custom_bwd
    def backward(ctx, grad_output):
        inp, running_mean, running_var, weight, bias = ctx.saved_tensors
        # recomputed with F.batch_norm's default eps (1e-5), as the authors do (BN_Y_EPS)
        output = F.batch_norm(inp, running_mean, running_var, weight=weight, bias=bias,
                              training=False, eps=ctx.y_eps)
        grad_input = grad_output * output / (inp + ctx.div_eps)
        return grad_input, None, None, None, None, None, None, None


class WoneConv2dG(torch.autograd.Function):
    @staticmethod
    @_custom_fwd
    def forward(ctx, inp, weight, bias, stride, padding, dilation, groups, full):
        ctx.save_for_backward(inp, weight, bias)
        ctx.conf = (stride, padding, dilation, groups, full)
        return F.conv2d(inp, weight, bias, stride=stride, padding=padding, dilation=dilation,
                        groups=groups)

    @staticmethod
    @_custom_bwd
    def backward(ctx, grad_output):
        inp, weight, bias = ctx.saved_tensors
        stride, padding, dilation, groups, full = ctx.conf
        # the convolution is recomputed
        output = F.conv2d(inp, weight, bias, stride=stride, padding=padding, dilation=dilation,
                          groups=groups)
        c_output = grad_output * output
        inp_norm = torch.abs(inp)
        outpadding1 = inp.size(2) - ((grad_output.size(2) - 1) * stride[0] - 2 * padding[0]
                                     + dilation[0] * (weight.size(2) - 1) + 1)
        outpadding2 = inp.size(3) - ((grad_output.size(3) - 1) * stride[1] - 2 * padding[1]
                                     + dilation[1] * (weight.size(3) - 1) + 1)
        if not full:  # their active "slim code for accelerate"
            one_weight = torch.ones([1, 1, weight.shape[2], weight.shape[3]],
                                    dtype=inp_norm.dtype, device=inp.device)
            in_sum = inp_norm.sum(1, True)
            out = F.conv2d(in_sum, one_weight, None, stride=stride, padding=padding,
                           dilation=dilation, groups=1)
            c_output_sum = c_output.sum(1, True)
            normalized_c_output_sum = c_output_sum / (out + EPS)
            gw = F.conv_transpose2d(normalized_c_output_sum, one_weight, None, stride=stride,
                                    padding=padding, dilation=dilation, groups=1,
                                    output_padding=(outpadding1, outpadding2))
            gw = gw.repeat(1, inp.size(1), 1, 1)
        else:  # their commented-out fallback: full convolutions with ones weights
            one_weight = torch.ones_like(weight, dtype=inp_norm.dtype)
            out = F.conv2d(inp_norm, one_weight, None, stride=stride, padding=padding,
                           dilation=dilation, groups=groups)
            normalized_c_output = c_output / (out + EPS)
            gw = F.conv_transpose2d(normalized_c_output, one_weight, None, stride=stride,
                                    padding=padding, dilation=dilation, groups=groups,
                                    output_padding=(outpadding1, outpadding2))
        gw = gw * inp.sign()
        return gw, None, None, None, None, None, None, None


class PreHook_AP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input):
        ctx.save_for_backward(input)
        return input.clone()

    @staticmethod
    def backward(ctx, grad_output):
        (input,) = ctx.saved_tensors
        return grad_output / (input + EPS)


class PostHook_AP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out):
        ctx.save_for_backward(out)
        return out.clone()

    @staticmethod
    def backward(ctx, grad_output):
        (out,) = ctx.saved_tensors
        return grad_output * out


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _new_conv2d(self, x):
    if isinstance(self.padding, str):
        raise NotImplementedError("the authors' formulation needs numeric conv padding")
    return WoneConv2dG.apply(x, self.weight, self.bias, _pair(self.stride), _pair(self.padding),
                             _pair(self.dilation), self.groups, self._authors_full)


def _new_bn(self, x):
    div_eps, y_eps = self._authors_bn_eps
    return LRPBNG.apply(x, self.running_mean, self.running_var, self.weight, self.bias, self.eps,
                        div_eps, y_eps)


def _new_avgpool2d(self, x):
    x = PreHook_AP.apply(x)
    y = F.avg_pool2d(x, self.kernel_size, self.stride, self.padding, self.ceil_mode,
                     self.count_include_pad, self.divisor_override)
    return PostHook_AP.apply(y)


def _new_linear(self, x):
    return CLinearG.apply(x, self.weight, self.bias)


class AuthorsTSGB:
    """``AuthorsTSGB(model).attribute(x, target)`` -> (N, 1, H, W) maps (or (N, T, H, W)).

    Use ``with AuthorsTSGB(model) as ex:`` to keep the model converted across calls; without a
    with-block each call converts and restores. ``variant``: ``"published"`` (their active
    slim code, default) or ``"full"`` (their commented-out fallback with ones_like(W) convs).
    """

    def __init__(self, model: nn.Module, variant: str = "published",
                 classifier: Optional[nn.Linear] = None, bn_div_eps: float = BN_DIV_EPS,
                 bn_y_eps: Optional[float] = BN_Y_EPS):
        if variant not in ("published", "full"):
            raise ValueError("variant must be 'published' or 'full'")
        self.model = model
        self.full = variant == "full"
        self.bn_div_eps = float(bn_div_eps)
        self.bn_y_eps = None if bn_y_eps is None else float(bn_y_eps)
        if classifier is None:
            linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
            if not linears:
                raise ValueError("model has no nn.Linear classifier")
            classifier = linears[-1]
        self.classifier = classifier
        self._saved = None

    def __enter__(self):
        saved = []
        for m in self.model.modules():
            new = None
            if type(m) is nn.Conv2d:
                m._authors_full = self.full
                new = _new_conv2d
            elif type(m) is nn.BatchNorm2d:
                m._authors_bn_eps = (self.bn_div_eps, self.bn_y_eps)
                new = _new_bn
            elif type(m) is nn.AvgPool2d:
                new = _new_avgpool2d
            elif m is self.classifier:
                new = _new_linear
            if new is not None:
                saved.append((m, "forward", m.__dict__.get("forward", None)))
                m.forward = new.__get__(m)
            if hasattr(m, "inplace") and isinstance(m.inplace, bool) and m.inplace:
                saved.append((m, "inplace", True))
                m.inplace = False
        saved.append((self.model, "training", self.model.training))
        self.model.eval()
        self._saved = saved
        return self

    def __exit__(self, *exc):
        saved, self._saved = self._saved, None
        for m, attr, old in reversed(saved or []):
            if attr == "forward":
                if old is None:
                    del m.forward
                else:
                    m.forward = old
            elif attr == "training":
                m.train(old)
            else:
                setattr(m, attr, old)
            for a in ("_authors_full", "_authors_bn_eps"):
                if a in m.__dict__:
                    delattr(m, a)

    def attribute(self, x: torch.Tensor, target=None) -> torch.Tensor:
        if self._saved is None:
            with self:
                return self.attribute(x, target)
        inp = x.detach().requires_grad_(True)
        with torch.enable_grad():
            output = self.model(inp)
            n = output.shape[0]
            if target is None:
                tgt = output.detach().argmax(1, keepdim=True)
            else:
                tgt = torch.as_tensor(target, device=output.device, dtype=torch.long)
                tgt = tgt.reshape(n, -1) if tgt.dim() else tgt.reshape(1, 1).expand(n, 1)
            maps = []
            for j in range(tgt.shape[1]):
                grad_out = torch.zeros_like(output)
                grad_out.scatter_(1, tgt[:, j:j + 1], 1.0)
                (g,) = torch.autograd.grad(output, inp, grad_out,
                                           retain_graph=j < tgt.shape[1] - 1)
                maps.append((g * inp.detach()).sum(1, keepdim=True))
        return maps[0] if len(maps) == 1 else torch.cat(maps, 1)

    __call__ = attribute
