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
import torch.fx as fx
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

_MISSING = object()


def _same_padding(x: torch.Tensor, weight: torch.Tensor, dilation) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """Resolve ``padding='same'`` exactly as ATen's ``_convolution_same`` does: symmetric
    padding where possible, the odd remainder padded explicitly on the right/bottom."""
    pad_l, pad_nd = [], [0, 0, 0, 0]
    for i in range(2):
        total = dilation[i] * (weight.shape[2 + i] - 1)
        left, right = total // 2, total - total // 2
        if right > left:
            pad_nd[2 * (1 - i) + 1] = right - left
        pad_l.append(left)
    if any(pad_nd):
        x = F.pad(x, pad_nd)
    return x, (pad_l[0], pad_l[1])


def _conv_args(x: torch.Tensor, weight: torch.Tensor, padding, dilation):
    if isinstance(padding, str):
        if padding == "valid":
            return x, (0, 0)
        if padding == "same":
            return _same_padding(x, weight, dilation)
        raise ValueError(f"unsupported conv padding {padding!r}")
    if isinstance(padding, int):
        return x, (padding, padding)
    padding = tuple(padding)
    return x, (padding * 2 if len(padding) == 1 else padding)


def _pair(v):
    if isinstance(v, int):
        return (v, v)
    v = tuple(v)
    return v * 2 if len(v) == 1 else v


def _bind_conv2d(args, kwargs):
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    defaults = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}
    bound = dict(defaults)
    bound.update(zip(names, args))
    bound.update(kwargs)
    return bound


def _bind(names, defaults, args, kwargs):
    bound = dict(defaults)
    bound.update(zip(names, args))
    bound.update(kwargs)
    return bound


_BN_NAMES = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum",
             "eps")
_BN_DEFAULTS = {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5}
_POOL_NAMES = ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
               "divisor_override")
_POOL_DEFAULTS = {"stride": None, "padding": 0, "ceil_mode": False, "count_include_pad": True,
                  "divisor_override": None}
_LINEAR_NAMES = ("input", "weight", "bias")

#: What each rule's functional call is, inside a subclass's own forward.
_RULE_FUNCS = {"conv": (torch.conv2d,), "batchnorm": (F.batch_norm,),
               "avgpool": (F.avg_pool2d,), "classifier": (F.linear,), "deferred": (F.linear,)}
_RULE_OF = (("conv", nn.Conv2d, "conv2d"), ("batchnorm", nn.BatchNorm2d, "batch_norm"),
            ("avgpool", nn.AvgPool2d, "avg_pool2d"), ("linear", nn.Linear, "linear"))


def _rule_kind(m: nn.Module) -> Optional[str]:
    for kind, base, _ in _RULE_OF:
        if isinstance(m, base):
            return kind
    return None


def _own_forward(m: nn.Module) -> bool:
    """True for a subclass of a rule layer whose class overrides ``forward`` (or, for convs,
    ``_conv_forward``): its own forward runs, and its functional call gets the rule."""
    for _, base, _ in _RULE_OF:
        if isinstance(m, base):
            names = ("forward", "_conv_forward") if base is nn.Conv2d else ("forward",)
            return _overrides(m, base, *names)
    return False


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
        if func not in _RULE_FUNCS[self.kind]:
            return func(*args, **kwargs)
        out = self.conversion._routed_call(self.kind, self.module, args, kwargs)
        if out is None:  # not a call the rule is defined for (e.g. a 3-D batch_norm)
            return func(*args, **kwargs)
        self.hits += 1
        self.results.append(out)
        return out


class _ClassifierState:
    """Which Linear is the classifier, decided after the forward when not named up front:
    every Linear records its execution; the last one executed is the classifier."""

    def __init__(self):
        self.executed: List[nn.Module] = []
        self.classifier: Optional[nn.Module] = None


class _DeferredLinear(torch.autograd.Function):
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


def _overrides(module: nn.Module, base: type, *names: str) -> bool:
    t = type(module)
    return any(getattr(t, n) is not getattr(base, n) for n in names)


