"""``tsgb explain INPUT... --out DIR``: TSGB maps of whole collections of images.

DIR is a map store: its layout (shards, ``index.csv``, ``run.json``, ``failed.csv``, ``png/``,
the lock), the storage rules and resume are :mod:`tsgb_ext.io.store`'s, and
``tsgb_ext.open_maps(DIR)`` reads it. This module keeps the options, the ranks, the messages
that name flags, and the summary.

Under ``torchrun --nproc-per-node K`` (``WORLD_SIZE`` > 1) each rank takes every K-th image and
writes its own shards; rank 0 holds the lock and writes the index at the end. CPU: gloo; CUDA:
nccl, one process per GPU (``cuda:LOCAL_RANK``).
"""
from __future__ import annotations

import argparse
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

from ..io import store as map_store
from ..io.labels import LabelsError, class_id, read_labels
from ..io.store import COLUMNS, INDEX, MAP_DTYPES, StoreError  # noqa: F401 (COLUMNS: API)
from ._common import BACKENDS, CLIError, check_backend, display, int_arg, resolve_device

#: How the store's errors name its arguments here.
FLAGS = {"out": "--out", "resume": "--resume"}


def _store_error(e: StoreError) -> CLIError:
    return CLIError(e.render(FLAGS))


def _warn(msg: str) -> None:
    """A message on stderr that does not break the progress bar."""
    from tqdm import tqdm
    tqdm.write(msg, file=sys.stderr)


MAX_TOP_K = 100


class _Interrupted(Exception):
    """Raised by the hidden ``--stop-after-shards`` testing option: stop like a kill would."""


