// TSGB-Conv backward, CPU (see ../../shared/TSGB_SPEC.md, csrc/ops.cpp for the schema).
//
// Group-aware rule, per group gi of G (C/G input channels, K/G output channels):
//   a[n,gi,i] = sum_{c in gi} |x[n,c,i]|
//   d[n,gi,o] = box sum of a over o's window (conv geometry, dilation; padding contributes 0)
//   r[b,gi,o] = (sum_{k in gi} grad[b,k,o] * y[b%N,k,o]) / (d[b%N,gi,o] + eps)
//   t[b,gi,i] = sum over o whose window contains i of r[b,gi,o]   (gather, no atomics)
//   gx[b,c,i] = sign(x[b%N,c,i]) * t[b,gi(c),i]
// Only G-channel intermediates are materialised (a, d, r, t; a is skipped when C/G == 1 and r
// reuses d's buffer when B == N; for channels_last t lives in a per-task row buffer).
// Activation traffic: x read twice, grad and y once, gx written once. The NCHW passes walk
// (plane, chunk of kChunk contiguous pixels) tasks, so inner loops stay long and vectorisable
// also on the 7x7 planes of late layers.
//
// conv2d_bn_backward (a conv -> BN -> ReLU/ReLU6 block, csrc/ops.cpp) is the same kernel with
// the products g * y of step 3 replaced by g * bn_act_factor(y) (common/tsgb_common.h): the BN
// rule and the activation's gradient fold into the channel reduction, no extra pass.
//
// Intermediates use the layout [P][rows][cols][Ci] with Ci innermost: for NCHW activations
// Ci = 1 and P = batch*G (one plane per group), for channels_last Ci = G and P = batch, so the
// box sums run on contiguous spans in both cases.
#pragma once
// Included once per instruction set by conv2d_backward.cpp (baseline), isa_avx2.cpp and
// isa_avx512.cpp; every definition here has internal linkage (anonymous
// namespace), so each translation unit keeps its own copy. The includer defines
// TSGB_ISA_SUFFIX, which names the one external entry point (below).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common/checks.h"
#include "common/tsgb_common.h"
#include "cpu/cpu_isa.h"


namespace tsgb {
namespace {

constexpr int64_t kGrainElems = 16384;  // minimum elements of work per parallel task
constexpr int64_t kChunk = 2048;        // contiguous pixels per task in the NCHW passes

inline int64_t grain_for(int64_t elems_per_item) {
  return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, elems_per_item));
}

template <typename acc_t>
inline acc_t sign_of(acc_t v) {
  return static_cast<acc_t>(v > acc_t(0)) - static_cast<acc_t>(v < acc_t(0));
}

template <typename acc_t>
inline void add_span(acc_t* __restrict__ dst, const acc_t* __restrict__ src, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] += src[j];
}

// dst += |src| (src is either the non-negative a, or x itself when a group has one channel).
template <typename acc_t, typename src_t>
inline void add_abs_span(acc_t* __restrict__ dst, const src_t* __restrict__ src, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] += std::abs(static_cast<acc_t>(src[j]));
}

// s += g * bn_act_factor(y) over a span of one channel (scale/shift of that channel).
template <int64_t ACT, typename acc_t, typename scalar_t>
inline void add_folded_span(acc_t* __restrict__ s, const scalar_t* __restrict__ g,
                            const scalar_t* __restrict__ y, int64_t n, acc_t sc, acc_t sh,
                            acc_t be) {
  for (int64_t j = 0; j < n; ++j) {
    s[j] += static_cast<acc_t>(g[j]) *
            bn_act_factor_t<ACT, scalar_t>(static_cast<acc_t>(y[j]), sc, sh, be);
  }
}

