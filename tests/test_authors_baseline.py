"""The benchmarks' "before" row (benchmarks/authors.py, the authors' formulation with its
recomputed convolutions) must compute the same maps as tsgb_ext on groups == 1 models, and
benchmarks/_models.py must be the torchvision architectures."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))

import _models  # noqa: E402
import authors  # noqa: E402
import tsgb_ext  # noqa: E402
from conftest import backends  # noqa: E402

SIZE = 64


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("variant", ["published", "full"])
@pytest.mark.parametrize("name", ["vgg11", "resnet18"])
def test_authors_equals_tsgb_float64(name, variant):
    model = _models.build(name, num_classes=10).double()
    x = torch.randn(2, 3, SIZE, SIZE, dtype=torch.float64)
    t = torch.tensor([3, 7])
    ref = tsgb_ext.TSGB(model, backend="hooks").attribute(x, t)
    got = authors.AuthorsTSGB(model, variant=variant).attribute(x, t)
    assert got.shape == ref.shape == (2, 1, SIZE, SIZE)
    assert _rel(got, ref) < 1e-12


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("name", ["vgg11", "resnet18"])
def test_authors_equals_tsgb_float32(name, backend):
    model = _models.build(name, num_classes=10)
    x = torch.randn(2, 3, SIZE, SIZE)
    t = torch.tensor([1, 5])
    ref = tsgb_ext.TSGB(model, backend=backend).attribute(x, t)
    with authors.AuthorsTSGB(model) as ex:
        got = ex.attribute(x, t)
        again = ex.attribute(x, t)
    assert torch.equal(got, again)
    # float32 rounding only (tsgb_ext computes the classifier rule in float64)
    assert _rel(got, ref) < 1e-4


def test_authors_multi_target_and_default_target():
    model = _models.build("resnet18", num_classes=10).double()
    x = torch.randn(2, 3, SIZE, SIZE, dtype=torch.float64)
    tt = torch.tensor([[1, 4], [6, 2]])
    with authors.AuthorsTSGB(model) as ex:
        both = ex.attribute(x, tt)
        one = torch.cat([ex.attribute(x, tt[:, j]) for j in range(2)], 1)
        top = ex.attribute(x)
        top_ref = ex.attribute(x, model(x).argmax(1))
    assert both.shape == (2, 2, SIZE, SIZE)
    assert _rel(both, one) < 1e-12
    assert torch.equal(top, top_ref)


def test_authors_old_bn_divisor_differs():
    """The module-eps divisor this project once used (bn_div_eps=1e-5) gives other maps."""
    model = _models.build("resnet18", num_classes=10).double()
    x = torch.randn(1, 3, SIZE, SIZE, dtype=torch.float64)
    a = authors.AuthorsTSGB(model).attribute(x, 3)
    b = authors.AuthorsTSGB(model, bn_div_eps=1e-5).attribute(x, 3)
    assert _rel(b, a) > 1e-6


def test_authors_restores_model():
    model = _models.build("resnet18", num_classes=10)
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        before = model(x)
    inplace = {n: m.inplace for n, m in model.named_modules() if hasattr(m, "inplace")}
    with authors.AuthorsTSGB(model) as ex:
        ex.attribute(x, 0)
        assert not any(m.inplace for m in model.modules() if hasattr(m, "inplace"))
    for m in model.modules():
        assert "forward" not in m.__dict__
        assert not any(k.startswith("_authors") for k in m.__dict__)
    assert inplace == {n: m.inplace for n, m in model.named_modules() if hasattr(m, "inplace")}
    with torch.no_grad():
        assert torch.equal(model(x), before)


@pytest.mark.parametrize("name", ["vgg11", "vgg16", "resnet18", "resnet50"])
def test_bench_models_are_torchvision_architectures(name):
    tv = pytest.importorskip("torchvision")
    ours = _models.build(name)
    theirs = getattr(tv.models, name)(weights=None).eval()
    sd_ours, sd_theirs = ours.state_dict(), theirs.state_dict()
    assert list(sd_ours) == list(sd_theirs)
    assert all(sd_ours[k].shape == sd_theirs[k].shape for k in sd_ours)
    theirs.load_state_dict(sd_ours)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))
    conv = lambda m: [(type(a).__name__, getattr(a, "stride", None)) for a in m.modules()]  # noqa
    assert conv(ours) == conv(theirs)
