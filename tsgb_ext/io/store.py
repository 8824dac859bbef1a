"""The map store: the run folder that ``tsgb explain`` writes and :func:`tsgb_ext.open_maps`
reads, as a Python API (:class:`MapStore`) for the CLI and for pipelines of your own.

Layout of DIR (everything a run may delete or overwrite is named here):

* ``.tsgb.lock``: the exclusive lock (``fcntl.flock``) of the run writing DIR; it holds the
  writer's pid and host. A second writer is refused while the lock is held.
* ``run.json``: the run marker: ``tool`` ("tsgb explain", the layout's name), ``layout``
  (:data:`LAYOUT`), ``run_id``, ``version``, ``created``, ``map_dtype``, ``formats``,
  ``preprocessing`` (:meth:`tsgb_ext.io.preprocess.Preprocessing.to_dict`: size,
  resize_mode, crop_pct, interpolation, mean, std) and the writer's own options (the CLI's:
  model, weights, size, mean, std, target, top_k, labels). DIR belongs to the run named
  there; a resume continues it (same options only).
* ``shards/<RUN>-r<RANK>-<SEQ>.npy``: the maps (M, H, W), one per row (npy format): float16
  with a per-map power-of-two scale (``map_dtype="float16"``, the default: the map is the
  stored array times the row's ``scale``, so no map loses precision to float16 subnormals)
  or float32 as computed (scale 1); ``shards/<RUN>-r<RANK>-<SEQ>.csv``: that shard's rows
  (written after the npy; both atomically: temporary file in the same folder, fsync,
  ``os.replace``). A shard holds whole images only (all the targets of each), so a shard is
  complete exactly when its row file exists; with ``formats=("png",)`` only, row files are
  written alone.
* ``index.csv``: every row of every row file, sorted by image then rank, written atomically at
  the end of a run (and when a one-process run is interrupted). Columns (:data:`COLUMNS`):
  ``image`` (absolute path), ``target`` (class id), ``class_name``, ``score`` (softmax
  probability), ``rank`` (the target's place among the image's targets, 1 = first),
  ``shard`` and ``row`` (the map is ``numpy.load(DIR/shard)[row] * scale``; paths relative
  to DIR, so the folder can be moved), ``png`` (the overlay, relative to DIR), ``scale``,
  ``rel`` (the image's path below the input folder it was found in) and ``given`` (its path
  as the input named it).
* ``failed.csv``: unreadable images of the last run (image, error);
  ``png/<name>-<hash>.png``: overlays.

Files and CSVs are UTF-8; a file name that is not valid UTF-8 is stored losslessly with
Python's ``surrogateescape`` (its raw bytes): read the CSVs with
``open(path, encoding="utf-8", errors="surrogateescape")`` and ``os.fsencode`` gives the
original bytes back.

A run only deletes or overwrites files it can prove it wrote: the names above in a DIR whose
``run.json`` is a marker of this layout, and shard and temporary files named with the run's
id. A DIR holding any of these names without such a marker is refused. A folder written by
tsgb 0.1.0 before the layout had a number (float16 maps without a scale) opens with
:func:`tsgb_ext.open_maps` (scale 1) but cannot be resumed: the error says so.

Errors are :class:`StoreError`; their messages name this module's arguments (``out``,
``resume=True``), and :meth:`StoreError.render` names them otherwise (the CLI: ``--out``,
``--resume``). Tests stop a run at a named step through a :class:`StoreHooks` object
(``hooks=``, default None: nothing is called).
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import re
import socket
import time
import uuid
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple

import numpy as np

from .preprocess import Preprocessing

LOCK = ".tsgb.lock"
MARKER = "run.json"
INDEX = "index.csv"
FAILED = "failed.csv"
SHARDS = "shards"
PNG = "png"
PIXEL_CLASSES = "pixel_classes"  # tsgb explain --pixel-classes: per-image class maps (.npy)
TOOL = "tsgb explain"
#: The layout's number in ``run.json`` (none: tsgb 0.1.0, float16 maps without a scale).
LAYOUT = 2
COLUMNS = ["image", "target", "class_name", "score", "rank", "shard", "row", "png", "scale",
           "rel", "given"]
#: Names in DIR that belong to a run (a DIR holding any of them without a marker is refused).
OWNED = (INDEX, FAILED, MARKER, SHARDS, PNG, PIXEL_CLASSES)
#: ``map_dtype`` values: how the maps are stored.
MAP_DTYPES = {"float16": np.float16, "float32": np.float32}
_RUN_ID = re.compile(r"[0-9a-f]{12}")
#: How CSVs are read and written: UTF-8, undecodable file-name bytes kept as they are.
ENCODING = dict(encoding="utf-8", errors="surrogateescape")
#: Marker keys the store writes itself (a resume compares every other key, and these three).
_OWN_KEYS = ("tool", "layout", "run_id", "version", "created")

#: How :class:`StoreError` messages name the arguments by default (Python).
PYTHON_NAMES = {"out": "out", "resume": "resume=True"}


class StoreError(Exception):
    """DIR cannot be used (in use, not ours, other options, ...); the message says why.
    ``render(names)`` spells the message with other names for the arguments ``out`` and
    ``resume`` (e.g. the CLI's ``{"out": "--out", "resume": "--resume"}``)."""

    def __init__(self, template: str, **values: object):
        self.template, self.values = template, values
        super().__init__(self.render(PYTHON_NAMES))

    def render(self, names: Mapping[str, str]) -> str:
        return self.template.format(**{**PYTHON_NAMES, **names}, **self.values)


class StoreHooks:
    """Failpoints for tests: subclass and pass as ``hooks=`` to :meth:`MapStore.open`.
    ``reached(step)`` is called after the steps ``lock`` (DIR taken), ``npy`` (a shard's maps
    committed) and ``part`` (a shard committed); ``write(step, f, data)`` writes ``data`` into
    the temporary file ``f`` of the steps ``rows`` (a shard's row file) and ``merge``
    (``index.csv``). With ``hooks=None`` (the default) neither is called."""

    def reached(self, step: str) -> None:
        pass

    def write(self, step: str, f, data: bytes) -> None:
        f.write(data)


# ------------------------------------------------------------------------- file I/O ----
def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover (some file systems refuse)
        pass
    finally:
        os.close(fd)


def temp_file(folder: str, prefix: str) -> Tuple[int, str]:
    """A new file ``folder/<prefix><random>.tmp`` (its own name, never shared with another
    writer), opened for writing with the umask's permissions (``mkstemp`` would give 0600)."""
    while True:
        tmp = os.path.join(folder, f"{prefix}{uuid.uuid4().hex[:12]}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666), tmp
        except FileExistsError:  # pragma: no cover
            continue


def atomic_write(path: str, write: Callable[[io.BufferedWriter], None], tmp_prefix: str) -> None:
    """Write ``path`` whole or not at all: ``write(f)`` into a new temporary file in the same
    folder (a unique name starting with ``tmp_prefix``), fsync, ``os.replace``."""
    folder = os.path.dirname(path)
    fd, tmp = temp_file(folder, tmp_prefix)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(folder)


def csv_bytes(rows: Iterable[Mapping[str, object]], header: Sequence[str] = COLUMNS) -> bytes:
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=list(header), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue().encode(**ENCODING)


def read_csv(path: str) -> Tuple[Optional[List[str]], List[Dict[str, str]]]:
    with open(path, newline="", **ENCODING) as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        return reader.fieldnames, rows


# ----------------------------------------------------------------------- the out path ----
def check_out_path(path: str) -> str:
    """``out`` as an absolute path, checked without creating anything: an existing writable
    directory, or a path whose nearest existing parent is a writable directory."""
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if os.path.lexists(path) and not os.path.isdir(path):
        raise StoreError("{out} {path}: exists and is not a directory", path=path)
    if os.path.isdir(path):
        if not os.access(path, os.W_OK | os.X_OK):
            raise StoreError("{out} {path}: the directory is not writable", path=path)
        return path
    parent = os.path.dirname(path)
    while not os.path.lexists(parent) and parent != os.path.dirname(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise StoreError("{out} {path}: cannot create the directory ({parent} is not a "
                         "directory)", path=path, parent=parent)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise StoreError("{out} {path}: cannot create the directory ({parent} is not "
                         "writable)", path=path, parent=parent)
    return path


# ------------------------------------------------------------------------------ lock ----
_held_fds: Set[int] = set()


def close_inherited_locks(worker_id: object = None) -> None:
    """In a forked child (a DataLoader worker, as its ``worker_init_fn``): close the inherited
    lock file descriptors, so that a child outliving a killed parent does not keep DIR locked."""
    for fd in list(_held_fds):
        try:
            os.close(fd)
        except OSError:
            pass
    _held_fds.clear()


class DirLock:
    """An exclusive ``fcntl.flock`` on ``DIR/.tsgb.lock`` (released when the holder exits, even
    by SIGKILL). The file records the holder's pid, host and start time."""

    def __init__(self, out: str):
        import fcntl
        self.path = os.path.join(out, LOCK)
        self.created = False
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            self.created = True
        except FileExistsError:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise StoreError("{out} {path}: the directory is not writable ({why})", path=out,
                             why=e.strerror or e) from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                holder = json.loads(os.pread(self.fd, 4096, 0).decode("utf-8", "replace"))
                who = (f"pid {holder.get('pid')} on {holder.get('host')}, since "
                       f"{holder.get('since')}")
            except (ValueError, AttributeError, OSError):
                who = "holder unknown"
            os.close(self.fd)
            self.fd = -1
            raise StoreError("{out} {path} is in use by another tsgb explain run ({who}): wait "
                             "for it to finish, or choose another {out}", path=out,
                             who=who) from None
        info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                           "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, info, 0)
        _held_fds.add(self.fd)

    def release(self, remove: bool = False) -> None:
        if self.fd < 0:
            return
        if remove:  # only a lock file this process created, in a DIR it did not take
            try:
                os.remove(self.path)
            except OSError:  # pragma: no cover
                pass
        _held_fds.discard(self.fd)
        os.close(self.fd)  # drops the flock
        self.fd = -1


# ------------------------------------------------------------------------ the maps ----
def encode_maps(maps: np.ndarray, map_dtype: str = "float16") -> Tuple[np.ndarray, np.ndarray]:
    """(stored, scales) of float maps (M, H, W): ``stored[i] * scales[i]`` is map i.

    ``"float32"``: the maps as they are, scale 1. ``"float16"``: each map divided by a power
    of two that brings its largest ``|value|`` into [2**14, 2**15) (zero maps: scale 1), then
    rounded to float16: every map keeps float16's 11 significant bits down to 2**-24 of its
    peak, whatever its magnitude (unscaled, a map peaking near 1e-4 is mostly subnormal)."""
    if map_dtype not in MAP_DTYPES:
        raise ValueError(f"map_dtype must be one of {tuple(MAP_DTYPES)}, got {map_dtype!r}")
    maps = np.asarray(maps, dtype=np.float32)
    if maps.ndim != 3:
        raise ValueError(f"maps must be (M, H, W), got shape {maps.shape}")
    if map_dtype == "float32":
        return maps, np.ones(len(maps))
    peak = np.abs(maps).reshape(len(maps), -1).max(1, initial=0.0).astype(np.float64)
    _, exp = np.frexp(peak)                          # peak in [2**(exp-1), 2**exp)
    scales = np.where(peak > 0, np.ldexp(1.0, exp - 15), 1.0)
    stored = (maps / scales[:, None, None]).astype(np.float16)
    return stored, scales


def decode_map(stored: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """A stored map times its scale, as float32 (the inverse of :func:`encode_maps`)."""
    if scale == 1.0:
        return np.array(stored, dtype=np.float32)
    return (np.asarray(stored, dtype=np.float64) * scale).astype(np.float32)


# ----------------------------------------------------------------------------- parts ----
@dataclasses.dataclass
class Part:
    """One committed shard: its name (``<RUN>-r<RANK>-<SEQ>``) and index rows."""
    name: str
    rows: List[Dict[str, str]]


@dataclasses.dataclass
class ResumeState:
    parts: List[Part]
    done: Set[str]          # images whose rows (all their targets) are committed
    discarded: List[str]    # part names found incomplete or inconsistent (their files removed)


def _part_pattern(run_id: str) -> "re.Pattern[str]":
    return re.compile(rf"{run_id}-r(\d+)-(\d{{6}})\.(npy|csv)")


def _check_part(sdir: str, name: str, npy: bool,
                expected: Optional[Callable[[str], Optional[int]]]) -> Tuple[Optional[Part], str]:
    """The part ``name`` when its rows and shard agree, else (None, why)."""
    try:
        header, rows = read_csv(os.path.join(sdir, name + ".csv"))
    except (OSError, csv.Error, UnicodeError) as e:
        return None, f"unreadable rows ({type(e).__name__})"
    if header != COLUMNS or not rows:
        return None, "rows with another header, or none"
    if any(None in r or any(r.get(c) is None for c in COLUMNS) for r in rows):
        return None, "a row with missing or extra fields"
    if npy:
        try:
            n = np.load(os.path.join(sdir, name + ".npy"), mmap_mode="r").shape[0]
        except Exception as e:
            return None, f"shard unreadable ({type(e).__name__})"
        if n != len(rows) or any(r["shard"] != f"{SHARDS}/{name}.npy" or r["row"] != str(i)
                                 for i, r in enumerate(rows)):
            return None, f"{len(rows)} rows for a shard of {n} maps"
    groups: Dict[str, List[int]] = {}
    for r in rows:
        try:
            groups.setdefault(r["image"], []).append(int(r["rank"]))
        except ValueError:
            return None, "a row without a rank"
    for img, ranks in groups.items():
        want = expected(img) if expected else None
        if sorted(ranks) != list(range(1, len(ranks) + 1)) or (want and len(ranks) != want):
            return None, f"an image with {len(ranks)} of {want or '?'} targets"
    return Part(name, rows), ""


def read_marker(out: str) -> Optional[dict]:
    """DIR's run marker when ``run.json`` is one of this layout's, else None."""
    try:
        with open(os.path.join(out, MARKER), encoding="utf-8") as f:
            m = json.load(f)
    except (OSError, ValueError, UnicodeError):
        return None
    if isinstance(m, dict) and m.get("tool") == TOOL and isinstance(m.get("run_id"), str) \
            and _RUN_ID.fullmatch(m["run_id"]):
        return m
    return None


def _as_json(value):
    """``value`` as it reads back from run.json (tuples become lists, ...)."""
    return json.loads(json.dumps(value))


def _host(x) -> np.ndarray:
    """A tensor (any device) or array-like -> numpy."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        if x.is_floating_point():
            x = x.float()
    return np.asarray(x)


# ------------------------------------------------------------------------ the store ----
class MapStore:
    """One run folder (module doc): create or resume it with :meth:`open` (rank 0: lock,
    marker, cleanup), or :meth:`attach` to it (the other ranks of a torchrun job); then
    :meth:`add_image` / :meth:`add_batch` the maps of whole images (buffered, committed as a
    shard every ``shard_size`` maps), and :meth:`finish` (flush, ``index.csv``,
    ``failed.csv``). As a context manager, a clean exit finishes the run and an exception
    keeps every committed shard and writes their index (rank 0); :meth:`close` releases the
    lock either way.

    ``done``: the images (absolute paths) committed already (by an earlier run, when resuming,
    or by this one): explain only the others."""

    def __init__(self, out: str, run_id: str, *, rank: int = 0, lock: Optional[DirLock] = None,
                 map_dtype: str = "float16", shard_size: int = 256, npy: bool = True,
                 expected: Optional[Callable[[str], Optional[int]]] = None,
                 hooks: Optional[StoreHooks] = None, marker: Optional[dict] = None):
        if map_dtype not in MAP_DTYPES:
            raise ValueError(f"map_dtype must be one of {tuple(MAP_DTYPES)}, got {map_dtype!r}")
        if int(shard_size) < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.out, self.run_id, self.rank, self.lock = out, run_id, int(rank), lock
        self.map_dtype, self.shard_size, self.npy = map_dtype, int(shard_size), bool(npy)
        self.expected, self.hooks, self.marker = expected, hooks, marker or {}
        self.sdir = os.path.join(out, SHARDS)
        self.tmp_prefix = f".{run_id}-"
        self.state = ResumeState([], set(), [])
        self.done: Set[str] = set()
        self.failed: List[Tuple[str, str]] = []
        self.seq = self.next_seq(self.rank)
        self._maps: List[np.ndarray] = []
        self._rows: List[Dict[str, object]] = []
        self._buffered: Set[str] = set()
        self.shards_written = self.maps_written = self.images_written = 0

    # -- opening -----------------------------------------------------------------------
    @classmethod
    def open(cls, out: str, *, preprocessing: Optional[Preprocessing] = None,
             config: Optional[Mapping[str, object]] = None, resume: bool = False,
             map_dtype: str = "float16", formats: Sequence[str] = ("npy",),
             shard_size: int = 256, expected: Optional[Callable[[str], Optional[int]]] = None,
             warn: Callable[[str], None] = lambda m: None, version: str = "",
             hooks: Optional[StoreHooks] = None) -> "MapStore":
        """Create DIR ``out`` if needed, take its lock, and check that this run may write there:

        * DIR holds a run marker: only with ``resume`` and the same options (``config``,
          ``preprocessing``, ``map_dtype``, ``formats``); this run's temporary files, shards
          without rows and inconsistent parts are removed (``warn`` says which);
        * no marker: DIR must hold none of the names a run writes (:data:`OWNED`); a new
          run id and marker are written.

        ``expected(image)``: how many targets a complete image has (None: any); a committed
        image with another number is explained again. Raises :class:`StoreError` (DIR
        untouched but for a lock file it created and removed)."""
        out = check_out_path(out)
        formats = sorted({str(f) for f in formats})
        if not formats or set(formats) - {"npy", "png"}:
            raise ValueError(f"formats must be npy and/or png, got {formats}")
        if map_dtype not in MAP_DTYPES:
            raise ValueError(f"map_dtype must be one of {tuple(MAP_DTYPES)}, got {map_dtype!r}")
        options = _as_json({**(config or {}), "formats": formats, "map_dtype": map_dtype,
                            "preprocessing": preprocessing.to_dict() if preprocessing else None})
        bad = [k for k in options if k in _OWN_KEYS]
        if bad:
            raise ValueError(f"config: {', '.join(bad)} are the store's own run.json keys")
        created = not os.path.isdir(out)
        try:
            os.makedirs(out, exist_ok=True)
        except OSError as e:
            raise StoreError("{out} {path}: cannot create the directory ({why})", path=out,
                             why=e.strerror or e) from None
        try:
            lock = DirLock(out)
        except StoreError:
            if created:
                _rmdir(out)
            raise
        try:
            kw = dict(lock=lock, map_dtype=map_dtype, shard_size=shard_size,
                      npy="npy" in formats, expected=expected, hooks=hooks)
            marker = read_marker(out)
            if marker is not None:
                store = cls._resume(out, marker, options, resume, warn, kw)
            else:
                store = cls._create(out, options, version, kw)
            store._hook("lock")
            return store
        except BaseException:
            lock.release(remove=lock.created and read_marker(out) is None)
            if created:
                _rmdir(out)
            raise

    @classmethod
    def _resume(cls, out: str, marker: dict, options: dict, resume: bool,
                warn: Callable[[str], None], kw: dict) -> "MapStore":
        if not resume:
            raise StoreError("{out} {path} already holds a tsgb explain run (id {run_id}): "
                             "add {resume} to complete it, or choose another (empty or new) "
                             "directory", path=out, run_id=marker["run_id"])
        if marker.get("layout") != LAYOUT:
            raise StoreError("{resume}: {path} holds a run of an older tsgb (layout "
                             "{layout}: float16 maps without a scale); tsgb_ext.open_maps "
                             "reads it, but it cannot be resumed: start the run again in "
                             "another (empty or new) directory", path=out,
                             layout=marker.get("layout", 1))
        diff = [k for k in options if marker.get(k) != options[k]]
        if diff:
            raise StoreError("{resume}: DIR was written with other options ({keys}): {was}",
                             keys=", ".join(diff), was={k: marker.get(k) for k in diff})
        store = cls(out, marker["run_id"], marker=marker, **kw)
        store.state = store.scan(cleanup=True, warn=warn)
        store.done = set(store.state.done)
        store.seq = store.next_seq(store.rank)
        return store

    @classmethod
    def _create(cls, out: str, options: dict, version: str, kw: dict) -> "MapStore":
        present = sorted(n for n in os.listdir(out)
                         if n in OWNED or re.fullmatch(r"index-rank\d+\.csv", n))
        if present:
            why = ("its run.json is not a tsgb explain run marker (written by another "
                   "program, or by an older tsgb)" if MARKER in present else
                   "it has no run.json run marker")
            raise StoreError("{out} {path} holds files this run did not write ({names}): "
                             "{why}. Nothing was changed; choose an empty or new directory",
                             path=out, names=", ".join(present), why=why)
        run_id = uuid.uuid4().hex[:12]
        marker = dict(tool=TOOL, layout=LAYOUT, run_id=run_id, version=version,
                      created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), **options)
        store = cls(out, run_id, marker=marker, **kw)
        data = json.dumps(marker, indent=1).encode("utf-8")
        atomic_write(os.path.join(out, MARKER), lambda f: f.write(data), store.tmp_prefix)
        return store

    @classmethod
    def attach(cls, out: str, run_id: str, rank: int, **kw) -> "MapStore":
        """The store of run ``run_id`` in ``out`` for another rank of the same job (no lock,
        no cleanup: rank 0 did both). ``kw``: ``map_dtype``, ``shard_size``, ``npy``,
        ``expected``, ``hooks`` as rank 0 has them."""
        return cls(os.path.abspath(out), run_id, rank=rank, marker=read_marker(out), **kw)

    # -- reading -----------------------------------------------------------------------
    def scan(self, cleanup: bool = False, warn: Callable[[str], None] = lambda m: None
             ) -> ResumeState:
        """The committed parts (sorted by name); with ``cleanup`` (rank 0, no other writer),
        remove this run's temporary files, shards without rows and inconsistent parts."""
        if cleanup:
            self._remove_temporaries()
        names: Dict[str, Set[str]] = {}
        if os.path.isdir(self.sdir):
            pat = _part_pattern(self.run_id)
            for f in os.listdir(self.sdir):
                m = pat.fullmatch(f)
                if m:
                    names.setdefault(f[:-4], set()).add(m.group(3))
        parts, done, discarded = [], set(), []
        for name in sorted(names):
            kinds = names[name]
            if "csv" not in kinds:     # killed between the shard and its rows
                if cleanup:
                    self._remove(name, kinds)
                continue
            part, why = _check_part(self.sdir, name, self.npy, self.expected)
            if part is None:
                discarded.append(name)
                if cleanup:
                    warn(f"discarded shard {name} ({why}); its images are explained again")
                    self._remove(name, kinds)
                continue
            part.rows = [r for r in part.rows if r["image"] not in done]
            parts.append(part)
            done.update(r["image"] for r in part.rows)
        return ResumeState(parts, done, discarded)

    def _remove(self, name: str, kinds: Iterable[str]) -> None:
        for k in kinds:
            try:
                os.remove(os.path.join(self.sdir, f"{name}.{k}"))
            except FileNotFoundError:
                pass

    def _remove_temporaries(self) -> None:
        for d in (self.out, self.sdir, os.path.join(self.out, PNG)):
            if os.path.isdir(d):
                for f in os.listdir(d):
                    if f.startswith(self.tmp_prefix) and f.endswith(".tmp"):
                        try:
                            os.remove(os.path.join(d, f))
                        except FileNotFoundError:  # pragma: no cover
                            pass

    def next_seq(self, rank: int) -> int:
        pat = _part_pattern(self.run_id)
        seqs = [int(m.group(2)) for f in (os.listdir(self.sdir) if os.path.isdir(self.sdir)
                                          else []) if (m := pat.fullmatch(f))
                and int(m.group(1)) == rank]
        return max(seqs) + 1 if seqs else 0

    # -- adding maps -------------------------------------------------------------------
    def add_image(self, image: str, maps, targets: Sequence[int], *,
                  scores: Optional[Sequence[float]] = None,
                  class_names: Optional[Sequence[str]] = None, rel: str = "", given: str = "",
                  png: str = "") -> List[Dict[str, object]]:
        """Add every map of one image: ``maps`` (T, H, W) (numpy or a tensor on any device;
        None for a png-only store), ``targets`` its T class ids, ``scores`` their
        probabilities, ``class_names`` the model's names (by id), ``rel`` / ``given`` the
        image's path below its input folder / as its input named it, ``png`` its overlay
        (relative to DIR). Returns the image's rows. Buffered: committed with the next
        shard (:meth:`flush`). Raises ValueError for an image already in the store, maps
        that are not finite, or shapes that disagree."""
        image = os.path.abspath(os.fspath(image))
        if image in self.done or image in self._buffered:
            raise ValueError(f"image {image!r}: already in the store (each image once)")
        targets = [int(t) for t in _host(targets).reshape(-1)]
        if not targets:
            raise ValueError(f"image {image!r}: no targets")
        arr = None
        if self.npy:
            if maps is None:
                raise ValueError("maps: required (this store writes npy maps)")
            arr = _host(maps).astype(np.float32, copy=False)
            if arr.ndim != 3 or arr.shape[0] != len(targets):
                raise ValueError(f"maps must be (T, H, W) with T = {len(targets)} targets, "
                                 f"got shape {arr.shape}")
            if self._maps and arr.shape[1:] != self._maps[0].shape[1:]:
                raise ValueError(f"maps: {arr.shape[1:]} maps in a shard of "
                                 f"{self._maps[0].shape[1:]} maps")
            if not np.isfinite(arr).all():
                raise ValueError(f"image {image!r}: the map is not finite (NaN or inf)")
        if class_names is not None and max(targets) >= len(class_names):
            raise ValueError(f"class_names: {len(class_names)} names, no name for class "
                             f"{max(targets)}")
        sc = [float(s) for s in _host(scores).reshape(-1)] if scores is not None else None
        if sc is not None and len(sc) != len(targets):
            raise ValueError(f"scores: {len(sc)} scores for {len(targets)} targets")
        rows = [{"image": image, "target": c,
                 "class_name": class_names[c] if class_names is not None else "",
                 "score": f"{sc[j]:.6g}" if sc is not None else "", "rank": j + 1,
                 "shard": "", "row": "", "png": png, "scale": "", "rel": rel, "given": given}
                for j, c in enumerate(targets)]
        if arr is not None:
            self._maps.append(arr)
        self._rows.extend(rows)
        self._buffered.add(image)
        if len(self._rows) >= self.shard_size:
            self.flush()
        return rows

    def add_batch(self, batch, class_names: Optional[Sequence[str]] = None,
                  images: Optional[Sequence[str]] = None) -> List[Tuple[str, str]]:
        """Add the images of one ``pipeline.explain_batches`` result (anything with ``maps``
        (B, T, H, W), ``targets``, ``scores``, ``valid`` and ``meta``): each image's valid
        maps. Image paths (and ``rel``, ``given``) come from ``meta`` (``pipeline.collate``
        batches carry them) unless ``images`` gives the paths. Returns the batch's failures
        (path, error): its undecodable images (``meta["failed"]``) and images whose maps are
        not finite; they are also kept for ``failed.csv`` (:attr:`failed`)."""
        meta = getattr(batch, "meta", None) or {}
        paths = list(images) if images is not None else meta.get("path")
        if paths is None:
            raise ValueError("images: the batch's meta has no 'path' (a pipeline.collate "
                             "batch has): pass the images' paths")
        failures = [tuple(f) for f in meta.get("failed", [])]
        n = len(paths)
        if n:
            maps = _host(batch.maps)
            if maps.shape[0] != n:
                raise ValueError(f"images: {n} paths for a batch of {maps.shape[0]} images")
            targets, valid = _host(batch.targets), _host(batch.valid).astype(bool)
            scores = _host(batch.scores)
            rels, givens = meta.get("rel") or [""] * n, meta.get("given") or [""] * n
            for b, path in enumerate(paths):
                v = valid[b]
                if not np.isfinite(maps[b][v]).all():
                    failures.append((path, "the map is not finite (NaN or inf): check the "
                                           "model and its weights"))
                    continue
                self.add_image(path, maps[b][v] if self.npy else None, targets[b][v],
                               scores=scores[b][v], class_names=class_names, rel=rels[b],
                               given=givens[b])
        self.failed.extend(failures)
        return failures

    # -- committing --------------------------------------------------------------------
    def _hook(self, step: str) -> None:
        if self.hooks is not None:
            self.hooks.reached(step)

    def _put(self, step: str, f, data: bytes) -> None:
        if self.hooks is None:
            f.write(data)
        else:
            self.hooks.write(step, f, data)

    def flush(self) -> None:
        """Commit the buffered images as one shard: maps (npy), then rows, each atomically."""
        if not self._rows:
            return
        name = f"{self.run_id}-r{self.rank}-{self.seq:06d}"
        os.makedirs(self.sdir, exist_ok=True)
        rows = self._rows
        if self.npy:
            stored, scales = encode_maps(np.concatenate(self._maps), self.map_dtype)
            for i, r in enumerate(rows):
                r["shard"], r["row"], r["scale"] = (f"{SHARDS}/{name}.npy", i,
                                                  repr(float(scales[i])))
            atomic_write(os.path.join(self.sdir, name + ".npy"),
                         lambda f: np.save(f, stored), self.tmp_prefix)
            self._hook("npy")
        data = csv_bytes(rows)
        atomic_write(os.path.join(self.sdir, name + ".csv"),
                     lambda f: self._put("rows", f, data), self.tmp_prefix)
        self.seq += 1
        self.shards_written += 1
        self.maps_written += len(rows)
        self.images_written += len(self._buffered)
        self.done |= self._buffered
        self._maps, self._rows, self._buffered = [], [], set()
        self._hook("part")

    def write_png(self, rel: str, fig_save: Callable[[io.BufferedWriter], None]) -> None:
        """``fig_save(f)`` writes the PNG into the open file ``f``; it becomes ``DIR/rel``
        atomically (``rel`` must stay inside DIR)."""
        path = os.path.realpath(os.path.join(self.out, rel))
        root = os.path.realpath(self.out)
        if os.path.commonpath([root, path]) != root:
            raise ValueError(f"rel: {rel!r} is outside the store")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write(path, fig_save, self.tmp_prefix)

    def write_index(self, parts: List[Part]) -> int:
        """``index.csv`` = the rows of ``parts``, sorted by image then rank (atomic)."""
        rows = [r for p in parts for r in p.rows]
        rows.sort(key=lambda r: (r["image"], int(r["rank"])))
        data = csv_bytes(rows)
        atomic_write(os.path.join(self.out, INDEX), lambda f: self._put("merge", f, data),
                     self.tmp_prefix)
        return len(rows)

    def write_failed(self, failed: Sequence[Tuple[str, str]]) -> None:
        buf = io.StringIO(newline="")
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["image", "error"])
        w.writerows(failed)
        data = buf.getvalue().encode(**ENCODING)
        atomic_write(os.path.join(self.out, FAILED), lambda f: f.write(data), self.tmp_prefix)

    def commit_index(self, failed: Optional[Sequence[Tuple[str, str]]] = None,
                     warn: Callable[[str], None] = lambda m: None) -> int:
        """Rank 0, once every rank has flushed: clean up, write ``index.csv`` from every
        committed shard and ``failed.csv`` (``failed``, default :attr:`failed`). Returns the
        number of index rows."""
        state = self.scan(cleanup=True, warn=warn)
        n = self.write_index(state.parts)
        self.write_failed(sorted(self.failed if failed is None else failed))
        return n

    def finish(self, warn: Callable[[str], None] = lambda m: None) -> int:
        """One process: :meth:`flush`, then :meth:`commit_index`. Returns the index's rows."""
        self.flush()
        return self.commit_index(warn=warn)

    def index_committed(self) -> int:
        """``index.csv`` of the shards committed so far (after an interruption: the buffered
        images are dropped, every committed one is kept). Returns the number of rows."""
        return self.write_index(self.scan().parts)

    def close(self) -> None:
        """Release the lock (rank 0); buffered images not flushed are dropped."""
        if self.lock is not None:
            self.lock.release()

    def __enter__(self) -> "MapStore":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.finish()
            elif self.lock is not None:
                try:
                    self.index_committed()
                except Exception:  # pragma: no cover (the first error is the one to see)
                    pass
        finally:
            self.close()


def _rmdir(path: str) -> None:
    try:
        os.rmdir(path)
    except OSError:
        pass