# ---- conv -> BN -> activation fusion (traced graph) ------------------------------------------
_ACT_MODULES = {nn.ReLU: 1, nn.ReLU6: 2}
_ACT_FUNCS = {F.relu: 1, torch.relu: 1, torch.relu_: 1, F.relu_: 1, F.relu6: 2}
_ACT_FALLBACK = {1: F.relu, 2: F.relu6}


class _Tracer(fx.Tracer):
    """torch.fx tracer that keeps every module the conversion patches as a call_module node
    (so its patched forward, and a Conv2d subclass's own forward, run when the graph runs)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.AvgPool2d, nn.Linear))
                or super().is_leaf_module(m, qualname))


class _FusedBlock(nn.Module):
    """A conv -> BatchNorm2d (-> ReLU / ReLU6) chain of the traced graph as one call: the native
    backend's conv2d_bn_act op (one autograd node whose backward folds the BN and activation
    rules into the conv rule), or, for a backend without it, the three modules one by one."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, act: int, act_fn: Optional[Callable],
                 plan: "_FusionPlan"):
        super().__init__()
        # plain attributes, not submodules: the model owns these modules
        self.__dict__.update(conv_=conv, bn_=bn, act_fn=act_fn, plan=plan)
        self.act = act

    def _unfused(self, x):
        y = self.bn_(self.conv_(x))  # the modules' converted forwards
        return self.act_fn(y) if self.act_fn is not None else y

    def _fused_call(self, fused, x, weight, bias, stride, padding, dilation, groups):
        bn = self.bn_
        x, padding = _conv_args(x, weight, padding, _pair(dilation))
        return fused(x, weight, bias, _pair(stride), padding, _pair(dilation), groups,
                     bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps, self.act)

    def forward(self, x):
        conv = self.conv_
        fused = getattr(self.plan.conversion.backend, "conv2d_bn_act", None)
        if fused is None or self.__dict__.get("subclass_unfusable"):
            return self._unfused(x)
        if not _overrides(conv, nn.Conv2d, "forward", "_conv_forward"):
            out = self._fused_call(fused, x, conv.weight, conv.bias, conv.stride, conv.padding,
                                   conv.dilation, conv.groups)
            # the block's output carries the conv output's relevance (BN and ReLU conserve it)
            self.plan.conversion._watch(conv, out, conv.groups)
            return out
        # A Conv2d subclass with its own forward (e.g. "same" padding: pad, then F.conv2d): run
        # it, with its conv2d call (its own weight) replaced by the fused op. Fused only if that
        # call's result is what the forward returns; otherwise this call and later ones run
        # the modules one by one.
        mode = _FusedConvInterceptor(self, fused)
        with mode:
            out = type(conv).forward(conv, x)
        if mode.hits == 1 and out is mode.result:
            self.plan.conversion._watch(conv, out, conv.groups)
            return out
        self.__dict__["subclass_unfusable"] = True
        return self._unfused(x)


class _FusedConvInterceptor(TorchFunctionMode):
    """Inside a fused block's Conv2d subclass forward: its conv2d call (its own weight, or one
    derived from it) becomes the block's fused conv -> BN -> activation op."""

    def __init__(self, block: "_FusedBlock", fused: Callable):
        super().__init__()
        self.block, self.fused = block, fused
        self.hits, self.result = 0, None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.conv2d and self.hits == 0:
            b = _bind_conv2d(args, kwargs)
            if b["input"].dim() == 4:  # its own weight or one derived from it (StdConv2d)
                self.hits += 1
                self.result = self.block._fused_call(self.fused, b["input"], b["weight"], b["bias"],
                                                     b["stride"], b["padding"], b["dilation"],
                                                     b["groups"])
                return self.result
        elif func is torch.conv2d:
            self.hits += 1
        return func(*args, **kwargs)


class _FusionPlan:
    """The model's traced graph with its conv -> BN (-> activation) chains fused, and the
    fingerprint of the module tree it was traced from."""

    def __init__(self, fingerprint, graph_module: Optional[fx.GraphModule], chains: int):
        self.fingerprint = fingerprint
        self.graph_module = graph_module
        self.chains = chains
        self.conversion: Optional["Conversion"] = None


