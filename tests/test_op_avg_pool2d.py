"""tsgb_ext's AvgPool ops: avg_pool2d_backward (the AvgPool rule) against the float64 oracle
reference.avgpool_rule, and the forward op avg_pool2d, on every device present. Harness,
tolerances, layouts: tests/op_harness.py.
"""
import random

import pytest
import torch
import torch.nn.functional as F

import reference as ref
from conftest import require_native
from op_harness import (DTYPES, EPS, FORMATS, LAYOUTS, assert_close, assume_representable,
                        clamp_to, cpu64, expected_format, gen_of, layout, opcheck, ops, rand,
                        rand64, run_property, st)

require_native()


def _fixed_configs():
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


POOL_CFGS = _fixed_configs()


def sample_inputs(cfg, device, dtype, lay="contiguous", seed=0):
    """avg_pool2d_backward's arguments (grad, x, y, geometry, eps): an independent random y."""
    N, T, C, H, W, ks, stride, padding, ceil_mode, cip, divisor = cfg
    gen = gen_of(seed)
    x = rand64((N, C, H, W), gen, zero_frac=0.1)
    yshape = F.avg_pool2d(x, ks, stride, padding, ceil_mode, cip, divisor).shape
    y = rand64(tuple(yshape), gen)
    g = rand64((N * T,) + tuple(yshape[1:]), gen)
    x, y, g = (layout(t.to(device, dtype), lay) for t in (x, y, g))
    return g, x, y, list(ks), list(stride), list(padding), ceil_mode, cip, divisor, EPS


def reference(g, x, y, ks, stride, padding, ceil_mode, cip, divisor, eps):
    """reference.avgpool_rule, and the error scale ``mag`` (the rule on absolute values)."""
    g, xd, yd = cpu64(g, x, y)
    want = ref.avgpool_rule(g, xd, yd, ks, stride, padding, ceil_mode, cip, divisor, eps)
    xr, yr = ref._tile(xd, g.shape[0]), ref._tile(yd, g.shape[0])
    bw = torch.ops.aten.avg_pool2d_backward
    mag = bw((g * yr).abs(), xr, ks, stride, padding, ceil_mode, cip, divisor) / (xr + eps).abs()
    return want, mag


def check_pool(cfg, device, dtype, lay, seed):
    args = sample_inputs(cfg, device, dtype, lay, seed)
    out = ops.avg_pool2d_backward(*args)
    assert out.is_contiguous(memory_format=expected_format(args[1]))
    want, mag = reference(*args)
    assert_close(out, clamp_to(want, dtype), dtype, f"avg_pool2d_backward {cfg} {lay}", scale=mag)


@pytest.mark.parametrize("lay", LAYOUTS)
@pytest.mark.parametrize("cfg", POOL_CFGS, ids=str)
def test_avg_pool2d_backward_fp32(device, cfg, lay):
    check_pool(cfg, device, torch.float32, lay, seed=1)


