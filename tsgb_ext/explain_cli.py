"""``tsgb explain INPUT... --out DIR``: TSGB maps of whole collections of images.

Outputs in DIR:

* ``shards/r<RANK>-<SEQ>.npy``: float16 arrays (M, H, W), one map per row (``--format npy``);
* ``png/<name>-<hash>.png``: one overlay figure per image (``--format png``);
* ``index.csv``: one row per image and target: ``image, target, class_name, score, rank,
  shard, row, png`` (``numpy.load(DIR/shard)[row]`` is that map; ``rank`` is the target's place
  among the image's targets, 1 = first). Rows are appended (and flushed to disk) after each shard
  is written, so an interrupted run loses nothing that is written, and ``--resume`` skips the
  images the index already holds. The finished index is sorted by image, then rank.
* ``failed.csv``: images that could not be read (path, error); ``run.json``: the options.

Under ``torchrun --nproc-per-node K`` (``WORLD_SIZE`` > 1) each rank takes every K-th image,
writes its own shards and ``index-rank<R>.csv``; rank 0 merges them into ``index.csv`` at the
end. CPU: gloo; CUDA: nccl, one process per GPU (``cuda:LOCAL_RANK``).
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import re
import sys
import time
import warnings
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from .cli import BACKENDS, CLIError, check_backend, prepare_out_dir, resolve_device



def _warn(msg: str) -> None:
    """A message on stderr that does not break the progress bar."""
    from tqdm import tqdm
    tqdm.write(msg, file=sys.stderr)

INDEX = "index.csv"
COLUMNS = ["image", "target", "class_name", "score", "rank", "shard", "row", "png"]
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


def _add_explain(sub) -> None:
    p = sub.add_parser(
        "explain", help="TSGB maps of many images: npy shards + index.csv and/or PNG overlays",
        description="Explain image files and folders (searched recursively) with TSGB. Writes "
                    "float16 maps in npy shards with DIR/index.csv (one row per image and "
                    "target; numpy.load(DIR/shard)[row] is the map) and/or PNG overlays. Runs "
                    "on one process, or under torchrun (one process per GPU, gloo on CPU).")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (created)")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="efficientnet-lite0",
                   help="efficientnet-lite0 (bundled, pretrained; default), a torchvision "
                        "classification architecture (resnet18, ...) with --weights, or "
                        "package.module:factory")
    g.add_argument("--weights", metavar="FILE",
                   help="a state dict file (loaded with torch.load(weights_only=True))")
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
    g.add_argument("--device", default=None,
                   help="cpu, cuda or cuda:N (default: cuda if available, else cpu; under "
                        "torchrun: cuda:LOCAL_RANK)")
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
    g.add_argument("--resume", action="store_true",
                   help="skip the images DIR/index.csv already holds")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    # testing: stop (like a kill, without the final merge) after this many shards
    p.add_argument("--stop-after-shards", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_explain)


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


def _read_index(path: str) -> List[Dict[str, str]]:
    if not os.path.isfile(path):
        return []
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    # a killed writer can leave a partial last line: keep only complete rows
    return [r for r in rows if r.get("png") is not None and r.get("image")]


def _rank_indexes(out: str) -> List[str]:
    return sorted(os.path.join(out, f) for f in os.listdir(out)
                  if re.fullmatch(r"index-rank\d+\.csv", f))


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
class _Writer:
    """Buffers maps of whole images, writes a shard when the buffer holds ``shard_size`` maps,
    then appends (and flushes, fsyncs) the shard's index rows."""

    def __init__(self, out: str, index_path: str, rank: int, shard_size: int, npy: bool,
                 stop_after: Optional[int]):
        self.out, self.index_path, self.rank = out, index_path, rank
        self.shard_size, self.npy, self.stop_after = shard_size, npy, stop_after
        os.makedirs(os.path.join(out, "shards"), exist_ok=True)
        pat = re.compile(rf"r{rank}-(\d+)\.npy")
        seqs = [int(m.group(1)) for f in os.listdir(os.path.join(out, "shards"))
                if (m := pat.fullmatch(f))]
        self.seq = max(seqs) + 1 if seqs else 0
        self.maps: List[np.ndarray] = []
        self.rows: List[Dict[str, object]] = []
        self.shards_written = 0
        self.maps_written = 0
        new = not os.path.exists(index_path) or os.path.getsize(index_path) == 0
        self.f = open(index_path, "a", newline="", encoding="utf-8")
        self.csv = csv.DictWriter(self.f, fieldnames=COLUMNS)
        if new:
            self.csv.writeheader()
            self.f.flush()

    def add(self, rows: List[Dict[str, object]], maps: Optional[np.ndarray]) -> None:
        if self.npy:
            self.maps.extend(list(maps))
        self.rows.extend(rows)
        if len(self.rows) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        if self.npy:
            name = f"shards/r{self.rank}-{self.seq:06d}.npy"
            path = _inside(self.out, name)
            tmp = path + ".tmp.npy"
            np.save(tmp, np.stack(self.maps).astype(np.float16))
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, path)
            for i, r in enumerate(self.rows):
                r["shard"], r["row"] = name, i
            self.seq += 1
        self.csv.writerows(self.rows)
        self.f.flush()
        os.fsync(self.f.fileno())
        self.maps_written += len(self.rows)
        self.maps, self.rows = [], []
        self.shards_written += 1
        if self.stop_after is not None and self.shards_written >= self.stop_after:
            raise _Interrupted()

    def close(self) -> None:
        self.f.close()


