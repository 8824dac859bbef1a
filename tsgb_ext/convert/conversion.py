"""Converting a model for TSGB, and restoring it exactly.

The conversion never replaces module objects. It gives each ``Conv2d``, ``BatchNorm2d``,
``AvgPool2d`` and the classifier ``Linear`` an instance-level ``forward`` that computes the
same output with torch's own functional op but records a TSGB backward rule, and it undoes
everything on exit: the instance ``forward`` attributes, ``inplace`` flags (turned off so
that saved activations are not overwritten), training flags (the model is explained in eval
mode) and parameters' ``requires_grad`` (off, so no parameter gradient is computed or stored).

With a fusion cache (``TSGB(..., fuse=True)``, native backend) the model is also traced once
with ``torch.fx``; each ``Conv2d -> BatchNorm2d (-> ReLU / ReLU6)`` chain whose intermediate
results go nowhere else becomes one ``_FusedBlock`` call (the native ``conv2d_bn_act`` op), and
the model's instance ``forward`` is the traced graph's for the duration of the conversion.
"""
from __future__ import annotations

import warnings
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .calls import (BN_DEFAULTS, BN_NAMES, LINEAR_NAMES, POOL_DEFAULTS, POOL_NAMES, bind,
                    bind_conv2d, conv_args, pair)
from .classifier import ClassifierState, DeferredLinear
from .fusion import build_plan, conv_relu_pairs, module_fingerprint
from .layer_map import RULE_FUNCS, own_forward

_MISSING = object()


class _RuleInterceptor(TorchFunctionMode):
    """Runs while the own ``forward`` of a subclass of a rule layer runs (timm's
    ``BatchNormAct2d``, ``AvgPool2dSame``, ``Conv2dSame``, ``StdConv2d``, TF "same"-padding
    convs, ...): each functional call of the layer's kind (``conv2d``, ``batch_norm``,
    ``avg_pool2d``; ``linear`` in the classifier) on a 4-D input (any input for ``linear``) is
    routed to the backend's op, which computes the same output and records the TSGB rule. The
    conv rule needs only the window geometry, the input and the output, so a conv2d call with a
    derived weight (weight standardisation) takes it as well. Everything else the forward does
    (padding, activation, dropout) keeps its ordinary gradient."""

    def __init__(self, kind: str, module: nn.Module, conversion: "Conversion"):
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



def degenerate_tolerance(*dtypes) -> Optional[float]:
    """At or below this ratio |sum of relevance| / sum of |relevance| at every output position,
    a conv's relevance is zero up to rounding (None: too coarse a dtype to tell). Measured
    noise levels of degenerate layers: 1e-17..4e-10 in float64, 7e-10..6e-8 in float32 (the
    LayerNorm cases highest); real near-cancellations, the same in both dtypes, were 2.5e-5 and
    up (ConvNeXt's downsampling convs)."""
    eps = max(torch.finfo(d).eps for d in dtypes)
    return 1e-6 if eps < 1e-6 else None


class Conversion:
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
        # degenerate-map check: None (off), or a list the single-position convs' backward
        # hooks append (module, |sum_k g*y|, sum_k |g*y|, tolerance) to
        self.watch: Optional[list] = None

    def _name(self, m: nn.Module) -> str:
        return self.names.get(m, type(m).__name__)

    def warn_once(self, m: nn.Module, what: str, msg: str) -> None:
        if (m, what) not in self._warned:
            self._warned.add((m, what))
            warnings.warn(msg, stacklevel=4)

    # -- patching ---------------------------------------------------------------------
    def _set_forward(self, m: nn.Module, fn: Callable) -> Callable[[], None]:
        old = m.__dict__.get("forward", _MISSING)

        def undo(m=m, old=old):
            if old is _MISSING:
                m.__dict__.pop("forward", None)
            else:
                m.__dict__["forward"] = old

        self._undo.append(undo)
        m.__dict__["forward"] = fn
        return undo

    # -- the rules' calls (also the ones a subclass's own forward makes) ----------------
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
        if stride is None or (not isinstance(stride, int) and len(stride) == 0):
            stride = kernel_size
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

    def watch_output(self, m: nn.Module, out, groups: int) -> None:
        """Degenerate-relevance check (first call of an explainer): the conv rule hands on,
        at each output position o, only the sum over the group's channels of its output's
        relevance, s[o] = sum_k g[k,o]*y[k,o]. Where that sum is zero at every position, what
        the conv hands on is rounding noise: a conv with a single output position that all of
        the classifier's relevance (zero-sum by the TSGB-FC rule) passes (timm's vgg11_bn,
        ghostnet_100), or a conv whose output feeds a LayerNorm (zero-sum at every position;
        ConvNeXt's stem). The hook records max_o |s[o]| / sum_k |g*y| (where > 0)."""
        w = self.watch
        if (w is None or not isinstance(out, torch.Tensor) or out.dim() != 4
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
                w.append((m, ratio.max(), (mag > 0).any(), degenerate_tolerance(g.dtype, y.dtype),
                          single))
        out.register_hook(hook)

    def degenerate(self) -> List[Tuple[nn.Module, float, bool]]:
        """Convs found to hand on relevance that sums to zero at every output position (see
        ``watch_output``): (module, largest |sum| / magnitude, single output position), after a
        backward with ``watch`` on. One host synchronisation for all of them."""
        entries = [e for e in self.watch or () if e[3] is not None]
        if not entries:
            return []
        stats = torch.stack([torch.stack([e[1].double(), e[2].double()]) for e in entries]).cpu()
        found: Dict[nn.Module, Tuple[float, bool]] = {}
        clear: set = set()
        for (m, _, _, tol, single), (r, any_pos) in zip(entries, stats.tolist()):
            if not any_pos:
                continue
            if r <= tol:
                found[m] = (max(found.get(m, (0.0, single))[0], r), single)
            else:
                clear.add(m)
        return [(m, r, single) for m, (r, single) in found.items() if m not in clear]

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
        training = [(m, m.training) for m in modules]

        def undo_training():
            for m, t in training:
                m.training = t
        self._undo.append(undo_training)
        model.eval()

        params = [(p, p.requires_grad) for p in model.parameters()]

        def undo_params():
            for p, r in params:
                p.requires_grad_(r)
        self._undo.append(undo_params)
        for p, _ in params:
            p.requires_grad_(False)

        for m in modules:
            if isinstance(m.__dict__.get("inplace", None), bool) and m.inplace:
                m.inplace = False
                self._undo.append(lambda m=m: setattr(m, "inplace", True))

        self._run_compiled_eagerly(modules)
        self._apply_fusion_plan()
        self._watch_top_level_forward()
        fused = conv_relu_pairs(modules)
        fused_relus = set(id(r) for r in fused.values())
        for m in modules:
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
