"""``tsgb explain INPUT... --out DIR``: TSGB maps of whole collections of images.

Outputs in DIR (the storage rules, lock and resume are in :mod:`tsgb_ext.cli._store`):

* ``shards/<RUN>-r<RANK>-<SEQ>.npy``: float16 (``--map-dtype``) arrays (M, H, W), one map per row
  (``--format npy``), and ``shards/<RUN>-r<RANK>-<SEQ>.csv``: the shard's index rows, each
  file written whole or not at all; a shard holds all the targets of each of its images;
* ``png/<name>-<hash>.png``: one overlay figure per image (``--format png``);
* ``index.csv``: one row per image and target: ``image, target, class_name, score, rank,
  shard, row, png`` (``numpy.load(DIR/shard)[row]`` is that map; ``rank`` is the target's place
  among the image's targets, 1 = first), sorted by image, then rank; written at the end (and
  when a one-process run is interrupted) from the shards' row files. ``--resume`` skips the
  images whose shard is complete: an interrupted run loses at most the shard in progress.
* ``failed.csv``: images that could not be read or explained (path, error); ``run.json``: the
  run marker (its id and options); ``.tsgb.lock``: the writer's lock.

Under ``torchrun --nproc-per-node K`` (``WORLD_SIZE`` > 1) each rank takes every K-th image and
writes its own shards; rank 0 holds the lock and writes the index at the end. CPU: gloo; CUDA:
nccl, one process per GPU (``cuda:LOCAL_RANK``).
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import itertools
import os
import re
import sys
import time
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from . import _store
from ._common import BACKENDS, CLIError, check_backend, resolve_device
from ._store import COLUMNS, INDEX, StoreError, display  # noqa: F401 (COLUMNS: API)


def _warn(msg: str) -> None:
    """A message on stderr that does not break the progress bar."""
    from tqdm import tqdm
    tqdm.write(msg, file=sys.stderr)


MAX_TOP_K = 100


class _Interrupted(Exception):
    """Raised by the hidden ``--stop-after-shards`` testing option: stop like a kill would."""


# --------------------------------------------------------------------------- parsing ----
def _int_at_least(lo: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {v}")
        return v
    return parse


def _size(text: str) -> Tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX,]\s*(\d+)\s*)?", text)
    if not m:
        raise argparse.ArgumentTypeError(f"must be N or HxW, got {text!r}")
    h = int(m.group(1))
    w = int(m.group(2) or h)
    if not (8 <= h <= 8192 and 8 <= w <= 8192):
        raise argparse.ArgumentTypeError(f"must be between 8 and 8192 pixels, got {text!r}")
    return h, w


def _triple(text: str) -> Tuple[float, float, float]:
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError:
        vals = ()
    if len(vals) == 1:
        vals = vals * 3
    if len(vals) != 3 or not all(np.isfinite(vals)):
        raise argparse.ArgumentTypeError(f"must be 3 comma-separated numbers (or 1), got {text!r}")
    return vals  # type: ignore[return-value]


def register(sub) -> None:
    """Add ``tsgb explain`` to the ``tsgb`` subcommands."""
    p = sub.add_parser(
        "explain", help="TSGB maps of many images: npy shards + index.csv and/or PNG overlays",
        description="Explain image files and folders (searched recursively) with TSGB. Writes "
                    "float16 (or float32) maps in npy shards with DIR/index.csv (one row per image and "
                    "target; numpy.load(DIR/shard)[row] is the map) and/or PNG overlays. Runs "
                    "on one process, or under torchrun (one process per GPU, gloo on CPU).")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output directory (created; locked while the run writes it; a folder "
                        "holding files of another program is refused)")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="efficientnet-lite0",
                   help="efficientnet-lite0 (bundled, pretrained; default), a torchvision "
                        "classification architecture (resnet18, ...) with --weights, "
                        "timm:NAME (timm:efficientnet_b0, ...; its own preprocessing) with "
                        "--weights, or package.module:factory")
    g.add_argument("--weights", metavar="FILE",
                   help="a state dict file: .safetensors (read with the safetensors "
                        "package) or a torch file (torch.load(weights_only=True))")
    g.add_argument("--size", type=_size, metavar="N|HxW",
                   help="model input size (default: the model's, 224 for ImageNet models)")
    g.add_argument("--mean", type=_triple, metavar="R,G,B",
                   help="normalisation mean on [0, 1] RGB (default: the model's)")
    g.add_argument("--std", type=_triple, metavar="R,G,B",
                   help="normalisation std on [0, 1] RGB (default: the model's)")
    g = p.add_argument_group("targets (default: each image's top-1 class)")
    g.add_argument("--target", default="top1", metavar="top1|ID[,ID...]",
                   help="top1, or class ids explained for every image")
    g.add_argument("--top-k", type=_int_at_least(1), metavar="K",
                   help="each image's K top classes, all from one forward pass")
    g.add_argument("--labels", metavar="FILE.csv",
                   help="CSV with columns image,class (id or class name); several rows per "
                        "image allowed; images not listed are skipped")
    g = p.add_argument_group("running")
    g.add_argument("--batch-size", type=_int_at_least(1), default=16, metavar="N",
                   help="images per forward pass (default 16)")
    g.add_argument("--workers", type=_int_at_least(0), default=2, metavar="N",
                   help="DataLoader worker processes decoding images (default 2; 0: in process)")
    g.add_argument("--device", default="auto",
                   help="auto (default: cuda if available, else cpu; under torchrun: "
                        "cuda:LOCAL_RANK), cpu, cuda or cuda:N")
    g.add_argument("--amp", choices=("bf16", "fp16"),
                   help="autocast the forward pass (faster on GPUs; maps are far less accurate: "
                        "TSGB divides by activations)")
    g.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="TSGB backend: auto (native where available, else hooks), native or "
                        "hooks (pure PyTorch); default: auto")
    g = p.add_argument_group("outputs")
    g.add_argument("--format", action="append", metavar="npy|png",
                   help="npy (default) and/or png; repeat or give 'npy,png'")
    g.add_argument("--shard-size", type=_int_at_least(1), default=256, metavar="MAPS",
                   help="maps per npy shard (default 256)")
    g.add_argument("--map-dtype", choices=MAP_DTYPES, default="float16",
                   help="dtype of the npy maps: float16 (default: half the disk; values below "
                        "6.1e-5 are float16 subnormals with fewer significant bits, and the "
                        "maps of some models peak near 1e-4) or float32 (as computed)")
    g.add_argument("--resume", action="store_true",
                   help="continue the run DIR holds (same options): skip its complete images")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    # testing: stop (like Ctrl-C: the index holds the shards written) after this many shards
    p.add_argument("--stop-after-shards", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=run)


# ------------------------------------------------------------------------ helpers ----
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(rel: str, key: str, max_len: int = 80) -> str:
    """A file name derived from the input path ``rel`` that cannot leave its directory: only
    ``[A-Za-z0-9._-]``, no leading dot, path parts joined by ``__``, at most ``max_len``
    characters, plus an 8-hex hash of ``key`` (the absolute path) so names never collide."""
    parts = [p for p in re.split(r"[\\/]+", rel) if p not in ("", ".", "..")]
    stem = "__".join(parts) or "image"
    stem = os.path.splitext(stem)[0] if "." in stem else stem
    stem = _SAFE.sub("_", stem).lstrip("._-")[:max_len] or "image"
    return f"{stem}-{hashlib.sha1(key.encode('utf-8', 'surrogateescape')).hexdigest()[:8]}"


def _inside(root: str, path: str) -> str:
    full = os.path.realpath(os.path.join(root, path))
    if os.path.commonpath([os.path.realpath(root), full]) != os.path.realpath(root):
        raise CLIError(f"refusing to write outside --out: {path!r}")  # pragma: no cover
    return full


def _load_labels(path: str, items, num_classes: int, names) -> Dict[str, List[int]]:
    """{absolute image path: [class ids]} from a CSV with columns image,class."""
    if not os.path.isfile(path):
        raise CLIError(f"--labels {path}: no such file")
    lookup = {n: i for i, n in enumerate(names)} if names else {}
    by_key: Dict[str, List[int]] = {}
    base = os.path.dirname(os.path.abspath(path))
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        cols = [c.strip().lower() for c in (reader.fieldnames or [])]
        if "image" not in cols or "class" not in cols:
            raise CLIError(f"--labels {path}: needs a header with columns 'image' and 'class', "
                           f"got {reader.fieldnames}")
        reader.fieldnames = cols
        for line, row in enumerate(reader, start=2):
            img, cls = (row.get("image") or "").strip(), (row.get("class") or "").strip()
            if not img or not cls:
                raise CLIError(f"--labels {path}, line {line}: empty image or class")
            if re.fullmatch(r"-?\d+", cls):
                c = int(cls)
                if not 0 <= c < num_classes:
                    raise CLIError(f"--labels {path}, line {line}: class id {c} is not in "
                                   f"[0, {num_classes}) for this model")
            elif cls in lookup:
                c = lookup[cls]
            else:
                raise CLIError(f"--labels {path}, line {line}: {cls!r} is neither a class id "
                               f"nor a class name of this model")
            by_key.setdefault(img.replace("\\", "/"), []).append(c)
    out: Dict[str, List[int]] = {}
    for it in items:
        rel_to_csv = os.path.relpath(it.path, base).replace(os.sep, "/")
        for key in (it.path, rel_to_csv, it.rel, os.path.basename(it.path)):
            if key in by_key:
                out[it.path] = list(dict.fromkeys(by_key[key]))
                break
    return out


def _dist_info() -> Tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return world, rank, local


# ----------------------------------------------------------------------- the writer ----
MAP_DTYPES = {"float16": np.float16, "float32": np.float32}


class _Writer:
    """Buffers the maps and rows of whole images; when the buffer holds ``shard_size`` maps,
    commits them as one shard (npy, then its row file; see :meth:`_store.Store.write_part`)."""

    def __init__(self, store: _store.Store, rank: int, shard_size: int, npy: bool,
                 stop_after: Optional[int], map_dtype: str = "float16"):
        self.store, self.rank, self.map_dtype = store, rank, MAP_DTYPES[map_dtype]
        self.shard_size, self.npy, self.stop_after = shard_size, npy, stop_after
        self.seq = store.next_seq(rank)
        self.maps: List[np.ndarray] = []
        self.rows: List[Dict[str, object]] = []
        self.shards_written = 0
        self.maps_written = 0
        self.images_written = 0

    def add(self, rows: List[Dict[str, object]], maps: Optional[np.ndarray]) -> None:
        """All the rows (and maps) of one image."""
        if self.npy:
            self.maps.extend(list(maps))
        self.rows.extend(rows)
        if len(self.rows) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        name = f"{self.store.run_id}-r{self.rank}-{self.seq:06d}"
        maps = None
        if self.npy:
            maps = np.stack(self.maps).astype(self.map_dtype)
            for i, r in enumerate(self.rows):
                r["shard"], r["row"] = f"{_store.SHARDS}/{name}.npy", i
        self.store.write_part(name, self.rows, maps)
        self.seq += 1
        self.maps_written += len(self.rows)
        self.images_written += len({r["image"] for r in self.rows})
        self.maps, self.rows = [], []
        self.shards_written += 1
        if self.stop_after is not None and self.shards_written >= self.stop_after:
            raise _Interrupted()


def _png(store: _store.Store, name: str, rgb: torch.Tensor, maps: torch.Tensor,
         titles: List[str], image_title: str) -> str:
    from .. import viz
    fig = viz.explanation_figure(rgb, maps, titles, image_title=display(image_title)[:60],
                                 suptitle="TSGB: red = evidence for the class, blue = against")
    rel = f"{_store.PNG}/{name}.png"
    _inside(store.out, rel)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        store.write_png(rel, lambda f: fig.savefig(f, dpi=100, format="png"))
    return rel


def _check_finite(model: torch.nn.Module, what: str) -> None:
    """Refuse weights holding NaN or inf: every map would be NaN."""
    bad = [n for n, t in itertools.chain(model.named_parameters(), model.named_buffers())
           if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all())]
    if bad:
        raise CLIError(f"{what}: {len(bad)} weight tensor(s) hold NaN or inf values "
                       f"({', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''}); every map "
                       f"would be NaN: fix the weights")


# --------------------------------------------------------------------------- command ----
def run(args: argparse.Namespace) -> int:
    """``tsgb explain``: see the module docstring. Ctrl-C at any moment ends with exit code 130
    and the hint to resume, never a traceback."""
    job = _Job(args, _validate(args))
    try:
        job.choose_device()
        job.check_output()
        job.find_images()
        job.load_model()
        job.plan_targets()
        job.start_distributed()
        return job.explain_into_output()
    except KeyboardInterrupt:
        return job.interrupted()


def _validate(args) -> dict:
    """Every check that needs no model, before anything is written or a process group made."""
    fmts = set()
    for f in args.format or ["npy"]:
        fmts.update(x.strip().lower() for x in f.split(",") if x.strip())
    if not fmts or fmts - {"npy", "png"}:
        raise CLIError(f"--format must be npy and/or png, got {args.format}")
    if args.labels and (args.top_k or args.target != "top1"):
        raise CLIError("--labels cannot be combined with --top-k or --target")
    if args.top_k and args.target != "top1":
        raise CLIError("--top-k cannot be combined with --target ID,...")
    ids = None
    if args.target != "top1":
        try:
            ids = [int(t) for t in args.target.split(",")]
        except ValueError:
            raise CLIError(f"--target must be top1 or class ids like 3,17, got "
                           f"{args.target!r}") from None
        if any(i < 0 for i in ids):
            raise CLIError(f"--target: class ids must be >= 0, got {args.target}")
        ids = list(dict.fromkeys(ids))
    if args.top_k and args.top_k > MAX_TOP_K:
        raise CLIError(f"--top-k must be at most {MAX_TOP_K}")
    for inp in args.inputs:
        if not os.path.exists(os.path.expanduser(inp)):
            raise CLIError(f"input {inp}: no such file or directory")
    if args.weights and not os.path.isfile(args.weights):
        raise CLIError(f"--weights {args.weights}: no such file")
    if args.labels and not os.path.isfile(args.labels):
        raise CLIError(f"--labels {args.labels}: no such file")
    return {"formats": fmts, "ids": ids}


class _Job:
    """One ``tsgb explain`` run, step by step: every check first (device, output path,
    images, model, targets), then the process group, then rank 0 takes DIR and every rank
    explains its share of the images."""

    def __init__(self, args: argparse.Namespace, v: dict):
        self.args, self.v = args, v
        self.npy = "npy" in v["formats"]
        self.world, self.rank, self.local = _dist_info()
        self.taken: Optional[str] = None       # DIR, once rank 0 may have written to it
        self.store: Optional[_store.Store] = None
        self.dist = None
        self.barrier: Callable[[], None] = lambda: None

    # ---- checks: nothing is written before all of them passed
    def choose_device(self) -> None:
        args = self.args
        if args.device in (None, "auto"):
            spec = f"cuda:{self.local}" if torch.cuda.is_available() else "cpu"
        elif args.device == "cuda" and self.world > 1:
            spec = f"cuda:{self.local}"
        else:
            spec = args.device
        self.dev = resolve_device(spec)
        self.backend = args.backend
        check_backend(self.backend, self.dev)

    def check_output(self) -> None:
        try:
            self.out = _store.check_out_path(self.args.out)   # nothing is created yet
        except StoreError as e:
            raise CLIError(str(e)) from None
        _store.fault("start")

    def find_images(self) -> None:
        from ..data import pipeline
        out = self.out
        # the output folder (and its png/, shards/) is never searched for inputs
        exclude = [out, os.path.join(out, _store.PNG), os.path.join(out, _store.SHARDS)]
        try:
            self.items = pipeline.list_images(self.args.inputs, exclude=exclude)
        except OSError as e:
            raise CLIError(str(e)) from None
        if not self.items:
            raise CLIError(f"no image files in {', '.join(map(display, self.args.inputs))} "
                           f"(folders are searched for {', '.join(pipeline.IMAGE_EXTENSIONS)}; "
                           f"--out is not)")

    def load_model(self) -> None:
        from ..data import models
        args = self.args
        try:
            self.loaded = models.load_model(args.model, args.weights, "cpu")
        except (models.ModelSpecError, models.ModelUnavailableError) as e:
            raise CLIError(str(e)) from None
        _check_finite(self.loaded.model, f"--weights {args.weights}" if args.weights
                      else f"--model {args.model}")
        _store.fault("model")
        self.size = args.size or self.loaded.size
        self.mean, self.std = args.mean or self.loaded.mean, args.std or self.loaded.std
        self.num_classes = _num_classes(self.loaded.model, self.size, args.model)
        names = self.loaded.class_names
        self.names = names if names and len(names) == self.num_classes \
            else [f"class_{i}" for i in range(self.num_classes)]

    def plan_targets(self) -> None:
        """Check the targets against the model; the run's config and how many targets a
        complete image has (resume checks every committed image against it)."""
        args, v, n = self.args, self.v, self.num_classes
        if v["ids"] and max(v["ids"]) >= n:
            raise CLIError(f"--target: class id {max(v['ids'])} is not in [0, {n}) for "
                           f"--model {args.model}")
        if args.top_k and args.top_k > n:
            raise CLIError(f"--top-k {args.top_k}: the model has only {n} classes")
        labels = _load_labels(args.labels, self.items, n, self.names) if args.labels else None
        self.labels = labels
        self.config = {"model": args.model, "weights": os.path.abspath(args.weights)
                       if args.weights else None, "size": list(self.size),
                       "mean": list(self.mean), "std": list(self.std), "target": args.target,
                       "top_k": args.top_k,
                       "labels": os.path.abspath(args.labels) if args.labels else None,
                       "formats": sorted(v["formats"]), "map_dtype": args.map_dtype}
        if args.top_k:
            self.expected: Callable[[str], Optional[int]] = lambda p: args.top_k
        elif labels is not None:
            self.expected = lambda p: len(labels[p]) if p in labels else None
        elif v["ids"]:
            self.expected = lambda p: len(v["ids"])
        else:
            self.expected = lambda p: 1

    # ---- distributed: only after every check, so that no rank waits on one that failed
    def start_distributed(self) -> None:
        if self.world <= 1:
            return
        import torch.distributed as dist
        dev = self.dev
        if not dist.is_initialized():
            if dev.type == "cuda":
                torch.cuda.set_device(dev)
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        self.dist = dist
        self.barrier = (lambda: dist.barrier(device_ids=[dev.index])) if dev.type == "cuda" \
            else dist.barrier

    # ---- the output
    def explain_into_output(self) -> int:
        self.taken = self.out
        try:
            done = self.open_output()
            return _explain_images(self, done)
        finally:
            if self.store is not None:
                self.store.close()

    def open_output(self) -> set:
        """Rank 0 takes DIR (lock, ownership, run marker, cleanup); every rank learns the
        result. Returns the images already done (resume)."""
        from .. import __version__
        msg: Optional[dict] = None
        if self.rank == 0:
            try:
                self.store, state = _store.open_output(self.out, self.config, self.args.resume,
                                                       self.npy, self.expected, _warn,
                                                       __version__)
                msg = {"ok": True, "run_id": self.store.run_id, "done": sorted(state.done)}
            except StoreError as e:
                msg = {"ok": False, "error": str(e)}
        if self.dist:
            box = [msg]
            self.dist.broadcast_object_list(box, src=0)
            msg = box[0]
        if not msg["ok"]:
            if self.dist:
                self.dist.destroy_process_group()
            raise CLIError(msg["error"])
        if self.store is None:
            self.store = _store.Store(self.out, msg["run_id"])
        return set(msg["done"])

    def interrupted(self) -> int:
        out = self.taken
        if out and _store.read_marker(str(out)) is not None:
            _warn(f"interrupted: the complete images are kept; run the same command with "
                  f"--resume to complete {display(str(out))}")
        else:
            _warn("interrupted before anything was written; run the same command again")
        return 130


def _num_classes(model: torch.nn.Module, size, spec: str) -> int:
    """The model's number of classes, from one forward pass of zeros."""
    try:
        with torch.no_grad():
            logits = model(torch.zeros(1, 3, *size))
        logits = logits.logits if hasattr(logits, "logits") else logits
        return int(logits.shape[-1])
    except Exception as e:
        raise CLIError(f"--model {spec} does not run on a 1x3x{size[0]}x{size[1]} input "
                       f"({type(e).__name__}: {e}); check --size") from None


