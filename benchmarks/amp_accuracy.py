"""How far ``tsgb explain --amp bf16|fp16`` maps are from the float32 maps (CPU by default).

    python benchmarks/amp_accuracy.py [--backends native,hooks] [--amp bf16,fp16] [--device cpu]

The eight photos of ``benchmarks/make_photo_dir.py`` are written as JPEGs to a temporary folder
and read back with ``tsgb_ext.pipeline.ImageFileDataset`` (the decoding and resizing of
``tsgb explain``), then explained by the bundled ImageNet-pretrained EfficientNet-Lite0 through
``tsgb_ext.pipeline.explain_batches`` (the code path of ``tsgb explain``), once in float32 and
once per ``--amp`` dtype (autocast forward). Every run explains the same class per photo: the
float32 model's top-1. Printed per photo and backend: the cosine similarity of the amp map to
the float32 map (flattened), and the relative L2 difference ``||amp - fp32|| / ||fp32||``;
then the mean and the minimum cosine over the photos whose map is finite. A map with
non-finite pixels (inf / NaN) is reported as such (cosine nan), not dropped silently.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_photo_dir import write_photo_dir  # noqa: E402


def _maps(model, batch, backend, amp, targets, mean, std):
    from tsgb_ext import pipeline
    tgt = lambda meta, logits: [[targets[p]] for p in meta["path"]]  # noqa: E731
    out = next(pipeline.explain_batches(model, [batch], target=tgt, backend=backend, amp=amp,
                                        mean=mean, std=std))
    return out.maps[:, 0].float()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backends", default="native,hooks")
    p.add_argument("--amp", default="bf16,fp16")
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)

    from tsgb_ext import imagenet, models, pipeline
    warnings.filterwarnings("ignore", message="tsgb_ext: using the pure-PyTorch")
    torch.manual_seed(0)
    dev = torch.device(a.device)
    lm = models.load_model("efficientnet-lite0", device=dev)
    names = imagenet.class_names()
    with tempfile.TemporaryDirectory() as d:
        paths = write_photo_dir(d)
        ds = pipeline.ImageFileDataset(pipeline.list_images([d]), lm.size)
        batch = pipeline.collate([ds[i] for i in range(len(ds))])
    photos = [os.path.splitext(os.path.basename(q))[0] for q in batch["path"]]
    assert sorted(photos) == sorted(paths)
    with torch.no_grad():
        x = (batch["image"].to(dev) - torch.tensor(lm.mean, device=dev).view(1, 3, 1, 1)) / \
            torch.tensor(lm.std, device=dev).view(1, 3, 1, 1)
        top1 = lm.model(x).argmax(1).tolist()
    targets = dict(zip(batch["path"], top1))

    print(f"torch {torch.__version__}, device {dev}, EfficientNet-Lite0 (pretrained), "
          f"{len(photos)} photos at {lm.size}, target = float32 top-1")
    rows = []
    for backend in a.backends.split(","):
        ref = _maps(lm.model, batch, backend, None, targets, lm.mean, lm.std)
        for amp in a.amp.split(","):
            got = _maps(lm.model, batch, backend, amp, targets, lm.mean, lm.std)
            r, g = ref.flatten(1).double(), got.flatten(1).double()
            bad = (~torch.isfinite(g)).sum(1)          # non-finite pixels: cosine/L2 are nan
            cos = torch.nn.functional.cosine_similarity(g, r, dim=1)
            cos = torch.where(bad > 0, torch.full_like(cos, float("nan")), cos)
            rel = (g - r).norm(dim=1) / r.norm(dim=1)
            for i, ph in enumerate(photos):
                rows.append((backend, amp, ph, names[top1[i]], float(cos[i]), float(rel[i]),
                             int(bad[i])))
            ok = bad == 0
            if ok.any():
                c_ok, r_ok = cos[ok], rel[ok]
                i_min = int(torch.nonzero(ok)[int(c_ok.argmin())])
                rows.append((backend, amp, f"MEAN ({int(ok.sum())} finite maps)", "",
                             float(c_ok.mean()), float(r_ok.mean()), 0))
                rows.append((backend, amp, "MIN cosine", photos[i_min], float(cos[i_min]),
                             float(rel[i_min]), 0))

    print("\n| backend | amp | photo | class | cosine to float32 map | relative L2 "
          "| non-finite pixels |")
    print("|---|---|---|---|---|---|---|")
    for b, amp, ph, cls, c, r, nb in rows:
        print(f"| {b} | {amp} | {ph} | {cls} | {c:.3f} | {r:.3g} | {nb} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
