"""Write the real single-object photographs used by ``tsgb eval grid`` into a folder.

    python benchmarks/make_photo_dir.py OUT_DIR [--max-side 512]

Sources (all offline, shipped with the packages): scikit-image's ``chelsea`` (cat), ``coffee``
(espresso), ``rocket``, ``camera`` (cameraman with tripod), ``astronaut``; scikit-learn's
``load_sample_images`` (``china``: a temple, ``flower``); matplotlib's ``grace_hopper.jpg``.
The pretrained EfficientNet-Lite0's top-1 classes of these eight are all different.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Dict

import numpy as np

PHOTOS = ("chelsea", "coffee", "rocket", "camera", "astronaut", "china", "flower", "grace_hopper")


def sample_photos() -> Dict[str, np.ndarray]:
    """name -> RGB uint8 (H, W, 3) array."""
    from skimage import data
    out = {}
    for name in ("chelsea", "coffee", "rocket", "camera", "astronaut"):
        img = np.asarray(getattr(data, name)())
        out[name] = np.stack([img] * 3, -1) if img.ndim == 2 else img[..., :3]
    from sklearn.datasets import load_sample_images
    s = load_sample_images()
    for fn, img in zip(s.filenames, s.images):
        out[os.path.splitext(os.path.basename(fn))[0]] = np.asarray(img)
    import matplotlib.cbook as cbook
    from PIL import Image
    with cbook.get_sample_data("grace_hopper.jpg") as f:
        out["grace_hopper"] = np.asarray(Image.open(f).convert("RGB"))
    return {k: out[k] for k in PHOTOS}


def write_photo_dir(out_dir: str, max_side: int = 512, quality: int = 90) -> Dict[str, str]:
    """Write each photo as ``OUT_DIR/<name>.jpg`` (longest side <= ``max_side``)."""
    from PIL import Image
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for name, arr in sample_photos().items():
        im = Image.fromarray(arr)
        scale = max_side / max(im.size)
        if scale < 1:
            im = im.resize((round(im.width * scale), round(im.height * scale)), Image.LANCZOS)
        path = os.path.join(out_dir, f"{name}.jpg")
        im.save(path, quality=quality)
        paths[name] = path
    return paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir")
    p.add_argument("--max-side", type=int, default=512)
    a = p.parse_args(argv)
    for name, path in write_photo_dir(a.out_dir, a.max_side).items():
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
