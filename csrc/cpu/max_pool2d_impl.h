// max_pool2d on the CPU: the forward without indices, and the ordinary gradient found again from
// the saved input and output (see csrc/cpu/max_pool2d.cpp for why). Compiled once per
// instruction set like the conv rule (csrc/cpu/conv2d_backward_impl.h): definitions have
// internal linkage; the includer defines TSGB_ISA_SUFFIX, which names the two entry points.
//
// Semantics are torch's CPU kernels' (aten/src/ATen/native/cpu/MaxPoolKernel.cpp), element for
// element: the window is scanned row by row, a tap replaces the running maximum when it is
// greater or NaN, so the output is that value (NaN if any tap is NaN, the first of equal values
// otherwise, -0.0 and 0.0 included) and the gradient goes to that tap: the first tap equal to
// the output, or the last NaN tap when the output is NaN. Gradients of overlapping windows add
// up in output order, rounded to the tensor's dtype after each addition, as torch's backward
// does (so half-type sums round the same way).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common/checks.h"
#include "common/tsgb_common.h"
#include "cpu/cpu_isa.h"


namespace tsgb {
namespace {

constexpr int64_t kMpGrain = 16384;  // minimum elements of work per parallel task

inline int64_t mp_grain(int64_t per_item) {
  return std::max<int64_t>(1, kMpGrain / std::max<int64_t>(1, per_item));
}

// the running-maximum update of torch's kernel
template <typename T>
inline T mp_take(T v, T m) {
  return (v > m || v != v) ? v : m;
}

// Output columns ow whose tap at column offset `off` (iw = ow * sw + off) lies inside [0, W).
inline void mp_cols(int64_t off, int64_t sw, int64_t W, int64_t Wo, int64_t& lo, int64_t& hi) {
  lo = off >= 0 ? 0 : (-off + sw - 1) / sw;
  hi = W - 1 - off >= 0 ? std::min(Wo, (W - 1 - off) / sw + 1) : 0;
  if (hi < lo) hi = lo;
}

// f(i) for each tap of the window at output (oh, ow) that lies inside the input, in torch's
// scan order (rows, then columns); i = ih * W + iw.
template <typename Fn>
inline void mp_for_each_tap(int64_t oh, int64_t ow, const PoolShapes& s, Fn&& f) {
  const Window2d& w = s.win;
  for (int64_t kh = 0; kh < w.kh; ++kh) {
    const int64_t ih = oh * w.sh - w.ph + kh * w.dh;
    if (ih < 0 || ih >= s.H) continue;
    for (int64_t kw = 0; kw < w.kw; ++kw) {
      const int64_t iw = ow * w.sw - w.pw + kw * w.dw;
      if (iw >= 0 && iw < s.W) f(ih * s.W + iw);
    }
  }
}

template <typename scalar_t>
void mp_forward_nchw(const scalar_t* x, scalar_t* y, int64_t planes, const PoolShapes& s) {
  using acc_t = at::opmath_type<scalar_t>;
  const Window2d& w = s.win;
  const int64_t H = s.H, W = s.W, Ho = s.Ho, Wo = s.Wo;
  at::parallel_for(0, planes * Ho, mp_grain(Wo * w.kh * w.kw), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> mbuf(Wo);
    acc_t* m = mbuf.data();
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t p = idx / Ho, oh = idx % Ho;
      std::fill(m, m + Wo, -std::numeric_limits<acc_t>::infinity());
      for (int64_t kh = 0; kh < w.kh; ++kh) {
        const int64_t ih = oh * w.sh - w.ph + kh * w.dh;
        if (ih < 0 || ih >= H) continue;
        const scalar_t* row = x + (p * H + ih) * W;
        for (int64_t kw = 0; kw < w.kw; ++kw) {
          const int64_t off = kw * w.dw - w.pw;
          int64_t lo, hi;
          mp_cols(off, w.sw, W, Wo, lo, hi);
          if (w.sw == 1) {
            const scalar_t* r = row + off;
            for (int64_t ow = lo; ow < hi; ++ow) m[ow] = mp_take(static_cast<acc_t>(r[ow]), m[ow]);
          } else if (w.sw == 2) {
            const scalar_t* r = row + off;
            for (int64_t ow = lo; ow < hi; ++ow) {
              m[ow] = mp_take(static_cast<acc_t>(r[2 * ow]), m[ow]);
            }
          } else {
            for (int64_t ow = lo; ow < hi; ++ow) {
              m[ow] = mp_take(static_cast<acc_t>(row[ow * w.sw + off]), m[ow]);
            }
          }
        }
      }
      scalar_t* out = y + idx * Wo;
      for (int64_t ow = 0; ow < Wo; ++ow) out[ow] = static_cast<scalar_t>(m[ow]);
    }
  });
}

