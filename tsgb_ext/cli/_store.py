"""The output folder of ``tsgb explain``: lock, run marker, shards and their rows, index, resume.

Layout of DIR (everything a run may delete or overwrite is named here):

* ``.tsgb.lock``: the exclusive lock (``fcntl.flock``) of the run writing DIR; it holds the
  writer's pid and host. A second writer is refused while the lock is held.
* ``run.json``: the run marker: ``tool``, ``run_id`` and the run's options. DIR belongs to the
  run named there; ``--resume`` continues it (same options only).
* ``shards/<RUN>-r<RANK>-<SEQ>.npy``: float16 (or float32) maps (M, H, W), one per row (npy format);
  ``shards/<RUN>-r<RANK>-<SEQ>.csv``: that shard's index rows (written after the npy; both
  atomically: temporary file in the same folder, fsync, ``os.replace``). A shard holds whole
  images only (all the targets of each), so a shard is complete exactly when its row file
  exists; with ``--format png`` only, row files are written alone.
* ``index.csv``: every row of every row file, sorted by image then rank, written atomically at
  the end of a run (and when a one-process run is interrupted); ``failed.csv``: unreadable
  images of the last run; ``png/<name>-<hash>.png``: overlays.

Files and CSVs are UTF-8; a file name that is not valid UTF-8 is stored losslessly with
Python's ``surrogateescape`` (its raw bytes): read the CSVs with
``open(path, encoding="utf-8", errors="surrogateescape")`` and ``os.fsencode`` gives the
original bytes back.

A run only deletes or overwrites files it can prove it wrote: the names above in a DIR whose
``run.json`` is a marker of this tool, and shard and temporary files named with the run's id.
A DIR holding any of these names without such a marker is refused.

The hidden ``TSGB_EXPLAIN_FAULT`` environment variable stops a run at a named step, for the
tests: ``STEP[@N]=ACTION[;...]`` with ACTION ``kill`` (SIGKILL), ``exit`` (``os._exit(99)``),
``interrupt`` (raise KeyboardInterrupt), ``sigint`` (send SIGINT to itself) or ``wait:PATH``
(create ``PATH.reached``, then wait until PATH exists); N counts the step's passes (default 1).
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import re
import signal
import socket
import sys
import time
import uuid
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple

import numpy as np

LOCK = ".tsgb.lock"
MARKER = "run.json"
INDEX = "index.csv"
FAILED = "failed.csv"
SHARDS = "shards"
PNG = "png"
TOOL = "tsgb explain"
COLUMNS = ["image", "target", "class_name", "score", "rank", "shard", "row", "png"]
#: Names in DIR that belong to a run (a DIR holding any of them without a marker is refused).
OWNED = (INDEX, FAILED, MARKER, SHARDS, PNG)
_RUN_ID = re.compile(r"[0-9a-f]{12}")
#: How CSVs are read and written: UTF-8, undecodable file-name bytes kept as they are.
ENCODING = dict(encoding="utf-8", errors="surrogateescape")


class StoreError(Exception):
    """DIR cannot be used (in use, not ours, other options, ...); the message says why."""


# ------------------------------------------------------------------------ test faults ----
_fault_counts: Dict[str, int] = {}


def fault(step: str) -> None:
    """The test hook: act as ``TSGB_EXPLAIN_FAULT`` asks at ``step`` (see the module doc)."""
    spec = os.environ.get("TSGB_EXPLAIN_FAULT")
    if not spec:
        return
    _fault_counts[step] = n = _fault_counts.get(step, 0) + 1
    for entry in spec.split(";"):
        key, _, action = entry.strip().partition("=")
        name, _, count = key.partition("@")
        if name != step or n != int(count or 1):
            continue
        if action == "kill":
            sys.stdout.flush()
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(60)  # pragma: no cover
        elif action == "exit":
            os._exit(99)
        elif action == "interrupt":
            raise KeyboardInterrupt
        elif action == "sigint":
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)  # the handler raises KeyboardInterrupt here
        elif action.startswith("wait:"):
            path = action[5:]
            open(path + ".reached", "w").close()
            deadline = time.monotonic() + 120
            while not os.path.exists(path) and time.monotonic() < deadline:
                time.sleep(0.05)


# --------------------------------------------------------------------------- display ----
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


def csv_bytes(rows: Iterable[Dict[str, object]], header: Sequence[str] = COLUMNS) -> bytes:
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
    """``--out`` as an absolute path, checked without creating anything: an existing writable
    directory, or a path whose nearest existing parent is a writable directory."""
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.lexists(path) and not os.path.isdir(path):
        raise StoreError(f"--out {path}: exists and is not a directory")
    if os.path.isdir(path):
        if not os.access(path, os.W_OK | os.X_OK):
            raise StoreError(f"--out {path}: the directory is not writable")
        return path
    parent = os.path.dirname(path)
    while not os.path.lexists(parent) and parent != os.path.dirname(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise StoreError(f"--out {path}: cannot create the directory ({parent} is not a "
                         f"directory)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise StoreError(f"--out {path}: cannot create the directory ({parent} is not "
                         f"writable)")
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
            raise StoreError(f"--out {out}: the directory is not writable "
                             f"({e.strerror or e})") from None
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
            raise StoreError(f"--out {out} is in use by another tsgb explain run ({who}): wait "
                             f"for it to finish, or choose another --out") from None
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


class Store:
    """DIR of one run (``run_id``). Rank 0 makes it with :func:`open_output` (lock, marker,
    cleanup); the other ranks of a torchrun job attach with ``Store(out, run_id)``."""

    def __init__(self, out: str, run_id: str, lock: Optional[DirLock] = None):
        self.out, self.run_id, self.lock = out, run_id, lock
        self.sdir = os.path.join(out, SHARDS)
        self.tmp_prefix = f".{run_id}-"

    # -- reading -----------------------------------------------------------------------
    def scan(self, npy: bool, expected: Optional[Callable[[str], Optional[int]]] = None,
             cleanup: bool = False, warn: Callable[[str], None] = lambda m: None
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
            part, why = _check_part(self.sdir, name, npy, expected)
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

    # -- writing -----------------------------------------------------------------------
    def next_seq(self, rank: int) -> int:
        pat = _part_pattern(self.run_id)
        seqs = [int(m.group(2)) for f in (os.listdir(self.sdir) if os.path.isdir(self.sdir)
                                          else []) if (m := pat.fullmatch(f))
                and int(m.group(1)) == rank]
        return max(seqs) + 1 if seqs else 0

    def write_part(self, name: str, rows: List[Dict[str, object]],
                   maps: Optional[np.ndarray]) -> None:
        """Commit one shard: its maps (when given), then its rows, each atomically."""
        os.makedirs(self.sdir, exist_ok=True)
        if maps is not None:
            atomic_write(os.path.join(self.sdir, name + ".npy"),
                         lambda f: np.save(f, maps), self.tmp_prefix)
            fault("npy")
        data = csv_bytes(rows)

        def write(f):
            half = len(data) // 2
            f.write(data[:half])
            f.flush()
            fault("rows")      # the test hook: a kill while the rows are half written
            f.write(data[half:])
        atomic_write(os.path.join(self.sdir, name + ".csv"), write, self.tmp_prefix)
        fault("part")

    def write_png(self, rel: str, fig_save: Callable[[io.BufferedWriter], None]) -> None:
        """``fig_save(f)`` writes the PNG into the open file ``f``; it becomes ``DIR/rel``
        atomically."""
        path = os.path.join(self.out, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write(path, fig_save, self.tmp_prefix)

    def write_index(self, parts: List[Part]) -> int:
        """``index.csv`` = the rows of ``parts``, sorted by image then rank (atomic)."""
        rows = [r for p in parts for r in p.rows]
        rows.sort(key=lambda r: (r["image"], int(r["rank"])))
        data = csv_bytes(rows)

        def write(f):
            f.write(data)
            fault("merge")
        atomic_write(os.path.join(self.out, INDEX), write, self.tmp_prefix)
        return len(rows)

    def write_failed(self, failed: Sequence[Tuple[str, str]]) -> None:
        buf = io.StringIO(newline="")
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["image", "error"])
        w.writerows(failed)
        data = buf.getvalue().encode(**ENCODING)
        atomic_write(os.path.join(self.out, FAILED), lambda f: f.write(data), self.tmp_prefix)

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()


# ----------------------------------------------------------------------- open / own ----
def read_marker(out: str) -> Optional[dict]:
    """DIR's run marker when ``run.json`` is one of this tool's, else None."""
    try:
        with open(os.path.join(out, MARKER), encoding="utf-8") as f:
            m = json.load(f)
    except (OSError, ValueError, UnicodeError):
        return None
    if isinstance(m, dict) and m.get("tool") == TOOL and isinstance(m.get("run_id"), str) \
            and _RUN_ID.fullmatch(m["run_id"]):
        return m
    return None


def open_output(out: str, config: dict, resume: bool, npy: bool,
                expected: Optional[Callable[[str], Optional[int]]] = None,
                warn: Callable[[str], None] = lambda m: None,
                version: str = "") -> Tuple[Store, ResumeState]:
    """Rank 0: create DIR if needed, take its lock, and check that this run may write there:

    * DIR holds a run marker: only with ``resume`` and the same ``config``; the run's
      temporary files, shards without rows and inconsistent parts are removed;
    * no marker: DIR must hold none of the names a run writes (:data:`OWNED`); a new run id
      and marker are written.

    Raises :class:`StoreError` (DIR untouched but for a lock file it created and removed)."""
    created = not os.path.isdir(out)
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise StoreError(f"--out {out}: cannot create the directory ({e.strerror or e})") from None
    try:
        lock = DirLock(out)
    except StoreError:
        if created:
            try:
                os.rmdir(out)
            except OSError:  # pragma: no cover
                pass
        raise
    try:
        marker = read_marker(out)
        if marker is not None:
            if not resume:
                raise StoreError(
                    f"--out {out} already holds a tsgb explain run (id {marker['run_id']}): add "
                    f"--resume to complete it, or choose another (empty or new) directory")
            diff = [k for k in config if marker.get(k) != config[k]]
            if diff:
                raise StoreError(f"--resume: DIR was written with other options "
                                 f"({', '.join(diff)}): "
                                 f"{ {k: marker.get(k) for k in diff} }")
            store = Store(out, marker["run_id"], lock)
            state = store.scan(npy, expected, cleanup=True, warn=warn)
        else:
            present = sorted(n for n in os.listdir(out)
                             if n in OWNED or re.fullmatch(r"index-rank\d+\.csv", n))
            if present:
                why = ("its run.json is not a tsgb explain run marker (written by another "
                       "program, or by an older tsgb)" if MARKER in present else
                       "it has no run.json run marker")
                raise StoreError(
                    f"--out {out} holds files this run did not write "
                    f"({', '.join(present)}): {why}. Nothing was changed; choose an empty or "
                    f"new directory")
            run_id = uuid.uuid4().hex[:12]
            store = Store(out, run_id, lock)
            m = dict(tool=TOOL, run_id=run_id, version=version,
                     created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), **config)
            data = json.dumps(m, indent=1).encode("utf-8")
            atomic_write(os.path.join(out, MARKER), lambda f: f.write(data), store.tmp_prefix)
            state = ResumeState([], set(), [])
        fault("lock")
        return store, state
    except BaseException:
        lock.release(remove=lock.created and read_marker(out) is None)
        if created:
            try:
                os.rmdir(out)
            except OSError:
                pass
        raise
