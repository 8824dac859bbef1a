"""The model-wide rewrites of a conversion, each reversible on its own (as Zennit's
canonizers' apply / remove): each function makes its change and returns the undo that
restores exactly what it changed; the conversion keeps the undos on its stack."""
from __future__ import annotations

from typing import Callable, List

import torch.nn as nn

Undo = Callable[[], None]


def eval_mode(model: nn.Module, modules: List[nn.Module]) -> Undo:
    """``model.eval()`` (the model is explained in eval mode); the undo restores each module's
    own training flag."""
    training = [(m, m.training) for m in modules]

    def undo():
        for m, t in training:
            m.training = t
    model.eval()
    return undo


def frozen_parameters(model: nn.Module) -> Undo:
    """Parameters' ``requires_grad`` off (no parameter gradient is computed or stored)."""
    params = [(p, p.requires_grad) for p in model.parameters()]

    def undo():
        for p, r in params:
            p.requires_grad_(r)
    for p, _ in params:
        p.requires_grad_(False)
    return undo


def inplace_off(modules: List[nn.Module]) -> Undo:
    """``inplace`` flags off (saved activations must not be overwritten)."""
    changed = [m for m in modules
               if isinstance(m.__dict__.get("inplace", None), bool) and m.inplace]

    def undo():
        for m in reversed(changed):
            m.inplace = True
    for m in changed:
        m.inplace = False
    return undo