// d[p,oh,ow,:] = sum over taps (kh,kw) of |a[p, oh*sh-ph+kh*dh, ow*sw-pw+kw*dw, :] (in range).
template <typename acc_t, typename src_t>
void box_sum_forward(const src_t* a, acc_t* d, int64_t P, int64_t H, int64_t W, int64_t Ci,
                     int64_t Ho, int64_t Wo, const Window2d& win) {
  at::parallel_for(0, P * Ho, grain_for(Wo * Ci * win.kh * win.kw), [&](int64_t begin, int64_t end) {
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t p = idx / Ho, oh = idx % Ho;
      acc_t* drow = d + idx * Wo * Ci;
      std::fill(drow, drow + Wo * Ci, acc_t(0));
      for (int64_t kh = 0; kh < win.kh; ++kh) {
        const int64_t ih = oh * win.sh - win.ph + kh * win.dh;
        if (ih < 0 || ih >= H) continue;
        const src_t* arow = a + (p * H + ih) * W * Ci;
        for (int64_t kw = 0; kw < win.kw; ++kw) {
          const int64_t off = kw * win.dw - win.pw;  // iw = ow*sw + off
          const int64_t lo = off >= 0 ? 0 : ceil_div_nonneg(-off, win.sw);
          const int64_t last = W - 1 - off;
          if (last < 0) continue;
          const int64_t hi = std::min(Wo, last / win.sw + 1);
          if (lo >= hi) continue;
          if (win.sw == 1) {
            add_abs_span(drow + lo * Ci, arow + (lo + off) * Ci, (hi - lo) * Ci);
          } else if (Ci == 1) {  // strided reads, one channel: a plain loop
            const src_t* ap = arow + lo * win.sw + off;
            for (int64_t ow = lo; ow < hi; ++ow, ap += win.sw) {
              drow[ow] += std::abs(static_cast<acc_t>(*ap));
            }
          } else {
            for (int64_t ow = lo; ow < hi; ++ow) {
              add_abs_span(drow + ow * Ci, arow + (ow * win.sw + off) * Ci, Ci);
            }
          }
        }
      }
    }
  });
}

// trow[w,:] = sum over taps of r_plane[oh, ow, :] with oh = (h+ph-kh*dh)/sh and
// ow = (w+pw-kw*dw)/sw when divisible and in range (the transposed box sum, gather form).
template <typename acc_t>
inline void box_sum_transposed_row(const acc_t* r_plane, acc_t* trow, int64_t h, int64_t W,
                                   int64_t Ci, int64_t Ho, int64_t Wo, const Window2d& win) {
  std::fill(trow, trow + W * Ci, acc_t(0));
  for (int64_t kh = 0; kh < win.kh; ++kh) {
    const int64_t num = h + win.ph - kh * win.dh;
    if (num < 0 || num % win.sh != 0) continue;
    const int64_t oh = num / win.sh;
    if (oh >= Ho) continue;
    const acc_t* rrow = r_plane + oh * Wo * Ci;
    for (int64_t kw = 0; kw < win.kw; ++kw) {
      const int64_t off = win.pw - kw * win.dw;  // ow = (w + off) / sw
      int64_t lo = std::max<int64_t>(0, -off);
      if (win.sw == 1) {
        const int64_t hi = std::min(W, Wo - off);
        if (lo < hi) add_span(trow + lo * Ci, rrow + (lo + off) * Ci, (hi - lo) * Ci);
      } else {
        const int64_t rem = (lo + off) % win.sw;
        if (rem != 0) lo += win.sw - rem;
        const int64_t hi = std::min(W, Wo * win.sw - off);
        if (lo >= hi) continue;
        const acc_t* rp = rrow + ((lo + off) / win.sw) * Ci;  // then one output per stride
        if (Ci == 1) {
          for (int64_t w = lo; w < hi; w += win.sw) trow[w] += *rp++;
        } else {
          for (int64_t w = lo; w < hi; w += win.sw, rp += Ci) add_span(trow + w * Ci, rp, Ci);
        }
      }
    }
  }
}

