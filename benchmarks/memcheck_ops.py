"""Every CUDA op of tsgb_ext once on small inputs (both layouts, float32 and bfloat16, grouped,
depthwise, T = 2 targets, the fused conv -> BN rule), then a device synchronise: a short run for
`compute-sanitizer --tool memcheck` (benchmarks/gpu_check.sh runs it when time is left).

    compute-sanitizer --tool memcheck --error-exitcode 9 python benchmarks/memcheck_ops.py
    python benchmarks/memcheck_ops.py --device cpu        # harness check
"""
import argparse

import torch
import torch.nn.functional as F

import tsgb_ext  # noqa: F401  (registers the ops)

EPS = 1e-10


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda")
    dev = torch.device(p.parse_args().device)
    ops = torch.ops.tsgb_ext
    gen = torch.Generator().manual_seed(0)
    n_calls = 0
    for dtype in (torch.float32, torch.bfloat16):
        for cl in (False, True):
            def prep(t):
                t = t.to(dev, dtype)
                return t.contiguous(memory_format=torch.channels_last) if cl else t
            for C, K, G, k, s, p_, d in [(6, 8, 2, 3, 2, 1, 1), (8, 8, 8, 3, 1, 1, 2),
                                         (3, 5, 1, 7, 2, 3, 1), (4, 4, 1, 1, 1, 0, 1)]:
                x = torch.randn(2, C, 13, 11, generator=gen)
                w = torch.randn(K, C // G, k, k, generator=gen)
                y = F.conv2d(x, w, None, s, p_, d, G)
                g = torch.randn((4,) + tuple(y.shape[1:]), generator=gen)
                x, y, g = prep(x), prep(y), prep(g)
                geom = ([k, k], [s, s], [p_, p_], [d, d], G, EPS)
                ops.conv2d_backward(g, x, y, *geom)
                rm, rv = torch.randn(K).to(dev), (torch.rand(K) + 0.5).to(dev)
                bw, bb = torch.randn(K).to(dev), torch.randn(K).to(dev)
                for act in (0, 1, 2):
                    ops.conv2d_bn_backward(g, x, y, rm, rv, bw, bb, 1e-5, act, *geom)
                n_calls += 4
            xa = prep(torch.rand(2, 6, 9, 7, generator=gen) + 0.5)
            sc, sh = torch.randn(6).to(dev), torch.randn(6).to(dev)
            ops.batch_norm_backward(prep(torch.randn(4, 6, 9, 7, generator=gen)), xa, sc, sh, 1e-5)
            yp = F.avg_pool2d(xa, 3, 2, 1, True, False)
            ops.avg_pool2d_backward(prep(torch.randn((4,) + tuple(yp.shape[1:]), generator=gen)),
                                    xa, yp, [3, 3], [2, 2], [1, 1], True, False, None, EPS)
            W = torch.randn(5, 8, generator=gen).to(dev, dtype)
            ops.linear_backward(torch.randn(4, 5, generator=gen).to(dev, dtype),
                                torch.rand(2, 8, generator=gen).to(dev, dtype),
                                W.clamp(min=0), W.clamp(max=0), EPS)
            n_calls += 3
    if dev.type == "cuda":
        torch.cuda.synchronize()
    print(f"memcheck_ops: {n_calls} op calls on {dev} done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
