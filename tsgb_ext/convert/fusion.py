"""Fusion: each ``Conv2d -> BatchNorm2d (-> ReLU / ReLU6)`` chain of the model's torch.fx graph
as one native ``conv2d_bn_act`` call (the fusion plan, cached per module tree), and the
``Conv2d -> ReLU`` pairs of ``nn.Sequential`` containers (``conv2d_relu``)."""
from __future__ import annotations

import warnings
from typing import Callable, Dict, Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .calls import bind_conv2d, conv_args, pair
from .layer_map import overrides

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
        if not getattr(backend, "supports_fusion", False) or self.__dict__.get("subclass_unfusable"):
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


def _has_hooks(modules) -> bool:
    from torch.nn.modules import module as _m
    if any(getattr(_m, n, None) for n in ("_global_forward_hooks", "_global_forward_pre_hooks",
                                          "_global_backward_hooks",
                                          "_global_backward_pre_hooks")):
        return True
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
               or m._backward_pre_hooks for m in modules)


def module_fingerprint(model: nn.Module):
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
