"""The degenerate-relevance check, in one place: convs whose handed-on relevance is rounding
noise (the conv rule hands on, at each output position o, only the sum over the group's
channels of its output's relevance, s[o] = sum_k g[k,o]*y[k,o]; where that sum is zero at
every position, what the conv hands on is noise).

A conversion with a watch list on (:attr:`Conversion.watch`) registers :func:`watch_output`'s
hook on every conv output of one call; :func:`found` reads what the hooks recorded and
:func:`report` warns about each degenerate conv, once per explainer. :func:`checked` remembers,
per model, which (module tree, input kind) were checked: the check runs on the first call for
each (its cost: one extra pass over every conv's output).
"""
from __future__ import annotations

import weakref
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

#: model -> {(module tree, input shape, dtype, ...): {degenerate conv: ratio}}
_checked: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def checked(model: nn.Module) -> dict:
    """The input kinds already checked for ``model`` (its entry, created when missing)."""
    return _checked.setdefault(model, {})


def degenerate_tolerance(*dtypes) -> Optional[float]:
    """At or below this ratio |sum of relevance| / sum of |relevance| at every output position,
    a conv's relevance is zero up to rounding (None: too coarse a dtype to tell). Measured
    noise levels of degenerate layers: 1e-17..4e-10 in float64, 7e-10..6e-8 in float32 (the
    LayerNorm cases highest); real near-cancellations, the same in both dtypes, were 2.5e-5 and
    up (ConvNeXt's downsampling convs)."""
    eps = max(torch.finfo(d).eps for d in dtypes)
    return 1e-6 if eps < 1e-6 else None


def watch_output(watch: Optional[list], m: nn.Module, out, groups: int) -> None:
    """On the first call of an explainer (``watch`` a list; None: off): where the sum of
    ``out``'s relevance is zero at every position, the conv ``m`` hands on rounding noise: a
    conv with a single output position that all of the classifier's relevance (zero-sum by the
    TSGB-FC rule) passes (timm's vgg11_bn, ghostnet_100), or a conv whose output feeds a
    LayerNorm (zero-sum at every position; ConvNeXt's stem). The hook appends (module,
    max_o |s[o]| / sum_k |g*y| (where > 0), any position > 0, tolerance, single position)."""
    if (watch is None or not isinstance(out, torch.Tensor) or out.dim() != 4
            or not out.requires_grad or torch.compiler.is_compiling()):
        return
    # detached: a hook holding the tensor it is registered on would keep its whole graph
    # alive (tensor -> grad_fn -> hook -> tensor, a cycle the garbage collector cannot see)
    y, version, groups = out.detach(), out._version, int(groups)
    single = out.shape[2] * out.shape[3] == 1

    def hook(g):
        if y._version != version:  # changed in place later (out += identity): no check
            return
        with torch.no_grad():
            yy = y if g.shape[0] == y.shape[0] else y.repeat(g.shape[0] // y.shape[0], 1, 1, 1)
            cdt = torch.promote_types(torch.promote_types(g.dtype, yy.dtype), torch.float32)
            gy = (g.to(cdt) * yy.to(cdt)).reshape(g.shape[0], groups, -1, g.shape[2] * g.shape[3])
            s = gy.sum(2, dtype=torch.float64).abs_()  # float64: the sums cancel
            mag = gy.abs_().sum(2).double()
            ratio = torch.where(mag > 0, s / mag.clamp_min(1e-300), torch.zeros_like(s))
            watch.append((m, ratio.max(), (mag > 0).any(), degenerate_tolerance(g.dtype, y.dtype),
                          single))
    out.register_hook(hook)


def found(watch: Optional[list]) -> List[Tuple[nn.Module, float, bool]]:
    """Convs found to hand on relevance that sums to zero at every output position: (module,
    largest |sum| / magnitude, single output position), after a backward with ``watch`` on.
    One host synchronisation for all of them."""
    entries = [e for e in watch or () if e[3] is not None]
    if not entries:
        return []
    stats = torch.stack([torch.stack([e[1].double(), e[2].double()]) for e in entries]).cpu()
    out: Dict[nn.Module, Tuple[float, bool]] = {}
    clear: set = set()
    for (m, _, _, tol, single), (r, any_pos) in zip(entries, stats.tolist()):
        if not any_pos:
            continue
        if r <= tol:
            out[m] = (max(out.get(m, (0.0, single))[0], r), single)
        else:
            clear.add(m)
    return [(m, r, single) for m, (r, single) in out.items() if m not in clear]


def report(conv, seen: dict, key, names: Dict[nn.Module, str],
           into: Dict[nn.Module, float]) -> List[Tuple[nn.Module, str]]:
    """After a checked call of the conversion ``conv``: remember the result under ``key`` in
    ``seen`` (unless fp16/bf16 could not tell), turn the check off, and record each degenerate
    conv's ratio ``into`` the explainer's; returns (conv, warning) pairs to warn about once."""
    result = found(conv.watch)
    if not any(e[3] is None for e in conv.watch or ()):  # fp16/bf16 could not tell
        while len(seen) >= 8:  # a few module trees / input kinds are remembered
            seen.pop(next(iter(seen)))
        seen[key] = {m: ratio for m, ratio, _ in result}
    conv.watch = None
    warnings = []
    for m, ratio, single in result:
        into[m] = ratio
        name = f"{names.get(m, type(m).__name__)} ({type(m).__name__})"
        warnings.append((m, _message(name, ratio, single)))
    return warnings


def _message(name: str, ratio: float, single: bool) -> str:
    if single:
        why = (f"{name} is a conv with a single output position, and the relevance it "
               f"receives sums to zero (|sum| = {ratio:.1e} x its magnitude): the "
               f"TSGB-FC rule makes the classifier's input relevance sum to zero, and "
               f"the conv rule hands on only that sum")
    else:
        why = (f"the relevance {name} receives sums to zero at each of its output "
               f"positions (|sum| <= {ratio:.1e} x its magnitude; a LayerNorm or "
               f"GroupNorm after it, whose gradient times input sums to zero, does "
               f"this), and the conv rule hands on only those sums")
    return (f"tsgb_ext: relevance through {name} is rounding noise, and maps whose "
            f"relevance all passes it are zero up to rounding: {why}. What remains "
            f"changes with any perturbation of the input; the spec gives such an "
            f"architecture no usable TSGB map")