class _Tally:
    """What this rank did: images and maps written, failures, the backend that ran."""

    def __init__(self):
        self.images, self.maps, self.backend = 0, 0, ""
        self.failed: List[Tuple[str, str]] = []

    def fail(self, path: str, err: str) -> None:
        _warn(f"skipped {display(path)}: {display(err)}")
        self.failed.append((path, err))


def _explain_images(job: _Job, done: set) -> int:
    """Explain this rank's share of the images not done yet; rank 0 writes the index."""
    todo, unlabelled = _images_to_do(job, done)
    job.barrier()  # rank 0 has cleaned DIR before any rank writes to it
    mine = todo[job.rank::job.world]
    writer = _Writer(job.store, job.rank, job.args.shard_size, job.npy,
                     job.args.stop_after_shards, job.args.map_dtype)
    tally = _Tally()
    t0 = time.perf_counter()
    if not _explain_loop(job, mine, writer, tally):
        return _report_interrupt(job, writer)
    return _finish(job, tally, time.perf_counter() - t0, done, unlabelled)


def _images_to_do(job: _Job, done: set):
    """The images not done yet (those --labels lists), and the ones --labels does not list."""
    todo = [it for it in job.items if it.path not in done]
    unlabelled = []
    if job.labels is not None:
        unlabelled = [it.path for it in todo if it.path not in job.labels]
        todo = [it for it in todo if it.path in job.labels]
    return todo, unlabelled