template <typename scalar_t>
void mp_forward_nhwc(const scalar_t* x, scalar_t* y, const PoolShapes& s) {
  using acc_t = at::opmath_type<scalar_t>;
  const Window2d& w = s.win;
  const int64_t C = s.C, H = s.H, W = s.W, Ho = s.Ho, Wo = s.Wo;
  at::parallel_for(0, s.N * Ho * Wo, mp_grain(C * w.kh * w.kw), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> mbuf(C);
    acc_t* m = mbuf.data();
    for (int64_t pix = begin; pix < end; ++pix) {
      const int64_t n = pix / (Ho * Wo), oh = (pix / Wo) % Ho, ow = pix % Wo;
      std::fill(m, m + C, -std::numeric_limits<acc_t>::infinity());
      mp_for_each_tap(oh, ow, s, [&](int64_t i) {
        const scalar_t* v = x + (n * H * W + i) * C;
        for (int64_t c = 0; c < C; ++c) m[c] = mp_take(static_cast<acc_t>(v[c]), m[c]);
      });
      scalar_t* out = y + pix * C;
      for (int64_t c = 0; c < C; ++c) out[c] = static_cast<scalar_t>(m[c]);
    }
  });
}

// The backward finds, for each output, the tap torch's forward chose: the first tap equal to
// the output value, or the last NaN tap when it is NaN (a flat index into the plane, times
// `cstride` elements apart; -1 for a window with no tap inside the input).
template <typename acc_t, typename scalar_t>
inline int64_t mp_argmax(const scalar_t* plane, int64_t cstride, acc_t yv, int64_t oh, int64_t ow,
                         const PoolShapes& s) {
  const bool nan = yv != yv;
  int64_t found = -1;
  mp_for_each_tap(oh, ow, s, [&](int64_t i) {
    const acc_t v = static_cast<acc_t>(plane[i * cstride]);
    if (nan ? v != v : (found < 0 && v == yv)) found = i;  // last NaN / first maximum
  });
  return found;
}

// Windows that tile the input (stride == kernel, no padding, no dilation: VGG's 2x2 pools):
// every input element is a tap of at most one window, so gx is written in one pass, tap by tap
// over a row of outputs, as g where the tap is the chosen one and 0 elsewhere (vector compares
// and blends; a NaN output is fixed up afterwards). Elements no window covers stay 0.
template <typename scalar_t>
void mp_backward_tiled_nchw(const scalar_t* g, const scalar_t* x, const scalar_t* y,
                            scalar_t* gx, int64_t planes, const PoolShapes& s) {
  using acc_t = at::opmath_type<scalar_t>;
  const Window2d& w = s.win;
  const int64_t H = s.H, W = s.W, Ho = s.Ho, Wo = s.Wo, HW = H * W;
  const bool covered = Ho * w.kh == H && Wo * w.kw == W;
  at::parallel_for(0, planes * Ho, mp_grain(Wo * w.kh * w.kw), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> ybuf(Wo), gbuf(Wo), todo(Wo);
    acc_t* yv = ybuf.data();
    acc_t* gv = gbuf.data();
    acc_t* open = todo.data();  // 1 until the output's tap is found
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t p = idx / Ho, oh = idx % Ho;
      const scalar_t* xp = x + p * HW;
      scalar_t* gp = gx + p * HW;
      bool any_nan = false;
      for (int64_t ow = 0; ow < Wo; ++ow) {
        yv[ow] = static_cast<acc_t>(y[idx * Wo + ow]);
        gv[ow] = static_cast<acc_t>(g[idx * Wo + ow]);
        open[ow] = acc_t(1);
        any_nan |= yv[ow] != yv[ow];
      }
      if (!covered) {  // rows and columns no window reaches (floor mode) get 0
        const int64_t h0 = oh * w.kh, h1 = std::min(h0 + w.kh, H);
        for (int64_t ih = h0; ih < h1; ++ih) std::fill(gp + ih * W, gp + (ih + 1) * W, scalar_t(0));
        if (oh == Ho - 1) std::fill(gp + h1 * W, gp + HW, scalar_t(0));
      }
      for (int64_t kh = 0; kh < w.kh; ++kh) {
        const int64_t ih = oh * w.kh + kh;
        if (ih >= H) break;
        const scalar_t* row = xp + ih * W;
        scalar_t* grow = gp + ih * W;
        for (int64_t kw = 0; kw < w.kw; ++kw) {
          int64_t lo, hi;
          mp_cols(kw, w.sw, W, Wo, lo, hi);
          for (int64_t ow = lo; ow < hi; ++ow) {
            const acc_t v = static_cast<acc_t>(row[ow * w.sw + kw]);
            const bool take = (v == yv[ow]) & (open[ow] != acc_t(0));
            // 0 + g, not g: torch adds the gradient to a zero (-0.0 becomes +0.0)
            grow[ow * w.sw + kw] = static_cast<scalar_t>(take ? acc_t(0) + gv[ow] : acc_t(0));
            open[ow] = take ? acc_t(0) : open[ow];
          }
        }
      }
      if (any_nan) {  // NaN outputs: the gradient goes to the window's last NaN tap
        for (int64_t ow = 0; ow < Wo; ++ow) {
          if (yv[ow] == yv[ow]) continue;
          const int64_t i = mp_argmax<acc_t>(xp, 1, yv[ow], oh, ow, s);
          if (i >= 0) gp[i] = static_cast<scalar_t>(acc_t(0) + gv[ow]);
        }
      }
    }
  });
}

