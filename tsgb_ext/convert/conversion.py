"""Converting a model for TSGB, and restoring it exactly: :class:`Conversion`, the lifecycle.

The conversion never replaces module objects. It gives each ``Conv2d``, ``BatchNorm2d``,
``AvgPool2d`` and the classifier ``Linear`` an instance-level ``forward`` that computes the
same output with torch's own functional op but records a TSGB backward rule (the per-kind
patches, :mod:`.patches`; subclasses with their own forward are routed, :mod:`.routing`), and
it undoes everything on exit: the instance ``forward`` attributes, ``inplace`` flags (turned
off so that saved activations are not overwritten), training flags (the model is explained in
eval mode) and parameters' ``requires_grad`` (off, so no parameter gradient is computed or
stored); the model-wide rewrites are :mod:`.rewrites`. Each change pushes its own undo on one
stack, which ``restore`` pops.

With a fusion cache (``TSGB(..., fuse=True)``; used where the backend declares
``supports_fusion``) the model is also traced once with ``torch.fx``; each ``Conv2d ->
BatchNorm2d (-> ReLU / ReLU6)`` chain whose intermediate results go nowhere else becomes one
``FusedBlock`` call (the native ``conv2d_bn_act`` op; a backend without it runs the block's
modules one by one), and the model's instance ``forward`` is the traced graph's for the
duration of the conversion. The degenerate-relevance check is :mod:`.degenerate`.
"""
from __future__ import annotations

import warnings
from typing import Callable, Dict, List, Optional, Tuple

import torch.nn as nn

from . import degenerate, rewrites
from .classifier import ClassifierState
from .fusion import build_plan, conv_relu_pairs, module_fingerprint
from .layer_map import set_instance_forward
from .patches import LayerPatches
from .routing import RuleCalls


