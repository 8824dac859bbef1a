"""`tsgb explain` and the pipeline API: outputs, targets, resume, bad inputs, safety, torchrun.

Uses a tiny seeded CNN (tests/explain_factory.py, 32 x 32 input) and scikit-image photographs
written to tmp_path, so the whole file runs in well under a minute on two CPU cores.
"""
import csv
import importlib.util
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import tsgb_ext

from tsgb_ext import TSGB, cli
from tsgb_ext.cli import explain as explain_cli
from tsgb_ext.data import pipeline

_missing = [m for m in ("skimage", "PIL", "tqdm", "matplotlib")
            if importlib.util.find_spec(m) is None]
pytestmark = pytest.mark.skipif(bool(_missing), reason=f"needs {', '.join(_missing)}")

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
TINY = ["--model", "explain_factory:tiny", "--workers", "0", "--no-progress"]


@pytest.fixture(scope="module")
def imgs(tmp_path_factory):
    """5 photos (JPEG and PNG, one in a subfolder, one with an awkward name) + 1 corrupt file."""
    from PIL import Image
    from skimage import data
    root = tmp_path_factory.mktemp("imgs")
    (root / "sub dir").mkdir()
    photos = {"chelsea.jpg": data.chelsea(), "coffee.png": data.coffee(),
              "astronaut.jpg": data.astronaut()[::4, ::4], "sub dir/rocket.jpg": data.rocket(),
              "sub dir/..we ird;名.png": data.camera()[::4, ::4]}
    for name, arr in photos.items():
        Image.fromarray(arr).save(root / name)
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    return root


def run(argv):
    return cli.main(["explain"] + [str(a) for a in argv])


def index(out):
    with open(out / "index.csv", newline="") as f:
        return list(csv.DictReader(f))


def stored(out, row):
    """The map of an index row as stored in its shard (float16 or float32)."""
    return np.load(out / row["shard"])[int(row["row"])]


def load_map(out, row):
    """The map of an index row: the stored array times the row's scale."""
    return stored(out, row).astype(np.float32) * float(row["scale"])


def expected_maps(paths, targets):
    """Maps of the tiny model computed directly with TSGB.attribute (float32)."""
    import explain_factory
    m = explain_factory.tiny().eval()
    x = torch.stack([pipeline.open_rgb(p, (32, 32)) for p in paths])
    x = (x - 0.5) / 0.25
    return TSGB(m).attribute(x, torch.as_tensor(targets)).numpy()


# ------------------------------------------------------------------------ happy paths ----
def test_npy_top1_index_and_maps(imgs, tmp_path, capsys):
    out = tmp_path / "out"
    assert run([imgs, "--out", out, *TINY, "--workers", "1", "--shard-size", "2"]) == 0
    rows = index(out)
    assert list(rows[0]) == explain_cli.COLUMNS
    assert len(rows) == 5                             # 5 readable images, top-1 each
    assert [r["image"] for r in rows] == sorted(r["image"] for r in rows)
    assert all(r["rank"] == "1" and r["png"] == "" for r in rows)
    assert len({r["shard"] for r in rows}) == 3       # shards of 2 maps
    assert all(stored(out, r).dtype == np.float16 for r in rows)
    maps = np.stack([load_map(out, r) for r in rows])
    assert maps.shape == (5, 32, 32)
    ref = expected_maps([r["image"] for r in rows], [[int(r["target"])] for r in rows])[:, 0]
    np.testing.assert_allclose(maps, ref, rtol=2e-3, atol=1e-4 * np.abs(ref).max())
    scores = [float(r["score"]) for r in rows]
    assert all(0 < s <= 1 for s in scores)
    assert all(r["class_name"] == f"thing {r['target']}" for r in rows)
    # the corrupt file is skipped, logged and listed in the summary and failed.csv
    printed = capsys.readouterr()
    assert "corrupt.jpg" in printed.out and "unreadable (skipped): 1" in printed.out
    assert "corrupt.jpg" in (out / "failed.csv").read_text()
    assert "5 images explained" in printed.out and "images/s" in printed.out


