"""tsgb_ext's fused conv -> BatchNorm2d (eval) -> activation ops: conv2d_bn_backward (the conv
rule with the BN and ReLU / ReLU6 rules folded in) against the unfused float64 rules
(reference.conv_bn_act_rule), and the forward op conv2d_bn_act, on every device present.
Harness, tolerances, layouts: tests/op_harness.py; the conv configurations and sample inputs:
tests/test_op_conv2d.py.
"""
import pytest
import torch
import torch.nn.functional as F

import reference as ref
from conftest import require_native
from op_harness import (DTYPES, EPS, FORMATS, assert_close, assume_representable, capture,
                        cl, clamp_to, expected_format, gen_of, layout, opcheck, ops, rand,
                        rand64, run_property, st)
from test_op_conv2d import (ALL_UTILS, CONV_CFGS, LARGE_PLANES, cfg_id, conv_cfg,
                            conv_configs, large_plane_inputs, sample_inputs)

require_native("conv2d_bn_act", "conv2d_bn_backward")

ACT_FN = {0: lambda t: t, 1: F.relu, 2: F.relu6}


def bn_params(K, gen, dtype, device, affine=True):
    """running_mean, running_var, weight, bias of a BatchNorm2d(K) (weight, bias None when not
    affine), in the dtype the module keeps (float64 for float64 models, else float32)."""
    pd = torch.float64 if dtype == torch.float64 else torch.float32
    rm = torch.randn(K, generator=gen, dtype=torch.float64)
    rv = torch.rand(K, generator=gen, dtype=torch.float64) + 0.1
    bw = torch.randn(K, generator=gen, dtype=torch.float64) * 2
    bb = torch.randn(K, generator=gen, dtype=torch.float64) * 2
    rm, rv, bw, bb = (t.to(pd).to(device) for t in (rm, rv, bw, bb))
    return (rm, rv, bw, bb) if affine else (rm, rv, None, None)


def reference(args, bn, bn_eps, act):
    """The unfused rules for conv2d_bn_backward's (grad, x, y, geometry) and BN parameters."""
    g, x, y, k, s, p, d, G, eps = args
    scale, shift = ref.bn_scale_shift(*(t.double().cpu() if t is not None else None for t in bn),
                                      bn_eps)
    return ref.conv_bn_act_rule(g.cpu(), x.cpu(), y.cpu(), scale, shift, act, k, s, p, d, G, eps)


def check_conv_bn(idx, device, dtype, lay, act):
    """A fixed configuration (every fourth of test_op_conv2d's), BN eps 1e-3, every eighth
    without affine parameters; one more rounded product than the conv rule: 4 x the tolerance."""
    c = dict(CONV_CFGS[idx], seed=idx + 100, lx=lay, ly=lay, lg=lay)
    args = sample_inputs(c, device, dtype)
    bn = bn_params(c["K"], gen_of(idx), dtype, device, affine=bool(idx % 8))
    bn_eps = 1e-3
    out = ops.conv2d_bn_backward(*args[:3], *bn, bn_eps, act, *args[3:])
    assert out.is_contiguous(memory_format=expected_format(args[1]))
    want = clamp_to(reference(args, bn, bn_eps, act), dtype)
    assert_close(out, want, dtype, f"conv2d_bn_backward act={act} {cfg_id(c)} {lay}",
                 scale=want.abs() + want.abs().max().clamp_min(1e-30),
                 factor=4 if dtype != torch.float64 else 1)


