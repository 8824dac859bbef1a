"""The map store from Python (tsgb_ext.io.MapStore, no subprocess) and the reader
(tsgb_ext.open_maps): lookups by absolute / as-given / relative path, a moved folder, the
storage's error against float32 on real photos, the preprocessing in run.json, maps placed back
on the photo's pixel grid, folders of the previous layout, label files."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

import tsgb_ext
from tsgb_ext import cli
from tsgb_ext.data import models, pipeline
from tsgb_ext.io import (LabelsError, MapStore, Preprocessing, StoreError, StoreHooks,
                         class_id, image_size, open_maps, read_labels)
from tsgb_ext.io import store as layout
from tsgb_ext.io.preprocess import crop_and_resize

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

TESTS = os.path.dirname(os.path.abspath(__file__))
PHOTOS = os.path.join(TESTS, "data", "voc_small", "JPEGImages")
TINY_PRE = Preprocessing(size=(32, 32), mean=(0.5,) * 3, std=(0.25,) * 3)


def _photo(seed, h, w):
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, w, dtype=np.float32)[None, :, None]
    return np.clip(base + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)


@pytest.fixture
def photos(tmp_path):
    """Two input folders, each with a ``x.jpg`` (same relative path), plus others."""
    sizes = {"a/x.jpg": (40, 60), "a/sub/y.png": (50, 30), "a/z.jpg": (33, 33),
             "b/x.jpg": (45, 45)}
    for i, (name, (h, w)) in enumerate(sizes.items()):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_photo(i, h, w)).save(tmp_path / name)
    return tmp_path


def _explain(items, top_k=2, pre=TINY_PRE, model=None, batch_size=2):
    import explain_factory
    model = model or explain_factory.tiny()
    ds = pipeline.ImageFileDataset(items, pre)
    dl = torch.utils.data.DataLoader(ds, batch_size=batch_size, collate_fn=pipeline.collate)
    return list(pipeline.explain_batches(model, dl, top_k=top_k, mean=pre.mean, std=pre.std))


def _write(out, batches, names=tuple(f"thing {i}" for i in range(10)), **kw):
    with MapStore.open(out, preprocessing=kw.pop("pre", TINY_PRE), **kw) as st:
        for res in batches:
            st.add_batch(res, class_names=names)
    return st


def _rel_l2(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ------------------------------------------------------------------- store (Python) ----
class _Crash(Exception):
    pass


class _CrashAt(StoreHooks):
    """Raise at the n-th pass of a step (while the file is half written for rows/merge)."""

    def __init__(self, step, n):
        self.step, self.n, self.count = step, n, 0

    def reached(self, step):
        if step == self.step:
            self.count += 1
            if self.count == self.n:
                raise _Crash(step)

    def write(self, step, f, data):
        f.write(data[:len(data) // 2])
        self.reached(step)
        f.write(data[len(data) // 2:])


@pytest.mark.parametrize("step", ["rows", "npy", "part"])
def test_store_from_python_crash_then_resume_equals_one_run(photos, tmp_path, step):
    items = pipeline.list_images([str(photos / "a"), str(photos / "b")])
    batches = _explain(items, batch_size=1)
    fresh, out = tmp_path / "fresh", tmp_path / "out"
    _write(fresh, batches, shard_size=2)
    st = MapStore.open(out, preprocessing=TINY_PRE, shard_size=2, hooks=_CrashAt(step, 2))
    with pytest.raises(_Crash):
        with st:
            for res in batches:
                st.add_batch(res, class_names=[f"thing {i}" for i in range(10)])
    committed = open_maps(out)            # the index of the committed shards, whole images
    assert len(committed) == 2 * len(committed.images) and len(committed.images) < 4
    with MapStore.open(out, preprocessing=TINY_PRE, shard_size=2, resume=True) as st:
        assert st.done == set(committed.images)
        for res in batches:
            keep = [i for i, p in enumerate(res.meta["path"]) if p not in st.done]
            if keep:
                sub = type(res)(res.maps[keep], res.targets[keep], res.scores[keep],
                                res.valid[keep], {k: [v[i] for i in keep]
                                                  for k, v in res.meta.items()
                                                  if k != "failed"}, res.backend)
                st.add_batch(sub, class_names=[f"thing {i}" for i in range(10)])
    a, b = open_maps(out), open_maps(fresh)
    keys = [(r["image"], r["target"], r["rank"]) for r in a.rows]
    assert keys == [(r["image"], r["target"], r["rank"]) for r in b.rows]
    assert len(keys) == len(set(keys)) == 8                       # no duplicates
    for (ra, ma), (rb, mb) in zip(a, b):
        np.testing.assert_array_equal(ma, mb)
    left = [f for _, _, fs in os.walk(out) for f in fs if f.endswith(".tmp")]
    assert left == []


def test_store_refusals_name_the_python_arguments(photos, tmp_path):
    out = tmp_path / "out"
    st = MapStore.open(out, preprocessing=TINY_PRE, config={"model": "tiny"})
    try:
        with pytest.raises(StoreError, match="in use by another") as e:
            MapStore.open(out, preprocessing=TINY_PRE, config={"model": "tiny"}, resume=True)
        assert "choose another out" in str(e.value)
        assert "--out" in e.value.render({"out": "--out"})
    finally:
        st.close()
    with pytest.raises(StoreError, match=r"add resume=True"):
        MapStore.open(out, preprocessing=TINY_PRE, config={"model": "tiny"})
    with pytest.raises(StoreError, match=r"resume=True: DIR was written with other options "
                                         r"\(model\)"):
        MapStore.open(out, preprocessing=TINY_PRE, config={"model": "other"}, resume=True)
    with pytest.raises(StoreError, match="preprocessing"):
        MapStore.open(out, preprocessing=Preprocessing((32, 32), crop_pct=0.9),
                      config={"model": "tiny"}, resume=True)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "index.csv").write_text("mine\n")
    with pytest.raises(StoreError, match="did not write"):
        MapStore.open(theirs)
    assert sorted(os.listdir(theirs)) == ["index.csv"]
    with pytest.raises(ValueError, match="map_dtype"):
        MapStore.open(tmp_path / "x", map_dtype="int8")
    with pytest.raises(ValueError, match="run_id"):
        MapStore.open(tmp_path / "y", config={"run_id": "mine"})


def test_add_image_checks_and_add_batch_failures(tmp_path):
    with MapStore.open(tmp_path / "o") as st:
        st.add_image("/x/a.jpg", np.ones((2, 4, 4)), [3, 5], scores=[0.5, 0.25])
        with pytest.raises(ValueError, match="already in the store"):
            st.add_image("/x/a.jpg", np.ones((1, 4, 4)), [1])
        with pytest.raises(ValueError, match=r"\(T, H, W\) with T = 2"):
            st.add_image("/x/b.jpg", np.ones((1, 4, 4)), [1, 2])
        with pytest.raises(ValueError, match="not finite"):
            st.add_image("/x/c.jpg", np.full((1, 4, 4), np.nan), [1])
        with pytest.raises(ValueError, match="no name for class 4"):
            st.add_image("/x/c.jpg", np.ones((1, 4, 4)), [4], class_names=["a", "b"])
        batch = pipeline.ExplainedBatch(
            torch.stack([torch.ones(1, 4, 4), torch.full((1, 4, 4), float("inf"))]),
            torch.tensor([[1], [2]]), torch.tensor([[0.9], [0.8]]),
            torch.ones(2, 1, dtype=torch.bool),
            {"path": ["/x/d.jpg", "/x/e.jpg"], "failed": [("/x/f.jpg", "unreadable")]}, "")
        failures = st.add_batch(batch)
        assert [p for p, _ in failures] == ["/x/f.jpg", "/x/e.jpg"]
    maps = open_maps(tmp_path / "o")
    assert maps.images == ["/x/a.jpg", "/x/d.jpg"] and len(maps) == 3
    failed = (tmp_path / "o" / "failed.csv").read_text()
    assert "/x/e.jpg" in failed and "/x/f.jpg" in failed


# --------------------------------------------------------------------------- reader ----
def test_reader_lookups_iteration_and_a_moved_folder(photos, tmp_path, monkeypatch):
    monkeypatch.chdir(photos)
    out = tmp_path / "maps"
    assert cli.main(["explain", "a", "b/x.jpg", "--out", str(out), "--model",
                     "explain_factory:tiny", "--workers", "0", "--no-progress",
                     "--top-k", "2", "--map-dtype", "float32"]) == 0
    maps = open_maps(out)
    assert tsgb_ext.open_maps is open_maps and len(maps) == 8 and len(maps.rows) == 8
    assert set(maps.rows[0]) == set(layout.COLUMNS)
    by_row = {(r["image"], r["target"]): m for r, m in maps}    # iteration: (row, map)
    assert len(by_row) == 8 and all(m.shape == (32, 32) and m.dtype == np.float32
                                    for m in by_row.values())
    r = next(r for r in maps.rows if r["image"].endswith("/a/sub/y.png"))
    assert r["rel"] == "sub/y.png" and r["given"] == os.path.join("a", "sub", "y.png")
    t = r["target"]
    ref = by_row[(r["image"], t)]
    for key in (str(photos / "a" / "sub" / "y.png"), "a/sub/y.png", "sub/y.png",
                "./a/sub/../sub/y.png"):
        np.testing.assert_array_equal(maps.get(key, t), ref)
    np.testing.assert_array_equal(maps.get("sub/y.png", r["class_name"]), ref)
    with pytest.raises(KeyError, match="names 2 images"):
        maps.get("x.jpg", t)                     # a/x.jpg and b/x.jpg: ambiguous
    with pytest.raises(KeyError, match="not in this map set"):
        maps.get("nope.jpg", 0)
    with pytest.raises(KeyError, match="has maps for"):
        maps.get("sub/y.png", next(c for c in range(10) if c not in
                                   [q["target"] for q in maps.rows_of("sub/y.png")]))
    # moved, then copied elsewhere: the same maps
    moved = tmp_path / "elsewhere" / "maps2"
    moved.parent.mkdir()
    shutil.move(str(out), str(moved))
    copy = tmp_path / "copy"
    shutil.copytree(moved, copy)
    for folder in (moved, copy):
        m2 = open_maps(folder)
        np.testing.assert_array_equal(m2.get("sub/y.png", t), ref)
        np.testing.assert_array_equal(m2.get(str(photos / "b" / "x.jpg"), m2.rows_of(
            "b/x.jpg")[0]["target"]), by_row[(str(photos / "b" / "x.jpg"),
                                              m2.rows_of("b/x.jpg")[0]["target"])])
    with pytest.raises(FileNotFoundError, match="no run.json"):
        open_maps(tmp_path)


@pytest.mark.skipif(not models.efficientnet_lite0_available(),
                    reason="needs the pretrained EfficientNet-Lite0 packages")
def test_default_storage_within_1e3_of_float32_on_real_photos(tmp_path):
    loaded = models.load_model("efficientnet-lite0")
    pre = loaded.preprocessing()
    items = pipeline.list_images([PHOTOS])
    batches = _explain(items, top_k=1, pre=pre, model=loaded.model, batch_size=3)
    _write(tmp_path / "f16", batches, loaded.class_names, pre=pre)
    _write(tmp_path / "f32", batches, loaded.class_names, pre=pre, map_dtype="float32")
    a, b = open_maps(tmp_path / "f16"), open_maps(tmp_path / "f32")
    assert len(a) == len(b) == len(items)
    sizes = {os.path.getsize(tmp_path / d / r["shard"]) for d, m in (("f16", a), ("f32", b))
             for r in m.rows}
    assert len(sizes) == 2 and max(sizes) > 1.9 * min(sizes)      # half the bytes
    worst = max(_rel_l2(ma, mb) for (_, ma), (_, mb) in zip(a, b))
    assert worst <= 1e-3, worst
    # the maps peak far below float16's normal range: the scale is what keeps them exact
    assert max(float(np.abs(m).max()) for _, m in b) < 2.0 ** -10
    assert all(r["scale"] < 2.0 ** -10 for r in a.rows)


# ---------------------------------------------------------------- preprocessing ----
def test_run_json_records_the_preprocessing(photos, tmp_path):
    pre = Preprocessing((32, 24), resize_mode="center", crop_pct=0.875,
                        interpolation="bicubic", mean=(0.5,) * 3, std=(0.25,) * 3)
    items = pipeline.list_images([str(photos / "a")])
    _write(tmp_path / "o", _explain(items, pre=pre), pre=pre)
    run = json.loads((tmp_path / "o" / "run.json").read_text())
    assert run["preprocessing"] == {"size": [32, 24], "resize_mode": "center",
                                    "crop_pct": 0.875, "interpolation": "bicubic",
                                    "mean": [0.5] * 3, "std": [0.25] * 3}
    assert run["layout"] == layout.LAYOUT and run["map_dtype"] == "float16"
    maps = open_maps(tmp_path / "o")
    assert maps.preprocessing == pre
    # the CLI records the model's own
    assert cli.main(["explain", str(photos / "a"), "--out", str(tmp_path / "c"), "--model",
                     "explain_factory:tiny", "--workers", "0", "--no-progress"]) == 0
    assert open_maps(tmp_path / "c").preprocessing == TINY_PRE


@pytest.mark.parametrize("pre", [Preprocessing((32, 32)),
                                 Preprocessing((24, 32), crop_pct=0.8),
                                 Preprocessing((32, 32), resize_mode="squash")])
def test_place_puts_the_map_back_on_the_photo_grid(pre):
    H, W = 90, 140
    top, left, ch, cw = pre.crop_box(H, W)
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    ramp = (0.1 + 0.8 * (0.6 * yy / H + 0.4 * xx / W))     # in [0, 1], smooth, no symmetry
    # the map "of" the ramp image: what the preprocessing makes of it
    sal = crop_and_resize(torch.from_numpy(ramp)[None, None].expand(1, 3, H, W), pre.size,
                          pre.crop_pct, pre.interpolation, pre.resize_mode)[0, 0].numpy()
    placed = pre.place(sal, (H, W), fill=-1.0)
    assert placed.shape == (H, W) and placed.dtype == np.float32
    inside = np.zeros((H, W), bool)
    inside[top:top + ch, left:left + cw] = True
    assert (placed[~inside] == -1).all()
    # back where it came from: the ramp, to the resampling's error (an offset of one pixel
    # would be 0.8 * 0.6 / 90 = 5e-3 off everywhere)
    err = np.abs(placed[inside] - ramp[inside])
    assert np.median(err) < 2e-3, np.median(err)
    with pytest.raises(ValueError, match="this preprocessing makes"):
        pre.place(np.zeros((5, 5)), (H, W))


def test_on_image_has_the_original_image_size(photos, tmp_path):
    items = pipeline.list_images([str(photos / "a")])
    _write(tmp_path / "o", _explain(items, top_k=1))
    maps = open_maps(tmp_path / "o")
    for it in items:
        big = maps.on_image(it.path, maps.rows_of(it.path)[0]["target"])
        with Image.open(it.path) as im:
            assert big.shape == (im.height, im.width) == image_size(it.path)
        assert np.abs(big).max() > 0


# ------------------------------------------------------------ the previous layout ----
def _old_folder(out, maps):
    """A folder as tsgb 0.1.0 wrote it: no layout number, no scale/rel/given columns,
    float16 maps as they are."""
    run_id = "0123456789ab"
    (out / "shards").mkdir(parents=True)
    np.save(out / "shards" / f"{run_id}-r0-000000.npy", maps.astype(np.float16))
    cols = ["image", "target", "class_name", "score", "rank", "shard", "row", "png"]
    rows = "".join(f"/p/img{i}.jpg,{i},c{i},0.5,1,shards/{run_id}-r0-000000.npy,{i},\n"
                   for i in range(len(maps)))
    (out / "index.csv").write_text(",".join(cols) + "\n" + rows)
    (out / "shards" / f"{run_id}-r0-000000.csv").write_text(",".join(cols) + "\n" + rows)
    (out / "run.json").write_text(json.dumps({
        "tool": "tsgb explain", "run_id": run_id, "version": "0.1.0", "model": "explain_factory:tiny",
        "weights": None, "size": [32, 32], "mean": [0.5] * 3, "std": [0.25] * 3,
        "target": "top1", "top_k": None, "labels": None, "formats": ["npy"],
        "map_dtype": "float16"}))


def test_old_folders_open_and_refuse_resume_clearly(photos, tmp_path, capsys):
    out = tmp_path / "old"
    maps = np.random.default_rng(0).normal(0, 1, (3, 32, 32)).astype(np.float32)
    _old_folder(out, maps)
    old = open_maps(out)
    assert len(old) == 3 and old.preprocessing is None and old.rows[0]["scale"] == 1.0
    np.testing.assert_array_equal(old.get("/p/img1.jpg", 1), maps[1].astype(np.float16))
    with pytest.raises(ValueError, match="records no preprocessing"):
        old.on_image("/p/img1.jpg", 1, (40, 40))
    with pytest.raises(StoreError, match="older tsgb.*cannot be resumed"):
        MapStore.open(out, resume=True, config={"model": "explain_factory:tiny"})
    with pytest.raises(SystemExit):
        cli.main(["explain", str(photos / "a"), "--out", str(out), "--model",
                  "explain_factory:tiny", "--workers", "0", "--no-progress", "--resume"])
    err = capsys.readouterr().err
    assert "--resume" in err and "older tsgb" in err and "resume=True" not in err
    assert sorted(os.listdir(out / "shards")) == ["0123456789ab-r0-000000.csv",
                                                   "0123456789ab-r0-000000.npy"]


# ------------------------------------------------------------------ label files ----
def test_one_label_reader_for_csv_json_and_text(tmp_path):
    names = ["tabby", "Tiger cat"]
    (tmp_path / "l.csv").write_text("Image,Class,extra\na.jpg,1,x\nsub\\b.jpg,tabby,y\n")
    (tmp_path / "l.json").write_text('{"a": 0, "b": "tiger cat"}')
    (tmp_path / "l.txt").write_text("# comment\n\na 1\nb Tiger cat\n")
    got = {p: [(e.key, class_id(e.value, names, 2, e.where)) for e in read_labels(
        str(tmp_path / p))] for p in ("l.csv", "l.json", "l.txt")}
    assert got == {"l.csv": [("a.jpg", 1), ("sub/b.jpg", 0)], "l.json": [("a", 0), ("b", 1)],
                   "l.txt": [("a", 1), ("b", 1)]}
    (tmp_path / "bad.csv").write_text("file,label\na.jpg,1\n")
    with pytest.raises(LabelsError, match="needs a header"):
        read_labels(str(tmp_path / "bad.csv"))
    (tmp_path / "bad.txt").write_text("a 1\nlonely\n")
    with pytest.raises(LabelsError, match="line 2"):
        read_labels(str(tmp_path / "bad.txt"))
    with pytest.raises(LabelsError, match="class id 7 is not in"):
        class_id("7", names, 2, "here")
    with pytest.raises(LabelsError, match="neither a class id nor a class name"):
        class_id("dog", names, 2, "here")
    with pytest.raises(LabelsError, match="no such file"):
        read_labels(str(tmp_path / "none.csv"))
