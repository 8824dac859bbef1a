"""tf32_off (tsgb_ext.core.inputs): TF32 switched off inside the block and every switch put back
exactly, with torch's new fp32_precision API (torch >= 2.9) and with the legacy allow_tf32
flags. Runs on the CPU: the switches are process-wide settings, no GPU is needed to set them."""
import threading

import pytest
import torch

from tsgb_ext.core import inputs

cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
NEW_API = inputs._has_fp32_precision(getattr(cudnn, "conv", None))
needs_new_api = pytest.mark.skipif(not NEW_API, reason="torch < 2.9: no fp32_precision API")


def _new_state():
    return (cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision, matmul.fp32_precision)


OFF = lambda: (cudnn.conv.fp32_precision, matmul.fp32_precision) == ("ieee", "ieee")  # noqa: E731


@pytest.fixture(autouse=True)
def _keep_flags():
    """Whatever a test sets, the process gets its switches back."""
    if NEW_API:
        saved = _new_state()
        yield
        cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision, matmul.fp32_precision = saved
    else:
        saved = (cudnn.allow_tf32, matmul.allow_tf32)
        yield
        cudnn.allow_tf32, matmul.allow_tf32 = saved


@needs_new_api
@pytest.mark.parametrize("conv, mm", [("ieee", "tf32"), ("tf32", "none"), ("tf32", "tf32")])
def test_new_api_set_by_the_user(conv, mm):
    cudnn.conv.fp32_precision = conv  # conv "ieee", rnn "tf32": the legacy getter now raises
    matmul.fp32_precision = mm
    before = _new_state()
    with inputs.tf32_off(True):
        assert OFF() and cudnn.rnn.fp32_precision == before[1]  # RNNs are not touched
        with inputs.tf32_off(True):  # nested (overlapping calls): still off
            assert OFF()
        assert OFF()
    assert _new_state() == before


@needs_new_api
def test_new_api_restored_after_an_exception_and_inactive_is_a_no_op():
    cudnn.conv.fp32_precision = "ieee"
    before = _new_state()
    with pytest.raises(KeyError):
        with inputs.tf32_off(True):
            raise KeyError("boom")
    assert _new_state() == before
    matmul.fp32_precision = "tf32"
    with inputs.tf32_off(False):
        assert matmul.fp32_precision == "tf32"


def test_legacy_flags_where_the_new_api_is_missing(monkeypatch):
    """A torch without fp32_precision: the legacy flags are switched and put back."""
    monkeypatch.setattr(inputs, "_has_fp32_precision", lambda obj: False)
    cudnn.allow_tf32, matmul.allow_tf32 = True, True
    with inputs.tf32_off(True):
        assert cudnn.allow_tf32 is False and matmul.allow_tf32 is False
    assert cudnn.allow_tf32 is True and matmul.allow_tf32 is True
    cudnn.allow_tf32, matmul.allow_tf32 = False, True
    with inputs.tf32_off(True):
        assert cudnn.allow_tf32 is False and matmul.allow_tf32 is False
    assert cudnn.allow_tf32 is False and matmul.allow_tf32 is True


def test_overlapping_threads_restore_on_the_last_exit():
    """Blocks on several threads overlap: the switches stay off until the last one exits."""
    if NEW_API:
        matmul.fp32_precision = "tf32"
        read, on, off = (lambda: matmul.fp32_precision), "tf32", "ieee"
    else:
        matmul.allow_tf32 = True
        read, on, off = (lambda: matmul.allow_tf32), True, False
    inside = []

    def worker():
        with inputs.tf32_off(True):
            inside.append(read())

    with inputs.tf32_off(True):
        t = threading.Thread(target=worker)
        t.start()
        t.join()
        assert inside == [off] and read() == off  # the other thread's exit left it off
    assert read() == on
