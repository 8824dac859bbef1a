"""Map quality, no timings: ``--bench accuracy`` (float32 maps against the float64 transcription
of the spec), ``amp`` (``--amp bf16|fp16`` maps against float32), ``storage`` (the map store's
storage dtypes against float32) and ``maps`` (compile vs eager, float32 vs float64, fused vs
unfused).

* accuracy: the 14 random-weight torchvision families of ``tests/test_models.py`` (same
  construction: ``torch.manual_seed(0)``, 10 classes, the test's ``randomise_bn``, eval; input
  ``randn(2, 3, S, S)`` with seed 0, targets [3, 7]) and, unless ``--no-photos``, the pretrained
  EfficientNet-Lite0 on the 8 photos of make_photo_dir.py (each photo's top-1). Per model and
  backend: ``same fwd`` (relative L2 to the rules in float64 on the model's own float32
  forward), ``vs f64 L2`` / ``vs f64 max`` (to the float64 map), ``plain f32 L2`` (the
  reference run entirely in float32: the test bounds a backend by ``max(1e-4, 3 x`` this
  ``)``), ``ok``, and ``f64 L2`` (the backend run in float64).
* amp: the photos through ``explain_batches`` (the code path of ``tsgb explain``) with
  amp=None and each ``--amp`` dtype, target the float32 top-1: cosine and relative L2 of each
  map to the float32 one, non-finite pixels counted (a map with any has cosine nan).
* storage: the maps of every bundled photo's ``--top-k`` classes (``explain_batches``, float32),
  each storage a round trip (encode, decode): relative L2 per map and the share of values that
  are float16 subnormals as stored; bytes per map (the npy payload).
* maps: hooks under torch.compile against eager and float32 against float64 (ResNet50, batch
  4), native fused against unfused on the pretrained EfficientNet-Lite0 (float64 and float32,
  batch 2). ``--parts compile,fusion``.
"""
from __future__ import annotations

import copy
import os
import sys

import numpy as np
import torch

import _models
from _common import REPO, fused_chains, make_targets, photo_batch, rel_l2, rel_max

TESTS = os.path.join(REPO, "tests")
PHOTOS = os.path.join(REPO, "tests", "data", "voc_small", "JPEGImages")


def _backend_rows(name, model, x, target, backends):
    import reference as ref
    import tsgb_ext
    want64 = ref.reference_saliency(model, x, target)
    same = ref.reference_saliency_same_forward(model, x, target)
    plain_err = rel_l2(ref.plain_float32_saliency(model, x, target), want64)
    bound = max(1e-4, 3 * plain_err)
    rows = []
    for b in backends:
        got = tsgb_ext.TSGB(copy.deepcopy(model), backend=b).attribute(x, target)
        e = rel_l2(got, want64)
        got64 = tsgb_ext.TSGB(copy.deepcopy(model).double(), backend=b).attribute(x.double(),
                                                                                 target)
        fin = "" if bool(torch.isfinite(got).all()) else " (non-finite!)"
        rows.append([name, b, f"{rel_l2(got, same):.1e}", f"{e:.1e}",
                     f"{rel_max(got, want64):.1e}", f"{plain_err:.1e}",
                     ("yes" if e <= bound else "NO") + fin, f"{rel_l2(got64, want64):.1e}"])
    return rows


def run_accuracy(args, report) -> int:
    from tsgb_ext.data.models import load_model
    if TESTS not in sys.path:
        sys.path.insert(0, TESTS)
    from test_models import FAMILIES, randomise_bn
    torch.set_grad_enabled(True)
    title = report.table("float32 maps against the float64 transcription (tests/reference.py)",
                         ["model", "backend", "same fwd L2", "vs f64 L2", "vs f64 max",
                          "plain f32 L2", "ok (<= max(1e-4, 3x plain))", "f64 L2"])
    names = args.families.split(",") if args.families else list(FAMILIES)
    for n in names:
        factory, size = FAMILIES[n]
        torch.manual_seed(0)
        model = randomise_bn(factory()).eval()
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
        for row in _backend_rows(n, model, x, torch.tensor([3, 7]), args.backend_list):
            report.add(title, row)
    if not args.no_photos:
        lm = load_model("efficientnet-lite0")
        _, x = photo_batch(lm)
        with torch.no_grad():
            target = lm.model(x).argmax(1)
        for row in _backend_rows("efficientnet_lite0 (pretrained, 8 photos)", lm.model.eval(), x,
                                 target, args.backend_list):
            report.add(title, row)
    return 0


