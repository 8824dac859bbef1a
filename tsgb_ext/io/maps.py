"""Reading a map store: :func:`open_maps` (also ``tsgb_ext.open_maps``).

    import tsgb_ext
    maps = tsgb_ext.open_maps("maps/")            # a folder written by tsgb explain / MapStore
    len(maps), maps.rows[0]                       # index rows as dicts
    m = maps.get("cats/tabby.jpg", 281)           # (H, W) float32, read lazily (memory map)
    big = maps.on_image("cats/tabby.jpg", 281)    # the same map on the photo's own pixel grid
    for row, m in maps:                           # every row with its map
        ...

An image is named by its absolute path, the path as the input named it (``tsgb explain
photos/`` stores ``photos/cats/tabby.jpg``) or its path below the input folder it was found in
(``cats/tabby.jpg``). Shards are found relative to the folder, so a moved or copied folder
opens the same. The folder layout is described in :mod:`tsgb_ext.io.store`.
"""
from __future__ import annotations

import os
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import store as _layout
from .images import image_size
from .preprocess import Preprocessing

_INTS = ("target", "rank", "row")
_FLOATS = ("score", "scale")


def _norm(path: str) -> str:
    """A relative path spelled one way: ``\\`` as ``/``, no ``./`` or ``a/../``."""
    return os.path.normpath(path.replace("\\", "/")).replace(os.sep, "/") if path else ""


def _typed(row: Dict[str, str]) -> Dict[str, object]:
    """An index row with numbers as numbers (empty fields: None; ``scale`` absent: 1.0)."""
    out: Dict[str, object] = dict(row)
    for k in _INTS:
        if k in out:
            out[k] = int(out[k]) if out[k] not in ("", None) else None
    for k in _FLOATS:
        if k in out:
            out[k] = float(out[k]) if out[k] not in ("", None) else None
    if out.get("scale") is None and out.get("shard"):
        out["scale"] = 1.0          # written before maps had a scale (tsgb 0.1.0)
    for k in ("rel", "given"):
        out.setdefault(k, "")
    return out