def _target_spec(job: _Job):
    """(target, top_k) for pipeline.explain_batches."""
    args, labels, ids = job.args, job.labels, job.v["ids"]
    if args.top_k:
        return "top1", args.top_k
    if labels is not None:
        return (lambda meta, lg: [labels[p] for p in meta["path"]]), None
    if ids:
        return ids, None
    return "top1", None


def _explain_loop(job: _Job, mine, writer: _Writer, tally: _Tally) -> bool:
    """Explain ``mine`` batch by batch into ``writer``; False when interrupted."""
    from tqdm import tqdm

    from ..data import pipeline
    args, dev = job.args, job.dev
    ds = pipeline.ImageFileDataset(mine, job.size, **job.loaded.resize_options())
    dl = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, num_workers=args.workers,
                                     collate_fn=pipeline.collate, pin_memory=dev.type == "cuda",
                                     persistent_workers=False,
                                     worker_init_fn=_store.close_inherited_locks)
    target, top_k = _target_spec(job)
    bar = tqdm(total=len(mine), unit="img",
               desc="tsgb explain" + (f" [rank {job.rank}]" if job.world > 1 else ""),
               disable=args.no_progress or job.rank != 0, dynamic_ncols=True, file=sys.stderr)
    from ..core.explainer import TSGB
    model = job.loaded.model.to(dev)
    try:
        # one conversion for the whole run (the command owns the model), so the native
        # backend also reuses the CPU activation memory from batch to batch
        with TSGB(model, backend=job.backend) as ex:
            for res in pipeline.explain_batches(ex, dl, target=target, top_k=top_k, device=dev,
                                                amp=args.amp, mean=job.mean, std=job.std):
                _write_batch(job, ds, res, writer, tally)
                bar.update(len(res.meta["path"]) + len(res.meta["failed"]))
        writer.flush()
    except (_Interrupted, KeyboardInterrupt):
        return False
    finally:
        bar.close()
    return True


