"""What the ``tsgb`` commands share: the error they report (:class:`CLIError`), ``--device``,
``--backend`` and ``--out`` checks, the TF32 switch, argument types, file names made safe to
print (:func:`display`)."""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import tempfile
from typing import Callable, Optional

import torch

from ..core.backend import BACKENDS  # noqa: F401 (the --backend choices)
from ..core.inputs import tf32_off


class CLIError(Exception):
    """A problem with the command's options or environment: reported as ``tsgb: error: ...``."""


DEVICE_HELP = "auto (default: cuda if available, else cpu), cpu, cuda or cuda:N"


def resolve_device(spec: str) -> torch.device:
    """Parse ``--device`` (``auto``: cuda if available, else cpu) and check that it can be
    used here."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError) as e:
        raise CLIError(f"--device: not a torch device: {spec!r} ({e})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CLIError(f"--device {spec}: CUDA is not available "
                           f"(torch {torch.__version__}, torch.cuda.is_available() is False); "
                           f"use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise CLIError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise CLIError(f"--device must be cpu or cuda[:N], got {spec!r}")
    return dev


def check_backend(backend: str, device: torch.device) -> None:
    """Fail early, with the reason, when ``--backend native`` cannot run on ``device``."""
    if backend != "native":
        return
    from ..core import backend as backends
    if not backends.native_available(device):
        why = backends.load_error() or f"it was built without {device.type} kernels"
        raise CLIError(f"--backend native cannot run on {device}: {why}; "
                       f"use --backend hooks (pure PyTorch) or auto")


def prepare_out_dir(path: str) -> str:
    """Create ``path`` if needed and check that files can be written there."""
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise CLIError(f"--out {path}: exists and is not a directory")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise CLIError(f"--out {path}: cannot create the directory ({e.strerror or e})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise CLIError(f"--out {path}: the directory is not writable")
    try:  # os.access can be wrong (root, ACLs, read-only mounts): try for real
        with tempfile.NamedTemporaryFile(dir=path, prefix=".tsgb-write-test-"):
            pass
    except OSError as e:
        raise CLIError(f"--out {path}: the directory is not writable ({e.strerror or e})") from None
    return path


@contextlib.contextmanager
def full_fp32(device: torch.device):
    """Turn off TF32 for cuDNN convolutions and CUDA matmuls inside the block (on CUDA).

    PyTorch lets cuDNN run float32 convolutions in TF32 by default. TSGB's rules divide by
    activations (BatchNorm: by its input; conv: by sums of ``|x|``), which amplifies TF32's
    rounding: on EfficientNet-Lite0 the cat|espresso mosaic maps came out 176% off the float64
    maps with TF32 (the espresso map's mass in its tile fell from 98% to 75%) and 4.5% off
    without it (CPU float32: 11%, with the same tile fractions as float64).
    """
    with tf32_off(torch.device(device).type == "cuda"):
        yield


def int_arg(lo: int = 1, hi: Optional[int] = None) -> Callable[[str], int]:
    """argparse type: an integer >= ``lo`` (and <= ``hi``, when given)."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if hi is not None and not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"must be between {lo} and {hi}, got {v}")
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {v}")
        return v
    return parse


#: argparse type: an integer >= 1
positive_int = int_arg(1)


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def display(text: str) -> str:
    """``text`` (a file name) safe to print: control characters and undecodable bytes
    (surrogate escapes) as ``\\xNN`` / ``\\n``-style escapes."""
    def esc(m):
        c = m.group()
        if "\udc80" <= c <= "\udcff":
            return f"\\x{ord(c) - 0xdc00:02x}"
        return c.encode("unicode_escape").decode("ascii")
    return _CONTROL.sub(esc, text)
