"""TSGB(model, compile=True): inside a with-block the converted forward runs under
torch.compile (the TSGB ops opaque custom ops with fake kernels); maps equal eager ones within
float32 rounding, the model is restored afterwards, bad arguments are refused."""
import copy

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


# ---- compiled models, several targets, failures in __enter__ (issue 19) ----------------------
class Head(nn.Module):
    """Two Linears: the classifier is the last one run, so it is found at run time."""

    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(8 * 4 * 4, 12)
        self.out = nn.Linear(12, 5)

    def forward(self, x):
        return self.out(torch.relu(self.hidden(x.flatten(1))))


class TwoLinearNet(Net):
    def __init__(self):
        super().__init__()
        self.fc = Head()


def _two_linear_net():
    torch.manual_seed(1)
    return TwoLinearNet().eval().double()


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("how", ["whole", "submodule", "module.compile"])
def test_compiled_model_explained_as_its_module(backend, how):
    """TSGB(torch.compile(model)), a compiled submodule holding the classifier, or
    ``module.compile()`` in place: the maps are the uncompiled model's (no classifier
    named: the compiled graph would have baked in which Linear is the classifier)."""
    model = _two_linear_net()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    want = tsgb_ext.TSGB(model, backend=backend).attribute(x, [1, 3])
    dynamo.reset()
    if how == "whole":
        subject = torch.compile(model)
    elif how == "submodule":
        subject = copy.deepcopy(model)
        subject.fc = torch.compile(subject.fc)
    else:
        subject = copy.deepcopy(model)
        subject.fc.compile()
    before = snapshot(subject)
    subject(x)  # compiled once before TSGB sees it
    got = tsgb_ext.TSGB(subject, backend=backend).attribute(x, [1, 3])
    assert _rel(got, want) < 1e-10
    with tsgb_ext.TSGB(subject, backend=backend) as ex:
        assert _rel(ex.attribute(x, [1, 3]), want) < 1e-10
        assert _rel(ex.attribute(x, [1, 3]), want) < 1e-10
    assert_same(before, snapshot(subject))
    dynamo.reset()


@pytest.mark.parametrize("backend", backends())
def test_compiled_with_block_several_targets(backend):
    """(N, T) targets and explain(x, topk) in a compiled with-block: T backward passes over one
    compiled forward (its saved tensors are not donated to the first backward)."""
    model = _net()
    x = torch.randn(2, 3, 16, 16)
    tgt = torch.tensor([[1, 3, 0], [4, 2, 2]])
    want = tsgb_ext.TSGB(model, backend=backend).attribute(x, tgt)
    dynamo.reset()
    dynamo.utils.counters.clear()
    with tsgb_ext.TSGB(model, backend=backend, compile=True) as ex:
        for _ in range(3):  # one target first: its backward compiled with retain_graph=False
            ex.attribute(x, 1)
        got = [ex.attribute(x, tgt) for _ in range(3)]
        maps, classes, _ = ex.explain(x, lambda logits: logits.topk(2).indices)
    assert dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    for g in got:
        torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-6 * float(want.abs().max()))
    torch.testing.assert_close(maps, tsgb_ext.TSGB(model, backend=backend).attribute(x, classes),
                               rtol=1e-4, atol=1e-6 * float(want.abs().max()))
    dynamo.reset()


@pytest.mark.parametrize("opts, exc, match", [
    ({"mode": "nonsense"}, ValueError, "torch.compile refused"),
    ({"backend": "no-such-backend"}, ValueError, "torch.compile refused"),
    ({"fullgraf": True}, TypeError, "not torch.compile keyword arguments"),
    ({1: True}, TypeError, "keyword names must be strings"),
])
def test_bad_compile_options_refused_before_converting(opts, exc, match):
    model = _net()
    before = snapshot(model)
    with pytest.raises(exc, match=match):
        tsgb_ext.TSGB(model, compile=opts)
    assert_same(before, snapshot(model))


def test_compile_failure_in_enter_restores_the_model(monkeypatch):
    """Whatever fails while a with-block is entered, the model is restored and the explainer
    can be entered again."""
    model = _net()
    before = snapshot(model)
    ex = tsgb_ext.TSGB(model, compile=True)

    def boom(*a, **k):
        raise RuntimeError("compile failed")
    monkeypatch.setattr(torch, "compile", boom)
    with pytest.raises(RuntimeError, match="compile failed"):
        ex.__enter__()
    assert_same(before, snapshot(model))
    monkeypatch.undo()
    with ex:  # not "already active"
        ex.attribute(torch.randn(1, 3, 16, 16), 0)
    assert_same(before, snapshot(model))

    from tsgb_ext.convert import conversion

    def fail_apply(self):
        self._set_forward(self.model, lambda x: x)
        raise RuntimeError("conversion failed")
    monkeypatch.setattr(conversion.Conversion, "_apply", fail_apply)
    with pytest.raises(RuntimeError, match="conversion failed"):
        ex.__enter__()
    assert_same(before, snapshot(model))


def test_empty_compile_dict_compiles():
    model = _net()
    x = torch.randn(1, 3, 16, 16)
    dynamo.reset()
    dynamo.utils.counters.clear()
    with tsgb_ext.TSGB(model, compile={}) as ex:
        for _ in range(3):
            ex.attribute(x, 0)
        assert ex._compiled is not None
    assert dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    dynamo.reset()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_checks_once_and_compiles(dtype):
    """The degenerate-layer check cannot tell in float16/bfloat16 and is not run there, so a
    compiled with-block uses its compiled forward from the second call on."""
    model = _net()
    x = torch.randn(1, 3, 16, 16)
    dynamo.reset()
    dynamo.utils.counters.clear()
    with tsgb_ext.TSGB(model, backend="hooks", compile=True) as ex:
        for _ in range(3):
            ex.explain(x, lambda logits: logits.argmax(1, keepdim=True), amp_dtype=dtype)
    assert dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    dynamo.reset()
