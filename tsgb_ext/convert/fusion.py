"""Fusion: each ``Conv2d -> BatchNorm2d (-> ReLU / ReLU6)`` chain of the model's torch.fx graph
as one native ``conv2d_bn_act`` call (the fusion plan, cached per module tree), and the
``Conv2d -> ReLU`` pairs of ``nn.Sequential`` containers (``conv2d_relu``)."""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .calls import bind_conv2d, conv_args, pair
from .layer_map import overrides, own_forward, set_instance_forward

# ---- conv -> BN -> activation fusion (traced graph) ------------------------------------------
_ACT_MODULES = {nn.ReLU: 1, nn.ReLU6: 2}
_ACT_FUNCS = {F.relu: 1, torch.relu: 1, torch.relu_: 1, F.relu_: 1, F.relu6: 2}
_ACT_FALLBACK = {1: F.relu, 2: F.relu6}


class _Tracer(fx.Tracer):
    """A torch.fx tracer that touches no process-wide state.

    ``fx.Tracer.trace`` finds submodule calls by replacing ``torch.nn.Module.__call__`` and
    ``__getattr__`` (and ``math``'s functions) for the whole process while it traces: a model
    running in another thread meanwhile gets proxies or "not installed as a submodule"
    errors, and two traces at once can leave the patch in place. This tracer instead gives
    each leaf module of the model being traced an instance-level ``forward`` that records a
    ``call_module`` node when it is handed a proxy (and runs the module's own forward when it
    is not, so a direct call of the same model elsewhere is unaffected); everything else
    traces through ``Proxy.__torch_function__``. Leaves are the modules the conversion patches
    (Conv2d, BatchNorm2d, AvgPool2d, Linear) and torch.nn's own, so their patched forwards, and
    a Conv2d subclass's own forward, run when the graph runs. What fx's patches would have
    made traceable (a parameter's proxied attributes, ``math.sqrt`` of a proxy, functions
    registered with ``torch.fx.wrap``) raises instead, and the model runs unfused."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.AvgPool2d, nn.Linear))
                or super().is_leaf_module(m, qualname))

    def trace(self, root: nn.Module, concrete_args=None) -> fx.Graph:  # noqa: D102
        if concrete_args is not None:
            raise NotImplementedError("concrete_args")
        self.root = root
        self.submodule_paths = {m: n for n, m in root.named_modules()}
        self.graph = fx.Graph(tracer_cls=type(self))
        self.tensor_attrs = {}  # tensors that are plain attributes (fx's create_arg looks here)
        for prefix, m in root.named_modules():
            for k, v in m.__dict__.items():
                if isinstance(v, torch.Tensor) and not isinstance(v, nn.Parameter):
                    self.tensor_attrs[v] = f"{prefix}.{k}" if prefix else k
        fn, args = self.create_args_for_root(type(root).forward, True, None)
        undo = [self._intercept(m, name) for name, m in root.named_modules()
                if m is not root and self.is_leaf_module(m, name)]
        try:
            out = fn(*args)
            self.create_node("output", "output", (self.create_arg(out),), {})
        finally:
            for u in reversed(undo):
                u()
            self.submodule_paths = None
        return self.graph

    def _intercept(self, m: nn.Module, name: str) -> Callable[[], None]:
        """m's instance forward, while tracing: a call_module node for a call with a proxy."""
        run = m.forward  # what an ordinary call runs (its instance forward or its class's)
        tracer = self

        def forward(*args, **kwargs):
            if any(isinstance(a, fx.Proxy) for a in _leaves((args, kwargs))):
                return tracer.create_proxy("call_module", name, args, kwargs)
            return run(*args, **kwargs)
        return set_instance_forward(m, forward)


