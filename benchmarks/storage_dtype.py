"""How exact the map store's storage is: float16 with a per-map scale (the default), bfloat16,
and float16 without a scale (tsgb 0.1.0), each against the float32 maps, on real photos with
the pretrained EfficientNet-Lite0 (the demo's model).

    python benchmarks/storage_dtype.py [--photos DIR] [--top-k 3] [--out storage.md]

Maps come from ``pipeline.explain_batches`` (native backend where built, float32); each storage
is a round trip (encode, decode to float32), scored per map by the relative L2 error
``||stored - float32|| / ||float32||`` and by the share of the map's values that are float16
subnormals (|v| < 2**-14, not 0) as stored. Bytes are per map, the npy payload.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHOTOS = os.path.join(REPO, "tests", "data", "voc_small", "JPEGImages")


def float32_maps(photos: str, top_k: int) -> np.ndarray:
    """(M, 224, 224) float32 maps of every photo's ``top_k`` classes."""
    from tsgb_ext.data import models, pipeline
    loaded = models.load_model("efficientnet-lite0")
    pre = loaded.preprocessing()
    ds = pipeline.ImageFileDataset(pipeline.list_images([photos]), pre)
    dl = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=pipeline.collate)
    out = []
    for res in pipeline.explain_batches(loaded.model, dl, top_k=top_k, mean=pre.mean,
                                        std=pre.std):
        out.append(res.maps.float().reshape(-1, *res.maps.shape[-2:]).numpy())
    return np.concatenate(out)


def storages():
    """name -> (encode(maps) -> stored, decode(stored) -> float32 maps, bytes per value)."""
    from tsgb_ext.io.store import decode_map, encode_maps

    def f16_scaled():
        box = {}

        def enc(m):
            s, box["scales"] = encode_maps(m, "float16")
            return s
        return enc, lambda s: np.stack([decode_map(x, c) for x, c in zip(s, box["scales"])]), 2

    def bf16():
        return (lambda m: torch.from_numpy(m).to(torch.bfloat16),
                lambda s: s.float().numpy(), 2)

    def f16_plain():
        return lambda m: m.astype(np.float16), lambda s: s.astype(np.float32), 2

    def f32():
        return lambda m: m.astype(np.float32), lambda s: s, 4
    return {"float16 + per-map scale (default)": f16_scaled(), "bfloat16": bf16(),
            "float16, no scale (tsgb 0.1.0)": f16_plain(), "float32": f32()}


def subnormal_share(stored) -> np.ndarray:
    if isinstance(stored, torch.Tensor) or stored.dtype != np.float16:
        return np.zeros(len(stored))
    a = np.abs(stored.astype(np.float32)).reshape(len(stored), -1)
    return ((a > 0) & (a < 2.0 ** -14)).mean(1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--photos", default=PHOTOS)
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--out", help="also write the table (markdown) here")
    args = p.parse_args(argv)
    t0 = time.time()
    maps = float32_maps(args.photos, args.top_k)
    norms = np.linalg.norm(maps.reshape(len(maps), -1), axis=1)
    lines = [f"{len(maps)} maps ({len(maps) // args.top_k} photos of {args.photos}, top-"
             f"{args.top_k}), 224x224; |max| of the maps: {np.abs(maps).max():.3g} "
             f"(median per map {np.median(np.abs(maps).reshape(len(maps), -1).max(1)):.3g}); "
             f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
             f"{time.strftime('%Y-%m-%d')}", "",
             "| storage | bytes / map | rel. L2 median | rel. L2 max | float16 subnormals "
             "(median share) |", "|---|---|---|---|---|"]
    for name, (enc, dec, nbytes) in storages().items():
        stored = enc(maps)
        back = dec(stored)
        err = np.linalg.norm((back - maps).reshape(len(maps), -1), axis=1) / norms
        lines.append(f"| {name} | {nbytes * maps[0].size} | {np.median(err):.2e} | "
                     f"{err.max():.2e} | {np.median(subnormal_share(stored)):.0%} |")
    lines.append(f"\n({time.time() - t0:.0f} s)")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
