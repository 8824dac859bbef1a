"""Many targets for the price of one: the TSGB backward factorised over targets.

TSGB's backward is linear in the output gradient. Walking the model's torch.fx graph from the
logits down, the gradient of T targets at a node's output is kept as a short sum of terms
(:class:`Rep`):

* a spatial term ``A * b``: ``A`` (N, C, H, W) is the same for every target, ``b``
  (N, T, 1, H, W) is one single-channel map per target;
* a channel term ``A * v``: ``v`` (N, T, C, 1, 1) is one channel vector per target (a global
  average pool's gradient);
* a dense part ``G`` (N, T, C, H, W) (or (N, T, F) for vectors): the materialised gradient,
  used where the structure does not hold or where the terms would cost more than it.

The rules act on the target-independent factors where they can (TSGB_SPEC.md):

* ReLU / ReLU6 / eval BatchNorm multiply every ``A`` by a target-independent factor (the mask,
  ``y / (x + eps)``); an addition hands the same terms to both inputs; a concatenation slices
  them by channels.
* A ``groups == 1`` conv contracts everything to ``s[o] = sum_k g[k,o] y[k,o]``: for a spatial
  term that is ``b[o] * Q[o]`` with ``Q = sum_k A y`` (target-independent), for a channel term
  ``v @ (A y)``; then ``r = s / (d + eps)`` and one transposed box sum on single-channel maps
  batched over the targets give ``t``, and the input gradient is ONE spatial term
  ``sign(x) * t``.
* MaxPool2d routes by the forward's argmax (target-independent): a channel term stays one
  channel term; a spatial term becomes one term when the windows do not overlap and one term
  per window offset when they do. The TSGB AvgPool2d rule is the same stencil.
* A global average pool's gradient is a channel term with ``A = 1``; the TSGB-FC classifier
  gives each target the row ``W+[t] + beta[t] * W-[t]`` (one-hot targets: only those rows).
* A depthwise conv (groups == C_in == C_out) is a per-channel stencil like AvgPool's.
* Ops without a TSGB rule whose ordinary gradient is a target-independent factor keep the
  terms: elementwise activations (times ``f'(x)``), products (times the other factor; a
  squeeze-excitation gate's own gradient is one (N, T, C) contraction per term), zero padding
  (a crop), split / chunk along channels (the pieces' terms placed back).

Everything else (grouped convs that are not depthwise, other Linear layers, any other op)
takes the materialised gradient: the rules' own formulas on (N*T)-batched tensors, and for
ops without a TSGB rule their ordinary gradient by ``torch.autograd`` (batched over the
targets). When the
terms at a node outnumber the targets, they are materialised too (T targets cost T dense
passes; J terms cost J). So the path is exact by construction (the same formulas, summed in
another order) and never slower in passes than the batched backward.

The forward is the model's own, computed node by node from the graph (no autograd, nothing
saved but the node outputs); the model is not converted. :func:`plan_for` traces once per
module tree, into the own ``forward`` of rule-layer subclasses (timm's ``BatchNormAct2d``,
EfficientNet-Lite's static "same"-padding conv, weight standardisation, timm's ``Linear``):
their ``conv2d``, ``batch_norm``, ``avg_pool2d`` and ``linear`` calls take the rules, as the
conversion routes them, and a zero padding (``F.pad``, ``nn.ZeroPad2d``,
``nn.ConstantPad2d(.., 0)``) crops the terms. A
model this cannot handle (untraceable, e.g. a padding computed with ``math`` from the input's
size; hooks; a Conv2d with non-zero padding mode or ``padding="same"``) gets ``None`` and the
explainer uses its batched backward.
"""
from __future__ import annotations

import math
import operator
from typing import Dict, List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.grad import conv2d_input

from ..convert.calls import (BN_DEFAULTS, BN_NAMES, POOL_DEFAULTS, POOL_NAMES, bind,
                             bind_conv2d, pair as _pair, pool_stride)
from ..convert.fusion import module_fingerprint, trace_graph

EPS = 1e-10

#: modules the walker computes itself (exact types or subclasses without their own forward)
_RULE_TYPES = (nn.Conv2d, nn.BatchNorm2d, nn.AvgPool2d, nn.Linear)
_PASS_MODULES = (nn.Identity, nn.Dropout, nn.Dropout2d, nn.Dropout1d, nn.AlphaDropout)
_INPLACE_FUNCS = {operator.iadd: operator.add, operator.imul: operator.mul,
                  operator.isub: operator.sub, operator.itruediv: operator.truediv,
                  torch.relu_: torch.relu, F.relu_: F.relu}


# ---- the gradient of T targets at one node ---------------------------------------------------
class Rep:
    """Gradient at a node's output: ``dense`` (N, T, *shape) or None, ``sp``: [(A, b)],
    ``ch``: [(A, v)] (A None means ones), ``onehot``: the (N, T) targets while the gradient is
    still the one-hot of the logits (lets the classifier rule select rows); ``pend``: a
    target-independent factor not yet multiplied in (BN and activation factors wait for the
    conv below, which folds them into its contraction once for all terms)."""

    __slots__ = ("dense", "sp", "ch", "onehot", "pend", "lin")

    def __init__(self, dense=None, sp=(), ch=(), onehot=None, pend=None, lin=None):
        self.dense, self.sp, self.ch, self.onehot = dense, list(sp), list(ch), onehot
        self.pend = pend
        #: a Linear layer's input gradient kept as ``u @ W`` (alone in its Rep): (u (N, T, F),
        #: W (F, *shape) viewed as this node's shape, pool: None or a max pool's routing to
        #: apply after it); a conv below contracts it as u @ J, J target-independent
        self.lin = lin

    @property
    def terms(self) -> int:
        return len(self.sp) + len(self.ch)

    def plus(self, other: "Rep") -> "Rep":
        assert self.pend is other.pend
        dense = (self.dense if other.dense is None else other.dense if self.dense is None
                 else self.dense + other.dense)
        return Rep(dense, _merge(self.sp + other.sp), _merge(self.ch + other.ch),
                   pend=self.pend)

    def materialise(self) -> torch.Tensor:
        assert self.pend is None
        if self.lin is not None:
            return _lin_dense(self.lin)
        out, fresh = self.dense, False  # fresh: ``out`` is this call's own, full-size tensor
        for A, b in self.sp + self.ch:
            if out is None:
                out, fresh = (b, False) if A is None else (A.unsqueeze(1) * b, True)
                continue
            a = None if A is None else A.unsqueeze(1)
            shape = torch.broadcast_shapes(out.shape, b.shape, *(() if a is None else (a.shape,)))
            if fresh and tuple(shape) == tuple(out.shape):  # in place: one pass, no temporary
                out = out.add_(b) if a is None else out.addcmul_(a, b)
            else:
                out, fresh = (out + b if a is None else torch.addcmul(out, a, b)), True
        return out

    def densify(self) -> "Rep":
        return Rep(self.materialise())


def _merge(terms):
    """Terms with the same ``A`` (the same tensor object) merge by adding their factors."""
    out: List[list] = []
    for A, f in terms:
        for e in out:
            if e[0] is A:
                e[1] = e[1] + f
                break
        else:
            out.append([A, f])
    return [tuple(e) for e in out]


# ---- window geometry (conv, pools) ---------------------------------------------------------
def _place(P: torch.Tensor, delta, geom, size) -> torch.Tensor:
    """Zeros of the input's spatial ``size`` with ``P[..., o]`` at input position
    ``o * stride - padding + delta * dilation`` (window offset ``delta``), where in range."""
    out = P.new_zeros(P.shape[:-2] + tuple(size))
    sl = _slices(P.shape[-2:], delta, geom, size)
    if sl is not None:
        out[..., sl[2], sl[3]] = P[..., sl[0], sl[1]]
    return out


def _spread(P: torch.Tensor, geom, size) -> torch.Tensor:
    """The transposed box sum: every output position's value added to each input position of
    its window. The window is a box, so this is separable: one 1-D pass along the rows, then
    one along the columns (kh + kw strided adds, not kh * kw)."""
    k, s, p, d = geom
    if k == (1, 1) and p == (0, 0):
        if s == (1, 1) and tuple(P.shape[-2:]) == tuple(size):
            return P
        return _place(P, (0, 0), geom, size)
    out = P
    for dim in range(2):
        out = _spread1(out, P.dim() - 2 + dim, k[dim], s[dim], p[dim], d[dim], size[dim])
    return out


