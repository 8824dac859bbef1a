// max_pool2d's ordinary gradient on CUDA (not a TSGB rule: TSGB_SPEC.md keeps MaxPool's own
// gradient), found from the saved input x and output y, with the shared argument checks of the
// CPU kernel (common/checks.h). The forward (csrc/ops.cpp) is torch's own max_pool2d; torch's
// backward needs the int64 indices of that forward, which the op does not keep.
//
// Two kernels, both race-free by construction (every thread writes one element):
//  1. per output: the flat input index ih * W + iw of the tap torch's CUDA forward chose
//     (aten/src/ATen/native/cuda/DilatedMaxPool2d.cu, max_pool_forward_nchw / _nhwc): the taps
//     are scanned row by row and a tap replaces the running maximum when it is greater or NaN,
//     starting from -inf. So the chosen tap is the first one equal to y, or the last NaN tap
//     when y is NaN; when y is -inf no tap replaced the start value and torch's index is its
//     initial one: the first tap inside the input (NCHW) or 0 (channels_last);
//  2. per input element: the gather of torch's backward (max_pool_backward_nchw / _nhwc) over
//     the outputs whose windows may contain it, in the same order (rows, then columns), summed
//     in the opmath type from 0 and cast once. Like torch's channels_last kernel, an input with
//     a single candidate output takes that output's gradient as it is (-0.0 stays -0.0).
// With the same indices and the same summation this is torch's CUDA gradient bit for bit.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <limits>

#include "cuda/tsgb_cuda.cuh"

namespace tsgb {
namespace {

using cuda_detail::kThreads;

struct MaxPoolParams {
  int64_t kh, kw, sh, sw, ph, pw, dh, dw;
};

// (n, c, h, w) of element e of a (N, C, H, W) tensor stored contiguous in NCHW or NHWC order.
template <bool CL>
__device__ __forceinline__ void decode(int64_t e, int64_t C, int64_t H, int64_t W, int64_t& n,
                                       int64_t& c, int64_t& h, int64_t& w) {
  if constexpr (CL) {
    c = e % C; e /= C;
    w = e % W; e /= W;
    h = e % H; n = e / H;
  } else {
    w = e % W; e /= W;
    h = e % H; e /= H;
    c = e % C; n = e / C;
  }
}

// Offset of (n, c, h, w) in a (N, C, H, W) tensor stored contiguous in NCHW or NHWC order.
template <bool CL>
__device__ __forceinline__ int64_t offset_of(int64_t n, int64_t c, int64_t h, int64_t w,
                                             int64_t C, int64_t H, int64_t W) {
  return CL ? ((n * H + h) * W + w) * C + c : ((n * C + c) * H + h) * W + w;
}

template <typename scalar_t, typename acc_t, bool CL>
__global__ void max_pool2d_argmax_kernel(const scalar_t* __restrict__ x,
                                         const scalar_t* __restrict__ y,
                                         int64_t* __restrict__ argmax, int64_t total, int64_t C,
                                         int64_t H, int64_t W, int64_t Ho, int64_t Wo,
                                         MaxPoolParams p) {
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t n, c, oh, ow;
    decode<CL>(e, C, Ho, Wo, n, c, oh, ow);
    // the window's rows / columns inside the input, as torch's forward walks them
    int64_t hstart = oh * p.sh - p.ph, wstart = ow * p.sw - p.pw;
    const int64_t hend = min(hstart + (p.kh - 1) * p.dh + 1, H);
    const int64_t wend = min(wstart + (p.kw - 1) * p.dw + 1, W);
    while (hstart < 0) hstart += p.dh;
    while (wstart < 0) wstart += p.dw;
    const acc_t yv = static_cast<acc_t>(y[e]);
    const bool nan = yv != yv;
    int64_t found = -1;
    if (!nan && yv == -std::numeric_limits<acc_t>::infinity()) {
      found = CL ? 0 : hstart * W + wstart;  // torch's start index: no tap exceeded -inf
    } else {
      for (int64_t ih = hstart; ih < hend; ih += p.dh) {
        for (int64_t iw = wstart; iw < wend; iw += p.dw) {
          const acc_t v = static_cast<acc_t>(x[offset_of<CL>(n, c, ih, iw, C, H, W)]);
          if (nan ? v != v : v == yv) {
            found = ih * W + iw;
            if (!nan) break;  // the first maximum; for NaN, the last NaN tap
          }
        }
        if (!nan && found >= 0) break;
      }
    }
    argmax[e] = found;  // -1: y matches no tap (y not from this x): no gradient
  }
}

// torch's p_start / p_end: the outputs (along one dimension) whose windows may contain input
// position i (a superset under dilation; the index comparison decides).
__device__ __forceinline__ int64_t first_output(int64_t i, int64_t pad, int64_t k, int64_t d,
                                                int64_t s) {
  const int64_t span = (k - 1) * d + 1;
  return i + pad < span ? 0 : (i + pad - span) / s + 1;
}

__device__ __forceinline__ int64_t end_output(int64_t i, int64_t pad, int64_t out, int64_t s) {
  return min((i + pad) / s + 1, out);
}

template <typename scalar_t, typename acc_t, bool CL>
__global__ void max_pool2d_gather_kernel(const scalar_t* __restrict__ g,
                                         const int64_t* __restrict__ argmax,
                                         scalar_t* __restrict__ gx, int64_t total, int64_t C,
                                         int64_t H, int64_t W, int64_t Ho, int64_t Wo,
                                         MaxPoolParams p) {
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t n, c, ih, iw;
    decode<CL>(e, C, H, W, n, c, ih, iw);
    const int64_t ph0 = first_output(ih, p.ph, p.kh, p.dh, p.sh);
    const int64_t ph1 = end_output(ih, p.ph, Ho, p.sh);
    const int64_t pw0 = first_output(iw, p.pw, p.kw, p.dw, p.sw);
    const int64_t pw1 = end_output(iw, p.pw, Wo, p.sw);
    const int64_t me = ih * W + iw;
    if (CL && ph0 + 1 == ph1 && pw0 + 1 == pw1) {  // torch's single-candidate branch
      const int64_t o = offset_of<CL>(n, c, ph0, pw0, C, Ho, Wo);
      gx[e] = argmax[o] == me ? g[o] : scalar_t(0);
      continue;
    }
    acc_t acc = acc_t(0);
    for (int64_t oh = ph0; oh < ph1; ++oh) {
      for (int64_t ow = pw0; ow < pw1; ++ow) {
        const int64_t o = offset_of<CL>(n, c, oh, ow, C, Ho, Wo);
        if (argmax[o] == me) acc += static_cast<acc_t>(g[o]);
      }
    }
    gx[e] = static_cast<scalar_t>(acc);  // a plain cast, like torch's (this is its gradient)
  }
}