def _amp_maps(model, batch, backend, amp, targets, lm):
    from tsgb_ext.data import pipeline
    tgt = lambda meta, logits: [[targets[p]] for p in meta["path"]]  # noqa: E731
    out = next(pipeline.explain_batches(model, [batch], target=tgt, backend=backend, amp=amp,
                                        mean=lm.mean, std=lm.std))
    return out.maps[:, 0].float()


def _amp_rows(backend, amp, photos, classes, ref, got):
    r, g = ref.flatten(1).double(), got.flatten(1).double()
    bad = (~torch.isfinite(g)).sum(1)  # non-finite pixels: cosine / L2 are nan
    cos = torch.nn.functional.cosine_similarity(g, r, dim=1)
    cos = torch.where(bad > 0, torch.full_like(cos, float("nan")), cos)
    rel = (g - r).norm(dim=1) / r.norm(dim=1)
    rows = [[backend, amp, ph, classes[i], f"{float(cos[i]):.3f}", f"{float(rel[i]):.3g}",
             int(bad[i])] for i, ph in enumerate(photos)]
    ok = bad == 0
    if ok.any():
        i_min = int(torch.nonzero(ok)[int(cos[ok].argmin())])
        rows.append([backend, amp, f"MEAN ({int(ok.sum())} finite maps)", "",
                     f"{float(cos[ok].mean()):.3f}", f"{float(rel[ok].mean()):.3g}", 0])
        rows.append([backend, amp, "MIN cosine", photos[i_min], f"{float(cos[i_min]):.3f}",
                     f"{float(rel[i_min]):.3g}", 0])
    return rows


def run_amp(args, report) -> int:
    from tsgb_ext.data import imagenet
    from tsgb_ext.data.models import load_model
    torch.manual_seed(0)
    dev = args.device_obj
    lm = load_model("efficientnet-lite0", device=dev)
    batch, x = photo_batch(lm)
    photos = [os.path.splitext(os.path.basename(q))[0] for q in batch["path"]]
    with torch.no_grad():
        top1 = lm.model(x.to(dev)).argmax(1).tolist()
    targets = dict(zip(batch["path"], top1))
    names = imagenet.class_names()
    report.head.append(f"- EfficientNet-Lite0 (pretrained), {len(photos)} photos at {lm.size}, "
                       f"target = float32 top-1")
    title = report.table("amp maps against float32",
                         ["backend", "amp", "photo", "class", "cosine to float32 map",
                          "relative L2", "non-finite pixels"])
    for backend in args.backend_list:
        ref = _amp_maps(lm.model, batch, backend, None, targets, lm)
        for amp in args.amp.split(","):
            got = _amp_maps(lm.model, batch, backend, amp, targets, lm)
            for row in _amp_rows(backend, amp, photos, [names[c] for c in top1], ref, got):
                report.add(title, row)
    return 0


def _float32_maps(photos: str, top_k: int) -> np.ndarray:
    """(M, 224, 224) float32 maps of every photo's ``top_k`` classes."""
    from tsgb_ext.data import pipeline
    from tsgb_ext.data.models import load_model
    from tsgb_ext.io.images import list_images
    loaded = load_model("efficientnet-lite0")
    pre = loaded.preprocessing()
    ds = pipeline.ImageFileDataset(list_images([photos]), pre)
    dl = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=pipeline.collate)
    out = [res.maps.float().reshape(-1, *res.maps.shape[-2:]).numpy()
           for res in pipeline.explain_batches(loaded.model, dl, top_k=top_k, mean=pre.mean,
                                               std=pre.std)]
    return np.concatenate(out)