// bn: nullptr for the plain conv rule (products g * y); else the BN + activation folded in
// (products g * bn_act_factor(y, ...), conv2d_bn_backward).
template <typename scalar_t>
void conv2d_backward_kernel(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& y,
                            at::Tensor& gx, const Window2d& win, int64_t G, double eps_d,
                            bool channels_last,
                            const BnFold<at::opmath_type<scalar_t>>* bn) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = grad.size(0), N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t K = y.size(1), Ho = y.size(2), Wo = y.size(3);
  const int64_t Cg = C / G, Kg = K / G;
  const acc_t eps = static_cast<acc_t>(eps_d);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* yp = y.const_data_ptr<scalar_t>();
  const scalar_t* gp = grad.const_data_ptr<scalar_t>();
  scalar_t* gxp = gx.mutable_data_ptr<scalar_t>();

  const auto acc_opts = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value)
                            .memory_format(at::MemoryFormat::Contiguous);
  // Layout of intermediates: [P][rows][cols][Ci].
  const int64_t Ci = channels_last ? G : 1;
  const int64_t Pn = channels_last ? N : N * G;  // activation-level planes
  const int64_t Pb = channels_last ? B : B * G;  // gradient-level planes
  // With one input channel per group, a = |x|: the box sums read x directly and a is never
  // formed. With one target (B == N), r overwrites d in place (same index, read before write).
  const bool a_is_x = Cg == 1;
  at::Tensor a_t = a_is_x ? at::Tensor() : at::empty({Pn * H * W * Ci}, acc_opts);
  at::Tensor d_t = at::empty({Pn * Ho * Wo * Ci}, acc_opts);
  at::Tensor r_t = B == N ? d_t : at::empty({Pb * Ho * Wo * Ci}, acc_opts);
  acc_t* a = a_is_x ? nullptr : a_t.mutable_data_ptr<acc_t>();
  acc_t* d = d_t.mutable_data_ptr<acc_t>();
  acc_t* r = r_t.mutable_data_ptr<acc_t>();
  const int64_t HW = H * W, HoWo = Ho * Wo;

  // 1. a = group sums of |x| (first read of x).
  if (a_is_x) {
    // nothing to do: a = |x|
  } else if (!channels_last) {
    // (n, g) planes in chunks of contiguous pixels: long, vectorisable inner loops also for
    // the small late-layer planes (7x7), channels streamed one after another.
    const int64_t chunks = ceil_div_nonneg(HW, kChunk);
    at::parallel_for(0, N * G * chunks, grain_for(kChunk * Cg), [&](int64_t begin, int64_t end) {
      for (int64_t idx = begin; idx < end; ++idx) {
        const int64_t ng = idx / chunks, i0 = (idx % chunks) * kChunk;
        const int64_t len = std::min(kChunk, HW - i0);
        acc_t* aseg = a + ng * HW + i0;
        std::fill(aseg, aseg + len, acc_t(0));
        const scalar_t* xseg = xp + ng * Cg * HW + i0;  // channel n*C + g*Cg
        for (int64_t c = 0; c < Cg; ++c, xseg += HW) add_abs_span(aseg, xseg, len);
      }
    });
  } else {
    at::parallel_for(0, N * HW, grain_for(C), [&](int64_t begin, int64_t end) {
      for (int64_t pix = begin; pix < end; ++pix) {
        const scalar_t* xpix = xp + pix * C;
        acc_t* apix = a + pix * G;
        for (int64_t g = 0; g < G; ++g) {
          acc_t s = 0;
          const scalar_t* xc = xpix + g * Cg;
          for (int64_t c = 0; c < Cg; ++c) s += std::abs(static_cast<acc_t>(xc[c]));
          apix[g] = s;
        }
      }
    });
  }

  // 2. d = box sums of a (activation level, shared by all T targets).
  if (a_is_x) {
    box_sum_forward<acc_t, scalar_t>(xp, d, Pn, H, W, Ci, Ho, Wo, win);
  } else {
    box_sum_forward<acc_t, acc_t>(a, d, Pn, H, W, Ci, Ho, Wo, win);
  }

  // 3. r = (group sums of grad*y) / (d + eps) (the only read of grad and y).
  if (!channels_last) {
    const int64_t chunks = ceil_div_nonneg(HoWo, kChunk);
    at::parallel_for(0, B * G * chunks, grain_for(kChunk * Kg), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> sbuf(kChunk);
      for (int64_t idx = begin; idx < end; ++idx) {
        const int64_t bg = idx / chunks, o0 = (idx % chunks) * kChunk;
        const int64_t len = std::min(kChunk, HoWo - o0);
        const int64_t b = bg / G, g = bg % G, n = b % N;
        acc_t* sseg = sbuf.data();
        std::fill(sseg, sseg + len, acc_t(0));
        const scalar_t* gseg = gp + (b * K + g * Kg) * HoWo + o0;
        const scalar_t* yseg = yp + (n * K + g * Kg) * HoWo + o0;
        for (int64_t k = 0; k < Kg; ++k, gseg += HoWo, yseg += HoWo) {
          if (bn == nullptr) {
            for (int64_t o = 0; o < len; ++o) {
              sseg[o] += static_cast<acc_t>(gseg[o]) * static_cast<acc_t>(yseg[o]);
            }
          } else {
            const int64_t kk = g * Kg + k;
            const acc_t sc = bn->scale[kk], sh = bn->shift[kk], be = bn->div_eps;
            if (bn->act == kActRelu) {
              add_folded_span<kActRelu>(sseg, gseg, yseg, len, sc, sh, be);
            } else if (bn->act == kActRelu6) {
              add_folded_span<kActRelu6>(sseg, gseg, yseg, len, sc, sh, be);
            } else {
              add_folded_span<kActNone>(sseg, gseg, yseg, len, sc, sh, be);
            }
          }
        }
        const acc_t* dseg = d + (n * G + g) * HoWo + o0;
        acc_t* rseg = r + bg * HoWo + o0;
        for (int64_t o = 0; o < len; ++o) rseg[o] = sseg[o] / (dseg[o] + eps);
      }
    });
  } else {
    at::parallel_for(0, B * HoWo, grain_for(K), [&](int64_t begin, int64_t end) {
      for (int64_t pix = begin; pix < end; ++pix) {
        const int64_t b = pix / HoWo, po = pix % HoWo, n = b % N;
        const scalar_t* gpix = gp + pix * K;
        const scalar_t* ypix = yp + (n * HoWo + po) * K;
        const acc_t* dpix = d + (n * HoWo + po) * G;
        acc_t* rpix = r + pix * G;
        // product of channel k with the BN + activation folded in: g * bn_act_factor(y)
        auto folded = [&](int64_t k) -> acc_t {
          return static_cast<acc_t>(gpix[k]) *
                 bn_act_factor<scalar_t>(static_cast<acc_t>(ypix[k]), bn->scale[k],
                                         bn->shift[k], bn->div_eps, bn->act);
        };
        if (Kg == 1 && bn == nullptr) {  // one output channel per group: a contiguous vector loop
          for (int64_t g = 0; g < G; ++g) {
            rpix[g] = static_cast<acc_t>(gpix[g]) * static_cast<acc_t>(ypix[g]) / (dpix[g] + eps);
          }
          continue;
        }
        for (int64_t g = 0; g < G; ++g) {
          acc_t s = 0;
          if (bn == nullptr) {
            const scalar_t* gk = gpix + g * Kg;
            const scalar_t* yk = ypix + g * Kg;
            for (int64_t k = 0; k < Kg; ++k) s += static_cast<acc_t>(gk[k]) * static_cast<acc_t>(yk[k]);
          } else {
            for (int64_t k = g * Kg; k < (g + 1) * Kg; ++k) s += folded(k);
          }
          rpix[g] = s / (dpix[g] + eps);
        }
      }
    });
  }

  // 4+5. t row by row (transposed box sum into a task-local buffer), then
  //      gx = sign(x) * t (second read of x, the only write of gx).
  if (!channels_last) {
    // t planes (B*G single-channel planes) first, then one chunked pass over x writing gx.
    at::Tensor t_t = at::empty({B * G * HW}, acc_opts);
    acc_t* t = t_t.mutable_data_ptr<acc_t>();
    at::parallel_for(0, B * G * H, grain_for(W * win.kh * win.kw), [&](int64_t begin, int64_t end) {
      for (int64_t idx = begin; idx < end; ++idx) {
        const int64_t bg = idx / H, h = idx % H;
        box_sum_transposed_row<acc_t>(r + bg * HoWo, t + idx * W, h, W, 1, Ho, Wo, win);
      }
    });
    const int64_t chunks = ceil_div_nonneg(HW, kChunk);
    at::parallel_for(0, B * G * chunks, grain_for(kChunk * Cg), [&](int64_t begin, int64_t end) {
      for (int64_t idx = begin; idx < end; ++idx) {
        const int64_t bg = idx / chunks, i0 = (idx % chunks) * kChunk;
        const int64_t len = std::min(kChunk, HW - i0);
        const int64_t b = bg / G, g = bg % G, n = b % N;
        const acc_t* tseg = t + bg * HW + i0;
        const scalar_t* xseg = xp + (n * C + g * Cg) * HW + i0;
        scalar_t* gxseg = gxp + (b * C + g * Cg) * HW + i0;
        for (int64_t c = 0; c < Cg; ++c, xseg += HW, gxseg += HW) {
          for (int64_t i = 0; i < len; ++i) {
            gxseg[i] = saturate_cast<scalar_t>(sign_of(static_cast<acc_t>(xseg[i])) * tseg[i]);
          }
        }
      }
    });
  } else {
    at::parallel_for(0, B * H, grain_for(W * (C + G * win.kh * win.kw)), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> tbuf(W * G);
      acc_t* trow = tbuf.data();
      for (int64_t idx = begin; idx < end; ++idx) {
        const int64_t b = idx / H, h = idx % H, n = b % N;
        box_sum_transposed_row<acc_t>(r + b * HoWo * G, trow, h, W, G, Ho, Wo, win);
        const scalar_t* xrow = xp + (n * H + h) * W * C;
        scalar_t* gxrow = gxp + idx * W * C;
        for (int64_t w = 0; w < W; ++w) {
          const scalar_t* xpix = xrow + w * C;
          scalar_t* gpix = gxrow + w * C;
          const acc_t* tpix = trow + w * G;
          if (G == 1) {
            const acc_t tv = tpix[0];
            for (int64_t c = 0; c < C; ++c) {
              gpix[c] = saturate_cast<scalar_t>(sign_of(static_cast<acc_t>(xpix[c])) * tv);
            }
          } else if (Cg == 1) {
            for (int64_t c = 0; c < C; ++c) {
              gpix[c] = saturate_cast<scalar_t>(sign_of(static_cast<acc_t>(xpix[c])) * tpix[c]);
            }
          } else {
            for (int64_t g = 0; g < G; ++g) {
              const acc_t tv = tpix[g];
              for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
                gpix[c] = saturate_cast<scalar_t>(sign_of(static_cast<acc_t>(xpix[c])) * tv);
              }
            }
          }
        }
      }
    });
  }
}

