"""The compiled ops of tsgb_ext (torch.ops.tsgb_ext.*), tested directly.

* Each backward op against the literal float64 oracle of tests/reference.py, on
  hypothesis-generated configurations: batch N, grad batch T*N (T targets), channels, kernel
  1..11, stride, padding, dilation, groups (dense, grouped, depthwise, K != C), bias, exact zeros
  in x, and independent memory layouts of grad / x / y (contiguous, channels_last, a strided
  non-contiguous view, a sliced non-dense channels_last view).
  Tolerance: max |out - ref| <= tol * max |ref|, ref computed in float64 from the *same*
  (rounded) inputs, so only the kernel's arithmetic counts:
      float64 1e-10, float32 1e-5,
      float16 2e-3 (the kernels accumulate in float32 and round once: u = 2^-11 = 4.9e-4),
      bfloat16 1e-2 (one final rounding: u = 2^-8 = 3.9e-3).
* Output memory format, empty batches, argument checking (the messages name the argument).
* torch.library.opcheck on all eight ops (fake kernels, schema, autograd registration, AOT
  dispatch), contiguous and channels_last samples.
* Forward ops bit-identical to torch.nn.functional; TSGB(model, "native") == "hooks".
* torch.compile(fullgraph=True) through the backward op.

The whole module is skipped when the compiled ops (tsgb_ext._C) are not built.
"""

import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import tsgb_ext
from conftest import DEVICES

if not tsgb_ext.native_available() and os.environ.get("TSGB_REQUIRE_NATIVE", "0") != "1":
    pytest.skip(f"tsgb_ext._C (the compiled ops) is not available: {tsgb_ext.backend_info()['native_error']}",
                allow_module_level=True)

try:  # the property tests need hypothesis; the rest (opcheck, layouts, bad input) does not
    from hypothesis import HealthCheck, assume, given, settings
    from hypothesis import strategies as st
    HAS_HYPOTHESIS = True
except ImportError:  # e.g. the GPU machine's image: run everything else there
    HAS_HYPOTHESIS = False

    class _NoHypothesis:
        """Stands in for hypothesis.strategies so the module imports; run_property skips."""

        def __getattr__(self, name):
            return lambda *a, **k: (lambda *a2, **k2: None)
    st = _NoHypothesis()

import reference as ref  # noqa: E402

ops = torch.ops.tsgb_ext
EPS = 1e-10
HAS_CONV_RELU = hasattr(ops, "conv2d_relu")  # the fused Conv2d + ReLU forward op, when built
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = ["contiguous", "channels_last", "strided", "sliced_channels_last"]
# examples per (test, device, dtype): keeps the module well under a minute on 2 busy cores
EXAMPLES = {torch.float64: 20, torch.float32: 25, torch.float16: 8, torch.bfloat16: 8}


