// AvgPool2d backward, CPU: gx = avg_pool2d_backward(grad * y) / (x + eps), fused, gather form.
// Window and divisor arithmetic follow torch's avg_pool2d exactly (ceil_mode,
// count_include_pad, divisor_override). grad sample b pairs with activation sample b % N.
//
// Planes use the layout [P][rows][cols][Ci]: NCHW -> P = batch*C, Ci = 1; channels_last ->
// P = batch, Ci = C. Each task owns whole input rows: for every output row oh whose window
// covers the input row it forms q = grad*y/divisor for that output row in a task-local buffer
// and gathers it into the input row; no atomics.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common/checks.h"
#include "common/tsgb_common.h"

namespace tsgb {
namespace {

constexpr const char* kOp = "tsgb_ext.avg_pool2d_backward";

// Output indices o in [lo, hi] whose window [o*s - p, o*s - p + k) contains input index i.
inline void covering_range(int64_t i, int64_t k, int64_t s, int64_t p, int64_t out, int64_t& lo,
                           int64_t& hi) {
  const int64_t num_lo = i + p - k + 1;
  lo = num_lo <= 0 ? 0 : ceil_div_nonneg(num_lo, s);
  hi = std::min(out - 1, (i + p) / s);
}

// Per output index along one dimension: window extent before clipping (limited to in + pad, as
// torch does) and after clipping to the input.
inline void window_sizes(int64_t out, int64_t in, int64_t k, int64_t s, int64_t p,
                         std::vector<int64_t>& full, std::vector<int64_t>& clipped) {
  full.resize(out);
  clipped.resize(out);
  for (int64_t o = 0; o < out; ++o) {
    int64_t i0 = o * s - p;
    int64_t i1 = std::min(i0 + k, in + p);
    full[o] = i1 - i0;
    i0 = std::max<int64_t>(i0, 0);
    i1 = std::min(i1, in);
    clipped[o] = i1 - i0;
  }
}

template <typename scalar_t>
void avg_pool2d_backward_kernel(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& y,
                                at::Tensor& gx, int64_t kh, int64_t kw, int64_t sh, int64_t sw,
                                int64_t ph, int64_t pw, bool count_include_pad,
                                std::optional<int64_t> divisor_override, double eps_d,
                                bool channels_last) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = grad.size(0), N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Ho = y.size(2), Wo = y.size(3);
  const acc_t eps = static_cast<acc_t>(eps_d);
  const int64_t Ci = channels_last ? C : 1;
  const int64_t Pb = channels_last ? B : B * C;
  const int64_t Pn = channels_last ? N : N * C;  // activation planes: p_act = p % Pn
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* yp = y.const_data_ptr<scalar_t>();
  const scalar_t* gp = grad.const_data_ptr<scalar_t>();
  scalar_t* gxp = gx.mutable_data_ptr<scalar_t>();

  // divisor(oh, ow) = fh[oh] * fw[ow] (or the override), as torch computes it.
  std::vector<int64_t> full_h, clip_h, full_w, clip_w;
  window_sizes(Ho, H, kh, sh, ph, full_h, clip_h);
  window_sizes(Wo, W, kw, sw, pw, full_w, clip_w);
  const std::vector<int64_t>& fh = count_include_pad ? full_h : clip_h;
  const std::vector<int64_t>& fw = count_include_pad ? full_w : clip_w;
  // Per-column covering ranges, shared by all rows.
  std::vector<int64_t> ow_lo(W), ow_hi(W);
  for (int64_t w = 0; w < W; ++w) covering_range(w, kw, sw, pw, Wo, ow_lo[w], ow_hi[w]);

  const int64_t row_work = W * Ci * (kh / sh + 1) * (kw / sw + 2);
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, row_work));
  at::parallel_for(0, Pb * H, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> qbuf(Wo * Ci), accbuf(W * Ci);
    acc_t* q = qbuf.data();
    acc_t* acc = accbuf.data();
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t p = idx / H, h = idx % H, pn = p % Pn;
      std::fill(acc, acc + W * Ci, acc_t(0));
      int64_t oh_lo, oh_hi;
      covering_range(h, kh, sh, ph, Ho, oh_lo, oh_hi);
      for (int64_t oh = oh_lo; oh <= oh_hi; ++oh) {
        const scalar_t* grow = gp + (p * Ho + oh) * Wo * Ci;
        const scalar_t* yrow = yp + (pn * Ho + oh) * Wo * Ci;
        for (int64_t ow = 0; ow < Wo; ++ow) {
          const int64_t div = divisor_override.has_value() ? divisor_override.value()
                                                           : fh[oh] * fw[ow];
          const acc_t dv = static_cast<acc_t>(div);
          for (int64_t c = 0; c < Ci; ++c) {
            const int64_t j = ow * Ci + c;
            q[j] = static_cast<acc_t>(grow[j]) * static_cast<acc_t>(yrow[j]) / dv;
          }
        }
        for (int64_t w = 0; w < W; ++w) {
          acc_t* aw = acc + w * Ci;
          for (int64_t ow = ow_lo[w]; ow <= ow_hi[w]; ++ow) {
            const acc_t* qw = q + ow * Ci;
            for (int64_t c = 0; c < Ci; ++c) aw[c] += qw[c];
          }
        }
      }
      const scalar_t* xrow = xp + (pn * H + h) * W * Ci;
      scalar_t* orow = gxp + idx * W * Ci;
      for (int64_t j = 0; j < W * Ci; ++j) {
        orow[j] = saturate_cast<scalar_t>(acc[j] / (static_cast<acc_t>(xrow[j]) + eps));
      }
    }
  });
}

at::Tensor avg_pool2d_backward_cpu(const at::Tensor& grad, const at::Tensor& x,
                                   const at::Tensor& y, at::IntArrayRef kernel_size,
                                   at::IntArrayRef stride, at::IntArrayRef padding, bool ceil_mode,
                                   bool count_include_pad, std::optional<int64_t> divisor_override,
                                   double eps) {
  TORCH_CHECK(x.device().is_cpu(), kOp, ": CPU kernel called with x on ", x.device());
  const PoolShapes sz = check_avg_pool2d_backward_args(kOp, grad, x, y, kernel_size, stride,
                                                       padding, ceil_mode, divisor_override);
  const Window2d& win = sz.win;
  const int64_t B = sz.B, C = sz.C, H = sz.H, W = sz.W;
  const at::MemoryFormat fmt = pick_memory_format(x);
  if (x.numel() == 0 || grad.numel() == 0) {
    return at::zeros({B, C, H, W}, x.options().memory_format(fmt));
  }

  const at::Tensor xc = x.contiguous(fmt);
  const at::Tensor yc = y.contiguous(fmt);
  const at::Tensor gc = grad.contiguous(fmt);
  at::Tensor gx = at::empty({B, C, H, W}, x.options().memory_format(fmt));
  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "tsgb_avg_pool2d_backward_cpu", [&] {
    avg_pool2d_backward_kernel<scalar_t>(gc, xc, yc, gx, win.kh, win.kw, win.sh, win.sw, win.ph,
                                         win.pw, count_include_pad, divisor_override, eps, cl);
  });
  return gx;
}

}  // namespace
}  // namespace tsgb

TORCH_LIBRARY_IMPL(tsgb_ext, CPU, m) {
  m.impl("avg_pool2d_backward", &tsgb::avg_pool2d_backward_cpu);
}