@pytest.mark.parametrize("lay", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("idx", list(range(0, len(POOL_CFGS), 3)))
def test_avg_pool2d_backward_dtypes(device, idx, dtype, lay):
    check_pool(POOL_CFGS[idx], device, dtype, lay, seed=idx + 2)


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


def _check_drawn(c, device, dtype):
    """x away from 0, y = the pool of x (float32 for the half types)."""
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
    assert_close(out, want, dtype, f"avg_pool2d_backward {c}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_avg_pool2d_backward_matches_reference(device, dtype):
    run_property(pool_configs(empty_stride=device == "cpu"), _check_drawn, device, dtype)


def test_avg_pool2d_backward_empty(device):
    x = torch.randn(0, 3, 5, 5, device=device)
    yp = F.avg_pool2d(x, 2)
    out = ops.avg_pool2d_backward(torch.randn(0, *yp.shape[1:], device=device), x, yp, [2, 2],
                                  [2, 2], [0, 0], False, True, None, EPS)
    assert out.shape == (0, 3, 5, 5)


def test_avg_pool2d_backward_output_format_follows_x(device):
    cfg = (2, 2, 4, 9, 7, (3, 3), (2, 2), (1, 1), False, True, None)
    for lx, lo in (("channels_last", "contiguous"), ("contiguous", "channels_last")):
        g, x, y, *geom = sample_inputs(cfg, device, torch.float32, lx)
        out = ops.avg_pool2d_backward(layout(g, lo), x, layout(y, lo), *geom)
        if lx == "contiguous":
            assert out.is_contiguous(), lx  # x decides, not grad or y
        else:
            assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()


def test_avg_pool2d_backward_bad_input(device):
    """Argument checks: the messages name the op and the argument."""
    xb = torch.randn(2, 4, 5, 5, device=device)
    gp = torch.randn(2, 4, 2, 2, device=device)
    yp = torch.randn(2, 4, 2, 2, device=device)
    x = torch.randn(2, 4, 8, 8, device=device)
    y = torch.randn(2, 4, 4, 4, device=device)
    geom = ([2, 2], [2, 2], [0, 0], False, True, None, EPS)
    op = ops.avg_pool2d_backward
    cases = [
        (lambda: op(gp, xb, yp[0], *geom), r"avg_pool2d_backward: y must be 4-D"),
        (lambda: op(gp[0], xb, yp, *geom), r"avg_pool2d_backward: grad must be 4-D"),
        (lambda: op(gp, xb, yp.double(), *geom), r"avg_pool2d_backward: y must have dtype"),
        (lambda: op(torch.cat([gp, gp[:1]]), xb, yp, *geom),
         r"avg_pool2d_backward: grad batch must be a positive multiple"),
        (lambda: op(y[:1].expand(3, -1, -1, -1), x, y, *geom), r"multiple"),
        (lambda: op(gp, xb, yp, [2, 2], [2, 2], [2, 2], False, True, None, EPS),
         r"avg_pool2d_backward: padding must be at most half of kernel_size"),
        (lambda: op(y, x, y[:, :, :3], *geom), r"y must have shape"),
    ]
    for fn, pattern in cases:
        with pytest.raises(RuntimeError, match=pattern):
            fn()


@pytest.mark.parametrize("fmt", FORMATS)
def test_opcheck_avg_pool2d_backward(device, fmt):
    cfg = (2, 1, 4, 9, 7, (3, 3), (2, 2), (1, 1), True, False, None)
    opcheck(ops.avg_pool2d_backward.default, sample_inputs(cfg, device, torch.float32, fmt))


@pytest.mark.parametrize("fmt", FORMATS)
def test_opcheck_avg_pool2d_forward(device, fmt):
    xa = layout(torch.randn(2, 4, 9, 7, device=device).abs() + 0.5, fmt).detach().requires_grad_(True)
    utils = ("test_schema", "test_autograd_registration", "test_faketensor",
             "test_aot_dispatch_dynamic")
    opcheck(ops.avg_pool2d.default, (xa, [3, 3], [2, 2], [1, 1], True, False, None), test_utils=utils)
    opcheck(ops.avg_pool2d.default, (xa, [2, 3], [], [1, 0], False, True, 5), test_utils=utils)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fmt", FORMATS)
def test_avg_pool2d_forward_bit_identical_to_functional(device, fmt, dtype):
    x = layout(rand((2, 6, 11, 10), gen_of(3), dtype, device), fmt)
    for geom in [([3, 3], [2, 2], [1, 1], True, False, None), ([2, 3], [], [1, 0], False, True, 4),
                 ([3, 2], [1, 3], [0, 1], True, True, None)]:
        got = ops.avg_pool2d(x, *geom)
        want = F.avg_pool2d(x, geom[0], geom[1] or None, *geom[2:])
        assert torch.equal(got, want) and got.stride() == want.stride()


def test_avg_pool2d_forward_autograd_calls_the_rule(device):
    xa = (torch.rand(2, 4, 9, 7, device=device, dtype=torch.float64) + 0.5).requires_grad_(True)
    yp = ops.avg_pool2d(xa, [3, 3], [2, 2], [1, 1], True, False, None)
    gp = torch.randn_like(yp)
    (gx,) = torch.autograd.grad(yp, xa, gp)
    want = ref.avgpool_rule(gp, xa.detach(), yp.detach(), [3, 3], [2, 2], [1, 1], True, False, None)
    torch.testing.assert_close(gx, want.to(gx.device), rtol=1e-12, atol=0)
