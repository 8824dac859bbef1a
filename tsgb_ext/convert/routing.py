"""Routing the functional calls of a rule layer's subclass with its own forward (timm's
``BatchNormAct2d``, ``AvgPool2dSame``, ``Conv2dSame``, ``StdConv2d``, ...) to the rule's op:
:class:`RuleCalls`, the part of :class:`~tsgb_ext.convert.conversion.Conversion` that makes
each rule's op call (also for the plain layers' patches) and runs a subclass's own forward
under :class:`_RuleInterceptor`, and reports what that forward did."""
from __future__ import annotations

from typing import Callable, List

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from .calls import (BN_DEFAULTS, BN_NAMES, LINEAR_NAMES, POOL_DEFAULTS, POOL_NAMES, bind,
                    bind_conv2d, conv_args, pair, pool_stride)
from .classifier import DeferredLinear
from .layer_map import RULE_FUNCS


class _RuleInterceptor(TorchFunctionMode):
    """Runs while the own ``forward`` of a subclass of a rule layer runs (timm's
    ``BatchNormAct2d``, ``AvgPool2dSame``, ``Conv2dSame``, ``StdConv2d``, TF "same"-padding
    convs, ...): each functional call of the layer's kind (``conv2d``, ``batch_norm``,
    ``avg_pool2d``; ``linear`` in the classifier) on a 4-D input (any input for ``linear``) is
    routed to the backend's op, which computes the same output and records the TSGB rule. The
    conv rule needs only the window geometry, the input and the output, so a conv2d call with a
    derived weight (weight standardisation) takes it as well. Everything else the forward does
    (padding, activation, dropout) keeps its ordinary gradient."""

    def __init__(self, kind: str, module: nn.Module, conversion: "RuleCalls"):
        super().__init__()
        self.kind, self.module, self.conversion = kind, module, conversion
        self.hits = 0
        self.results: List[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in RULE_FUNCS[self.kind]:
            return func(*args, **kwargs)
        out = self.conversion._routed_call(self.kind, self.module, args, kwargs)
        if out is None:  # not a call the rule is defined for (e.g. a 3-D batch_norm)
            return func(*args, **kwargs)
        self.hits += 1
        self.results.append(out)
        return out


class RuleCalls:
    """The rules' op calls, and the routing of a subclass's own forward to them (a mixin of
    Conversion: it uses ``backend``, ``state``, ``observed``, ``watch_output``,
    ``warn_once``, ``_name`` and ``_set_forward`` of the conversion)."""

    def _conv_call(self, m, x, weight, bias, stride, padding, dilation, groups):
        x, padding = conv_args(x, weight, padding, pair(dilation))
        out = self.backend.conv2d(x, weight, bias, pair(stride), padding, pair(dilation),
                                  groups)
        self.watch_output(m, out, groups)
        return out

    def _bn_call(self, x, running_mean, running_var, weight, bias, eps, training=False):
        if running_mean is None or running_var is None or training:
            # track_running_stats=False (or a forward that asks for batch statistics): the
            # batch's statistics, as that forward computes them; the buffers stay untouched
            with torch.no_grad():
                running_var, running_mean = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
        return self.backend.batch_norm(x, running_mean, running_var, weight, bias, eps)

    def _pool_call(self, x, kernel_size, stride, padding, ceil_mode, count_include_pad,
                   divisor_override):
        stride = pool_stride(stride, kernel_size)
        return self.backend.avg_pool2d(x, pair(kernel_size), pair(stride), pair(padding),
                                       bool(ceil_mode), bool(count_include_pad),
                                       divisor_override)

    def _routed_call(self, kind: str, m: nn.Module, args, kwargs):
        """A functional call made inside a subclass's own forward, as the rule's op (None: the
        rule is not defined for it, e.g. a 3-D input)."""
        if kind == "conv":
            b = bind_conv2d(args, kwargs)
            if b["input"].dim() != 4:
                return None
            return self._conv_call(m, b["input"], b["weight"], b["bias"], b["stride"],
                                   b["padding"], b["dilation"], b["groups"])
        if kind == "batchnorm":
            b = bind(BN_NAMES, BN_DEFAULTS, args, kwargs)
            if b["input"].dim() != 4:
                return None
            return self._bn_call(b["input"], b["running_mean"], b["running_var"], b["weight"],
                                 b["bias"], b["eps"], b["training"])
        if kind == "avgpool":
            b = bind(POOL_NAMES, POOL_DEFAULTS, args, kwargs)
            if b["input"].dim() != 4:
                return None
            return self._pool_call(b["input"], b["kernel_size"], b["stride"], b["padding"],
                                   b["ceil_mode"], b["count_include_pad"],
                                   b["divisor_override"])
        b = bind(LINEAR_NAMES, {"bias": None}, args, kwargs)
        if kind == "classifier":
            return self.backend.linear(b["input"], b["weight"], b["bias"])
        return DeferredLinear.apply(b["input"], b["weight"], b["bias"], m, self.state, self)

    def _patch_own(self, m: nn.Module, kind: str) -> Callable[[], None]:
        """A subclass of a rule layer with its own forward: that forward runs unchanged, with
        its functional call(s) of the layer's kind routed to the rule's op."""
        conv = self
        original = m.forward  # bound method of the subclass (or an instance forward)

        def forward(*args, **kwargs):
            mode = _RuleInterceptor(kind, m, conv)
            with mode:
                out = original(*args, **kwargs)
            conv._observe(m, kind, mode, out)
            return out
        return self._set_forward(m, forward)

    def _observe(self, m: nn.Module, kind: str, mode: "_RuleInterceptor", out) -> None:
        is_result = any(out is r for r in mode.results)
        self.observed[m] = {"kind": kind, "hits": mode.hits, "output_is_result": is_result}
        what = {"conv": "conv2d", "batchnorm": "batch_norm", "avgpool": "avg_pool2d",
                "classifier": "linear", "deferred": "linear"}[kind]
        label = f"tsgb_ext: {self._name(m)} ({type(m).__name__})"
        if mode.hits == 0 and kind != "deferred":
            rule = {"conv": "TSGB conv", "batchnorm": "BatchNorm", "avgpool": "AvgPool",
                    "classifier": "TSGB-FC"}[kind]
            self.warn_once(m, "no-call",
                            f"{label} overrides forward and made no {what} call on a 4-D input; "
                            f"it keeps its ordinary gradient instead of the {rule} rule")
        elif kind == "conv" and mode.hits and not is_result:
            self.warn_once(m, "not-output",
                            f"{label} overrides forward and returns something other than the "
                            f"result of its conv2d call: that call got the TSGB conv rule, what "
                            f"its forward does to the result keeps its ordinary gradient")
