"""TSGB as a Captum attribution method (needs ``pip install captum``).

    from tsgb_ext.evaluation.captum import TSGBAttribution
    attr = TSGBAttribution(model).attribute(images, target=labels)  # like images: gx * x

``attribute`` returns the per-element relevance ``gx * x`` (``gx`` the TSGB backward of a one-hot
output gradient), shaped like ``inputs``; its sum over the colour channels is the TSGB map of
``tsgb_ext.TSGB(model).attribute``. So Captum code written for ``InputXGradient`` and the like
works unchanged: ``captum.attr.visualization``, ``NoiseTunnel``, ``captum.metrics``
(``sensitivity_max``, ``infidelity``). (``TSGB``, this class's earlier name, still works for this
release and warns: it is also the name of the explainer, ``tsgb_ext.TSGB``.)
"""
from __future__ import annotations

import numbers
import warnings
from typing import Any, Optional, Tuple, Union

import torch
import torch.nn as nn

try:
    from captum.attr import GradientAttribution
    from captum.log import log_usage
except ImportError as e:  # pragma: no cover - exercised only without captum
    raise ImportError("tsgb_ext.evaluation.captum needs the captum package (pip install captum, or "
                      "pip install 'tsgb_ext[captum]')") from e

from ..core import explainer
from ..core.inputs import check_call


def _targets(target, n: int, device) -> Optional[torch.Tensor]:
    """Captum's target forms for (N, classes) outputs -> (N, 1) int64, or None (top-1)."""
    if target is None:
        return None
    if isinstance(target, bool):
        raise TypeError("target must be an int, a list of N ints or an integer tensor")
    if isinstance(target, numbers.Integral):
        return torch.full((n, 1), int(target), dtype=torch.long, device=device)
    if isinstance(target, tuple):
        raise ValueError("tuple targets index multi-dimensional outputs; TSGB explains (N, "
                         "classes) scores: give an int, a list of N ints or a tensor")
    if isinstance(target, list):
        if any(isinstance(t, tuple) for t in target):
            raise ValueError("tuple targets index multi-dimensional outputs; TSGB explains "
                             "(N, classes) scores")
        target = torch.as_tensor(target, dtype=torch.long)
    t = torch.as_tensor(target)
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise TypeError(f"target must be integers, got dtype {t.dtype}")
    t = t.to(device=device, dtype=torch.long)
    if t.numel() == 1:
        return t.reshape(1, 1).expand(n, 1)
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"target must be an int or have one class per example ({n}), got "
                         f"shape {tuple(t.shape)}")
    return t.reshape(n, 1)


class TSGBAttribution(GradientAttribution):
    """Target-Selective Gradient Backprop as a ``captum.attr.GradientAttribution``.

    Args:
        model: the classifier (an ``nn.Module`` returning (N, classes) scores; as
            ``forward_func`` for Captum). It is left exactly as it was.
        backend, classifier, allow_tf32, fuse: as for :class:`tsgb_ext.TSGB`.
    """

    def __init__(self, model: nn.Module, backend: str = "auto",
                 classifier: Union[None, str, nn.Linear] = None, allow_tf32: bool = False,
                 fuse: bool = True) -> None:
        GradientAttribution.__init__(self, model)
        self.explainer = explainer.TSGB(model, backend=backend, classifier=classifier,
                               allow_tf32=allow_tf32, fuse=fuse)

    @property
    def multiplies_by_inputs(self) -> bool:
        return True  # the attribution is gx * x

    def has_convergence_delta(self) -> bool:
        return False

    @log_usage()  # wraps attribute (NoiseTunnel calls attribute.__wrapped__)
    def attribute(self, inputs: Union[torch.Tensor, Tuple[torch.Tensor]],
                  target: Any = None, additional_forward_args: Any = None
                  ) -> Union[torch.Tensor, Tuple[torch.Tensor]]:
        """Per-element TSGB relevance ``gx * x``, shaped like ``inputs``.

        Args:
            inputs: an (N, C, H, W) floating tensor, or a 1-tuple of one (Captum's tuple form;
                the result is then a 1-tuple too).
            target: the class to explain per example: an int (every example), a list or 1-D
                tensor of N ints, or None (each example's top-1 class).
            additional_forward_args: further positional arguments of the model's forward
                (a tuple, or one non-tuple value), passed after the inputs.
        """
        is_tuple = isinstance(inputs, tuple)
        if is_tuple:
            if len(inputs) != 1:
                raise ValueError(f"TSGB explains one image tensor; got a tuple of "
                                 f"{len(inputs)} inputs")
            x = inputs[0]
        else:
            x = inputs
        check_call(x)
        tgt = _targets(target, x.shape[0], x.device)
        if additional_forward_args is None:
            fargs: tuple = ()
        elif isinstance(additional_forward_args, tuple):
            fargs = additional_forward_args
        else:
            fargs = (additional_forward_args,)
        if x.shape[0] == 0:
            rel = torch.zeros_like(x)
        else:
            tmax = int(tgt.max()) if tgt is not None else -1

            def select(logits: torch.Tensor) -> torch.Tensor:
                if tgt is None:
                    return logits.argmax(1, keepdim=True)
                if tmax >= logits.shape[1] or int(tgt.min()) < 0:
                    raise IndexError(f"target must be class indices in [0, "
                                     f"{logits.shape[1]})")
                return tgt
            rel = self.explainer.relevance(x, select, fargs)
        return (rel,) if is_tuple else rel


def __getattr__(name: str):
    """``TSGB``: the deprecated name of :class:`TSGBAttribution` (goes in the next release)."""
    if name == "TSGB":
        warnings.warn("tsgb_ext.evaluation.captum.TSGB is deprecated and goes in the next "
                      "release: use TSGBAttribution (tsgb_ext.TSGB is the explainer)",
                      DeprecationWarning, stacklevel=2)
        return TSGBAttribution
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
