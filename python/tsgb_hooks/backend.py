"""The interface of a TSGB backend, as tsgb_ext's model conversion uses it.

A backend computes each rule layer's forward with an op that records its TSGB backward rule
(stride, padding and dilation are pairs of ints; every op computes the ordinary forward). The
optional ops are declared as capabilities, properties that are False here and that a backend
having the op overrides (as Captum's ``Attribution.has_convergence_delta``): the conversion
reads them, it never probes for the ops.
"""
from __future__ import annotations


class Backend:
    """Base class of the backends: the five rule ops and the declared capabilities."""

    name = "backend"

    # -- capabilities: False unless a backend has the op ----------------------------------
    @property
    def supports_fusion(self) -> bool:
        """Has ``conv2d_bn_act``: conv -> eval BatchNorm -> activation (0 none, 1 ReLU,
        2 ReLU6) as one op whose backward folds the BN and activation rules into the conv
        rule."""
        return False

    @property
    def supports_conv_relu(self) -> bool:
        """Has ``conv2d_relu``: relu(conv(x)) with the conv rule."""
        return False

    @property
    def supports_max_pool(self) -> bool:
        """Has ``max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode)``: torch's
        max pooling with its ordinary gradient, faster."""
        return False

    @property
    def reuses_memory(self) -> bool:
        """Reuses activation memory between CPU calls: ``memory_hold()`` /
        ``memory_release()`` around a with-block (or one call) and ``memory_scope()`` (a
        context manager) around each call's forward and backward."""
        return False

    # -- the rule ops ---------------------------------------------------------------------
    def conv2d(self, x, weight, bias, stride, padding, dilation, groups):
        raise NotImplementedError

    def batch_norm(self, x, running_mean, running_var, weight, bias, eps):
        raise NotImplementedError

    def avg_pool2d(self, x, kernel_size, stride, padding, ceil_mode, count_include_pad,
                   divisor_override):
        raise NotImplementedError

    def linear(self, x, weight, bias):
        raise NotImplementedError

    def linear_rule(self, grad, x, weight):
        raise NotImplementedError