// General windows (overlapping, padded, dilated): for a row of outputs (NCHW) or a pixel's
// channels (NHWC), the taps are visited in scan order and each output records the number of
// the first tap equal to its value (vector compares and blends on float flags; tap numbers are
// small integers, exact in float); then the gradients are added at those taps in output order.
// NaN outputs take the scalar search (the last NaN tap).
template <typename scalar_t>
void mp_backward_nchw(const scalar_t* g, const scalar_t* x, const scalar_t* y, scalar_t* gx,
                      int64_t planes, const PoolShapes& s) {
  using acc_t = at::opmath_type<scalar_t>;
  const Window2d& w = s.win;
  const int64_t H = s.H, W = s.W, Ho = s.Ho, Wo = s.Wo, HW = H * W, HoWo = Ho * Wo;
  at::parallel_for(0, planes, mp_grain(HW + HoWo * w.kh * w.kw), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> ybuf(Wo), tbuf(Wo), obuf(Wo);
    acc_t* yv = ybuf.data();
    acc_t* tap = tbuf.data();   // number of the chosen tap, kh * kw_count + kw; -1: none
    acc_t* open = obuf.data();  // 1 until the output's tap is found
    for (int64_t p = begin; p < end; ++p) {
      scalar_t* acc = gx + p * HW;
      std::fill(acc, acc + HW, scalar_t(0));
      const scalar_t* xp = x + p * HW;
      for (int64_t oh = 0; oh < Ho; ++oh) {
        const scalar_t* yrow = y + p * HoWo + oh * Wo;
        bool any_nan = false;
        for (int64_t ow = 0; ow < Wo; ++ow) {
          yv[ow] = static_cast<acc_t>(yrow[ow]);
          tap[ow] = acc_t(-1);
          open[ow] = acc_t(1);
          any_nan |= yv[ow] != yv[ow];
        }
        for (int64_t kh = 0; kh < w.kh; ++kh) {
          const int64_t ih = oh * w.sh - w.ph + kh * w.dh;
          if (ih < 0 || ih >= H) continue;
          const scalar_t* row = xp + ih * W;
          for (int64_t kw = 0; kw < w.kw; ++kw) {
            const int64_t off = kw * w.dw - w.pw;
            const acc_t number = static_cast<acc_t>(kh * w.kw + kw);
            int64_t lo, hi;
            mp_cols(off, w.sw, W, Wo, lo, hi);
            auto visit = [&](const scalar_t* r, int64_t step) {  // r[ow * step]: the tap
              for (int64_t ow = lo; ow < hi; ++ow) {
                const acc_t v = static_cast<acc_t>(r[ow * step]);
                const bool take = (v == yv[ow]) & (open[ow] != acc_t(0));
                tap[ow] = take ? number : tap[ow];
                open[ow] = take ? acc_t(0) : open[ow];
              }
            };
            if (w.sw == 1) {
              visit(row + off, 1);  // constant steps: the compiler vectorises these loops
            } else if (w.sw == 2) {
              visit(row + off, 2);
            } else {
              visit(row + off, w.sw);
            }
          }
        }
        const scalar_t* grow = g + p * HoWo + oh * Wo;
        for (int64_t ow = 0; ow < Wo; ++ow) {  // in output order, like torch's backward
          int64_t i = -1;
          if (any_nan && yv[ow] != yv[ow]) {
            i = mp_argmax<acc_t>(xp, 1, yv[ow], oh, ow, s);
          } else if (tap[ow] >= acc_t(0)) {
            const int64_t t = static_cast<int64_t>(tap[ow]);
            i = (oh * w.sh - w.ph + (t / w.kw) * w.dh) * W + ow * w.sw - w.pw + (t % w.kw) * w.dw;
          }
          if (i >= 0) acc[i] += grow[ow];  // i < 0: a window without taps
        }
      }
    }
  });
}