def _merge(out: str) -> int:
    """Rank 0, at the end: index.csv + every index-rank*.csv -> index.csv (deduplicated by
    image and target, sorted by image then rank), written atomically. Returns the row count."""
    main = os.path.join(out, INDEX)
    parts = _rank_indexes(out)
    rows = _read_index(main)
    for p in parts:
        rows += _read_index(p)
    seen, merged = set(), []
    for r in rows:
        key = (r["image"], r["target"])
        if key not in seen:
            seen.add(key)
            merged.append(r)
    merged.sort(key=lambda r: (r["image"], int(r["rank"] or 0)))
    tmp = main + ".tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows({c: r.get(c, "") for c in COLUMNS} for r in merged)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, main)
    for p in parts:
        os.remove(p)
    # shards no index row refers to (a run killed between a shard and its rows): remove
    used = {r["shard"] for r in merged if r.get("shard")}
    sdir = os.path.join(out, "shards")
    if os.path.isdir(sdir):
        for f in os.listdir(sdir):
            if re.fullmatch(r"r\d+-\d+\.npy(\.tmp\.npy)?", f) and f"shards/{f}" not in used:
                os.remove(os.path.join(sdir, f))
    return len(merged)


def _png(out: str, name: str, rgb: torch.Tensor, maps: torch.Tensor, titles: List[str],
         image_title: str) -> str:
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    from . import viz
    fig = viz.explanation_figure(rgb, maps, titles, image_title=image_title[:60],
                                 suptitle="TSGB: red = evidence for the class, blue = against")
    sm = ScalarMappable(norm=Normalize(-1, 1), cmap=colormaps["RdBu_r"])
    fig.colorbar(sm, ax=fig.axes[-1], fraction=0.046, pad=0.02, label="scaled evidence")
    rel = f"png/{name}.png"
    os.makedirs(os.path.join(out, "png"), exist_ok=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        viz.save_figure(fig, _inside(out, rel))
    return rel


# --------------------------------------------------------------------------- command ----
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


def cmd_explain(args: argparse.Namespace) -> int:
    """``tsgb explain``: see the module docstring."""
    from . import models, pipeline

    v = _validate(args)
    world, rank, local = _dist_info()
    if args.device is None:
        dev_spec = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    elif args.device == "cuda" and world > 1:
        dev_spec = f"cuda:{local}"
    else:
        dev_spec = args.device
    dev = resolve_device(dev_spec)
    backend = args.backend
    check_backend(backend, dev)
    out = prepare_out_dir(args.out)
    try:
        items = pipeline.list_images(args.inputs)
    except FileNotFoundError as e:
        raise CLIError(str(e)) from None
    try:
        loaded = models.load_model(args.model, args.weights, "cpu")
    except (models.ModelSpecError, models.ModelUnavailableError) as e:
        raise CLIError(str(e)) from None
    size = args.size or loaded.size
    mean, std = args.mean or loaded.mean, args.std or loaded.std
    try:
        with torch.no_grad():
            logits = loaded.model(torch.zeros(1, 3, *size))
        logits = logits.logits if hasattr(logits, "logits") else logits
        num_classes = int(logits.shape[-1])
    except Exception as e:
        raise CLIError(f"--model {args.model} does not run on a 1x3x{size[0]}x{size[1]} input "
                       f"({type(e).__name__}: {e}); check --size") from None
    names = loaded.class_names if loaded.class_names and len(loaded.class_names) == num_classes \
        else [f"class_{i}" for i in range(num_classes)]
    if v["ids"] and max(v["ids"]) >= num_classes:
        raise CLIError(f"--target: class id {max(v['ids'])} is not in [0, {num_classes}) for "
                       f"--model {args.model}")
    if args.top_k and args.top_k > num_classes:
        raise CLIError(f"--top-k {args.top_k}: the model has only {num_classes} classes")
    labels = _load_labels(args.labels, items, num_classes, names) if args.labels else None

    config = {"model": args.model, "weights": os.path.abspath(args.weights) if args.weights
              else None, "size": list(size), "mean": list(mean), "std": list(std),
              "target": args.target, "top_k": args.top_k,
              "labels": os.path.abspath(args.labels) if args.labels else None,
              "formats": sorted(v["formats"])}
    cfg_path = os.path.join(out, "run.json")
    done_rows = _read_index(os.path.join(out, INDEX))
    for p in _rank_indexes(out):
        done_rows += _read_index(p)
    if done_rows and not args.resume:
        raise CLIError(f"--out {out} already holds an index.csv with {len(done_rows)} rows: "
                       f"add --resume to complete it, or choose an empty directory")
    if args.resume and os.path.isfile(cfg_path):
        with open(cfg_path, encoding="utf-8") as f:
            old = json.load(f)
        diff = [k for k in config if old.get(k) != config[k]]
        if diff:
            raise CLIError(f"--resume: DIR was written with other options ({', '.join(diff)}): "
                           f"{ {k: old.get(k) for k in diff} }")

    # ---- distributed: only after every check, so that no rank waits on one that failed
    dist = None
    if world > 1:
        import torch.distributed as dist
        if not dist.is_initialized():
            if dev.type == "cuda":
                torch.cuda.set_device(dev)
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    barrier = (lambda: dist.barrier(device_ids=[dev.index]) if dev.type == "cuda"
               else dist.barrier()) if dist else (lambda: None)
    if rank == 0:
        with open(cfg_path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(config, f, indent=1)
        os.replace(cfg_path + ".tmp", cfg_path)
    done = {r["image"] for r in done_rows}
    todo = [it for it in items if it.path not in done]
    unlabelled = []
    if labels is not None:
        unlabelled = [it.path for it in todo if it.path not in labels]
        todo = [it for it in todo if it.path in labels]
    barrier()  # every rank has read the index before any rank appends to it
    mine = todo[rank::world]

    model = loaded.model.to(dev)
    index_path = os.path.join(out, INDEX if world == 1 else f"index-rank{rank}.csv")
    writer = _Writer(out, index_path, rank, args.shard_size, "npy" in v["formats"],
                     args.stop_after_shards)
    ds = pipeline.ImageFileDataset(mine, size)
    dl = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, num_workers=args.workers,
                                     collate_fn=pipeline.collate, pin_memory=dev.type == "cuda",
                                     persistent_workers=False)
    if args.top_k:
        target, top_k = "top1", args.top_k
    elif labels is not None:
        target, top_k = (lambda meta, lg: [labels[p] for p in meta["path"]]), None
    elif v["ids"]:
        target, top_k = v["ids"], None
    else:
        target, top_k = "top1", None

    from tqdm import tqdm
    bar = tqdm(total=len(mine), unit="img", desc="tsgb explain" + (f" [rank {rank}]" if world > 1
                                                                    else ""),
               disable=args.no_progress or rank != 0, dynamic_ncols=True, file=sys.stderr)
    failed: List[Tuple[str, str]] = []
    n_images, n_maps, last_backend = 0, 0, ""
    t0 = time.perf_counter()
    interrupted = False
    try:
        for res in pipeline.explain_batches(model, dl, target=target, top_k=top_k, device=dev,
                                            backend=backend, amp=args.amp, mean=mean, std=std):
            meta = res.meta
            for path, err in meta["failed"]:
                _warn(f"skipped {path}: {err}")
                failed.append((path, err))
            last_backend = res.backend
            host = res.numpy() if res.maps.shape[0] else None
            for b, path in enumerate(meta["path"]):
                it = ds.items[meta["index"][b]]
                valid = host["valid"][b]
                cls = [int(c) for c, ok in zip(host["targets"][b], valid) if ok]
                sc = [float(s) for s, ok in zip(host["scores"][b], valid) if ok]
                png = ""
                if "png" in v["formats"]:
                    titles = [f"{names[c]}  p={s:.2f}" for c, s in zip(cls, sc)]
                    rgb = res.inputs[b]  # the [0, 1] RGB the model saw
                    png = _png(out, safe_name(it.rel, it.path), rgb,
                               res.maps[b][torch.as_tensor(valid, device=res.maps.device)],
                               titles, it.rel)
                rows = [{"image": path, "target": c, "class_name": names[c], "score": f"{s:.6g}",
                         "rank": j + 1, "shard": "", "row": "", "png": png}
                        for j, (c, s) in enumerate(zip(cls, sc))]
                writer.add(rows, host["maps"][b][valid] if writer.npy else None)
                n_maps += len(rows)
            n_images += len(meta["path"])
            bar.update(len(meta["path"]) + len(meta["failed"]))
        writer.flush()
    except (_Interrupted, KeyboardInterrupt):
        interrupted = True
    finally:
        writer.close()
        bar.close()
    dt = time.perf_counter() - t0
    if interrupted:
        _warn(f"interrupted: {writer.maps_written} maps are written and indexed; run the "
                    f"same command with --resume to complete {out}")
        return 130

    # ---- gather the counts and failures, rank 0 merges the index
    stats = {"images": n_images, "maps": n_maps, "failed": failed, "seconds": dt}
    if dist:
        gathered: List[dict] = [None] * world  # type: ignore[list-item]
        dist.all_gather_object(gathered, stats)
        barrier()
    else:
        gathered = [stats]
    if rank == 0:
        total_rows = _merge(out)
        all_failed = sorted(f for s in gathered for f in s["failed"])
        with open(os.path.join(out, "failed.csv"), "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["image", "error"])
            w.writerows(all_failed)
        imgs = sum(s["images"] for s in gathered)
        maps = sum(s["maps"] for s in gathered)
        secs = max(s["seconds"] for s in gathered)
        lines = [f"tsgb explain: {imgs} images explained ({maps} maps) in {secs:.1f} s "
                 f"({imgs / secs if secs > 0 else 0:.1f} images/s) on {world} process(es), "
                 f"device {dev.type}, backend {last_backend or backend}",
                 f"  already done (resume): {len(done)} images; index: "
                 f"{os.path.join(out, INDEX)} ({total_rows} rows)"]
        if unlabelled:
            lines.append(f"  not in --labels (skipped): {len(unlabelled)} images")
        lines.append(f"  unreadable (skipped): {len(all_failed)}" +
                     "".join(f"\n    {p}: {e}" for p, e in all_failed[:50]) +
                     ("\n    ... (see failed.csv)" if len(all_failed) > 50 else ""))
        print("\n".join(lines))
    if dist:
        barrier()
        dist.destroy_process_group()
    return 0