def _write_batch(job: _Job, ds, res, writer: _Writer, tally: _Tally) -> None:
    """One explained batch: its failures noted, each image's rows (and maps, PNG) written."""
    meta = res.meta
    for path, err in meta["failed"]:
        tally.fail(path, err)
    tally.backend = res.backend
    host = res.numpy(writer.map_dtype) if res.maps.shape[0] else None
    finite = (torch.isfinite(res.maps).flatten(2).all(2).cpu().numpy()
              if res.maps.shape[0] else None)
    for b, path in enumerate(meta["path"]):
        valid = host["valid"][b]
        if not finite[b][valid].all():
            tally.fail(path, "the map is not finite (NaN or inf): check the model and its "
                             "weights")
            continue
        rows = _image_rows(job, ds.items[meta["index"][b]], res, host, b)
        writer.add(rows, host["maps"][b][valid] if job.npy else None)
        tally.maps += len(rows)
        tally.images += 1


def _image_rows(job: _Job, it, res, host, b: int) -> List[Dict[str, object]]:
    """The index rows of image ``b`` of a batch (its PNG written when asked for)."""
    valid = host["valid"][b]
    cls = [int(c) for c, ok in zip(host["targets"][b], valid) if ok]
    sc = [float(s) for s, ok in zip(host["scores"][b], valid) if ok]
    names = job.names
    png = ""
    if "png" in job.v["formats"]:
        titles = [f"{names[c]}  p={s:.2f}" for c, s in zip(cls, sc)]
        rgb = res.inputs[b]  # the [0, 1] RGB the model saw
        png = _png(job.store, safe_name(it.rel, it.path), rgb,
                   res.maps[b][torch.as_tensor(valid, device=res.maps.device)], titles, it.rel)
    return [{"image": res.meta["path"][b], "target": c, "class_name": names[c],
             "score": f"{s:.6g}", "rank": j + 1, "shard": "", "row": "", "png": png}
            for j, (c, s) in enumerate(zip(cls, sc))]


