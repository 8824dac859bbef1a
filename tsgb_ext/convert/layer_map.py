"""Which TSGB rule each module type gets (the layer map): Conv2d, BatchNorm2d, AvgPool2d and
the classifier Linear, their subclasses (with or without their own forward), and the rows of
``TSGB.report()`` (:func:`describe_rules`)."""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

#: What each rule's functional call is, inside a subclass's own forward.
RULE_FUNCS = {"conv": (torch.conv2d,), "batchnorm": (F.batch_norm,),
               "avgpool": (F.avg_pool2d,), "classifier": (F.linear,), "deferred": (F.linear,)}
RULE_OF = (("conv", nn.Conv2d, "conv2d"), ("batchnorm", nn.BatchNorm2d, "batch_norm"),
            ("avgpool", nn.AvgPool2d, "avg_pool2d"), ("linear", nn.Linear, "linear"))


def rule_kind(m: nn.Module) -> Optional[str]:
    for kind, base, _ in RULE_OF:
        if isinstance(m, base):
            return kind
    return None


def own_forward(m: nn.Module) -> bool:
    """True for a subclass of a rule layer whose class overrides ``forward`` (or, for convs,
    ``_conv_forward``): its own forward runs, and its functional call gets the rule."""
    for _, base, _ in RULE_OF:
        if isinstance(m, base):
            names = ("forward", "_conv_forward") if base is nn.Conv2d else ("forward",)
            return overrides(m, base, *names)
    return False



_MISSING = object()


def set_instance_forward(m: nn.Module, forward: Callable) -> Callable[[], None]:
    """Give ``m`` an instance-level ``forward``; returns the undo (restores what was there)."""
    old = m.__dict__.get("forward", _MISSING)
    m.__dict__["forward"] = forward

    def undo():
        if old is _MISSING:
            m.__dict__.pop("forward", None)
        else:
            m.__dict__["forward"] = old
    return undo


def overrides(module: nn.Module, base: type, *names: str) -> bool:
    t = type(module)
    return any(getattr(t, n) is not getattr(base, n) for n in names)



# ---- which module gets which rule (TSGB.report) -----------------------------------------------
_LOOKALIKE = ("conv", "batchnorm", "norm2d", "avgpool", "linear")


def describe_rules(model: nn.Module, classifier: Optional[nn.Module], observed: Dict,
                   degenerate: Dict, fused: set) -> List[Tuple[str, str, str, str]]:
    """Rows (name, type, rule, note) for TSGB.report(): every Conv2d, BatchNorm2d, AvgPool2d
    and Linear (subclasses included) with the rule it gets, and every other module whose class
    name looks like one of them (Conv1d, ConvTranspose2d, SyncBatchNorm, FrozenBatchNorm2d,
    CondConv2d, ...) with "gradient": it keeps its ordinary gradient."""
    rows = []
    for name, m in model.named_modules():
        kind = rule_kind(m)
        tname = type(m).__name__
        notes = []
        if kind is None:
            low = tname.lower()
            own = any(True for _ in m.parameters(recurse=False)) or any(
                True for _ in m.buffers(recurse=False))
            if own and any(k in low for k in _LOOKALIKE):
                rows.append((name, tname, "gradient",
                             "not an nn.Conv2d/BatchNorm2d/AvgPool2d/Linear: ordinary gradient"))
            continue
        rule = kind
        if kind == "linear":
            if m is classifier:
                rule = "classifier"
            else:
                rule = "gradient"
                notes.append("classifier not known yet" if classifier is None
                             else "not the classifier")
        if own_forward(m) and rule != "gradient":
            what = {"conv": "conv2d", "batchnorm": "batch_norm", "avgpool": "avg_pool2d",
                    "classifier": "linear"}[rule]
            obs = observed.get(m)
            if obs is None:
                notes.append(f"own forward: its {what} calls get the rule (not run yet)")
            elif obs["hits"] == 0:
                rule = "gradient"
                notes.append(f"own forward made no {what} call: ordinary gradient (warned)")
            else:
                notes.append(f"own forward: {obs['hits']} {what} call(s) get the rule")
                if not obs["output_is_result"]:
                    notes.append("the rest of its forward keeps ordinary gradients"
                                 + (" (warned)" if rule == "conv" else ""))
        elif rule == "conv" and m.padding_mode != "zeros":
            notes.append(f"rule over the {m.padding_mode}-padded input")
        if m in fused:
            notes.append("fused conv -> BN (-> act) op")
        if m in degenerate:
            notes.append(f"DEGENERATE: the relevance it receives sums to zero at every output "
                         f"position ({degenerate[m]:.1e}); it hands on rounding noise (warned)")
        rows.append((name, tname, rule, "; ".join(notes)))
    return rows