def _settings(dtype):
    return settings(max_examples=EXAMPLES[dtype], deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def run_property(strategy, body, device, dtype):
    """Run body(config, device, dtype) on hypothesis-drawn configs, with dtype's budget."""
    if not HAS_HYPOTHESIS:
        pytest.skip("the property tests need hypothesis")
    @_settings(dtype)
    @given(c=strategy)
    def prop(c):
        body(c, device, dtype)

    prop()


# ---- helpers ------------------------------------------------------------------------------
def layout(t, how):
    """t's values in the requested memory layout (a copy or a view into a fresh buffer)."""
    if how == "contiguous":
        return t.contiguous()
    if how == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    n, c, h, w = t.shape
    if how == "strided":  # W innermost with stride 2, odd storage offset
        big = torch.zeros((n, c, h, 2 * w + 1), dtype=t.dtype, device=t.device)
        view = big[:, :, :, 1::2]
    elif how == "sliced_channels_last":  # a channels_last buffer, sliced: not dense
        big = torch.zeros((n, c + 2, h + 1, w + 2), dtype=t.dtype, device=t.device)
        view = big.contiguous(memory_format=torch.channels_last)[:, 1:-1, 1:, 1:-1]
    else:
        raise ValueError(how)
    view.copy_(t)
    return view


def rand(shape, gen, dtype, device, zero_frac=0.0, away_from_zero=False):
    t = torch.randn(shape, generator=gen, dtype=torch.float64)
    if away_from_zero:  # |t| in [0.5, 1.5): the BN / pool rules divide by x
        t = (t.abs() % 1 + 0.5) * torch.where(t < 0, -1.0, 1.0)
    if zero_frac:
        t[torch.rand(shape, generator=gen, dtype=torch.float64) < zero_frac] = 0
    return t.to(dtype).to(device)


def check_close(out, want, dtype, what):
    """max |out - want| <= TOL[dtype] * max |want| (want: the float64 oracle)."""
    assert out.dtype == dtype, what
    assert out.shape == want.shape, (what, tuple(out.shape), tuple(want.shape))
    out64 = out.detach().double().cpu()
    want = want.detach().double().cpu()
    assert torch.isfinite(out64).all(), f"{what}: non-finite output"
    scale = want.abs().max().item() if want.numel() else 0.0
    err = (out64 - want).abs().max().item() if want.numel() else 0.0
    assert err <= TOL[dtype] * max(scale, 1e-300), \
        f"{what}: max abs err {err:.3g} vs max |ref| {scale:.3g} (rel {err / max(scale, 1e-300):.3g})"


def assume_representable(want, dtype):
    """float16 / bfloat16: results beyond the dtype's range are not comparable (inf vs
    saturation); such draws (tiny |x| sums under a bias) are skipped."""
    if dtype in (torch.float16, torch.bfloat16):
        assume(want.abs().max().item() < torch.finfo(dtype).max / 4 if want.numel() else True)


def gen_of(seed):
    return torch.Generator().manual_seed(seed)


# ---- conv2d_backward vs reference.conv_rule ------------------------------------------------
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
    return dict(
        N=draw(st.integers(1, 3)), T=draw(st.integers(1, 3)), C=G * Cg, K=G * Kg, G=G,
        k=[kh, kw], s=[sh, sw], p=[ph, pw], d=[dh, dw], H=H, W=W, bias=draw(st.booleans()),
        lx=draw(st.sampled_from(LAYOUTS)), ly=draw(st.sampled_from(LAYOUTS)),
        lg=draw(st.sampled_from(LAYOUTS)), zero_frac=draw(st.sampled_from([0.0, 0.0, 0.3])),
        seed=draw(st.integers(0, 2**31 - 1)))


def conv_case(c, dtype, device):
    gen = gen_of(c["seed"])
    x = rand((c["N"], c["C"], c["H"], c["W"]), gen, dtype, device, zero_frac=c["zero_frac"])
    w = torch.randn((c["K"], c["C"] // c["G"], *c["k"]), generator=gen, dtype=torch.float64)
    b = torch.randn((c["K"],), generator=gen, dtype=torch.float64) if c["bias"] else None
    cd = torch.float64 if dtype == torch.float64 else torch.float32
    w, b = w.to(cd).to(device), (b.to(cd).to(device) if b is not None else None)
    y = F.conv2d(x.to(cd), w, b, c["s"], c["p"], c["d"], c["G"]).to(dtype)
    g = rand((c["T"] * c["N"],) + tuple(y.shape[1:]), gen, dtype, device)
    return x, y, g


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_conv2d_backward_matches_reference(device, dtype):
    run_property(conv_configs(), _check_conv2d_backward, device, dtype)


def _check_conv2d_backward(c, device, dtype):
    x, y, g = conv_case(c, dtype, device)
    out = ops.conv2d_backward(layout(g, c["lg"]), layout(x, c["lx"]), layout(y, c["ly"]),
                              c["k"], c["s"], c["p"], c["d"], c["G"], EPS)
    want = ref.conv_rule(g.cpu(), x.cpu(), y.cpu(), c["k"], c["s"], c["p"], c["d"], c["G"], EPS)
    assume_representable(want, dtype)
    check_close(out, want, dtype, f"conv2d_backward {c}")


# depthwise layers take one of two CPU paths by size (gather kernel for planes >= 56x56 with
# windows up to 3x3, ATen ones-kernel convs otherwise): the property draws above are small, so
# the large-plane path gets its own cases
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("cfg", [dict(k=[3, 3], s=[1, 1], p=[1, 1], d=[1, 1], Kg=1),
                                 dict(k=[3, 3], s=[2, 2], p=[1, 0], d=[1, 1], Kg=2),
                                 dict(k=[3, 1], s=[2, 1], p=[0, 0], d=[2, 1], Kg=1),
                                 dict(k=[1, 1], s=[1, 3], p=[0, 0], d=[1, 1], Kg=1)])
def test_depthwise_large_planes(cfg, fmt):
    gen = gen_of(11)
    N, C, H, W, T = 2, 4, 57, 61, 2
    x = rand((N, C, H, W), gen, torch.float64, "cpu", zero_frac=0.2)
    w = torch.randn((C * cfg["Kg"], 1, *cfg["k"]), generator=gen, dtype=torch.float64)
    y = F.conv2d(x, w, None, cfg["s"], cfg["p"], cfg["d"], C)
    g = rand((T * N,) + tuple(y.shape[1:]), gen, torch.float64, "cpu")
    f = FORMATS[fmt]
    out = ops.conv2d_backward(f(g), f(x), f(y), cfg["k"], cfg["s"], cfg["p"], cfg["d"], C, EPS)
    want = ref.conv_rule(g, x, y, cfg["k"], cfg["s"], cfg["p"], cfg["d"], C, EPS)
    check_close(out, want, torch.float64, f"depthwise large plane {cfg} {fmt}")
    if HAS_CONV_BN:
        rm, rv = torch.randn(y.shape[1], dtype=torch.float64), torch.rand(y.shape[1], dtype=torch.float64) + 0.5
        out = ops.conv2d_bn_backward(f(g), f(x), f(y), rm, rv, None, None, 1e-3, 1, cfg["k"],
                                     cfg["s"], cfg["p"], cfg["d"], C, EPS)
        scale, shift = ref.bn_scale_shift(rm, rv, None, None, 1e-3)
        want = ref_conv_bn_rule(g, x, y, scale, shift, 1e-3, 1, cfg["k"], cfg["s"], cfg["p"],
                                cfg["d"], C)
        check_close(out, want, torch.float64, f"depthwise large plane, BN folded {cfg} {fmt}")


# ---- conv2d_bn_backward vs the unfused rules (activation gradient, BN rule, conv rule) -------
HAS_CONV_BN = hasattr(ops, "conv2d_bn_act")  # the fused conv -> BN -> activation ops, when built
ACT_MASK = {0: lambda yb: torch.ones_like(yb, dtype=torch.bool), 1: lambda yb: yb > 0,
            2: lambda yb: (yb > 0) & (yb < 6)}


def ref_conv_bn_rule(g, x, y, scale, shift, bn_eps, act, k, s, p, d, G):
    """The three unfused rules in float64: activation gradient, BN rule (divisor y + 1e-10;
    bn_eps is already inside scale), conv rule. The activation's mask tests the BN output
    rounded to y's dtype, as the forward stored it; the BN rule takes the unrounded value."""
    y64 = y.double()
    yb = y64 * scale.double().view(1, -1, 1, 1) + shift.double().view(1, -1, 1, 1)
    ga = g.double() * ref._tile(ACT_MASK[act](yb.to(y.dtype).double()), g.shape[0])
    return ref.conv_rule(ref.bn_rule(ga, y64, yb), x, y, k, s, p, d, G, EPS)


@pytest.mark.skipif(not HAS_CONV_BN, reason="built without the fused conv -> BN ops")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_conv2d_bn_backward_matches_unfused_rules(device, dtype):
    run_property(st.tuples(conv_configs(), st.sampled_from([0, 1, 2]),
                           st.sampled_from([1e-5, 1e-3])), _check_conv2d_bn_backward, device, dtype)


def _check_conv2d_bn_backward(c, device, dtype):
    c, act, bn_eps = c
    x, y, g = conv_case(c, dtype, device)
    gen = gen_of(c["seed"] + 1)
    K = c["K"]
    pd = torch.float64 if dtype == torch.float64 else torch.float32
    rm = torch.randn(K, generator=gen, dtype=torch.float64).to(pd).to(device)
    rv = (torch.rand(K, generator=gen, dtype=torch.float64) + 0.1).to(pd).to(device)
    bw = (torch.randn(K, generator=gen, dtype=torch.float64) * 2).to(pd).to(device)
    bb = (torch.randn(K, generator=gen, dtype=torch.float64) * 2).to(pd).to(device)
    affine = c["seed"] % 3 != 0  # a third of the draws: BatchNorm2d(affine=False)
    wb = (bw, bb) if affine else (None, None)
    out = ops.conv2d_bn_backward(layout(g, c["lg"]), layout(x, c["lx"]), layout(y, c["ly"]),
                                 rm, rv, *wb, bn_eps, act, c["k"], c["s"], c["p"], c["d"],
                                 c["G"], EPS)
    scale, shift = ref.bn_scale_shift(*(t.double().cpu() if t is not None else None
                                                     for t in (rm, rv, *wb)), bn_eps)
    want = ref_conv_bn_rule(g.cpu(), x.cpu(), y.cpu(), scale, shift, bn_eps, act,
                            c["k"], c["s"], c["p"], c["d"], c["G"])
    assume_representable(want, dtype)
    check_close(out, want, dtype, f"conv2d_bn_backward act={act} {c}")


def _rounding_band_case(dtype):
    """conv (identity, so y = x exactly) -> BN -> activation inputs whose BN outputs, computed
    in float32, round to where the activation's gradient is 0 in `dtype` although the float32
    value is inside the open interval: channel 0 to just under 6 (bfloat16: (5.984, 6), float16:
    (5.998, 6)), stored as 6.0 (ReLU6); channel 1 to a positive value under half the smallest
    subnormal, stored as 0 (ReLU, ReLU6: float16 only, a bfloat16 one is too small to matter)."""
    fi = torch.finfo(dtype)
    ulp6 = 4 * fi.eps                                    # the spacing of dtype's values at 6
    tiny = fi.smallest_normal * fi.eps                   # the smallest subnormal
    N, C, H, W = 2, 2, 8, 12
    gen = gen_of(21)
    x = (torch.rand(N, C, H, W, generator=gen, dtype=torch.float64) * 2.5 + 0.5)
    x[..., :4] = tiny                                     # columns 0-3: tiny in both channels
    x[..., 4:8] = 6.0                                     # columns 4-7: 6 (then just under)
    x = x.to(dtype)
    w = torch.zeros(C, C, 3, 3, dtype=dtype)
    w[0, 0, 1, 1] = w[1, 1, 1, 1] = 1                     # the identity conv: y == x exactly
    bn_eps = 1e-5
    rm = torch.zeros(C)
    rv = torch.ones(C)
    target = torch.tensor([1 - ulp6 / 24, 0.4], dtype=torch.float64)  # BN scale per channel
    bw = (target * (1 + bn_eps) ** 0.5).float()
    bb = torch.zeros(C)
    g = torch.randn(N, C, H, W, generator=gen, dtype=torch.float64).to(dtype)
    return x, w, (rm, rv, bw, bb, bn_eps), g


@pytest.mark.skipif(not HAS_CONV_BN, reason="built without the fused conv -> BN ops")
# (bfloat16 with ReLU: a float32 value that rounds to 0 in bfloat16 is a float32 subnormal,
# whose relevance is far below anything the comparison could see)
@pytest.mark.parametrize("dtype,act", [(torch.float16, 1), (torch.float16, 2),
                                       (torch.bfloat16, 2)], ids=str)
def test_conv2d_bn_act_masks_the_rounded_bn_output(dtype, act):
    """The fused rule's activation mask must see what the unfused forward's activation saw:
    the BN output rounded to the dtype. Compared with conv -> BN -> F.relu(6) run as separate
    native ops in that dtype (torch's own ReLU / ReLU6 gradient)."""
    x0, w, (rm, rv, bw, bb, bn_eps), g = _rounding_band_case(dtype)
    geom = ([1, 1], [1, 1], [1, 1], 1)
    x = x0.clone().requires_grad_(True)
    out, _ = ops.conv2d_bn_act(x, w, None, *geom, rm, rv, bw, bb, bn_eps, act)
    (fused,) = torch.autograd.grad(out, x, g)
    xu = x0.clone().requires_grad_(True)
    z = ops.batch_norm(ops.conv2d(xu, w, None, *geom), rm, rv, bw, bb, bn_eps)
    a = F.relu6(z) if act == 2 else F.relu(z)
    (unfused,) = torch.autograd.grad(a, xu, g)
    assert torch.equal(out, a)
    if act == 2:  # the crafted values are where they should be
        assert (z[:, 0, :, 4:8] == 6).all() and (out[:, 0, :, 4:8] == 6).all()
    if dtype == torch.float16:
        assert (z[:, 1, :, :4] == 0).all()
    # the unfused chain rounds its intermediate gradients to dtype: a few units of its eps
    err = (fused.double() - unfused.double()).abs().max().item()
    scale = unfused.double().abs().max().item()
    assert err <= 8 * torch.finfo(dtype).eps * scale, (err, scale)


@pytest.mark.skipif(not HAS_CONV_BN, reason="built without the fused conv -> BN ops")
@pytest.mark.parametrize("device", DEVICES)
def test_conv2d_bn_act_forward_and_autograd(device):
    """Outputs bit-identical to conv2d, batch_norm, relu/relu6 one after another; the autograd
    of its first output is the fused rule, equal to the unfused ops' autograd."""
    gen = gen_of(5)
    x = rand((2, 6, 11, 9), gen, torch.float64, device)
    w, b = rand((8, 3, 3, 3), gen, torch.float64, device), rand((8,), gen, torch.float64, device)
    rm, rv = rand((8,), gen, torch.float64, device), rand((8,), gen, torch.float64, device).abs() + 0.5
    bw, bb = rand((8,), gen, torch.float64, device), rand((8,), gen, torch.float64, device)
    acts = {0: lambda t: t, 1: F.relu, 2: F.relu6}
    for act, fn in acts.items():
        for cl in (False, True):
            xx = (_cl(x) if cl else x).detach().requires_grad_(True)
            out, y = ops.conv2d_bn_act(xx, w, b, [2, 1], [1, 1], [1, 2], 2, rm, rv, bw, bb, 1e-3, act)
            yc = F.conv2d(xx, w, b, [2, 1], [1, 1], [1, 2], 2)
            want = fn(F.batch_norm(yc, rm, rv, bw, bb, False, 0.0, 1e-3))
            assert torch.equal(out, want) and torch.equal(y, yc)
            assert out.stride() == want.stride() and not y.requires_grad
            g = rand(tuple(out.shape), gen, torch.float64, device)
            (gx,) = torch.autograd.grad(out, xx, g)
            scale, shift = ref.bn_scale_shift(rm, rv, bw, bb, 1e-3)
            ref_gx = ref_conv_bn_rule(g.cpu(), x.cpu(), yc.detach().cpu(), scale.cpu(), shift.cpu(),
                                      1e-3, act, [3, 3], [2, 1], [1, 1], [1, 2], 2)
            check_close(gx, ref_gx, torch.float64, f"conv2d_bn_act autograd act={act} cl={cl}")


@pytest.mark.skipif(not HAS_CONV_BN, reason="built without the fused conv -> BN ops")
@pytest.mark.parametrize("device", DEVICES)
def test_conv2d_bn_act_bad_input(device):
    """An unknown activation code is rejected by the op's own check. A test of its own (named
    *bad_input*, so gpu_check.sh runs it in the bad-input step's process): an extension error
    that crashed the process would otherwise take the model tests after it down too."""
    gen = gen_of(5)
    x = rand((2, 6, 11, 9), gen, torch.float64, device)
    w, b = rand((8, 3, 3, 3), gen, torch.float64, device), rand((8,), gen, torch.float64, device)
    rm, rv = rand((8,), gen, torch.float64, device), rand((8,), gen, torch.float64, device).abs() + 0.5
    bw, bb = rand((8,), gen, torch.float64, device), rand((8,), gen, torch.float64, device)
    ops.conv2d_bn_act(x, w, b, [1, 1], [1, 1], [1, 1], 2, rm, rv, bw, bb, 1e-3, 2)  # act 2 is fine
    for act in (3, -1):
        with pytest.raises(RuntimeError, match=r"conv2d_bn_act: act must be 0 \(none\), 1 \(ReLU\) or 2"):
            ops.conv2d_bn_act(x, w, b, [1, 1], [1, 1], [1, 1], 2, rm, rv, bw, bb, 1e-3, act)


@pytest.mark.skipif(not HAS_CONV_BN, reason="built without the fused conv -> BN ops")
@pytest.mark.parametrize("device", DEVICES)
def test_conv2d_bn_backward_bad_input(device):
    x, y, g, _ = _good_args(device)
    s = torch.rand(4, device=device) + 0.5

    def call(rm=s, rv=s, w=s, b=s, act=1, G=1):
        return ops.conv2d_bn_backward(g, x, y, rm, rv, w, b, 1e-5, act, [3, 3], [1, 1], [1, 1],
                                      [1, 1], G, EPS)
    call(w=None, b=None)  # affine=False is fine
    for fn, pattern in [
            (lambda: call(rm=s[:3]), r"conv2d_bn_backward: running_mean must have shape \(4,\)"),
            (lambda: call(rv=s.view(2, 2)), r"conv2d_bn_backward: running_var must have shape \(4,\)"),
            (lambda: call(w=s[:2]), r"conv2d_bn_backward: bn_weight must have shape \(4,\)"),
            (lambda: call(b=s.long()), r"conv2d_bn_backward: bn_bias must be a floating tensor"),
            (lambda: call(act=-1), r"conv2d_bn_backward: act must be 0 \(none\), 1 \(ReLU\) or 2"),
            (lambda: call(G=2), r"conv2d_bn_backward: x's channels \(3\) must be divisible")]:
        with pytest.raises(RuntimeError, match=pattern):
            fn()


# ---- batch_norm_backward vs reference.bn_rule ----------------------------------------------
@st.composite
def bn_configs(draw):
    return dict(N=draw(st.integers(1, 3)), T=draw(st.integers(1, 3)), C=draw(st.integers(1, 40)),
                H=draw(st.integers(1, 12)), W=draw(st.integers(1, 12)),
                eps=draw(st.sampled_from([1e-5, 1e-3, 1e-10])),
                param_dtype=draw(st.sampled_from(["float32", "float64", "same"])),
                lx=draw(st.sampled_from(LAYOUTS)), lg=draw(st.sampled_from(LAYOUTS)),
                seed=draw(st.integers(0, 2**31 - 1)))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_batch_norm_backward_matches_reference(device, dtype):
    run_property(bn_configs(), _check_batch_norm_backward, device, dtype)


def _check_batch_norm_backward(c, device, dtype):
    gen = gen_of(c["seed"])
    x = rand((c["N"], c["C"], c["H"], c["W"]), gen, dtype, device, away_from_zero=True)
    g = rand((c["T"] * c["N"], c["C"], c["H"], c["W"]), gen, dtype, device)
    pd = dtype if c["param_dtype"] == "same" else getattr(torch, c["param_dtype"])
    scale = torch.randn((c["C"],), generator=gen, dtype=torch.float64).to(pd).to(device)
    shift = torch.randn((c["C"],), generator=gen, dtype=torch.float64).to(pd).to(device)
    out = ops.batch_norm_backward(layout(g, c["lg"]), layout(x, c["lx"]), scale, shift, c["eps"])
    # y as the eval BN computes it: the affine map, here exactly in float64
    y64 = x.double() * scale.double().view(1, -1, 1, 1) + shift.double().view(1, -1, 1, 1)
    want = ref.bn_rule(g.cpu(), x.cpu(), y64.cpu(), c["eps"])
    assume_representable(want, dtype)
    check_close(out, want, dtype, f"batch_norm_backward {c}")


# ---- avg_pool2d_backward vs reference.avgpool_rule -----------------------------------------
@st.composite
def pool_configs(draw, empty_stride=True):
    kh, kw = draw(st.integers(1, 7)), draw(st.integers(1, 7))
    strides = st.tuples(st.integers(1, 4), st.integers(1, 4)).map(list)
    if empty_stride:  # stride [] means stride = kernel_size, as in torch (CPU kernel only)
        strides = st.one_of(st.just([]), strides)
    stride = draw(strides)
    ph, pw = draw(st.integers(0, kh // 2)), draw(st.integers(0, kw // 2))
    H = draw(st.integers(max(1, kh - 2 * ph), max(1, kh - 2 * ph) + 14))
    W = draw(st.integers(max(1, kw - 2 * pw), max(1, kw - 2 * pw) + 14))
    return dict(N=draw(st.integers(1, 3)), T=draw(st.integers(1, 3)), C=draw(st.integers(1, 9)),
                H=H, W=W, k=[kh, kw], s=stride, p=[ph, pw], ceil_mode=draw(st.booleans()),
                count_include_pad=draw(st.booleans()),
                divisor_override=draw(st.one_of(st.none(), st.integers(1, 9), st.just(-3))),
                lx=draw(st.sampled_from(LAYOUTS)), ly=draw(st.sampled_from(LAYOUTS)),
                lg=draw(st.sampled_from(LAYOUTS)), seed=draw(st.integers(0, 2**31 - 1)))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_avg_pool2d_backward_matches_reference(device, dtype):
    run_property(pool_configs(empty_stride=device == "cpu"), _check_avg_pool2d_backward, device, dtype)


def _check_avg_pool2d_backward(c, device, dtype):
    gen = gen_of(c["seed"])
    x = rand((c["N"], c["C"], c["H"], c["W"]), gen, dtype, device, away_from_zero=True)
    cd = torch.float64 if dtype == torch.float64 else torch.float32
    geom = (c["k"], c["s"] or c["k"], c["p"], c["ceil_mode"], c["count_include_pad"],
            c["divisor_override"])
    y = F.avg_pool2d(x.to(cd), *geom).to(dtype)
    g = rand((c["T"] * c["N"],) + tuple(y.shape[1:]), gen, dtype, device)
    out = ops.avg_pool2d_backward(layout(g, c["lg"]), layout(x, c["lx"]), layout(y, c["ly"]),
                                  c["k"], c["s"], c["p"], c["ceil_mode"], c["count_include_pad"],
                                  c["divisor_override"], EPS)
    want = ref.avgpool_rule(g.cpu(), x.cpu(), y.cpu(), *geom, EPS)
    assume_representable(want, dtype)
    check_close(out, want, dtype, f"avg_pool2d_backward {c}")


# ---- linear_backward vs reference.fc_rule ---------------------------------------------------
@st.composite
def linear_configs(draw):
    return dict(N=draw(st.integers(1, 5)), T=draw(st.integers(1, 3)),
                fin=draw(st.integers(1, 300)), fout=draw(st.integers(1, 40)),
                zero_sample=draw(st.booleans()), nonneg_classes=draw(st.integers(0, 3)),
                seed=draw(st.integers(0, 2**31 - 1)))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_linear_backward_matches_reference(device, dtype):
    run_property(linear_configs(), _check_linear_backward, device, dtype)


def _check_linear_backward(c, device, dtype):
    gen = gen_of(c["seed"])
    # the classifier's input: non-negative (after ReLU / pooling), some exact zeros
    x = torch.randn((c["N"], c["fin"]), generator=gen, dtype=torch.float64).relu()
    if c["zero_sample"]:
        x[0] = 0  # |zn| == 0 for every class of sample 0
    Wt = torch.randn((c["fout"], c["fin"]), generator=gen, dtype=torch.float64)
    nz = min(c["nonneg_classes"], c["fout"])
    Wt[:nz] = Wt[:nz].abs()  # W- row is zero: |zn| == 0 for these classes for every sample
    g = torch.randn((c["T"] * c["N"], c["fout"]), generator=gen, dtype=torch.float64)
    x, Wt, g = x.to(dtype).to(device), Wt.to(dtype).to(device), g.to(dtype).to(device)
    wp, wn = Wt.clamp(min=0), Wt.clamp(max=0)
    out = ops.linear_backward(g, x, wp, wn, EPS)
    want = ref.fc_rule(g.cpu(), x.cpu(), Wt.cpu(), EPS)
    assume_representable(want, dtype)
    check_close(out, want, dtype, f"linear_backward {c}")
    # where |zn| == 0 the rule is defined as beta = 0: gx = grad @ W+ there, never NaN / inf
    plain = (g.double() @ wp.double()).cpu()
    if c["zero_sample"]:
        rows = torch.arange(0, g.shape[0], c["N"])  # gradient rows paired with sample 0
        check_close(out[rows], plain[rows], dtype, "linear_backward, sample with zn == 0")
    if nz:
        gonly = torch.zeros_like(g)
        gonly[:, :nz] = g[:, :nz]  # gradient only on the classes whose zn == 0
        check_close(ops.linear_backward(gonly, x, wp, wn, EPS),
                    (gonly.double() @ wp.double()).cpu(), dtype, "linear_backward, classes with zn == 0")


@pytest.mark.parametrize("device", DEVICES)
def test_linear_backward_all_zero_zn_is_finite(device):
    """zn == 0 everywhere (non-negative weights, or x == 0): gx == grad @ W+ exactly."""
    x = torch.rand(3, 7, dtype=torch.float64, device=device)
    W = torch.rand(4, 7, dtype=torch.float64, device=device)
    g = torch.randn(6, 4, dtype=torch.float64, device=device)
    out = ops.linear_backward(g, x, W, torch.zeros_like(W), EPS)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, g @ W, rtol=1e-12, atol=0)
    out = ops.linear_backward(g, torch.zeros_like(x), W, -W, EPS)
    torch.testing.assert_close(out, g @ W, rtol=1e-12, atol=0)


def _split_ref(w):
    w = w.double() if w.dtype == torch.float32 else w
    return w.clamp(min=0), w.clamp(max=0)


def test_split_weight_cache_skipped_while_capturing(monkeypatch):
    """The W+/W- cache of the classifier rule is neither written nor read inside a CUDA-graph
    capture (the branch logic, on the CPU: the capture check is patched)."""
    from tsgb_ext.ops import autograd as ag
    assert not ag._capturing(torch.zeros(1))  # a CPU tensor is never in a capture
    w = torch.randn(7, 5, generator=gen_of(11))
    want_p, want_n = _split_ref(w)
    ag._split_cache.pop(id(w), None)
    monkeypatch.setattr(ag, "_capturing", lambda t: True)
    p1, n1 = ag.split_weight(w)
    assert torch.equal(p1, want_p) and torch.equal(n1, want_n)
    assert id(w) not in ag._split_cache, "split_weight stored W+/W- during a capture"
    monkeypatch.setattr(ag, "_capturing", lambda t: False)
    p2, n2 = ag.split_weight(w)  # eager: computed and stored
    assert torch.equal(p2, want_p) and torch.equal(n2, want_n)
    assert id(w) in ag._split_cache and ag.split_weight(w)[0] is p2  # eager calls hit
    monkeypatch.setattr(ag, "_capturing", lambda t: True)
    p3, n3 = ag.split_weight(w)
    assert p3 is not p2 and n3 is not n2, "split_weight read the cache during a capture"
    assert torch.equal(p3, want_p) and torch.equal(n3, want_n)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_split_weight_in_cuda_graph(dtype):
    """split_weight captured in a CUDA graph: an eager call before the first replay gets the
    real W+/W- (not the graph's not-yet-filled tensors), every replay computes the split of the
    weight as it is then, also when the cache was warm at capture time."""
    from tsgb_ext.ops import autograd as ag
    w = torch.randn(64, 33, generator=gen_of(12)).to("cuda", dtype)
    ag._split_cache.pop(id(w), None)
    torch.cuda.synchronize()
    g1 = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g1):  # cold cache
        gp1, gn1 = ag.split_weight(w)
    p, n = ag.split_weight(w)  # eager, before any replay
    want_p, want_n = _split_ref(w)
    assert torch.equal(p, want_p) and torch.equal(n, want_n)
    g2 = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g2):  # warm cache
        gp2, gn2 = ag.split_weight(w)
    for _ in range(2):
        g1.replay()
        g2.replay()
        torch.cuda.synchronize()
        want_p, want_n = _split_ref(w)
        for gp, gn in ((gp1, gn1), (gp2, gn2)):
            assert torch.equal(gp, want_p) and torch.equal(gn, want_n)
        with torch.no_grad():
            w.mul_(-1.5)  # in place: the next replay must follow it
    p, n = ag.split_weight(w)  # eager again: the cache saw the version change
    want_p, want_n = _split_ref(w)
    assert torch.equal(p, want_p) and torch.equal(n, want_n)


def _linear_overflow_case(dtype, device):
    """x nearly orthogonal to W-: beta = zp / |zn| is finite in float32 but gx's negative
    term is beyond dtype's range (float16: x = [1, 6e-8], W = [1, -1], beta = 1.7e7;
    bfloat16: zp = 4e30, |zn| = 1e-8, beta = 4e38, beyond float32's range too)."""
    if dtype == torch.float16:
        x, W = [[1.0, 6e-8]], [[1.0, -1.0]]
    else:
        x, W = [[1e30, 1e-8]], [[4.0, -1.0]]
    x = torch.tensor(x, dtype=dtype, device=device)
    W = torch.tensor(W, dtype=dtype, device=device)
    return x, W, torch.ones(1, 1, dtype=dtype, device=device)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_linear_backward_saturates_half_types(device, dtype):
    """Like every other kernel, results beyond a half type's range saturate to its largest
    finite value instead of becoming inf (and inf * 0 = NaN in the next product)."""
    x, W, g = _linear_overflow_case(dtype, device)
    out = ops.linear_backward(g, x, W.clamp(min=0), W.clamp(max=0), EPS)
    want = torch.tensor([[W[0, 0].item(), -torch.finfo(dtype).max]], dtype=dtype, device=device)
    assert torch.equal(out, want), out
    # the classifier op's Python rule (tsgb_ext.ops.autograd.linear_rule) and its autograd
    from tsgb_ext.ops.autograd import linear_rule
    assert torch.equal(linear_rule(g, x, W), want)
    xr = x.clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(ops.linear(xr, W, None), xr, g)
    assert torch.equal(gx, want)


# ---- memory format, empty inputs -----------------------------------------------------------
def _backward_calls(device, fmt_x, fmt_other=torch.contiguous_format, n=2, t=2):
    x = torch.randn(n, 4, 9, 7, device=device).abs().add(0.5).contiguous(memory_format=fmt_x)
    w = torch.randn(6, 2, 3, 3, device=device)
    y = F.conv2d(x, w, None, 1, 1, 1, 2).contiguous(memory_format=fmt_other)
    g = torch.randn(t * n, 6, 9, 7, device=device).contiguous(memory_format=fmt_other)
    yp = F.avg_pool2d(x, 3, 2, 1).contiguous(memory_format=fmt_other)
    gp = torch.randn(t * n, 4, *yp.shape[2:], device=device).contiguous(memory_format=fmt_other)
    gb = torch.randn(t * n, 4, 9, 7, device=device).contiguous(memory_format=fmt_other)
    s = torch.randn(4, device=device)
    return {
        "conv2d_backward": lambda: ops.conv2d_backward(g, x, y, [3, 3], [1, 1], [1, 1], [1, 1], 2, EPS),
        "batch_norm_backward": lambda: ops.batch_norm_backward(gb, x, s, s, 1e-5),
        "avg_pool2d_backward": lambda: ops.avg_pool2d_backward(gp, x, yp, [3, 3], [2, 2], [1, 1],
                                                               False, True, None, EPS),
    }


@pytest.mark.parametrize("device", DEVICES)
def test_output_memory_format_follows_x(device):
    for name, call in _backward_calls(device, torch.channels_last).items():
        out = call()
        assert out.is_contiguous(memory_format=torch.channels_last), name
        assert not out.is_contiguous(), name
    for name, call in _backward_calls(device, torch.contiguous_format, torch.channels_last).items():
        assert call().is_contiguous(), name  # x decides, not grad or y
    # a sliced (non-dense) channels_last x still gives a channels_last result
    x = torch.randn(2, 6, 9, 9, device=device).contiguous(memory_format=torch.channels_last)[:, 1:5, 1:, 1:]
    y = F.conv2d(x, torch.randn(3, 4, 3, 3, device=device))
    out = ops.conv2d_backward(torch.randn_like(y), x, y, [3, 3], [1, 1], [0, 0], [1, 1], 1, EPS)
    assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch_returns_empty(device):
    x = torch.randn(0, 3, 5, 5, device=device)
    y = torch.randn(0, 4, 5, 5, device=device)
    out = ops.conv2d_backward(torch.randn(0, 4, 5, 5, device=device), x, y, [3, 3], [1, 1], [1, 1],
                              [1, 1], 1, EPS)
    assert out.shape == (0, 3, 5, 5)
    xc = x.contiguous(memory_format=torch.channels_last)
    out = ops.batch_norm_backward(torch.randn(0, 3, 5, 5, device=device), xc,
                                  torch.randn(3, device=device), torch.randn(3, device=device), 1e-5)
    assert out.shape == (0, 3, 5, 5)
    yp = F.avg_pool2d(x, 2)
    out = ops.avg_pool2d_backward(torch.randn(0, *yp.shape[1:], device=device), x, yp, [2, 2], [2, 2],
                                  [0, 0], False, True, None, EPS)
    assert out.shape == (0, 3, 5, 5)
    W = torch.randn(4, 6, device=device)
    out = ops.linear_backward(torch.randn(0, 4, device=device), torch.randn(0, 6, device=device),
                              W.clamp(min=0), W.clamp(max=0), EPS)
    assert out.shape == (0, 6)
    # empty channels: zeros of the right shape
    out = ops.conv2d_backward(torch.randn(6, 0, 5, 5, device=device), torch.randn(2, 0, 5, 5, device=device),
                              torch.randn(2, 0, 5, 5, device=device), [1, 1], [1, 1], [0, 0], [1, 1], 1, EPS)
    assert out.shape == (6, 0, 5, 5)


# ---- bad input -----------------------------------------------------------------------------
def _good_args(device):
    x = torch.randn(2, 3, 5, 5, device=device)
    y = torch.randn(2, 4, 5, 5, device=device)
    g = torch.randn(2, 4, 5, 5, device=device)
    W = torch.randn(4, 6, device=device)
    return x, y, g, W


def _conv(g, x, y, **kw):
    geom = dict(k=[3, 3], s=[1, 1], p=[1, 1], d=[1, 1], G=1)
    geom.update(kw)
    return ops.conv2d_backward(g, x, y, geom["k"], geom["s"], geom["p"], geom["d"], geom["G"], EPS)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_input_messages_name_the_argument(device):
    x, y, g, W = _good_args(device)
    xb = torch.randn(2, 4, 5, 5, device=device)
    s = torch.randn(4, device=device)
    gp = torch.randn(2, 4, 2, 2, device=device)
    yp = torch.randn(2, 4, 2, 2, device=device)
    cases = [
        # wrong dims
        (lambda: _conv(g[0], x, y), r"conv2d_backward: grad must be 4-D"),
        (lambda: _conv(g, x[0], y), r"conv2d_backward: x must be 4-D"),
        (lambda: _conv(g, x, y[0]), r"conv2d_backward: y must be 4-D"),
        (lambda: ops.batch_norm_backward(g.unsqueeze(0), xb, s, s, 1e-5), r"batch_norm_backward: grad must be 4-D"),
        (lambda: ops.batch_norm_backward(g, xb[0], s, s, 1e-5), r"batch_norm_backward: x must be 4-D"),
        (lambda: ops.batch_norm_backward(g, xb, s.view(2, 2), s, 1e-5), r"batch_norm_backward: scale must (have shape|be 1-D)"),
        (lambda: ops.batch_norm_backward(g, xb, s, s[:3], 1e-5), r"batch_norm_backward: shift must (have shape|be 1-D)"),
        (lambda: ops.avg_pool2d_backward(gp, xb, yp[0], [2, 2], [2, 2], [0, 0], False, True, None, EPS),
         r"avg_pool2d_backward: y must be 4-D"),
        (lambda: ops.avg_pool2d_backward(gp[0], xb, yp, [2, 2], [2, 2], [0, 0], False, True, None, EPS),
         r"avg_pool2d_backward: grad must be 4-D"),
        (lambda: ops.linear_backward(g[:, :, 0, 0], x[:, :, 0], W.clamp(min=0), W.clamp(max=0), EPS),
         r"linear_backward: x must be 2-D"),
        (lambda: ops.linear_backward(g[:, :, 0, 0].unsqueeze(0), x[:, :, 0, 0], W, W, EPS),
         r"linear_backward: grad must be 2-D"),
        (lambda: ops.linear_backward(g[:, :, 0, 0], x[:, :3, 0, 0], W[0], W, EPS),
         r"linear_backward: weight_pos must be 2-D"),
        # mismatched dtypes
        (lambda: _conv(g.double(), x, y), r"conv2d_backward: grad must have dtype Float like x"),
        (lambda: _conv(g, x, y.half()), r"conv2d_backward: y must have dtype Float like x"),
        (lambda: ops.batch_norm_backward(g.double(), xb, s, s, 1e-5), r"batch_norm_backward: grad must have dtype"),
        (lambda: ops.avg_pool2d_backward(gp, xb, yp.double(), [2, 2], [2, 2], [0, 0], False, True, None, EPS),
         r"avg_pool2d_backward: y must have dtype"),
        (lambda: ops.linear_backward(g[:, :, 0, 0].double(), x[:, :, 0, 0], W[:, :3], W[:, :3], EPS),
         r"linear_backward: grad must have dtype"),
        (lambda: _conv(g.long(), x.long(), y.long()), r"conv2d_backward: x must be a floating tensor"),
        # grad batch not a positive multiple of x's batch
        (lambda: _conv(torch.cat([g, g[:1]]), x, y), r"conv2d_backward: grad batch must be a positive multiple of x's batch 2"),
        (lambda: ops.batch_norm_backward(g[:1], xb, s, s, 1e-5), r"batch_norm_backward: grad batch must be a positive multiple"),
        (lambda: ops.avg_pool2d_backward(torch.cat([gp, gp[:1]]), xb, yp, [2, 2], [2, 2], [0, 0], False, True, None, EPS),
         r"avg_pool2d_backward: grad batch must be a positive multiple"),
        (lambda: ops.linear_backward(torch.randn(3, 4, device=device), torch.randn(2, 6, device=device), W, W, EPS),
         r"linear_backward: grad batch must be a positive multiple"),
        # shapes that do not fit together
        (lambda: _conv(g, x, y, G=2), r"conv2d_backward: x's channels \(3\) must be divisible by groups"),
        (lambda: _conv(g[:, :, :4], x, y), r"conv2d_backward: grad must have (y's )?shape"),
        (lambda: ops.linear_backward(g[:, :, 0, 0], x[:, :, 0, 0], W, W, EPS),
         r"linear_backward: weight_pos must have shape"),
        (lambda: ops.avg_pool2d_backward(gp, xb, yp, [2, 2], [2, 2], [2, 2], False, True, None, EPS),
         r"avg_pool2d_backward: padding must be at most half of kernel_size"),
        (lambda: _conv(g, x, y, k=[3]), r"conv2d_backward: kernel_size must have 2 elements"),
        (lambda: _conv(g, x, y, s=[0, 1]), r"conv2d_backward: stride must be positive"),
    ]
    for fn, pattern in cases:
        with pytest.raises(RuntimeError, match=pattern):
            fn()


def test_max_pool2d_cuda_forward_path_checks_on_cpu():
    """CUDA's max_pool2d forward is the op's CompositeExplicitAutograd kernel (torch's own
    max_pool2d after the shared checks). Called here on CPU tensors, it refuses what the CPU
    kernel refuses, with the same messages (torch's would take a 3-D x)."""
    op = ops.max_pool2d.default
    composite = lambda *a: op._op_dk(torch._C.DispatchKey.CompositeExplicitAutograd, *a)  # noqa: E731
    x = torch.randn(2, 3, 8, 8)
    good = ([3, 3], [2, 2], [1, 1], [1, 1], True)
    assert torch.equal(composite(x, *good), F.max_pool2d(x, 3, 2, 1, 1, ceil_mode=True))
    cases = [((x[0],) + good, r"tsgb_ext.max_pool2d: x must be 4-D \(N, C, H, W\), got shape \[3, 8, 8\]"),
             ((x.long(),) + good, r"tsgb_ext.max_pool2d: x must be a floating tensor"),
             ((x, [3, 3], [2, 2], [2, 1], [1, 1], False), r"tsgb_ext.max_pool2d: padding must be at most half"),
             ((x, [3], [2, 2], [1, 1], [1, 1], False), r"tsgb_ext.max_pool2d: kernel_size must have 2 elements"),
             ((x, [3, 3], [0, 2], [1, 1], [1, 1], False), r"tsgb_ext.max_pool2d: stride must be positive"),
             ((x[:, :, :2, :2], [3, 3], [1, 1], [0, 0], [1, 1], False),
              r"tsgb_ext.max_pool2d: the window .* does not fit")]
    for args, pattern in cases:
        for fn in (composite, ops.max_pool2d):  # the CUDA path and the CPU kernel
            with pytest.raises(RuntimeError, match=pattern):
                fn(*args)
    with pytest.raises(RuntimeError, match=cases[0][1]):  # the fake kernel (torch.compile)
        ops.max_pool2d(x[0].to("meta"), *good)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (a second device)")
def test_bad_input_mismatched_devices():
    x, y, g, W = _good_args("cuda")
    with pytest.raises(RuntimeError, match=r"conv2d_backward: grad must be on cuda"):
        _conv(g.cpu(), x, y)
    with pytest.raises(RuntimeError, match=r"conv2d_backward: y must be on cuda"):
        _conv(g, x, y.cpu())
    s = torch.randn(4)
    xb = torch.randn(2, 4, 5, 5, device="cuda")
    with pytest.raises(RuntimeError, match=r"batch_norm_backward: scale must be on cuda"):
        ops.batch_norm_backward(g, xb, s, s.cuda(), 1e-5)
    with pytest.raises(RuntimeError, match=r"linear_backward: weight_neg must be on cuda"):
        ops.linear_backward(g[:, :, 0, 0], torch.randn(2, 6, device="cuda"), W, W.cpu(), EPS)


# ---- opcheck ------------------------------------------------------------------------------
def _cl(t):
    return t.contiguous(memory_format=torch.channels_last)


def _sliced_cl(t):
    return layout(t, "sliced_channels_last")


FORMATS = {"contiguous": lambda t: t, "channels_last": _cl, "sliced_channels_last": _sliced_cl}


def _backward_samples(device, fmt):
    f = FORMATS[fmt]
    x = f(torch.randn(2, 4, 9, 7, device=device))
    y = f(F.conv2d(x, torch.randn(6, 2, 3, 3, device=device), None, 2, 1, 1, 2))
    g = f(torch.randn(6, *y.shape[1:], device=device))
    xa = f(torch.randn(2, 4, 9, 7, device=device).abs() + 0.5)
    yp = F.avg_pool2d(xa, 3, 2, 1, True, False)
    W = torch.randn(5, 8, device=device)
    return [
        (ops.conv2d_backward.default, (g, x, y, [3, 3], [2, 2], [1, 1], [1, 1], 2, EPS)),
        (ops.batch_norm_backward.default, (f(torch.randn(4, 4, 9, 7, device=device)), xa,
                                           torch.randn(4, device=device), torch.randn(4, device=device), 1e-5)),
        (ops.avg_pool2d_backward.default, (f(torch.randn(2, *yp.shape[1:], device=device)), xa, yp, [3, 3],
                                           [2, 2], [1, 1], True, False, None, EPS)),
        (ops.linear_backward.default, (torch.randn(6, 5, device=device), torch.randn(2, 8, device=device).relu(),
                                       W.clamp(min=0), W.clamp(max=0), EPS)),
    ] + ([
        (ops.conv2d_bn_backward.default, (g, x, y, torch.randn(6, device=device),
                                          torch.rand(6, device=device) + 0.5, torch.randn(6, device=device),
                                          torch.randn(6, device=device), 1e-5, 1, [3, 3], [2, 2],
                                          [1, 1], [1, 1], 2, EPS)),
        (ops.conv2d_bn_backward.default, (g, x, y, torch.randn(6, device=device),
                                          torch.rand(6, device=device) + 0.5, None, None, 1e-3, 2,
                                          [3, 3], [2, 2], [1, 1], [1, 1], 2, EPS)),
    ] if HAS_CONV_BN else [])


def _opcheck(op, args, **kw):
    result = torch.library.opcheck(op, args, **kw)
    assert all(v == "SUCCESS" for v in result.values()), result


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_backward_ops(device, fmt):
    for op, args in _backward_samples(device, fmt):
        _opcheck(op, args)
    # dtypes other than float32
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64, device=device)
    y = F.conv2d(x, torch.randn(3, 2, 3, 3, dtype=torch.float64, device=device), padding=1)
    _opcheck(ops.conv2d_backward.default, (torch.randn_like(y), x, y, [3, 3], [1, 1], [1, 1], [1, 1], 1, EPS))


def _forward_samples(device, fmt):
    f = FORMATS[fmt]

    def leaf(t):
        return t.detach().requires_grad_(True)

    x = leaf(f(torch.randn(2, 4, 9, 7, device=device)))
    xa = leaf(f(torch.randn(2, 4, 9, 7, device=device).abs() + 0.5))
    out = {
        "conv2d": (ops.conv2d.default, (x, leaf(torch.randn(6, 2, 3, 3, device=device)),
                                        leaf(torch.randn(6, device=device)), [2, 2], [1, 1], [1, 1], 2)),
        "conv2d_cl_weight": (ops.conv2d.default, (x, leaf(_cl(torch.randn(6, 4, 3, 3, device=device))),
                                                  None, [1, 1], [0, 0], [2, 1], 1)),
        "batch_norm": (ops.batch_norm.default, (xa, torch.randn(4, device=device), torch.rand(4, device=device) + 0.5,
                                                leaf(torch.randn(4, device=device)), torch.randn(4, device=device), 1e-5)),
        "avg_pool2d": (ops.avg_pool2d.default, (xa, [3, 3], [2, 2], [1, 1], True, False, None)),
        "avg_pool2d_div": (ops.avg_pool2d.default, (xa, [2, 3], [], [1, 0], False, True, 5)),
        "linear": (ops.linear.default, (leaf(torch.randn(3, 8, device=device).relu()),
                                        leaf(torch.randn(5, 8, device=device)), torch.randn(5, device=device))),
    }
    if HAS_CONV_BN:
        for act in (0, 1, 2):
            out[f"conv2d_bn_act_{act}"] = (ops.conv2d_bn_act.default, (
                x, leaf(torch.randn(6, 2, 3, 3, device=device)), leaf(torch.randn(6, device=device)),
                [1, 2], [1, 1], [1, 1], 2, torch.randn(6, device=device),
                torch.rand(6, device=device) + 0.5, leaf(torch.randn(6, device=device)),
                torch.randn(6, device=device), 1e-5, act))
    if HAS_CONV_RELU:
        out["conv2d_relu"] = (ops.conv2d_relu.default, (x, leaf(torch.randn(6, 2, 3, 3, device=device)),
                                                        leaf(torch.randn(6, device=device)), [1, 2], [1, 1], [1, 1], 2))
    return out


ALL_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_forward_ops_with_autograd(device, fmt):
    for name, (op, args) in _forward_samples(device, fmt).items():
        _opcheck(op, args, test_utils=ALL_UTILS)


# ---- forward ops == torch.nn.functional, autograd reaches the TSGB ops ------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("device", DEVICES)
def test_forward_ops_bit_identical_to_functional(device, fmt, dtype):
    f = FORMATS[fmt]
    gen = gen_of(3)
    x = f(rand((2, 6, 11, 10), gen, dtype, device))
    for w, b, s, p, d, gr in [(torch.randn(8, 3, 3, 3), torch.randn(8), [1, 1], [1, 1], [1, 1], 2),
                              (torch.randn(6, 1, 5, 3), None, [2, 1], [2, 0], [1, 2], 6),
                              (torch.randn(4, 6, 1, 1), torch.randn(4), [1, 1], [0, 0], [1, 1], 1)]:
        w, b = w.to(dtype).to(device), (b.to(dtype).to(device) if b is not None else None)
        want = F.conv2d(x, w, b, s, p, d, gr)
        got = ops.conv2d(x, w, b, s, p, d, gr)
        assert torch.equal(got, want) and got.stride() == want.stride()
        if HAS_CONV_RELU:
            got = ops.conv2d_relu(x, w, b, s, p, d, gr)
            assert torch.equal(got, F.relu(want)) and got.stride() == want.stride()
    rm, rv = torch.randn(6).to(dtype).to(device), (torch.rand(6) + 0.5).to(dtype).to(device)
    wt, bs = torch.randn(6).to(dtype).to(device), torch.randn(6).to(dtype).to(device)
    for eps in (1e-5, 1e-3):
        for wb in ((wt, bs), (None, None)):
            assert torch.equal(ops.batch_norm(x, rm, rv, *wb, eps), F.batch_norm(x, rm, rv, *wb, False, 0.0, eps))
    for geom in [([3, 3], [2, 2], [1, 1], True, False, None), ([2, 3], [], [1, 0], False, True, 4),
                 ([3, 2], [1, 3], [0, 1], True, True, None)]:
        got = ops.avg_pool2d(x, *geom)
        want = F.avg_pool2d(x, geom[0], geom[1] or None, *geom[2:])
        assert torch.equal(got, want) and got.stride() == want.stride()
    xf = rand((4, 9), gen, dtype, device)
    Wl, bl = rand((5, 9), gen, dtype, device), rand((5,), gen, dtype, device)
    assert torch.equal(ops.linear(xf, Wl, bl), F.linear(xf, Wl, bl))
    assert torch.equal(ops.linear(xf, Wl, None), F.linear(xf, Wl))


@pytest.mark.parametrize("device", DEVICES)
def test_forward_op_autograd_calls_the_backward_op(device):
    x = torch.randn(2, 4, 9, 7, device=device, dtype=torch.float64).requires_grad_(True)
    w = torch.randn(6, 2, 3, 3, device=device, dtype=torch.float64)
    y = ops.conv2d(x, w, None, [2, 2], [1, 1], [1, 1], 2)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    assert torch.equal(gx, ops.conv2d_backward(g, x.detach(), y.detach(), [3, 3], [2, 2], [1, 1], [1, 1], 2, EPS))
    if HAS_CONV_RELU:  # conv + ReLU: the conv rule on (grad at the ReLU output, ReLU output)
        yr = ops.conv2d_relu(x, w, None, [2, 2], [1, 1], [1, 1], 2)
        assert torch.equal(yr, y.relu())
        (gx,) = torch.autograd.grad(yr, x, g)
        assert torch.equal(gx, ops.conv2d_backward(g, x.detach(), yr.detach(), [3, 3], [2, 2], [1, 1],
                                                   [1, 1], 2, EPS))
    xa = (torch.rand(2, 4, 9, 7, device=device, dtype=torch.float64) + 0.5).requires_grad_(True)
    yp = ops.avg_pool2d(xa, [3, 3], [2, 2], [1, 1], True, False, None)
    gp = torch.randn_like(yp)
    (gx,) = torch.autograd.grad(yp, xa, gp)
    want = ref.avgpool_rule(gp, xa.detach(), yp.detach(), [3, 3], [2, 2], [1, 1], True, False, None)
    torch.testing.assert_close(gx, want.to(gx.device), rtol=1e-12, atol=0)


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8, eps=1e-3)
        self.dw = nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=8, bias=False)  # K != C
        self.bn2 = nn.BatchNorm2d(16)
        self.pool = nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False)
        self.conv2 = nn.Conv2d(16, 12, (3, 5), padding=(1, 2), dilation=(1, 1))
        self.hidden = nn.Linear(12, 16)
        self.fc = nn.Linear(16, 7)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.dw(x)))
        x = F.relu(self.conv2(self.pool(x)))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(F.relu(self.hidden(x)))


