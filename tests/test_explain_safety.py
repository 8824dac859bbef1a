"""`tsgb explain` data safety (issue 11): nothing lost, nothing clobbered; models never left
converted by concurrent or out-of-order use.

Kills happen at exact points through failpoints (tests/failpoints.py: a StoreHooks object
passed to ``cli.main``), in subprocesses; everything else runs in process on a tiny seeded CNN
(tests/explain_factory.py, 32 x 32) and a few tiny images.
"""
import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from failpoints import Failpoints
from tsgb_ext import TSGB, cli
from tsgb_ext.cli._common import display
from tsgb_ext.data import pipeline
from tsgb_ext.io import store as _store

PIL = pytest.importorskip("PIL")
pytest.importorskip("tqdm")
pytest.importorskip("matplotlib")
from PIL import Image  # noqa: E402

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
TINY = ["--model", "explain_factory:tiny", "--workers", "0", "--no-progress"]
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(
    [TESTS, REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]),
    OMP_NUM_THREADS="1")


def _photo(seed, h=40, w=48):
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, w, dtype=np.float32)[None, :, None]
    return np.clip(base + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)


@pytest.fixture
def imgs(tmp_path):
    """4 tiny photos (JPEG and PNG, one in a subfolder) + 1 corrupt file."""
    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    for i, name in enumerate(["a.jpg", "b.png", "c.jpg", "sub/d.png"]):
        Image.fromarray(_photo(i)).save(root / name)
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    return root


def run(argv, fault=None):
    """cli.main in process (with the failpoints ``fault``); returns the exit code
    (SystemExit's for refusals)."""
    try:
        return cli.main(["explain"] + [str(a) for a in argv],
                        hooks=Failpoints(fault) if fault else None)
    except SystemExit as e:
        return e.code


def sub_cmd(argv, fault=None):
    """The command line of a subprocess run (through tests/failpoints.py with ``fault``)."""
    head = ["-m", "failpoints", fault] if fault else ["-m", "tsgb_ext.cli"]
    return [sys.executable, *head, "explain"] + [str(a) for a in argv]


def run_sub(argv, fault=None, **kw):
    return subprocess.run(sub_cmd(argv, fault), env=ENV, cwd=REPO, capture_output=True,
                          text=True, timeout=300, **kw)


def index(out):
    with open(out / "index.csv", newline="", encoding="utf-8", errors="surrogateescape") as f:
        return list(csv.DictReader(f))


def load_map(out, row):
    """The map of an index row: the stored array times the row's scale."""
    return np.load(out / row["shard"])[int(row["row"])].astype(np.float32) * float(row["scale"])


def same_index(a_out, b_out):
    """Two output folders hold the same rows and the same maps."""
    a, b = index(a_out), index(b_out)
    key = lambda r: (r["image"], r["target"], r["rank"], r["class_name"], r["score"])  # noqa
    assert [key(r) for r in a] == [key(r) for r in b]
    for ra, rb in zip(a, b):
        np.testing.assert_array_equal(load_map(a_out, ra), load_map(b_out, rb))


def debris(out):
    """Temporary files, shards without rows: what a clean folder never holds."""
    left = []
    for d, _, files in os.walk(out):
        left += [f for f in files if f.endswith(".tmp")]
    shards = out / "shards"
    if shards.is_dir():
        names = set(os.listdir(shards))
        left += [f for f in names if f.endswith(".npy") and f[:-4] + ".csv" not in names]
    return left