class Conversion(LayerPatches, RuleCalls):
    """Context manager: the model converted for TSGB inside, exactly restored on exit."""

    def __init__(self, model: nn.Module, backend, classifier: Optional[nn.Module],
                 names: Dict[nn.Module, str], fusion_cache: Optional[dict] = None,
                 warned: Optional[set] = None):
        self.model = model
        # conv -> BN -> activation fusion through a traced graph; None: off. The dict caches
        # the plan between conversions of the same module tree (key "plan").
        self.fusion_cache = fusion_cache
        self.backend = backend
        self.classifier = classifier
        self.names = names
        self.state = ClassifierState()
        self.tree: tuple = ()  # set by _apply
        self._undo: List[Callable[[], None]] = []
        self._deferred: List[Callable[[], None]] = []
        # (module, what) pairs already warned about; shared by an explainer's conversions
        self._warned: set = warned if warned is not None else set()
        # subclasses with their own forward: module -> {"kind", "hits", "output_is_result"}
        self.observed: Dict[nn.Module, dict] = {}
        # degenerate-relevance check: None (off), or the list the convs' backward hooks
        # append their records to (tsgb_ext.convert.degenerate.watch_output)
        self.watch: Optional[list] = None

    def _name(self, m: nn.Module) -> str:
        return self.names.get(m, type(m).__name__)

    def warn_once(self, m: nn.Module, what: str, msg: str) -> None:
        if (m, what) not in self._warned:
            self._warned.add((m, what))
            warnings.warn(msg, stacklevel=4)

    # -- patching ---------------------------------------------------------------------
    def _set_forward(self, m: nn.Module, fn: Callable) -> Callable[[], None]:
        undo = set_instance_forward(m, fn)
        self._undo.append(undo)
        return undo

    # -- the degenerate-relevance check (tsgb_ext.convert.degenerate) ----------------------
    def watch_output(self, m: nn.Module, out, groups: int) -> None:
        """With ``watch`` on: check the relevance the conv ``m`` hands on (see
        :func:`degenerate.watch_output`)."""
        degenerate.watch_output(self.watch, m, out, groups)

    def degenerate(self) -> List[Tuple[nn.Module, float, bool]]:
        """The convs ``watch`` found degenerate (see :func:`degenerate.found`)."""
        return degenerate.found(self.watch)

    # -- lifecycle --------------------------------------------------------------------
    def __enter__(self) -> "Conversion":
        try:
            self._apply()
        except BaseException:
            self.restore()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    def _apply(self) -> None:
        model = self.model
        modules = list(model.modules())
        #: the module tree this conversion patched (identity and type of each module)
        self.tree = tuple((id(m), type(m)) for m in modules)
        self._undo.append(rewrites.eval_mode(model, modules))
        self._undo.append(rewrites.frozen_parameters(model))
        self._undo.append(rewrites.inplace_off(modules))
        self._run_compiled_eagerly(modules)
        self._apply_fusion_plan()
        self._watch_top_level_forward()
        fused = conv_relu_pairs(modules)
        fused_relus = set(id(r) for r in fused.values())
        for m in modules:
            self._patch_module(m, fused, fused_relus)
        if self.classifier is not None and not isinstance(self.classifier, nn.Linear):
            raise TypeError("classifier must be an nn.Linear")

    def _apply_fusion_plan(self) -> None:
        """Run the model through its traced graph with conv -> BN (-> act) chains fused (the
        plan cached per module tree); the model's forward is restored like the others."""
        if self.fusion_cache is None:
            return
        fp = module_fingerprint(self.model)
        plan = self.fusion_cache.get("plan")
        if plan is None or plan.fingerprint != fp:
            plan = build_plan(self.model, fp)
            self.fusion_cache["plan"] = plan
        if plan.graph_module is None:
            return
        plan.conversion = self
        self._undo.append(lambda: setattr(plan, "conversion", None))
        self._set_forward(self.model, plan.graph_module.forward)

    def _run_compiled_eagerly(self, modules) -> None:
        """Compiled parts of the model (``torch.compile(submodule)`` wrappers, modules after
        ``module.compile()``) run their own modules eagerly while converted: a compiled graph
        would bake in decisions the rules make in Python at trace time (which Linear is the
        classifier) and bypass the patched forwards of a graph compiled before."""
        for m in modules:
            if type(m).__name__ == "OptimizedModule" and hasattr(m, "_orig_mod"):
                self._set_forward(m, m._orig_mod.__call__)
            if m.__dict__.get("_compiled_call_impl") is not None:
                old = m.__dict__["_compiled_call_impl"]
                m.__dict__["_compiled_call_impl"] = None
                self._undo.append(lambda m=m, old=old: m.__dict__.__setitem__(
                    "_compiled_call_impl", old))

    def _watch_top_level_forward(self) -> None:
        """Without a named classifier, each forward of the model decides at its end which
        Linear is the classifier (the last one it ran), also for a forward and backward made
        by hand inside a with-block (``logits = model(x); autograd.grad(...)``), so that the
        backward of every forward of a converted model is TSGB's."""
        if self.classifier is not None:
            return
        conv, model = self, self.model
        inner = model.forward  # the traced plan's forward, an instance forward or the class's
        depth = [0]

        def forward(*args, **kwargs):
            if conv.classifier is not None:  # fixed by a with-block's first call
                return inner(*args, **kwargs)
            if depth[0] == 0:
                conv.begin_forward()
            depth[0] += 1
            try:
                out = inner(*args, **kwargs)
            finally:
                depth[0] -= 1
            if depth[0] == 0:
                conv.end_forward()
            return out
        self._set_forward(model, forward)

    def begin_forward(self) -> None:
        self.state.executed.clear()
        self.state.classifier = None

    def end_forward(self) -> Optional[nn.Module]:
        """After the forward: fix the classifier (the named one, or the last Linear run)."""
        if self.classifier is not None:
            return self.classifier
        if not self.state.executed:
            return None
        self.state.classifier = self.state.executed[-1]
        return self.state.classifier

    def fix_classifier(self, m: nn.Linear) -> None:
        """Replace the deferred decision by a static classifier patch (cheaper, traceable)."""
        if self.classifier is not None:
            return
        for undo in self._deferred:
            undo()
            self._undo.remove(undo)
        self._deferred.clear()
        self.classifier = m
        self._patch_classifier(m)

    def restore(self) -> None:
        while self._undo:
            self._undo.pop()()
        self._deferred.clear()
