"""tsgb_ext's conv ops: conv2d_backward (the conv rule) against the float64 oracle
reference.conv_rule, and the forward ops conv2d / conv2d_relu (torch's values, the rule as
their gradient), on every device present. Harness, tolerances, layouts: tests/op_harness.py.

Configurations: 45 fixed ones (odd sizes, kernels 1..7, stride, padding, dilation, groups incl.
depthwise and K != C, batch 1, T = 3 targets per sample, depthwise maps larger than one tile of
the CUDA depthwise kernel) on every layout and dtype, and hypothesis draws (kernels 1..11,
bias, independent layouts of grad / x / y).
"""
import random

import pytest
import torch
import torch.nn.functional as F

import reference as ref
from conftest import require_native
from op_harness import (DTYPES, EPS, FORMATS, LAYOUTS, assert_close, assume_representable,
                        capture, clamp_to, cpu64, cuda_only, expected_format, gen_of, layout,
                        opcheck, ops, rand, rand64, run_property, st)

require_native()


# ---- configurations and sample inputs --------------------------------------------------------
def conv_cfg(N, T, C, K, H, W, k, s, p, d, G, **kw):
    """One configuration: batch N, T targets (grad batch T * N), C -> K channels in G groups, an
    H x W map, kernel k, stride s, padding p, dilation d. y "random": an independent random y
    (the rule takes any y), "conv": y = conv2d(x) with random weights (and bias)."""
    c = dict(N=N, T=T, C=C, K=K, H=H, W=W, k=list(k), s=list(s), p=list(p), d=list(d), G=G,
             y="random", bias=False, zero_frac=0.25, seed=0, lx="contiguous", ly="contiguous",
             lg="contiguous")
    c.update(kw)
    return c


def _fixed_configs():
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
    return [conv_cfg(*c) for c in cfgs]


CONV_CFGS = _fixed_configs()


def cfg_id(c):
    return "N%dT%d_C%dK%d_%dx%d_k%s_s%s_p%s_d%s_g%d" % (
        c["N"], c["T"], c["C"], c["K"], c["H"], c["W"],
        *["%dx%d" % tuple(c[key]) for key in "kspd"], c["G"])