# ------------------------------------------------ 1. kills during a write, then --resume ----
@pytest.mark.parametrize("point", ["rows@2", "npy@2", "part@2", "merge"])
def test_kill_at_any_write_then_resume_keeps_every_target(imgs, tmp_path, point):
    """SIGKILL while a shard's rows are half written (the issue's case), between a shard and
    its rows, right after a shard, during the index write: --resume ends with every image
    holding all its K targets, the same index and maps as an uninterrupted run, no debris."""
    out, fresh = tmp_path / "out", tmp_path / "fresh"
    args = [imgs, *TINY, "--top-k", "3", "--batch-size", "1", "--shard-size", "3"]
    p = run_sub([*args, "--out", out], fault=f"{point}=kill")
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    if (out / "index.csv").exists():   # whatever is there is whole images only
        rows = index(out)
        per = {}
        for r in rows:
            per.setdefault(r["image"], []).append(r["rank"])
        assert all(v == ["1", "2", "3"] for v in per.values()), per
    assert run([*args, "--out", out, "--resume"]) == 0
    assert run([*args, "--out", fresh]) == 0
    same_index(out, fresh)
    rows = index(out)
    assert len(rows) == 12 and len({r["image"] for r in rows}) == 4
    assert debris(out) == []


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.parametrize("close", [True, False])
def test_forked_workers_do_not_keep_the_lock(tmp_path, close):
    """A DataLoader worker is a fork: it shares the lock unless its worker_init_fn
    (close_inherited_locks, which the CLI passes) closes it; a worker outliving a killed run
    would otherwise keep DIR locked."""
    lock = _store.DirLock(str(tmp_path))
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: a worker that is still alive after its parent let go
        try:
            if close:
                _store.close_inherited_locks(0)
            os.write(w, b"x")
            time.sleep(3)
        finally:
            os._exit(0)
    try:
        os.read(r, 1)
        lock.release()
        if close:
            _store.DirLock(str(tmp_path)).release()
        else:
            with pytest.raises(_store.StoreError, match="in use"):
                _store.DirLock(str(tmp_path))
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(r)
        os.close(w)


def test_resume_redoes_an_image_with_missing_targets(imgs, tmp_path, capsys):
    """A committed shard whose image lacks targets (any damage) is not 'done': it is discarded
    with a warning and the image explained again with all its targets."""
    out, fresh = tmp_path / "out", tmp_path / "fresh"
    args = [imgs, *TINY, "--top-k", "3", "--batch-size", "1", "--shard-size", "3"]
    assert run([*args, "--out", out, "--stop-after-shards", "2"]) == 130
    run_id = json.loads((out / "run.json").read_text())["run_id"]
    part = out / "shards" / f"{run_id}-r0-000001"
    header, rows = _store.read_csv(str(part) + ".csv")
    (part.with_suffix(".csv")).write_bytes(_store.csv_bytes(rows[:1]))   # 1 of 3 targets
    np.save(str(part) + ".npy", np.load(str(part) + ".npy")[:1])
    assert run([*args, "--out", out, "--resume"]) == 0
    assert "discarded shard" in capsys.readouterr().err
    assert run([*args, "--out", fresh]) == 0
    same_index(out, fresh)


