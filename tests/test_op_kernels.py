"""The kernels of tsgb_ext's backward ops, on every device present (CPU always, CUDA when a
GPU is visible): each test runs once per device.

Every op is compared with a float64 pure-PyTorch transcription of its rule (written out below,
independent of the kernels) on many random configurations: odd sizes, kernels 1..7, stride,
padding, dilation, groups (incl. depthwise and K != C), batch 1, T = 3 targets per sample
(grad batch 3 * N), NCHW / channels_last / non-contiguous inputs, float32 / float16 / bfloat16.

Tolerances (checked against the float64 result computed from the *same* rounded inputs, so only
the kernels' own error counts). For each element the allowed error is `rtol * mag`, where `mag`
is the same formula evaluated on absolute values (the condition scale: it bounds what rounding
of the summands can do), or for conv `rtol * |ref| + rtol * max|ref|` (scale-aware):
    float32: rtol 1e-5  (kernels accumulate in fp32; fast-math division is <= 2 ulp)
    float16: rtol 2e-3  (fp32 accumulation, one final rounding to fp16: 2^-11 = 4.9e-4)
    bfloat16: rtol 1.6e-2 (one final rounding to bf16: 2^-8 = 3.9e-3)
For fp16 / bf16 the kernels saturate results beyond the dtype's range to its largest finite
value, so the reference is clamped the same way.

CUDA-only tests (graph capture) skip on the CPU; the CUDA run skips without a GPU.
"""
import random

import pytest
import torch
import torch.nn.functional as F

import reference as ref

import os

CUDA = torch.cuda.is_available()
REQUIRE_NATIVE = os.environ.get("TSGB_REQUIRE_NATIVE", "0") == "1"

try:  # importing registers the ops
    import tsgb_ext  # noqa: F401
    _IMPORT_ERROR = None
except Exception as exc:  # pragma: no cover - reported by the fixture below
    _IMPORT_ERROR = exc

EPS = 1e-10
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-12}
LAYOUTS = ["contiguous", "channels_last", "noncontiguous"]

DEV = "cpu"
"""The device of the test being run (set by the autouse fixture below; the helpers read it)."""


