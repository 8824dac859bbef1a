"""ImageNet-1k class names, offline (from torchvision's weight metadata; nothing is downloaded)."""
from __future__ import annotations

import functools
from typing import Tuple

#: ImageNet classes that are domestic cats (tabby, tiger cat, Persian, Siamese, Egyptian cat).
CAT_CLASSES: Tuple[int, ...] = (281, 282, 283, 284, 285)
#: ImageNet classes for a cup of coffee (espresso, cup, coffee mug).
COFFEE_CLASSES: Tuple[int, ...] = (967, 968, 504)


@functools.lru_cache(maxsize=1)
def class_names() -> Tuple[str, ...]:
    """The 1000 ImageNet-1k class names, by class index."""
    try:
        from torchvision.models import ResNet50_Weights
    except ImportError as e:  # pragma: no cover
        raise ImportError(f"ImageNet class names come from torchvision's metadata: {e}") from e
    names = tuple(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])
    if len(names) != 1000:  # pragma: no cover
        raise RuntimeError(f"torchvision's ImageNet metadata has {len(names)} classes, not 1000")
    return names


def class_name(index: int) -> str:
    """The ImageNet name of class ``index`` (0..999)."""
    names = class_names()
    if not 0 <= int(index) < len(names):
        raise IndexError(f"ImageNet class index must be in [0, {len(names)}), got {index}")
    return names[int(index)]