class _RuleTracer(_Tracer):
    """A :class:`_Tracer` that traces into the own ``forward`` of rule-layer subclasses
    (timm's ``BatchNormAct2d``, a static "same"-padding conv, weight standardisation, ...)
    instead of keeping them as leaves: every node made while such a forward is traced carries
    ``meta["tsgb_rule"]``, the module's qualified name, so that the layer's functional call
    (``conv2d``, ``batch_norm``, ``avg_pool2d``) can take the rule the conversion routes it to
    (:mod:`tsgb_ext.convert.routing`), and everything else the forward does keeps its own
    gradient."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, _RULE_LEAVES) and own_forward(m):
            return False
        return super().is_leaf_module(m, qualname)

    def trace(self, root: nn.Module, concrete_args=None) -> fx.Graph:  # noqa: D102
        self._inside: list = []
        undo = [self._tagging(m, name) for name, m in root.named_modules()
                if m is not root and isinstance(m, _RULE_LEAVES) and own_forward(m)]
        try:
            return super().trace(root, concrete_args)
        finally:
            for u in reversed(undo):
                u()

    def create_node(self, *args, **kwargs):  # noqa: D102
        node = super().create_node(*args, **kwargs)
        if self._inside:
            node.meta["tsgb_rule"] = self._inside[-1]
        return node

    def _tagging(self, m: nn.Module, name: str) -> Callable[[], None]:
        """m's instance forward while tracing: its own forward, with ``name`` on the stack of
        rule layers being traced (only for a call with a proxy)."""
        run, inside = m.forward, self._inside

        def forward(*args, **kwargs):
            if not any(isinstance(a, fx.Proxy) for a in _leaves((args, kwargs))):
                return run(*args, **kwargs)
            inside.append(name)
            try:
                return run(*args, **kwargs)
            finally:
                inside.pop()
        return set_instance_forward(m, forward)


_RULE_LEAVES = (nn.Conv2d, nn.BatchNorm2d, nn.AvgPool2d, nn.Linear)


def trace_graph(model: nn.Module, into_own_forward: bool = False) -> fx.Graph:
    """The model's torch.fx graph, traced without process-wide patches (see ``_Tracer``):
    Conv2d, BatchNorm2d, AvgPool2d, Linear and torch.nn's own modules are leaves;
    ``into_own_forward``: rule-layer subclasses with their own forward are traced into, their
    nodes tagged (``_RuleTracer``)."""
    return (_RuleTracer() if into_own_forward else _Tracer()).trace(model)


def _leaves(tree):
    return torch.utils._pytree.tree_leaves(tree)


class FusedBlock(nn.Module):
    """A conv -> BatchNorm2d (-> ReLU / ReLU6) chain of the traced graph as one call: the native
    backend's conv2d_bn_act op (one autograd node whose backward folds the BN and activation
    rules into the conv rule), or, for a backend without it, the three modules one by one."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, act: int, act_fn: Optional[Callable],
                 plan: "FusionPlan"):
        super().__init__()
        # plain attributes, not submodules: the model owns these modules
        self.__dict__.update(conv_=conv, bn_=bn, act_fn=act_fn, plan=plan)
        self.act = act

    def _unfused(self, x):
        y = self.bn_(self.conv_(x))  # the modules' converted forwards
        return self.act_fn(y) if self.act_fn is not None else y

    def _fused_call(self, fused, x, weight, bias, stride, padding, dilation, groups):
        bn = self.bn_
        x, padding = conv_args(x, weight, padding, pair(dilation))
        return fused(x, weight, bias, pair(stride), padding, pair(dilation), groups,
                     bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps, self.act)

    def forward(self, x):
        conv = self.conv_
        backend = self.plan.conversion.backend
        if not backend.supports_fusion or self.__dict__.get("subclass_unfusable"):
            return self._unfused(x)
        fused = backend.conv2d_bn_act
        if not overrides(conv, nn.Conv2d, "forward", "_conv_forward"):
            out = self._fused_call(fused, x, conv.weight, conv.bias, conv.stride, conv.padding,
                                   conv.dilation, conv.groups)
            # the block's output carries the conv output's relevance (BN and ReLU conserve it)
            self.plan.conversion.watch_output(conv, out, conv.groups)
            return out
        # A Conv2d subclass with its own forward (e.g. "same" padding: pad, then F.conv2d): run
        # it, with its conv2d call (its own weight) replaced by the fused op. Fused only if that
        # call's result is what the forward returns; otherwise this call and later ones run
        # the modules one by one.
        mode = _FusedConvInterceptor(self, fused)
        with mode:
            out = type(conv).forward(conv, x)
        if mode.hits == 1 and out is mode.result:
            self.plan.conversion.watch_output(conv, out, conv.groups)
            return out
        self.__dict__["subclass_unfusable"] = True
        return self._unfused(x)