def test_pixel_classes_are_the_argmax_of_all_class_maps(imgs, tmp_path):
    out = tmp_path / "outpc"
    assert run([imgs, "--out", out, *TINY, "--pixel-classes", "--top-k", "2"]) == 0
    rows = [r for r in index(out) if r["rank"] == "1"]
    files = sorted(os.listdir(out / "pixel_classes"))
    assert len(files) == len(rows) == 5
    paths = [r["image"] for r in rows]
    import explain_factory
    classes = explain_factory.tiny()(torch.zeros(1, 3, 32, 32)).shape[1]
    full = expected_maps(paths, [list(range(classes))] * len(paths))
    for p, f in zip(paths, [next(f for f in files
                                 if f.startswith(explain_cli.safe_name(os.path.relpath(
                                     p, imgs), os.path.abspath(p))))
                            for p in paths]):
        ids = np.load(out / "pixel_classes" / f)
        assert ids.shape == (32, 32) and ids.dtype == np.int16
        m = full[paths.index(p)]
        chosen = np.take_along_axis(m, ids[None].astype(np.int64), 0)[0]
        np.testing.assert_allclose(chosen, m.max(0), rtol=1e-5, atol=1e-6 * np.abs(m).max())


def test_map_dtype_float32_keeps_the_maps_as_computed(imgs, tmp_path, capsys):
    out = tmp_path / "out32"
    assert run([imgs, "--out", out, *TINY, "--workers", "0", "--map-dtype", "float32"]) == 0
    rows = index(out)
    maps = np.stack([load_map(out, r) for r in rows])
    assert all(stored(out, r).dtype == np.float32 and r["scale"] == "1.0" for r in rows)
    ref = expected_maps([r["image"] for r in rows], [[int(r["target"])] for r in rows])[:, 0]
    np.testing.assert_allclose(maps, ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())
    # a resume must ask for the same dtype
    with pytest.raises(SystemExit) as e:
        run([imgs, "--out", out, *TINY, "--workers", "0", "--resume"])
    assert e.value.code == 2 and "map_dtype" in capsys.readouterr().err


@pytest.mark.parametrize("backend", ["hooks", pytest.param("native", marks=pytest.mark.skipif(
    not tsgb_ext.native_available(), reason="tsgb_ext._C not built"))])
def test_amp_bf16_gives_finite_maps_close_to_float32(imgs, tmp_path, backend):
    out = tmp_path / "out"
    assert run([imgs, "--out", out, *TINY, "--amp", "bf16", "--backend", backend]) == 0
    rows = index(out)
    maps = np.stack([load_map(out, r) for r in rows]).astype(np.float32)
    assert len(rows) == 5 and np.isfinite(maps).all()
    ref = expected_maps([r["image"] for r in rows], [[int(r["target"])] for r in rows])[:, 0]
    cos = (maps * ref).sum() / (np.linalg.norm(maps) * np.linalg.norm(ref))
    assert cos > 0.5, cos  # bf16 forward: the same map, coarsely


def test_png_and_npy_top_k(imgs, tmp_path):
    from PIL import Image
    out = tmp_path / "out"
    assert run([imgs, "--out", out, *TINY, "--top-k", "3", "--format", "npy,png",
                "--batch-size", "3"]) == 0
    rows = index(out)
    assert len(rows) == 15
    for img in {r["image"] for r in rows}:
        mine = [r for r in rows if r["image"] == img]
        assert [r["rank"] for r in mine] == ["1", "2", "3"]
        s = [float(r["score"]) for r in mine]
        assert s == sorted(s, reverse=True)
        assert len({r["target"] for r in mine}) == 3
        assert len({r["png"] for r in mine}) == 1
    pngs = sorted({r["png"] for r in rows})
    assert len(pngs) == 5
    for p in pngs:
        assert re.fullmatch(r"png/[A-Za-z0-9][A-Za-z0-9._-]*-[0-9a-f]{8}\.png", p), p
        with Image.open(out / p) as im:
            assert im.format == "PNG" and im.size[0] > 3 * im.size[1]
    assert sorted(os.listdir(out / "png")) == [p[4:] for p in pngs]