def _spread1(P: torch.Tensor, axis: int, k: int, s: int, p: int, d: int, n_in: int):
    """The transposed 1-D box sum of ``P`` along ``axis`` (window k, stride s, padding p,
    dilation d) onto ``n_in`` input positions."""
    n_out = P.shape[axis]
    if k == 1 and s == 1 and p == 0 and n_out == n_in:
        return P
    shape = list(P.shape)
    shape[axis] = n_in
    spans = []
    for j in range(k):
        off = j * d - p
        lo = max(0, -(off // s))  # ceil(-off / s)
        hi = min(n_out - 1, (n_in - 1 - off) // s)
        if hi >= lo:
            spans.append((lo, hi, off))
    # an offset whose window positions cover every input position (stride 1, "same" size):
    # the sum starts as a copy of it instead of zeros plus an add
    full = next((sp for sp in spans if s == 1 and sp[2] + sp[0] == 0
                 and sp[1] + sp[2] == n_in - 1), None)
    if full is not None:
        spans.remove(full)
        out = P.narrow(axis, full[0], full[1] - full[0] + 1).clone()
    else:
        out = P.new_zeros(shape)
    idx = [slice(None)] * P.dim()
    for lo, hi, off in spans:
        idx[axis] = slice(lo * s + off, hi * s + off + 1, s)
        out[tuple(idx)] += P.narrow(axis, lo, hi - lo + 1)
    return out


def _slices(out_size, delta, geom, size):
    """(output rows, output cols, input rows, input cols) slices of window offset ``delta``."""
    src, dst = [], []
    for dim in range(2):
        k, s, p, d = (g[dim] for g in geom)
        n_in, n_out, off = size[dim], out_size[dim], delta[dim] * d - p
        lo = max(0, -(off // s))  # ceil(-off / s)
        hi = min(n_out - 1, (n_in - 1 - off) // s)
        if hi < lo:
            return None
        src.append(slice(lo, hi + 1))
        dst.append(slice(lo * s + off, hi * s + off + 1, s))
    return src[0], src[1], dst[0], dst[1]


def _offsets(k):
    return [(i, j) for i in range(k[0]) for j in range(k[1])]


def _overlaps(geom) -> bool:
    k, s, _, d = geom
    return any(s[i] < d[i] * (k[i] - 1) + 1 for i in range(2))


def _stencil(rep: Rep, P_of, geom, size, post=None, max_terms=None) -> Rep:
    """Input gradient of a stencil op: each output position's target-independent weight
    ``P_of(A)`` (N, C, Ho, Wo) goes to the input positions of its window, times the target
    factor there (``post``: a target-independent factor at the input, e.g. 1 / (x + eps))."""
    offs = _offsets(geom[0])

    def spread(P):
        out = None
        for dl in offs:
            q = _place(P, dl, geom, size)  # a fresh tensor
            out = q if out is None else out.add_(q)
        if post is None:
            return out
        return out * (post if out.dim() == post.dim() else post.unsqueeze(1))
    dense = None if rep.dense is None else spread(P_of(None, rep.dense))
    ch = [(spread(P_of(A, None)), v) for A, v in rep.ch]
    sp = []
    if _overlaps(geom):
        if rep.sp and len(rep.sp) * len(offs) + len(ch) > max_terms:
            extra = Rep(sp=rep.sp).materialise()
            d = spread(P_of(None, extra))
            dense = d if dense is None else dense + d
        else:
            for A, b in rep.sp:
                for dl in offs:
                    q = _place(P_of(A, None), dl, geom, size)
                    sp.append((q if post is None else q * post, _place(b, dl, geom, size)))
    else:
        for A, b in rep.sp:
            sp.append((spread(P_of(A, None)), sum(_place(b, dl, geom, size) for dl in offs)))
    return Rep(dense, sp, ch)


# ---- the plan: a traced graph and what each node is --------------------------------------------
class FactorPlan:
    """The model's traced graph and which modules it calls; built by :func:`plan_for`."""

    def __init__(self, model: nn.Module, graph: fx.Graph):
        self.model = model
        self.graph = graph
        self.modules = dict(model.named_modules())
        self.gm = fx.GraphModule(model, graph)
        self.nodes = list(self.gm.graph.nodes)
        self.input_node = next(n for n in self.nodes if n.op == "placeholder")
        self.active: set = set()
        self.paths: Dict[str, str] = {}  # node name -> path taken in the last call


def _unsupported(model: nn.Module) -> Optional[str]:
    for name, m in model.named_modules():
        if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or getattr(
                m, "_backward_pre_hooks", None):
            return f"{name or 'the model'} has hooks"
        if isinstance(m, nn.Conv2d) and (m.padding_mode != "zeros" or isinstance(m.padding, str)):
            return f"{name}: padding {m.padding!r} / padding_mode {m.padding_mode!r}"
        if isinstance(m, nn.BatchNorm2d) and (m.running_mean is None or m.running_var is None):
            return f"{name}: BatchNorm2d without running statistics"
        if isinstance(m, nn.MaxPool2d) and m.return_indices:
            return f"{name}: MaxPool2d(return_indices=True)"
    return None


def plan_for(model: nn.Module, cache: dict) -> Tuple[Optional[FactorPlan], str]:
    """The factorisation plan of ``model`` (cached per module tree in ``cache``), or None and
    why not."""
    key = module_fingerprint(model)
    hit = cache.get("factor")
    if hit is not None and hit[0] == key:
        return hit[1], hit[2]
    why = ("the model has an instance forward" if "forward" in model.__dict__
           else "the model is itself a rule layer" if isinstance(model, _RULE_TYPES)
           else _unsupported(model))
    plan = None
    if why is None:
        training = [(m, m.training) for m in model.modules()]
        model.eval()
        try:
            plan = FactorPlan(model, trace_graph(model, into_own_forward=True))
            why = "traced"
        except Exception as exc:  # noqa: BLE001 - any trace failure means: the batched path
            why = f"torch.fx could not trace it ({type(exc).__name__}: {exc})"
        finally:
            for m, t in training:
                m.training = t
    cache["factor"] = (key, plan, why)
    return plan, why


# ---- the forward, node by node -------------------------------------------------------------
class _Forward(fx.Interpreter):
    """The model's eval forward from its graph, keeping every node's output (rule layers and
    in-place ops computed out of place, so nothing recorded is overwritten)."""

    def __init__(self, plan: FactorPlan):
        super().__init__(plan.gm, garbage_collect_values=False)
        self.plan = plan
        self.indices: Dict[fx.Node, torch.Tensor] = {}

    def run_node(self, n):
        self._node = n
        return super().run_node(n)

    def call_module(self, target, args, kwargs):
        m = self.plan.modules[target]
        if isinstance(m, nn.MaxPool2d):
            y, idx = F.max_pool2d(args[0], m.kernel_size, m.stride, m.padding, m.dilation,
                                  m.ceil_mode, return_indices=True)
            self.indices[self._node] = idx
            return y
        return _leaf_forward(m, args, kwargs)

    def call_function(self, target, args, kwargs):
        target = _INPLACE_FUNCS.get(target, target)
        if kwargs.get("inplace"):
            kwargs = dict(kwargs, inplace=False)
        return super().call_function(target, args, kwargs)

    def call_method(self, target, args, kwargs):
        if (target.endswith("_") and not target.startswith("_")
                and hasattr(torch.Tensor, target[:-1])):
            target = target[:-1]
        return super().call_method(target, args, kwargs)


def _leaf_forward(m: nn.Module, args, kwargs):
    """A leaf module's eval output, rule layers by their functional op (never the instance
    forward a conversion gives them), in-place modules out of place."""
    x = args[0] if args else None
    if isinstance(m, nn.Conv2d):
        return F.conv2d(x, m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups)
    if isinstance(m, nn.BatchNorm2d):
        return F.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0,
                            m.eps)
    if isinstance(m, nn.Linear):
        return F.linear(x, m.weight, m.bias)
    if isinstance(m, nn.AvgPool2d):
        return F.avg_pool2d(x, m.kernel_size, m.stride, m.padding, m.ceil_mode,
                            m.count_include_pad, m.divisor_override)
    if isinstance(m, nn.MaxPool2d):
        return F.max_pool2d(x, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)
    if type(m) is nn.ReLU:
        return F.relu(x)
    if type(m) is nn.ReLU6:
        return F.relu6(x)
    if isinstance(m, _PASS_MODULES):
        return x
    if getattr(m, "inplace", False):
        args = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
    return m(*args, **kwargs)


# ---- the backward walk ----------------------------------------------------------------------
class _Backward:
    """Walks the graph in reverse, carrying a :class:`Rep` per node."""

    def __init__(self, plan: FactorPlan, fwd: _Forward, classifier, T: int):
        self.plan, self.env, self.indices = plan, fwd.env, fwd.indices
        self.classifier, self.T = classifier, T
        self.max_terms = max(T - 1, 0)
        self.grads: Dict[fx.Node, Rep] = {}
        self._memo: Dict[tuple, tuple] = {}
        self.idem: set = set()  # ids of 0/1 masks (m * m == m)
        self.paths: Dict[str, str] = {}
        self.pieces: Dict[fx.Node, Dict[int, Rep]] = {}  # split node -> its pieces' gradients

    # -- helpers --
    def _mul(self, A, f):
        """A * f, memoised on the objects, so shared terms stay shared (and merge)."""
        if A is None:
            return f
        if A is f and id(f) in self.idem:
            return A
        key = (id(A), id(f))
        hit = self._memo.get(key)
        if hit is None or hit[0] is not A or hit[1] is not f:
            hit = (A, f, A * f)
            self._memo[key] = hit
        return hit[2]

    def scale(self, rep: Rep, f) -> Rep:
        """Every term times the target-independent factor ``f`` (N, C, H, W), lazily: the
        factor waits in ``pend`` (a mask that every term already carries is a no-op)."""
        if (rep.pend is None and rep.dense is None and rep.lin is None and id(f) in self.idem
                and all(A is f for A, _ in rep.sp + rep.ch)):
            return rep
        pend = f if rep.pend is None else self._mul(rep.pend, f)
        # no longer the one-hot of the logits (an activation after the classifier)
        return Rep(rep.dense, rep.sp, rep.ch, None, pend, rep.lin)

    def resolve(self, rep: Rep) -> Rep:
        """``rep`` with its pending factor multiplied into every term (and a lazy linear
        gradient materialised)."""
        f = rep.pend
        if rep.lin is not None:
            dense = _lin_dense(rep.lin)
            return Rep(dense if f is None else dense * f.unsqueeze(1))
        if f is None:
            return rep
        dense = None if rep.dense is None else rep.dense * f.unsqueeze(1)
        return Rep(dense, [(self._mul(A, f), b) for A, b in rep.sp],
                   [(self._mul(A, f), v) for A, v in rep.ch], rep.onehot)

    def send(self, node, rep: Rep) -> None:
        if not isinstance(node, fx.Node) or not self.active(node):
            return
        old = self.grads.get(node)
        if old is not None and (old.lin is not None or rep.lin is not None):
            old, rep = self.resolve(old).densify(), self.resolve(rep).densify()
        if old is not None and old.pend is not rep.pend:
            old, rep = self.resolve(old), self.resolve(rep)
        if rep.terms + (old.terms if old is not None else 0) > self.max_terms:
            old = None if old is None else self.resolve(old).densify()
            rep = self.resolve(rep).densify()
        self.grads[node] = rep if old is None else old.plus(rep)

    def active(self, node) -> bool:
        return isinstance(node, fx.Node) and node in self.plan.active

    def val(self, a):
        return self.env[a] if isinstance(a, fx.Node) else a

    def mark(self, node, path):
        """Record the path ``node`` took (keyed by module name, or the graph node's name)."""
        self.paths[node.target if node.op == "call_module" else node.name] = path

    # -- the walk --
    def run(self, out_node, targets) -> Rep:
        logits = self.env[out_node]
        N, K = logits.shape
        classes = torch.arange(K, device=logits.device)
        onehot = (classes.view(1, 1, K) == targets.unsqueeze(2)).to(logits.dtype)
        self.grads[out_node] = Rep(onehot, onehot=targets)
        for node in reversed(self.plan.nodes):
            rep = self.grads.pop(node, None)
            if rep is None and node in self.pieces:  # a split: its getitems hold the pieces
                rep = Rep()
            if rep is None or node.op in ("placeholder", "output", "get_attr"):
                if node.op == "placeholder" and rep is not None:
                    self.grads[node] = rep
                continue
            self.step(node, rep)
        rep = self.grads.get(self.plan.input_node)
        return None if rep is None else self.resolve(rep)

    def step(self, node, rep: Rep) -> None:
        if node.op == "call_module":
            m = self.plan.modules[node.target]
            handler = _MODULE_RULES.get(type(m)) or next(
                (h for t, h in _MODULE_RULES.items() if isinstance(m, t)), None)
            if handler is not None:
                if handler not in _LAZY:
                    rep = self.resolve(rep)
                if handler(self, node, m, rep) is not False:
                    return
        else:
            handler = _FUNCTION_RULES.get(node.target) if node.op == "call_function" else \
                _METHOD_RULES.get(node.target)
            if handler is not None:
                if handler not in _LAZY:
                    rep = self.resolve(rep)
                if handler(self, node, rep) is not False:
                    return
        self.vjp(node, self.resolve(rep))

    def vjp(self, node, rep: Rep) -> None:
        """An op without a TSGB rule: its ordinary gradient, batched over the targets."""
        self.mark(node, "autograd")
        G = rep.materialise()
        args, kwargs, sources = self._leafed(node)
        with torch.enable_grad():
            out = _call(node, self.plan, args, kwargs)
            if not isinstance(out, torch.Tensor):
                raise NotFactorisable(f"{node.name} returns {type(out).__name__}")
            grads = _batched_grad(out, [t for _, t in sources], G)
        for (src, _), g in zip(sources, grads):
            if g is not None:
                self.send(src, Rep(g))

    def _leafed(self, node):
        sources, made = [], {}

        def leaf(a):
            if self.active(a):
                if not isinstance(self.env[a], torch.Tensor):
                    raise NotFactorisable(f"{a.name} is a {type(self.env[a]).__name__}")
                if a not in made:
                    made[a] = self.env[a].detach().requires_grad_(True)
                    sources.append((a, made[a]))
                return made[a]
            return self.val(a)
        args = fx.node.map_arg(node.args, leaf)
        kwargs = fx.node.map_arg(node.kwargs, leaf)
        return args, kwargs, sources


def _call(node, plan, args, kwargs):
    if node.op == "call_module":
        return _leaf_forward(plan.modules[node.target], args, kwargs)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    return node.target(*args, **kwargs)


def _batched_grad(out, inputs, G):
    """d out / d inputs for each of the T gradients ``G`` (N, T, *out.shape[1:])."""
    if not inputs:
        return []
    Gt = G.transpose(0, 1).contiguous()
    try:
        res = torch.autograd.grad(out, inputs, Gt, is_grads_batched=True, allow_unused=True)
        return [None if r is None else r.transpose(0, 1) for r in res]
    except RuntimeError:
        per = [torch.autograd.grad(out, inputs, Gt[t], retain_graph=True, allow_unused=True)
               for t in range(Gt.shape[0])]
        return [None if per[0][i] is None else torch.stack([p[i] for p in per], 1)
                for i in range(len(inputs))]


# ---- per-op rules ----------------------------------------------------------------------------
def _lin_dense(lin) -> torch.Tensor:
    """The gradient a lazy linear term stands for, (N, T, *shape)."""
    u, W, pool = lin
    N, T = u.shape[:2]
    G = (u.reshape(N * T, -1) @ W.reshape(W.shape[0], -1)).view((N, T) + tuple(W.shape[1:]))
    if pool is None:
        return G
    flat_idx, (C, H, Wd), _ = pool
    out = G.new_zeros(N, T, C, H * Wd)
    out.scatter_add_(3, flat_idx.unsqueeze(1).expand(N, T, C, -1), G.flatten(3))
    return out.view(N, T, C, H, Wd)


def _lin_contract(lin, y: torch.Tensor) -> torch.Tensor:
    """s[n, t, o] = sum_k G[n, t, k, o] y[n, k, o] for G = (u @ W), max-pool routed when
    ``pool``: s = u @ J with J[n, f, o] = sum_k W[f, k, o] y[n, k, o] (routed: the W of o's
    window where o is its argmax), target-independent; never the (N, T, K, H, W) gradient."""
    u, W, pool = lin
    N, T, F_ = u.shape
    K = y.shape[1]
    if pool is None:
        J = torch.einsum("fkp,nkp->nfp", W.reshape(F_, K, -1), y.reshape(N, K, -1))
        return torch.bmm(u, J).view((N, T) + tuple(y.shape[2:]))
    flat_idx, (C, H, Wd), geom = pool
    Hp, Wp = W.shape[2:]
    pos, valid = _window_positions(geom, (Hp, Wp), (H, Wd), y.device)  # (P, D)
    P, D = pos.shape
    yf = y.reshape(N, K, H * Wd)
    yg = yf.gather(2, pos.clamp_min(0).reshape(1, 1, -1).expand(N, K, -1)).view(N, K, P, D)
    hit = (flat_idx.unsqueeze(-1) == pos.view(1, 1, P, D)) & valid.view(1, 1, P, D)
    M = (yg * hit).permute(2, 1, 0, 3).reshape(P, K, N * D)        # (P, K, N*D)
    J = torch.bmm(_by_position(W, F_, K, P), M).view(P, F_, N, D).permute(2, 0, 1, 3)
    s_pd = torch.einsum("ntf,npfd->ntpd", u, J).reshape(N, T, P * D)
    s = y.new_zeros(N, T, H * Wd)
    s.scatter_add_(2, pos.clamp_min(0).reshape(1, 1, -1).expand(N, T, -1),
                   s_pd * valid.reshape(1, 1, -1))
    return s.view(N, T, H, Wd)


#: W (F, K, P) of a Linear after a pool, as (P, F, K) contiguous, per weight version: the
#: batched product over positions reads it at full speed (a strided view made it ~10x slower)
_BY_POSITION: dict = {}


def _by_position(W: torch.Tensor, F_: int, K: int, P: int) -> torch.Tensor:
    key = (W.data_ptr(), W._version, tuple(W.shape), W.dtype, W.device, F_, K, P)
    hit = _BY_POSITION.get(key)
    if hit is None:
        _BY_POSITION.clear()  # one weight at a time (a VGG16 fc1 copy is 411 MB)
        hit = _BY_POSITION[key] = W.detach().reshape(F_, K, P).permute(2, 0, 1).contiguous()
    return hit


def _window_positions(geom, out_size, size, device):
    """Flat input position of each (window, offset) of a pool and whether it is inside."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = geom
    oy = torch.arange(out_size[0], device=device).view(-1, 1, 1, 1) * sh - ph
    ox = torch.arange(out_size[1], device=device).view(1, -1, 1, 1) * sw - pw
    dy = torch.arange(kh, device=device).view(1, 1, -1, 1) * dh
    dx = torch.arange(kw, device=device).view(1, 1, 1, -1) * dw
    iy, ix = oy + dy, ox + dx
    valid = (iy >= 0) & (iy < size[0]) & (ix >= 0) & (ix < size[1])
    pos = torch.where(valid, iy * size[1] + ix, torch.full_like(iy * ix, -1))
    P = out_size[0] * out_size[1]
    return pos.reshape(P, kh * kw), valid.reshape(P, kh * kw)


def _csum(t: torch.Tensor) -> torch.Tensor:
    """sum over channels, (N, C, H, W) -> (N, 1, H, W), as a matrix-vector product (a strided
    reduction over dim 1 is ~100x slower on the CPU)."""
    N, C = t.shape[:2]
    ones = t.new_ones((1, C))
    return torch.matmul(ones, t.reshape(N, C, -1)).view((N, 1) + tuple(t.shape[2:]))


def _contract(rep: Rep, y: torch.Tensor) -> torch.Tensor:
    """s[n, t, o] = sum_k g[n, t, k, o] * y[n, k, o], term by term."""
    if rep.lin is not None:
        return _lin_contract(rep.lin, y)
    s = None  # a fresh tensor, accumulated in place
    for A, b in rep.sp:
        q = _csum(y if A is None else A * y)  # q (N, 1, H, W): target-free
        s = b[:, :, 0] * q if s is None else s.addcmul_(b[:, :, 0], q)
    for A, v in rep.ch:
        ay = y if A is None else A * y
        term = torch.einsum("ntc,nchw->nthw", v[:, :, :, 0, 0], ay)
        s = term if s is None else s.add_(term)
    if rep.dense is not None:
        term = (rep.dense * y.unsqueeze(1)).sum(2)
        s = term if s is None else s.add_(term)
    return s


def _conv(w: _Backward, node, m: nn.Conv2d, rep: Rep):
    _conv_rule(w, node, rep, m.kernel_size, m.stride, m.padding, m.dilation, m.groups)


def _conv_rule(w: _Backward, node, rep: Rep, k, stride, padding, dilation, groups):
    """The TSGB conv rule at ``node`` (input ``node.args[0]``) for this window geometry."""
    x, y = w.env[node.args[0]], w.env[node]
    N, C, H, W = x.shape
    geom = (_pair(k), _pair(stride), _pair(padding), _pair(dilation))
    if groups == 1:
        w.mark(node, "factorised" if rep.dense is None else "dense")
        s = _contract(rep, y if rep.pend is None else w._mul(rep.pend, y))
        d = w.cached(("boxsum", node), lambda: _box_sum(x, x.new_ones((1, 1) + geom[0]), geom))
        r = s.div_(d)  # s: _contract's own tensor
        t = _spread(r, geom, (H, W))
        w.send(node.args[0], Rep(sp=[(w.sign(node.args[0]), t.unsqueeze(2))]))
        return
    rep = w.resolve(rep)
    if groups == C == y.shape[1] and (rep.sp or rep.ch):
        _depthwise(w, node, rep, geom)
        return
    w.mark(node, "dense")
    w.send(node.args[0], Rep(_grouped_dense(w, node, rep.materialise(), geom, groups)))


def _group_box(w: _Backward, node, geom, groups) -> torch.Tensor:
    """D + eps per group, (N, groups, Ho, Wo): each output window's sum of |x| over the
    group's input channels (cached per node)."""
    x = w.env[node.args[0]]
    N, C, H, W = x.shape
    cg = C // groups

    def box():
        xs = x.abs() if cg == 1 else _csum(x.abs().reshape(N * groups, cg, H, W)).view(
            N, groups, H, W)
        k, stride, padding, dilation = geom
        return F.conv2d(xs, x.new_ones((groups, 1) + k), None, stride, padding, dilation,
                        groups) + EPS
    return w.cached(("gbox", node), box)


def _grouped_dense(w: _Backward, node, G, geom, groups) -> torch.Tensor:
    """The grouped conv rule on a materialised gradient G (N, T, K, Ho, Wo). The rule's box
    sum ``D`` is the same for every output channel of a group (the window's sum of |x| over
    the group's input channels), and its transposed box sum (a conv with ones) hands every
    input channel of a group the same map; so: ``r_g = sum_{k in g} G_k y_k / D_g``, one
    transposed box sum per group and target, broadcast to the group's channels, times
    sign(x) -- instead of a transposed grouped conv over all K x C/g channel pairs."""
    x, y = w.env[node.args[0]], w.env[node]
    N, C, H, W = x.shape
    T, K = G.shape[1], G.shape[2]
    cg, kg = C // groups, K // groups

    D = _group_box(w, node, geom, groups)
    R = G * y.unsqueeze(1)
    if kg > 1:
        R = R.view(N, T, groups, kg, *R.shape[3:]).sum(3)
    t = _spread(R / D.unsqueeze(1), geom, (H, W))  # (N, T, groups, H, W)
    if cg > 1:
        t = t.unsqueeze(3).expand(N, T, groups, cg, H, W).reshape(N, T, C, H, W)
    return t * w.sign(node.args[0]).unsqueeze(1)


def _depthwise(w: _Backward, node, rep: Rep, geom) -> None:
    """A depthwise conv (groups == C_in == C_out): the rule is per channel, a stencil like
    AvgPool's: gx = sign(x) * spread(g * q), q = y / (D + eps) with D the channel's box sum
    of |x| (target-independent). So a channel term stays one channel term; a spatial term
    ``A * b`` becomes one term per window offset (``sign(x) * A q`` placed at that offset,
    ``b`` shifted with it), or one term if the windows do not overlap; past the term budget
    the spatial terms are materialised and take the dense rule."""
    x = w.env[node.args[0]]
    N, C, H, W = x.shape
    y = w.env[node]
    offs = _offsets(geom[0])
    D = _group_box(w, node, geom, C)
    q = w.cached(("dwq", node), lambda: y / D)
    sgn = w.sign(node.args[0])
    out = Rep()
    overlap = _overlaps(geom)
    dense = rep.dense
    if rep.sp and overlap and len(rep.sp) * len(offs) + len(rep.ch) > w.max_terms:
        extra = Rep(sp=rep.sp).materialise()
        dense = extra if dense is None else dense + extra
    else:
        for A, b in rep.sp:
            P = q if A is None else A * q
            if not overlap:
                out.sp.append((sgn * _spread(P, geom, (H, W)),
                               sum(_place(b, dl, geom, (H, W)) for dl in offs)))
                continue
            for dl in offs:
                out.sp.append((sgn * _place(P, dl, geom, (H, W)), _place(b, dl, geom, (H, W))))
    for A, v in rep.ch:
        out.ch.append((sgn * _spread(q if A is None else A * q, geom, (H, W)), v))
    if dense is not None:
        out.dense = _grouped_dense(w, node, dense, geom, C)
    w.mark(node, "factorised" if out.dense is None else "dense")
    w.send(node.args[0], out)


def _sign(self, src):
    """sign(x) of a conv input: for a ReLU's output that is the ReLU's own 0/1 mask (the
    same tensor, so multiplying the two again is a no-op)."""
    if _relu_like(self, src):
        return self.mask(src, 0.0, None)
    return self.cached(("sign", src), lambda: torch.sign(self.env[src]))


def _mask_of(self, node, lo, hi):
    """The 0/1 gradient mask (lo < x < hi) of an activation node (cached, idempotent)."""
    x = self.env[node.args[0]]

    def make():
        if lo == 0.0 and hi is None and _relu_like(self, node):
            return torch.sign(self.env[node])  # relu(x) >= 0: its sign is [x > 0], one pass
        f = x > lo if hi is None else (x > lo) & (x < hi)
        return f.to(x.dtype)
    f = self.cached(("mask", node, lo, hi), make)
    self.idem.add(id(f))
    return f


def _relu_like(w, node) -> bool:
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_module":
        return type(w.plan.modules[node.target]) is nn.ReLU
    if node.op == "call_function":
        return node.target in (F.relu, torch.relu, torch.relu_, F.relu_)
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _cached(self, key, make):
    """A target-independent tensor made once per (kind, node) (so terms built on it merge,
    and target chunks share it)."""
    hit = self._memo.get(key)
    if hit is None:
        hit = self._memo[key] = (None, None, make())
    return hit[2]


_Backward.sign = _sign
_Backward.mask = _mask_of
_Backward.cached = _cached


def _box_sum(x, ones, geom):
    """d + eps: the box sum of sum_c |x| over each output's window (single channel)."""
    xs = _csum(x.abs())
    k, s, p, dil = geom
    if k == (1, 1) and p == (0, 0):
        d = xs if s == (1, 1) else xs[..., ::s[0], ::s[1]]
    else:
        d = F.conv2d(xs, ones, None, s, p, dil)
    return d + EPS


def _bn(w: _Backward, node, m, rep: Rep):
    x, y = w.env[node.args[0]], w.env[node]
    w.mark(node, "factorised" if rep.dense is None else "dense")
    w.send(node.args[0], w.scale(rep, w.cached(("bn", node), lambda: y / (x + EPS))))


def _mask(w: _Backward, node, rep: Rep, lo=0.0, hi=None):
    x = w.env[node.args[0]]

    w.mark(node, "factorised" if rep.dense is None else "dense")
    w.send(node.args[0], w.scale(rep, w.mask(node, lo, hi)))


def _relu_module(w, node, m, rep):
    _mask(w, node, rep, 0.0, 6.0 if isinstance(m, nn.ReLU6) else None)


def _relu_fn(w, node, rep):
    _mask(w, node, rep)


def _relu6_fn(w, node, rep):
    _mask(w, node, rep, 0.0, 6.0)


def _hardtanh_fn(w, node, rep):
    args = list(node.args) + [None] * 3
    lo = node.kwargs.get("min_val", args[1] if args[1] is not None else -1.0)
    hi = node.kwargs.get("max_val", args[2] if args[2] is not None else 1.0)
    _mask(w, node, rep, lo, hi)


def _identity_module(w, node, m, rep):
    w.mark(node, "pass")
    w.send(node.args[0], rep)


def _maxpool(w: _Backward, node, m: nn.MaxPool2d, rep: Rep):
    x = w.env[node.args[0]]
    idx = w.indices[node]
    N, C, H, W = x.shape
    geom = (_pair(m.kernel_size), _pair(m.stride or m.kernel_size), _pair(m.padding),
            _pair(m.dilation))
    flat_idx = idx.flatten(2)
    if (rep.lin is not None and rep.lin[2] is None and rep.pend is None
            and not _overlaps(geom)):
        u, Wt, _ = rep.lin
        w.mark(node, "lazy linear")
        w.send(node.args[0], Rep(lin=(u, Wt, (flat_idx, (C, H, W), geom))))
        return
    rep = w.resolve(rep)

    def unpool(A):  # A at each window's argmax (target-independent)
        src = x.new_ones(idx.shape) if A is None else A
        return x.new_zeros(N, C, H * W).scatter_add_(2, flat_idx, src.flatten(2)).view(N, C, H, W)
    out = Rep()
    if rep.dense is not None:
        G = rep.dense
        T = G.shape[1]
        gi = x.new_zeros(N, T, C, H * W).scatter_add_(
            3, flat_idx.unsqueeze(1).expand(N, T, C, -1), G.flatten(3))
        out.dense = gi.view(N, T, C, H, W)
    out.ch = [(unpool(A), v) for A, v in rep.ch]
    if rep.sp and not _overlaps(geom):
        for A, b in rep.sp:
            out.sp.append((unpool(A), sum(_place(b, dl, geom, (H, W))
                                          for dl in _offsets(geom[0]))))
    elif rep.sp:
        iy, ix = flat_idx // W, flat_idx % W
        Ho, Wo = idx.shape[2:]
        oy = torch.arange(Ho, device=x.device).view(Ho, 1) * geom[1][0] - geom[2][0]
        ox = torch.arange(Wo, device=x.device).view(1, Wo) * geom[1][1] - geom[2][1]
        off = (((iy.view_as(idx) - oy) // geom[3][0]) * geom[0][1]
               + (ix.view_as(idx) - ox) // geom[3][1])
        for A, b in rep.sp:
            for j, dl in enumerate(_offsets(geom[0])):
                P = (off == j).to(x.dtype) if A is None else A * (off == j)
                out.sp.append((_place(P, dl, geom, (H, W)), _place(b, dl, geom, (H, W))))
    w.mark(node, "factorised" if rep.dense is None else "dense")
    w.send(node.args[0], out)


def _avgpool(w: _Backward, node, m: nn.AvgPool2d, rep: Rep):
    _avgpool_rule(w, node, rep, m.kernel_size, m.stride, m.padding, m.ceil_mode,
                  m.count_include_pad, m.divisor_override)


def _avgpool_rule(w: _Backward, node, rep: Rep, kernel_size, stride, padding, ceil_mode,
                  count_include_pad, divisor_override):
    """The TSGB AvgPool2d rule at ``node`` (the same stencil as its ordinary gradient)."""
    x, y = w.env[node.args[0]], w.env[node]
    H, W = x.shape[2:]
    stride = pool_stride(stride, kernel_size)
    geom = (_pair(kernel_size), _pair(stride), _pair(padding), (1, 1))
    ones = x.new_ones((1, 1, H, W))
    a = F.avg_pool2d(ones, kernel_size, stride, padding, ceil_mode, count_include_pad,
                     divisor_override)
    n = F.avg_pool2d(ones, kernel_size, stride, padding, ceil_mode, True, 1)
    f = a / n.clamp_min(1)  # 1 / divisor of each window
    yf = y * f

    def P_of(A, G):
        if G is not None:
            return G * yf.unsqueeze(1)
        return yf if A is None else A * yf
    w.mark(node, "factorised" if rep.dense is None else "dense")
    w.send(node.args[0], _stencil(rep, P_of, geom, (H, W), post=1.0 / (x + EPS),
                                  max_terms=w.max_terms))


def _gap_rep(w: _Backward, node, rep: Rep, src) -> Rep:
    """Gradient at the input of a global average over H, W: a channel term, A = 1."""
    x = w.env[src]
    N, C, H, W = x.shape
    G = rep.materialise()
    w.mark(node, "factorised")
    ones = w.cached(("ones", src), lambda: x.new_ones(()).expand(N, C, H, W))
    return Rep(ch=[(ones, G.reshape(N, G.shape[1], C, 1, 1) / (H * W))])


def _adaptive_module(w, node, m, rep):
    return _adaptive(w, node, rep, m.output_size)


def _adaptive_fn(w, node, rep):
    size = node.kwargs.get("output_size", node.args[1] if len(node.args) > 1 else None)
    return _adaptive(w, node, rep, size)


def _adaptive(w, node, rep, size):
    x, y = w.env[node.args[0]], w.env[node]
    if x.dim() != 4:
        return False
    if tuple(y.shape[2:]) == (1, 1):
        w.send(node.args[0], _gap_rep(w, node, w.resolve(rep), node.args[0]))
        return None
    if tuple(y.shape[2:]) == tuple(x.shape[2:]):
        w.mark(node, "pass")
        w.send(node.args[0], rep)
        return None
    return False  # step's fallback (autograd) resolves the rep


def _mean(w, node, rep):
    x = w.env[node.args[0]] if isinstance(node.args[0], fx.Node) else None
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    if x is None or x.dim() != 4 or dim is None or node.kwargs.get("dtype") is not None:
        return False
    dims = sorted(d % 4 for d in (dim if isinstance(dim, (tuple, list)) else (dim,)))
    if dims != [2, 3]:
        return False
    w.send(node.args[0], _gap_rep(w, node, rep, node.args[0]))


def _reshape(w, node, rep):
    src = node.args[0]
    if not w.active(src):
        return False
    x, y = w.env[src], w.env[node]
    if not isinstance(x, torch.Tensor) or x.dim() == 0 or y.dim() == 0 \
            or x.shape[0] != y.shape[0]:
        return False
    if rep.lin is not None and rep.lin[2] is None and rep.pend is None:
        u, W, _ = rep.lin
        w.mark(node, "pass")
        w.send(src, Rep(lin=(u, W.reshape((W.shape[0],) + tuple(x.shape[1:])), None)))
        return None
    G = w.resolve(rep).materialise()
    w.mark(node, "pass")
    w.send(src, Rep(G.reshape(G.shape[:2] + x.shape[1:]), onehot=rep.onehot
                    if x.shape == y.shape else None))


def _flatten_module(w, node, m, rep):
    return _reshape(w, node, rep)


def _add(w, node, rep):
    a, b = node.args[:2]
    if node.kwargs or len(node.args) > 2:
        return False
    for src in (a, b):
        if w.active(src) and tuple(w.env[src].shape) != tuple(w.env[node].shape):
            return False
    w.mark(node, "factorised" if rep.dense is None else "dense")
    for src in (a, b):
        w.send(src, rep)


def _cat(w, node, rep):
    tensors = node.args[0]
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
    y = w.env[node]
    if y.dim() != 4 or dim % 4 != 1:
        return False
    c0 = 0
    w.mark(node, "factorised" if rep.dense is None else "dense")
    for src in tensors:
        c1 = c0 + w.val(src).shape[1]
        if w.active(src):
            sl = slice(c0, c1)
            w.send(src, Rep(None if rep.dense is None else rep.dense[:, :, sl],
                            [(None if A is None else A[:, sl], b) for A, b in rep.sp],
                            [(None if A is None else A[:, sl], v[:, :, sl]) for A, v in rep.ch]))
        c0 = c1


def _linear(w: _Backward, node, m: nn.Linear, rep: Rep, weight=None):
    """A Linear layer (``weight``: the one its call used, for a subclass's own forward): the
    TSGB-FC rule for the classifier, the ordinary gradient for the others."""
    x = w.env[node.args[0]]
    weight = m.weight if weight is None else weight
    if m is w.classifier:
        w.mark(node, "classifier rows" if rep.onehot is not None else "dense")
        w.send(node.args[0], Rep(_fc_rule(rep, x, weight)))
        return
    if x.dim() != 2:
        return False
    G = rep.materialise()
    if G.shape[1] >= LAZY_LINEAR_MIN_T:
        w.mark(node, "lazy linear")
        w.send(node.args[0], Rep(lin=(G, weight, None)))
        return
    w.mark(node, "dense")
    w.send(node.args[0], Rep(G @ weight))


def _fc_rule(rep: Rep, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """TSGB-FC (beta = zp / |zn|, 0 where |zn| <= eps), float32 computed in float64; for a
    one-hot gradient only the targets' rows of W."""
    cd = torch.float64 if x.dtype == torch.float32 else x.dtype
    xc = x.to(cd)
    if rep.onehot is not None:
        wt = weight.detach()[rep.onehot].to(cd)  # (N, T, F): only the targets' rows
        wp, wn = wt.clamp_min(0), wt.clamp_max(0)
        zp = torch.einsum("ntf,nf->nt", wp, xc)
        azn = torch.einsum("ntf,nf->nt", wn, xc).abs()
        ok = azn > EPS
        beta = torch.where(ok, zp / torch.where(ok, azn, torch.ones_like(azn)),
                           torch.zeros_like(zp))
        return (wp + beta.unsqueeze(2) * wn).to(x.dtype)
    wc = weight.to(cd)
    wp, wn = wc.clamp_min(0), wc.clamp_max(0)
    zp, azn = xc @ wp.t(), (xc @ wn.t()).abs()
    ok = azn > EPS
    beta = torch.where(ok, zp / torch.where(ok, azn, torch.ones_like(azn)), torch.zeros_like(zp))
    g = rep.materialise().to(cd)
    return (g @ wp + (g * beta.unsqueeze(1)) @ wn).to(x.dtype)


def _dropout_fn(w, node, rep):
    if node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True):
        return False
    w.mark(node, "pass")
    w.send(node.args[0], rep)


# ---- ops without a TSGB rule whose ordinary gradient keeps the terms --------------------------
def _elementwise(w: _Backward, node, rep: Rep):
    """An elementwise activation without a TSGB rule (SiLU, sigmoid, hard-swish, GELU, ...):
    its ordinary gradient multiplies by ``f'(x)``, a target-independent factor, made once by
    one autograd call with a gradient of ones (exact: the Jacobian is diagonal)."""
    args, kwargs, sources = w._leafed(node)
    y = w.env[node]
    if len(sources) != 1 or sources[0][0] is not node.args[0] \
            or not isinstance(y, torch.Tensor) or sources[0][1].shape != y.shape:
        return False
    src = sources[0][0]

    def slope():
        kw = dict(kwargs, inplace=False) if "inplace" in kwargs else kwargs
        leaf = sources[0][1]
        with torch.enable_grad():  # on a copy: an in-place op may not write to the leaf
            out = _call(node, w.plan, (leaf.clone(),) + tuple(args[1:]), kw)
            return torch.autograd.grad(out, leaf, torch.ones_like(out))[0]
    f = w.cached(("slope", node), slope)
    w.mark(node, "factorised" if rep.dense is None else "dense")
    w.send(src, w.scale(rep, f))
    return None


def _elementwise_module(w, node, m, rep):
    return _elementwise(w, node, rep)


def _product(w: _Backward, node, rep: Rep):
    """``a * b``: to each active factor the gradient times the other (target-independent)
    factor; where that factor was broadcast from (N, C, 1, 1) (a squeeze-excitation gate),
    the gradient summed over the broadcast positions: one (N, T, C) product per term."""
    if node.kwargs or len(node.args) != 2:
        return False
    y = w.env[node]
    vals = [w.val(a) for a in node.args]
    if not isinstance(y, torch.Tensor) or y.dim() != 4 \
            or not all(isinstance(v, (torch.Tensor, int, float)) for v in vals):
        return False
    plan = []
    for i, src in enumerate(node.args):
        if not w.active(src):
            continue
        mine, other = vals[i], vals[1 - i]
        if not isinstance(mine, torch.Tensor):
            return False
        if tuple(mine.shape) == tuple(y.shape):
            plan.append((src, "scale", i))
        elif tuple(mine.shape) == tuple(y.shape[:2]) + (1, 1) and isinstance(other, torch.Tensor) \
                and tuple(other.shape) == tuple(y.shape):
            plan.append((src, "gate", i))
        else:
            return False
    w.mark(node, "factorised" if rep.dense is None else "dense")
    for src, how, i in plan:
        other = vals[1 - i]
        if how == "scale":
            f = w.cached(("factor", node, i), lambda other=other: (
                other.expand_as(y) if isinstance(other, torch.Tensor)
                else y.new_full((), float(other)).expand_as(y)))
            w.send(src, w.scale(rep, f))
        else:
            w.send(src, Rep(_gate_grad(rep, other)))
    return None


def _gate_grad(rep: Rep, a: torch.Tensor) -> torch.Tensor:
    """sum over H, W of g * a, (N, T, C, 1, 1), term by term."""
    N, C = a.shape[:2]
    out = None
    for A, b in rep.sp:
        term = torch.einsum("nchw,nthw->ntc", a if A is None else A * a, b[:, :, 0])
        out = term if out is None else out + term
    for A, v in rep.ch:
        term = v[:, :, :, 0, 0] * (a if A is None else A * a).sum((2, 3)).unsqueeze(1)
        out = term if out is None else out + term
    if rep.dense is not None:
        term = (rep.dense * a.unsqueeze(1)).sum((3, 4))
        out = term if out is None else out + term
    return out.reshape(N, -1, C, 1, 1)


# ---- functional calls inside a rule layer's own forward (tagged by the tracer), padding ----
def _rule_module(w: _Backward, node, base: type):
    """The rule layer of type ``base`` whose own forward made this call, or None."""
    name = node.meta.get("tsgb_rule")
    m = w.plan.modules.get(name) if name is not None else None
    return m if isinstance(m, base) else None


def _as_module_path(w: _Backward, node) -> None:
    """Report the routed call under its module's name (as the batched path's report does)."""
    w.paths[node.meta["tsgb_rule"]] = w.paths.pop(node.name)


def _routed_conv(w, node, rep):
    """conv2d in a Conv2d subclass's own forward: the conv rule (it needs only the window
    geometry, the input and the output: a derived weight, as weight standardisation makes,
    takes it too). Elsewhere conv2d keeps its ordinary gradient, as in the batched path."""
    b = bind_conv2d(node.args, node.kwargs)
    x = w.val(b["input"])
    if _rule_module(w, node, nn.Conv2d) is None or not isinstance(x, torch.Tensor) \
            or x.dim() != 4:
        return False
    pad = b["padding"]
    if isinstance(pad, str):
        if pad != "valid":
            raise NotFactorisable(f"{node.meta['tsgb_rule']}: conv2d padding={pad!r}")
        pad = 0
    _conv_rule(w, node, rep, w.val(b["weight"]).shape[2:], b["stride"], pad,
               b["dilation"], b["groups"])
    _as_module_path(w, node)


def _routed_bn(w, node, rep):
    """batch_norm in a BatchNorm2d subclass's own forward (timm's BatchNormAct2d): the BN
    rule, ``y / (x + eps)``, whatever statistics it normalised with."""
    b = bind(BN_NAMES, BN_DEFAULTS, node.args, node.kwargs)
    x = w.val(b["input"])
    if _rule_module(w, node, nn.BatchNorm2d) is None or not isinstance(x, torch.Tensor) \
            or x.dim() != 4:
        return False
    _bn(w, node, None, rep)
    _as_module_path(w, node)


def _routed_avgpool(w, node, rep):
    """avg_pool2d in an AvgPool2d subclass's own forward (timm's AvgPool2dSame)."""
    b = bind(POOL_NAMES, POOL_DEFAULTS, node.args, node.kwargs)
    x = w.val(b["input"])
    if _rule_module(w, node, nn.AvgPool2d) is None or not isinstance(x, torch.Tensor) \
            or x.dim() != 4:
        return False
    _avgpool_rule(w, node, rep, b["kernel_size"], b["stride"], b["padding"],
                  b["ceil_mode"], b["count_include_pad"], b["divisor_override"])
    _as_module_path(w, node)


def _routed_linear(w, node, rep):
    """linear in a Linear subclass's own forward (timm's Linear): that layer's rule (TSGB-FC
    for the classifier). Elsewhere F.linear keeps its ordinary gradient."""
    m = _rule_module(w, node, nn.Linear)
    if m is None or "input" in node.kwargs or not node.args \
            or not isinstance(w.val(node.args[0]), torch.Tensor):
        return False
    weight = w.val(node.kwargs["weight"] if "weight" in node.kwargs else node.args[1])
    if _linear(w, node, m, rep, weight) is False:
        return False
    _as_module_path(w, node)
    return None


def _split(w: _Backward, node, rep: Rep):
    """torch.split / chunk (function or method), whose pieces are taken by ``getitem``: the
    pieces' gradients (collected by :func:`_getitem`) placed side by side along the split
    dimension; along channels the terms stay terms (their factors zero outside the piece)."""
    pieces = w.pieces.pop(node, {})
    outs = w.env[node]
    x = w.env[node.args[0]]
    dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else 0) % x.dim()
    bounds, c0 = [], 0
    for o in outs:
        bounds.append((c0, c0 + o.shape[dim]))
        c0 += o.shape[dim]
    N, T = x.shape[0], w.T
    along_channels = dim == 1 and x.dim() == 4
    w.mark(node, "factorised" if along_channels and all(p.dense is None for p in pieces.values())
           else "dense")
    if not along_channels:
        G = x.new_zeros((N, T) + tuple(x.shape[1:]))
        for i, p in pieces.items():
            G.narrow(dim + 1, bounds[i][0], bounds[i][1] - bounds[i][0]).copy_(p.materialise())
        w.send(node.args[0], Rep(G))
        return None
    for i, p in pieces.items():
        lo, hi = bounds[i]

        def wide(t, d):  # t zero-padded to all C channels along dim d
            pad = [0, 0] * (t.dim() - 1 - d) + [lo, x.shape[1] - hi]
            return F.pad(t, pad)
        sp = [(wide(x.new_ones((N, hi - lo) + tuple(x.shape[2:])) if A is None else A, 1), b)
              for A, b in p.sp]
        ch = [(A if A is None else wide(A, 1), wide(v, 2)) for A, v in p.ch]
        w.send(node.args[0], Rep(None if p.dense is None else wide(p.dense, 2), sp, ch))
    return None


def _getitem(w: _Backward, node, rep: Rep):
    """Piece ``i`` of a split: its gradient kept for :func:`_split`."""
    src, idx = node.args[:2]
    if not (isinstance(src, fx.Node) and isinstance(idx, int) and _is_split(src)
            and isinstance(w.env[src], (tuple, list))):
        return False
    idx %= len(w.env[src])
    old = w.pieces.setdefault(src, {}).get(idx)
    w.pieces[src][idx] = rep if old is None else old.plus(rep)
    w.mark(node, "pass")
    return None


def _is_split(node) -> bool:
    return ((node.op == "call_function" and node.target in (torch.split, torch.chunk))
            or (node.op == "call_method" and node.target in ("split", "chunk")))


def _crop(w: _Backward, node, rep: Rep, pad) -> Optional[bool]:
    """Zero padding of the last two dims (``pad`` = (left, right, top, bottom), all >= 0): its
    gradient is the crop, applied to every term's target-independent factor and per-target
    map (and to a materialised gradient), so the terms stay terms."""
    x = w.env[node.args[0]]
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or len(pad) not in (2, 4) \
            or any(p < 0 for p in pad):
        return False
    l, r, t, b = (tuple(pad) + (0, 0))[:4]
    H, W = w.env[node].shape[2:]
    sl = (Ellipsis, slice(t, H - b), slice(l, W - r))

    def cut(a):
        return None if a is None else a[sl]
    w.mark(node, "factorised" if rep.dense is None else "dense")
    w.send(node.args[0], Rep(cut(rep.dense), [(cut(A), cut(v)) for A, v in rep.sp],
                             [(cut(A), v) for A, v in rep.ch]))
    return None


def _pad_fn(w, node, rep):
    args = list(node.args) + [None] * 4
    pad = node.kwargs.get("pad", args[1])
    mode = node.kwargs.get("mode", args[2] if args[2] is not None else "constant")
    value = node.kwargs.get("value", args[3])
    if mode != "constant" or value not in (None, 0, 0.0) or not isinstance(pad, (list, tuple)):
        return False
    return _crop(w, node, rep, [int(p) for p in pad])


def _pad_module(w, node, m, rep):
    if isinstance(m, nn.ConstantPad2d) and m.value != 0:
        return False
    return _crop(w, node, rep, list(m.padding))


_ELEMENTWISE_MODULES = (nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.GELU,
                        nn.ELU, nn.CELU, nn.SELU, nn.LeakyReLU, nn.Mish, nn.Softplus)
_ELEMENTWISE_FUNCS = (F.silu, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.hardswish,
                      F.hardsigmoid, F.gelu, F.elu, F.celu, F.selu, F.leaky_relu, F.mish,
                      F.softplus)
_MODULE_RULES = {nn.Conv2d: _conv, nn.BatchNorm2d: _bn, nn.ReLU: _relu_module,
                 nn.ReLU6: _relu_module, nn.MaxPool2d: _maxpool, nn.AvgPool2d: _avgpool,
                 nn.AdaptiveAvgPool2d: _adaptive_module, nn.Linear: _linear,
                 nn.Flatten: _flatten_module, nn.ZeroPad2d: _pad_module,
                 nn.ConstantPad2d: _pad_module}
for _t in _PASS_MODULES:
    _MODULE_RULES[_t] = _identity_module
for _t in _ELEMENTWISE_MODULES:
    _MODULE_RULES[_t] = _elementwise_module
_FUNCTION_RULES = {operator.add: _add, operator.iadd: _add, torch.add: _add, torch.cat: _cat,
                   torch.flatten: _reshape, torch.relu: _relu_fn, torch.relu_: _relu_fn,
                   F.relu: _relu_fn, F.relu_: _relu_fn, F.relu6: _relu6_fn,
                   F.hardtanh: _hardtanh_fn, F.adaptive_avg_pool2d: _adaptive_fn,
                   torch.mean: _mean, F.dropout: _dropout_fn, torch.conv2d: _routed_conv,
                   F.batch_norm: _routed_bn, F.avg_pool2d: _routed_avgpool, F.pad: _pad_fn,
                   operator.mul: _product, operator.imul: _product, torch.mul: _product,
                   F.linear: _routed_linear, torch.split: _split, torch.chunk: _split,
                   operator.getitem: _getitem,
                   **{f: _elementwise for f in _ELEMENTWISE_FUNCS}}
#: handlers that take a Rep with a pending factor (the rest get it multiplied in first)
_LAZY = {_bn, _relu_module, _relu_fn, _relu6_fn, _hardtanh_fn, _add, _identity_module,
         _dropout_fn, _conv, _maxpool, _reshape, _flatten_module, _adaptive_module,
         _adaptive_fn, _routed_conv, _routed_bn, _elementwise, _elementwise_module}
#: a non-classifier Linear's input gradient is kept as u @ W from this many targets on (the
#: conv below then contracts u @ J; J costs about 4 single-target Linear backwards and, after
#: a max pool, one copy of W by position, cached). Measured (VGG16 fc1, 2 CPU threads): the
#: dense u @ W is cheaper below ~50 targets
LAZY_LINEAR_MIN_T = 64
#: ``factorize="auto"`` takes the factorised path from this many targets per call on. Measured
#: (2-core CPU, float32, 224x224, benchmarks/RESULTS.md): against the batched backward it is
#: 0.6-0.8x at T = 2 (ResNet50, MobileNet-V2, RegNetY-800MF, GoogLeNet), 0.7-1.06x at T = 3,
#: 0.84-1.44x at T = 5 on 12 models, and 1.4-3.2x at T = 20 but GoogLeNet's 0.89x
AUTO_MIN_TARGETS = 5
_METHOD_RULES = {"add": _add, "add_": _add, "relu": _relu_fn, "relu_": _relu_fn,
                 "flatten": _reshape, "view": _reshape, "reshape": _reshape, "mean": _mean,
                 "mul": _product, "mul_": _product, "sigmoid": _elementwise,
                 "sigmoid_": _elementwise, "tanh": _elementwise, "tanh_": _elementwise,
                 "split": _split, "chunk": _split}


# ---- entry point ----------------------------------------------------------------------------
def _active_nodes(plan: FactorPlan) -> set:
    active = set()
    for n in plan.nodes:
        if n is plan.input_node:
            active.add(n)
        elif n.op not in ("placeholder", "get_attr") and any(
                a in active for a in n.all_input_nodes):
            active.add(n)
    return active


def _linear_of(plan: FactorPlan, n: fx.Node) -> Optional[nn.Linear]:
    """The Linear layer a node runs: a call of the module, or the linear call of its own
    forward."""
    if n.op == "call_module":
        m = plan.modules[n.target]
    elif n.op == "call_function" and n.target is F.linear and n.meta.get("tsgb_rule"):
        m = plan.modules.get(n.meta["tsgb_rule"])
    else:
        return None
    return m if isinstance(m, nn.Linear) else None


class Run:
    """One forward of ``x`` through the plan, then the maps of any number of target sets
    (:meth:`maps`): the target-independent tensors (masks, BN factors, contractions' weights,
    box sums) are made once and shared by every call, so targets can come in chunks.

    ``classifier``: the TSGB-FC Linear (None: the last Linear the forward runs). Raises
    :class:`NotFactorisable` when this model's graph turns out not to fit (the caller then
    uses the batched backward)."""

    def __init__(self, plan: FactorPlan, x: torch.Tensor, classifier: Optional[nn.Module]):
        self.plan, self.x = plan, x
        self.fwd = _Forward(plan)
        with torch.no_grad():
            out = self.fwd.run(x)
        self.out_node = next(n for n in plan.nodes if n.op == "output").args[0]
        if not isinstance(self.out_node, fx.Node) or not isinstance(out, torch.Tensor) \
                or out.dim() != 2 or out.shape[0] != x.shape[0]:
            raise NotFactorisable("the model's output is not one (N, classes) tensor")
        self.logits = out.detach()
        if classifier is None:
            linears = [m for m in (_linear_of(plan, n) for n in plan.nodes) if m is not None]
            if not linears:
                raise NotFactorisable("the forward ran no nn.Linear module")
            classifier = linears[-1]
        self.classifier = classifier
        plan.active = _active_nodes(plan)
        self._memo: Dict[tuple, tuple] = {}
        self._idem: set = set()

    def maps(self, targets: torch.Tensor) -> torch.Tensor:
        """(N, T, H, W) maps for the (N, T) int64 ``targets``, in ``x``'s dtype."""
        x, plan = self.x, self.plan
        walk = _Backward(plan, self.fwd, self.classifier, targets.shape[1])
        walk._memo, walk.idem = self._memo, self._idem
        with torch.no_grad():
            rep = walk.run(self.out_node, targets)
            if rep is None:
                maps = x.new_zeros((x.shape[0], targets.shape[1]) + tuple(x.shape[2:]))
            else:
                maps = _contract(rep, self.fwd.env[plan.input_node])  # sum_c gx * x
        plan.paths = walk.paths
        return maps.to(x.dtype)


def explain(plan: FactorPlan, x: torch.Tensor, select, classifier: Optional[nn.Module]):
    """Maps (N, T, H, W), targets (N, T), logits and the classifier used, for the targets
    ``select(logits)`` picks, by the factorised backward (see :class:`Run`)."""
    run = Run(plan, x, classifier)
    targets = select(run.logits)
    return run.maps(targets), targets, run.logits, run.classifier


class NotFactorisable(RuntimeError):
    """This model's graph does not fit the factorised backward (the batched one is used)."""