def _storages():
    """name -> (encode(maps) -> stored, decode(stored) -> float32 maps, bytes per value)."""
    from tsgb_ext.io.store import decode_map, encode_maps
    box = {}

    def enc_scaled(m):
        s, box["scales"] = encode_maps(m, "float16")
        return s
    return {
        "float16 + per-map scale (default)":
            (enc_scaled, lambda s: np.stack([decode_map(v, c) for v, c in
                                             zip(s, box["scales"])]), 2),
        "bfloat16": (lambda m: torch.from_numpy(m).to(torch.bfloat16),
                     lambda s: s.float().numpy(), 2),
        "float16, no scale (tsgb 0.1.0)": (lambda m: m.astype(np.float16),
                                           lambda s: s.astype(np.float32), 2),
        "float32": (lambda m: m.astype(np.float32), lambda s: s, 4)}


def _subnormal_share(stored) -> np.ndarray:
    if isinstance(stored, torch.Tensor) or stored.dtype != np.float16:
        return np.zeros(len(stored))
    a = np.abs(stored.astype(np.float32)).reshape(len(stored), -1)
    return ((a > 0) & (a < 2.0 ** -14)).mean(1)


def run_storage(args, report) -> int:
    photos = args.photos or PHOTOS
    maps = _float32_maps(photos, args.top_k)
    flat = maps.reshape(len(maps), -1)
    norms = np.linalg.norm(flat, axis=1)
    report.head.append(f"- {len(maps)} maps ({len(maps) // args.top_k} photos of {photos}, "
                       f"top-{args.top_k}), 224x224; |max| of the maps: {np.abs(maps).max():.3g} "
                       f"(median per map {np.median(np.abs(flat).max(1)):.3g})")
    title = report.table("Map storage against float32",
                         ["storage", "bytes / map", "rel. L2 median", "rel. L2 max",
                          "float16 subnormals (median share)"])
    for name, (enc, dec, nbytes) in _storages().items():
        stored = enc(maps)
        err = np.linalg.norm((dec(stored) - maps).reshape(len(maps), -1), axis=1) / norms
        report.add(title, [name, nbytes * maps[0].size, f"{np.median(err):.2e}",
                           f"{err.max():.2e}", f"{np.median(_subnormal_share(stored)):.0%}"])
    return 0


def _compile_maps():
    import tsgb_ext
    model = _models.build("resnet50")
    x = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    t = make_targets(4, 1000)
    eager = tsgb_ext.TSGB(model, backend="hooks").attribute(x, t)
    ref = tsgb_ext.TSGB(copy.deepcopy(model).double(), backend="hooks").attribute(x.double(), t)
    clf = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)][-1]
    with tsgb_ext.TSGB(model, backend="hooks", classifier=clf) as ex:
        orig = ex.model
        torch._dynamo.reset()
        ex.model = torch.compile(model)
        try:
            comp = ex.attribute(x, t)
        finally:
            ex.model = orig
            torch._dynamo.reset()
    return ["ResNet50 (random weights, batch 4), hooks backend",
            f"torch.compile float32 vs eager float32 {rel_l2(comp, eager):.2e}; eager float32 vs "
            f"float64 {rel_l2(eager, ref):.2e}; compiled float32 vs float64 "
            f"{rel_l2(comp, ref):.2e}"]


def _fusion_maps():
    import tsgb_ext
    model = _models.build("efficientnet-lite0")
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    t = make_targets(2, 1000)
    out, chains = [], 0
    for dt in (torch.float64, torch.float32):
        m = copy.deepcopy(model).to(dt)
        ex_f = tsgb_ext.TSGB(m, backend="native", fuse=True)
        fused = ex_f.attribute(x.to(dt), t)
        chains = fused_chains(ex_f)
        unfused = tsgb_ext.TSGB(m, backend="native", fuse=False).attribute(x.to(dt), t)
        out.append(f"{str(dt).replace('torch.', '')} {rel_l2(fused, unfused):.1e}")
    return [f"EfficientNet-Lite0 (pretrained, batch 2), native fused vs unfused ({chains} fused "
            f"chains)", ", ".join(out)]


def run_maps(args, report) -> int:
    title = report.table("Map differences (relative L2 = ||a - b|| / ||b||)",
                         ["case", "relative L2"])
    parts = {"compile": _compile_maps, "fusion": _fusion_maps}
    for part in args.parts.split(","):
        report.add(title, parts[part]())
    return 0
