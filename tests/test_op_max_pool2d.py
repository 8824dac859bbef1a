"""tsgb_ext's max_pool2d and max_pool2d_backward (the ordinary gradient; the native backend's
MaxPool2d): equal to torch's, bit for bit, on every device present, also after the output was
changed in place. Harness, layouts: tests/op_harness.py.
"""
import random

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import tsgb_ext
from conftest import require_native
from op_harness import (DTYPES, FORMATS, LAYOUTS, bits_equal, expected_format, gen_of, layout,
                        opcheck, ops)

require_native()


def _fixed_configs():
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


MAX_POOL_CFGS = _fixed_configs()


def sample_inputs(cfg, device, dtype, lay, seed):
    """max_pool2d's arguments (x, geometry) and the generator for the gradient: small integers
    (many ties, +-0 among them), one NaN and one -inf in every third sample."""
    N, C, H, W = cfg[:4]
    k, s, p, d, ceil = cfg[4:]
    gen = gen_of(seed)
    x = torch.randint(-3, 4, (N, C, H, W), generator=gen).double()
    x[torch.rand(x.shape, generator=gen) < 0.2] = -0.0
    if seed % 3 == 0:
        x.view(-1)[int(torch.randint(x.numel(), (1,), generator=gen))] = float("nan")
        x.view(-1)[int(torch.randint(x.numel(), (1,), generator=gen))] = float("-inf")
    return (layout(x.to(device, dtype), lay), list(k), list(s), list(p), list(d), ceil), gen


def _torch_pool(x, k, s, p, d, ceil):
    return F.max_pool2d(x, k, s, p, d, ceil_mode=ceil)


@pytest.mark.parametrize("lay", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("idx", range(len(MAX_POOL_CFGS)))
def test_max_pool2d_equals_torch(device, idx, dtype, lay):
    cfg = MAX_POOL_CFGS[idx]
    (x, *args), gen = sample_inputs(cfg, device, dtype, lay, idx)
    want = _torch_pool(x, *args)
    y = ops.max_pool2d(x, *args)
    assert bits_equal(y, want), f"max_pool2d {cfg} {dtype} {lay}"
    assert y.is_contiguous(memory_format=expected_format(x)) or y.shape[2] * y.shape[3] == 1
    g = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(device, dtype)
    g[torch.rand(y.shape, generator=gen) < 0.1] = -0.0
    xr = x.detach().clone().requires_grad_(True)
    (gx_want,) = torch.autograd.grad(_torch_pool(xr, *args), xr, g)
    gx = ops.max_pool2d_backward(g, x, y, *args)
    assert bits_equal(gx, gx_want), f"max_pool2d_backward {cfg} {dtype} {lay}"
    # through the op's autograd
    (gx_op,) = torch.autograd.grad(ops.max_pool2d(xr, *args), xr, g)
    assert bits_equal(gx_op, gx_want)


@pytest.mark.parametrize("fmt", FORMATS)
def test_opcheck_max_pool2d(device, fmt):
    """Both ops (schema, fake kernel, autograd registration, AOT dispatch); seed 1: no NaN
    (opcheck's comparisons take NaN != NaN)."""
    (x, *args), _ = sample_inputs(MAX_POOL_CFGS[0], device, torch.float32, fmt, seed=1)
    opcheck(ops.max_pool2d.default, (x.detach().requires_grad_(True), *args))
    y = ops.max_pool2d(x, *args)
    opcheck(ops.max_pool2d_backward.default, (torch.randn_like(y), x, y, *args))


def test_max_pool2d_bad_input(device):
    """The shared checks (common/checks.h) on every device: torch's own max_pool2d would take
    a 3-D x and word its messages differently."""
    x = torch.randn(2, 3, 8, 8, device=device)
    args = ([2, 2], [2, 2], [0, 0], [1, 1], False)
    with pytest.raises(RuntimeError, match="tsgb_ext.max_pool2d: kernel_size must be positive"):
        ops.max_pool2d(x, [0, 2], [2, 2], [0, 0], [1, 1], False)
    with pytest.raises(RuntimeError, match="tsgb_ext.max_pool2d: padding must be at most half"):
        ops.max_pool2d(x, [2, 2], [2, 2], [2, 0], [1, 1], False)
    with pytest.raises(RuntimeError, match=r"tsgb_ext.max_pool2d: x must be 4-D \(N, C, H, W\)"):
        ops.max_pool2d(x[0], *args)
    with pytest.raises(RuntimeError, match="tsgb_ext.max_pool2d: x must be a floating tensor"):
        ops.max_pool2d(x.long(), *args)
    with pytest.raises(RuntimeError, match="tsgb_ext.max_pool2d: the window .* does not fit"):
        ops.max_pool2d(x[:, :, :1], [3, 3], [1, 1], [0, 0], [1, 1], False)
    y = ops.max_pool2d(x, *args)
    bwd = ops.max_pool2d_backward
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


def test_max_pool2d_backward_uses_saved_y(device):
    """The backward finds each window's tap from x and the y it is given (the op keeps no
    indices): a y naming another tap of its window sends that output's gradient there."""
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).reshape(2, 3, 6, 6)
    x = x[..., torch.randperm(6)].contiguous().to(device)  # distinct values, maxima not in a corner
    args = ([3, 3], [2, 2], [1, 1], [1, 1], False)
    y = ops.max_pool2d(x, *args)
    g = torch.ones_like(y)
    gx = ops.max_pool2d_backward(g, x, y, *args)
    y2 = y.clone()
    y2[1, 2, 1, 1] = x[1, 2, 1, 1]  # a tap of window (1, 1) other than its maximum
    gx2 = ops.max_pool2d_backward(g, x, y2, *args)
    moved = torch.zeros_like(gx)
    moved[1, 2, 1, 1] += 1
    src = (x[1, 2] == y[1, 2, 1, 1]).nonzero()[0]
    moved[1, 2, src[0], src[1]] -= 1
    assert torch.equal(gx2 - gx, moved)