class _FusedConvInterceptor(TorchFunctionMode):
    """Inside a fused block's Conv2d subclass forward: its conv2d call (its own weight, or one
    derived from it) becomes the block's fused conv -> BN -> activation op."""

    def __init__(self, block: "FusedBlock", fused: Callable):
        super().__init__()
        self.block, self.fused = block, fused
        self.hits, self.result = 0, None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.conv2d and self.hits == 0:
            b = bind_conv2d(args, kwargs)
            if b["input"].dim() == 4:  # its own weight or one derived from it (StdConv2d)
                self.hits += 1
                self.result = self.block._fused_call(self.fused, b["input"], b["weight"], b["bias"],
                                                     b["stride"], b["padding"], b["dilation"],
                                                     b["groups"])
                return self.result
        elif func is torch.conv2d:
            self.hits += 1
        return func(*args, **kwargs)


class FusionPlan:
    """The model's traced graph with its conv -> BN (-> activation) chains fused, and the
    fingerprint of the module tree it was traced from."""

    def __init__(self, fingerprint, graph_module: Optional[fx.GraphModule], chains: int):
        self.fingerprint = fingerprint
        self.graph_module = graph_module
        self.chains = chains
        self.conversion: Optional["Conversion"] = None
        #: why there is no graph (None when there is one, or no chain to fuse)
        self.reason: Optional[str] = None


_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks", "_global_forward_hooks_always_called",
                 "_global_forward_hooks_with_kwargs")
_MODULE_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                 "_backward_pre_hooks")


def _hook_state(modules) -> tuple:
    """Every module hook and global module hook registered now, by handle id (ids only grow,
    so a hook removed and another added reads differently)."""
    from torch.nn.modules import module as _m
    glob = tuple(tuple(getattr(_m, n, None) or ()) for n in _GLOBAL_HOOKS)
    return glob, tuple((id(m),) + tuple(tuple(getattr(m, n, None) or ()) for n in _MODULE_HOOKS)
                       for m in modules if any(getattr(m, n, None) for n in _MODULE_HOOKS))


def _has_hooks(modules) -> bool:
    glob, per_module = _hook_state(modules)
    return any(glob) or bool(per_module)


def module_fingerprint(model: nn.Module):
    """What a cached plan depends on: the module tree (identity, type, instance forward,
    padding mode, BN running statistics) and every hook registered on it or globally, so
    that a plan traced before a hook was added is never run after (a traced graph would
    skip or misplace the hook)."""
    modules = list(model.modules())
    return (tuple((id(m), type(m), m.__dict__.get("forward"), getattr(m, "padding_mode", None),
                   getattr(m, "running_mean", 0) is None) for m in modules),
            _hook_state(modules))


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


def build_plan(model: nn.Module, fingerprint) -> FusionPlan:
    """Trace the model (torch.fx) and fuse its conv -> BN (-> ReLU/ReLU6) chains where the
    conv's output goes only to the BN (and the BN's only to the activation). No plan (the
    per-module conversion alone) when the model cannot be traced, has hooks (a traced graph
    would run them differently) or has no such chain."""
    modules = list(model.modules())
    none = FusionPlan(fingerprint, None, 0)
    if "forward" in model.__dict__ or _has_hooks(modules):
        return none
    try:
        graph = _Tracer().trace(model)
    except Exception as e:  # untraceable (data-dependent control flow, ...): no fusion
        none.reason = f"not traceable ({type(e).__name__}: {e})"[:300]
        return none
    named = dict(model.named_modules())
    chains = []
    for node in graph.nodes:
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        conv = named.get(node.target)
        if not isinstance(conv, nn.Conv2d) or "forward" in conv.__dict__ or len(node.users) != 1:
            continue
        if conv.padding_mode != "zeros" and not overrides(conv, nn.Conv2d, "forward",
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
    plan = FusionPlan(fingerprint, None, len(chains))
    gm = fx.GraphModule(model, graph)
    for i, (conv_node, bn_node, act_node, conv, bn, act, act_fn) in enumerate(chains):
        name = f"_tsgb_fused_{i}"
        gm.add_submodule(name, FusedBlock(conv, bn, act, act_fn, plan))
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


def conv_relu_pairs(modules) -> Dict[nn.Module, nn.Module]:
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
