"""tsgb_ext's BatchNorm ops: batch_norm_backward (the BN rule on y = x * scale + shift) against
the float64 oracle reference.bn_rule, and the forward op batch_norm, on every device present.
Harness, tolerances, layouts: tests/op_harness.py.
"""
import pytest
import torch
import torch.nn.functional as F

import reference as ref
from conftest import require_native
from op_harness import (DTYPES, FORMATS, HALF_DTYPES, LAYOUTS, assert_close,
                        assume_representable, clamp_to, cpu64, expected_format, gen_of, layout,
                        opcheck, ops, rand, rand64, run_property, st)

require_native()

BN_SHAPES = [(2, 3, 16, 16, 1), (1, 8, 7, 9, 3), (3, 5, 5, 5, 1), (2, 64, 14, 14, 3),
             (1, 1, 1, 1, 1), (2, 24, 1, 1, 3), (1, 17, 33, 3, 1)]
"""(N, C, H, W, T): grad batch T * N."""


def sample_inputs(shape, device, dtype, lay="contiguous", seed=0, zero_frac=0.0, eps=1e-5):
    """batch_norm_backward's arguments (grad, x, scale, shift, eps): scale in [0.5, 1.5),
    shift small, float32 as a float32 BatchNorm2d keeps them."""
    N, C, H, W, T = shape
    gen = gen_of(seed)
    x = rand64((N, C, H, W), gen, zero_frac=zero_frac)
    g = rand64((N * T, C, H, W), gen)
    scale = (torch.rand(C, generator=gen, dtype=torch.float64) + 0.5).float().to(device)
    shift = (torch.randn(C, generator=gen, dtype=torch.float64) * 0.1).float().to(device)
    x, g = (layout(t.to(device, dtype), lay) for t in (x, g))
    return g, x, scale, shift, eps


def reference(g, x, scale, shift, eps):
    """reference.bn_rule on y = x * scale + shift (float64), and the error scale ``mag`` (the
    rule on absolute values)."""
    g, xd, sc, sh = cpu64(g, x, scale, shift)
    sc, sh = sc.view(1, -1, 1, 1), sh.view(1, -1, 1, 1)
    want = ref.bn_rule(g, xd, xd * sc + sh, eps)
    xr = ref._tile(xd, g.shape[0])
    mag = g.abs() * ((xr * sc).abs() + sh.abs()) / (xr + eps).abs()
    return want, mag