def _has_hooks(modules) -> bool:
    from torch.nn.modules import module as _m
    if any(getattr(_m, n, None) for n in ("_global_forward_hooks", "_global_forward_pre_hooks",
                                          "_global_backward_hooks",
                                          "_global_backward_pre_hooks")):
        return True
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
               or m._backward_pre_hooks for m in modules)


def _fingerprint(model: nn.Module):
    return tuple((id(m), type(m), m.__dict__.get("forward"), getattr(m, "padding_mode", None),
                  getattr(m, "running_mean", 0) is None) for m in model.modules())


def _act_of(node: fx.Node, src: fx.Node, modules: Dict[str, nn.Module]):
    """(kind, fallback callable) when ``node`` is a ReLU/ReLU6 applied to ``src`` only."""
    if node.op == "call_module":
        m = modules.get(node.target)
        kind = _ACT_MODULES.get(type(m))
        if kind and node.args == (src,) and not node.kwargs:
            return kind, m
    elif node.op == "call_function" and node.target in _ACT_FUNCS:
        args, kwargs = node.args, node.kwargs
        if (args and args[0] is src and all(isinstance(a, bool) for a in args[1:])
                and set(kwargs) <= {"inplace"}):
            kind = _ACT_FUNCS[node.target]
            return kind, _ACT_FALLBACK[kind]
    return 0, None


def _build_plan(model: nn.Module, fingerprint) -> _FusionPlan:
    """Trace the model (torch.fx) and fuse its conv -> BN (-> ReLU/ReLU6) chains where the
    conv's output goes only to the BN (and the BN's only to the activation). No plan (the
    per-module conversion alone) when the model cannot be traced, has hooks (a traced graph
    would run them differently) or has no such chain."""
    modules = list(model.modules())
    none = _FusionPlan(fingerprint, None, 0)
    if "forward" in model.__dict__ or _has_hooks(modules):
        return none
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = _Tracer().trace(model)
    except Exception:  # untraceable (data-dependent control flow, ...): no fusion
        return none
    named = dict(model.named_modules())
    chains = []
    for node in graph.nodes:
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        conv = named.get(node.target)
        if not isinstance(conv, nn.Conv2d) or "forward" in conv.__dict__ or len(node.users) != 1:
            continue
        if conv.padding_mode != "zeros" and not _overrides(conv, nn.Conv2d, "forward",
                                                           "_conv_forward"):
            continue
        (bn_node,) = node.users
        if bn_node.op != "call_module" or bn_node.args != (node,) or bn_node.kwargs:
            continue
        bn = named.get(bn_node.target)
        if (type(bn) is not nn.BatchNorm2d or bn.running_mean is None or bn.running_var is None
                or bn.num_features != conv.out_channels):
            continue
        act, act_fn, act_node = 0, None, None
        if len(bn_node.users) == 1:
            (user,) = bn_node.users
            act, act_fn = _act_of(user, bn_node, named)
            act_node = user if act else None
        chains.append((node, bn_node, act_node, conv, bn, act, act_fn))
    if not chains:
        return none
    plan = _FusionPlan(fingerprint, None, len(chains))
    gm = fx.GraphModule(model, graph)
    for i, (conv_node, bn_node, act_node, conv, bn, act, act_fn) in enumerate(chains):
        name = f"_tsgb_fused_{i}"
        gm.add_submodule(name, _FusedBlock(conv, bn, act, act_fn, plan))
        with gm.graph.inserting_before(conv_node):
            new = gm.graph.call_module(name, args=conv_node.args)
        last = act_node if act_node is not None else bn_node
        last.replace_all_uses_with(new)
        for n in (act_node, bn_node, conv_node):
            if n is not None:
                gm.graph.erase_node(n)
    gm.graph.lint()
    gm.recompile()
    plan.graph_module = gm
    return plan


