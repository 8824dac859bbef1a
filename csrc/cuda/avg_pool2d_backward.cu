// TSGB AvgPool2d backward on CUDA: gx = avg_pool2d_backward(grad * y) / (x + eps).
//
// One fused gather kernel over gx's elements: for input (b, c, ih, iw) it visits the pooling
// windows that contain it (the same window/divisor arithmetic as ATen's avg_pool2d backward:
// ceil_mode, count_include_pad, divisor_override), accumulates grad * y / divisor in fp32
// (fp64 for double), divides by x + eps and casts once (fp16/bf16 saturate to the largest
// finite value instead of inf). Bytes: grad, y read ~once (each output is gathered by the
// kh*kw / (sh*sw) inputs of its window, served from cache), x read once, gx written once.
// Both NCHW and channels_last; in channels_last consecutive threads walk channels.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cstdlib>

#include "cuda/tsgb_cuda.cuh"

namespace tsgb {
namespace {

using cuda_detail::kThreads;

// Window geometry in 32 bits (the per-window arithmetic stays out of 64-bit division).
struct PoolParams {
  int kh, kw, sh, sw, ph, pw;
  int divisor;  // 0: no override
  bool count_include_pad;
};

template <typename scalar_t, typename acc_t, typename index_t, bool CL>
__global__ void avg_pool2d_backward_kernel(const scalar_t* __restrict__ g,
                                           const scalar_t* __restrict__ y,
                                           const scalar_t* __restrict__ x,
                                           scalar_t* __restrict__ out, index_t total,
                                           index_t xnumel, index_t N, index_t C, int H, int W,
                                           int Ho, int Wo, PoolParams p, acc_t eps) {
  for (index_t e = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<index_t>(gridDim.x) * blockDim.x) {
    index_t c, b, t;
    int ih, iw;
    if constexpr (CL) {
      c = e % C; t = e / C;
      iw = static_cast<int>(t % W); t /= W;
      ih = static_cast<int>(t % H); b = t / H;
    } else {
      iw = static_cast<int>(e % W); t = e / W;
      ih = static_cast<int>(t % H); t /= H;
      c = t % C; b = t / C;
    }
    const index_t n = b % N;
    const int h = ih + p.ph;
    const int w = iw + p.pw;
    const int phstart = h < p.kh ? 0 : (h - p.kh) / p.sh + 1;
    const int phend = min(h / p.sh + 1, Ho);
    const int pwstart = w < p.kw ? 0 : (w - p.kw) / p.sw + 1;
    const int pwend = min(w / p.sw + 1, Wo);
    // plane bases: NCHW (b, c) planes of Ho*Wo; channels_last rows of C
    const index_t gbase = CL ? b * Ho * Wo * C + c : (b * C + c) * Ho * Wo;
    const index_t ybase = CL ? n * Ho * Wo * C + c : (n * C + c) * Ho * Wo;
    const index_t step = CL ? C : 1;
    acc_t acc = acc_t(0);
    for (int oh = phstart; oh < phend; ++oh) {
      int hstart = oh * p.sh - p.ph;
      int hend = min(hstart + p.kh, H + p.ph);
      const int pool_h = hend - hstart;
      hstart = max(hstart, 0);
      hend = min(hend, H);
      for (int ow = pwstart; ow < pwend; ++ow) {
        int wstart = ow * p.sw - p.pw;
        int wend = min(wstart + p.kw, W + p.pw);
        const int pool_w = wend - wstart;
        wstart = max(wstart, 0);
        wend = min(wend, W);
        if (hstart >= hend || wstart >= wend) continue;
        const int div = p.divisor != 0        ? p.divisor
                        : p.count_include_pad ? pool_h * pool_w
                                              : (hend - hstart) * (wend - wstart);
        const index_t o = (static_cast<index_t>(oh) * Wo + ow) * step;
        acc += static_cast<acc_t>(g[gbase + o]) * static_cast<acc_t>(y[ybase + o]) /
               static_cast<acc_t>(div);
      }
    }
    const acc_t xf = static_cast<acc_t>(x[e % xnumel]);  // batch outermost: b -> b % N
    out[e] = saturate_cast<scalar_t>(acc / (xf + eps));
  }
}

at::Tensor avg_pool2d_backward_cuda(const at::Tensor& grad_in, const at::Tensor& x_in,
                                    const at::Tensor& y_in, at::IntArrayRef kernel_size,
                                    at::IntArrayRef stride, at::IntArrayRef padding,
                                    bool ceil_mode, bool count_include_pad,
                                    std::optional<int64_t> divisor_override, double eps) {
  constexpr const char* op = "tsgb_ext.avg_pool2d_backward";
  cuda_detail::check_cuda(op, "x", x_in);
  const PoolShapes sz = check_avg_pool2d_backward_args(op, grad_in, x_in, y_in, kernel_size,
                                                       stride, padding, ceil_mode,
                                                       divisor_override);
  const Window2d& win = sz.win;
  const int64_t B = sz.B, N = sz.N, C = sz.C, H = sz.H, W = sz.W, Ho = sz.Ho, Wo = sz.Wo;

  c10::cuda::OptionalCUDAGuard device_guard(x_in.device());
  const at::MemoryFormat mf = pick_memory_format(x_in);
  const bool cl = mf == at::MemoryFormat::ChannelsLast;
  at::Tensor gx = at::empty({B, C, H, W}, x_in.options().memory_format(mf));
  if (gx.numel() == 0) return gx;

  const at::Tensor x = x_in.contiguous(mf);
  const at::Tensor y = y_in.contiguous(mf);
  const at::Tensor grad = grad_in.contiguous(mf);
  constexpr int64_t kIntMax = std::numeric_limits<int32_t>::max() / 2;
  TORCH_CHECK(H + 2 * win.ph < kIntMax && W + 2 * win.pw < kIntMax && win.kh < kIntMax &&
                  win.kw < kIntMax && win.sh < kIntMax && win.sw < kIntMax &&
                  win.kh * win.kw < kIntMax &&
                  std::abs(divisor_override.value_or(0)) < kIntMax,
              op, ": spatial sizes, window and divisor must fit in 32 bits");
  const PoolParams params{static_cast<int>(win.kh), static_cast<int>(win.kw),
                          static_cast<int>(win.sh), static_cast<int>(win.sw),
                          static_cast<int>(win.ph), static_cast<int>(win.pw),
                          static_cast<int>(divisor_override.value_or(0)), count_include_pad};
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t total = gx.numel();
  const bool use32 = std::max(total, grad.numel()) < kIntMax;
  const unsigned int grid = cuda_detail::grid_for(total, kThreads);
  const int h = static_cast<int>(H), w = static_cast<int>(W);
  const int ho = static_cast<int>(Ho), wo = static_cast<int>(Wo);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "tsgb_avg_pool2d_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* g_ptr = grad.const_data_ptr<scalar_t>();
    const scalar_t* y_ptr = y.const_data_ptr<scalar_t>();
    const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
    scalar_t* o_ptr = gx.mutable_data_ptr<scalar_t>();
    const acc_t e = static_cast<acc_t>(eps);
    if (use32) {
      if (cl) {
        avg_pool2d_backward_kernel<scalar_t, acc_t, int32_t, true><<<grid, kThreads, 0, stream>>>(
            g_ptr, y_ptr, x_ptr, o_ptr, total, x.numel(), N, C, h, w, ho, wo, params, e);
      } else {
        avg_pool2d_backward_kernel<scalar_t, acc_t, int32_t, false><<<grid, kThreads, 0, stream>>>(
            g_ptr, y_ptr, x_ptr, o_ptr, total, x.numel(), N, C, h, w, ho, wo, params, e);
      }
    } else {
      if (cl) {
        avg_pool2d_backward_kernel<scalar_t, acc_t, int64_t, true><<<grid, kThreads, 0, stream>>>(
            g_ptr, y_ptr, x_ptr, o_ptr, total, x.numel(), N, C, h, w, ho, wo, params, e);
      } else {
        avg_pool2d_backward_kernel<scalar_t, acc_t, int64_t, false><<<grid, kThreads, 0, stream>>>(
            g_ptr, y_ptr, x_ptr, o_ptr, total, x.numel(), N, C, h, w, ho, wo, params, e);
      }
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return gx;
}

}  // namespace
}  // namespace tsgb

TORCH_LIBRARY_IMPL(tsgb_ext, CUDA, m) {
  m.impl("avg_pool2d_backward", &tsgb::avg_pool2d_backward_cuda);
}
