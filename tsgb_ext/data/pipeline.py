"""TSGB over whole collections: image files in, batches of maps out (they stay on the device).

    from tsgb_ext.data import models, pipeline
    loaded = models.load_model("efficientnet-lite0", device="cuda")
    ds = pipeline.ImageFileDataset(pipeline.list_images(["photos/"]), loaded.size)
    dl = torch.utils.data.DataLoader(ds, batch_size=32, num_workers=4,
                                     collate_fn=pipeline.collate)
    for out in pipeline.explain_batches(loaded.model, dl, top_k=3, mean=loaded.mean,
                                        std=loaded.std, device="cuda"):
        out.maps      # (B, 3, H, W) on cuda: the maps of each image's 3 top classes
        out.targets   # (B, 3) class ids, out.scores (B, 3) softmax probabilities
        out.meta      # the batch's other fields (here "index", "path", "rel", "given",
                      # "failed")

Writing the maps to a folder that ``tsgb_ext.open_maps`` reads (resumable, like ``tsgb
explain``'s): :class:`tsgb_ext.io.MapStore` (``store.add_batch(out)`` for each result).

``explain_batches`` takes any iterable of batches: tensors (N, 3, H, W), ``(x, ...)`` tuples or
dicts with an ``"image"`` entry (like :func:`collate`'s). Targets: ``"top1"`` (default),
``top_k=K``, a class id or list of ids for every image, or per-image lists (a dict entry
``"target"`` of each batch, or a callable ``f(batch_meta, logits) -> list of lists``). All T maps
of an image come from one forward pass of the model (and T backward passes).
"""
from __future__ import annotations

import dataclasses
import itertools
import os
import warnings
from typing import Any, Callable, Dict, Iterable, Iterator, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..core.explainer import TSGB
from ..io.images import IMAGE_EXTENSIONS, ImageItem, list_images, open_rgb  # noqa: F401 (API)
from ..io.preprocess import Preprocessing


# ---------------------------------------------------------------------------- inputs ----
class ImageFileDataset(torch.utils.data.Dataset):
    """Images from files as (3, h, w) [0, 1] RGB tensors; a file that cannot be decoded gives
    ``{"image": None, "error": "..."}`` instead of raising (see :func:`collate`).

    ``size``: (h, w), an int, or a :class:`~tsgb_ext.io.preprocess.Preprocessing` (its size
    and crop / interpolation); ``resize``: ``crop_pct``, ``interpolation``, ``crop_mode`` of
    :func:`~tsgb_ext.io.images.open_rgb`. Items are :class:`ImageItem` or paths."""

    def __init__(self, items: Sequence[Union[ImageItem, str]],
                 size: Union[int, Tuple[int, int], Preprocessing], **resize):
        self.items = [it if isinstance(it, ImageItem) else
                      ImageItem(os.path.abspath(os.fspath(it)), os.path.basename(os.fspath(it)),
                                os.fspath(it)) for it in items]
        if isinstance(size, Preprocessing):
            resize = {**size.resize_options(), **resize}
            size = size.size
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.resize = resize  # crop_pct / interpolation / crop_mode (see open_rgb)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Dict[str, Any]:
        item = self.items[i]
        try:
            img, err = open_rgb(item.path, self.size, **self.resize), None
        except Exception as e:  # corrupt, truncated, too large, unreadable, not an image
            img, err = None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        return {"index": i, "path": item.path, "rel": item.rel, "given": item.given,
                "image": img, "error": err}


