"""conv -> BatchNorm2d (-> ReLU / ReLU6) fusion through a traced graph (TSGB(..., fuse=True)).

The fused path must give the maps of the unfused rules (float64: to rounding), must only fuse
chains whose intermediate results go nowhere else, must fall back to the per-module
conversion where tracing is not safe (hooks, untraceable forwards), and must leave the model
exactly as it was.
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import tsgb_ext
from conftest import DEVICES, assert_same, require_native, snapshot

require_native("conv2d_bn_act")


def _randomise_bn(model):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.2)
    return model.eval()


def _plan(ex):
    return ex._fusion_cache.get("plan") if ex._fusion_cache is not None else None


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _maps(model, x, target, **kw):
    return tsgb_ext.TSGB(model, backend="native", **kw).attribute(x, target)


class Block(nn.Module):
    """A residual block in plain forward code (not nn.Sequential): conv-bn-relu with the
    ReLU module used twice, a functional relu6, a bn feeding two users, a conv feeding two."""

    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, groups=c), nn.BatchNorm2d(c)
        self.conv3, self.bn3 = nn.Conv2d(c, c, 1), nn.BatchNorm2d(c)
        self.conv4, self.bn4 = nn.Conv2d(c, c, 1), nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))      # fused, act ReLU (module)
        out = F.relu6(self.bn2(self.conv2(out)))      # fused, act ReLU6 (function), depthwise
        z = self.bn3(self.conv3(out))                 # fused, no act: bn3 feeds two users
        out = self.relu(z) + z
        y4 = self.conv4(out)                          # not fused: conv4 feeds two users
        return self.relu(self.bn4(y4) + y4)


class Net(nn.Module):
    def __init__(self, classes=6):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8),
                                  nn.ReLU6())
        self.block = Block(8)
        self.head = nn.Linear(8, classes)

    def forward(self, x):
        x = self.block(self.stem(x))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def net():
    torch.manual_seed(0)
    return _randomise_bn(Net())


@pytest.mark.parametrize("device", DEVICES)
def test_chains_found_and_maps_equal_unfused_float64(device):
    model = net().double().to(device)
    x = torch.randn(3, 3, 17, 15, dtype=torch.float64, device=device)
    ex = tsgb_ext.TSGB(model, backend="native")
    fused = ex.attribute(x, torch.tensor([0, 3, 5]))
    assert fused.device == x.device
    plan = _plan(ex)
    assert plan is not None and plan.chains == 4  # stem, conv1-bn1-relu, conv2-bn2-relu6, conv3-bn3
    kinds = sorted(m.act for m in plan.graph_module.modules() if type(m).__name__ == "FusedBlock")
    assert kinds == [0, 1, 2, 2]
    unfused = _maps(model, x, torch.tensor([0, 3, 5]), fuse=False)
    hooks = tsgb_ext.TSGB(model, backend="hooks").attribute(x, torch.tensor([0, 3, 5]))
    assert _rel(fused, unfused) < 1e-12
    assert _rel(fused, hooks) < 1e-12


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "efficientnet_b0", "vgg11_bn"])
def test_torchvision_models_fused_equal_unfused(name):
    tvm = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    model = _randomise_bn(getattr(tvm, name)(num_classes=10)).double()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    ex = tsgb_ext.TSGB(model, backend="native")
    fused = ex.attribute(x, 4)
    assert _plan(ex).chains > 0
    assert _rel(fused, _maps(model, x, 4, fuse=False)) < 1e-11


@pytest.mark.parametrize("device", DEVICES)
def test_float32_fused_close_to_unfused_and_nchw_channels_last(device):
    model = net().to(device)
    x = torch.randn(2, 3, 21, 19, device=device)
    unfused = _maps(model, x, 1, fuse=False)
    assert _rel(_maps(model, x, 1), unfused) < 1e-5
    # channels_last: against the unfused rules on the same (channels_last) forward
    model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    assert _rel(_maps(model_cl, x_cl, 1), _maps(model_cl, x_cl, 1, fuse=False)) < 1e-5


def test_model_restored_and_plan_cached():
    model = net()
    before = snapshot(model)
    x = torch.randn(2, 3, 16, 16)
    ex = tsgb_ext.TSGB(model, backend="native")
    ex.attribute(x, 0)
    assert_same(before, snapshot(model))
    plan = _plan(ex)
    ex.attribute(x, 1)
    assert _plan(ex) is plan  # traced once per module tree
    with ex:
        ex.attribute(x, 2)
        assert "forward" in model.__dict__
    assert_same(before, snapshot(model))
    model.block.conv4 = nn.Conv2d(8, 8, 1)  # the tree changed: traced again
    ex.attribute(x, 1)
    assert _plan(ex) is not plan


def test_forward_error_restores_model():
    model = net()
    before = snapshot(model)
    with pytest.raises(RuntimeError):
        tsgb_ext.TSGB(model, backend="native").attribute(torch.randn(2, 5, 16, 16), 0)
    assert_same(before, snapshot(model))


def test_hooks_disable_fusion_and_still_run():
    model = net()
    x = torch.randn(2, 3, 16, 16)
    seen = []
    h = model.block.bn1.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    try:
        ex = tsgb_ext.TSGB(model, backend="native")
        maps = ex.attribute(x, 2)
        assert _plan(ex).graph_module is None and seen == [(2, 8, 8, 8)]
    finally:
        h.remove()
    assert _rel(maps, _maps(model, x, 2, fuse=False)) < 1e-5


class Untraceable(Net):
    def forward(self, x):
        if x.mean() > -1e9:  # data-dependent control flow: torch.fx cannot trace it
            x = self.block(self.stem(x))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def test_untraceable_model_falls_back():
    torch.manual_seed(0)
    model = _randomise_bn(Untraceable()).double()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    ex = tsgb_ext.TSGB(model, backend="native")
    maps = ex.attribute(x, 3)
    assert _plan(ex).graph_module is None
    assert _rel(maps, tsgb_ext.TSGB(model, backend="hooks").attribute(x, 3)) < 1e-12


def test_fuse_off_and_hooks_backend_do_not_trace():
    model = net()
    x = torch.randn(1, 3, 16, 16)
    ex = tsgb_ext.TSGB(model, backend="native", fuse=False)
    ex.attribute(x, 0)
    assert ex._fusion_cache is None
    ex = tsgb_ext.TSGB(model, backend="hooks")
    ex.attribute(x, 0)
    with ex:
        ex.attribute(x, 0)
    assert _plan(ex) is None
    with pytest.raises(TypeError, match="fuse must be a bool"):
        tsgb_ext.TSGB(model, fuse="yes")


def test_bn_without_running_stats_not_fused():
    model = net()
    model.block.bn1 = nn.BatchNorm2d(8, track_running_stats=False)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    model = model.double()
    ex = tsgb_ext.TSGB(model, backend="native")
    maps = ex.attribute(x, 0)
    assert _plan(ex).chains == 3
    assert _rel(maps, tsgb_ext.TSGB(model, backend="hooks").attribute(x, 0)) < 1e-12


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_autocast_with_fusion(device):
    model = net().to(device)
    x = torch.randn(2, 3, 16, 16, device=device)
    ex = tsgb_ext.TSGB(model, backend="native")
    maps, _, logits = ex.explain(x, lambda lg: lg.argmax(1, keepdim=True), amp_dtype=torch.bfloat16)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(maps).all()
    unfused = tsgb_ext.TSGB(model, backend="native", fuse=False).explain(
        x, lambda lg: lg.argmax(1, keepdim=True), amp_dtype=torch.bfloat16)[0]
    assert _rel(maps, unfused) < 0.05


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph_tsgb_step(device):
    """The converted model (traced graph, fused blocks, C++ autograd ops) under
    torch.compile(fullgraph=True): its forward and the TSGB backward AOTAutograd derives from
    the ops' autograd give the eager maps."""
    model = net().to(device)
    x = torch.randn(2, 3, 16, 16, device=device)
    want = tsgb_ext.TSGB(model, backend="native", classifier="head").attribute(x, 1)
    ex = tsgb_ext.TSGB(model, backend="native", classifier="head")
    torch._dynamo.reset()
    with ex:
        ex.model = torch.compile(model, fullgraph=True, backend="aot_eager")
        got = ex.attribute(x, 1)
    torch._dynamo.reset()
    assert _rel(got, want) < 1e-6
    assert "forward" not in model.__dict__


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_capture_of_a_tsgb_step():
    """Forward and TSGB backward of the converted model captured in one CUDA graph (no host
    synchronisation on the way: fused blocks, BN, classifier rule with cached W+/W-),
    replayed on new inputs, equal to eager maps."""
    model = net().cuda()
    ex = tsgb_ext.TSGB(model, backend="native", classifier="head")
    x = torch.randn(2, 3, 16, 16, device="cuda", requires_grad=True)
    g = torch.zeros(2, 6, device="cuda")
    g[:, 1] = 1
    with ex:
        ex.attribute(x.detach(), 1)  # the with-block's conversion now runs the native ops
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                torch.autograd.grad(model(x), x, g)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            (gx,) = torch.autograd.grad(model(x), x, g)
            static = (gx * x).sum(1, keepdim=True)
        for seed in (1, 2):
            with torch.no_grad():
                x.copy_(torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(seed)))
            graph.replay()
            torch.cuda.synchronize()
            want = ex.attribute(x.detach(), 1)
            assert _rel(static, want) < 1e-6