def test_png_only_and_target_ids(imgs, tmp_path):
    out = tmp_path / "out"
    assert run([imgs / "chelsea.jpg", imgs / "coffee.png", "--out", out, *TINY,
                "--target", "3,7", "--format", "png"]) == 0
    rows = index(out)
    assert [(os.path.basename(r["image"]), r["target"]) for r in rows] == [
        ("chelsea.jpg", "3"), ("chelsea.jpg", "7"), ("coffee.png", "3"), ("coffee.png", "7")]
    assert all(r["shard"] == "" and r["png"] for r in rows)
    # png only: the shards folder holds the row files, no maps
    assert [f.endswith(".csv") for f in os.listdir(out / "shards")] == [True]


def test_labels_csv(imgs, tmp_path, capsys):
    out = tmp_path / "out"
    labels = tmp_path / "labels.csv"
    labels.write_text("image,class\nchelsea.jpg,2\nchelsea.jpg,thing 5\n"
                      f"{imgs / 'coffee.png'},9\nsub dir/rocket.jpg,0\n")
    assert run([imgs, "--out", out, *TINY, "--labels", labels]) == 0
    rows = index(out)
    got = [(os.path.basename(r["image"]), r["target"], r["rank"]) for r in rows]
    assert got == [("chelsea.jpg", "2", "1"), ("chelsea.jpg", "5", "2"),
                   ("coffee.png", "9", "1"), ("rocket.jpg", "0", "1")]
    ref = expected_maps([rows[0]["image"]], [[2, 5]])[0]
    np.testing.assert_allclose(np.stack([load_map(out, r) for r in rows[:2]]), ref,
                               rtol=2e-3, atol=1e-4 * np.abs(ref).max())
    assert "not in --labels (skipped): 3" in capsys.readouterr().out


def test_torchvision_arch_with_weights(imgs, tmp_path):
    tv = pytest.importorskip("torchvision")
    w = tmp_path / "r18.pt"
    torch.manual_seed(0)
    torch.save(tv.models.resnet18(num_classes=5).state_dict(), w)
    out = tmp_path / "out"
    assert run([imgs / "chelsea.jpg", "--out", out, "--model", "resnet18", "--weights", w,
                "--size", "32", "--workers", "0", "--no-progress", "--top-k", "2"]) == 0
    rows = index(out)
    assert len(rows) == 2 and rows[0]["class_name"].startswith("class_")
    assert load_map(out, rows[0]).shape == (32, 32)


# ----------------------------------------------------------------------------- resume ----
def test_interrupted_run_then_resume(imgs, tmp_path, capsys):
    out, fresh = tmp_path / "out", tmp_path / "fresh"
    args = [imgs, *TINY, "--top-k", "2", "--batch-size", "1", "--shard-size", "2"]
    # stopped (like Ctrl-C) after its first shard: the index holds its 1 image, 2 maps
    assert run([*args, "--out", out, "--stop-after-shards", "1"]) == 130
    assert len(index(out)) == 2
    assert "--resume" in capsys.readouterr().err
    # without --resume a non-empty DIR is refused; with other options the resume is refused
    with pytest.raises(SystemExit) as e:
        run([*args, "--out", out])
    assert e.value.code == 2 and "--resume" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run([*args, "--out", out, "--resume", "--top-k", "3"])
    assert "other options" in capsys.readouterr().err
    # a kill between a shard and its rows leaves an orphan shard of the run: removed; a file
    # of another program in shards/ is left alone
    run_id = json.loads((out / "run.json").read_text())["run_id"]
    np.save(out / "shards" / f"{run_id}-r0-000007.npy", np.zeros((1, 32, 32), np.float16))
    np.save(out / "shards" / "r0-000007.npy", np.zeros((1, 32, 32), np.float16))
    assert run([*args, "--out", out, "--resume"]) == 0
    assert "already done (resume): 1 images" in capsys.readouterr().out
    assert run([*args, "--out", fresh]) == 0
    a, b = index(out), index(fresh)
    keys = [(r["image"], r["target"]) for r in a]
    assert len(keys) == len(set(keys)) == 10
    assert keys == [(r["image"], r["target"]) for r in b]
    for ra, rb in zip(a, b):
        np.testing.assert_array_equal(load_map(out, ra), load_map(fresh, rb))
    assert not (out / "shards" / f"{run_id}-r0-000007.npy").exists()
    assert (out / "shards" / "r0-000007.npy").exists()
    # resuming a finished run does nothing
    assert run([*args, "--out", out, "--resume"]) == 0
    assert len(index(out)) == 10