template <typename scalar_t>
void mp_backward_nhwc(const scalar_t* g, const scalar_t* x, const scalar_t* y, scalar_t* gx,
                      const PoolShapes& s) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = s.C, HW = s.H * s.W, HoWo = s.Ho * s.Wo;
  constexpr int64_t kBlock = 64;  // channels per task: tasks never write the same element
  const int64_t blocks = (C + kBlock - 1) / kBlock;
  at::parallel_for(0, s.N * blocks, mp_grain(HW * kBlock), [&](int64_t begin, int64_t end) {
    acc_t yv[kBlock], open[kBlock];
    int64_t tap[kBlock];  // flat input pixel of the chosen tap; -1: none
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / blocks, c0 = (task % blocks) * kBlock;
      const int64_t cn = std::min(kBlock, C - c0);
      scalar_t* acc = gx + n * HW * C + c0;  // this task's channels of sample n
      for (int64_t i = 0; i < HW; ++i) std::fill(acc + i * C, acc + i * C + cn, scalar_t(0));
      const scalar_t* xn = x + n * HW * C + c0;
      for (int64_t oh = 0; oh < s.Ho; ++oh) {
        for (int64_t ow = 0; ow < s.Wo; ++ow) {
          const int64_t o = ((n * HoWo) + oh * s.Wo + ow) * C + c0;
          bool any_nan = false;
          for (int64_t c = 0; c < cn; ++c) {
            yv[c] = static_cast<acc_t>(y[o + c]);
            open[c] = acc_t(1);
            tap[c] = -1;
            any_nan |= yv[c] != yv[c];
          }
          mp_for_each_tap(oh, ow, s, [&](int64_t i) {
            const scalar_t* v = xn + i * C;
            for (int64_t c = 0; c < cn; ++c) {
              const bool take = (static_cast<acc_t>(v[c]) == yv[c]) & (open[c] != acc_t(0));
              tap[c] = take ? i : tap[c];
              open[c] = take ? acc_t(0) : open[c];
            }
          });
          for (int64_t c = 0; c < cn; ++c) {
            int64_t i = tap[c];
            if (any_nan && yv[c] != yv[c]) i = mp_argmax<acc_t>(xn + c, C, yv[c], oh, ow, s);
            if (i >= 0) acc[i * C + c] += g[o + c];
          }
        }
      }
    }
  });
}

}  // namespace

// y = max_pool2d(x) for a checked, contiguous (fmt) x; y allocated by the caller in fmt.
void TSGB_ISA_NAME(max_pool2d_forward_kernel)(const at::Tensor& x, at::Tensor& y,
                                              const PoolShapes& s, bool channels_last) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "tsgb_max_pool2d", [&] {
    if (channels_last) {
      mp_forward_nhwc<scalar_t>(x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), s);
    } else {
      mp_forward_nchw<scalar_t>(x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(),
                                s.N * s.C, s);
    }
  });
}

// gx = the ordinary gradient of max_pool2d, from grad, x and y (all contiguous in fmt).
void TSGB_ISA_NAME(max_pool2d_backward_kernel)(const at::Tensor& grad, const at::Tensor& x,
                                               const at::Tensor& y, at::Tensor& gx,
                                               const PoolShapes& s, bool channels_last) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "tsgb_max_pool2d_bwd", [&] {
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    scalar_t* gxp = gx.mutable_data_ptr<scalar_t>();
    const Window2d& w = s.win;
    const bool tiled = w.sh == w.kh && w.sw == w.kw && w.ph == 0 && w.pw == 0 && w.dh == 1 &&
                       w.dw == 1;
    if (channels_last) {
      mp_backward_nhwc<scalar_t>(g, xp, yp, gxp, s);
    } else if (tiled) {
      mp_backward_tiled_nchw<scalar_t>(g, xp, yp, gxp, s.N * s.C, s);
    } else {
      mp_backward_nchw<scalar_t>(g, xp, yp, gxp, s.N * s.C, s);
    }
  });
}

}  // namespace tsgb