class SamePadConv(nn.Conv2d):
    """TF-style "same" padding: pad, then F.conv2d with its own weight (EfficientNet-Lite)."""

    def forward(self, x):
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        ph = max((-(-ih // self.stride[0]) - 1) * self.stride[0] + kh - ih, 0)
        pw = max((-(-iw // self.stride[1]) - 1) * self.stride[1] + kw - iw, 0)
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class ScaledConv(nn.Conv2d):
    """A subclass that changes its conv's result: must not be fused."""

    def forward(self, x):
        return 2 * F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                            self.groups)


class SubclassNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(SamePadConv(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU6())
        self.b = nn.Sequential(SamePadConv(8, 8, 5, groups=8), nn.BatchNorm2d(8), nn.ReLU6())
        self.c = nn.Sequential(ScaledConv(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = self.c(self.b(self.a(x)))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@pytest.mark.parametrize("device", DEVICES)
def test_conv2d_subclasses_fused_through_their_conv2d_call(device):
    torch.manual_seed(0)
    model = _randomise_bn(SubclassNet()).double().to(device)
    x = torch.randn(2, 3, 15, 17, dtype=torch.float64, device=device)
    ex = tsgb_ext.TSGB(model, backend="native")
    for _ in range(2):  # the second call takes the remembered decision for ScaledConv
        fused = ex.attribute(x, 3)
        blocks = [b for b in _plan(ex).graph_module.modules() if type(b).__name__ == "FusedBlock"]
        assert len(blocks) == 3
        assert sorted(bool(b.__dict__.get("subclass_unfusable")) for b in blocks) == [False, False, True]
        assert _rel(fused, tsgb_ext.TSGB(model, backend="hooks").attribute(x, 3)) < 1e-12
        assert _rel(fused, _maps(model, x, 3, fuse=False)) < 1e-12


# ---- tracing touches no process-wide state; plans follow hooks added later (issue 19) -------
class _Spy(Net):
    """Records, from inside its own forward (which runs with proxies while the plan is
    traced), whether nn.Module's methods or math's functions were replaced meanwhile."""

    seen = []

    def forward(self, x):
        import math
        _Spy.seen.append((nn.Module.__call__ is _ORIG_CALL, nn.Module.__getattr__ is _ORIG_GETATTR,
                          math.sqrt is _ORIG_SQRT, torch.fx._symbolic_trace.is_fx_tracing()))
        return super().forward(x)


_ORIG_CALL, _ORIG_GETATTR = nn.Module.__call__, nn.Module.__getattr__
import math as _math  # noqa: E402
_ORIG_SQRT = _math.sqrt


def test_tracing_patches_nothing_process_wide():
    torch.manual_seed(0)
    model = _randomise_bn(_Spy())
    _Spy.seen.clear()
    ex = tsgb_ext.TSGB(model, backend="native")
    ex.attribute(torch.randn(1, 3, 16, 16), 0)
    assert _plan(ex).graph_module is not None and _plan(ex).chains >= 3  # it did trace
    assert _Spy.seen and all(s == (True, True, True, False) for s in _Spy.seen), _Spy.seen


def test_unrelated_model_in_another_thread_while_plans_are_traced():
    """First calls (each traces its model) on one thread while an unrelated model runs on
    another: the other thread sees ordinary modules throughout, and nothing stays patched."""
    import threading
    other = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    xo = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        ref = other(xo)
    errors, stop, runs = [], threading.Event(), [0]

    def loop():
        while not stop.is_set():
            try:
                with torch.no_grad():
                    out = other(xo)
                if not torch.equal(out, ref):
                    errors.append("changed output")
            except Exception as e:  # noqa: BLE001 - what the other thread saw
                errors.append(f"{type(e).__name__}: {e}")
            runs[0] += 1

    t = threading.Thread(target=loop)
    t.start()
    try:
        for i in range(8):
            torch.manual_seed(i)
            ex = tsgb_ext.TSGB(_randomise_bn(Net()), backend="native")
            ex.attribute(torch.randn(1, 3, 16, 16), 0)
            assert _plan(ex).graph_module is not None
    finally:
        stop.set()
        t.join(30)
    assert runs[0] > 0 and not errors, errors[:5]
    assert nn.Module.__call__ is _ORIG_CALL and nn.Module.__getattr__ is _ORIG_GETATTR


class _Scale(nn.Module):
    def __init__(self, k):
        super().__init__()
        self.k = k

    def __call__(self, m, inputs, output):
        return output * self.k


@pytest.mark.parametrize("where", ["bn", "conv", "relu", "block"])
def test_hook_added_after_first_call_is_run(where):
    """A forward hook registered after an explainer's first call (the plan is cached by then)
    changes the map exactly as it changes a fresh explainer's; removing it restores the map."""
    torch.manual_seed(0)
    model = _randomise_bn(Net()).double()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    ex = tsgb_ext.TSGB(model, backend="native")
    plain = ex.attribute(x, 1)
    assert _plan(ex).graph_module is not None
    target = {"bn": model.block.bn1, "conv": model.block.conv3, "relu": model.block.relu,
              "block": model.block}[where]
    h = target.register_forward_hook(_Scale(-0.5) if where != "relu" else
                                     (lambda m, i, o: o * torch.linspace(0.5, 2, o.shape[-1],
                                                                         dtype=o.dtype)))
    try:
        hooked = ex.attribute(x, 1)
        fresh = tsgb_ext.TSGB(model, backend="hooks").attribute(x, 1)
        assert _rel(hooked, fresh) < 1e-10
        assert _rel(hooked, plain) > 1e-3  # the hook does change the map
        with ex:  # and in a with-block whose plan was cached before the hook
            assert _rel(ex.attribute(x, 1), fresh) < 1e-10
    finally:
        h.remove()
    assert _rel(ex.attribute(x, 1), plain) < 1e-12
    assert _plan(ex).graph_module is not None  # fused again without the hook


def test_global_hook_added_after_first_call_is_run():
    torch.manual_seed(0)
    model = _randomise_bn(Net()).double()
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    ex = tsgb_ext.TSGB(model, backend="native")
    plain = ex.attribute(x, 0)

    def hook(m, i, o):
        return o * 0.5 if isinstance(m, nn.BatchNorm2d) else None
    h = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        hooked = ex.attribute(x, 0)
        fresh = tsgb_ext.TSGB(model, backend="hooks").attribute(x, 0)
    finally:
        h.remove()
    assert _rel(hooked, fresh) < 1e-10 and _rel(hooked, plain) > 1e-3
