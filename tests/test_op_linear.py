"""tsgb_ext's classifier ops: linear_backward (the classifier rule, W = W+ + W-) against the
float64 oracle reference.fc_rule, the W+ / W- split cache, and the forward op linear, on every
device present. Harness, tolerances: tests/op_harness.py.
"""
import pytest
import torch
import torch.nn.functional as F

import reference as ref
from conftest import require_native
from op_harness import (DTYPES, EPS, HALF_DTYPES, assert_close, assume_representable,
                        clamp_to, cpu64, gen_of, opcheck, ops, rand, rand64, run_property, st)

require_native()

LIN_SHAPES = [(1, 1, 10, 7), (2, 3, 64, 10), (4, 1, 512, 100), (3, 3, 33, 1000), (1, 5, 2048, 17)]
"""(N, T, in_features, out_features): grad batch T * N."""


def sample_inputs(shape, device, dtype, seed, zero_rows=False):
    """linear_backward's arguments (grad, x, W+, W-, eps): x non-negative (post-ReLU
    features) with exact zeros, a whole zero sample when zero_rows."""
    N, T, n_in, n_out = shape
    gen = gen_of(seed)
    x = rand64((N, n_in), gen, zero_frac=0.3, positive=True)
    if zero_rows:
        x[0] = 0
    w = rand64((n_out, n_in), gen) / n_in ** 0.5
    g = rand64((N * T, n_out), gen)
    x, w, g = (t.to(device, dtype) for t in (x, w, g))
    return g, x, w.clamp(min=0), w.clamp(max=0), EPS


def reference(g, x, wpos, wneg, eps):
    """reference.fc_rule, and the error scale ``mag`` (|g| @ |W+| + |g beta| @ |W-|)."""
    g, xd, wp, wn = cpu64(g, x, wpos, wneg)
    want = ref.fc_rule(g, xd, wp + wn, eps)
    xr = ref._tile(xd, g.shape[0])
    zp, zn = xr @ wp.t(), (xr @ wn.t()).abs()
    beta = torch.where(zn > eps, zp / torch.where(zn > eps, zn, torch.ones_like(zn)),
                       torch.zeros_like(zn))
    mag = g.abs() @ wp.abs() + (g * beta).abs() @ wn.abs()
    return want, mag


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", LIN_SHAPES, ids=str)
def test_linear_backward(device, shape, dtype):
    args = sample_inputs(shape, device, dtype, seed=shape[2])
    out = ops.linear_backward(*args)
    want, mag = reference(*args)
    assert_close(out, clamp_to(want, dtype), dtype, f"linear_backward {shape}", scale=mag)


@pytest.mark.parametrize("dtype", [torch.float32] + HALF_DTYPES, ids=str)
def test_linear_backward_zero_input_is_finite(device, dtype):
    """|zn| = 0 for an all-zero row: beta is defined as 0 there, never NaN / inf; also with
    non-contiguous grad and W+."""
    g, x, wp, wn, eps = sample_inputs((3, 2, 40, 12), device, dtype, seed=3, zero_rows=True)
    out = ops.linear_backward(g, x, wp, wn, eps)
    want, mag = reference(g, x, wp, wn, eps)
    assert_close(out, want, dtype, "linear zero row", scale=mag)
    out2 = ops.linear_backward(g.t().contiguous().t(), x, wp.t().contiguous().t(), wn, eps)
    assert_close(out2, want, dtype, "linear noncontiguous", scale=mag)


@st.composite
def linear_configs(draw):
    return dict(N=draw(st.integers(1, 5)), T=draw(st.integers(1, 3)),
                fin=draw(st.integers(1, 300)), fout=draw(st.integers(1, 40)),
                zero_sample=draw(st.booleans()), nonneg_classes=draw(st.integers(0, 3)),
                seed=draw(st.integers(0, 2**31 - 1)))


def _drawn_inputs(c, device, dtype):
    """The classifier's input: non-negative (after ReLU / pooling), some exact zeros; sample 0
    all zero (|zn| == 0 for every class) and classes with a zero W- row when drawn."""
    gen = gen_of(c["seed"])
    x = torch.randn((c["N"], c["fin"]), generator=gen, dtype=torch.float64).relu()
    if c["zero_sample"]:
        x[0] = 0
    Wt = torch.randn((c["fout"], c["fin"]), generator=gen, dtype=torch.float64)
    nz = min(c["nonneg_classes"], c["fout"])
    Wt[:nz] = Wt[:nz].abs()  # W- row is zero: |zn| == 0 for these classes for every sample
    g = torch.randn((c["T"] * c["N"], c["fout"]), generator=gen, dtype=torch.float64)
    return x.to(dtype).to(device), Wt.to(dtype).to(device), g.to(dtype).to(device), nz


