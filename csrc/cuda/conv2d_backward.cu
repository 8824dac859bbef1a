// TSGB-Conv backward on CUDA (group-aware rule of shared/TSGB_SPEC.md).
//
// Per group gi (C/G input channels, K/G output channels), per gradient sample b (activation
// sample n = b % N):
//   s[b,gi,o] = sum_{k in gi} grad[b,k,o] * y[n,k,o]
//   a[n,gi,i] = sum_{c in gi} |x[n,c,i]|
//   r[b,gi,o] = s[b,gi,o] / (boxsum_window(o) a[n,gi,.] + eps)
//   gx[b,c,i] = sign(x[n,c,i]) * sum_{o : window(o) contains i} r[b,gi(c),o]
//
// Three kernels, no weights, no convolution, no atomics:
//   1. group_reduce: s (from grad, y) and a (from x), channel reductions at every position
//      (two launches of one kernel). fp32 results, G channels per sample.
//   2. ratio: r = s / (box sum of a + eps) at output positions, in place over s.
//   3. gather_sign: t = transposed box sum of r (gather form: for each tap, the output that
//      covers this input, if the stride divides) fused with gx = sign(x) * t over x's channels.
// conv2d_bn_backward (conv -> BN -> ReLU/ReLU6 block): kernel 1's products g * y become
// g * bn_act_factor(y) with the BN's scale / shift from a one-block prologue kernel; nothing
// else changes, no extra pass over activations.
// Bytes: grad, y read once; x read twice (|x| reduction, sign); gx written once; the fp32
// intermediates hold G channels (1 for groups == 1) per sample.
// One input channel per group (depthwise, groups == C): those intermediates would be as large
// as x itself (~34 B per element in fp32 over 4 launches), so kernel 4 does the whole rule in
// one launch through shared memory: x, y, grad read once, gx written once (16 B per element
// in fp32 at stride 1, 10 B at stride 2; half that in fp16 / bf16). It falls back to the
// three kernels only for windows whose halo would not fit shared memory.
//
// Layout: everything is iterated in the memory format x suggests (NCHW or channels_last); the
// G-channel intermediates use the matching layout ([B,G,P] or [B,P,G]) so every access is
// coalesced: NCHW kernels put threads along spatial positions (blockDim.x) and split the
// channel loop over blockDim.y; channels_last kernels put lanes along the channels of a group
// (blockDim.x, a power of two <= 32) and reduce with warp shuffles.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "cuda/tsgb_cuda.cuh"

