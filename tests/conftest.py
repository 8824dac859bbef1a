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