def _check_tol(*dtypes) -> Optional[float]:
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
        self.state = _ClassifierState()
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

    def _warn_once(self, m: nn.Module, what: str, msg: str) -> None:
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
        x, padding = _conv_args(x, weight, padding, _pair(dilation))
        out = self.backend.conv2d(x, weight, bias, _pair(stride), padding, _pair(dilation),
                                  groups)
        self._watch(m, out, groups)
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
        return self.backend.avg_pool2d(x, _pair(kernel_size), _pair(stride), _pair(padding),
                                       bool(ceil_mode), bool(count_include_pad),
                                       divisor_override)

    def _routed_call(self, kind: str, m: nn.Module, args, kwargs):
        """A functional call made inside a subclass's own forward, as the rule's op (None: the
        rule is not defined for it, e.g. a 3-D input)."""
        if kind == "conv":
            b = _bind_conv2d(args, kwargs)
            if b["input"].dim() != 4:
                return None
            return self._conv_call(m, b["input"], b["weight"], b["bias"], b["stride"],
                                   b["padding"], b["dilation"], b["groups"])
        if kind == "batchnorm":
            b = _bind(_BN_NAMES, _BN_DEFAULTS, args, kwargs)
            if b["input"].dim() != 4:
                return None
            return self._bn_call(b["input"], b["running_mean"], b["running_var"], b["weight"],
                                 b["bias"], b["eps"], b["training"])
        if kind == "avgpool":
            b = _bind(_POOL_NAMES, _POOL_DEFAULTS, args, kwargs)
            if b["input"].dim() != 4:
                return None
            return self._pool_call(b["input"], b["kernel_size"], b["stride"], b["padding"],
                                   b["ceil_mode"], b["count_include_pad"],
                                   b["divisor_override"])
        b = _bind(_LINEAR_NAMES, {"bias": None}, args, kwargs)
        if kind == "classifier":
            return self.backend.linear(b["input"], b["weight"], b["bias"])
        return _DeferredLinear.apply(b["input"], b["weight"], b["bias"], m, self.state, self)

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
            self._warn_once(m, "no-call",
                            f"{label} overrides forward and made no {what} call on a 4-D input; "
                            f"it keeps its ordinary gradient instead of the {rule} rule")
        elif kind == "conv" and mode.hits and not is_result:
            self._warn_once(m, "not-output",
                            f"{label} overrides forward and returns something other than the "
                            f"result of its conv2d call: that call got the TSGB conv rule, what "
                            f"its forward does to the result keeps its ordinary gradient")

    def _watch(self, m: nn.Module, out, groups: int) -> None:
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
        y, version, groups = out, out._version, int(groups)
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
                w.append((m, ratio.max(), (mag > 0).any(), _check_tol(g.dtype, y.dtype), single))
        out.register_hook(hook)

    def degenerate(self) -> List[Tuple[nn.Module, float, bool]]:
        """Convs found to hand on relevance that sums to zero at every output position (see
        ``_watch``): (module, largest |sum| / magnitude, single output position), after a
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
        if _own_forward(m):
            self._patch_own(m, "conv")
            return

        def forward(x):
            if m.padding_mode != "zeros":
                x = F.pad(x, m._reversed_padding_repeated_twice, mode=m.padding_mode)
                padding = (0, 0)
            else:
                x, padding = _conv_args(x, m.weight, m.padding, m.dilation)
            out = conv.backend.conv2d(x, m.weight, m.bias, m.stride, padding, m.dilation,
                                      m.groups)
            conv._watch(m, out, m.groups)
            return out
        self._set_forward(m, forward)

    def _patch_conv_relu(self, m: nn.Conv2d, relu: nn.ReLU) -> None:
        """A Conv2d directly followed by nn.ReLU in an nn.Sequential: where the backend has a
        fused conv+ReLU op, the conv computes relu(conv(x)) and the ReLU passes its input on.
        The rule is unchanged (g * relu(y) == g * 1[y > 0] * y); a whole pass disappears."""
        conv = self

        def fused() -> bool:
            return getattr(conv.backend, "conv2d_relu", None) is not None

        def forward(x):
            x, padding = _conv_args(x, m.weight, m.padding, m.dilation)
            if fused():
                out = conv.backend.conv2d_relu(x, m.weight, m.bias, m.stride, padding,
                                               m.dilation, m.groups)
            else:
                out = conv.backend.conv2d(x, m.weight, m.bias, m.stride, padding, m.dilation,
                                          m.groups)
            conv._watch(m, out, m.groups)  # relu(y) carries the same relevance as y
            return out

        def relu_forward(x):
            return x if fused() else F.relu(x)
        self._set_forward(m, forward)
        self._set_forward(relu, relu_forward)

    def _fusable_pairs(self, modules) -> Dict[nn.Module, nn.Module]:
        """Conv2d -> ReLU pairs inside nn.Sequential containers (the Sequential hands the conv's
        output to the ReLU only); none with hooks, subclasses or non-zero padding modes."""
        def plain(m):
            return not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                        or m._backward_pre_hooks or "forward" in m.__dict__)
        pairs: Dict[nn.Module, nn.Module] = {}
        taken = set()
        for seq in modules:
            if type(seq) is not nn.Sequential or not plain(seq):
                continue
            children = list(seq.children())
            for a, b in zip(children, children[1:]):
                if (type(a) is nn.Conv2d and type(b) is nn.ReLU and a.padding_mode == "zeros"
                        and plain(a) and plain(b) and id(a) not in taken and id(b) not in taken
                        and a not in pairs):
                    pairs[a] = b
                    taken.update((id(a), id(b)))
        # a module used in two places could be handed other inputs: fuse only single uses
        counts: Dict[int, int] = {}
        for seq in modules:
            for c in seq.children():
                counts[id(c)] = counts.get(id(c), 0) + 1
        return {a: b for a, b in pairs.items() if counts[id(a)] == 1 and counts[id(b)] == 1}

    def _patch_bn(self, m: nn.BatchNorm2d) -> None:
        conv = self
        if _own_forward(m):  # e.g. timm's BatchNormAct2d: BN, then drop and act
            self._patch_own(m, "batchnorm")
            return

        def forward(x):
            if x.dim() != 4:
                raise ValueError(f"expected 4D input to {type(m).__name__} (got {x.dim()}D input)")
            return conv._bn_call(x, m.running_mean, m.running_var, m.weight, m.bias, m.eps)
        self._set_forward(m, forward)

    def _patch_avgpool(self, m: nn.AvgPool2d) -> None:
        conv = self
        if _own_forward(m):  # e.g. timm's AvgPool2dSame: pads, then avg_pool2d
            self._patch_own(m, "avgpool")
            return

        def forward(x):
            return conv._pool_call(x, m.kernel_size, m.stride, m.padding, m.ceil_mode,
                                   m.count_include_pad, m.divisor_override)
        self._set_forward(m, forward)

    def _patch_classifier(self, m: nn.Linear) -> None:
        conv = self
        if _own_forward(m):
            self._patch_own(m, "classifier")
            return

        def forward(x):
            return conv.backend.linear(x, m.weight, m.bias)
        self._set_forward(m, forward)

    def _patch_deferred(self, m: nn.Linear) -> None:
        conv = self
        if _own_forward(m):
            self._deferred.append(self._patch_own(m, "deferred"))
            return

        def forward(x):
            return _DeferredLinear.apply(x, m.weight, m.bias, m, conv.state, conv)
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

        self._apply_fusion_plan()
        fused = self._fusable_pairs(modules)
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
        fp = _fingerprint(self.model)
        plan = self.fusion_cache.get("plan")
        if plan is None or plan.fingerprint != fp:
            plan = _build_plan(self.model, fp)
            self.fusion_cache["plan"] = plan
        if plan.graph_module is None:
            return
        plan.conversion = self
        self._undo.append(lambda: setattr(plan, "conversion", None))
        self._set_forward(self.model, plan.graph_module.forward)

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
        kind = _rule_kind(m)
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
        if _own_forward(m) and rule != "gradient":
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
