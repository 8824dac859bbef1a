import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/reference.py

import tsgb_ext  # noqa: E402

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))]


REQUIRE_NATIVE = os.environ.get("TSGB_REQUIRE_NATIVE", "0") == "1"
"""CI sets TSGB_REQUIRE_NATIVE=1: a missing or unloadable tsgb_ext._C then fails the native
tests instead of skipping them (a green run must have tested the compiled ops)."""


def _native_missing(op_names=()):
    """Why the compiled ops cannot be tested here (None when they can)."""
    if not tsgb_ext.native_available():
        return f"tsgb_ext._C (the compiled ops) is not available: {tsgb_ext.backend_info()['native_error']}"
    missing = [n for n in op_names if not hasattr(torch.ops.tsgb_ext, n)]
    return f"tsgb_ext._C was built without {', '.join(missing)}" if missing else None


def require_native(*op_names):
    """Called at module level by every test file of the compiled ops: a missing tsgb_ext._C (or
    one without the named ops) skips the whole module, or fails it when TSGB_REQUIRE_NATIVE=1."""
    why = _native_missing(op_names)
    if why is None:
        return
    if REQUIRE_NATIVE:
        pytest.fail(f"TSGB_REQUIRE_NATIVE=1: {why}", pytrace=False)
    pytest.skip(why, allow_module_level=True)


@pytest.fixture(params=DEVICES)
def device(request):
    """The device of an op test (tests/test_op_*.py), once per device present. On CUDA the
    extension must have its CUDA kernels, and float32 matmuls run without TF32 (the tolerances
    of tests/op_harness.py are for IEEE float32 arithmetic). A test that parametrises
    ``device`` itself (``parametrize("device", DEVICES)``) does not use this fixture."""
    if request.param == "cuda":
        if not torch.ops.tsgb_ext.built_with_cuda():
            pytest.fail("tsgb_ext was built without CUDA kernels (rebuild with FORCE_CUDA=1)")
        torch.backends.cuda.matmul.allow_tf32 = False
    return request.param


def native_skip_mark():
    """skipif for tests of the compiled ops: never skips when TSGB_REQUIRE_NATIVE=1."""
    return pytest.mark.skipif(not tsgb_ext.native_available() and not REQUIRE_NATIVE,
                              reason="tsgb_ext._C not built")


def backends():
    """Every backend this installation can run on CPU."""
    return ["hooks", pytest.param("native", marks=native_skip_mark())]


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
