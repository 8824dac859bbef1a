"""TSGB(model, compile=True): inside a with-block the converted forward runs under
torch.compile (the TSGB ops opaque custom ops with fake kernels); maps equal eager ones within
float32 rounding, the model is restored afterwards, bad arguments are refused."""
import pytest
import torch
import torch.nn as nn

import tsgb_ext
from conftest import assert_same, backends, snapshot

dynamo = pytest.importorskip("torch._dynamo")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = self.pool(torch.relu(self.c2(x)))
        return self.fc(x.flatten(1))


def _net():
    torch.manual_seed(0)
    m = Net().eval()
    with torch.no_grad():
        m.b1.running_mean.uniform_(-0.2, 0.2)
        m.b1.running_var.uniform_(0.5, 1.5)
    return m


@pytest.mark.parametrize("backend", backends())
def test_compiled_with_block_equals_eager(backend):
    model = _net()
    x = torch.randn(2, 3, 16, 16)
    eager = tsgb_ext.TSGB(model, backend=backend).attribute(x, [1, 3])
    before = snapshot(model)
    dynamo.reset()
    dynamo.utils.counters.clear()
    with tsgb_ext.TSGB(model, backend=backend, compile=True) as ex:
        maps = [ex.attribute(x, [1, 3]) for _ in range(3)]
        assert ex._compiled is not None
    assert dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # it did compile
    for m in maps:
        torch.testing.assert_close(m, eager, rtol=1e-4, atol=1e-6 * float(eager.abs().max()))
    assert_same(before, snapshot(model))
    dynamo.reset()


def test_compile_outside_a_with_block_runs_eagerly():
    model = _net()
    x = torch.randn(1, 3, 16, 16)
    dynamo.reset()
    dynamo.utils.counters.clear()
    got = tsgb_ext.TSGB(model, backend="hooks", compile=True).attribute(x, 0)
    assert dynamo.utils.counters["stats"]["unique_graphs"] == 0
    torch.testing.assert_close(got, tsgb_ext.TSGB(model, backend="hooks").attribute(x, 0))


def test_compile_argument_is_checked():
    with pytest.raises(TypeError, match="compile must be a bool or a dict"):
        tsgb_ext.TSGB(_net(), compile="yes")
