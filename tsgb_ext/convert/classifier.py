"""The classifier: which Linear gets the TSGB-FC rule when none is named up front (the last
one the forward pass runs), and the deferred Linear that decides in its backward."""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


class ClassifierState:
    """Which Linear is the classifier, decided after the forward when not named up front:
    every Linear records its execution; the last one executed is the classifier."""

    def __init__(self):
        self.executed: List[nn.Module] = []
        self.classifier: Optional[nn.Module] = None


class DeferredLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, module, state, conversion):
        state.executed.append(module)
        ctx.save_for_backward(x, weight)
        ctx.module, ctx.state, ctx.conversion = module, state, conversion
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        if ctx.state.classifier is ctx.module:
            gx = ctx.conversion.backend.linear_rule(grad, x, w)
        else:
            gx = grad @ w.to(grad.dtype)  # (under autocast the forward ran in grad's dtype)
        return gx, None, None, None, None, None