class MapSet:
    """The maps of one store folder (see :func:`open_maps`).

    ``path``: the folder; ``run``: its ``run.json``; ``preprocessing``: the
    :class:`~tsgb_ext.io.preprocess.Preprocessing` its maps were made with (None for a folder
    whose run.json does not record it); ``rows``: the index rows as dicts, sorted by image then
    rank, with ``target``, ``rank``, ``row`` as int and ``score``, ``scale`` as float (None
    where empty); ``images``: the absolute paths, sorted."""

    def __init__(self, path: Union[str, "os.PathLike[str]"]):
        self.path = os.path.abspath(os.fspath(path))
        marker = _layout.read_marker(self.path)
        if marker is None:
            raise FileNotFoundError(f"path {self.path!r}: no {_layout.MARKER} of a tsgb map "
                                    f"store (a folder written by tsgb explain or MapStore)")
        self.run = marker
        pre = marker.get("preprocessing")
        self.preprocessing: Optional[Preprocessing] = (Preprocessing.from_dict(pre)
                                                       if isinstance(pre, dict) else None)
        self.rows: List[Dict[str, object]] = [_typed(r) for r in self._read_rows()]
        self.images: List[str] = sorted({str(r["image"]) for r in self.rows})
        self._by: Tuple[Dict[str, set], ...] = ({}, {}, {})
        for r in self.rows:
            for table, key in zip(self._by, (r["image"], _norm(str(r["given"])),
                                             _norm(str(r["rel"])))):
                if key:
                    table.setdefault(str(key), set()).add(str(r["image"]))
        self._rows_of: Dict[str, List[Dict[str, object]]] = {}
        for r in self.rows:
            self._rows_of.setdefault(str(r["image"]), []).append(r)
        self._shards: Dict[str, np.ndarray] = {}

    def _read_rows(self) -> List[Dict[str, str]]:
        """index.csv; when it is missing (a run killed before writing it), the rows of the
        committed shards."""
        index = os.path.join(self.path, _layout.INDEX)
        if os.path.exists(index):
            return _layout.read_csv(index)[1]
        formats = self.run.get("formats") or ["npy"]
        st = _layout.MapStore.attach(self.path, self.run["run_id"], rank=-1,
                                     npy="npy" in formats)
        rows = [r for p in st.scan().parts for r in p.rows]
        return sorted(rows, key=lambda r: (r["image"], int(r["rank"])))

    # -- looking up ----------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        return (f"MapSet({self.path!r}: {len(self.rows)} maps of {len(self.images)} images, "
                f"map_dtype {self.run.get('map_dtype', 'float16')})")

    def resolve(self, image: Union[str, "os.PathLike[str]"]) -> str:
        """The absolute path (as in the index) of the image named ``image``: its absolute
        path, the path as its input named it, or its path below its input folder. Raises
        KeyError when no image or several match."""
        key = os.fspath(image)
        tiers = [self._by[0].get(key), self._by[1].get(_norm(key)), self._by[2].get(_norm(key)),
                 self._by[0].get(os.path.abspath(os.fspath(image)))]
        for found in tiers:
            if found:
                if len(found) > 1:
                    raise KeyError(f"image {key!r} names {len(found)} images of this map set "
                                   f"({', '.join(sorted(found)[:5])}): give the absolute path")
                return next(iter(found))
        raise KeyError(f"image {key!r}: not in this map set ({len(self.images)} images); give "
                       f"its absolute path, its path as the input named it, or its path below "
                       f"its input folder")

    def rows_of(self, image) -> List[Dict[str, object]]:
        """The rows of one image (every target), by rank."""
        return list(self._rows_of[self.resolve(image)])

    def row(self, image, target: Union[int, str]) -> Dict[str, object]:
        """The row of ``image`` (see :meth:`resolve`) for ``target``: a class id, or a class
        name as in the index. Raises KeyError when the image has no map for it."""
        rows = self.rows_of(image)
        for r in rows:
            if (r["target"] == target if not isinstance(target, str)
                    else r["class_name"] == target or str(r["target"]) == target):
                return r
        raise KeyError(f"target {target!r}: image {os.fspath(image)!r} has maps for "
                       f"{[r['target'] for r in rows]} only")

    # -- the maps ------------------------------------------------------------------------
    def _shard(self, rel: str) -> np.ndarray:
        arr = self._shards.get(rel)
        if arr is None:
            arr = np.load(os.path.join(self.path, rel), mmap_mode="r")
            self._shards[rel] = arr
        return arr

    def map_of(self, row: Dict[str, object]) -> Optional[np.ndarray]:
        """The (H, W) float32 map of an index row (None for a row without maps: png only)."""
        if not row.get("shard"):
            return None
        stored = self._shard(str(row["shard"]))[int(row["row"])]
        return _layout.decode_map(stored, float(row["scale"] or 1.0))

    def get(self, image, target: Union[int, str]) -> np.ndarray:
        """The (H, W) float32 map of ``image`` for class ``target`` (see :meth:`row`), read
        from its memory-mapped shard."""
        r = self.row(image, target)
        m = self.map_of(r)
        if m is None:
            raise ValueError(f"image {os.fspath(image)!r}: this folder holds no npy maps "
                             f"(formats {self.run.get('formats')}); its overlay is {r['png']}")
        return m

    def on_image(self, image, target: Union[int, str],
                 image_size_hw: Optional[Sequence[int]] = None, fill: float = 0.0
                 ) -> np.ndarray:
        """The map of :meth:`get` placed on the pixel grid of the image it was computed from:
        float32 (H, W) of the original image (its size read from the file's header, or
        ``image_size_hw``), see :meth:`Preprocessing.place`."""
        if self.preprocessing is None:
            raise ValueError(f"path {self.path!r}: its run.json records no preprocessing "
                             f"(written by an older tsgb): the maps cannot be placed back")
        m = self.get(image, target)
        size = image_size_hw if image_size_hw is not None else image_size(self.resolve(image))
        return self.preprocessing.place(m, size, fill)

    def __iter__(self) -> Iterator[Tuple[Dict[str, object], Optional[np.ndarray]]]:
        """(row, map) for every row, in index order (map None for png-only rows)."""
        for r in self.rows:
            yield r, self.map_of(r)


def open_maps(path: Union[str, "os.PathLike[str]"]) -> MapSet:
    """The maps of a folder written by ``tsgb explain`` or :class:`tsgb_ext.io.MapStore`
    (see :class:`MapSet`). Raises FileNotFoundError when ``path`` holds no such store."""
    return MapSet(path)