def _cuda_edge_case(gen, dtype, device, lay):
    """-inf windows (a whole plane of them), NaN windows, +-0 ties."""
    x = torch.randint(-2, 3, (2, 33, 9, 10), generator=gen).double()
    x[torch.rand(x.shape, generator=gen) < 0.3] = -0.0
    x[torch.rand(x.shape, generator=gen) < 0.4] = float("-inf")
    x[torch.rand(x.shape, generator=gen) < 0.03] = float("nan")
    x[0, 0] = float("-inf")  # a whole plane of -inf windows
    return layout(x.to(device, dtype), lay)


@pytest.mark.parametrize("lay", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_max_pool2d_backward_cuda_edge_cases(device, dtype, lay):
    """CUDA: torch's CUDA gradient bit for bit where its kernels have particular rules: windows
    whose taps are all -inf (NCHW: the first tap; channels_last: input 0), NaN windows (the
    last NaN), +-0 ties, -0.0 gradients through one and through several candidate windows,
    and half-type sums beyond the type's range (a plain cast: inf, as torch gives)."""
    if device != "cuda":
        pytest.skip("CUDA-only: torch's CUDA max_pool2d gradient rules")
    gen = gen_of(5)
    for k, s, p, d, ceil in [((3, 3), (1, 1), (1, 1), (1, 1), False),
                             ((2, 2), (2, 2), (1, 1), (1, 1), True),
                             ((3, 2), (2, 1), (1, 1), (2, 2), True),
                             ((1, 1), (2, 2), (0, 0), (1, 1), False)]:
        x = _cuda_edge_case(gen, dtype, device, lay)
        args = (list(k), list(s), list(p), list(d), ceil)
        y = ops.max_pool2d(x, *args)
        assert bits_equal(y, _torch_pool(x, *args))
        big = torch.finfo(dtype).max / 4 if dtype != torch.float64 else 1.0
        g = torch.randn(y.shape, generator=gen, dtype=torch.float64) * big
        g[torch.rand(y.shape, generator=gen) < 0.3] = -0.0
        g = g.to(device, dtype)
        xr = x.detach().clone().requires_grad_(True)
        (want,) = torch.autograd.grad(_torch_pool(xr, *args), xr, g)
        got = ops.max_pool2d_backward(g, x, y, *args)
        assert bits_equal(got, want), (k, s, p, d, ceil)
        assert got.is_contiguous(memory_format=expected_format(x))
        # the op keeps no indices: its backward never reruns torch's forward
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            ops.max_pool2d_backward(g, x, y, *args)
        assert not [e.name for e in prof.events() if "max_pool2d_with_indices" in e.name]


# ---- the output changed in place later in the model's forward ---------------------------------
# Valid PyTorch (torch's max_pool2d saves its input and indices, not its output) and fine with
# the hooks backend; the native op keeps y for its backward and must not break on these.
INPLACE_AFTER_POOL = {
    "mul_": lambda y: y.mul_(0.5),
    "relu_": lambda y: torch.relu_(y),
    "iadd": lambda y: y.__iadd__(0.25),
    "fill_row": lambda y: y[:, :, :1].fill_(0.0),  # an in-place write through a view of y
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("how", sorted(INPLACE_AFTER_POOL))
def test_max_pool2d_op_output_changed_in_place(device, how, fmt, dtype):
    """The op's gradient stays torch's max_pool2d gradient, bit for bit, after the output was
    changed in place (ties included: small integers)."""
    x0 = layout(torch.randint(-3, 4, (2, 5, 11, 9), generator=gen_of(11)).to(device, dtype), fmt)
    args = ([3, 2], [2, 1], [1, 1], [1, 2], True)
    grads = []
    for pool in (lambda t: ops.max_pool2d(t, *args), lambda t: _torch_pool(t, *args)):
        x = x0.detach().clone().requires_grad_(True)
        y = pool(x * 1)  # a non-leaf input, like a layer's
        INPLACE_AFTER_POOL[how](y)
        g = torch.randn(y.shape, generator=gen_of(12), dtype=torch.float64).to(device, dtype)
        (gx,) = torch.autograd.grad(y, x, g)
        grads.append(gx)
    assert bits_equal(grads[0], grads[1])


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