# ------------------------------------------------------------------------ bad inputs ----
@pytest.mark.parametrize("extra, message", [
    (["{imgs}/nope.jpg"], "no such file"),
    (["--model", "no_such_arch"], "unknown model"),
    (["--model", "no_such_module_xyz:f"], "cannot import"),
    (["--model", "explain_factory:not_a_model"], "not a torch.nn.Module"),
    (["--model", "resnet18"], "needs --weights"),
    (["--target", "10"], "class id 10 is not in [0, 10)"),
    (["--target", "cat"], "--target"),
    (["--top-k", "11"], "only 10 classes"),
    (["--top-k", "2", "--target", "1"], "cannot be combined"),
    (["--out", "{file}/sub"], "cannot create"),
    (["--out", "{file}"], "not a directory"),
    (["--weights", "{tmp}/missing.pt"], "no such file"),
    (["--weights", "{pickle}"], "weights-only"),
    (["--labels", "{badlabels}"], "line 2"),
    (["--labels", "{tmp}/none.csv"], "no such file"),
    (["--format", "jpg"], "--format"),
    (["--size", "3"], "--size"),
    (["--size", "7x9x"], "--size"),
    (["--mean", "1,2"], "--mean"),
    (["--device", "tpu"], "--device"),
    (["--batch-size", "0"], "--batch-size"),
])
def test_bad_inputs_are_rejected_up_front(imgs, tmp_path, capsys, extra, message):
    f = tmp_path / "a_file"
    f.write_text("x")

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))
    pickle = tmp_path / "evil.pt"
    torch.save({"w": Evil()}, pickle)
    bad = tmp_path / "bad.csv"
    bad.write_text("image,class\nchelsea.jpg,42\n")
    fmt = dict(imgs=imgs, file=f, tmp=tmp_path, pickle=pickle, badlabels=bad)
    extra = [e.format(**fmt) for e in extra]
    argv = [imgs] + (["--out", tmp_path / "out"] if "--out" not in extra else []) + TINY + extra
    if extra and extra[0].endswith("nope.jpg"):
        argv = extra + ["--out", tmp_path / "out"] + TINY
    with pytest.raises(SystemExit) as e:
        run(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "pwned").exists()            # weights_only: nothing unpickled
    assert not (tmp_path / "out" / "index.csv").exists()


# ------------------------------------------------------------------------- safety ----
def test_safe_names_never_escape():
    for rel in ["../../etc/passwd", "/abs/path/x.jpg", "a/../../b.png", "..", "",
                "we ird;名.jpeg", "..hidden.jpg", "x" * 500 + ".jpg", "C:\\win\\..\\p.jpg"]:
        name = explain_cli.safe_name(rel, "/k/" + rel)
        assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,79}-[0-9a-f]{8}", name), (rel, name)
        assert "/" not in name and ".." not in name.split("-")[0][:2]
    assert explain_cli.safe_name("a.jpg", "/x/a.jpg") != explain_cli.safe_name("a.jpg", "/y/a.jpg")