namespace tsgb {
namespace {

using cuda_detail::kThreads;

// Window geometry in 32-bit: the per-tap arithmetic stays out of 64-bit division.
struct Geom {
  int kh, kw, sh, sw, ph, pw, dh, dw;
};

// ---------------------------------------------------------------------------------------------
// 1. Channel-group reduction. out[b, g, p] = sum_{j < cpg} f(a[b, g*cpg + j, p], m[b % Nm, ...])
//    with f = product (PROD) or |a| (!PROD).

// NCHW: block (TX, TY); tx along positions, ty splits the channel loop, shared-memory combine.
template <typename scalar_t, typename acc_t, typename index_t, bool PROD>
__global__ void group_reduce_nchw_kernel(const scalar_t* __restrict__ a,
                                         const scalar_t* __restrict__ m, acc_t* __restrict__ out,
                                         index_t Bo, index_t Nm, index_t Cch, index_t G,
                                         index_t P, BnFold<acc_t> bn) {
  __shared__ acc_t sm[kThreads];
  const int TX = blockDim.x, TY = blockDim.y;
  const int tx = threadIdx.x, ty = threadIdx.y;
  const index_t cpg = Cch / G;
  const index_t tiles = (P + TX - 1) / TX;
  const index_t items = Bo * G * tiles;
  for (index_t it = blockIdx.x; it < items; it += gridDim.x) {
    const index_t tile = it % tiles;
    const index_t bg = it / tiles;
    const index_t g = bg % G;
    const index_t b = bg / G;
    const index_t p = tile * TX + tx;
    acc_t acc = acc_t(0);
    if (p < P) {
      const scalar_t* ap = a + (b * Cch + g * cpg) * P + p;
      if constexpr (PROD) {
        const scalar_t* mp = m + ((b % Nm) * Cch + g * cpg) * P + p;
        if (bn.scale == nullptr) {
          for (index_t j = ty; j < cpg; j += TY) {
            acc += static_cast<acc_t>(ap[j * P]) * static_cast<acc_t>(mp[j * P]);
          }
        } else {  // BN + activation folded in (conv2d_bn_backward)
          for (index_t j = ty; j < cpg; j += TY) {
            const index_t k = g * cpg + j;
            acc += static_cast<acc_t>(ap[j * P]) *
                   bn_act_factor<scalar_t>(static_cast<acc_t>(mp[j * P]), bn.scale[k],
                                           bn.shift[k], bn.div_eps, bn.act);
          }
        }
      } else {
        for (index_t j = ty; j < cpg; j += TY) {
          const acc_t v = static_cast<acc_t>(ap[j * P]);
          acc += v < acc_t(0) ? -v : v;
        }
      }
    }
    if (TY > 1) {  // block-uniform
      sm[ty * TX + tx] = acc;
      __syncthreads();
      if (ty == 0) {
        for (int k = 1; k < TY; ++k) acc += sm[k * TX + tx];
      }
      __syncthreads();
    }
    if (ty == 0 && p < P) out[(b * G + g) * P + p] = acc;
  }
}

// channels_last: block (TX, TY); TX lanes (power of two <= 32) along a group's channels, ty
// picks the (b, p, g) item (g fastest). Lane-group shuffle reduction.
template <typename scalar_t, typename acc_t, typename index_t, bool PROD>
__global__ void group_reduce_cl_kernel(const scalar_t* __restrict__ a,
                                       const scalar_t* __restrict__ m, acc_t* __restrict__ out,
                                       index_t Bo, index_t Nm, index_t Cch, index_t G,
                                       index_t P, BnFold<acc_t> bn) {
  const int TX = blockDim.x, TY = blockDim.y;
  const int tx = threadIdx.x, ty = threadIdx.y;
  const index_t cpg = Cch / G;
  const index_t items = Bo * P * G;
  for (index_t base = static_cast<index_t>(blockIdx.x) * TY; base < items;
       base += static_cast<index_t>(gridDim.x) * TY) {  // block-uniform loop
    const index_t item = base + ty;
    const bool valid = item < items;
    acc_t acc = acc_t(0);
    if (valid) {
      const index_t g = item % G;
      const index_t bp = item / G;  // b * P + p
      const scalar_t* ap = a + bp * Cch + g * cpg;
      if constexpr (PROD) {
        const index_t b = bp / P;
        const index_t mrow = bp - (b - b % Nm) * P;  // (b % Nm) * P + p
        const scalar_t* mp = m + mrow * Cch + g * cpg;
        if (bn.scale == nullptr) {
          for (index_t j = tx; j < cpg; j += TX) {
            acc += static_cast<acc_t>(ap[j]) * static_cast<acc_t>(mp[j]);
          }
        } else {  // BN + activation folded in (conv2d_bn_backward)
          for (index_t j = tx; j < cpg; j += TX) {
            const index_t k = g * cpg + j;
            acc += static_cast<acc_t>(ap[j]) *
                   bn_act_factor<scalar_t>(static_cast<acc_t>(mp[j]), bn.scale[k], bn.shift[k],
                                           bn.div_eps, bn.act);
          }
        }
      } else {
        for (index_t j = tx; j < cpg; j += TX) {
          const acc_t v = static_cast<acc_t>(ap[j]);
          acc += v < acc_t(0) ? -v : v;
        }
      }
    }
    acc = cuda_detail::lane_group_allreduce(acc, TX);
    if (valid && tx == 0) out[item] = acc;
  }
}

// ---------------------------------------------------------------------------------------------
// 2. r = s / (box sum of a over o's window + eps), in place over s. s: Bo samples; a: N samples.
template <typename acc_t, typename index_t, bool CL>
__global__ void ratio_kernel(acc_t* __restrict__ s, const acc_t* __restrict__ a, index_t Bo,
                             index_t N, index_t G, index_t H, index_t W, index_t Ho, index_t Wo,
                             Geom w, acc_t eps) {
  const index_t total = Bo * G * Ho * Wo;
  for (index_t e = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<index_t>(gridDim.x) * blockDim.x) {
    index_t g, oh, ow, b, t;
    if constexpr (CL) {
      g = e % G; t = e / G;
      ow = t % Wo; t /= Wo;
      oh = t % Ho; b = t / Ho;
    } else {
      ow = e % Wo; t = e / Wo;
      oh = t % Ho; t /= Ho;
      g = t % G; b = t / G;
    }
    const index_t n = b % N;
    const index_t h0 = oh * w.sh - w.ph;
    const index_t w0 = ow * w.sw - w.pw;
    acc_t d = acc_t(0);
    for (index_t ky = 0; ky < w.kh; ++ky) {
      const index_t ih = h0 + ky * w.dh;
      if (ih < 0 || ih >= H) continue;
      for (index_t kx = 0; kx < w.kw; ++kx) {
        const index_t iw = w0 + kx * w.dw;
        if (iw < 0 || iw >= W) continue;
        const index_t idx = CL ? ((n * H + ih) * W + iw) * G + g : ((n * G + g) * H + ih) * W + iw;
        d += a[idx];
      }
    }
    s[e] = s[e] / (d + eps);
  }
}

// ---------------------------------------------------------------------------------------------
// 3. gx[b, c, i] = sign(x[b % N, c, i]) * t[b, g(c), i], t = transposed box sum of r.

// Sum of r over the outputs whose window contains input (ih, iw): for each tap (ky, kx) the
// output o with o * stride + tap * dilation = i + pad, if the stride divides and o is in range.
// Taps tap0, tap0 + tap_step, ... (row-major over kh x kw); all spatial math in 32 bits.
template <typename acc_t, typename index_t, bool CL>
__device__ __forceinline__ acc_t gather_r(const acc_t* __restrict__ r, index_t b, index_t g,
                                          int ih, int iw, index_t G, int Ho, int Wo,
                                          const Geom& w, int tap0, int tap_step) {
  acc_t acc = acc_t(0);
  // output index along one axis for input coordinate v + pad - tap * dil, or -1 if none;
  // stride 1 (the common case, warp-uniform branch) needs no division
  auto out_of = [](int hh, int s, int lim) -> int {
    if (hh < 0) return -1;
    int o = hh;
    if (s != 1) {
      o = hh / s;
      if (o * s != hh) return -1;
    }
    return o < lim ? o : -1;
  };
  if (tap_step == 1) {
    for (int ky = 0; ky < w.kh; ++ky) {
      const int hh = ih + w.ph - ky * w.dh;
      if (hh < 0) break;  // decreasing in ky
      const int oh = out_of(hh, w.sh, Ho);
      if (oh < 0) continue;
      for (int kx = 0; kx < w.kw; ++kx) {
        const int ww = iw + w.pw - kx * w.dw;
        if (ww < 0) break;
        const int ow = out_of(ww, w.sw, Wo);
        if (ow < 0) continue;
        acc += r[CL ? ((b * Ho + oh) * Wo + ow) * G + g : ((b * G + g) * Ho + oh) * Wo + ow];
      }
    }
  } else {
    // taps tap0, tap0 + tap_step, ... in row-major (ky, kx) order, stepped without division
    int ky = tap0 / w.kw;
    int kx = tap0 - ky * w.kw;
    const int dky = tap_step / w.kw;
    const int dkx = tap_step - dky * w.kw;
    while (ky < w.kh) {
      const int oh = out_of(ih + w.ph - ky * w.dh, w.sh, Ho);
      const int ow = out_of(iw + w.pw - kx * w.dw, w.sw, Wo);
      if (oh >= 0 && ow >= 0) {
        acc += r[CL ? ((b * Ho + oh) * Wo + ow) * G + g : ((b * G + g) * Ho + oh) * Wo + ow];
      }
      ky += dky;
      kx += dkx;
      if (kx >= w.kw) {
        kx -= w.kw;
        ++ky;
      }
    }
  }
  return acc;
}

// sign(x) * t, stored; sign 0 gives exactly 0 (never 0 * inf). xv: x already in acc_t.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ scalar_t signed_share_acc(acc_t xv, acc_t t) {
  const acc_t sg = cuda_detail::sign_of(xv);
  return saturate_cast<scalar_t>(sg == acc_t(0) ? acc_t(0) : sg * t);
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ scalar_t signed_share(scalar_t xv, acc_t t) {
  return signed_share_acc<scalar_t, acc_t>(static_cast<acc_t>(xv), t);
}

// NCHW: block (TX, TY); row ty == 0 gathers t for TX positions into shared memory, then all
// rows write the group's channels (split over ty), coalesced along positions.
template <typename scalar_t, typename acc_t, typename index_t>
__global__ void gather_sign_nchw_kernel(const acc_t* __restrict__ r,
                                        const scalar_t* __restrict__ x,
                                        scalar_t* __restrict__ gx, index_t B, index_t N,
                                        index_t C, index_t G, index_t H, index_t W, index_t Ho,
                                        index_t Wo, Geom w) {
  __shared__ acc_t tsm[kThreads];
  const int TX = blockDim.x, TY = blockDim.y;
  const int tx = threadIdx.x, ty = threadIdx.y;
  const index_t cpg = C / G;
  const index_t P = H * W;
  const index_t tiles = (P + TX - 1) / TX;
  const index_t items = B * G * tiles;
  for (index_t it = blockIdx.x; it < items; it += gridDim.x) {
    const index_t tile = it % tiles;
    const index_t bg = it / tiles;
    const index_t g = bg % G;
    const index_t b = bg / G;
    const index_t p = tile * TX + tx;
    if (ty == 0 && p < P) {
      const int ih = static_cast<int>(p / W);
      tsm[tx] = gather_r<acc_t, index_t, false>(r, b, g, ih, static_cast<int>(p - ih * W), G,
                                                static_cast<int>(Ho), static_cast<int>(Wo), w, 0, 1);
    }
    __syncthreads();
    if (p < P) {
      const acc_t t = tsm[tx];
      const scalar_t* xp = x + ((b % N) * C + g * cpg) * P + p;
      scalar_t* gp = gx + (b * C + g * cpg) * P + p;
      for (index_t j = ty; j < cpg; j += TY) gp[j * P] = signed_share(xp[j * P], t);
    }
    __syncthreads();
  }
}

// channels_last: block (TX, TY); the TX lanes of an item (b, p, g) split the kh*kw taps, combine
// with shuffles, then write the group's channels (contiguous) lane-strided.
template <typename scalar_t, typename acc_t, typename index_t>
__global__ void gather_sign_cl_kernel(const acc_t* __restrict__ r, const scalar_t* __restrict__ x,
                                      scalar_t* __restrict__ gx, index_t B, index_t N, index_t C,
                                      index_t G, index_t H, index_t W, index_t Ho, index_t Wo,
                                      Geom w) {
  const int TX = blockDim.x, TY = blockDim.y;
  const int tx = threadIdx.x, ty = threadIdx.y;
  const index_t cpg = C / G;
  const index_t P = H * W;
  const index_t items = B * P * G;
  for (index_t base = static_cast<index_t>(blockIdx.x) * TY; base < items;
       base += static_cast<index_t>(gridDim.x) * TY) {  // block-uniform loop
    const index_t item = base + ty;
    const bool valid = item < items;
    index_t g = 0, bp = 0, b = 0, p = 0;
    acc_t t = acc_t(0);
    if (valid) {
      g = item % G;
      bp = item / G;
      b = bp / P;
      p = bp - b * P;
      const int ih = static_cast<int>(p / W);
      t = gather_r<acc_t, index_t, true>(r, b, g, ih, static_cast<int>(p - ih * W), G,
                                         static_cast<int>(Ho), static_cast<int>(Wo), w, tx, TX);
    }
    t = cuda_detail::lane_group_allreduce(t, TX);
    if (valid) {
      const scalar_t* xp = x + ((b % N) * P + p) * C + g * cpg;
      scalar_t* gp = gx + bp * C + g * cpg;
      for (index_t j = tx; j < cpg; j += TX) gp[j] = signed_share(xp[j], t);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// 4. One input channel per group (depthwise: groups == C, any channel multiplier K / C): the
//    whole rule in one kernel, reading x, y and grad once and writing gx once. No global
//    intermediates (the general path above moves s, a and r through fp32 buffers in 4 launches).
//
// A block owns a TH x TW tile of input positions of CC channels of one activation sample n
// (NCHW: CC = 1, threads along positions; channels_last: CC lanes along channels, threads
// along positions above them; shared arrays are [position][CC], lane fastest, so global and
// shared accesses are coalesced / conflict-free in both layouts). It
//   a. loads x over the tile and every input the windows of the tile's outputs read (the
//      "x region", zeros where it lies in the padding) into shared memory, as acc_t;
//   b. for the outputs whose window reaches into the tile (the "output region"):
//      den[o] = (box sum of |x| over o's window) + eps     (same tap order as ratio_kernel);
//   c. for each gradient sample b = t * N + n (T targets share a, b):
//      r[o] = (sum_{k of the group} grad[b,k,o] * f(y[n,k,o])) / den[o]   (f: y, or the BN
//      and activation factor of conv2d_bn_backward), then for each tile input
//      gx[b,c,i] = sign(x[n,c,i]) * (transposed box sum of r at i)   (gather_r's tap order).
// The arithmetic is that of the general path step for step (products, sums in the same
// order, one final saturating cast), so both give the same values.
//
// Region bounds along one axis, for tile inputs [i0, i0 + L): the outputs o whose window
// [o*s - p, o*s - p + (k-1)*d] meets the tile are lo = max(0, ceil((i0 + p - (k-1)*d) / s))
// .. hi = min(O - 1, (i0 + L - 1 + p) / s), every output a tile input's gather can name lies
// there; their windows and the tile lie in [i0 - (k-1)*d, i0 + L - 1 + (k-1)*d].
struct DwTile {
  int th, tw;        // tile of input positions
  int cc;            // channels per block (power of two; 1 for NCHW)
  int cc_log2;
  int xr_cap;        // positions of the largest x region (shared layout)
  int or_cap;        // positions of the largest output region
};

struct AxisRange {
  int out_lo, out_n;  // output region (out_n may be 0)
  int x_lo, x_n;      // x region
};

__device__ __forceinline__ AxisRange dw_axis(int i0, int len, int k, int s, int p, int d,
                                             int O) {
  AxisRange r;
  const int span = (k - 1) * d;
  const int num = i0 + p - span;
  const int lo = num <= 0 ? 0 : (num + s - 1) / s;
  const int hi = min(O - 1, (i0 + len - 1 + p) / s);
  r.out_lo = lo;
  r.out_n = hi >= lo ? hi - lo + 1 : 0;
  int x0 = i0, x1 = i0 + len - 1;
  if (r.out_n > 0) {
    x0 = min(x0, lo * s - p);
    x1 = max(x1, hi * s - p + span);
  }
  r.x_lo = x0;
  r.x_n = x1 - x0 + 1;
  return r;
}

template <typename scalar_t, typename acc_t, bool CL>
__global__ void depthwise_rule_kernel(const scalar_t* __restrict__ grad,
                                      const scalar_t* __restrict__ x,
                                      const scalar_t* __restrict__ y, scalar_t* __restrict__ gx,
                                      int64_t T, int64_t N, int64_t C, int64_t KPG, int H, int W,
                                      int Ho, int Wo, Geom w, DwTile tile, BnFold<acc_t> bn,
                                      acc_t eps) {
  extern __shared__ __align__(16) unsigned char dw_smem[];
  acc_t* xs = reinterpret_cast<acc_t*>(dw_smem);                // [xr_cap][cc]
  acc_t* den = xs + static_cast<int64_t>(tile.xr_cap) * tile.cc;  // [or_cap][cc]
  acc_t* rs = den + static_cast<int64_t>(tile.or_cap) * tile.cc;  // [or_cap][cc]
  const int nthreads = blockDim.x;
  const int cc = tile.cc, lg = tile.cc_log2;
  const int64_t K = C * KPG;
  const int64_t chunks = (C + cc - 1) / cc;
  const int tiles_h = (H + tile.th - 1) / tile.th;
  const int tiles_w = (W + tile.tw - 1) / tile.tw;
  const int64_t spatial_tiles = static_cast<int64_t>(tiles_h) * tiles_w;
  const int64_t items = N * chunks * spatial_tiles;
  const int64_t HW = static_cast<int64_t>(H) * W, HoWo = static_cast<int64_t>(Ho) * Wo;
  for (int64_t it = blockIdx.x; it < items; it += gridDim.x) {  // block-uniform loop
    const int64_t st = it % spatial_tiles;
    const int64_t nc = it / spatial_tiles;
    const int64_t chunk = nc % chunks;
    const int64_t n = nc / chunks;
    const int ih0 = static_cast<int>(st / tiles_w) * tile.th;
    const int iw0 = static_cast<int>(st % tiles_w) * tile.tw;
    const int th = min(tile.th, H - ih0), tw = min(tile.tw, W - iw0);
    const AxisRange rh = dw_axis(ih0, th, w.kh, w.sh, w.ph, w.dh, Ho);
    const AxisRange rw = dw_axis(iw0, tw, w.kw, w.sw, w.pw, w.dw, Wo);
    const int64_t c0 = chunk * cc;
    // channel c = c0 + lane of sample n: NCHW plane base / channels_last pixel stride
    auto x_at = [&](int64_t s, int64_t c, int ih, int iw) -> int64_t {
      return CL ? ((s * H + ih) * static_cast<int64_t>(W) + iw) * C + c
                : (s * C + c) * HW + static_cast<int64_t>(ih) * W + iw;
    };
    auto o_at = [&](int64_t s, int64_t k, int oh, int ow) -> int64_t {
      return CL ? ((s * Ho + oh) * static_cast<int64_t>(Wo) + ow) * K + k
                : (s * K + k) * HoWo + static_cast<int64_t>(oh) * Wo + ow;
    };

    // a. x region -> shared (zeros in the padding and past the last channel)
    const int xr = rh.x_n * rw.x_n;
    for (int e = threadIdx.x; e < (xr << lg); e += nthreads) {
      const int lane = e & (cc - 1);
      const int pos = e >> lg;
      const int ih = rh.x_lo + pos / rw.x_n;
      const int iw = rw.x_lo + pos % rw.x_n;
      const int64_t c = c0 + lane;
      acc_t v = acc_t(0);
      if (c < C && ih >= 0 && ih < H && iw >= 0 && iw < W) {
        v = static_cast<acc_t>(x[x_at(n, c, ih, iw)]);
      }
      xs[e] = v;
    }
    __syncthreads();

    // b. den = box sum of |x| over each output's window + eps
    const int orn = rh.out_n * rw.out_n;
    for (int e = threadIdx.x; e < (orn << lg); e += nthreads) {
      const int lane = e & (cc - 1);
      const int pos = e >> lg;
      const int oh = rh.out_lo + pos / rw.out_n;
      const int ow = rw.out_lo + pos % rw.out_n;
      const int h0 = oh * w.sh - w.ph - rh.x_lo;  // window start in region coordinates
      const int w0 = ow * w.sw - w.pw - rw.x_lo;
      acc_t d = acc_t(0);
      for (int ky = 0; ky < w.kh; ++ky) {
        const acc_t* row = xs + (static_cast<int64_t>(h0 + ky * w.dh) * rw.x_n + w0) * cc + lane;
        for (int kx = 0; kx < w.kw; ++kx) {
          const acc_t v = row[static_cast<int64_t>(kx) * w.dw * cc];
          d += v < acc_t(0) ? -v : v;  // padding holds 0: adds exactly nothing
        }
      }
      den[e] = d + eps;
    }
    __syncthreads();

    for (int64_t t = 0; t < T; ++t) {
      const int64_t b = t * N + n;
      // c. r over the output region
      for (int e = threadIdx.x; e < (orn << lg); e += nthreads) {
        const int lane = e & (cc - 1);
        const int pos = e >> lg;
        const int64_t c = c0 + lane;
        acc_t s = acc_t(0);
        if (c < C) {
          const int oh = rh.out_lo + pos / rw.out_n;
          const int ow = rw.out_lo + pos % rw.out_n;
          for (int64_t j = 0; j < KPG; ++j) {
            const int64_t k = c * KPG + j;
            const acc_t gv = static_cast<acc_t>(grad[o_at(b, k, oh, ow)]);
            const acc_t yv = static_cast<acc_t>(y[o_at(n, k, oh, ow)]);
            s += bn.scale == nullptr
                     ? gv * yv
                     : gv * bn_act_factor<scalar_t>(yv, bn.scale[k], bn.shift[k], bn.div_eps, bn.act);
          }
        }
        rs[e] = s / den[e];
      }
      __syncthreads();
      // gather the r of the outputs covering each tile input, times sign(x)
      for (int e = threadIdx.x; e < ((th * tw) << lg); e += nthreads) {
        const int lane = e & (cc - 1);
        const int pos = e >> lg;
        const int64_t c = c0 + lane;
        if (c >= C) continue;
        const int ih = ih0 + pos / tw;
        const int iw = iw0 + pos % tw;
        acc_t acc = acc_t(0);
        for (int ky = 0; ky < w.kh; ++ky) {
          const int hh = ih + w.ph - ky * w.dh;
          if (hh < 0) break;  // decreasing in ky
          int oh = hh;
          if (w.sh != 1) {
            oh = hh / w.sh;
            if (oh * w.sh != hh) continue;
          }
          if (oh >= Ho) continue;
          const acc_t* rrow = rs + static_cast<int64_t>(oh - rh.out_lo) * rw.out_n * cc + lane;
          for (int kx = 0; kx < w.kw; ++kx) {
            const int ww = iw + w.pw - kx * w.dw;
            if (ww < 0) break;
            int ow = ww;
            if (w.sw != 1) {
              ow = ww / w.sw;
              if (ow * w.sw != ww) continue;
            }
            if (ow >= Wo) continue;
            acc += rrow[static_cast<int64_t>(ow - rw.out_lo) * cc];
          }
        }
        const acc_t xv =
            xs[((static_cast<int64_t>(ih - rh.x_lo) * rw.x_n + (iw - rw.x_lo)) << lg) + lane];
        gx[x_at(b, c, ih, iw)] = signed_share_acc<scalar_t, acc_t>(xv, acc);
      }
      __syncthreads();  // rs is rewritten for the next target
    }
  }
}

// ---------------------------------------------------------------------------------------------
// 0. The BN of a fused block as per-channel scale / shift (one tiny launch, no ATen ops).
template <typename acc_t>
__global__ void bn_scale_shift_kernel(const acc_t* __restrict__ rm, const acc_t* __restrict__ rv,
                                      const acc_t* __restrict__ w, const acc_t* __restrict__ b,
                                      acc_t eps, int64_t K, acc_t* __restrict__ scale,
                                      acc_t* __restrict__ shift) {
  const int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k < K) bn_scale_shift_at<acc_t>(rm, rv, w, b, eps, k, scale[k], shift[k]);
}

// ---------------------------------------------------------------------------------------------
// Launchers

// Rows (blockDim.y) splitting an NCHW channel loop of `cpg` channels over P positions: more
// rows when positions are few (keeps the GPU busy on 7x7 maps with 2048 channels).
inline dim3 nchw_block(int64_t cpg, int64_t P) {
  const int cap = P >= 4096 ? 8 : (P >= 256 ? 16 : 32);
  const int ty = cuda_detail::pow2_at_least(cpg, cap);
  return dim3(kThreads / ty, ty);
}

inline dim3 cl_block(int64_t lanes_wanted) {
  const int tx = cuda_detail::pow2_at_least(lanes_wanted, 32);
  return dim3(tx, kThreads / tx);
}

template <typename scalar_t, typename acc_t, typename index_t, bool PROD>
void launch_group_reduce(bool cl, const scalar_t* a, const scalar_t* m, acc_t* out, int64_t Bo,
                         int64_t Nm, int64_t Cch, int64_t G, int64_t P, const BnFold<acc_t>& bn,
                         cudaStream_t stream) {
  const int64_t cpg = Cch / G;
  if (cl) {
    const dim3 block = cl_block(cpg);
    const unsigned int grid = cuda_detail::grid_for(Bo * P * G, block.y);
    group_reduce_cl_kernel<scalar_t, acc_t, index_t, PROD>
        <<<grid, block, 0, stream>>>(a, m, out, Bo, Nm, Cch, G, P, bn);
  } else {
    const dim3 block = nchw_block(cpg, P);
    const unsigned int grid = cuda_detail::grid_for(Bo * G * ((P + block.x - 1) / block.x), 1);
    group_reduce_nchw_kernel<scalar_t, acc_t, index_t, PROD>
        <<<grid, block, 0, stream>>>(a, m, out, Bo, Nm, Cch, G, P, bn);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Tile for depthwise_rule_kernel: false when no tile keeps the shared arrays under 48 KiB (no
// opt-in needed) with an x region at most 8x the tile (huge dilations: the general path is
// better there).
inline bool pick_depthwise_tile(bool cl, int64_t C, int H, int W, int Ho, int Wo, const Geom& g,
                                int64_t acc_bytes, DwTile& tile) {
  constexpr int64_t kSmemBytes = 48 * 1024;
  int cc = cl ? cuda_detail::pow2_at_least(C, 32) : 1;
  int th, tw;
  if (cl) {
    th = 8;
    tw = 8;
  } else {  // 256 positions, rows of up to 32 (coalesced along W)
    tw = cuda_detail::pow2_at_least(W, 32);
    tw = std::max(tw, 8);
    th = kThreads / tw;
  }
  const int64_t span_h = int64_t{g.kh - 1} * g.dh, span_w = int64_t{g.kw - 1} * g.dw;
  while (true) {
    const int64_t eh = std::min<int64_t>(th, H), ew = std::min<int64_t>(tw, W);
    const int64_t xr = std::min<int64_t>(eh + 2 * span_h, H + 2 * int64_t{g.ph}) *
                       std::min<int64_t>(ew + 2 * span_w, W + 2 * int64_t{g.pw});
    const int64_t orr = std::min<int64_t>((eh - 1 + span_h) / g.sh + 1, Ho) *
                        std::min<int64_t>((ew - 1 + span_w) / g.sw + 1, Wo);
    const int64_t bytes = (xr + 2 * orr) * cc * acc_bytes;
    if (bytes <= kSmemBytes && xr <= 8 * eh * ew) {
      tile.th = static_cast<int>(eh);
      tile.tw = static_cast<int>(ew);
      tile.cc = cc;
      tile.cc_log2 = 0;
      while ((1 << tile.cc_log2) < cc) ++tile.cc_log2;
      tile.xr_cap = static_cast<int>(xr);
      tile.or_cap = static_cast<int>(orr);
      return true;
    }
    if (bytes > kSmemBytes && th * tw > 16) {  // smaller tile
      if (th >= tw) {
        th /= 2;
      } else {
        tw /= 2;
      }
    } else if (bytes > kSmemBytes && cc > 1) {  // fewer channels per block
      cc /= 2;
    } else {
      return false;
    }
  }
}

// The whole rule in one launch when every group has one input channel; false (nothing
// launched) when no tile fits, and the caller runs the general path.
template <typename scalar_t>
bool try_depthwise_rule(bool cl, const at::Tensor& grad, const at::Tensor& x,
                        const at::Tensor& y, at::Tensor& gx, int64_t B, int64_t N, int64_t C,
                        int64_t K, int64_t H, int64_t W, int64_t Ho, int64_t Wo,
                        const Geom& geom, double eps, const at::Tensor& scale,
                        const at::Tensor& shift, int64_t act, cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  DwTile tile;
  if (!pick_depthwise_tile(cl, C, static_cast<int>(H), static_cast<int>(W),
                           static_cast<int>(Ho), static_cast<int>(Wo), geom, sizeof(acc_t),
                           tile)) {
    return false;
  }
  const BnFold<acc_t> fold{scale.defined() ? scale.const_data_ptr<acc_t>() : nullptr,
                           shift.defined() ? shift.const_data_ptr<acc_t>() : nullptr,
                           static_cast<acc_t>(eps), act};
  const int64_t chunks = (C + tile.cc - 1) / tile.cc;
  const int64_t tiles = ((H + tile.th - 1) / tile.th) * ((W + tile.tw - 1) / tile.tw);
  const int threads = std::max(64, cuda_detail::pow2_at_least(int64_t{tile.th} * tile.tw * tile.cc,
                                                              kThreads));
  const size_t smem = static_cast<size_t>(tile.xr_cap + 2 * tile.or_cap) * tile.cc * sizeof(acc_t);
  const unsigned int grid = cuda_detail::grid_for(N * chunks * tiles, 1);
  const scalar_t* g_ptr = grad.const_data_ptr<scalar_t>();
  const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
  const scalar_t* y_ptr = y.const_data_ptr<scalar_t>();
  scalar_t* gx_ptr = gx.mutable_data_ptr<scalar_t>();
  const int h = static_cast<int>(H), w = static_cast<int>(W);
  const int ho = static_cast<int>(Ho), wo = static_cast<int>(Wo);
  if (cl) {
    depthwise_rule_kernel<scalar_t, acc_t, true><<<grid, threads, smem, stream>>>(
        g_ptr, x_ptr, y_ptr, gx_ptr, B / N, N, C, K / C, h, w, ho, wo, geom, tile, fold,
        static_cast<acc_t>(eps));
  } else {
    depthwise_rule_kernel<scalar_t, acc_t, false><<<grid, threads, smem, stream>>>(
        g_ptr, x_ptr, y_ptr, gx_ptr, B / N, N, C, K / C, h, w, ho, wo, geom, tile, fold,
        static_cast<acc_t>(eps));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

// All launches of one call. index_t is int32_t when every flat index fits (the common case:
// 32-bit division is several times cheaper than 64-bit), else int64_t.
template <typename scalar_t, typename index_t>
void run_conv2d_backward(bool cl, const at::Tensor& grad, const at::Tensor& x,
                         const at::Tensor& y, at::Tensor& gx, int64_t B, int64_t N, int64_t C,
                         int64_t K, int64_t G, int64_t H, int64_t W, int64_t Ho, int64_t Wo,
                         const Geom& geom, double eps, const at::Tensor& scale,
                         const at::Tensor& shift, int64_t act, cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto acc_opts = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  at::Tensor s = at::empty({B * G * Ho * Wo}, acc_opts);  // becomes r
  at::Tensor a = at::empty({N * G * H * W}, acc_opts);
  acc_t* s_ptr = s.mutable_data_ptr<acc_t>();
  acc_t* a_ptr = a.mutable_data_ptr<acc_t>();
  const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();

  // scale / shift arrive as contiguous acc_t tensors (or undefined: the plain conv rule); the
  // BN rule divides by y + eps (the spec's eps; the module's eps went into scale only)
  const BnFold<acc_t> fold{scale.defined() ? scale.const_data_ptr<acc_t>() : nullptr,
                           shift.defined() ? shift.const_data_ptr<acc_t>() : nullptr,
                           static_cast<acc_t>(eps), act};
  const BnFold<acc_t> none{nullptr, nullptr, acc_t(0), kActNone};
  launch_group_reduce<scalar_t, acc_t, index_t, true>(cl, grad.const_data_ptr<scalar_t>(),
                                                      y.const_data_ptr<scalar_t>(), s_ptr, B, N,
                                                      K, G, Ho * Wo, fold, stream);
  launch_group_reduce<scalar_t, acc_t, index_t, false>(cl, x_ptr, nullptr, a_ptr, N, 1, C, G,
                                                       H * W, none, stream);
  {
    const unsigned int grid = cuda_detail::grid_for(B * G * Ho * Wo, kThreads);
    if (cl) {
      ratio_kernel<acc_t, index_t, true><<<grid, kThreads, 0, stream>>>(
          s_ptr, a_ptr, B, N, G, H, W, Ho, Wo, geom, static_cast<acc_t>(eps));
    } else {
      ratio_kernel<acc_t, index_t, false><<<grid, kThreads, 0, stream>>>(
          s_ptr, a_ptr, B, N, G, H, W, Ho, Wo, geom, static_cast<acc_t>(eps));
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  scalar_t* gx_ptr = gx.mutable_data_ptr<scalar_t>();
  const int64_t cpg = C / G;
  if (cl) {
    const int64_t taps = int64_t{geom.kh} * geom.kw;
    const dim3 block = cl_block(std::max<int64_t>(cpg, std::min<int64_t>(taps, 4)));
    const unsigned int grid = cuda_detail::grid_for(B * H * W * G, block.y);
    gather_sign_cl_kernel<scalar_t, acc_t, index_t><<<grid, block, 0, stream>>>(
        s_ptr, x_ptr, gx_ptr, B, N, C, G, H, W, Ho, Wo, geom);
  } else {
    const dim3 block = nchw_block(cpg, H * W);
    const unsigned int grid = cuda_detail::grid_for(B * G * ((H * W + block.x - 1) / block.x), 1);
    gather_sign_nchw_kernel<scalar_t, acc_t, index_t><<<grid, block, 0, stream>>>(
        s_ptr, x_ptr, gx_ptr, B, N, C, G, H, W, Ho, Wo, geom);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Shared by conv2d_backward and conv2d_bn_backward (bn given: BN + activation folded in).
at::Tensor conv_rule_cuda(const char* op, const at::Tensor& grad_in, const at::Tensor& x_in,
                          const at::Tensor& y_in, at::IntArrayRef kernel_size,
                          at::IntArrayRef stride, at::IntArrayRef padding,
                          at::IntArrayRef dilation, int64_t groups, double eps,
                          const BnArgs* bn) {
  cuda_detail::check_cuda(op, "x", x_in);
  const ConvShapes sz = check_conv2d_backward_args(op, grad_in, x_in, y_in, kernel_size, stride,
                                                   padding, dilation, groups, bn);
  const Window2d& win = sz.win;
  const int64_t B = sz.B, N = sz.N, C = sz.C, H = sz.H, W = sz.W, K = sz.K, Ho = sz.Ho, Wo = sz.Wo;
  const double bn_eps = bn != nullptr ? bn->bn_eps : 0.0;  // inside scale (the BN's forward)
  const int64_t act = bn != nullptr ? bn->act : kActNone;
  const int64_t G = groups;

  c10::cuda::OptionalCUDAGuard device_guard(x_in.device());
  const at::MemoryFormat mf = pick_memory_format(x_in);
  const bool cl = mf == at::MemoryFormat::ChannelsLast;
  at::Tensor gx = at::empty({B, C, H, W}, x_in.options().memory_format(mf));
  if (gx.numel() == 0) return gx;
  if (K == 0) return gx.zero_();  // no outputs: nothing to share

  const at::Tensor x = x_in.contiguous(mf);
  const at::Tensor y = y_in.contiguous(mf);
  const at::Tensor grad = grad_in.contiguous(mf);
  constexpr int64_t kIntMax = std::numeric_limits<int32_t>::max() / 2;
  TORCH_CHECK(H + 2 * win.ph < kIntMax && W + 2 * win.pw < kIntMax &&
                  win.kh * win.dh < kIntMax && win.kw * win.dw < kIntMax && win.sh < kIntMax &&
                  win.sw < kIntMax, op, ": spatial sizes and window must fit in 32 bits");
  const Geom geom{static_cast<int>(win.kh), static_cast<int>(win.kw), static_cast<int>(win.sh),
                  static_cast<int>(win.sw), static_cast<int>(win.ph), static_cast<int>(win.pw),
                  static_cast<int>(win.dh), static_cast<int>(win.dw)};
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  // Flat indices (and a grid-stride step past them) must fit the index type.
  const int64_t biggest = std::max({gx.numel(), grad.numel(), y.numel(), B * G * Ho * Wo});
  const bool use32 = biggest < kIntMax;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "tsgb_conv2d_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
    at::Tensor sc, sh;
    if (bn != nullptr) {  // scale / shift from the BN parameters (no-op casts in the usual case)
      const int64_t Kc = y.size(1);
      auto prep = [&](const at::Tensor& t) { return t.to(acc_type).contiguous(); };
      const at::Tensor rm = prep(bn->running_mean), rv = prep(bn->running_var);
      const bool has_w = bn->weight.has_value() && bn->weight->defined();
      const bool has_b = bn->bias.has_value() && bn->bias->defined();
      const at::Tensor w = has_w ? prep(*bn->weight) : at::Tensor();
      const at::Tensor b = has_b ? prep(*bn->bias) : at::Tensor();
      at::Tensor both = at::empty({2 * Kc}, x.options().dtype(acc_type));
      sc = both.narrow(0, 0, Kc);
      sh = both.narrow(0, Kc, Kc);
      const unsigned int blocks = static_cast<unsigned int>((Kc + kThreads - 1) / kThreads);
      bn_scale_shift_kernel<acc_t><<<blocks, kThreads, 0, stream>>>(
          rm.const_data_ptr<acc_t>(), rv.const_data_ptr<acc_t>(),
          has_w ? w.const_data_ptr<acc_t>() : nullptr, has_b ? b.const_data_ptr<acc_t>() : nullptr,
          static_cast<acc_t>(bn_eps), Kc, sc.mutable_data_ptr<acc_t>(),
          sh.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (C == G && try_depthwise_rule<scalar_t>(cl, grad, x, y, gx, B, N, C, K, H, W, Ho, Wo,
                                               geom, eps, sc, sh, act, stream)) {
      return;  // one input channel per group: the one-kernel path
    }
    if (use32) {
      run_conv2d_backward<scalar_t, int32_t>(cl, grad, x, y, gx, B, N, C, K, G, H, W, Ho, Wo,
                                             geom, eps, sc, sh, act, stream);
    } else {
      run_conv2d_backward<scalar_t, int64_t>(cl, grad, x, y, gx, B, N, C, K, G, H, W, Ho, Wo,
                                             geom, eps, sc, sh, act, stream);
    }
  });
  return gx;
}

at::Tensor conv2d_backward_cuda(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& y,
                                at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                at::IntArrayRef padding, at::IntArrayRef dilation,
                                int64_t groups, double eps) {
  return conv_rule_cuda("tsgb_ext.conv2d_backward", grad, x, y, kernel_size, stride, padding,
                        dilation, groups, eps, nullptr);
}

at::Tensor conv2d_bn_backward_cuda(const at::Tensor& grad, const at::Tensor& x,
                                   const at::Tensor& y, const at::Tensor& running_mean,
                                   const at::Tensor& running_var,
                                   const std::optional<at::Tensor>& bn_weight,
                                   const std::optional<at::Tensor>& bn_bias, double bn_eps,
                                   int64_t act, at::IntArrayRef kernel_size,
                                   at::IntArrayRef stride, at::IntArrayRef padding,
                                   at::IntArrayRef dilation, int64_t groups, double eps) {
  const BnArgs bn{running_mean, running_var, bn_weight, bn_bias, bn_eps, act};
  return conv_rule_cuda("tsgb_ext.conv2d_bn_backward", grad, x, y, kernel_size, stride,
                        padding, dilation, groups, eps, &bn);
}

}  // namespace
}  // namespace tsgb

TORCH_LIBRARY_IMPL(tsgb_ext, CUDA, m) {
  m.impl("conv2d_backward", &tsgb::conv2d_backward_cuda);
  m.impl("conv2d_bn_backward", &tsgb::conv2d_bn_backward_cuda);
}