@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("device", DEVICES)
def test_native_model_equals_hooks_backend(device, fmt):
    torch.manual_seed(0)
    model = SmallNet().double().eval().to(device)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    x = FORMATS[fmt](torch.randn(3, 3, 21, 19, dtype=torch.float64, device=device))
    # per-sample targets with NCHW input, (N, T) targets (grad batch T*N) with channels_last
    target = [1, 4, 6] if fmt == "contiguous" else torch.tensor([[0, 3], [2, 2], [6, 5]])
    ex_native = tsgb_ext.TSGB(model, backend="native")
    got = ex_native.attribute(x, target)
    assert ex_native.last_backend == "native"
    want = tsgb_ext.TSGB(model, backend="hooks").attribute(x, target)
    assert got.shape == want.shape == (3, 1 if fmt == "contiguous" else 2, 21, 19)
    assert torch.isfinite(got).all()
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert err <= 1e-10, err


# ---- MaxPool2d whose output the model changes in place later in its forward ----------------
# Valid PyTorch (torch's max_pool2d saves its input and indices, not its output) and fine with
# the hooks backend; the native op keeps y for its backward and must not break on these.
INPLACE_AFTER_POOL = {
    "mul_": lambda y: y.mul_(0.5),
    "relu_": lambda y: torch.relu_(y),
    "iadd": lambda y: y.__iadd__(0.25),
    "fill_row": lambda y: y[:, :, :1].fill_(0.0),  # an in-place write through a view of y
}