def _report_interrupt(job: _Job, writer: _Writer) -> int:
    if job.world == 1:  # one process: index.csv holds every complete image
        try:
            job.store.write_index(job.store.scan(job.npy, job.expected).parts)
        except KeyboardInterrupt:
            pass
    _warn(f"interrupted: {writer.maps_written} maps of {writer.images_written} images are "
          f"written in this run (every complete image is kept); run the same command with "
          f"--resume to complete {display(job.store.out)}")
    return 130


def _finish(job: _Job, tally: _Tally, dt: float, done: set, unlabelled: List[str]) -> int:
    """Gather the counts and failures; rank 0 writes the index and the summary."""
    stats = {"images": tally.images, "maps": tally.maps, "failed": tally.failed, "seconds": dt}
    if job.dist:
        gathered: List[dict] = [None] * job.world  # type: ignore[list-item]
        job.dist.all_gather_object(gathered, stats)
        job.barrier()
    else:
        gathered = [stats]
    imgs = sum(s["images"] for s in gathered)
    if job.rank == 0:
        _write_summary(job, gathered, tally, done, unlabelled)
    if job.dist:
        job.barrier()
        job.dist.destroy_process_group()
    return 1 if imgs + len(done) == 0 else 0


def _write_summary(job: _Job, gathered: List[dict], tally: _Tally, done: set,
                   unlabelled: List[str]) -> None:
    store, out = job.store, job.store.out
    state = store.scan(job.npy, job.expected, cleanup=True, warn=_warn)
    total_rows = store.write_index(state.parts)
    all_failed = sorted(f for s in gathered for f in s["failed"])
    store.write_failed(all_failed)
    imgs = sum(s["images"] for s in gathered)
    maps = sum(s["maps"] for s in gathered)
    secs = max(s["seconds"] for s in gathered)
    lines = [f"tsgb explain: {imgs} images explained ({maps} maps) in {secs:.1f} s "
             f"({imgs / secs if secs > 0 else 0:.1f} images/s) on {job.world} process(es), "
             f"device {job.dev.type}, backend {tally.backend or job.backend}",
             f"  already done (resume): {len(done)} images; index: "
             f"{display(os.path.join(out, INDEX))} ({total_rows} rows)"]
    if unlabelled:
        lines.append(f"  not in --labels (skipped): {len(unlabelled)} images")
    lines.append(f"  unreadable (skipped): {len(all_failed)}" +
                 "".join(f"\n    {display(p)}: {display(e)}" for p, e in all_failed[:50]) +
                 ("\n    ... (see failed.csv)" if len(all_failed) > 50 else ""))
    print("\n".join(lines))
    if imgs + len(done) == 0:
        print(f"tsgb explain: error: no image could be explained ({len(all_failed)} "
              f"unreadable, {len(unlabelled)} not in --labels; see "
              f"{display(os.path.join(out, _store.FAILED))})", file=sys.stderr)