@pytest.fixture(autouse=True, params=["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not CUDA, reason="needs a CUDA GPU"))])
def _device(request):
    global DEV
    if _IMPORT_ERROR is not None:
        pytest.fail(f"import tsgb_ext failed: {_IMPORT_ERROR!r}")
    if not tsgb_ext.native_available():
        if REQUIRE_NATIVE:
            pytest.fail(f"tsgb_ext._C did not load: {tsgb_ext.backend_info()['native_error']}")
        pytest.skip("tsgb_ext._C (the compiled ops) is not built")
    if request.param == "cuda":
        if not torch.ops.tsgb_ext.built_with_cuda():
            pytest.fail("tsgb_ext was built without CUDA kernels (rebuild with FORCE_CUDA=1)")
        torch.backends.cuda.matmul.allow_tf32 = False
    DEV = request.param
    yield request.param
    DEV = "cpu"


def cuda_only():
    if DEV != "cuda":
        pytest.skip("CUDA-only (graph capture)")


def ops():
    return torch.ops.tsgb_ext


# ------------------------------------------------------------------------------------------
# helpers

def _layout(t, layout):
    """Return t (values unchanged) in the requested memory layout."""
    if layout == "contiguous":
        return t.contiguous()
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "noncontiguous":
        # a strided view into a larger buffer, W innermost with stride 2, odd storage offset
        n, c, h, w = t.shape
        big = torch.empty((n, c, h, 2 * w + 1), dtype=t.dtype, device=t.device)
        view = big[:, :, :, 1::2]
        view.copy_(t)
        if t.numel() > 1:
            assert not view.is_contiguous()
        return view
    raise ValueError(layout)


def _expected_format(x):
    """The format the ops return: channels_last when x is (and is not plain contiguous)."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _rand(shape, gen, zero_frac=0.0, positive=False):
    t = torch.randn(shape, generator=gen, dtype=torch.float64)
    if positive:
        t = t.abs()
    if zero_frac > 0:
        t[torch.rand(shape, generator=gen, dtype=torch.float64) < zero_frac] = 0
    return t


def _clamp_to(ref, dtype):
    if dtype in (torch.float16, torch.bfloat16):
        m = torch.finfo(dtype).max
        return ref.clamp(-m, m)
    return ref


def _assert_within(out, ref, bound, what):
    out64 = out.detach().double().cpu()
    assert out64.shape == ref.shape, f"{what}: shape {tuple(out64.shape)} vs {tuple(ref.shape)}"
    assert torch.isfinite(out64).all(), f"{what}: non-finite output"
    err = (out64 - ref).abs()
    bad = err > bound
    if bad.any():
        i = int(torch.argmax((err - bound).flatten()))
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{err.numel()} elements out of tolerance; worst at flat "
            f"index {i}: out {out64.flatten()[i].item():.9g}, ref {ref.flatten()[i].item():.9g}, "
            f"allowed {bound.flatten()[i].item():.3g}; max err {err.max().item():.3g}, "
            f"max |ref| {ref.abs().max().item():.3g}")


# ------------------------------------------------------------------------------------------
# float64 references (transcriptions of shared/TSGB_SPEC.md, batched targets b -> b % N)

def _cpu64(*ts):
    return tuple(t.detach().double().cpu() for t in ts)


def ref_conv2d_backward(grad, x, y, ks, stride, padding, dilation, groups, eps=EPS):
    """The oracle of tests/reference.py (unfold-based, per output channel)."""
    return ref.conv_rule(*_cpu64(grad, x, y), tuple(ks), tuple(stride), tuple(padding),
                         tuple(dilation), groups, eps)


def ref_batch_norm_backward(grad, x, scale, shift, eps):
    """tests/reference.py's BN rule on y = x * scale + shift, and the error scale ``mag``."""
    g, xd, sc, sh = _cpu64(grad, x, scale, shift)
    sc, sh = sc.view(1, -1, 1, 1), sh.view(1, -1, 1, 1)
    want = ref.bn_rule(g, xd, xd * sc + sh, eps)
    xr = ref._tile(xd, g.shape[0])
    mag = g.abs() * ((xr * sc).abs() + sh.abs()) / (xr + eps).abs()
    return want, mag


def ref_avg_pool2d_backward(grad, x, y, ks, stride, padding, ceil_mode, cip, divisor, eps=EPS):
    """tests/reference.py's AvgPool rule, and the error scale ``mag``."""
    g, xd, yd = _cpu64(grad, x, y)
    want = ref.avgpool_rule(g, xd, yd, ks, stride, padding, ceil_mode, cip, divisor, eps)
    xr, yr = ref._tile(xd, g.shape[0]), ref._tile(yd, g.shape[0])
    bw = torch.ops.aten.avg_pool2d_backward
    mag = bw((g * yr).abs(), xr, ks, stride, padding, ceil_mode, cip, divisor) / (xr + eps).abs()
    return want, mag


def ref_linear_backward(grad, x, wpos, wneg, eps=EPS):
    """tests/reference.py's classifier rule (W = W+ + W-), and the error scale ``mag``."""
    g, xd, wp, wn = _cpu64(grad, x, wpos, wneg)
    want = ref.fc_rule(g, xd, wp + wn, eps)
    xr = ref._tile(xd, g.shape[0])
    zp, zn = xr @ wp.t(), (xr @ wn.t()).abs()
    beta = torch.where(zn > eps, zp / torch.where(zn > eps, zn, torch.ones_like(zn)),
                       torch.zeros_like(zn))
    mag = g.abs() @ wp.abs() + (g * beta).abs() @ wn.abs()
    return want, mag


# ------------------------------------------------------------------------------------------
# conv2d_backward

def _conv_configs():
    rng = random.Random(1234)
    cfgs = [
        # (N, T, C, K, H, W, ks, stride, padding, dilation, groups)
        (2, 3, 3, 8, 17, 15, (7, 7), (2, 2), (3, 3), (1, 1), 1),       # ResNet stem-like
        (1, 1, 16, 24, 9, 9, (1, 1), (1, 1), (0, 0), (1, 1), 1),       # 1x1
        (2, 1, 32, 32, 11, 13, (3, 3), (2, 2), (1, 1), (1, 1), 32),    # depthwise stride 2
        (1, 3, 12, 12, 9, 7, (5, 5), (1, 1), (2, 2), (1, 1), 12),      # depthwise 5x5
        (2, 1, 256, 64, 7, 7, (3, 3), (1, 1), (1, 1), (1, 1), 4),      # wide groups (warp lanes)
        (1, 1, 300, 40, 5, 5, (3, 3), (1, 1), (1, 1), (1, 1), 1),      # many channels, tiny map
        (1, 3, 6, 9, 13, 11, (3, 2), (1, 2), (2, 1), (2, 3), 3),       # dilation, asymmetric
        (3, 1, 4, 10, 8, 9, (2, 2), (2, 2), (0, 0), (1, 1), 2),        # even kernel stride 2
        (1, 1, 5, 7, 7, 7, (7, 7), (1, 1), (0, 0), (1, 1), 1),         # window == image
        (1, 3, 2, 2, 15, 15, (1, 1), (3, 3), (0, 0), (1, 1), 2),       # strided 1x1 (gaps)
    ]
    while len(cfgs) < 40:
        G = rng.choice([1, 1, 2, 3, 4, "dw"])
        cin = rng.randint(1, 6)
        if G == "dw":
            C = rng.randint(2, 20)
            G, K = C, C * rng.choice([1, 2])
        else:
            C, K = G * cin, G * rng.randint(1, 6)
        kh, kw = rng.randint(1, 7), rng.randint(1, 7)
        sh, sw = rng.randint(1, 3), rng.randint(1, 3)
        dh, dw = rng.randint(1, 2), rng.randint(1, 2)
        ph, pw = rng.randint(0, (kh - 1) * dh), rng.randint(0, (kw - 1) * dw)
        H, W = rng.randint(3, 19), rng.randint(3, 19)
        if H + 2 * ph < dh * (kh - 1) + 1 or W + 2 * pw < dw * (kw - 1) + 1:
            continue
        N, T = rng.choice([1, 2, 3]), rng.choice([1, 3])
        cfgs.append((N, T, C, K, H, W, (kh, kw), (sh, sw), (ph, pw), (dh, dw), G))
    # depthwise maps larger than one tile of the CUDA one-kernel depthwise rule (NCHW tiles
    # are up to 32 wide, channels_last 8x8 by up to 32 channels): tile edges in both
    # directions, a partial channel chunk, a channel multiplier, and a dilation so large that
    # the CUDA rule falls back to the general kernels
    cfgs += [
        (2, 2, 24, 24, 40, 70, (3, 3), (1, 1), (1, 1), (1, 1), 24),
        (1, 1, 8, 8, 37, 45, (5, 5), (2, 2), (2, 2), (1, 1), 8),
        (1, 2, 40, 40, 33, 35, (3, 3), (1, 1), (2, 2), (2, 2), 40),
        (2, 1, 6, 12, 21, 40, (3, 3), (2, 1), (1, 1), (1, 1), 6),
        (1, 1, 4, 4, 20, 20, (3, 3), (1, 1), (12, 12), (12, 12), 4),
    ]
    return cfgs


CONV_CFGS = _conv_configs()


def _conv_inputs(cfg, dtype, layout, seed):
    N, T, C, K, H, W, ks, stride, padding, dilation, G = cfg
    gen = torch.Generator().manual_seed(seed)
    Ho = (H + 2 * padding[0] - dilation[0] * (ks[0] - 1) - 1) // stride[0] + 1
    Wo = (W + 2 * padding[1] - dilation[1] * (ks[1] - 1) - 1) // stride[1] + 1
    x = _rand((N, C, H, W), gen, zero_frac=0.25)
    y = _rand((N, K, Ho, Wo), gen)
    g = _rand((N * T, K, Ho, Wo), gen)
    dev = DEV
    x, y, g = (_layout(t.to(dev, dtype), layout) for t in (x, y, g))
    return g, x, y


def _check_conv(cfg, dtype, layout, seed=0):
    N, T, C, K, H, W, ks, stride, padding, dilation, G = cfg
    g, x, y = _conv_inputs(cfg, dtype, layout, seed)
    out = ops().conv2d_backward(g, x, y, list(ks), list(stride), list(padding), list(dilation),
                                G, EPS)
    assert out.dtype == dtype and out.device == x.device
    assert out.is_contiguous(memory_format=_expected_format(x))
    ref = _clamp_to(ref_conv2d_backward(g, x, y, ks, stride, padding, dilation, G), dtype)
    rtol = RTOL[dtype]
    bound = rtol * ref.abs() + rtol * ref.abs().max().clamp_min(1e-30)
    _assert_within(out, ref, bound, f"conv2d_backward {cfg} {dtype} {layout}")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("cfg", CONV_CFGS, ids=lambda c: "N%dT%d_C%dK%d_%dx%d_k%s_s%s_p%s_d%s_g%d" % (
    c[0], c[1], c[2], c[3], c[4], c[5], *["%dx%d" % v for v in c[6:10]], c[10]))
def test_conv2d_backward_fp32(cfg, layout):
    _check_conv(cfg, torch.float32, layout)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("idx", list(range(0, len(CONV_CFGS), 3)))
def test_conv2d_backward_dtypes(idx, dtype, layout):
    _check_conv(CONV_CFGS[idx], dtype, layout, seed=idx + 1)


def _cpu_isas():
    """The instruction sets this CPU and build run the CPU conv kernels with (csrc/cpu/cpu_isa.h)."""
    if _IMPORT_ERROR is not None or not tsgb_ext.native_available():
        return ["default"]
    found, before = [], torch.ops.tsgb_ext.cpu_isa()
    for isa in ("default", "avx2", "avx512"):
        try:
            torch.ops.tsgb_ext.cpu_isa(isa)
            found.append(isa)
        except RuntimeError:
            pass
    torch.ops.tsgb_ext.cpu_isa(before)
    return found


@pytest.mark.parametrize("isa", _cpu_isas())
def test_conv_rules_every_cpu_isa(isa):
    """The CPU conv kernels are compiled once per instruction set (baseline, AVX2, AVX-512) and
    the widest the CPU has is used: every copy this machine can run is checked here, on every
    configuration, both layouts, all dtypes and the fused BN + activation rule."""
    if DEV != "cpu":
        pytest.skip("CPU kernels")
    before = torch.ops.tsgb_ext.cpu_isa(isa)
    try:
        assert torch.ops.tsgb_ext.cpu_isa() == isa
        for i, cfg in enumerate(CONV_CFGS):
            for layout in ("contiguous", "channels_last"):
                _check_conv(cfg, torch.float32, layout, seed=i)
                if i % 3 == 0:
                    for dt in (torch.float16, torch.bfloat16, torch.float64):
                        _check_conv(cfg, dt, layout, seed=i + 1)
                if i % 4 == 0:
                    test_conv2d_bn_backward(i, torch.float32, layout, i % 3)
    finally:
        torch.ops.tsgb_ext.cpu_isa(before)


def test_cpu_isa_choice_errors():
    if DEV != "cpu":
        pytest.skip("CPU kernels")
    with pytest.raises(RuntimeError, match="expected one of"):
        torch.ops.tsgb_ext.cpu_isa("sse9")
    before = torch.ops.tsgb_ext.cpu_isa("auto")  # the widest this CPU runs
    try:
        assert torch.ops.tsgb_ext.cpu_isa() == _cpu_isas()[-1]
    finally:
        torch.ops.tsgb_ext.cpu_isa(before)


_ISA_CHILD = """
import json, warnings
import torch
with warnings.catch_warnings(record=True) as seen:
    warnings.simplefilter("always")
    import tsgb_ext
    x = torch.randn(1, 2, 6, 6)
    y = torch.nn.functional.conv2d(x, torch.randn(3, 2, 3, 3))
    torch.ops.tsgb_ext.conv2d_backward(torch.randn_like(y), x, y, [3, 3], [1, 1], [0, 0],
                                       [1, 1], 1, 1e-10)  # a kernel run: the ISA is chosen
    active = torch.ops.tsgb_ext.cpu_isa()
print(json.dumps({"active": active, "warnings": [[w.category.__name__, str(w.message)]
                                                  for w in seen if "TSGB_CPU_ISA" in str(w.message)]}))
"""


def test_cpu_isa_env_bad_value_is_one_python_warning():
    """TSGB_CPU_ISA=garbage: one Python RuntimeWarning naming the variable, the value and the
    accepted values, the best instruction set runs, and nothing is printed on stderr."""
    if DEV != "cpu":
        pytest.skip("CPU kernels")
    import json
    import subprocess
    import sys
    env = dict(os.environ, TSGB_CPU_ISA="garbage")
    root = os.path.dirname(os.path.dirname(os.path.abspath(tsgb_ext.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, os.path.join(root, "python"),
                                         env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", _ISA_CHILD], env=env, capture_output=True,
                          text=True, timeout=300, cwd=root)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(out["warnings"]) == 1, out
    category, message = out["warnings"][0]
    assert category == "RuntimeWarning"
    for part in ("TSGB_CPU_ISA", "'garbage'", "'auto'", "'default'", "'avx2'", "'avx512'"):
        assert part in message, message
    assert out["active"] == _cpu_isas()[-1]  # ignored: the widest this CPU runs

def test_conv2d_backward_mixed_layouts():
    # x channels_last, grad and y NCHW (and the reverse): the result follows x
    cfg = CONV_CFGS[0]
    g, x, y = _conv_inputs(cfg, torch.float32, "contiguous", 7)
    N, T, C, K, H, W, ks, stride, padding, dilation, G = cfg
    ref = ref_conv2d_backward(g, x, y, ks, stride, padding, dilation, G)
    for xl, gl in (("channels_last", "contiguous"), ("contiguous", "channels_last")):
        xx, gg, yy = _layout(x, xl), _layout(g, gl), _layout(y, gl)
        out = ops().conv2d_backward(gg, xx, yy, list(ks), list(stride), list(padding),
                                    list(dilation), G, EPS)
        assert out.is_contiguous(memory_format=_expected_format(xx))
        _assert_within(out, ref, 1e-5 * ref.abs() + 1e-5 * ref.abs().max(), f"mixed {xl}/{gl}")


def test_conv2d_backward_empty():
    x = torch.randn(0, 3, 8, 8, device=DEV)
    y = torch.randn(0, 4, 8, 8, device=DEV)
    g = torch.randn(0, 4, 8, 8, device=DEV)
    out = ops().conv2d_backward(g, x, y, [3, 3], [1, 1], [1, 1], [1, 1], 1, EPS)
    assert out.shape == (0, 3, 8, 8)


def test_conv2d_backward_errors():
    x = torch.randn(2, 4, 8, 8, device=DEV)
    y = torch.randn(2, 6, 8, 8, device=DEV)
    g = torch.randn(2, 6, 8, 8, device=DEV)
    op = ops().conv2d_backward
    with pytest.raises(RuntimeError, match="multiple"):
        op(g[:1].repeat(3, 1, 1, 1)[:3], x, y, [3, 3], [1, 1], [1, 1], [1, 1], 1, EPS)
    with pytest.raises(RuntimeError, match="y must have shape"):
        op(g, x, y[:, :, :7], [3, 3], [1, 1], [1, 1], [1, 1], 1, EPS)
    with pytest.raises(RuntimeError, match="divisible"):
        op(g, x, y, [3, 3], [1, 1], [1, 1], [1, 1], 4, EPS)
    if DEV == "cuda":
        with pytest.raises(RuntimeError, match="grad must"):
            op(g.cpu(), x, y, [3, 3], [1, 1], [1, 1], [1, 1], 1, EPS)
    with pytest.raises(RuntimeError, match="dtype"):
        op(g.half(), x, y, [3, 3], [1, 1], [1, 1], [1, 1], 1, EPS)
    with pytest.raises(RuntimeError, match="4-D"):
        op(g, x[0], y, [3, 3], [1, 1], [1, 1], [1, 1], 1, EPS)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_conv2d_backward_cuda_graph(layout):
    cuda_only()
    cfg = (2, 3, 8, 12, 13, 11, (3, 3), (2, 2), (1, 1), (1, 1), 2)
    N, T, C, K, H, W, ks, stride, padding, dilation, G = cfg
    g, x, y = _conv_inputs(cfg, torch.float32, layout, 11)
    args = (list(ks), list(stride), list(padding), list(dilation), G, EPS)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            ops().conv2d_backward(g, x, y, *args)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_static = ops().conv2d_backward(g, x, y, *args)
    for seed in (12, 13):
        g2, x2, y2 = _conv_inputs(cfg, torch.float32, layout, seed)
        g.copy_(g2)
        x.copy_(x2)
        y.copy_(y2)
        graph.replay()
        torch.cuda.synchronize()
        eager = ops().conv2d_backward(g, x, y, *args)
        assert torch.equal(out_static, eager)
        ref = ref_conv2d_backward(g, x, y, ks, stride, padding, dilation, G)
        _assert_within(out_static, ref, 1e-5 * ref.abs() + 1e-5 * ref.abs().max(), "graph")


# ------------------------------------------------------------------------------------------
# conv2d_bn_backward: the conv rule with a BatchNorm (eval) and ReLU / ReLU6 folded in

def ref_fold_factor(y, scale, shift, act):
    """m(yb) * yb / (y + 1e-10): what the folded rules multiply the block's gradient by,
    before the conv rule multiplies by y (float64). The BN's own eps is inside scale only.
    The mask m tests yb rounded to y's dtype (what the forward's activation saw); the product
    keeps the unrounded yb."""
    yd = y.double().cpu()
    yb = yd * scale.double().cpu().view(1, -1, 1, 1) + shift.double().cpu().view(1, -1, 1, 1)
    seen = yb.to(y.dtype).double()
    mask = {0: torch.ones_like(yb, dtype=torch.bool), 1: seen > 0,
            2: (seen > 0) & (seen < 6)}[act]
    return torch.where(mask, yb, torch.zeros_like(yb)) / (yd + EPS)


@pytest.mark.parametrize("act", [0, 1, 2])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("idx", list(range(0, len(CONV_CFGS), 4)))
def test_conv2d_bn_backward(idx, dtype, layout, act):
    cfg = CONV_CFGS[idx]
    N, T, C, K, H, W, ks, stride, padding, dilation, G = cfg
    g, x, y = _conv_inputs(cfg, dtype, layout, idx + 100)
    gen = torch.Generator().manual_seed(idx)
    pd = torch.float64 if dtype == torch.float64 else torch.float32
    rm = torch.randn(K, generator=gen, dtype=torch.float64)
    rv = torch.rand(K, generator=gen, dtype=torch.float64) + 0.1
    bw = torch.randn(K, generator=gen, dtype=torch.float64) * 2
    bb = torch.randn(K, generator=gen, dtype=torch.float64) * 2
    rm, rv, bw, bb = (t.to(pd).to(DEV) for t in (rm, rv, bw, bb))
    bn_eps = 1e-3
    wb = (bw, bb) if idx % 8 else (None, None)  # some configs: BatchNorm2d(affine=False)
    out = ops().conv2d_bn_backward(g, x, y, rm, rv, *wb, bn_eps, act, list(ks), list(stride),
                                   list(padding), list(dilation), G, EPS)
    scale = torch.rsqrt(rv.double().cpu() + bn_eps)
    if wb[0] is not None:
        scale = scale * bw.double().cpu()
    shift = -rm.double().cpu() * scale + (bb.double().cpu() if wb[1] is not None else 0)
    assert out.dtype == dtype and out.is_contiguous(memory_format=_expected_format(x))
    f = ref_fold_factor(y, scale, shift, act).repeat(T, 1, 1, 1)
    ref = _clamp_to(ref_conv2d_backward(g.double().cpu() * f, x, y, ks, stride, padding,
                                        dilation, G), dtype)
    rtol = RTOL[dtype] * (4 if dtype != torch.float64 else 1)  # one more rounded product
    bound = rtol * ref.abs() + rtol * ref.abs().max().clamp_min(1e-30)
    _assert_within(out, ref, bound, f"conv2d_bn_backward act={act} {cfg} {dtype} {layout}")


def test_conv2d_bn_act_autograd_and_cuda_graph():
    """The fused forward op's autograd (C++) equals the unfused ops' autograd, and (CUDA) the
    backward replays under CUDA-graph capture."""
    gen = torch.Generator().manual_seed(3)
    x = _rand((2, 6, 15, 13), gen).to(DEV).requires_grad_(True)
    w, b = _rand((8, 3, 3, 3), gen).float().to(DEV), _rand((8,), gen).float().to(DEV)
    rm, rv = _rand((8,), gen).float().to(DEV), _rand((8,), gen, positive=True).float().to(DEV) + 0.5
    bw, bb = _rand((8,), gen).float().to(DEV), _rand((8,), gen).float().to(DEV)
    x32 = x.detach().float().requires_grad_(True)
    for act, fn in ((0, lambda t: t), (1, F.relu), (2, F.relu6)):
        out, y = ops().conv2d_bn_act(x32, w, b, [2, 1], [1, 1], [1, 2], 2, rm, rv, bw, bb, 1e-3, act)
        yc = F.conv2d(x32, w, b, [2, 1], [1, 1], [1, 2], 2)
        assert torch.equal(out, fn(F.batch_norm(yc, rm, rv, bw, bb, False, 0.0, 1e-3)))
        g = torch.randn_like(out)
        (gx,) = torch.autograd.grad(out, x32, g)
        yu = ops().conv2d(x32, w, b, [2, 1], [1, 1], [1, 2], 2)
        zu = fn(ops().batch_norm(yu, rm, rv, bw, bb, 1e-3))
        (gu,) = torch.autograd.grad(zu, x32, g)
        rel = ((gx - gu).norm() / gu.norm()).item()
        assert rel < 1e-5, (act, rel)
    if DEV != "cuda":
        return
    # capture the fused backward op in a CUDA graph
    yd = y.detach()
    bn = (rm, rv, bw, bb, 1e-3, 1)
    args = ([3, 3], [2, 1], [1, 1], [1, 2], 2, EPS)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            ops().conv2d_bn_backward(g, x32.detach(), yd, *bn, *args)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = ops().conv2d_bn_backward(g, x32.detach(), yd, *bn, *args)
    g.normal_()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static, ops().conv2d_bn_backward(g, x32.detach(), yd, *bn, *args))


# ------------------------------------------------------------------------------------------
# batch_norm_backward

BN_SHAPES = [(2, 3, 16, 16, 1), (1, 8, 7, 9, 3), (3, 5, 5, 5, 1), (2, 64, 14, 14, 3),
             (1, 1, 1, 1, 1), (2, 24, 1, 1, 3), (1, 17, 33, 3, 1)]


def _bn_inputs(shape, dtype, layout, seed, zero_frac=0.0):
    N, C, H, W, T = shape
    gen = torch.Generator().manual_seed(seed)
    x = _rand((N, C, H, W), gen, zero_frac=zero_frac)
    g = _rand((N * T, C, H, W), gen)
    scale = (torch.rand(C, generator=gen, dtype=torch.float64) + 0.5).float().to(DEV)
    shift = (torch.randn(C, generator=gen, dtype=torch.float64) * 0.1).float().to(DEV)
    x, g = (_layout(t.to(DEV, dtype), layout) for t in (x, g))
    return g, x, scale, shift


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("shape", BN_SHAPES, ids=str)
def test_batch_norm_backward(shape, dtype, layout):
    bn_eps = 1e-5
    g, x, scale, shift = _bn_inputs(shape, dtype, layout, seed=sum(shape))
    out = ops().batch_norm_backward(g, x, scale, shift, bn_eps)
    assert out.dtype == dtype and out.is_contiguous(memory_format=_expected_format(x))
    ref, mag = ref_batch_norm_backward(g, x, scale, shift, bn_eps)
    ref = _clamp_to(ref, dtype)
    _assert_within(out, ref, RTOL[dtype] * mag + 1e-30, f"batch_norm_backward {shape} {dtype} {layout}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_batch_norm_backward_zero_x_finite(dtype, layout):
    # x exactly 0 (post-ReLU): 1/(x+eps) = 1e5 overflows nothing in fp32, and the product is
    # formed before the cast: the result must be finite (saturated where beyond fp16's range)
    g, x, scale, shift = _bn_inputs((2, 16, 9, 9, 3), dtype, layout, seed=5, zero_frac=0.5)
    shift = shift * 10  # make g*shift/eps exceed fp16's range for some entries
    out = ops().batch_norm_backward(g, x, scale, shift, 1e-5)
    assert torch.isfinite(out).all()
    ref, mag = ref_batch_norm_backward(g, x, scale, shift, 1e-5)
    _assert_within(out, _clamp_to(ref, dtype), RTOL[dtype] * mag + 1e-30, "bn zero x")


def test_batch_norm_backward_errors():
    x = torch.randn(2, 4, 5, 5, device=DEV)
    g = torch.randn(2, 4, 5, 5, device=DEV)
    sc = torch.ones(4, device=DEV)
    op = ops().batch_norm_backward
    with pytest.raises(RuntimeError, match="scale"):
        op(g, x, torch.ones(3, device=DEV), sc, 1e-5)
    with pytest.raises(RuntimeError, match="multiple"):
        op(g[:1].expand(3, -1, -1, -1), x, sc, sc, 1e-5)
    with pytest.raises(RuntimeError, match="grad must have shape"):
        op(g[:, :3], x, sc, sc, 1e-5)


# ------------------------------------------------------------------------------------------
# avg_pool2d_backward

def _pool_configs():
    rng = random.Random(99)
    cfgs = [
        # (N, T, C, H, W, ks, stride, padding, ceil_mode, count_include_pad, divisor)
        (2, 3, 4, 8, 8, (2, 2), (2, 2), (0, 0), False, True, None),
        (1, 1, 3, 7, 7, (3, 3), (2, 2), (1, 1), True, False, None),
        (1, 3, 5, 9, 11, (3, 3), (1, 1), (1, 1), False, True, 4),
        (2, 1, 16, 7, 7, (7, 7), (1, 1), (0, 0), False, True, None),   # global-like pool
        (1, 1, 2, 10, 6, (3, 2), (3, 3), (1, 1), True, True, None),
    ]
    while len(cfgs) < 30:
        kh, kw = rng.randint(1, 6), rng.randint(1, 6)
        sh, sw = rng.randint(1, 3), rng.randint(1, 3)
        ph, pw = rng.randint(0, kh // 2), rng.randint(0, kw // 2)
        H, W = rng.randint(max(1, kh - 2 * ph), 15), rng.randint(max(1, kw - 2 * pw), 15)
        cfgs.append((rng.choice([1, 2]), rng.choice([1, 3]), rng.randint(1, 9), H, W, (kh, kw),
                     (sh, sw), (ph, pw), rng.random() < 0.5, rng.random() < 0.5,
                     rng.choice([None, None, 3])))
    return cfgs


POOL_CFGS = _pool_configs()


def _check_pool(cfg, dtype, layout, seed):
    N, T, C, H, W, ks, stride, padding, ceil_mode, cip, divisor = cfg
    gen = torch.Generator().manual_seed(seed)
    x = _rand((N, C, H, W), gen, zero_frac=0.1)
    yshape = F.avg_pool2d(x, ks, stride, padding, ceil_mode, cip, divisor).shape
    y = _rand(tuple(yshape), gen)
    g = _rand((N * T,) + tuple(yshape[1:]), gen)
    x, y, g = (_layout(t.to(DEV, dtype), layout) for t in (x, y, g))
    out = ops().avg_pool2d_backward(g, x, y, list(ks), list(stride), list(padding), ceil_mode,
                                    cip, divisor, EPS)
    assert out.dtype == dtype and out.is_contiguous(memory_format=_expected_format(x))
    ref, mag = ref_avg_pool2d_backward(g, x, y, list(ks), list(stride), list(padding), ceil_mode,
                                       cip, divisor)
    _assert_within(out, _clamp_to(ref, dtype), RTOL[dtype] * mag + 1e-30,
                   f"avg_pool2d_backward {cfg} {dtype} {layout}")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("cfg", POOL_CFGS, ids=str)
def test_avg_pool2d_backward_fp32(cfg, layout):
    _check_pool(cfg, torch.float32, layout, seed=1)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("idx", list(range(0, len(POOL_CFGS), 3)))
def test_avg_pool2d_backward_dtypes(idx, dtype, layout):
    _check_pool(POOL_CFGS[idx], dtype, layout, seed=idx + 2)


def test_avg_pool2d_backward_errors():
    x = torch.randn(2, 4, 8, 8, device=DEV)
    y = torch.randn(2, 4, 4, 4, device=DEV)
    op = ops().avg_pool2d_backward
    with pytest.raises(RuntimeError, match="y must have shape"):
        op(y, x, y[:, :, :3], [2, 2], [2, 2], [0, 0], False, True, None, EPS)
    with pytest.raises(RuntimeError, match="padding"):
        op(y, x, y, [2, 2], [2, 2], [2, 2], False, True, None, EPS)
    with pytest.raises(RuntimeError, match="multiple"):
        op(y[:1].expand(3, -1, -1, -1), x, y, [2, 2], [2, 2], [0, 0], False, True, None, EPS)


# ------------------------------------------------------------------------------------------
# linear_backward

LIN_SHAPES = [(1, 1, 10, 7), (2, 3, 64, 10), (4, 1, 512, 100), (3, 3, 33, 1000), (1, 5, 2048, 17)]


def _lin_inputs(shape, dtype, seed, zero_rows=False):
    N, T, n_in, n_out = shape
    gen = torch.Generator().manual_seed(seed)
    x = _rand((N, n_in), gen, zero_frac=0.3, positive=True)  # post-ReLU features
    if zero_rows:
        x[0] = 0
    w = _rand((n_out, n_in), gen) / n_in ** 0.5
    g = _rand((N * T, n_out), gen)
    x, w, g = (t.to(DEV, dtype) for t in (x, w, g))
    return g, x, w.clamp(min=0), w.clamp(max=0)


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("shape", LIN_SHAPES, ids=str)
def test_linear_backward(shape, dtype):
    g, x, wp, wn = _lin_inputs(shape, dtype, seed=shape[2])
    out = ops().linear_backward(g, x, wp, wn, EPS)
    assert out.dtype == dtype and out.shape == (g.shape[0], x.shape[1])
    ref, mag = ref_linear_backward(g, x, wp, wn)
    _assert_within(out, _clamp_to(ref, dtype), RTOL[dtype] * mag + 1e-30,
                   f"linear_backward {shape} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_backward_zero_input_is_finite(dtype):
    # |zn| = 0 for an all-zero row: beta is defined as 0 there, never NaN / inf
    g, x, wp, wn = _lin_inputs((3, 2, 40, 12), dtype, seed=3, zero_rows=True)
    out = ops().linear_backward(g, x, wp, wn, EPS)
    assert torch.isfinite(out).all()
    ref, mag = ref_linear_backward(g, x, wp, wn)
    _assert_within(out, ref, RTOL[dtype] * mag + 1e-30, "linear zero row")
    # non-contiguous inputs
    out2 = ops().linear_backward(g.t().contiguous().t(), x, wp.t().contiguous().t(), wn, EPS)
    _assert_within(out2, ref, RTOL[dtype] * mag + 1e-30, "linear noncontiguous")


def test_linear_backward_errors():
    x = torch.randn(2, 8, device=DEV)
    w = torch.randn(5, 8, device=DEV)
    g = torch.randn(2, 5, device=DEV)
    op = ops().linear_backward
    with pytest.raises(RuntimeError, match="weight_pos"):
        op(g, x, w[:, :7], w, EPS)
    with pytest.raises(RuntimeError, match="multiple"):
        op(g[:1].expand(3, -1), x, w, w, EPS)
    with pytest.raises(RuntimeError, match="grad must have shape"):
        op(g[:, :4], x, w, w, EPS)


# ------------------------------------------------------------------------------------------
# every op is capturable (no host syncs)

def test_all_ops_cuda_graph():
    cuda_only()
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8, device=DEV)
    g = torch.randn(6, 4, 8, 8, device=DEV)
    y = torch.randn(2, 4, 4, 4, device=DEV)
    gp = torch.randn(6, 4, 4, 4, device=DEV)
    sc, sh = torch.rand(4, device=DEV) + 0.5, torch.randn(4, device=DEV)
    xl = torch.rand(2, 16, device=DEV)
    w = torch.randn(5, 16, device=DEV)
    gl = torch.randn(6, 5, device=DEV)

    def run():
        return (ops().batch_norm_backward(g, x, sc, sh, 1e-5),
                ops().avg_pool2d_backward(gp, x, y, [2, 2], [2, 2], [0, 0], False, True, None, EPS),
                ops().linear_backward(gl, xl, w.clamp(min=0), w.clamp(max=0), EPS))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = run()
    x.mul_(1.5)
    gl.mul_(-2.0)
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(static, run()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


# ------------------------------------------------------------------------------------------
# max_pool2d (ordinary gradient; the native backend's MaxPool2d): equal to torch's, bit for bit

def _max_pool_configs():
    rng = random.Random(77)
    cfgs = [
        # (N, C, H, W, kernel, stride, padding, dilation, ceil_mode)
        (2, 5, 14, 14, (3, 3), (2, 2), (1, 1), (1, 1), False),   # ResNet stem
        (2, 6, 12, 12, (2, 2), (2, 2), (0, 0), (1, 1), False),   # VGG (tiled)
        (1, 3, 13, 11, (2, 2), (2, 2), (0, 0), (1, 1), False),   # tiled, uncovered edge
        (1, 3, 13, 11, (2, 2), (2, 2), (0, 0), (1, 1), True),    # tiled, partial windows
        (2, 4, 9, 9, (3, 3), (2, 2), (0, 0), (1, 1), True),      # GoogLeNet ceil_mode
        (1, 2, 10, 9, (3, 2), (1, 2), (1, 1), (2, 1), True),     # dilation, asymmetric
        (1, 70, 7, 5, (3, 3), (1, 1), (1, 1), (1, 1), False),    # stride 1 (overlap)
    ]
    while len(cfgs) < 28:
        k = (rng.randint(1, 4), rng.randint(1, 4))
        s = (rng.randint(1, 4), rng.randint(1, 4))
        p = (rng.randint(0, k[0] // 2), rng.randint(0, k[1] // 2))
        d = (rng.randint(1, 2), rng.randint(1, 2))
        H, W = rng.randint(3, 17), rng.randint(3, 17)
        if H + 2 * p[0] < d[0] * (k[0] - 1) + 1 or W + 2 * p[1] < d[1] * (k[1] - 1) + 1:
            continue
        cfgs.append((rng.randint(1, 3), rng.randint(1, 70), H, W, k, s, p, d, rng.random() < 0.5))
    return cfgs


MAX_POOL_CFGS = _max_pool_configs()


def _pool_input(cfg, dtype, layout, seed):
    """Small integers (many ties, +-0 among them), one NaN and one -inf in some samples."""
    N, C, H, W = cfg[:4]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(-3, 4, (N, C, H, W), generator=gen).double()
    x[torch.rand(x.shape, generator=gen) < 0.2] = -0.0
    if seed % 3 == 0:
        x.view(-1)[int(torch.randint(x.numel(), (1,), generator=gen))] = float("nan")
        x.view(-1)[int(torch.randint(x.numel(), (1,), generator=gen))] = float("-inf")
    return _layout(x.to(DEV, dtype), layout), gen


def _bits_equal(a, b):
    """Same values, NaN where the other has NaN, and the same sign on zeros."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    nan_a, nan_b = a.isnan(), b.isnan()
    return (torch.equal(nan_a, nan_b) and torch.equal(a[~nan_a], b[~nan_b])
            and torch.equal(a[~nan_a].signbit(), b[~nan_b].signbit()))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("idx", range(len(MAX_POOL_CFGS)))
def test_max_pool2d_equals_torch(idx, dtype, layout):
    cfg = MAX_POOL_CFGS[idx]
    k, s, p, d, ceil = cfg[4:]
    x, gen = _pool_input(cfg, dtype, layout, idx)
    args = (list(k), list(s), list(p), list(d), ceil)
    want = F.max_pool2d(x, k, s, p, d, ceil_mode=ceil)
    y = ops().max_pool2d(x, *args)
    assert _bits_equal(y, want), f"max_pool2d {cfg} {dtype} {layout}"
    assert y.is_contiguous(memory_format=_expected_format(x)) or y.shape[2] * y.shape[3] == 1
    g = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(DEV, dtype)
    g[torch.rand(y.shape, generator=gen) < 0.1] = -0.0
    xr = x.detach().clone().requires_grad_(True)
    (gx_want,) = torch.autograd.grad(F.max_pool2d(xr, k, s, p, d, ceil_mode=ceil), xr, g)
    gx = ops().max_pool2d_backward(g, x, y, *args)
    assert _bits_equal(gx, gx_want), f"max_pool2d_backward {cfg} {dtype} {layout}"
    # through the op's autograd
    (gx_op,) = torch.autograd.grad(ops().max_pool2d(xr, *args), xr, g)
    assert _bits_equal(gx_op, gx_want)


def test_max_pool2d_errors():
    """The shared checks (common/checks.h) on every device: torch's own max_pool2d would take
    a 3-D x and word its messages differently."""
    x = torch.randn(2, 3, 8, 8, device=DEV)
    args = ([2, 2], [2, 2], [0, 0], [1, 1], False)
    with pytest.raises(RuntimeError, match="tsgb_ext.max_pool2d: kernel_size must be positive"):
        ops().max_pool2d(x, [0, 2], [2, 2], [0, 0], [1, 1], False)
    with pytest.raises(RuntimeError, match="tsgb_ext.max_pool2d: padding must be at most half"):
        ops().max_pool2d(x, [2, 2], [2, 2], [2, 0], [1, 1], False)
    with pytest.raises(RuntimeError, match=r"tsgb_ext.max_pool2d: x must be 4-D \(N, C, H, W\)"):
        ops().max_pool2d(x[0], *args)
    with pytest.raises(RuntimeError, match="tsgb_ext.max_pool2d: x must be a floating tensor"):
        ops().max_pool2d(x.long(), *args)
    with pytest.raises(RuntimeError, match="tsgb_ext.max_pool2d: the window .* does not fit"):
        ops().max_pool2d(x[:, :, :1], [3, 3], [1, 1], [0, 0], [1, 1], False)
    y = ops().max_pool2d(x, *args)
    bwd = ops().max_pool2d_backward
    with pytest.raises(RuntimeError, match="grad must have y's shape"):
        bwd(y[:, :2], x, y, *args)
    with pytest.raises(RuntimeError, match="tsgb_ext.max_pool2d_backward: grad must be 4-D"):
        bwd(y[0], x, y, *args)
    with pytest.raises(RuntimeError, match="tsgb_ext.max_pool2d_backward: x must be 4-D"):
        bwd(y, x[0], y, *args)
    with pytest.raises(RuntimeError, match="tsgb_ext.max_pool2d_backward: y must have shape"):
        bwd(y[:, :, :3], x, y[:, :, :3], *args)
    with pytest.raises(RuntimeError, match="tsgb_ext.max_pool2d_backward: y must have dtype"):
        bwd(y, x, y.double(), *args)


def test_max_pool2d_backward_uses_saved_y():
    """The backward finds each window's tap from x and the y it is given (the op keeps no
    indices): a y naming another tap of its window sends that output's gradient there."""
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).reshape(2, 3, 6, 6)
    x = x[..., torch.randperm(6)].contiguous().to(DEV)  # distinct values, maxima not in a corner
    args = ([3, 3], [2, 2], [1, 1], [1, 1], False)
    y = ops().max_pool2d(x, *args)
    g = torch.ones_like(y)
    gx = ops().max_pool2d_backward(g, x, y, *args)
    y2 = y.clone()
    y2[1, 2, 1, 1] = x[1, 2, 1, 1]  # a tap of window (1, 1) other than its maximum
    gx2 = ops().max_pool2d_backward(g, x, y2, *args)
    moved = torch.zeros_like(gx)
    moved[1, 2, 1, 1] += 1
    src = (x[1, 2] == y[1, 2, 1, 1]).nonzero()[0]
    moved[1, 2, src[0], src[1]] -= 1
    assert torch.equal(gx2 - gx, moved)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
def test_max_pool2d_backward_cuda_edge_cases(dtype, layout):
    """CUDA: torch's CUDA gradient bit for bit where its kernels have particular rules: windows
    whose taps are all -inf (NCHW: the first tap; channels_last: input 0), NaN windows (the
    last NaN), +-0 ties, -0.0 gradients through one and through several candidate windows,
    and half-type sums beyond the type's range (a plain cast: inf, as torch gives)."""
    if DEV != "cuda":
        pytest.skip("CUDA-only: torch's CUDA max_pool2d gradient rules")
    gen = torch.Generator().manual_seed(5)
    for k, s, p, d, ceil in [((3, 3), (1, 1), (1, 1), (1, 1), False),
                             ((2, 2), (2, 2), (1, 1), (1, 1), True),
                             ((3, 2), (2, 1), (1, 1), (2, 2), True),
                             ((1, 1), (2, 2), (0, 0), (1, 1), False)]:
        x = torch.randint(-2, 3, (2, 33, 9, 10), generator=gen).double()
        x[torch.rand(x.shape, generator=gen) < 0.3] = -0.0
        x[torch.rand(x.shape, generator=gen) < 0.4] = float("-inf")
        x[torch.rand(x.shape, generator=gen) < 0.03] = float("nan")
        x[0, 0] = float("-inf")  # a whole plane of -inf windows
        x = _layout(x.to(DEV, dtype), layout)
        args = (list(k), list(s), list(p), list(d), ceil)
        y = ops().max_pool2d(x, *args)
        assert _bits_equal(y, F.max_pool2d(x, k, s, p, d, ceil_mode=ceil))
        big = torch.finfo(dtype).max / 4 if dtype != torch.float64 else 1.0
        g = torch.randn(y.shape, generator=gen, dtype=torch.float64) * big
        g[torch.rand(y.shape, generator=gen) < 0.3] = -0.0
        g = g.to(DEV, dtype)
        xr = x.detach().clone().requires_grad_(True)
        (want,) = torch.autograd.grad(F.max_pool2d(xr, k, s, p, d, ceil_mode=ceil), xr, g)
        got = ops().max_pool2d_backward(g, x, y, *args)
        assert _bits_equal(got, want), (k, s, p, d, ceil)
        assert got.is_contiguous(memory_format=_expected_format(x))
        # the op keeps no indices: its backward never reruns torch's forward
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            ops().max_pool2d_backward(g, x, y, *args)
        assert not [e.name for e in prof.events() if "max_pool2d_with_indices" in e.name]