@pytest.mark.parametrize("lay", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", BN_SHAPES, ids=str)
def test_batch_norm_backward(device, shape, dtype, lay):
    args = sample_inputs(shape, device, dtype, lay, seed=sum(shape))
    out = ops.batch_norm_backward(*args)
    assert out.is_contiguous(memory_format=expected_format(args[1]))
    want, mag = reference(*args)
    assert_close(out, clamp_to(want, dtype), dtype, f"batch_norm_backward {shape} {lay}", scale=mag)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("lay", ["contiguous", "channels_last"])
def test_batch_norm_backward_zero_x_finite(device, dtype, lay):
    """x exactly 0 (post-ReLU): 1/(x+eps) = 1e5 overflows nothing in fp32, and the product is
    formed before the cast: the result must be finite (saturated where beyond fp16's range)."""
    g, x, scale, shift, eps = sample_inputs((2, 16, 9, 9, 3), device, dtype, lay, seed=5,
                                            zero_frac=0.5)
    shift = shift * 10  # make g*shift/eps exceed fp16's range for some entries
    out = ops.batch_norm_backward(g, x, scale, shift, eps)
    want, mag = reference(g, x, scale, shift, eps)
    assert_close(out, clamp_to(want, dtype), dtype, "bn zero x", scale=mag)


@st.composite
def bn_configs(draw):
    return dict(N=draw(st.integers(1, 3)), T=draw(st.integers(1, 3)), C=draw(st.integers(1, 40)),
                H=draw(st.integers(1, 12)), W=draw(st.integers(1, 12)),
                eps=draw(st.sampled_from([1e-5, 1e-3, 1e-10])),
                param_dtype=draw(st.sampled_from(["float32", "float64", "same"])),
                lx=draw(st.sampled_from(LAYOUTS)), lg=draw(st.sampled_from(LAYOUTS)),
                seed=draw(st.integers(0, 2**31 - 1)))


def _check_drawn(c, device, dtype):
    """x away from 0, scale and shift normal in the drawn parameter dtype; y as the eval BN
    computes it, the affine map, here exactly in float64."""
    gen = gen_of(c["seed"])
    x = rand((c["N"], c["C"], c["H"], c["W"]), gen, dtype, device, away_from_zero=True)
    g = rand((c["T"] * c["N"], c["C"], c["H"], c["W"]), gen, dtype, device)
    pd = dtype if c["param_dtype"] == "same" else getattr(torch, c["param_dtype"])
    scale = torch.randn((c["C"],), generator=gen, dtype=torch.float64).to(pd).to(device)
    shift = torch.randn((c["C"],), generator=gen, dtype=torch.float64).to(pd).to(device)
    out = ops.batch_norm_backward(layout(g, c["lg"]), layout(x, c["lx"]), scale, shift, c["eps"])
    y64 = x.double() * scale.double().view(1, -1, 1, 1) + shift.double().view(1, -1, 1, 1)
    want = ref.bn_rule(g.cpu(), x.cpu(), y64.cpu(), c["eps"])
    assume_representable(want, dtype)
    assert_close(out, want, dtype, f"batch_norm_backward {c}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_batch_norm_backward_matches_reference(device, dtype):
    run_property(bn_configs(), _check_drawn, device, dtype)


def test_batch_norm_backward_empty(device):
    x = torch.randn(0, 3, 5, 5, device=device).contiguous(memory_format=torch.channels_last)
    out = ops.batch_norm_backward(torch.randn(0, 3, 5, 5, device=device), x,
                                  torch.randn(3, device=device), torch.randn(3, device=device), 1e-5)
    assert out.shape == (0, 3, 5, 5)


def test_batch_norm_backward_output_format_follows_x(device):
    for lx, lo in (("channels_last", "contiguous"), ("contiguous", "channels_last")):
        g, x, scale, shift, eps = sample_inputs((2, 4, 9, 7, 2), device, torch.float32, lx)
        out = ops.batch_norm_backward(layout(g, lo), x, scale, shift, eps)
        if lx == "contiguous":
            assert out.is_contiguous(), lx  # x decides, not grad
        else:
            assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()


def test_batch_norm_backward_bad_input(device):
    """Argument checks: the messages name the op and the argument."""
    g = torch.randn(2, 4, 5, 5, device=device)
    xb = torch.randn(2, 4, 5, 5, device=device)
    s = torch.randn(4, device=device)
    op = ops.batch_norm_backward
    cases = [
        (lambda: op(g.unsqueeze(0), xb, s, s, 1e-5), r"batch_norm_backward: grad must be 4-D"),
        (lambda: op(g, xb[0], s, s, 1e-5), r"batch_norm_backward: x must be 4-D"),
        (lambda: op(g, xb, s.view(2, 2), s, 1e-5), r"batch_norm_backward: scale must (have shape|be 1-D)"),
        (lambda: op(g, xb, s, s[:3], 1e-5), r"batch_norm_backward: shift must (have shape|be 1-D)"),
        (lambda: op(g, xb, s[:3], s, 1e-5), r"batch_norm_backward: scale"),
        (lambda: op(g.double(), xb, s, s, 1e-5), r"batch_norm_backward: grad must have dtype"),
        (lambda: op(g[:1], xb, s, s, 1e-5), r"batch_norm_backward: grad batch must be a positive multiple"),
        (lambda: op(g[:1].expand(3, -1, -1, -1), xb, s, s, 1e-5), r"multiple"),
        (lambda: op(g[:, :3], xb, s, s, 1e-5), r"batch_norm_backward: grad must have shape"),
    ]
    for fn, pattern in cases:
        with pytest.raises(RuntimeError, match=pattern):
            fn()


@pytest.mark.parametrize("fmt", FORMATS)
def test_opcheck_batch_norm_backward(device, fmt):
    g, x, _, _, eps = sample_inputs((2, 4, 9, 7, 2), device, torch.float32)
    xa = layout(x.abs() + 0.5, fmt)
    opcheck(ops.batch_norm_backward.default, (layout(g, fmt), xa, torch.randn(4, device=device),
                                              torch.randn(4, device=device), eps))


@pytest.mark.parametrize("fmt", FORMATS)
def test_opcheck_batch_norm_forward(device, fmt):
    xa = layout(torch.randn(2, 4, 9, 7, device=device).abs() + 0.5, fmt).detach().requires_grad_(True)
    opcheck(ops.batch_norm.default, (xa, torch.randn(4, device=device),
                                     torch.rand(4, device=device) + 0.5,
                                     torch.randn(4, device=device).requires_grad_(True),
                                     torch.randn(4, device=device), 1e-5),
            test_utils=("test_schema", "test_autograd_registration", "test_faketensor",
                        "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fmt", FORMATS)
def test_batch_norm_forward_bit_identical_to_functional(device, fmt, dtype):
    x = layout(rand((2, 6, 11, 10), gen_of(3), dtype, device), fmt)
    rm, rv = torch.randn(6).to(dtype).to(device), (torch.rand(6) + 0.5).to(dtype).to(device)
    wt, bs = torch.randn(6).to(dtype).to(device), torch.randn(6).to(dtype).to(device)
    for eps in (1e-5, 1e-3):
        for wb in ((wt, bs), (None, None)):
            assert torch.equal(ops.batch_norm(x, rm, rv, *wb, eps),
                               F.batch_norm(x, rm, rv, *wb, False, 0.0, eps))