@st.composite
def conv_configs(draw):
    kind = draw(st.sampled_from(["dense", "grouped", "depthwise"]))
    if kind == "dense":
        G, Cg = 1, draw(st.integers(1, 5))
    elif kind == "grouped":
        G, Cg = draw(st.integers(2, 3)), draw(st.integers(1, 3))
    else:
        G, Cg = draw(st.integers(1, 8)), 1
    Kg = draw(st.integers(1, 3))  # K = G * Kg: K != C in general (channel multiplier)
    kh = draw(st.integers(1, 11))
    kw = draw(st.one_of(st.just(kh), st.integers(1, 11)))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    dh = draw(st.integers(1, 3)) if kh <= 5 else draw(st.integers(1, 2))
    dw = draw(st.integers(1, 3)) if kw <= 5 else draw(st.integers(1, 2))
    eh, ew = dh * (kh - 1) + 1, dw * (kw - 1) + 1  # effective window
    ph, pw = draw(st.integers(0, eh // 2 + 1)), draw(st.integers(0, ew // 2 + 1))
    H = draw(st.integers(max(1, eh - 2 * ph), max(1, eh - 2 * ph) + 10))
    W = draw(st.integers(max(1, ew - 2 * pw), max(1, ew - 2 * pw) + 10))
    return conv_cfg(
        N=draw(st.integers(1, 3)), T=draw(st.integers(1, 3)), C=G * Cg, K=G * Kg, G=G,
        k=[kh, kw], s=[sh, sw], p=[ph, pw], d=[dh, dw], H=H, W=W, y="conv",
        bias=draw(st.booleans()), lx=draw(st.sampled_from(LAYOUTS)),
        ly=draw(st.sampled_from(LAYOUTS)), lg=draw(st.sampled_from(LAYOUTS)),
        zero_frac=draw(st.sampled_from([0.0, 0.0, 0.3])), seed=draw(st.integers(0, 2**31 - 1)))


def _out_hw(c):
    return tuple((n + 2 * p - d * (k - 1) - 1) // s + 1
                 for n, k, s, p, d in zip((c["H"], c["W"]), c["k"], c["s"], c["p"], c["d"]))


def sample_inputs(c, device, dtype):
    """conv2d_backward's arguments (grad, x, y, geometry, eps) for configuration c."""
    gen = gen_of(c["seed"])
    N, T, C, K = c["N"], c["T"], c["C"], c["K"]
    if c["y"] == "random":
        x = rand64((N, C, c["H"], c["W"]), gen, zero_frac=c["zero_frac"])
        y = rand64((N, K) + _out_hw(c), gen)
        g = rand64((N * T, K) + _out_hw(c), gen)
        x, y, g = (t.to(device, dtype) for t in (x, y, g))
    else:
        x = rand((N, C, c["H"], c["W"]), gen, dtype, device, zero_frac=c["zero_frac"])
        w = torch.randn((K, C // c["G"], *c["k"]), generator=gen, dtype=torch.float64)
        b = torch.randn((K,), generator=gen, dtype=torch.float64) if c["bias"] else None
        cd = torch.float64 if dtype == torch.float64 else torch.float32
        w, b = w.to(cd).to(device), (b.to(cd).to(device) if b is not None else None)
        y = F.conv2d(x.to(cd), w, b, c["s"], c["p"], c["d"], c["G"]).to(dtype)
        g = rand((T * N,) + tuple(y.shape[1:]), gen, dtype, device)
    return (layout(g, c["lg"]), layout(x, c["lx"]), layout(y, c["ly"]), c["k"], c["s"], c["p"],
            c["d"], c["G"], EPS)


def reference(g, x, y, k, s, p, d, G, eps):
    """The oracle of tests/reference.py (unfold-based, per output channel), float64 CPU."""
    return ref.conv_rule(*cpu64(g, x, y), k, s, p, d, G, eps)


def check_conv(c, device, dtype, what=""):
    """A fixed configuration: dtype, device and memory format of the result, and the error
    against the oracle with the scale-aware bound |ref| + max |ref|."""
    args = sample_inputs(c, device, dtype)
    out = ops.conv2d_backward(*args)
    x = args[1]
    assert out.device == x.device and out.is_contiguous(memory_format=expected_format(x))
    want = clamp_to(reference(*args), dtype)
    assert_close(out, want, dtype, f"conv2d_backward {cfg_id(c)} {c['lx']} {what}",
                 scale=want.abs() + want.abs().max().clamp_min(1e-30))


# ---- correctness -----------------------------------------------------------------------------
@pytest.mark.parametrize("lay", LAYOUTS)
@pytest.mark.parametrize("cfg", CONV_CFGS, ids=cfg_id)
def test_conv2d_backward_fp32(device, cfg, lay):
    check_conv(dict(cfg, lx=lay, ly=lay, lg=lay), device, torch.float32)


@pytest.mark.parametrize("lay", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("idx", list(range(0, len(CONV_CFGS), 3)))
def test_conv2d_backward_dtypes(device, idx, dtype, lay):
    check_conv(dict(CONV_CFGS[idx], seed=idx + 1, lx=lay, ly=lay, lg=lay), device, dtype)


def test_conv2d_backward_mixed_layouts(device):
    """x channels_last, grad and y NCHW (and the reverse): the result follows x."""
    for xl, gl in (("channels_last", "contiguous"), ("contiguous", "channels_last")):
        check_conv(dict(CONV_CFGS[0], seed=7, lx=xl, ly=gl, lg=gl), device, torch.float32,
                   f"mixed {xl}/{gl}")


def _check_drawn(c, device, dtype):
    args = sample_inputs(c, device, dtype)
    out = ops.conv2d_backward(*args)
    want = reference(*args)
    assume_representable(want, dtype)
    assert_close(out, want, dtype, f"conv2d_backward {c}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_conv2d_backward_matches_reference(device, dtype):
    run_property(conv_configs(), _check_drawn, device, dtype)


# depthwise layers take one of two CPU paths by size (gather kernel for planes >= 56x56 with
# windows up to 3x3, ATen ones-kernel convs otherwise): the property draws above are small, so
# the large-plane path gets its own cases
LARGE_PLANES = [dict(k=[3, 3], s=[1, 1], p=[1, 1], d=[1, 1], Kg=1),
                dict(k=[3, 3], s=[2, 2], p=[1, 0], d=[1, 1], Kg=2),
                dict(k=[3, 1], s=[2, 1], p=[0, 0], d=[2, 1], Kg=1),
                dict(k=[1, 1], s=[1, 3], p=[0, 0], d=[1, 1], Kg=1)]


def large_plane_inputs(cfg, fmt):
    """A depthwise conv on 57x61 planes, float64 CPU: (grad, x, y) in format fmt, unlaid too."""
    gen = gen_of(11)
    N, C, H, W, T = 2, 4, 57, 61, 2
    x = rand((N, C, H, W), gen, torch.float64, "cpu", zero_frac=0.2)
    w = torch.randn((C * cfg["Kg"], 1, *cfg["k"]), generator=gen, dtype=torch.float64)
    y = F.conv2d(x, w, None, cfg["s"], cfg["p"], cfg["d"], C)
    g = rand((T * N,) + tuple(y.shape[1:]), gen, torch.float64, "cpu")
    return (g, x, y), tuple(layout(t, fmt) for t in (g, x, y))


@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("cfg", LARGE_PLANES)
def test_depthwise_large_planes(cfg, fmt):
    (g, x, y), laid = large_plane_inputs(cfg, fmt)
    C = x.shape[1]
    out = ops.conv2d_backward(*laid, cfg["k"], cfg["s"], cfg["p"], cfg["d"], C, EPS)
    want = ref.conv_rule(g, x, y, cfg["k"], cfg["s"], cfg["p"], cfg["d"], C, EPS)
    assert_close(out, want, torch.float64, f"depthwise large plane {cfg} {fmt}")


def test_conv2d_backward_empty(device):
    """An empty batch: an empty result; empty channels: zeros of the right shape."""
    x = torch.randn(0, 3, 5, 5, device=device)
    y = torch.randn(0, 4, 5, 5, device=device)
    out = ops.conv2d_backward(torch.randn(0, 4, 5, 5, device=device), x, y, [3, 3], [1, 1],
                              [1, 1], [1, 1], 1, EPS)
    assert out.shape == (0, 3, 5, 5)
    out = ops.conv2d_backward(torch.randn(6, 0, 5, 5, device=device),
                              torch.randn(2, 0, 5, 5, device=device),
                              torch.randn(2, 0, 5, 5, device=device), [1, 1], [1, 1], [0, 0],
                              [1, 1], 1, EPS)
    assert out.shape == (6, 0, 5, 5)


def test_conv2d_backward_output_format_follows_x(device):
    """x decides the result's memory format, not grad or y; a sliced (non-dense)
    channels_last x still gives a channels_last result."""
    for lx, lo in (("channels_last", "contiguous"), ("contiguous", "channels_last"),
                   ("sliced_channels_last", "contiguous")):
        c = conv_cfg(2, 2, 4, 6, 9, 7, (3, 3), (1, 1), (1, 1), (1, 1), 2, y="conv", lx=lx,
                     ly=lo, lg=lo)
        out = ops.conv2d_backward(*sample_inputs(c, device, torch.float32))
        if lx == "contiguous":
            assert out.is_contiguous(), lx
        else:
            assert out.is_contiguous(memory_format=torch.channels_last), lx
            assert not out.is_contiguous(), lx


def _conv(g, x, y, **kw):
    geom = dict(k=[3, 3], s=[1, 1], p=[1, 1], d=[1, 1], G=1)
    geom.update(kw)
    return ops.conv2d_backward(g, x, y, geom["k"], geom["s"], geom["p"], geom["d"], geom["G"], EPS)


def test_conv2d_backward_bad_input(device):
    """Argument checks: the messages name the op and the argument."""
    x = torch.randn(2, 3, 5, 5, device=device)
    y = torch.randn(2, 4, 5, 5, device=device)
    g = torch.randn(2, 4, 5, 5, device=device)
    g6 = torch.randn(2, 6, 5, 5, device=device)  # grad and y with 6 channels
    cases = [
        (lambda: _conv(g[0], x, y), r"conv2d_backward: grad must be 4-D"),
        (lambda: _conv(g, x[0], y), r"conv2d_backward: x must be 4-D"),
        (lambda: _conv(g, x, y[0]), r"conv2d_backward: y must be 4-D"),
        (lambda: _conv(g.double(), x, y), r"conv2d_backward: grad must have dtype Float like x"),
        (lambda: _conv(g.half(), x, y), r"conv2d_backward: grad must have dtype"),
        (lambda: _conv(g, x, y.half()), r"conv2d_backward: y must have dtype Float like x"),
        (lambda: _conv(g.long(), x.long(), y.long()), r"conv2d_backward: x must be a floating tensor"),
        (lambda: _conv(torch.cat([g, g[:1]]), x, y),
         r"conv2d_backward: grad batch must be a positive multiple of x's batch 2"),
        (lambda: _conv(g, x, y, G=2), r"conv2d_backward: x's channels \(3\) must be divisible by groups"),
        (lambda: _conv(g6, x.repeat(1, 2, 1, 1)[:, :4], g6, G=4),
         r"conv2d_backward: y's channels \(6\) must be divisible by groups"),
        (lambda: _conv(g[:, :, :4], x, y), r"conv2d_backward: grad must have (y's )?shape"),
        (lambda: _conv(g, x, y[:, :, :4]), r"conv2d_backward: y must have shape"),
        (lambda: _conv(g, x, y, k=[3]), r"conv2d_backward: kernel_size must have 2 elements"),
        (lambda: _conv(g, x, y, s=[0, 1]), r"conv2d_backward: stride must be positive"),
    ]
    if device == "cuda":
        cases.append((lambda: _conv(g.cpu(), x, y), r"conv2d_backward: grad must be on cuda"))
    for fn, pattern in cases:
        with pytest.raises(RuntimeError, match=pattern):
            fn()


@pytest.mark.parametrize("lay", ["contiguous", "channels_last"])
def test_conv2d_backward_cuda_graph(device, lay):
    cuda_only(device)
    c = conv_cfg(2, 3, 8, 12, 13, 11, (3, 3), (2, 2), (1, 1), (1, 1), 2, seed=11, lx=lay,
                 ly=lay, lg=lay)
    args = sample_inputs(c, device, torch.float32)
    g, x, y = args[:3]
    graph, out_static = capture(lambda: ops.conv2d_backward(*args), warmup=2)
    for seed in (12, 13):
        g2, x2, y2 = sample_inputs(dict(c, seed=seed), device, torch.float32)[:3]
        g.copy_(g2)
        x.copy_(x2)
        y.copy_(y2)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out_static, ops.conv2d_backward(*args))
        want = reference(*args)
        assert_close(out_static, want, torch.float32, "graph",
                     scale=want.abs() + want.abs().max())


# ---- opcheck (schema, fake kernel, autograd registration, AOT dispatch) ----------------------
@pytest.mark.parametrize("fmt", FORMATS)
def test_opcheck_conv2d_backward(device, fmt):
    c = conv_cfg(2, 3, 4, 6, 9, 7, (3, 3), (2, 2), (1, 1), (1, 1), 2, y="conv", zero_frac=0.0,
                 lx=fmt, ly=fmt, lg=fmt)
    opcheck(ops.conv2d_backward.default, sample_inputs(c, device, torch.float32))
    if fmt == "contiguous":  # a dtype other than float32
        c = conv_cfg(1, 1, 2, 3, 5, 5, (3, 3), (1, 1), (1, 1), (1, 1), 1, y="conv", zero_frac=0.0)
        opcheck(ops.conv2d_backward.default, sample_inputs(c, device, torch.float64))


ALL_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor",
             "test_aot_dispatch_dynamic")


def _leaf(t):
    return t.detach().requires_grad_(True)


@pytest.mark.parametrize("fmt", FORMATS)
def test_opcheck_conv2d_forward_ops(device, fmt):
    x = _leaf(layout(torch.randn(2, 4, 9, 7, device=device), fmt))
    for op, args in [
            (ops.conv2d.default, (x, _leaf(torch.randn(6, 2, 3, 3, device=device)),
                                  _leaf(torch.randn(6, device=device)), [2, 2], [1, 1], [1, 1], 2)),
            (ops.conv2d.default, (x, _leaf(layout(torch.randn(6, 4, 3, 3, device=device),
                                                  "channels_last")), None, [1, 1], [0, 0], [2, 1], 1)),
            (ops.conv2d_relu.default, (x, _leaf(torch.randn(6, 2, 3, 3, device=device)),
                                       _leaf(torch.randn(6, device=device)), [1, 2], [1, 1], [1, 1], 2))]:
        opcheck(op, args, test_utils=ALL_UTILS)


# ---- the forward ops: torch's values, the rule as their gradient -----------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fmt", FORMATS)
def test_conv2d_forward_ops_bit_identical_to_functional(device, fmt, dtype):
    x = layout(rand((2, 6, 11, 10), gen_of(3), dtype, device), fmt)
    for w, b, s, p, d, gr in [(torch.randn(8, 3, 3, 3), torch.randn(8), [1, 1], [1, 1], [1, 1], 2),
                              (torch.randn(6, 1, 5, 3), None, [2, 1], [2, 0], [1, 2], 6),
                              (torch.randn(4, 6, 1, 1), torch.randn(4), [1, 1], [0, 0], [1, 1], 1)]:
        w, b = w.to(dtype).to(device), (b.to(dtype).to(device) if b is not None else None)
        want = F.conv2d(x, w, b, s, p, d, gr)
        got = ops.conv2d(x, w, b, s, p, d, gr)
        assert torch.equal(got, want) and got.stride() == want.stride()
        got = ops.conv2d_relu(x, w, b, s, p, d, gr)
        assert torch.equal(got, F.relu(want)) and got.stride() == want.stride()


def test_conv2d_forward_autograd_calls_the_backward_op(device):
    x = torch.randn(2, 4, 9, 7, device=device, dtype=torch.float64).requires_grad_(True)
    w = torch.randn(6, 2, 3, 3, device=device, dtype=torch.float64)
    y = ops.conv2d(x, w, None, [2, 2], [1, 1], [1, 1], 2)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    geom = ([3, 3], [2, 2], [1, 1], [1, 1], 2, EPS)
    assert torch.equal(gx, ops.conv2d_backward(g, x.detach(), y.detach(), *geom))
    # conv + ReLU: the conv rule on (grad at the ReLU output, ReLU output)
    yr = ops.conv2d_relu(x, w, None, [2, 2], [1, 1], [1, 1], 2)
    assert torch.equal(yr, y.relu())
    (gx,) = torch.autograd.grad(yr, x, g)
    assert torch.equal(gx, ops.conv2d_backward(g, x.detach(), yr.detach(), *geom))


# ---- torch.compile ---------------------------------------------------------------------------
def _dynamo_or_skip():
    try:
        import torch._dynamo as dynamo
    except Exception as e:  # pragma: no cover
        pytest.skip(f"torch._dynamo is unavailable: {e}")
    if not dynamo.is_dynamo_supported():
        pytest.skip("torch.compile (dynamo) is not supported on this Python / platform")
    dynamo.reset()
    return dynamo


def test_torch_compile_fullgraph_backward_op(device):
    _dynamo_or_skip()

    def f(g, x, y):
        gx = ops.conv2d_backward(g, x, y, [3, 3], [2, 2], [1, 1], [1, 1], 2, EPS)
        return gx * torch.cat([x, x])  # relevance (T = 2 targets), fused around the custom op

    cf = torch.compile(f, fullgraph=True, backend="aot_eager", dynamic=False)
    for fmt in FORMATS:
        x = layout(torch.randn(2, 4, 9, 7, device=device), fmt)
        y = F.conv2d(x, torch.randn(6, 2, 3, 3, device=device), None, 2, 1, 1, 2)
        g = torch.randn(4, *y.shape[1:], device=device)
        want = f(g, x, y)
        got = cf(g, x, y)
        assert torch.equal(got, want), fmt
        assert got.stride() == want.stride(), fmt


def test_torch_compile_forward_op_and_its_tsgb_backward(device):
    _dynamo_or_skip()

    def f(x, w):
        return ops.conv2d(x, w, None, [1, 1], [1, 1], [1, 1], 1).relu().sum()

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 8, 8, device=device, requires_grad=True)
    w = torch.randn(5, 3, 3, 3, device=device)
    (want,) = torch.autograd.grad(f(x, w), x)
    (got,) = torch.autograd.grad(cf(x, w), x)
    assert torch.equal(got, want)