// Depthwise convs (one input channel per group, G = C): the G-channel intermediates are as large
// as x, and the box sums are depthwise convolutions with a ones kernel. Here they go through
// ATen's conv ops on |x| and on r (a G-channel ones kernel: not the layer's convolution, which
// is never recomputed). Used for depthwise layers with windows above 3x3 or planes below 56x56;
// the gather kernel above (strided loops without divisions) takes the large planes with 3x3
// windows. EfficientNet-Lite0, batch 8, 2 cores, one process, interleaved calls: all conv rules
// of a call 253 ms with this path for every depthwise layer, 198 ms with the gather kernel for
// all, 162 ms split as above; whole call 420 / 383 / 340 ms. Accumulation in float32 (float64
// for double).
//
// Around the two ones-kernel convs, everything elementwise is one hand-written pass each:
//   r  = g * f(y) / (d + eps)   (f: y, or the BN + activation folded in)  -- reads g, y, d
//   gx = sign(x) * t            (saturating for half types)               -- reads x, t
// (these were 10-15 ATen ops with as many passes and temporaries: compares, where, casts;
// EfficientNet-Lite0 batch 4: 44 ms of a 238 ms call in aten::gt/lt/where alone.)

// r[b, k, o] = g[b, k, o] * f(y[b % N, k, o]) / (d[b % N, k, o] + eps) (dp == nullptr: no
// division); all four share one layout (fmt) and shape per sample (K channels), so a sample's
// element e is the same (k, o) in each. k = (e / HoWo) % K for NCHW, e % K for channels_last.
template <typename scalar_t, typename acc_t>
void depthwise_ratio(const scalar_t* gp, const scalar_t* yp, const acc_t* dp, acc_t* rp,
                     int64_t B, int64_t N, int64_t K, int64_t HoWo, bool channels_last,
                     acc_t eps, const BnFold<acc_t>* bn) {
  const int64_t per = K * HoWo;
  auto factor = [bn](acc_t y, int64_t k) -> acc_t {
    return bn == nullptr ? y
                         : bn_act_factor<scalar_t>(y, bn->scale[k], bn->shift[k], bn->div_eps,
                                                   bn->act);
  };
  auto ratio = [dp, eps](acc_t v, const acc_t* d, int64_t i) -> acc_t {
    return dp == nullptr ? v : v / (d[i] + eps);
  };
  if (!channels_last) {
    at::parallel_for(0, B * K, grain_for(HoWo), [&](int64_t begin, int64_t end) {
      for (int64_t bk = begin; bk < end; ++bk) {
        const int64_t b = bk / K, k = bk % K, off = (b % N) * per + k * HoWo;
        const scalar_t* g = gp + bk * HoWo;
        const scalar_t* y = yp + off;
        const acc_t* d = dp == nullptr ? nullptr : dp + off;
        acc_t* r = rp + bk * HoWo;
        for (int64_t o = 0; o < HoWo; ++o) {
          r[o] = ratio(static_cast<acc_t>(g[o]) * factor(static_cast<acc_t>(y[o]), k), d, o);
        }
      }
    });
  } else {
    at::parallel_for(0, B * HoWo, grain_for(K), [&](int64_t begin, int64_t end) {
      for (int64_t pix = begin; pix < end; ++pix) {
        const int64_t b = pix / HoWo, off = ((b % N) * HoWo + pix % HoWo) * K;
        const scalar_t* g = gp + pix * K;
        const scalar_t* y = yp + off;
        const acc_t* d = dp == nullptr ? nullptr : dp + off;
        acc_t* r = rp + pix * K;
        for (int64_t k = 0; k < K; ++k) {
          r[k] = ratio(static_cast<acc_t>(g[k]) * factor(static_cast<acc_t>(y[k]), k), d, k);
        }
      }
    });
  }
}