at::Tensor max_pool2d_backward_cuda(const at::Tensor& grad_in, const at::Tensor& x_in,
                                    const at::Tensor& y_in, at::IntArrayRef kernel_size,
                                    at::IntArrayRef stride, at::IntArrayRef padding,
                                    at::IntArrayRef dilation, bool ceil_mode) {
  constexpr const char* op = "tsgb_ext.max_pool2d_backward";
  cuda_detail::check_cuda(op, "x", x_in);
  const PoolShapes s = check_max_pool2d_backward_args(op, grad_in, x_in, y_in, kernel_size,
                                                      stride, padding, dilation, ceil_mode);
  c10::cuda::OptionalCUDAGuard device_guard(x_in.device());
  // torch's backward iterates in x's suggested format; so do the indices and the gather
  const at::MemoryFormat mf = pick_memory_format(x_in);
  const bool cl = mf == at::MemoryFormat::ChannelsLast;
  at::Tensor gx = at::empty({s.N, s.C, s.H, s.W}, x_in.options().memory_format(mf));
  if (gx.numel() == 0) return gx;

  const at::Tensor x = x_in.contiguous(mf);
  const at::Tensor y = y_in.contiguous(mf);
  const at::Tensor grad = grad_in.contiguous(mf);
  at::Tensor argmax = at::empty({s.N, s.C, s.Ho, s.Wo},
                                x_in.options().dtype(at::kLong).memory_format(mf));
  const Window2d& w = s.win;
  const MaxPoolParams params{w.kh, w.kw, w.sh, w.sw, w.ph, w.pw, w.dh, w.dw};
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t ytotal = y.numel(), xtotal = gx.numel();
  const unsigned int ygrid = cuda_detail::grid_for(ytotal, kThreads);
  const unsigned int xgrid = cuda_detail::grid_for(xtotal, kThreads);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "tsgb_max_pool2d_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
    const scalar_t* y_ptr = y.const_data_ptr<scalar_t>();
    const scalar_t* g_ptr = grad.const_data_ptr<scalar_t>();
    int64_t* a_ptr = argmax.mutable_data_ptr<int64_t>();
    scalar_t* gx_ptr = gx.mutable_data_ptr<scalar_t>();
    if (cl) {
      max_pool2d_argmax_kernel<scalar_t, acc_t, true><<<ygrid, kThreads, 0, stream>>>(
          x_ptr, y_ptr, a_ptr, ytotal, s.C, s.H, s.W, s.Ho, s.Wo, params);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      max_pool2d_gather_kernel<scalar_t, acc_t, true><<<xgrid, kThreads, 0, stream>>>(
          g_ptr, a_ptr, gx_ptr, xtotal, s.C, s.H, s.W, s.Ho, s.Wo, params);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      max_pool2d_argmax_kernel<scalar_t, acc_t, false><<<ygrid, kThreads, 0, stream>>>(
          x_ptr, y_ptr, a_ptr, ytotal, s.C, s.H, s.W, s.Ho, s.Wo, params);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      max_pool2d_gather_kernel<scalar_t, acc_t, false><<<xgrid, kThreads, 0, stream>>>(
          g_ptr, a_ptr, gx_ptr, xtotal, s.C, s.H, s.W, s.Ho, s.Wo, params);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return gx;
}

}  // namespace
}  // namespace tsgb

TORCH_LIBRARY_IMPL(tsgb_ext, CUDA, m) {
  m.impl("max_pool2d_backward", &tsgb::max_pool2d_backward_cuda);
}