def test_bomb_and_truncated_images_are_skipped(imgs, tmp_path, monkeypatch, capsys):
    from PIL import Image
    data = (imgs / "chelsea.jpg").read_bytes()
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "truncated.jpg").write_bytes(data[:len(data) // 2])
    Image.new("RGB", (200, 200)).save(tmp_path / "in" / "huge.png")
    Image.new("RGB", (20, 20), (200, 10, 10)).save(tmp_path / "in" / "small.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)   # 200x200 counts as a "bomb"
    out = tmp_path / "out"
    assert run([tmp_path / "in", "--out", out, *TINY]) == 0
    assert [os.path.basename(r["image"]) for r in index(out)] == ["small.png"]
    failed = (out / "failed.csv").read_text()
    assert "huge.png" in failed and "DecompressionBomb" in failed
    assert "truncated.jpg" in failed
    assert "unreadable (skipped): 2" in capsys.readouterr().out


# ------------------------------------------------------------------------ pipeline ----
def test_pipeline_api_over_any_iterable(imgs):
    import explain_factory
    model = explain_factory.tiny()
    paths = [str(imgs / "chelsea.jpg"), str(imgs / "coffee.png"), str(imgs / "astronaut.jpg")]
    ds = pipeline.ImageFileDataset(paths, 32)
    dl = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=pipeline.collate)
    res = list(pipeline.explain_batches(model, dl, top_k=2, mean=(0.5,) * 3, std=(0.25,) * 3))
    assert [r.maps.shape for r in res] == [(2, 2, 32, 32), (1, 2, 32, 32)]
    assert all(isinstance(r.maps, torch.Tensor) and r.maps.device.type == "cpu" for r in res)
    maps = torch.cat([r.maps for r in res])
    tg = torch.cat([r.targets for r in res])
    ref = expected_maps(paths, tg.tolist())
    np.testing.assert_allclose(maps.numpy(), ref, rtol=1e-4, atol=1e-6 * np.abs(ref).max())
    # plain tensors already normalised, fixed ids, and a callable choosing per image
    x = torch.randn(3, 3, 32, 32)
    (r,) = pipeline.explain_batches(model, [x], target=[1, 4])
    assert r.targets.tolist() == [[1, 4]] * 3 and r.numpy()["maps"].dtype == np.float16
    (r,) = pipeline.explain_batches(model, [x], target=lambda meta, lg: [[0], [1, 2], [3]])
    assert r.valid.tolist() == [[True, False], [True, True], [True, False]]
    np.testing.assert_allclose(r.maps[1].numpy(), TSGB(model).attribute(x[1:2], [[1, 2]])[0],
                               rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------- torchrun ----
def test_torchrun_two_ranks_match_one_process(imgs, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    args = [str(imgs), *TINY, "--top-k", "2", "--batch-size", "2", "--shard-size", "2"]
    assert run([*args, "--out", one]) == 0
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [TESTS, REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]),
        OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "tsgb_ext.cli", "explain", *args, "--out", str(two)]
    p = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "on 2 process(es)" in p.stdout and "unreadable (skipped): 1" in p.stdout
    a, b = index(one), index(two)
    assert [(r["image"], r["target"], r["rank"]) for r in a] == \
        [(r["image"], r["target"], r["rank"]) for r in b]
    assert len(a) == 10
    run_id = json.loads((two / "run.json").read_text())["run_id"]
    assert {r["shard"].rsplit("-", 1)[0] for r in b} == {f"shards/{run_id}-r0",
                                                          f"shards/{run_id}-r1"}
    assert not [f for f in os.listdir(two) if f.startswith("index-rank")]
    for ra, rb in zip(a, b):
        assert float(ra["score"]) == pytest.approx(float(rb["score"]), rel=1e-4)
        np.testing.assert_allclose(load_map(one, ra), load_map(two, rb), rtol=1e-3, atol=1e-6)