at::Tensor depthwise_backward_aten(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& y,
                                   const Window2d& win, int64_t G, double eps,
                                   at::MemoryFormat fmt, const at::Tensor& scale,
                                   const at::Tensor& shift, int64_t act) {
  const int64_t B = grad.size(0), N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t K = y.size(1), Ho = y.size(2), Wo = y.size(3), Kg = K / G;
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  const at::Tensor ones = at::ones({G, 1, win.kh, win.kw}, x.options().dtype(acc));
  const std::vector<int64_t> st{win.sh, win.sw}, pd{win.ph, win.pw}, dl{win.dh, win.dw};
  // d = box sums of |x| (activation level, shared by all targets), (N, G, Ho, Wo)
  const at::Tensor d = at::conv2d(x.abs().to(acc), ones, {}, st, pd, dl, G).contiguous(fmt);
  // r at the gradient's batch; with a depth multiplier (Kg > 1) the K products are summed per
  // group first (ATen, rare: no model in the zoo has one)
  at::Tensor r;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "tsgb_dw_ratio", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const BnFold<acc_t> fold{scale.defined() ? scale.const_data_ptr<acc_t>() : nullptr,
                             shift.defined() ? shift.const_data_ptr<acc_t>() : nullptr,
                             static_cast<acc_t>(eps), act};
    const BnFold<acc_t>* bn = scale.defined() ? &fold : nullptr;
    if (Kg == 1) {
      r = at::empty({B, G, Ho, Wo}, d.options().memory_format(fmt));
      depthwise_ratio<scalar_t, acc_t>(grad.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(),
                                       d.const_data_ptr<acc_t>(), r.mutable_data_ptr<acc_t>(), B, N,
                                       K, Ho * Wo, cl, static_cast<acc_t>(eps), bn);
    } else {
      // the products g * f(y), summed over each group's Kg channels, then divided
      at::Tensor gy = at::empty({B, K, Ho, Wo}, d.options().memory_format(fmt));
      depthwise_ratio<scalar_t, acc_t>(grad.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(),
                                       nullptr, gy.mutable_data_ptr<acc_t>(), B, N, K, Ho * Wo, cl,
                                       static_cast<acc_t>(eps), bn);
      const int64_t T = B / N;
      at::Tensor sum = gy.reshape({B, G, Kg, Ho, Wo}).sum(2);
      r = sum.div_(T == 1 ? d + eps : (d + eps).repeat({T, 1, 1, 1})).contiguous(fmt);
    }
  });
  // transposed box sum back to (H, W): the output padding makes the sizes exact
  const int64_t oph = H - ((Ho - 1) * win.sh - 2 * win.ph + win.dh * (win.kh - 1) + 1);
  const int64_t opw = W - ((Wo - 1) * win.sw - 2 * win.pw + win.dw * (win.kw - 1) + 1);
  const at::Tensor t = at::conv_transpose2d(r, ones, {}, st, pd, {oph, opw}, G, dl).contiguous(fmt);
  // gx = sign(x) * t, one pass; x and t share the layout and per-sample shape (C == G)
  at::Tensor gx = at::empty({B, C, H, W}, x.options().memory_format(fmt));
  const int64_t per = C * H * W;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "tsgb_dw_sign", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const acc_t* tp = t.const_data_ptr<acc_t>();
    scalar_t* gp = gx.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B * per, kGrainElems, [&](int64_t begin, int64_t end) {
      while (begin < end) {  // runs within one sample: x's offset is fixed there
        const int64_t b = begin / per, stop = std::min(end, (b + 1) * per);
        const int64_t shift_x = (b % N - b) * per;  // gradient index -> x index
        for (int64_t i = begin; i < stop; ++i) {
          gp[i] = saturate_cast<scalar_t>(sign_of(static_cast<acc_t>(xp[i + shift_x])) * tp[i]);
        }
        begin = stop;
      }
    });
  });
  return gx;
}