# --------------------------------------------------------------------------- parsing ----
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
                    "maps in npy shards with DIR/index.csv (one row per image and target; "
                    "tsgb_ext.open_maps(DIR) reads them) and/or PNG overlays. Runs on one "
                    "process, or under torchrun (one process per GPU, gloo on CPU).")
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
    g.add_argument("--top-k", type=int_arg(1), metavar="K",
                   help="each image's K top classes, all from one forward pass")
    g.add_argument("--labels", metavar="FILE.csv",
                   help="CSV with columns image,class (id or class name); several rows per "
                        "image allowed; images not listed are skipped")
    g = p.add_argument_group("running")
    g.add_argument("--batch-size", type=int_arg(1), default=16, metavar="N",
                   help="images per forward pass (default 16)")
    g.add_argument("--workers", type=int_arg(0), default=2, metavar="N",
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
    g.add_argument("--shard-size", type=int_arg(1), default=256, metavar="MAPS",
                   help="maps per npy shard (default 256)")
    g.add_argument("--map-dtype", choices=tuple(MAP_DTYPES), default="float16",
                   help="dtype of the npy maps: float16 (default: half the disk; each map "
                        "scaled by a power of two kept in index.csv, so small maps keep "
                        "float16's 11 significant bits) or float32 (as computed)")
    g.add_argument("--pixel-classes", action="store_true",
                   help="also write pixel_classes/<name>.npy per image: at every pixel (of the "
                        "model's input) the class whose TSGB map is largest there, over all "
                        "the model's classes (int16; the maps of all classes come from one "
                        "forward pass, chunk by chunk, and are never all held)")
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


def _load_labels(path: str, items, num_classes: int, names) -> Dict[str, List[int]]:
    """{absolute image path: [class ids]} from a label file (CSV with columns image,class;
    see :mod:`tsgb_ext.io.labels`). Keys match an image by absolute path, path relative to
    the CSV's folder, path below its INPUT, or file name."""
    try:
        entries = read_labels(path)
        by_key: Dict[str, List[int]] = {}
        for e in entries:
            by_key.setdefault(e.key, []).append(
                class_id(e.value, names, num_classes, f"{path}, {e.where}"))
    except LabelsError as e:
        raise CLIError(f"--labels {e}") from None
    base = os.path.dirname(os.path.abspath(path))
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


# ------------------------------------------------------------------------ overlays ----
#: The longest side of an overlay's panels, in pixels (larger photos are shown reduced).
OVERLAY_MAX_SIDE = 1024


def _on_image_grid(path: str, rgb: torch.Tensor, maps: torch.Tensor, pre):
    """The photo at ``path`` and ``maps`` (T, h, w) placed back on its pixel grid
    (:meth:`Preprocessing.place`), both reduced to at most :data:`OVERLAY_MAX_SIDE` pixels;
    the model's input ``rgb`` and the maps as they are when the photo cannot be read again."""
    from ..io.images import read_rgb, rgb_tensor
    try:
        photo = rgb_tensor(read_rgb(path))
    except Exception:  # noqa: BLE001 - gone or changed since it was explained
        return rgb, maps
    H, W = photo.shape[-2:]
    placed = torch.from_numpy(np.stack([pre.place(m, (H, W)) for m in maps.float().cpu().numpy()]))
    f = OVERLAY_MAX_SIDE / max(H, W)
    if f < 1:
        size = (max(1, round(H * f)), max(1, round(W * f)))
        photo = torch.nn.functional.interpolate(photo[None], size=size, mode="bilinear",
                                                antialias=True, align_corners=False)[0]
        placed = torch.nn.functional.interpolate(placed[None], size=size, mode="bilinear",
                                                 antialias=True, align_corners=False)[0]
    return photo.clamp(0, 1), placed


def _png(job: "_Job", it, rgb: torch.Tensor, maps: torch.Tensor, titles: List[str]) -> str:
    """The overlay figure of one image (its maps on the photo's own pixel grid), written
    atomically to ``png/<name>-<hash>.png``; returns that path relative to DIR."""
    from .. import viz
    photo, placed = _on_image_grid(it.path, rgb, maps, job.pre)
    fig = viz.explanation_figure(photo, placed, titles, image_title=display(it.rel)[:60],
                                 suptitle="TSGB: red = evidence for the class, blue = against")
    rel = f"{map_store.PNG}/{safe_name(it.rel, it.path)}.png"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        job.store.write_png(rel, lambda f: fig.savefig(f, dpi=100, format="png"))
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
        self.store: Optional[map_store.MapStore] = None
        self.hooks: Optional[map_store.StoreHooks] = getattr(args, "hooks", None)
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
            self.out = map_store.check_out_path(self.args.out)   # nothing is created yet
        except StoreError as e:
            raise _store_error(e) from None
        self.hook("start")

    def find_images(self) -> None:
        from ..data import pipeline
        out = self.out
        # the output folder (and its png/, shards/) is never searched for inputs
        exclude = [out, os.path.join(out, map_store.PNG), os.path.join(out, map_store.SHARDS)]
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
        self.hook("model")
        self.pre = self.loaded.preprocessing(args.size, args.mean, args.std)
        self.size, self.mean, self.std = self.pre.size, self.pre.mean, self.pre.std
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
                       "labels": os.path.abspath(args.labels) if args.labels else None}
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

    def hook(self, step: str) -> None:
        """The test failpoint ``step`` (only when a test passed hooks to ``cli.main``)."""
        if self.hooks is not None:
            self.hooks.reached(step)

    def open_output(self) -> set:
        """Rank 0 takes DIR (lock, ownership, run marker, cleanup); every rank learns the
        result. Returns the images already done (resume)."""
        from .. import __version__
        msg: Optional[dict] = None
        kw = dict(map_dtype=self.args.map_dtype, shard_size=self.args.shard_size,
                  expected=self.expected, hooks=self.hooks)
        if self.rank == 0:
            try:
                self.store = map_store.MapStore.open(
                    self.out, preprocessing=self.pre, config=self.config,
                    resume=self.args.resume, formats=sorted(self.v["formats"]), warn=_warn,
                    version=__version__, **kw)
                msg = {"ok": True, "run_id": self.store.run_id, "done": sorted(self.store.done)}
            except StoreError as e:
                msg = {"ok": False, "error": _store_error(e).args[0]}
        if self.dist:
            box = [msg]
            self.dist.broadcast_object_list(box, src=0)
            msg = box[0]
        if not msg["ok"]:
            if self.dist:
                self.dist.destroy_process_group()
            raise CLIError(msg["error"])
        if self.store is None:
            self.store = map_store.MapStore.attach(self.out, msg["run_id"], self.rank,
                                                   npy=self.npy, **kw)
        return set(msg["done"])

    def interrupted(self) -> int:
        out = self.taken
        if out and map_store.read_marker(str(out)) is not None:
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
    tally = _Tally()
    t0 = time.perf_counter()
    if not _explain_loop(job, mine, tally):
        return _report_interrupt(job)
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


