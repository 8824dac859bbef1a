"""The per-kind patches of the conversion: each rule layer (``Conv2d``, ``Conv2d`` followed
by ``ReLU``, ``BatchNorm2d``, ``AvgPool2d``, ``MaxPool2d``, the classifier ``Linear`` and a
Linear that may turn out to be it) gets an instance-level ``forward`` that computes the same
output through the backend's op; each patch's undo goes on the conversion's stack
(``_set_forward``). :class:`LayerPatches` is the part of
:class:`~tsgb_ext.convert.conversion.Conversion` that does this."""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from .calls import conv_args, pair
from .classifier import DeferredLinear
from .layer_map import own_forward


class LayerPatches:
    """The per-kind patches (a mixin of Conversion: it uses ``backend``, ``state``,
    ``classifier``, ``_deferred``, ``_set_forward``, ``_patch_own`` and the rule calls)."""

    def _patch_module(self, m: nn.Module, fused: dict, fused_relus: set) -> None:
        """The patch for ``m``'s kind (conv -> ReLU pairs: ``fused``, conv -> ReLU; none for
        the ReLU of a pair and for modules without a rule)."""
        if m in fused:
            self._patch_conv_relu(m, fused[m])
        elif id(m) in fused_relus:
            pass
        elif isinstance(m, nn.Conv2d):
            self._patch_conv(m)
        elif isinstance(m, nn.BatchNorm2d):
            self._patch_bn(m)
        elif isinstance(m, nn.AvgPool2d):
            self._patch_avgpool(m)
        elif isinstance(m, nn.MaxPool2d):
            self._patch_maxpool(m)
        elif isinstance(m, nn.Linear):
            if self.classifier is not None:
                if m is self.classifier:
                    self._patch_classifier(m)
            else:
                self._patch_deferred(m)

    def _patch_conv(self, m: nn.Conv2d) -> None:
        conv = self
        if own_forward(m):
            self._patch_own(m, "conv")
            return

        def forward(x):
            if m.padding_mode != "zeros":
                x = F.pad(x, m._reversed_padding_repeated_twice, mode=m.padding_mode)
                padding = (0, 0)
            else:
                x, padding = conv_args(x, m.weight, m.padding, m.dilation)
            out = conv.backend.conv2d(x, m.weight, m.bias, m.stride, padding, m.dilation,
                                      m.groups)
            conv.watch_output(m, out, m.groups)
            return out
        self._set_forward(m, forward)

    def _patch_conv_relu(self, m: nn.Conv2d, relu: nn.ReLU) -> None:
        """A Conv2d directly followed by nn.ReLU in an nn.Sequential: where the backend has a
        fused conv+ReLU op, the conv computes relu(conv(x)) and the ReLU passes its input on.
        The rule is unchanged (g * relu(y) == g * 1[y > 0] * y); a whole pass disappears."""
        conv = self

        def fused() -> bool:
            return conv.backend.supports_conv_relu

        def forward(x):
            x, padding = conv_args(x, m.weight, m.padding, m.dilation)
            if fused():
                out = conv.backend.conv2d_relu(x, m.weight, m.bias, m.stride, padding,
                                               m.dilation, m.groups)
            else:
                out = conv.backend.conv2d(x, m.weight, m.bias, m.stride, padding, m.dilation,
                                          m.groups)
            conv.watch_output(m, out, m.groups)  # relu(y) carries the same relevance as y
            return out

        def relu_forward(x):
            return x if fused() else F.relu(x)
        self._set_forward(m, forward)
        self._set_forward(relu, relu_forward)

    def _patch_bn(self, m: nn.BatchNorm2d) -> None:
        conv = self
        if own_forward(m):  # e.g. timm's BatchNormAct2d: BN, then drop and act
            self._patch_own(m, "batchnorm")
            return

        def forward(x):
            if x.dim() != 4:
                raise ValueError(f"expected 4D input to {type(m).__name__} (got {x.dim()}D input)")
            return conv._bn_call(x, m.running_mean, m.running_var, m.weight, m.bias, m.eps)
        self._set_forward(m, forward)

    def _patch_avgpool(self, m: nn.AvgPool2d) -> None:
        conv = self
        if own_forward(m):  # e.g. timm's AvgPool2dSame: pads, then avg_pool2d
            self._patch_own(m, "avgpool")
            return

        def forward(x):
            return conv._pool_call(x, m.kernel_size, m.stride, m.padding, m.ceil_mode,
                                   m.count_include_pad, m.divisor_override)
        self._set_forward(m, forward)

    def _patch_maxpool(self, m: nn.MaxPool2d) -> None:
        """MaxPool2d keeps its ordinary gradient; a backend with a faster max pooling of the
        same values and gradient (``supports_max_pool``) computes it."""
        conv = self
        if type(m).forward is not nn.MaxPool2d.forward or m.return_indices:
            return

        def forward(x):
            b = conv.backend
            if not b.supports_max_pool:
                return nn.MaxPool2d.forward(m, x)
            return b.max_pool2d(x, pair(m.kernel_size), pair(m.stride), pair(m.padding),
                                pair(m.dilation), m.ceil_mode)
        self._set_forward(m, forward)

    def _patch_classifier(self, m: nn.Linear) -> None:
        conv = self
        if own_forward(m):
            self._patch_own(m, "classifier")
            return

        def forward(x):
            return conv.backend.linear(x, m.weight, m.bias)
        self._set_forward(m, forward)

    def _patch_deferred(self, m: nn.Linear) -> None:
        conv = self
        if own_forward(m):
            self._deferred.append(self._patch_own(m, "deferred"))
            return

        def forward(x):
            return DeferredLinear.apply(x, m.weight, m.bias, m, conv.state, conv)
        self._deferred.append(self._set_forward(m, forward))