// The BN of a fused block as per-channel scale / shift vectors (acc type, contiguous).
std::pair<at::Tensor, at::Tensor> bn_scale_shift_cpu(const at::Tensor& rm, const at::Tensor& rv,
                                                     const std::optional<at::Tensor>& w,
                                                     const std::optional<at::Tensor>& b,
                                                     double bn_eps, at::ScalarType acc_type) {
  const int64_t K = rm.size(0);
  auto prep = [&](const at::Tensor& t) { return t.to(acc_type).contiguous(); };
  const at::Tensor rmc = prep(rm), rvc = prep(rv);
  const bool has_w = w.has_value() && w->defined(), has_b = b.has_value() && b->defined();
  const at::Tensor wc = has_w ? prep(*w) : at::Tensor(), bc = has_b ? prep(*b) : at::Tensor();
  at::Tensor scale = at::empty({K}, rmc.options()), shift = at::empty({K}, rmc.options());
  AT_DISPATCH_FLOATING_TYPES(acc_type, "tsgb_bn_scale_shift_cpu", [&] {
    const scalar_t* wp = has_w ? wc.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* bp = has_b ? bc.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* sc = scale.mutable_data_ptr<scalar_t>();
    scalar_t* sh = shift.mutable_data_ptr<scalar_t>();
    for (int64_t k = 0; k < K; ++k) {
      bn_scale_shift_at<scalar_t>(rmc.const_data_ptr<scalar_t>(), rvc.const_data_ptr<scalar_t>(),
                                  wp, bp, static_cast<scalar_t>(bn_eps), k, sc[k], sh[k]);
    }
  });
  return {scale, shift};
}

