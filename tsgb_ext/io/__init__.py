"""Everything the package reads and writes: image files (:mod:`.images`), the preprocessing
that maps image pixels to map pixels (:mod:`.preprocess`), label files (:mod:`.labels`), and
the map store (:mod:`.store`: the run folder of ``tsgb explain``, written with
:class:`MapStore`, read with :func:`open_maps`, :mod:`.maps`).

Below ``data`` and ``evaluation`` (which use it) and beside ``core``: nothing here imports
another part of tsgb_ext.
"""
from .images import IMAGE_EXTENSIONS, ImageItem, image_size, list_images, open_rgb, read_rgb
from .labels import LabelEntry, LabelsError, class_id, read_labels
from .maps import MapSet, open_maps
from .preprocess import Preprocessing
from .store import (COLUMNS, MAP_DTYPES, MapStore, StoreError, StoreHooks,
                    close_inherited_locks)

__all__ = ["IMAGE_EXTENSIONS", "ImageItem", "image_size", "list_images", "open_rgb",
           "read_rgb", "LabelEntry", "LabelsError", "class_id", "read_labels", "MapSet",
           "open_maps", "Preprocessing", "COLUMNS", "MAP_DTYPES", "MapStore", "StoreError",
           "StoreHooks", "close_inherited_locks"]
