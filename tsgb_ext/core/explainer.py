"""The TSGB explainer: ``TSGB(model).attribute(x, target)``."""
from __future__ import annotations

import contextlib
import threading
from typing import Callable, Dict, Optional, Tuple, Union

import torch
import torch.nn as nn

from ..convert import degenerate
from ..convert.conversion import Conversion
from ..convert.fusion import FusedBlock
from ..convert.layer_map import describe_rules
from . import backend as backends
from . import factor
from .inputs import (TargetLike, check_call, compile_options, deferred_checks, flag,
                     logits as model_logits, target_tensor, tf32_off, uncompiled)
from .modellock import model_lock


class TSGB:
    """Target-Selective Gradient Backprop saliency for a CNN classifier.

    ``TSGB(model).attribute(x, target)`` returns ``sum_c(gx * x)``, the TSGB map, (N, 1, H, W)
    for one target per sample or (N, T, H, W) for an (N, T) target tensor. The model is left
    exactly as it was. Use ``with TSGB(model) as ex:`` to keep it converted across calls.

    Args:
        model: the classifier (an ``nn.Module`` returning (N, classes) scores).
        backend: ``"auto"`` (native where available for the input's device, else hooks),
            ``"native"`` (the compiled ops) or ``"hooks"`` (pure PyTorch).
        classifier: the ``nn.Linear`` (or its qualified name in ``model``) that gets the
            TSGB-FC rule; default: the last Linear the forward pass executes.
        allow_tf32: keep TF32 convolutions/matmuls for float32 CUDA inputs. Off by default:
            the rules divide by activations, which amplifies TF32's 10-bit mantissa (measured:
            maps 176% off the float64 ones with TF32, 4.5% without, random-weight mosaic).
            bf16/fp16 autocast is unaffected by this flag.
        fuse: trace the model with torch.fx and run each conv -> BatchNorm2d (-> ReLU/ReLU6)
            chain as one native op whose backward folds the BN and activation rules into the
            conv rule (same maps, several passes over activation memory fewer). The traced
            graph is cached per module tree; models that cannot be traced, have hooks, or run
            with the hooks backend use the per-module conversion. Turn off for a model whose
            forward depends on Python state that changes between calls.
        compile: inside a ``with`` block, run the converted model's forward under
            ``torch.compile`` (``True``, or a dict of ``torch.compile`` keyword arguments). The
            TSGB ops stay opaque custom ops (with fake kernels) in the compiled graph, so the
            compiler fuses the model's own elementwise work around them. The first call of a
            block (and of each new input shape) runs eagerly, the next compiles once; calls
            outside a ``with`` block run eagerly (the model is converted anew for each).
        reuse_memory: CPU, native backend: a call's activation memory (the forward's saved
            activations and the backward's buffers, blocks of 64 KiB and more) is kept after
            the call and reused by the next call of the same ``with`` block, instead of being
            returned to the system and faulted in afresh (measured: ResNet50, batch 4, 2
            threads: 34,000 page faults and ~48 ms per call). Only allocations made on the
            calling thread inside a call are affected; the kept memory, at most one call's
            working set, is freed when the block exits (after an un-converted call: at once).
        factorize: compute the maps of many targets by the factorised backward
            (:mod:`tsgb_ext.core.factor`: per-target work on single-channel maps and channel
            vectors, the target-independent work once; the same maps). ``"auto"`` (default):
            for ``attribute`` with an (N, T) target and ``explain(..., num_targets=T)``,
            T >= ``factor.AUTO_MIN_TARGETS`` (5: measured slower below), float32/float64
            input, no ``compile``; ``True``: for every call; ``False``: never.
            Models it cannot take (untraceable, hooks, ...) use the batched backward;
            ``report()`` says which path each node took and why.
    """

    def __init__(self, model: nn.Module, backend: str = "auto",
                 classifier: Union[None, str, nn.Linear] = None, allow_tf32: bool = False,
                 fuse: bool = True, compile: Union[bool, dict] = False,
                 reuse_memory: bool = True, factorize: Union[bool, str] = "auto"):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        backends.check_choice(backend)
        # a torch.compile'd model is explained through the module it wraps: a compiled
        # graph would bake in the rules' Python decisions (which Linear is the classifier)
        # at trace time. Compiled submodules run eagerly inside a conversion (Conversion).
        self.model = uncompiled(model)
        self.backend = backend
        self._names: Dict[nn.Module, str] = {m: n for n, m in self.model.named_modules()}
        self.classifier = self._resolve_classifier(classifier)
        self._conversion: Optional[Conversion] = None
        self.last_backend: Optional[str] = None
        self.allow_tf32 = flag("allow_tf32", allow_tf32)
        self.fuse = flag("fuse", fuse)
        self._fusion_cache: Optional[dict] = {} if self.fuse else None
        self.compile = compile_options(compile)
        self.reuse_memory = flag("reuse_memory", reuse_memory)
        self._memory_held = None  # the backend holding kept activation memory for a with-block
        self._compiled: Optional[Callable] = None  # the compiled forward of a with-block
        # calls through this explainer's with-block conversion, from any thread: one at a time
        self._call_lock = threading.Lock()
        self._warned: set = set()        # (module, what) pairs warned about, once each
        self._degenerate: Dict[nn.Module, float] = {}  # degenerate convs seen (report())
        self._observed: Dict[nn.Module, dict] = {}
        self._last_classifier: Optional[nn.Module] = None
        if factorize not in (True, False, "auto"):
            raise ValueError(f"factorize must be True, False or 'auto', got {factorize!r}")
        self.factorize = factorize
        self._factor_cache: dict = {}
        self._factor_plan: Optional[factor.FactorPlan] = None  # a with-block's plan
        self.last_path: Optional[str] = None  # "factorised" or "batched"
        self.factor_status: str = "not tried"

    def _resolve_classifier(self, classifier) -> Optional[nn.Linear]:
        if classifier is None:
            if not any(isinstance(m, nn.Linear) for m in self.model.modules()):
                raise ValueError(
                    "the model has no nn.Linear to use as the classifier; name one with "
                    "TSGB(model, classifier=<nn.Linear module or its name in "
                    "model.named_modules()>)")
            return None
        if isinstance(classifier, str):
            mods = dict(self.model.named_modules())
            if classifier not in mods:
                linears = [n for n, m in mods.items() if isinstance(m, nn.Linear)]
                raise ValueError(f"classifier {classifier!r} is not a module of the model; its "
                                 f"Linear layers are {linears}")
            classifier = mods[classifier]
        if not isinstance(classifier, nn.Linear):
            raise TypeError(f"classifier must be an nn.Linear or its qualified name, got "
                            f"{type(classifier).__name__}")
        if classifier not in self._names:
            raise ValueError("classifier must be a module of the model")
        return classifier

    # -- backend choice --------------------------------------------------------------------
    def _backend_for(self, device: torch.device):
        return backends.select(self.backend, device)

    # -- context manager -------------------------------------------------------------------
    def __enter__(self) -> "TSGB":
        if self._conversion is not None:
            raise RuntimeError("this TSGB explainer is already active in a with-block")
        lock = model_lock(self.model)
        lock.acquire(self, "this with-block")  # waits while another thread holds the model
        conv = None
        try:
            # torch.compile validates its arguments here, before the model is touched
            compiled = (torch.compile(self.model, **self.compile)
                        if self.compile is not None else None)
            self._factor_plan = self._plan() if self.factorize is not False else None
            fusion = self._fusion_cache if self.backend != "hooks" else None
            conv = Conversion(self.model, backends.HOOKS, self.classifier, self._names, fusion,
                              self._warned)
            self._conversion = conv.__enter__()
            self._compiled = compiled
        except BaseException:
            self._conversion = self._compiled = None
            try:
                if conv is not None:
                    conv.restore()
            finally:
                lock.release(self)
            raise
        return self

    def __exit__(self, *exc) -> None:
        with self._call_lock:  # calls in flight from other threads finish first
            conv, self._conversion = self._conversion, None
            self._compiled = None
            held, self._memory_held = self._memory_held, None
            try:
                if conv is not None:
                    conv.restore()
            finally:
                try:
                    if held is not None:
                        held.memory_release()
                finally:
                    model_lock(self.model).release(self)

    # -- the saliency map ------------------------------------------------------------------
    def attribute(self, x: torch.Tensor, target: TargetLike = None) -> torch.Tensor:
        """TSGB saliency maps of ``x`` for ``target``.

        Args:
            x: floating (N, C, H, W) tensor on the model's device.
            target: None (each sample's top-1 class), an int (that class for every sample), a
                sequence or 1-D integer tensor of length N (one class per sample), or an (N, T)
                integer tensor (T classes per sample from one forward pass).
        Returns:
            (N, 1, H, W) maps, or (N, T, H, W) for an (N, T) target; on x's device and dtype.
        """
        check_call(x)
        n = x.shape[0]
        tgt = target_tensor(target, n, None)
        if n == 0:
            self.last_backend = self._backend_for(x.device).name
            t = tgt.shape[1] if tgt is not None else 1
            return x.new_zeros((0, t) + tuple(x.shape[2:]))
        select = _selector(tgt, x.device)
        hint = tgt.shape[1] if tgt is not None else 1
        return self._explain(x, select, None, targets_hint=hint)[0]

    __call__ = attribute

    def explain(self, x: torch.Tensor, select: Callable[[torch.Tensor], torch.Tensor],
                amp_dtype: Optional[torch.dtype] = None, num_targets: Optional[int] = None
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Maps for targets chosen from this very forward pass (for pipelines, top-k, ...).

        ``select(logits)`` gets the detached (N, classes) scores and returns an (N, T) int64
        tensor of classes. ``amp_dtype`` autocasts the forward pass only. ``num_targets``: the
        T that ``select`` will return, when the caller knows it before the forward (lets
        ``factorize="auto"`` take the factorised backward for T >= 5, as ``attribute`` with an
        (N, T) target does; None: the batched backward unless ``factorize=True``). Returns
        ``(maps (N, T, H, W), targets (N, T), logits (N, classes))``, all from one forward.
        """
        check_call(x)
        if num_targets is not None:
            num_targets = _positive_int("num_targets", num_targets)
        return self._explain(x, select, amp_dtype, targets_hint=num_targets)

    def relevance(self, x: torch.Tensor,
                  target: Union[TargetLike, Callable[[torch.Tensor], torch.Tensor]] = None,
                  forward_args: tuple = ()) -> torch.Tensor:
        """Per-element relevance ``gx * x``, (N, C, H, W) like ``x``: the TSGB map before its
        sum over channels (``relevance(x, t).sum(1, keepdim=True)`` is ``attribute(x, t)``).

        Args:
            x: floating (N, C, H, W) tensor on the model's device.
            target: one class per sample: None (top-1), an int, a sequence or 1-D integer
                tensor of length N, or a function ``select(logits) -> (N, 1)`` int64 tensor
                as :meth:`explain` takes.
            forward_args: further positional arguments of the model's forward, passed after
                ``x`` (``model(x, *forward_args)``).
        """
        check_call(x)
        if x.shape[0] == 0:
            self.last_backend = self._backend_for(x.device).name
            return torch.zeros_like(x)
        if callable(target):
            select = target
        else:
            tgt = target_tensor(target, x.shape[0], None)
            if tgt is not None and tgt.shape[1] != 1:
                raise ValueError(f"relevance takes one class per sample; got a target of "
                                 f"shape {tuple(tgt.shape)} (attribute takes (N, T))")
            select = _selector(tgt, x.device)
        return self._explain(x, select, None, tuple(forward_args), per_element=True)[0]

    def _explain(self, x, select, amp_dtype, forward_args=(), per_element=False,
                 targets_hint=None):
        """``explain`` for an already validated ``x``; the model runs as
        ``model(x, *forward_args)``; ``per_element``: the maps are ``gx * x`` (N, C, H, W),
        not summed over channels (one target per sample only); ``targets_hint``: T, when the
        caller knows it (``factorize="auto"`` factorises from ``factor.AUTO_MIN_TARGETS`` on;
        0: never)."""
        p = next((t for t in self.model.parameters() if t.is_floating_point()), None)
        if p is not None and amp_dtype is None and x.dtype != p.dtype:
            raise TypeError(f"x is {x.dtype} but the model's parameters are {p.dtype}: convert "
                            f"the input (x.to({p.dtype})) or the model (model.to({x.dtype}))")
        backend = self._backend_for(x.device)
        self.last_backend = backend.name
        if self._wants_factor(x, amp_dtype, forward_args, per_element, targets_hint, backend):
            out = self._explain_factorised(x, select)
            if out is not None:
                return out
        self.last_path = "batched"
        with tf32_off(x.is_cuda and not self.allow_tf32):
            with self._call_lock:
                if self._conversion is not None:  # inside this explainer's with-block
                    return self._run(self._conversion, backend, x, select, amp_dtype,
                                     forward_args, per_element)
            # a conversion for this call only, holding the model (other threads wait)
            with model_lock(self.model).hold(object(), "this call"):
                fusion = self._fusion_cache if backend.supports_fusion else None
                with Conversion(self.model, backend, self.classifier, self._names, fusion,
                                self._warned) as conv:
                    return self._run(conv, backend, x, select, amp_dtype, forward_args,
                                     per_element)

    # -- the factorised backward (many targets) ---------------------------------------------
    def _wants_factor(self, x, amp_dtype, forward_args, per_element, hint, backend) -> bool:
        if (self.factorize is False or amp_dtype is not None or forward_args or per_element
                or hint == 0):  # 0: the caller asks for the batched path
            return False
        if self.factorize == "auto":
            if not (hint is not None and self.compile is None and backend is not backends.HOOKS
                    and x.dtype in (torch.float32, torch.float64)):
                return False
            if hint < factor.AUTO_MIN_TARGETS:
                self.factor_status = (f"factorize='auto' uses the batched backward for fewer "
                                      f"than {factor.AUTO_MIN_TARGETS} targets ({hint}); "
                                      f"factorize=True forces the factorised path")
                return False
            return True
        return True

    def _plan(self):
        plan, why = factor.plan_for(self.model, self._factor_cache)
        self.factor_status = why
        return plan

    def _explain_factorised(self, x, select):
        """Maps by the factorised backward, or None (then the batched backward runs)."""
        in_block = self._conversion is not None
        if not self._has_plan(in_block):
            return None
        self._degenerate_check(x, select)
        backend = self._backend_for(x.device)
        try:
            with tf32_off(x.is_cuda and not self.allow_tf32), \
                    self._factor_hold(in_block) as plan, self._memory(backend, x, not in_block):
                if plan is None:
                    return None
                maps, tgt, logits, clf = factor.explain(plan, x.detach(), select,
                                                        self.classifier)
        except factor.NotFactorisable as exc:
            self._not_factorisable(exc, in_block)
            return None
        deferred_checks(x, tgt, logits.shape[1])
        self._last_classifier = clf
        self.last_path = "factorised"
        self.factor_status = "factorised"
        return maps, tgt, logits

    def _has_plan(self, in_block: bool) -> bool:
        if in_block:
            return self._factor_plan is not None
        with self._factor_hold(False) as plan:
            return plan is not None

    def pixel_classes(self, x: torch.Tensor, classes=None, k: int = 1, chunk: int = 64
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per-pixel top-``k`` class over many targets' maps, never holding all of them.

        At every pixel, the ``k`` targets whose TSGB maps are largest there (weak segmentation
        labels from a classifier: "which class is this evidence for"). The maps are computed
        ``chunk`` targets at a time from one forward pass (the factorised backward shares its
        target-independent work between chunks; a model it cannot take runs one batched call
        per chunk), and only the running top-k is kept: memory O(k + chunk) maps, not O(T).

        Args:
            x: (N, C, H, W) input.
            classes: None (every class of the model), a 1-D sequence / tensor of class ids
                (the same for every sample) or an (N, T) integer tensor (per sample).
            k: how many classes per pixel (1 <= k <= T).
            chunk: targets per backward pass.
        Returns:
            ``(ids, values)``, both (N, k, H, W): class ids (int64), best first, and their map
            values at that pixel.
        """
        check_call(x)
        k, chunk = _positive_int("k", k), _positive_int("chunk", chunk)
        best_v = best_i = None
        for ids, maps in self._chunked_maps(x, classes, chunk, k):
            ids = ids[:, :, None, None].expand_as(maps)
            v = maps if best_v is None else torch.cat([best_v, maps], 1)
            i = ids if best_i is None else torch.cat([best_i, ids], 1)
            top = v.topk(min(k, v.shape[1]), dim=1)
            best_v, best_i = top.values, i.gather(1, top.indices)
        return best_i, best_v

    def _chunked_maps(self, x, classes, chunk, k):
        """(ids (N, c), maps (N, c, H, W)) chunk by chunk."""
        n = x.shape[0]

        def resolve(num_classes):
            tg = _class_table(classes, n, num_classes, x.device)
            if k > tg.shape[1]:
                raise ValueError(f"k must be at most the number of classes ({tg.shape[1]}), "
                                 f"got {k}")
            return tg
        in_block = self._conversion is not None
        if (self.factorize is not False and x.dtype in (torch.float32, torch.float64)
                and self._has_plan(in_block)):
            self._degenerate_check(x, lambda lg: lg.argmax(1, keepdim=True))
            backend = self._backend_for(x.device)
            with tf32_off(x.is_cuda and not self.allow_tf32), \
                    self._factor_hold(in_block) as plan, self._memory(backend, x, not in_block):
                try:
                    run = None if plan is None else factor.Run(plan, x.detach(), self.classifier)
                    if run is not None:  # the first chunk finds out whether the graph fits
                        tg = resolve(run.logits.shape[1])
                        first = (tg[:, :chunk], run.maps(tg[:, :chunk]))
                except factor.NotFactorisable as exc:
                    self._not_factorisable(exc, in_block)
                    run = None
                if run is not None:
                    self.last_path = "factorised"
                    yield first
                    for a in range(chunk, tg.shape[1], chunk):
                        yield tg[:, a:a + chunk], run.maps(tg[:, a:a + chunk])
                    return
        a, total = 0, None
        while total is None or a < total:
            table = {}

            def select(lg, a=a):
                table["tg"] = resolve(lg.shape[1])
                return table["tg"][:, a:a + chunk]
            maps, ids, _ = self._explain(x, select, None, targets_hint=0)
            total = table["tg"].shape[1]
            yield ids, maps
            a += chunk

    def _degenerate_check(self, x, select) -> None:
        key = (tuple((id(m), type(m)) for m in self.model.modules()), tuple(x.shape[1:]),
               x.dtype, None, x.device.type)
        if key not in degenerate.checked(self.model) \
                and degenerate.degenerate_tolerance(x.dtype) is not None:
            # the first call for this input kind: the degenerate-layer check, on one target
            self._explain(x, lambda lg: select(lg)[:, :1], None, targets_hint=0)

    def _not_factorisable(self, exc, in_block: bool) -> None:
        self.factor_status = f"not factorisable: {exc}"
        self._factor_cache["factor"] = (self._factor_cache["factor"][0], None,
                                        self.factor_status)
        if in_block:
            self._factor_plan = None

    @contextlib.contextmanager
    def _factor_hold(self, in_block: bool):
        """The model held for one factorised call (in eval mode; nothing else changes);
        yields the factorisation plan (None: the model does not fit). The plan is traced (and
        its cache checked against the module tree) only while the model is held."""
        if in_block:
            with self._call_lock:
                yield self._factor_plan
            return
        with model_lock(self.model).hold(object(), "this call"):
            training = [(m, m.training) for m in self.model.modules()]
            try:
                plan = self._plan()
                self.model.eval()
                yield plan
            finally:
                for m, t in training:
                    m.training = t

    def _run(self, conv: Conversion, backend, x, select, amp_dtype, forward_args=(),
             per_element=False):
        conv.backend = backend
        xin = x.detach()
        if xin.is_inference():
            xin = xin.clone()
        amp = (torch.autocast(x.device.type, dtype=amp_dtype) if amp_dtype is not None
               else contextlib.nullcontext())
        # degenerate-layer check: once per model, module tree, input shape and dtype; not in
        # float16/bfloat16 (their rounding is coarser than the cancellation it looks for)
        key = (conv.tree, tuple(x.shape[1:]), x.dtype, amp_dtype, x.device.type)
        seen = degenerate.checked(self.model)
        check = (key not in seen
                 and degenerate.degenerate_tolerance(amp_dtype or x.dtype) is not None)
        conv.watch = [] if check else None
        # compiled: inside a with-block, once the classifier patch is static and the
        # first-call checks are done (they run Python between ops)
        compiled = (self._compiled is not None and conv is self._conversion
                    and conv.classifier is not None and not check)
        forward = self._compiled if compiled else self.model
        with self._memory(backend, x, conv is not self._conversion), torch.enable_grad(), \
                (_keep_saved_buffers() if compiled else contextlib.nullcontext()):
            xin.requires_grad_(True)
            conv.begin_forward()
            with amp:
                logits = model_logits(forward(xin, *forward_args))
            if logits.shape[0] != x.shape[0]:
                raise ValueError(f"the model returned {logits.shape[0]} rows of scores for "
                                 f"{x.shape[0]} samples")
            clf = conv.end_forward()
            if clf is None:
                raise ValueError("the forward pass ran no nn.Linear to use as the classifier; "
                                 "name one with TSGB(model, classifier=...)")
            tgt = select(logits.detach())
            T = tgt.shape[1]
            maps = []
            classes = torch.arange(logits.shape[1], device=logits.device)
            for j in range(T):
                # one-hot by comparison, not scatter: an out-of-range CUDA target (reported by
                # deferred_checks) gives a zero row here rather than a device-side assert
                g = (classes == tgt[:, j:j + 1]).to(logits.dtype)
                # the rules handle precision themselves: no autocast inside their kernels
                with torch.autocast(x.device.type, enabled=False):
                    (gx,) = torch.autograd.grad(logits, xin, g, retain_graph=j < T - 1)
                with torch.no_grad():
                    maps.append(gx * x if per_element else (gx * x).sum(1, keepdim=True))
        deferred_checks(x, tgt, logits.shape[1])
        if check:
            self._report_degenerate(conv, seen, key)
        else:
            self._degenerate.update(seen.get(key, {}))
        self._observed.update(conv.observed)
        self._last_classifier = clf
        if self.classifier is None and conv is self._conversion:
            # inside a with-block: fix the classifier found by this first call
            conv.fix_classifier(clf)
        sal = maps[0] if T == 1 else torch.cat(maps, 1)
        return sal.to(x.dtype), tgt, logits.detach()

    @contextlib.contextmanager
    def _memory(self, backend, x: torch.Tensor, per_call: bool):
        """Around one call: its CPU allocations reuse the memory a with-block keeps
        (``per_call``: a call outside this explainer's with-block keeps nothing after it)."""
        if not (self.reuse_memory and x.device.type == "cpu" and backend.reuses_memory):
            yield
            return
        if per_call:
            backend.memory_hold()
        elif self._memory_held is None:
            backend.memory_hold()  # released when the with-block exits
            self._memory_held = backend
        try:
            with backend.memory_scope():
                yield
        finally:
            if per_call:
                backend.memory_release()

    def _report_degenerate(self, conv: Conversion, seen: dict, key) -> None:
        for m, msg in degenerate.report(conv, seen, key, self._names, self._degenerate):
            conv.warn_once(m, "degenerate", msg)

    def report(self, x: Optional[torch.Tensor] = None, target: TargetLike = None) -> "RuleReport":
        """Which modules get which TSGB rule (and which keep their ordinary gradient).

        With ``x``, one ``attribute(x, target)`` call runs first, so that the classifier,
        what subclasses with their own forward did and degenerate layers are known (without
        it, what earlier calls of this explainer saw). Returns a :class:`RuleReport`:
        ``rows`` (name, type, rule, note) and ``print(report)`` for a table.
        """
        if x is not None:
            self.attribute(x, target)
        clf = self.classifier if self.classifier is not None else self._last_classifier
        fused = set()
        plan = (self._fusion_cache or {}).get("plan")
        if plan is not None and plan.graph_module is not None and self.backend != "hooks":
            for b in plan.graph_module.modules():
                if isinstance(b, FusedBlock) and not b.__dict__.get("subclass_unfusable"):
                    fused.update((b.conv_, b.bn_))
        rows = describe_rules(self.model, clf, self._observed, self._degenerate, fused)
        plan = self._factor_plan if self._conversion is not None else \
            (self._factor_cache.get("factor") or (None, None))[1]
        paths = dict(plan.paths) if plan is not None else {}
        return RuleReport(rows, classifier_known=clf is not None, paths=paths,
                          factor_status=self.factor_status)


class RuleReport:
    """``TSGB.report()``: one row per module that gets a TSGB rule, per subclass of a rule
    layer that does not, and per conv/norm/pool-like module without a rule.

    ``rows``: list of ``(name, type, rule, note)``; ``rule`` is one of ``"conv"``,
    ``"batchnorm"``, ``"avgpool"``, ``"classifier"`` or ``"gradient"`` (ordinary gradient).
    ``by_rule(rule)`` lists the names with that rule; ``str(report)`` is a table.

    ``paths``: after a factorised call, which path each graph node's backward took there
    (module name, or the graph node's name for functions): ``"factorised"`` (target-independent
    factors times per-target single-channel maps or channel vectors), ``"dense"`` (the rule on
    the materialised per-target gradient), ``"autograd"`` (an op without a TSGB rule: its
    ordinary gradient, batched over targets), ``"classifier rows"``, ``"pass"``;
    ``factor_status``: why the factorised path was or was not taken."""

    def __init__(self, rows, classifier_known: bool = True, paths=None,
                 factor_status: str = ""):
        self.rows = list(rows)
        self.classifier_known = classifier_known
        self.paths = dict(paths or {})
        self.factor_status = factor_status

    def by_path(self, path: str):
        return [n for n, p in self.paths.items() if p == path]

    def by_rule(self, rule: str):
        return [r[0] for r in self.rows if r[2] == rule]

    def __iter__(self):
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __str__(self) -> str:
        head = ("module", "type", "rule", "note")
        rows = [head] + [tuple(str(c) for c in r) for r in self.rows]
        w = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = [f"{r[0]:<{w[0]}}  {r[1]:<{w[1]}}  {r[2]:<{w[2]}}  {r[3]}".rstrip() for r in rows]
        counts = {}
        for r in self.rows:
            counts[r[2]] = counts.get(r[2], 0) + 1
        lines.append(", ".join(f"{k}: {v}" for k, v in counts.items())
                     + ("" if self.classifier_known else
                        "; classifier: the last nn.Linear the first call runs (call "
                        "report(x) to see it)"))
        if self.paths:
            counts = {}
            for p in self.paths.values():
                counts[p] = counts.get(p, 0) + 1
            lines.append("factorised backward (last call), graph nodes by path: "
                         + ", ".join(f"{k}: {v}" for k, v in counts.items()))
        elif self.factor_status:
            lines.append(f"factorised backward: {self.factor_status}")
        return "\n".join(lines)

    __repr__ = __str__


def _positive_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return v


def _class_table(classes, n: int, num_classes: int, device) -> torch.Tensor:
    """(N, T) int64 class ids from ``pixel_classes``' ``classes`` argument."""
    if classes is None:
        return torch.arange(num_classes, device=device).expand(n, num_classes)
    tg = torch.as_tensor(classes)
    if tg.is_floating_point() or tg.is_complex() or tg.dtype == torch.bool:
        raise TypeError(f"classes must be integer class ids, got {tg.dtype}")
    if tg.dim() == 1:
        tg = tg.expand(n, -1)
    if tg.dim() != 2 or tg.shape[0] != n or tg.shape[1] == 0:
        raise ValueError(f"classes must be None, a non-empty 1-D sequence of class ids or an "
                         f"(N={n}, T) tensor, got shape {tuple(tg.shape)}")
    if int(tg.min()) < 0 or int(tg.max()) >= num_classes:
        raise IndexError(f"classes must be class indices in [0, {num_classes}), got "
                         f"{int(tg.min()) if int(tg.min()) < 0 else int(tg.max())}")
    return tg.to(device=device, dtype=torch.int64)


def _selector(tgt: Optional[torch.Tensor], device: torch.device
              ) -> Callable[[torch.Tensor], torch.Tensor]:
    """``select(logits)`` for a validated (N, T) target (None: each sample's top-1 class)."""
    # the largest class id is read here from a CPU target; a CUDA target's values are
    # checked at the end of the call (deferred_checks): no host read before the forward
    tmax = int(tgt.max()) if tgt is not None and tgt.numel() and not tgt.is_cuda else -1
    if tgt is not None:
        tgt = tgt.to(device, non_blocking=True)

    def select(logits: torch.Tensor) -> torch.Tensor:
        if tgt is None:
            return logits.argmax(1, keepdim=True)
        k = logits.shape[1]
        if tmax >= k:
            raise IndexError(f"target must be class indices in [0, {k}), got {tmax}")
        return tgt
    return select


def _keep_saved_buffers():
    """Around a compiled forward and its backward passes: AOTAutograd may "donate" the tensors
    a compiled graph saves for its backward to that backward's outputs, which allows the
    backward to run once only, and the T backward passes of T targets each need them. The
    flag is read when the graph is compiled (in this call's forward) and when its backward
    first runs (both inside this block)."""
    try:
        import torch._functorch.config as cfg
    except ImportError:  # pragma: no cover
        return contextlib.nullcontext()
    if not hasattr(cfg, "donated_buffer"):
        return contextlib.nullcontext()
    return cfg.patch(donated_buffer=False)