@pytest.mark.parametrize("act", [0, 1, 2])
@pytest.mark.parametrize("lay", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("idx", list(range(0, len(CONV_CFGS), 4)))
def test_conv2d_bn_backward(device, idx, dtype, lay, act):
    check_conv_bn(idx, device, dtype, lay, act)


def _check_drawn(c, device, dtype):
    c, act, bn_eps = c
    args = sample_inputs(c, device, dtype)
    # a third of the draws: BatchNorm2d(affine=False)
    bn = bn_params(c["K"], gen_of(c["seed"] + 1), dtype, device, affine=c["seed"] % 3 != 0)
    out = ops.conv2d_bn_backward(*args[:3], *bn, bn_eps, act, *args[3:])
    want = reference(args, bn, bn_eps, act)
    assume_representable(want, dtype)
    assert_close(out, want, dtype, f"conv2d_bn_backward act={act} {c}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_conv2d_bn_backward_matches_unfused_rules(device, dtype):
    run_property(st.tuples(conv_configs(), st.sampled_from([0, 1, 2]),
                           st.sampled_from([1e-5, 1e-3])), _check_drawn, device, dtype)


@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("cfg", LARGE_PLANES)
def test_depthwise_large_planes_bn_folded(cfg, fmt):
    """The large-plane depthwise CPU path (see test_op_conv2d) with a BN folded in."""
    (g, x, y), laid = large_plane_inputs(cfg, fmt)
    C, K = x.shape[1], y.shape[1]
    rm = torch.randn(K, dtype=torch.float64)
    rv = torch.rand(K, dtype=torch.float64) + 0.5
    geom = (cfg["k"], cfg["s"], cfg["p"], cfg["d"], C)
    out = ops.conv2d_bn_backward(*laid, rm, rv, None, None, 1e-3, 1, *geom, EPS)
    scale, shift = ref.bn_scale_shift(rm, rv, None, None, 1e-3)
    want = ref.conv_bn_act_rule(g, x, y, scale, shift, 1, *geom)
    assert_close(out, want, torch.float64, f"depthwise large plane, BN folded {cfg} {fmt}")


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


def _forward_args(gen, dtype, device):
    """x, conv weight and bias, BN running_mean, running_var, weight, bias (C 6 -> K 8)."""
    x = rand((2, 6, 11, 9), gen, dtype, device)
    w, b = rand((8, 3, 3, 3), gen, dtype, device), rand((8,), gen, dtype, device)
    rm, rv = rand((8,), gen, dtype, device), rand((8,), gen, dtype, device).abs() + 0.5
    bw, bb = rand((8,), gen, dtype, device), rand((8,), gen, dtype, device)
    return x, w, b, (rm, rv, bw, bb)


def test_conv2d_bn_act_forward_and_autograd(device):
    """Outputs bit-identical to conv2d, batch_norm, relu/relu6 one after another; the autograd
    of its first output is the fused rule, equal to the unfused rules (float64)."""
    gen = gen_of(5)
    x, w, b, bn = _forward_args(gen, torch.float64, device)
    for act, fn in ACT_FN.items():
        for channels_last in (False, True):
            xx = (cl(x) if channels_last else x).detach().requires_grad_(True)
            out, y = ops.conv2d_bn_act(xx, w, b, [2, 1], [1, 1], [1, 2], 2, *bn, 1e-3, act)
            yc = F.conv2d(xx, w, b, [2, 1], [1, 1], [1, 2], 2)
            want = fn(F.batch_norm(yc, *bn[:2], *bn[2:], False, 0.0, 1e-3))
            assert torch.equal(out, want) and torch.equal(y, yc)
            assert out.stride() == want.stride() and not y.requires_grad
            g = rand(tuple(out.shape), gen, torch.float64, device)
            (gx,) = torch.autograd.grad(out, xx, g)
            scale, shift = ref.bn_scale_shift(*(t.cpu() for t in bn), 1e-3)
            want = ref.conv_bn_act_rule(g.cpu(), x.cpu(), yc.detach().cpu(), scale, shift, act,
                                        [3, 3], [2, 1], [1, 1], [1, 2], 2)
            assert_close(gx, want, torch.float64,
                         f"conv2d_bn_act autograd act={act} cl={channels_last}")


def test_conv2d_bn_act_autograd_and_cuda_graph(device):
    """float32: the fused forward op equals the unfused ops' values and its autograd (C++)
    their autograd; (CUDA) the fused backward replays under CUDA-graph capture."""
    gen = gen_of(3)
    x32 = rand64((2, 6, 15, 13), gen).float().to(device).requires_grad_(True)
    w, b = rand64((8, 3, 3, 3), gen).float().to(device), rand64((8,), gen).float().to(device)
    rm = rand64((8,), gen).float().to(device)
    rv = rand64((8,), gen, positive=True).float().to(device) + 0.5
    bw, bb = rand64((8,), gen).float().to(device), rand64((8,), gen).float().to(device)
    for act, fn in ACT_FN.items():
        out, y = ops.conv2d_bn_act(x32, w, b, [2, 1], [1, 1], [1, 2], 2, rm, rv, bw, bb, 1e-3, act)
        yc = F.conv2d(x32, w, b, [2, 1], [1, 1], [1, 2], 2)
        assert torch.equal(out, fn(F.batch_norm(yc, rm, rv, bw, bb, False, 0.0, 1e-3)))
        g = torch.randn_like(out)
        (gx,) = torch.autograd.grad(out, x32, g)
        yu = ops.conv2d(x32, w, b, [2, 1], [1, 1], [1, 2], 2)
        zu = fn(ops.batch_norm(yu, rm, rv, bw, bb, 1e-3))
        (gu,) = torch.autograd.grad(zu, x32, g)
        rel = ((gx - gu).norm() / gu.norm()).item()
        assert rel < 1e-5, (act, rel)
    if device != "cuda":
        return
    args = (g, x32.detach(), y.detach(), rm, rv, bw, bb, 1e-3, 1, [3, 3], [2, 1], [1, 1],
            [1, 2], 2, EPS)
    graph, static = capture(lambda: ops.conv2d_bn_backward(*args), warmup=2)
    g.normal_()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static, ops.conv2d_bn_backward(*args))


def test_conv2d_bn_act_bad_input(device):
    """An unknown activation code is rejected by the op's own check. A test of its own (named
    *bad_input*, so gpu_check.sh runs it in the bad-input step's process): an extension error
    that crashed the process would otherwise take the model tests after it down too."""
    x, w, b, bn = _forward_args(gen_of(5), torch.float64, device)
    ops.conv2d_bn_act(x, w, b, [1, 1], [1, 1], [1, 1], 2, *bn, 1e-3, 2)  # act 2 is fine
    for act in (3, -1):
        with pytest.raises(RuntimeError, match=r"conv2d_bn_act: act must be 0 \(none\), 1 \(ReLU\) or 2"):
            ops.conv2d_bn_act(x, w, b, [1, 1], [1, 1], [1, 1], 2, *bn, 1e-3, act)


def test_conv2d_bn_backward_bad_input(device):
    x = torch.randn(2, 3, 5, 5, device=device)
    y = torch.randn(2, 4, 5, 5, device=device)
    g = torch.randn(2, 4, 5, 5, device=device)
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


# ---- opcheck ---------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
def test_opcheck_conv2d_bn_backward(device, fmt):
    c = conv_cfg(2, 3, 4, 6, 9, 7, (3, 3), (2, 2), (1, 1), (1, 1), 2, y="conv", zero_frac=0.0,
                 lx=fmt, ly=fmt, lg=fmt)
    args = sample_inputs(c, device, torch.float32)
    s = [torch.randn(6, device=device) for _ in range(3)]
    rv = torch.rand(6, device=device) + 0.5
    opcheck(ops.conv2d_bn_backward.default, (*args[:3], s[0], rv, s[1], s[2], 1e-5, 1, *args[3:]))
    opcheck(ops.conv2d_bn_backward.default, (*args[:3], s[0], rv, None, None, 1e-3, 2, *args[3:]))


@pytest.mark.parametrize("fmt", FORMATS)
def test_opcheck_conv2d_bn_act(device, fmt):
    x = layout(torch.randn(2, 4, 9, 7, device=device), fmt).detach().requires_grad_(True)
    for act in (0, 1, 2):
        opcheck(ops.conv2d_bn_act.default, (
            x, torch.randn(6, 2, 3, 3, device=device).requires_grad_(True),
            torch.randn(6, device=device).requires_grad_(True), [1, 2], [1, 1], [1, 1], 2,
            torch.randn(6, device=device), torch.rand(6, device=device) + 0.5,
            torch.randn(6, device=device).requires_grad_(True), torch.randn(6, device=device),
            1e-5, act), test_utils=ALL_UTILS)
