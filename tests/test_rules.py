"""The hooks backend's rules against the literal float64 transcription of the spec."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import reference as ref
from tsgb_hooks import rules


def conv_case(n, c, k, h, w, kh, kw, s, p, d, g, bias, t=1, dtype=torch.float64):
    x = torch.randn(n, c * g, h, w, dtype=dtype)
    wt = torch.randn(k * g, c, kh, kw, dtype=dtype)
    b = torch.randn(k * g, dtype=dtype) if bias else None
    y = F.conv2d(x, wt, b, s, p, d, g)
    grad = torch.randn((t * n,) + tuple(y.shape[1:]), dtype=dtype)
    return grad, x, y, (kh, kw), (s, s), (p, p), (d, d), g


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 3), c=st.integers(1, 4), k=st.integers(1, 4), h=st.integers(5, 14),
       w=st.integers(5, 14), kh=st.integers(1, 5), kw=st.integers(1, 5), s=st.integers(1, 3),
       p=st.integers(0, 2), d=st.integers(1, 2), g=st.sampled_from([1, 2, 3]),
       bias=st.booleans(), t=st.integers(1, 3))
def test_conv_rule_matches_spec(n, c, k, h, w, kh, kw, s, p, d, g, bias, t):
    if d * (kh - 1) + 1 > h + 2 * p or d * (kw - 1) + 1 > w + 2 * p:
        return
    args = conv_case(n, c, k, h, w, kh, kw, s, p, d, g, bias, t)
    got = rules.conv2d_rule(*args)
    want = ref.conv_rule(*args)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_conv_rule_depthwise_is_group_aware():
    # depthwise with channel multiplier 2: the authors' channel-summed form would differ
    grad, x, y, *geom = conv_case(2, 1, 2, 9, 9, 3, 3, 1, 1, 1, 4, True)
    got = rules.conv2d_rule(grad, x, y, *geom)
    torch.testing.assert_close(got, ref.conv_rule(grad, x, y, *geom))
    summed = rules.conv2d_rule(grad, x, y, geom[0], geom[1], geom[2], geom[3], 1)
    assert not torch.allclose(got, summed)


def test_conv_rule_float32_close_to_float64():
    args = conv_case(2, 3, 5, 11, 13, 3, 3, 2, 1, 1, 1, True, dtype=torch.float64)
    want = ref.conv_rule(*args)
    a32 = [a.float() if isinstance(a, torch.Tensor) else a for a in args]
    got = rules.conv2d_rule(*a32)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6 * want.abs().max().item())


@pytest.mark.parametrize("k,s,p,ceil,cip,div", [
    (2, 2, 0, False, True, None), (3, 2, 1, True, False, None), (3, 1, 1, False, True, 5),
    (3, 2, 1, True, True, None), ((2, 3), (1, 2), (1, 0), False, False, None)])
def test_avgpool_rule_matches_spec(k, s, p, ceil, cip, div):
    x = torch.randn(2, 3, 9, 10, dtype=torch.float64)
    y = F.avg_pool2d(x, k, s, p, ceil, cip, div)
    g = torch.randn((4,) + tuple(y.shape[1:]), dtype=torch.float64)
    got = rules.avg_pool2d_rule(g, x, y, k, s, p, ceil, cip, div)
    torch.testing.assert_close(got, ref.avgpool_rule(g, x, y, k, s, p, ceil, cip, div))


def test_bn_rule_matches_spec():
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    rm, rv = torch.randn(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64) + 0.5
    w, b = torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    y = F.batch_norm(x, rm, rv, w, b, False, 0.0, 1e-3)
    g = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(rules.batch_norm_rule(g, x, y, 1e-3), ref.bn_rule(g, x, y, 1e-3))
    scale, shift = rules.bn_scale_shift(rm, rv, w, b, 1e-3)
    torch.testing.assert_close(x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1), y)


def test_fc_rule_matches_spec_and_conserves():
    x = torch.rand(3, 7, dtype=torch.float64)
    W = torch.randn(5, 7, dtype=torch.float64)
    g = F.one_hot(torch.tensor([1, 4, 0]), 5).double()
    wp, wn = rules.split_weight(W)
    gx = rules.linear_rule(g, x, wp, wn)
    torch.testing.assert_close(gx, ref.fc_rule(g, x, W))
    # one-hot: the relevance x * gx sums to zero
    torch.testing.assert_close((x * gx).sum(1), torch.zeros(3, dtype=torch.float64))


def test_fc_rule_zero_negative_part_is_finite():
    x = torch.zeros(2, 6)
    x[1, :3] = 1.0
    W = torch.randn(4, 6)
    W[:, :3] = W[:, :3].abs()  # class rows are positive where x[1] is non-zero: zn == 0
    g = torch.eye(4)[:2]
    wp, wn = rules.split_weight(W)
    gx = rules.linear_rule(g, x, wp, wn)
    assert torch.isfinite(gx).all()
    torch.testing.assert_close(gx, g @ wp)  # beta = 0 where |zn| == 0


def test_half_results_saturate_instead_of_inf():
    """float16 rule results beyond 65504 saturate (like the compiled kernels): an inf here
    becomes NaN (inf * 0) in the next layer (seen with --amp fp16 on a real photo)."""
    x = torch.tensor([0.0, 1e-3, -2.0, 5.0]).view(1, 4, 1, 1).half()
    y = torch.full_like(x, 3.0)
    g = torch.full_like(x, 10.0)
    out = rules.batch_norm_rule(g, x, y)
    assert torch.isfinite(out).all()
    assert out.flatten()[0].item() == torch.finfo(torch.float16).max
    pool = rules.avg_pool2d_rule(g, x, y, 1, 1, 0, False, True, None)
    assert torch.isfinite(pool).all()
