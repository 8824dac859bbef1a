"""Checks across the compiled ops, on every device present: a model whose layers all run
through them equals the hooks backend, every backward op is capturable in one CUDA graph (no
host syncs), and tensors on mismatched devices are refused with messages that name the
argument. Each op's own tests: tests/test_op_<op>.py; harness: tests/op_harness.py."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import tsgb_ext
from conftest import require_native
from op_harness import EPS, capture, cuda_only, layout, ops

require_native()


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
    x = layout(torch.randn(3, 3, 21, 19, dtype=torch.float64, device=device), fmt)
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


def test_all_ops_cuda_graph(device):
    cuda_only(device)
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8, device=device)
    g = torch.randn(6, 4, 8, 8, device=device)
    y = torch.randn(2, 4, 4, 4, device=device)
    gp = torch.randn(6, 4, 4, 4, device=device)
    sc, sh = torch.rand(4, device=device) + 0.5, torch.randn(4, device=device)
    xl = torch.rand(2, 16, device=device)
    w = torch.randn(5, 16, device=device)
    gl = torch.randn(6, 5, device=device)

    def run():
        return (ops.batch_norm_backward(g, x, sc, sh, 1e-5),
                ops.avg_pool2d_backward(gp, x, y, [2, 2], [2, 2], [0, 0], False, True, None, EPS),
                ops.linear_backward(gl, xl, w.clamp(min=0), w.clamp(max=0), EPS))

    graph, static = capture(run)
    x.mul_(1.5)
    gl.mul_(-2.0)
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(static, run()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (a second device)")
def test_bad_input_mismatched_devices():
    x = torch.randn(2, 3, 5, 5, device="cuda")
    y = torch.randn(2, 4, 5, 5, device="cuda")
    g = torch.randn(2, 4, 5, 5, device="cuda")
    W = torch.randn(4, 6, device="cuda")
    conv = ops.conv2d_backward
    geom = ([3, 3], [1, 1], [1, 1], [1, 1], 1, EPS)
    with pytest.raises(RuntimeError, match=r"conv2d_backward: grad must be on cuda"):
        conv(g.cpu(), x, y, *geom)
    with pytest.raises(RuntimeError, match=r"conv2d_backward: y must be on cuda"):
        conv(g, x, y.cpu(), *geom)
    s = torch.randn(4)
    xb = torch.randn(2, 4, 5, 5, device="cuda")
    with pytest.raises(RuntimeError, match=r"batch_norm_backward: scale must be on cuda"):
        ops.batch_norm_backward(g, xb, s, s.cuda(), 1e-5)
    with pytest.raises(RuntimeError, match=r"linear_backward: weight_neg must be on cuda"):
        ops.linear_backward(g[:, :, 0, 0], torch.randn(2, 6, device="cuda"), W, W.cpu(), EPS)
