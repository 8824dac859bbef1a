"""Image files: finding them (:func:`list_images`) and reading them safely (:func:`read_rgb`,
:func:`open_rgb`, :func:`image_size`). The one image reader of the package: the batch
pipeline, ``tsgb explain``'s overlays and the evaluation benchmarks all decode through it.

Untrusted files: Pillow's decompression-bomb guard stays on and its warning (an image of more
than ``Image.MAX_IMAGE_PIXELS`` pixels) is an error here; truncated files raise
(``ImageFile.LOAD_TRUNCATED_IMAGES`` is left False); only regular files are opened (a FIFO, or a
file swapped for one, raises instead of blocking forever).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import stat
import warnings
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from .preprocess import crop_and_resize

#: File name extensions (lower case) taken as images when a folder is searched.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                    ".pgm", ".pbm")

#: Pillow modes with 16 bits per pixel (grey): scaled to [0, 1] by 65535, not clipped at 255.
_MODES_16BIT = ("I;16", "I;16L", "I;16B", "I;16N")


# ------------------------------------------------------------------------- finding ----
@dataclasses.dataclass(frozen=True)
class ImageItem:
    """One input image: ``path`` (absolute), ``rel`` (its path below the INPUT it was found in,
    or its file name for an INPUT that is a file, ``/``-separated) and ``given`` (the path as
    the INPUT spells it: ``INPUT/rel`` for a folder, INPUT itself for a file; "" when unknown)."""
    path: str
    rel: str
    given: str = ""


def _regular_file(path: str) -> bool:
    """True for a regular file (after resolving symlinks): never a FIFO, socket or device,
    whose ``open()`` could block forever."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def list_images(inputs: Sequence[str], extensions: Sequence[str] = IMAGE_EXTENSIONS,
                exclude: Sequence[str] = (), recursive: bool = True) -> List[ImageItem]:
    """The image files named by ``inputs`` (files, or folders searched recursively; with
    ``recursive=False`` a folder's own files only), in a
    stable order (sorted by absolute path), each once. Files named explicitly are taken
    whatever their extension; folders contribute files with one of ``extensions``. Only
    regular files are taken (symlinks to them included; FIFOs, sockets and devices never).
    Folders in ``exclude`` (e.g. an output folder) are skipped when the search meets them (a
    folder named in ``inputs`` is always searched). Raises FileNotFoundError for a missing
    input or one that is neither a regular file nor a folder."""
    seen = set()
    items: List[ImageItem] = []
    exts = tuple(e.lower() for e in extensions)
    skip = {os.path.realpath(os.path.abspath(os.path.expanduser(d))) for d in exclude}
    for inp in inputs:
        inp = os.fspath(inp)
        ap = os.path.abspath(os.path.expanduser(inp))
        if os.path.isdir(ap):
            found = []
            for root, dirs, files in os.walk(ap):
                dirs[:] = sorted(d for d in dirs if recursive
                                 and os.path.realpath(os.path.join(root, d)) not in skip)
                for f in sorted(files):
                    if f.lower().endswith(exts):
                        p = os.path.join(root, f)
                        if _regular_file(p):
                            rel = os.path.relpath(p, ap)
                            found.append((p, rel, os.path.join(inp, rel)))
        elif _regular_file(ap):
            found = [(ap, os.path.basename(ap), inp)]
        elif os.path.exists(ap):
            raise FileNotFoundError(f"input {inp!r}: not a regular file or a directory")
        else:
            raise FileNotFoundError(f"input {inp!r}: no such file or directory")
        for p, rel, given in found:
            if p not in seen:
                seen.add(p)
                items.append(ImageItem(p, rel.replace(os.sep, "/"), given))
    items.sort(key=lambda it: it.path)
    return items


# ------------------------------------------------------------------------- reading ----
def _open_regular(path: str):
    """``path`` opened for reading, only if it is a regular file: opened non-blocking first, so a
    FIFO (or a file swapped for one) raises instead of blocking forever."""
    f = open(path, "rb", opener=lambda p, flags: os.open(p, flags | os.O_NONBLOCK))
    try:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise OSError(f"not a regular file: {path!r}")
        os.set_blocking(f.fileno(), True)
        return f
    except BaseException:
        f.close()
        raise


@contextlib.contextmanager
def _guarded(path: str):
    """The decompression-bomb guard on (and its warning an error); Pillow's "cannot identify
    image file" error naming the path, not the file object."""
    from PIL import Image, UnidentifiedImageError
    if Image.MAX_IMAGE_PIXELS is None:  # someone switched the guard off: put it back
        Image.MAX_IMAGE_PIXELS = 89_478_485
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            yield
        except UnidentifiedImageError:
            raise UnidentifiedImageError(f"cannot identify image file {path!r}") from None


def image_size(path: str) -> Tuple[int, int]:
    """(height, width) of the image file at ``path``, from its header (nothing decoded), with
    the guards of :func:`read_rgb`."""
    from PIL import Image
    with _open_regular(path) as fh, _guarded(path), Image.open(fh) as im:
        return im.height, im.width


def read_rgb(path: str, draft: Optional[Tuple[int, int]] = None) -> np.ndarray:
    """Decode the image at ``path`` to an RGB (H, W, 3) array: uint8, or float32 on [0, 1]
    for 16-bit grey images (Pillow modes ``I;16*``, scaled by their full range: 65535 =
    white). 32-bit integer and float images (modes ``I``, ``F``), whose range is unknown, raise
    ``ValueError``; every other mode is converted to RGB by Pillow. ``draft`` = (h, w): a JPEG
    far larger than that is decoded at a reduced scale (Pillow's ``draft``), at least 2h x 2w.
    Raises for bombs, truncated files and files that are not regular (module doc)."""
    from PIL import Image
    with _open_regular(path) as fh, _guarded(path), Image.open(fh) as im:
        if draft is not None and im.format == "JPEG":
            im.draft("RGB", (2 * draft[1], 2 * draft[0]))
        if im.mode in _MODES_16BIT:
            grey = np.asarray(im).astype(np.float32) / 65535.0
            return np.repeat(grey[..., None], 3, -1)
        if im.mode in ("I", "F"):
            raise ValueError(f"unsupported pixel mode {im.mode} (32-bit "
                             f"{'integer' if im.mode == 'I' else 'float'}, range unknown): "
                             f"convert the image to 8 or 16 bits")
        return np.array(im.convert("RGB"))


def rgb_tensor(arr: np.ndarray) -> torch.Tensor:
    """An RGB (H, W, 3) uint8 or [0, 1] float array -> a (3, H, W) float32 [0, 1] tensor."""
    t = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)
    return t.float() / 255.0 if arr.dtype == np.uint8 else t.float().clamp(0, 1)


def open_rgb(path: str, size: Tuple[int, int], crop_pct: float = 1.0,
             interpolation: str = "bilinear", crop_mode: str = "center") -> torch.Tensor:
    """Decode the image at ``path`` (:func:`read_rgb`, JPEGs drafted to about 2 x ``size``) to
    a (3, h, w) float [0, 1] tensor: the central crop to the aspect ratio of ``size`` = (h, w)
    (``crop_mode="squash"``: the whole image), its central ``crop_pct``, resized with
    ``interpolation`` (see :class:`tsgb_ext.io.preprocess.Preprocessing`)."""
    arr = read_rgb(path, draft=tuple(size))
    return crop_and_resize(rgb_tensor(arr)[None], size, crop_pct, interpolation, crop_mode)[0]