class PoolInplaceNet(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = INPLACE_AFTER_POOL[how]
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.pool1 = nn.MaxPool2d(3, 2, 1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.pool2 = nn.MaxPool2d(2, ceil_mode=True)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        y = self.pool1(self.conv1(x))
        self.how(y)
        z = torch.relu_(self.pool2(self.conv2(y)))  # relu_(pool(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(z, 1), 1))


@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("how", sorted(INPLACE_AFTER_POOL))
def test_native_maxpool_output_changed_in_place(how, fuse):
    model = PoolInplaceNet(how).double().eval()
    x = torch.randn(2, 3, 15, 13, dtype=torch.float64)
    ex = tsgb_ext.TSGB(model, backend="native", fuse=fuse)
    got = ex.attribute(x, [1, 3])
    assert ex.last_backend == "native"
    want = tsgb_ext.TSGB(model, backend="hooks", fuse=fuse).attribute(x, [1, 3])
    assert torch.isfinite(got).all() and want.abs().max() > 0
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert err <= 1e-10, err


def _bits_equal(a, b):
    nan_a, nan_b = a.isnan(), b.isnan()
    return (a.shape == b.shape and a.dtype == b.dtype and torch.equal(nan_a, nan_b)
            and torch.equal(a[~nan_a], b[~nan_b])
            and torch.equal(a[~nan_a].signbit(), b[~nan_b].signbit()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("how", sorted(INPLACE_AFTER_POOL))
@pytest.mark.parametrize("device", DEVICES)
def test_max_pool2d_op_output_changed_in_place(device, how, fmt, dtype):
    """The op's gradient stays torch's max_pool2d gradient, bit for bit, after the output was
    changed in place (ties included: small integers)."""
    gen = gen_of(11)
    x0 = torch.randint(-3, 4, (2, 5, 11, 9), generator=gen).to(device, dtype)
    x0 = FORMATS[fmt](x0)
    args = ([3, 2], [2, 1], [1, 1], [1, 2], True)
    grads = []
    for pool in (lambda t: ops.max_pool2d(t, *args),
                 lambda t: F.max_pool2d(t, args[0], args[1], args[2], args[3], ceil_mode=args[4])):
        x = x0.detach().clone().requires_grad_(True)
        y = pool(x * 1)  # a non-leaf input, like a layer's
        INPLACE_AFTER_POOL[how](y)
        g = torch.randn(y.shape, generator=gen_of(12), dtype=torch.float64).to(device, dtype)
        (gx,) = torch.autograd.grad(y, x, g)
        grads.append(gx)
    assert _bits_equal(grads[0], grads[1])


# ---- torch.compile ------------------------------------------------------------------------
def _dynamo_or_skip():
    try:
        import torch._dynamo as dynamo
    except Exception as e:  # pragma: no cover
        pytest.skip(f"torch._dynamo is unavailable: {e}")
    if not dynamo.is_dynamo_supported():
        pytest.skip("torch.compile (dynamo) is not supported on this Python / platform")
    dynamo.reset()
    return dynamo


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph_backward_op(device):
    _dynamo_or_skip()

    def f(g, x, y):
        gx = ops.conv2d_backward(g, x, y, [3, 3], [2, 2], [1, 1], [1, 1], 2, EPS)
        return gx * torch.cat([x, x])  # relevance (T = 2 targets), fused around the custom op

    cf = torch.compile(f, fullgraph=True, backend="aot_eager", dynamic=False)
    for fmt in ("contiguous", "channels_last", "sliced_channels_last"):
        x = FORMATS[fmt](torch.randn(2, 4, 9, 7, device=device))
        y = F.conv2d(x, torch.randn(6, 2, 3, 3, device=device), None, 2, 1, 1, 2)
        g = torch.randn(4, *y.shape[1:], device=device)
        want = f(g, x, y)
        got = cf(g, x, y)
        assert torch.equal(got, want), fmt
        assert got.stride() == want.stride(), fmt


@pytest.mark.parametrize("device", DEVICES)
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
