import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/reference.py

import tsgb_ext  # noqa: E402

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))]


def backends():
    """Every backend this installation can run on CPU."""
    out = ["hooks"]
    out.append(pytest.param("native", marks=pytest.mark.skipif(
        not tsgb_ext.native_available(), reason="tsgb_ext._C not built")))
    return out


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def snapshot(model):
    """Everything the explainer promises to leave untouched."""
    return {
        "modules": [(n, id(m), type(m)) for n, m in model.named_modules()],
        "dicts": [(n, sorted(k for k in m.__dict__ if not k.startswith("_"))) for n, m in model.named_modules()],
        "forwards": [(n, m.__dict__.get("forward")) for n, m in model.named_modules()],
        "training": [(n, m.training) for n, m in model.named_modules()],
        "inplace": [(n, getattr(m, "inplace", None)) for n, m in model.named_modules()],
        "requires_grad": [(n, p.requires_grad) for n, p in model.named_parameters()],
        "grads": [(n, p.grad) for n, p in model.named_parameters()],
        "hooks": [(n, len(m._forward_hooks), len(m._backward_hooks), len(m._forward_pre_hooks))
                  for n, m in model.named_modules()],
        "state": {k: v.clone() for k, v in model.state_dict().items()},
    }


def assert_same(a, b):
    for key in a:
        if key == "state":
            assert a[key].keys() == b[key].keys()
            for k in a[key]:
                assert torch.equal(a[key][k], b[key][k]), k
        else:
            assert a[key] == b[key], key