# ------------------------------------------------------------- 2. two writers, one DIR ----
def test_second_writer_is_refused_while_the_first_runs(imgs, tmp_path):
    out, go = tmp_path / "out", tmp_path / "go"
    args = [imgs, *TINY, "--top-k", "2", "--batch-size", "1", "--shard-size", "2"]
    first = subprocess.Popen(sub_cmd([*args, "--out", out], f"part=wait:{go}"), env=ENV,
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not os.path.exists(f"{go}.reached"):
            assert first.poll() is None and time.monotonic() < deadline, \
                "the first run did not stop at its first shard"
            time.sleep(0.05)
        holder = json.loads((out / ".tsgb.lock").read_text())
        assert holder["pid"] == first.pid and holder["host"]
        before = sorted(os.listdir(out / "shards"))
        for extra in ([], ["--resume"]):
            with pytest.raises(SystemExit) as e:
                cli.main(["explain", *map(str, args), "--out", str(out), *extra])
            assert e.value.code == 2
        assert sorted(os.listdir(out / "shards")) == before   # the second wrote nothing
    finally:
        go.touch()
        so, se = first.communicate(timeout=300)
    assert first.returncode == 0, se[-2000:]
    rows = index(out)
    assert len(rows) == 8
    for r in rows:   # every row points at its own image's map
        assert r["shard"] and load_map(out, r).shape == (32, 32)
    fresh = tmp_path / "fresh"
    assert run([*args, "--out", fresh]) == 0
    same_index(out, fresh)


def test_refusal_names_the_holder(imgs, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    lock = _store.DirLock(str(out))   # another writer, in this process
    try:
        assert run([imgs, "--out", out, *TINY]) == 2
        err = capsys.readouterr().err
        assert "in use by another tsgb explain run" in err and f"pid {os.getpid()}" in err
    finally:
        lock.release()
    assert run([imgs, "--out", out, *TINY]) == 0   # free again


# --------------------------------------------------------- 3. names that are not UTF-8 ----
@pytest.mark.parametrize("fmt", ["npy", "png", "npy,png"])
def test_file_name_not_utf8_is_stored_losslessly(imgs, tmp_path, capsys, fmt):
    raw = os.fsencode(str(imgs)) + b"/bad\xff\xfename.jpg"
    try:
        with open(raw, "wb") as f:
            Image.fromarray(_photo(9)).save(f, format="JPEG")
    except OSError:
        pytest.skip("this file system refuses names that are not UTF-8")
    with open(os.fsencode(str(imgs)) + b"/worse\xff.jpg", "wb") as f:
        f.write(b"corrupt")
    out = tmp_path / "out"
    args = [imgs, "--out", out, *TINY, "--top-k", "2", "--format", fmt]
    assert run(args) == 0
    printed = capsys.readouterr()
    assert "bad\\xff\\xfename.jpg" not in printed.out   # explained, so not listed
    assert "worse\\xff.jpg" in printed.out              # listed, escaped
    rows = index(out)
    bad = [r for r in rows if os.fsencode(r["image"]).endswith(b"/bad\xff\xfename.jpg")]
    assert len(bad) == 2 and os.fsencode(bad[0]["image"]) == raw
    assert len(rows) == 10
    with open(out / "failed.csv", newline="", encoding="utf-8", errors="surrogateescape") as f:
        failed = list(csv.DictReader(f))
    assert any(os.fsencode(r["image"]).endswith(b"/worse\xff.jpg") for r in failed)
    # every other byte of the index is plain UTF-8
    lines = (out / "index.csv").read_bytes().splitlines()
    assert sum(1 for ln in lines if b"\xff" in ln) == 2
    if "npy" in fmt:
        ref = TSGB(__import__("explain_factory").tiny().eval()).attribute(
            (pipeline.open_rgb(bad[0]["image"], (32, 32))[None] - 0.5) / 0.25,
            [[int(bad[0]["target"]), int(bad[1]["target"])]])[0].numpy()
        np.testing.assert_allclose(load_map(out, bad[0]), ref[0], rtol=2e-3,
                                   atol=1e-4 * np.abs(ref).max())
    # --resume of the finished run: nothing to redo, no crash, no stray shard
    shards = sorted(os.listdir(out / "shards"))
    assert run(args + ["--resume"]) == 0
    assert "already done (resume): 5 images" in capsys.readouterr().out
    assert sorted(os.listdir(out / "shards")) == shards and index(out) == rows


# ----------------------------------------------------------------- 4. 16-bit grey PNGs ----
def test_16bit_grey_png_is_scaled_not_clipped(tmp_path):
    g16 = (np.linspace(0, 65535, 48)[None, :] * np.ones((40, 1))).astype(np.uint16)
    g16[::7] = 30000
    Image.fromarray(g16).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode.startswith("I;16")
    Image.fromarray((g16 // 257).astype(np.uint8)).save(tmp_path / "g8.png")
    a = pipeline.open_rgb(str(tmp_path / "g16.png"), (40, 48))
    b = pipeline.open_rgb(str(tmp_path / "g8.png"), (40, 48))
    assert float((a > 0.99).float().mean()) < 0.05          # not 99% white
    torch.testing.assert_close(a, b, atol=1 / 255, rtol=0)
    torch.testing.assert_close(a[0], torch.from_numpy(g16 / 65535).float(), atol=1e-6, rtol=0)
    # images whose range is unknown (32-bit integer, float) are refused into failed.csv
    Image.fromarray(g16.astype(np.int32) * 1000).save(tmp_path / "i32.tif")
    Image.fromarray(g16.astype(np.float32)).save(tmp_path / "f32.tif")
    out = tmp_path / "out"
    assert run([tmp_path, "--out", out, *TINY]) == 0
    assert sorted(os.path.basename(r["image"]) for r in index(out)) == ["g16.png", "g8.png"]
    failed = (out / "failed.csv").read_text()
    assert "i32.tif" in failed and "f32.tif" in failed and "pixel mode" in failed
    m16, m8 = (load_map(out, r).astype(np.float32) for r in index(out))
    np.testing.assert_allclose(m16, m8, atol=0.05 * np.abs(m8).max())


# ------------------------------------------------------ 5. FIFOs and other special files ----
def _alarm(seconds):
    def boom(*_):
        raise TimeoutError("blocked")
    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    return old


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")
def test_fifo_and_symlink_loops_are_never_opened(imgs, tmp_path, capsys):
    os.mkfifo(imgs / "trap.jpg")
    os.symlink("loop.jpg", imgs / "loop.jpg")           # a symlink loop
    os.symlink(imgs / "a.jpg", imgs / "link_to_a.jpg")  # a symlink to a regular file: taken
    os.symlink(imgs, imgs / "sub" / "up")               # a folder loop (not followed)
    old = _alarm(120)
    try:
        names = [os.path.basename(it.path) for it in pipeline.list_images([str(imgs)])]
        assert names == ["a.jpg", "b.png", "c.jpg", "corrupt.jpg", "link_to_a.jpg", "d.png"]
        with pytest.raises(OSError, match="not a regular file"):
            pipeline.open_rgb(str(imgs / "trap.jpg"), (32, 32))   # raises at once
        out = tmp_path / "out"
        assert run([imgs, "--out", out, *TINY]) == 0
        assert len(index(out)) == 5
        assert run([imgs / "trap.jpg", "--out", tmp_path / "o2", *TINY]) == 2
        assert "not a regular file" in capsys.readouterr().err
        assert not (tmp_path / "o2").exists()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# -------------------------------------------------- 6, 7. DIR holding unrelated files ----
@pytest.mark.parametrize("files", [
    {"index.csv": b"image,target\nmine.jpg,3\n"},
    {"shards/mine.npy": b"\x93NUMPY my data"},
    {"run.json": b'{"experiment": 7}'},
    {"failed.csv": b"my,own\n"},
    {"png/holiday.png": b"\x89PNG my picture"},
    {"index-rank0.csv": b"x\n"},
    # the marker of an older tsgb (no run id): not provably this run's
    {"run.json": b'{"model": "explain_factory:tiny", "top_k": null}', "index.csv": b"a,b\n"},
])
@pytest.mark.parametrize("resume", [False, True])
def test_dir_with_files_of_another_program_is_refused_untouched(imgs, tmp_path, capsys,
                                                                files, resume):
    out = tmp_path / "out"
    for name, data in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(data)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert run([imgs, "--out", out, *TINY] + (["--resume"] if resume else [])) == 2
    assert "did not write" in capsys.readouterr().err
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before   # nothing deleted, overwritten or added (the lock file neither)


def test_unrelated_files_beside_a_run_are_left_alone(imgs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert run([imgs, "--out", out, *TINY, "--shard-size", "2"]) == 0
    (out / "shards" / "mine.npy").write_bytes(b"mine")
    (out / "png").mkdir()
    (out / "png" / "mine.png").write_bytes(b"mine")
    assert run([imgs, "--out", out, *TINY, "--shard-size", "2", "--resume"]) == 0
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "shards" / "mine.npy").read_bytes() == b"mine"
    assert (out / "png" / "mine.png").read_bytes() == b"mine"


def test_run_marker_binds_the_shards(imgs, tmp_path):
    out = tmp_path / "out"
    assert run([imgs, "--out", out, *TINY, "--shard-size", "2"]) == 0
    marker = json.loads((out / "run.json").read_text())
    assert marker["tool"] == "tsgb explain" and len(marker["run_id"]) == 12
    assert marker["top_k"] is None and marker["formats"] == ["npy"]
    shards = os.listdir(out / "shards")
    assert shards and all(f.startswith(marker["run_id"] + "-r0-") for f in shards)
    # a second run without --resume is refused, and says how to continue
    assert run([imgs, "--out", out, *TINY]) == 2


# ---------------------------------------------------------- 8. --out inside an input ----
def test_out_inside_an_input_folder_is_not_searched(imgs, tmp_path, capsys):
    out = imgs / "maps"
    args = [imgs, "--out", out, *TINY, "--format", "npy,png"]
    assert run(args) == 0
    assert len(index(out)) == 4 and len(os.listdir(out / "png")) == 4
    capsys.readouterr()
    assert run(args + ["--resume"]) == 0     # the overlays are not new inputs
    assert "0 images explained" in capsys.readouterr().out
    assert len(index(out)) == 4
    names = [it.path for it in pipeline.list_images([str(imgs)], exclude=[str(out)])]
    assert len(names) == 5 and not [p for p in names if p.startswith(str(out))]
    # --out is the input folder itself: its png/ and shards/ are skipped, the rest is read
    Image.fromarray(_photo(7)).save(out / "new.png")
    capsys.readouterr()
    assert run([out, "--out", out, *TINY, "--format", "npy,png", "--resume"]) == 0
    assert "1 images explained" in capsys.readouterr().out
    assert len(index(out)) == 5


# ------------------------------------------------------------- the other promises ----
def test_nothing_explained_exits_non_zero(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    for i in range(3):
        (tmp_path / "in" / f"x{i}.jpg").write_bytes(b"no image")
    out = tmp_path / "out"
    assert run([tmp_path / "in", "--out", out, *TINY]) == 1
    err = capsys.readouterr().err
    assert "no image could be explained" in err
    assert len((out / "failed.csv").read_text().splitlines()) == 4
    # no image files at all: refused up front, DIR not created
    (tmp_path / "empty").mkdir()
    assert run([tmp_path / "empty", "--out", tmp_path / "o2", *TINY]) == 2
    assert "no image files" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()


def test_images_whose_maps_are_not_finite_are_listed_not_written(imgs, tmp_path, capsys):
    out = tmp_path / "out"
    assert run([imgs, "--out", out, "--model", "explain_factory:overflow", *TINY[2:]]) == 1
    printed = capsys.readouterr()
    assert "not finite" in printed.err and "no image could be explained" in printed.err
    assert index(out) == [] and not (out / "shards").exists()
    assert (out / "failed.csv").read_text().count("not finite") == 4


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_weights_with_nan_or_inf_are_refused(imgs, tmp_path, capsys, bad):
    import explain_factory
    sd = explain_factory.tiny().state_dict()
    sd["0.weight"][0, 0, 0, 0] = bad
    w = tmp_path / "w.pt"
    torch.save(sd, w)
    out = tmp_path / "out"
    assert run([imgs, "--out", out, *TINY, "--weights", w]) == 2
    err = capsys.readouterr().err
    assert "NaN or inf" in err and "0.weight" in err
    assert not out.exists()


@pytest.mark.parametrize("extra", [["--target", "99"], ["--model", "explain_factory:nope"],
                                   ["--labels", "{tmp}/missing.csv"], ["--top-k", "11"]])
def test_refused_runs_create_no_folder(imgs, tmp_path, extra):
    out = tmp_path / "deep" / "out"
    assert run([imgs, "--out", out, *TINY] + [e.format(tmp=tmp_path) for e in extra]) == 2
    assert not (tmp_path / "deep").exists()


@pytest.mark.parametrize("point", ["start", "model", "lock", "npy@2", "rows@2", "part@2",
                                   "merge"])
def test_ctrl_c_at_any_step_prints_the_hint_and_resumes(imgs, tmp_path, capsys, point):
    out, fresh = tmp_path / "out", tmp_path / "fresh"
    args = [imgs, *TINY, "--top-k", "2", "--batch-size", "1", "--shard-size", "2"]
    assert run([*args, "--out", out], fault=f"{point}=interrupt") == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "run the same command" in err and "Traceback" not in err
    resume = ["--resume"] if (out / "run.json").exists() else []
    assert ("--resume" in err) == bool(resume)
    assert run([*args, "--out", out, *resume]) == 0
    assert run([*args, "--out", fresh]) == 0
    same_index(out, fresh)
    assert debris(out) == []


def _default_sigint():
    # a disposition or mask inherited from how the tests were started (a shell without job
    # control starts background jobs with SIGINT ignored) would keep the signal from the run:
    # give the subprocess what a terminal's Ctrl-C meets
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def test_real_sigint_prints_no_traceback(imgs, tmp_path):
    out = tmp_path / "out"
    p = run_sub([imgs, "--out", out, *TINY, "--batch-size", "1", "--shard-size", "1"],
                fault="part@2=sigint", preexec_fn=_default_sigint)
    assert p.returncode == 130, p.stderr[-2000:]
    assert "Traceback" not in p.stderr and "--resume" in p.stderr
    assert len(index(out)) == 2       # the two complete shards are in the index


def test_control_characters_in_names_are_escaped_when_printed(imgs, tmp_path, capsys):
    evil = imgs / "evil\x1b[2J\nname\r.jpg"
    evil.write_bytes(b"not an image")
    assert run([imgs, "--out", tmp_path / "out", *TINY]) == 0
    printed = capsys.readouterr()
    for text in (printed.out, printed.err):
        assert "\x1b" not in text and "\r" not in text
    assert "evil\\x1b[2J\\nname\\r.jpg" in printed.out
    assert "evil\\x1b[2J\\nname\\r.jpg" in printed.err
    assert display("a\udcffb\x7f\t") == "a\\xffb\\x7f\\t"


def test_pipeline_feeds_a_float64_model_float64(imgs):
    import explain_factory
    m = explain_factory.tiny().double()
    ds = pipeline.ImageFileDataset([str(imgs / "a.jpg")], 32)
    (r,) = pipeline.explain_batches(m, [pipeline.collate([ds[0]])], mean=(0.5,) * 3,
                                    std=(0.25,) * 3)
    assert r.maps.dtype == torch.float64 and torch.isfinite(r.maps).all()


# ------------------------------------------------- 9, 10. models restored under threads ----
def _model_state(m):
    return ([n for n, mod in m.named_modules() if "forward" in mod.__dict__],
            {n: p.requires_grad for n, p in m.named_parameters()},
            {n: mod.training for n, mod in m.named_modules()})


@pytest.mark.parametrize("shared", [True, False], ids=["one TSGB", "one TSGB per thread"])
def test_four_threads_twenty_calls_each_equal_single_thread_maps(shared):
    import explain_factory
    torch.manual_seed(0)
    m = explain_factory.tiny().train()
    for p in list(m.parameters())[:3]:
        p.requires_grad_(False)
    state = _model_state(m)
    xs = [torch.randn(2, 3, 32, 32) for _ in range(4)]
    refs = [TSGB(m).attribute(x, [[1, 4]] * 2) for x in xs]
    one = TSGB(m)
    errors, maps = [], {}

    def work(i):
        ex = one if shared else TSGB(m)
        try:
            for k in range(20):
                maps[i, k] = ex.attribute(xs[i], [[1, 4]] * 2)
        except Exception as e:  # pragma: no cover (the failure being tested)
            errors.append(repr(e))
    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for (i, k), got in maps.items():
        torch.testing.assert_close(got, refs[i], rtol=1e-6, atol=1e-7)
    assert _model_state(m) == state          # the model is restored
    # a plain backward gives the ordinary gradients again
    m.eval()
    x = xs[0].clone().requires_grad_(True)
    m(x)[:, 1].sum().backward()
    ref_model = explain_factory.tiny().eval()
    x2 = xs[0].clone().requires_grad_(True)
    ref_model(x2)[:, 1].sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)


def test_with_block_in_one_thread_calls_in_others():
    import explain_factory
    m = explain_factory.tiny()
    state = _model_state(m)
    x = torch.randn(2, 3, 32, 32)
    ref = TSGB(m).attribute(x, 3)
    ex = TSGB(m)
    got, errors = [], []

    def call(e):
        try:
            for _ in range(5):
                got.append(e.attribute(x, 3))
        except Exception as err:  # pragma: no cover
            errors.append(repr(err))
    with ex:
        threads = [threading.Thread(target=call, args=(e,)) for e in (ex, TSGB(m), ex)]
        for t in threads:
            t.start()
        time.sleep(0.2)
        got.append(ex.attribute(x, 3))
    for t in threads:
        t.join()
    assert errors == [] and len(got) == 16
    for g in got:
        torch.testing.assert_close(g, ref, rtol=1e-6, atol=1e-7)
    assert _model_state(m) == state


def test_with_blocks_exited_out_of_order_leave_the_model_restored():
    import explain_factory
    m = explain_factory.tiny()
    state = _model_state(m)
    a, b = TSGB(m), TSGB(m)
    a.__enter__()
    with pytest.raises(RuntimeError, match="already converted"):
        b.__enter__()
    with pytest.raises(RuntimeError, match="already converted"):
        TSGB(m).attribute(torch.randn(1, 3, 32, 32), 0)
    a.__exit__(None, None, None)
    b.__exit__(None, None, None)
    assert _model_state(m) == state
    with b:                                   # usable again
        b.attribute(torch.randn(1, 3, 32, 32), 0)
    assert _model_state(m) == state


def test_float64_input_to_a_float32_model_names_the_dtypes():
    import explain_factory
    with pytest.raises(TypeError, match=r"float64.*float32"):
        TSGB(explain_factory.tiny()).attribute(torch.randn(1, 3, 32, 32, dtype=torch.float64), 0)