def _check_drawn(c, device, dtype):
    x, Wt, g, nz = _drawn_inputs(c, device, dtype)
    wp, wn = Wt.clamp(min=0), Wt.clamp(max=0)
    out = ops.linear_backward(g, x, wp, wn, EPS)
    want = ref.fc_rule(g.cpu(), x.cpu(), Wt.cpu(), EPS)
    assume_representable(want, dtype)
    assert_close(out, want, dtype, f"linear_backward {c}")
    # where |zn| == 0 the rule is defined as beta = 0: gx = grad @ W+ there, never NaN / inf
    plain = (g.double() @ wp.double()).cpu()
    if c["zero_sample"]:
        rows = torch.arange(0, g.shape[0], c["N"])  # gradient rows paired with sample 0
        assert_close(out[rows], plain[rows], dtype, "linear_backward, sample with zn == 0")
    if nz:
        gonly = torch.zeros_like(g)
        gonly[:, :nz] = g[:, :nz]  # gradient only on the classes whose zn == 0
        assert_close(ops.linear_backward(gonly, x, wp, wn, EPS),
                     (gonly.double() @ wp.double()).cpu(), dtype,
                     "linear_backward, classes with zn == 0")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_linear_backward_matches_reference(device, dtype):
    run_property(linear_configs(), _check_drawn, device, dtype)


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


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
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


def test_linear_backward_empty(device):
    W = torch.randn(4, 6, device=device)
    out = ops.linear_backward(torch.randn(0, 4, device=device), torch.randn(0, 6, device=device),
                              W.clamp(min=0), W.clamp(max=0), EPS)
    assert out.shape == (0, 6)


def test_linear_backward_bad_input(device):
    """Argument checks: the messages name the op and the argument."""
    g = torch.randn(2, 4, device=device)
    x = torch.randn(2, 3, device=device)
    W = torch.randn(4, 6, device=device)
    x8, w8, g8 = (torch.randn(2, 8, device=device), torch.randn(5, 8, device=device),
                  torch.randn(2, 5, device=device))
    op = ops.linear_backward
    cases = [
        (lambda: op(g, x.unsqueeze(2), W.clamp(min=0), W.clamp(max=0), EPS), r"linear_backward: x must be 2-D"),
        (lambda: op(g.unsqueeze(0), x, W, W, EPS), r"linear_backward: grad must be 2-D"),
        (lambda: op(g, x, W[0], W, EPS), r"linear_backward: weight_pos must be 2-D"),
        (lambda: op(g.double(), x, W[:, :3], W[:, :3], EPS), r"linear_backward: grad must have dtype"),
        (lambda: op(torch.randn(3, 4, device=device), torch.randn(2, 6, device=device), W, W, EPS),
         r"linear_backward: grad batch must be a positive multiple"),
        (lambda: op(g, x, W, W, EPS), r"linear_backward: weight_pos must have shape"),
        (lambda: op(g8, x8, w8[:, :7], w8, EPS), r"weight_pos"),
        (lambda: op(g8[:1].expand(3, -1), x8, w8, w8, EPS), r"multiple"),
        (lambda: op(g8[:, :4], x8, w8, w8, EPS), r"grad must have shape"),
    ]
    for fn, pattern in cases:
        with pytest.raises(RuntimeError, match=pattern):
            fn()


# ---- the W+ / W- split cache of the classifier rule --------------------------------------------
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


# ---- opcheck and the forward op ----------------------------------------------------------------
def test_opcheck_linear_backward(device):
    opcheck(ops.linear_backward.default, sample_inputs((2, 3, 8, 5), device, torch.float32, 0))


def test_opcheck_linear_forward(device):
    opcheck(ops.linear.default, (torch.randn(3, 8, device=device).relu().requires_grad_(True),
                                 torch.randn(5, 8, device=device).requires_grad_(True),
                                 torch.randn(5, device=device)),
            test_utils=("test_schema", "test_autograd_registration", "test_faketensor",
                        "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_linear_forward_bit_identical_to_functional(device, dtype):
    gen = gen_of(3)
    xf = rand((4, 9), gen, dtype, device)
    Wl, bl = rand((5, 9), gen, dtype, device), rand((5,), gen, dtype, device)
    assert torch.equal(ops.linear(xf, Wl, bl), F.linear(xf, Wl, bl))
    assert torch.equal(ops.linear(xf, Wl, None), F.linear(xf, Wl))