def collate(samples: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Stack the decodable samples of :class:`ImageFileDataset`: ``image`` (B, 3, h, w),
    ``index``, ``path``, ``rel`` and ``given`` of each; ``failed``: [(path, error)] of the
    others."""
    ok = [s for s in samples if s["image"] is not None]
    return {
        "image": torch.stack([s["image"] for s in ok]) if ok else torch.zeros(0, 3, 1, 1),
        "index": [s["index"] for s in ok],
        "path": [s["path"] for s in ok],
        "rel": [s.get("rel", "") for s in ok],
        "given": [s.get("given", "") for s in ok],
        "failed": [(s["path"], s["error"]) for s in samples if s["image"] is None],
    }


# --------------------------------------------------------------------------- explain ----
@dataclasses.dataclass
class ExplainedBatch:
    """The maps of one batch. ``maps`` (B, T, H, W), ``targets`` (B, T) class ids, ``scores``
    (B, T) softmax probabilities of those classes, ``valid`` (B, T) bool (False for padding when
    images have different numbers of targets), all on the device; ``meta``: the batch's other
    fields (dict batches) or {}; ``backend``: the TSGB backend that ran; ``inputs``: the batch's
    images as given (before normalisation, not moved)."""
    maps: torch.Tensor
    targets: torch.Tensor
    scores: torch.Tensor
    valid: torch.Tensor
    meta: Dict[str, Any]
    backend: str
    inputs: Optional[torch.Tensor] = None

    def numpy(self, dtype=np.float16) -> Dict[str, np.ndarray]:
        """The batch on the host as numpy arrays (maps in ``dtype``)."""
        return {"maps": self.maps.detach().to(torch.float32).cpu().numpy().astype(dtype),
                "targets": self.targets.cpu().numpy(), "scores": self.scores.cpu().numpy(),
                "valid": self.valid.cpu().numpy()}


TargetSpec = Union[str, int, Sequence[int], Callable[[Dict[str, Any], torch.Tensor], Any], None]


def _select(target: TargetSpec, top_k: Optional[int], meta: Dict[str, Any], logits: torch.Tensor
            ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(N, T) target ids and a (N, T) validity mask for the batch's logits."""
    n, k = logits.shape
    dev = logits.device
    if top_k is not None:
        if not 1 <= top_k <= k:
            raise ValueError(f"top_k must be in [1, {k}] (the model has {k} classes), got {top_k}")
        t = logits.detach().topk(top_k, dim=1).indices
        return t, torch.ones_like(t, dtype=torch.bool)
    if target is None or (isinstance(target, str) and target == "top1"):
        t = logits.detach().argmax(1, keepdim=True)
        return t, torch.ones_like(t, dtype=torch.bool)
    if isinstance(target, str):
        raise ValueError(f"target must be 'top1', an id, ids, per-image lists or a callable, "
                         f"got {target!r}")
    if callable(target):
        per = target(meta, logits)
    elif isinstance(target, int):
        per = [[target]] * n
    else:
        ids = [int(c) for c in target]
        per = [ids] * n
    per = [[int(c) for c in (p if isinstance(p, (list, tuple)) else [p])] for p in per]
    if len(per) != n:
        raise ValueError(f"{len(per)} target lists for a batch of {n} images")
    T = max(1, max(len(p) for p in per))
    t = torch.zeros(n, T, dtype=torch.long)
    valid = torch.zeros(n, T, dtype=torch.bool)
    for i, p in enumerate(per):
        for j, c in enumerate(p):
            if not 0 <= c < k:
                raise IndexError(f"target class {c} is not in [0, {k})")
            t[i, j], valid[i, j] = c, True
        if p and len(p) < T:
            t[i, len(p):] = p[0]   # padding (valid False): a class the image already has
    return t.to(dev), valid.to(dev)


def _num_targets(target: TargetSpec, top_k: Optional[int]) -> Optional[int]:
    """T, where the target spec fixes it before the forward (None: known only from it)."""
    if top_k is not None:
        return top_k
    if target is None or isinstance(target, int) or (isinstance(target, str)
                                                      and target == "top1"):
        return 1
    if isinstance(target, str) or callable(target):  # "batch" (or a bad name), f(meta, logits)
        return None
    try:
        return max(1, len(target))
    except TypeError:  # not sized: _select reports it
        return None


def _attribute_select(ex: TSGB, x: torch.Tensor, select, amp_dtype=None,
                      num_targets: Optional[int] = None
                      ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Like ``ex.attribute(x, target)`` with the targets chosen from this very forward pass:
    ``select(logits) -> ((N, T) ids, (N, T) valid)``. Returns maps, ids, valid, logits.
    ``amp_dtype``: autocast the forward pass (only: the TSGB rules then run on its saved
    low-precision activations, outside autocast). ``num_targets``: T when known in advance
    (lets ``factorize="auto"`` choose the factorised backward)."""
    chosen = {}

    def pick(logits):
        chosen["tgt"], chosen["valid"] = select(logits)
        return chosen["tgt"]
    maps, tgt, logits = ex.explain(x, pick, amp_dtype, num_targets=num_targets)
    return maps, tgt, chosen["valid"], logits


def _split_batch(batch) -> Tuple[torch.Tensor, Dict[str, Any]]:
    if isinstance(batch, torch.Tensor):
        return batch, {}
    if isinstance(batch, dict):
        meta = {k: v for k, v in batch.items() if k != "image"}
        return batch["image"], meta
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0], {"rest": batch[1:]}
    raise TypeError(f"a batch must be a tensor (N, 3, H, W), a tuple (x, ...) or a dict with "
                    f"'image', got {type(batch).__name__}")


AMP_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
              "float16": torch.float16}


def explain_batches(model_or_explainer: Union[torch.nn.Module, TSGB], batches: Iterable, *,
                    target: TargetSpec = "top1", top_k: Optional[int] = None,
                    device: Union[None, str, torch.device] = None, backend: str = "auto",
                    amp: Optional[str] = None, mean: Optional[Sequence[float]] = None,
                    std: Optional[Sequence[float]] = None, classifier=None
                    ) -> Iterator[ExplainedBatch]:
    """Explain every batch of ``batches``; yields one :class:`ExplainedBatch` per batch.

    Args:
        model_or_explainer: the classifier (on ``device``) or a :class:`TSGB` of it.
        batches: any iterable (a DataLoader, a list, a generator) of tensors (N, 3, H, W),
            tuples ``(x, ...)`` or dicts with ``"image"`` (and, for ``target="batch"``, a
            per-image ``"target"`` list of class-id lists).
        target: ``"top1"``, one class id, a list of ids (each image), ``"batch"`` (the batch's
            own ``"target"`` entry), or ``f(meta, logits) -> per-image id lists``.
        top_k: explain each image's K top classes (overrides ``target``).
        device: where to run (default: the model's parameters' device); batches are moved there.
        amp: None, ``"bf16"`` or ``"fp16"``: autocast the forward pass in that dtype (only:
            the TSGB rules then run on its saved activations outside autocast, and the maps
            come back in the batch's dtype, float32 for a float32 model).
        mean, std: when given, batches are [0, 1] RGB and are normalised on the device with
            them; else they are the model's input already.
    Maps are never copied to the host: call ``.numpy()`` on a result for that.
    """
    ex = model_or_explainer if isinstance(model_or_explainer, TSGB) else \
        TSGB(model_or_explainer, backend=backend, classifier=classifier)
    if device is None:
        p = next(ex.model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    device = torch.device(device)
    if amp is not None and amp not in AMP_DTYPES:
        raise ValueError(f"amp must be one of None, 'bf16', 'fp16', got {amp!r}")
    norm = None
    if mean is not None or std is not None:
        m = torch.tensor(mean if mean is not None else (0.0,) * 3, device=device).view(1, -1, 1, 1)
        s = torch.tensor(std if std is not None else (1.0,) * 3, device=device).view(1, -1, 1, 1)
        norm = (m, s)
    # batches are cast to the model's floating dtype (float32 images, a float64 model, ...)
    dtype = next((p.dtype for p in itertools.chain(ex.model.parameters(), ex.model.buffers())
                  if p.is_floating_point()), torch.float32)
    for batch in batches:
        x0, meta = _split_batch(batch)
        x = x0.to(device, non_blocking=True)
        x = x.double() if dtype == torch.float64 else x.float()
        if norm is not None:
            x = (x - norm[0]) / norm[1]
        x = x.to(dtype)
        if x.shape[0] == 0:
            z = torch.zeros(0, 1, *x.shape[2:], device=device)
            yield ExplainedBatch(z, z[:, :, 0, 0].long(), z[:, :, 0, 0], z[:, :, 0, 0].bool(),
                                 meta, ex.last_backend or "", x0)
            continue

        def select(logits, meta=meta):
            if target == "batch":
                return _select(lambda m, lg: m["target"], None, meta, logits)
            return _select(target, top_k, meta, logits)

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="tsgb_ext: using the pure-PyTorch")
            maps, tgt, valid, logits = _attribute_select(
                ex, x, select, AMP_DTYPES[amp] if amp else None,
                None if target == "batch" else _num_targets(target, top_k))
        probs = torch.softmax(logits.float(), 1)
        scores = probs.gather(1, tgt)
        yield ExplainedBatch(maps, tgt, scores, valid, meta, ex.last_backend or "", x0)