def _explain_loop(job: _Job, mine, tally: _Tally) -> bool:
    """Explain ``mine`` batch by batch into the store; False when interrupted."""
    from tqdm import tqdm

    from ..data import pipeline
    args, dev = job.args, job.dev
    ds = pipeline.ImageFileDataset(mine, job.pre)
    dl = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, num_workers=args.workers,
                                     collate_fn=pipeline.collate, pin_memory=dev.type == "cuda",
                                     persistent_workers=False,
                                     worker_init_fn=map_store.close_inherited_locks)
    target, top_k = _target_spec(job)
    bar = tqdm(total=len(mine), unit="img",
               desc="tsgb explain" + (f" [rank {job.rank}]" if job.world > 1 else ""),
               disable=args.no_progress or job.rank != 0, dynamic_ncols=True, file=sys.stderr)
    from ..core.explainer import TSGB
    model = job.loaded.model.to(dev)
    try:
        # one conversion for the whole run (the command owns the model), so the native
        # backend also reuses the CPU activation memory from batch to batch
        # factorize="auto": the factorised backward from AUTO_MIN_TARGETS targets per image on
        # (the pipeline tells explain how many), the batched one below that
        with TSGB(model, backend=job.backend) as ex:
            for res in pipeline.explain_batches(ex, dl, target=target, top_k=top_k, device=dev,
                                                amp=args.amp, mean=job.mean, std=job.std):
                if args.pixel_classes:
                    res.meta["pixel_classes"] = _pixel_classes(job, ex, res)
                _write_batch(job, ds, res, tally)
                bar.update(len(res.meta["path"]) + len(res.meta["failed"]))
        job.store.flush()
    except (_Interrupted, KeyboardInterrupt):
        return False
    finally:
        bar.close()
    return True


def _pixel_classes(job: _Job, ex, res) -> Optional[np.ndarray]:
    """(N, H, W) int16: each pixel's top-1 class over all classes (``TSGB.pixel_classes``)."""
    x = res.inputs
    if x.shape[0] == 0:
        return None
    dtype = next((p.dtype for p in ex.model.parameters() if p.is_floating_point()),
                 torch.float32)
    x = x.to(job.dev, torch.float64 if dtype == torch.float64 else torch.float32)
    if job.mean is not None or job.std is not None:
        m = torch.tensor(job.mean or (0.0,) * 3, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        s = torch.tensor(job.std or (1.0,) * 3, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        x = (x - m) / s
    ids, _ = ex.pixel_classes(x.to(dtype), k=1)
    return ids[:, 0].to(torch.int16).cpu().numpy()


def _write_batch(job: _Job, ds, res, tally: _Tally) -> None:
    """One explained batch: its failures noted, each image's rows (and maps, PNG) added to
    the store; stops (like a kill) after ``--stop-after-shards`` shards."""
    meta = res.meta
    for path, err in meta["failed"]:
        tally.fail(path, err)
    tally.backend = res.backend
    host = res.numpy(np.float32) if res.maps.shape[0] else None
    for b, path in enumerate(meta["path"]):
        valid = host["valid"][b]
        maps = host["maps"][b][valid]
        if not np.isfinite(maps).all():
            tally.fail(path, "the map is not finite (NaN or inf): check the model and its "
                             "weights")
            continue
        it = ds.items[meta["index"][b]]
        cls = [int(c) for c in host["targets"][b][valid]]
        sc = [float(x) for x in host["scores"][b][valid]]
        png = ""
        if "png" in job.v["formats"]:
            titles = [f"{job.names[c]}  p={x:.2f}" for c, x in zip(cls, sc)]
            png = _png(job, it, res.inputs[b], torch.from_numpy(maps), titles)
        if meta.get("pixel_classes") is not None:
            arr = meta["pixel_classes"][b]
            job.store.write_png(f"{map_store.PIXEL_CLASSES}/{safe_name(it.rel, it.path)}.npy",
                                lambda f, arr=arr: np.save(f, arr))
        rows = job.store.add_image(path, maps if job.npy else None, cls, scores=sc,
                                   class_names=job.names, rel=it.rel, given=it.given, png=png)
        tally.maps += len(rows)
        tally.images += 1
        stop = job.args.stop_after_shards
        if stop is not None and job.store.shards_written >= stop:
            raise _Interrupted()


def _report_interrupt(job: _Job) -> int:
    store = job.store
    if job.world == 1:  # one process: index.csv holds every complete image
        try:
            store.index_committed()
        except KeyboardInterrupt:
            pass
    _warn(f"interrupted: {store.maps_written} maps of {store.images_written} images are "
          f"written in this run (every complete image is kept); run the same command with "
          f"--resume to complete {display(store.out)}")
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
    all_failed = sorted(tuple(f) for s in gathered for f in s["failed"])
    total_rows = store.commit_index(failed=all_failed, warn=_warn)
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
              f"{display(os.path.join(out, map_store.FAILED))})", file=sys.stderr)
