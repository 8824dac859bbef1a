"""The BatchNorm rule divides by x + 1e-10 (TSGB_SPEC.md), never by x + module.eps.

Checked three ways: (1) the independent reference (tests/reference.py) equals a second,
literal transcription of the authors' BN rule (benchmarks/authors.py: recompute y, divide by
inp + 1e-10) on models whose BNs have eps 1e-3, where the two readings differ most; (2) every
backend equals both; (3) a BN input at exactly -module.eps (the pole of the old misreading)
gives finite maps equal to the reference, fused and unfused.
"""
import copy
import os
import sys

import pytest
import torch
import torch.nn as nn

import reference as ref
import tsgb_ext
from conftest import backends, native_skip_mark

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
import _models  # noqa: E402
import authors  # noqa: E402


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def _eps_1e3(model):
    """Every BN at eps 1e-3 (TF-ported / EfficientNet / GoogLeNet style), random statistics."""
    g = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eps = 1e-3
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) * 0.02 + 1e-3)
    return model.eval()


@pytest.fixture(scope="module")
def resnet_eps3():
    torch.manual_seed(0)
    return _eps_1e3(_models.build("resnet18", num_classes=10)).double()


def test_reference_equals_authors_literal_bn_rule(resnet_eps3):
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([2, 7])
    want = ref.reference_saliency(resnet_eps3, x, t)
    # the authors' rule, y recomputed with the module's eps (the spec's reading of y)
    literal = authors.AuthorsTSGB(resnet_eps3, bn_y_eps=None).attribute(x, t)
    assert rel(literal, want) <= 1e-9
    # the old misreading (divide by x + module.eps) is far off on this model: the test can fail
    misread = authors.AuthorsTSGB(resnet_eps3, bn_y_eps=None, bn_div_eps=1e-3).attribute(x, t)
    assert rel(misread, want) > 1e-3


@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("backend", backends())
def test_backends_equal_literal_bn_rule(resnet_eps3, backend, fuse):
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([5, 1])
    literal = authors.AuthorsTSGB(resnet_eps3, bn_y_eps=None).attribute(x, t)
    got = tsgb_ext.TSGB(resnet_eps3, backend=backend, fuse=fuse).attribute(x, t)
    assert rel(got, literal) <= 1e-9


class AtPole(nn.Module):
    """conv (identity 1x1, so its output equals the image exactly) -> BN(eps 1e-3) -> ReLU ->
    conv -> BN -> ReLU -> avg pool -> linear; the first BN's input holds exact -1e-3 values."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 3, 1, bias=False)
        self.b1 = nn.BatchNorm2d(3, eps=1e-3)
        self.r1 = nn.ReLU()
        self.b0 = nn.BatchNorm2d(3, eps=1e-3)  # a standalone BN, input = the image
        self.c2 = nn.Conv2d(3, 6, 3, padding=1)
        self.b2 = nn.BatchNorm2d(6, eps=1e-3)
        self.r2 = nn.ReLU()
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(6 * 4 * 4, 5)
        with torch.no_grad():
            self.c1.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
            for b in (self.b0, self.b1, self.b2):
                b.running_mean.uniform_(-0.1, 0.1)
                b.running_var.uniform_(0.5, 1.5)
                b.weight.uniform_(0.5, 1.5)
                b.bias.uniform_(0.2, 0.4)  # y = shift != 0 where x is near 0

    def forward(self, x):
        x = self.r1(self.b1(self.c1(x))) + self.b0(x)
        x = self.pool(self.r2(self.b2(self.c2(x))))
        return self.fc(x.flatten(1))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("backend", backends())
def test_bn_input_at_minus_module_eps(backend, fuse, dtype):
    torch.manual_seed(0)
    model = AtPole().eval().to(dtype)
    x = torch.randn(2, 3, 8, 8, dtype=dtype)
    x[:, :, ::3, ::2] = -1e-3  # exactly -module.eps (in the input's dtype) at many positions
    assert (x == torch.tensor(-1e-3, dtype=dtype)).sum() > 10
    t = torch.tensor([1, 3])
    want = ref.reference_saliency(model, x, t)
    got = tsgb_ext.TSGB(model, backend=backend, fuse=fuse).attribute(x, t)
    assert torch.isfinite(got).all()
    assert rel(got, want) <= (1e-9 if dtype == torch.float64 else 1e-4)


@native_skip_mark()
def test_fused_op_divisor_is_the_spec_eps():
    """conv2d_bn_backward's BN factor is yb * y / (y + 1e-10): its result does not change when
    only bn_eps's role as a divisor would (y at -bn_eps stays finite)."""
    ops = torch.ops.tsgb_ext
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64)
    w = torch.eye(2, dtype=torch.float64).view(2, 2, 1, 1)
    y = torch.nn.functional.conv2d(x, w)
    y[0, 0, 2, 2] = -1e-3
    x[0, 0, 2, 2] = -1e-3
    rm, rv = torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    bw, bb = torch.ones(2, dtype=torch.float64), torch.full((2,), 0.3, dtype=torch.float64)
    g = torch.randn(1, 2, 5, 5, dtype=torch.float64)
    out = ops.conv2d_bn_backward(g, x, y, rm, rv, bw, bb, 1e-3, 0, [1, 1], [1, 1], [0, 0],
                                 [1, 1], 1, 1e-10)
    scale, shift = ref.bn_scale_shift(rm, rv, bw, bb, 1e-3)
    yb = y * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
    want = ref.conv_rule(ref.bn_rule(g, y, yb), x, y, (1, 1), (1, 1), (0, 0), (1, 1), 1)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, want, rtol=1e-12, atol=0)


def test_model_left_unchanged_after_pole(resnet_eps3):
    m = copy.deepcopy(resnet_eps3)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    tsgb_ext.TSGB(m, backend="hooks").attribute(torch.randn(1, 3, 32, 32, dtype=torch.float64), 0)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
