"""Label files: which class(es) an image (or an object name) stands for. One reader for
``tsgb explain --labels`` and ``tsgb eval --labels``.

Three forms, told apart by the content:

* CSV with a header naming the columns ``image`` and ``class`` (any case, other columns
  ignored), one row per (image, class); an image may have several rows. A file whose name ends
  in ``.csv`` is read as CSV (and must have that header), as is any file whose first line is
  such a header;
* JSON: an object ``{key: class}``;
* text: lines ``key<whitespace>class``; empty lines and lines starting with ``#`` are skipped.

A class is an integer id or a class name. :func:`read_labels` returns the raw entries with
where each comes from ("line 3"); :func:`class_id` resolves one against a model's classes.
Problems raise :class:`LabelsError` naming the file and the line.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import re
from typing import List, Optional, Sequence


class LabelsError(ValueError):
    """A label file that cannot be read or does not fit the model; the message says where."""


@dataclasses.dataclass(frozen=True)
class LabelEntry:
    """One (key, class) pair of a label file: ``key`` (an image path or name, ``\\`` turned
    into ``/``), ``value`` (the class as written), ``where`` ("line N" or "key K")."""
    key: str
    value: str
    where: str


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8", newline="") as f:
            return f.read()
    except FileNotFoundError:
        raise LabelsError(f"{path}: no such file") from None
    except UnicodeError:
        raise LabelsError(f"{path}: not UTF-8 text") from None
    except OSError as e:
        raise LabelsError(f"{path}: {e.strerror or e}") from None


def _csv_entries(path: str, text: str) -> List[LabelEntry]:
    reader = csv.DictReader(io.StringIO(text))
    cols = [c.strip().lower() for c in (reader.fieldnames or [])]
    if "image" not in cols or "class" not in cols:
        raise LabelsError(f"{path}: needs a header with columns 'image' and 'class', got "
                          f"{reader.fieldnames}")
    reader.fieldnames = cols
    out = []
    for line, row in enumerate(reader, start=2):
        img, cls = (row.get("image") or "").strip(), (row.get("class") or "").strip()
        if not img or not cls:
            raise LabelsError(f"{path}, line {line}: empty image or class")
        out.append(LabelEntry(img.replace("\\", "/"), cls, f"line {line}"))
    return out


def _text_entries(path: str, text: str) -> List[LabelEntry]:
    out = []
    for line, raw in enumerate(text.splitlines(), 1):
        s = raw.strip()
        if not s or s.startswith("#"):
            continue
        parts = s.split(None, 1)
        if len(parts) != 2:
            raise LabelsError(f"{path}, line {line}: expected 'name class', got {s!r}")
        out.append(LabelEntry(parts[0].replace("\\", "/"), parts[1].strip(), f"line {line}"))
    return out


def read_labels(path: str) -> List[LabelEntry]:
    """Every (key, class) entry of the label file ``path`` (module doc), in file order."""
    text = _read_text(path)
    first = next((ln for ln in text.splitlines() if ln.strip()), "")
    header = {c.strip().lower() for c in first.split(",")}
    if path.lower().endswith(".csv") or {"image", "class"} <= header:
        return _csv_entries(path, text)
    if text.lstrip().startswith(("{", "[")):
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise LabelsError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise LabelsError(f"{path}: the JSON must be an object {{name: class}}")
        return [LabelEntry(str(k).replace("\\", "/"), str(v).strip(), f"key {k!r}")
                for k, v in raw.items()]
    return _text_entries(path, text)


def class_id(value: str, names: Optional[Sequence[str]], num_classes: int, where: str) -> int:
    """The class id ``value`` stands for: an integer id in ``[0, num_classes)``, or one of
    ``names`` (exact, else ignoring case). ``where`` begins the message of the
    :class:`LabelsError` raised otherwise."""
    v = str(value).strip()
    if re.fullmatch(r"[+-]?\d+", v):
        c = int(v)
        if not 0 <= c < num_classes:
            raise LabelsError(f"{where}: class id {c} is not in [0, {num_classes}) for this "
                              f"model")
        return c
    names = list(names or [])
    if v in names:
        return names.index(v)
    lower = {n.lower(): i for i, n in reversed(list(enumerate(names)))}
    if v.lower() in lower:
        return lower[v.lower()]
    raise LabelsError(f"{where}: {v!r} is neither a class id nor a class name of this model")