// Shared by conv2d_backward and conv2d_bn_backward (bn given: BN + activation folded in).
at::Tensor conv_rule_impl(const char* kOp, const at::Tensor& grad, const at::Tensor& x,
                         const at::Tensor& y, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                         at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                         double eps, const BnArgs* bn) {
  TORCH_CHECK(x.device().is_cpu(), kOp, ": CPU kernel called with x on ", x.device());
  const ConvShapes sz = check_conv2d_backward_args(kOp, grad, x, y, kernel_size, stride, padding,
                                                   dilation, groups, bn);
  const Window2d& win = sz.win;
  const int64_t B = sz.B, C = sz.C, H = sz.H, W = sz.W;
  const at::MemoryFormat fmt = pick_memory_format(x);
  if (x.numel() == 0 || grad.numel() == 0) {
    return at::zeros({B, C, H, W}, x.options().memory_format(fmt));
  }
  const auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor scale, shift;
  if (bn != nullptr) {
    std::tie(scale, shift) = bn_scale_shift_cpu(bn->running_mean, bn->running_var, bn->weight,
                                                bn->bias, bn->bn_eps, acc_type);
  }
  const int64_t act = bn != nullptr ? bn->act : kActNone;

  // Depthwise: the gather kernel below wins on large planes with small windows, ATen's
  // ones-kernel convs on the rest (EfficientNet-Lite0, batch 8, see depthwise_backward_aten).
  const bool gather_wins = win.kh * win.kw <= 9 && H * W >= 56 * 56;
  if (groups > 1 && C == groups && !gather_wins) {
    return depthwise_backward_aten(grad.contiguous(fmt), x.contiguous(fmt), y.contiguous(fmt),
                                   win, groups, eps, fmt, scale, shift, act);
  }
  const at::Tensor xc = x.contiguous(fmt);
  const at::Tensor yc = y.contiguous(fmt);
  const at::Tensor gc = grad.contiguous(fmt);
  at::Tensor gx = at::empty({B, C, H, W}, x.options().memory_format(fmt));
  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "tsgb_conv2d_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (!scale.defined()) {
      conv2d_backward_kernel<scalar_t>(gc, xc, yc, gx, win, groups, eps, cl, nullptr);
      return;
    }
    // the BN rule divides by y + eps (the spec's eps); bn_eps only went into scale
    const BnFold<acc_t> fold{scale.const_data_ptr<acc_t>(), shift.const_data_ptr<acc_t>(),
                             static_cast<acc_t>(eps), act};
    conv2d_backward_kernel<scalar_t>(gc, xc, yc, gx, win, groups, eps, cl, &fold);
  });
  return gx;
}

}  // namespace

// The entry point of this instruction set's copy (see csrc/cpu/conv2d_backward.cpp).
at::Tensor TSGB_ISA_NAME(conv_rule_cpu)(const char* op, const at::Tensor& grad, const at::Tensor& x,
                                const at::Tensor& y, at::IntArrayRef kernel_size,
                                at::IntArrayRef stride, at::IntArrayRef padding,
                                at::IntArrayRef dilation, int64_t groups, double eps,
                                const BnArgs* bn) {
  return conv_rule_impl(op, grad, x, y, kernel_size, stride, padding, dilation, groups, eps, bn);
}

}  // namespace tsgb
