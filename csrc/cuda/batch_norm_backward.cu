// TSGB BatchNorm2d backward on CUDA: gx = grad * y / (x + eps), y = x * scale[c] + shift[c].
//
// One fused elementwise kernel: y is recomputed in registers, the product (g * y) / (x + eps)
// is formed in fp32 (fp64 for double) and only then cast, so fp16's 1 / (x + eps) overflow can
// never produce inf * 0 = NaN; fp16/bf16 results beyond the type's range saturate to its largest
// finite value (finite input -> finite output). Bytes: grad and x read once, gx written once
// (x re-read per target when grad's batch is T * N; scale/shift are C floats, cache-resident).
//
// Vectorised 16-byte loads/stores when the pointers are aligned and a vector never straddles a
// channel change in a way the index math can't follow (NCHW: H*W % V == 0, so a vector has one
// channel; channels_last: C % V == 0, so a vector has V consecutive channels of one pixel).
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "cuda/tsgb_cuda.cuh"

namespace tsgb {
namespace {

using cuda_detail::kThreads;
using cuda_detail::VecT;

template <typename scalar_t, typename acc_t, typename index_t, int V, bool CL>
__global__ void bn_backward_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ x,
                                   scalar_t* __restrict__ out, const acc_t* __restrict__ scale,
                                   const acc_t* __restrict__ shift, index_t nvec,
                                   index_t xnumel, index_t C, index_t HW, acc_t eps) {
  using vec_t = VecT<scalar_t, V>;
  const vec_t* gv = reinterpret_cast<const vec_t*>(g);
  const vec_t* xv = reinterpret_cast<const vec_t*>(x);
  vec_t* ov = reinterpret_cast<vec_t*>(out);
  for (index_t v = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; v < nvec;
       v += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const index_t e0 = v * V;
    const index_t xe0 = e0 % xnumel;  // batch is outermost in both layouts: sample b -> b % N
    const vec_t ga = gv[v];
    const vec_t xa = xv[xe0 / V];
    vec_t res;
    const index_t c0 = CL ? e0 % C : (e0 / HW) % C;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const index_t c = CL ? c0 + k : c0;
      const acc_t xf = static_cast<acc_t>(xa.v[k]);
      const acc_t yf = xf * scale[c] + shift[c];
      const acc_t num = static_cast<acc_t>(ga.v[k]) * yf;
      res.v[k] = saturate_cast<scalar_t>(num / (xf + eps));
    }
    ov[v] = res;
  }
}

template <typename scalar_t, typename acc_t, int V>
void launch_bn(bool cl, const scalar_t* g, const scalar_t* x, scalar_t* out, const acc_t* scale,
               const acc_t* shift, int64_t numel, int64_t xnumel, int64_t C, int64_t HW,
               acc_t eps, cudaStream_t stream) {
  const int64_t nvec = numel / V;
  const unsigned int grid = cuda_detail::grid_for(nvec, kThreads);
  constexpr int64_t kIntMax = std::numeric_limits<int32_t>::max() / 2;
  if (numel < kIntMax) {  // 32-bit index math when it fits: far cheaper division
    if (cl) {
      bn_backward_kernel<scalar_t, acc_t, int32_t, V, true>
          <<<grid, kThreads, 0, stream>>>(g, x, out, scale, shift, nvec, xnumel, C, HW, eps);
    } else {
      bn_backward_kernel<scalar_t, acc_t, int32_t, V, false>
          <<<grid, kThreads, 0, stream>>>(g, x, out, scale, shift, nvec, xnumel, C, HW, eps);
    }
  } else {
    if (cl) {
      bn_backward_kernel<scalar_t, acc_t, int64_t, V, true>
          <<<grid, kThreads, 0, stream>>>(g, x, out, scale, shift, nvec, xnumel, C, HW, eps);
    } else {
      bn_backward_kernel<scalar_t, acc_t, int64_t, V, false>
          <<<grid, kThreads, 0, stream>>>(g, x, out, scale, shift, nvec, xnumel, C, HW, eps);
    }
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor batch_norm_backward_cuda(const at::Tensor& grad_in, const at::Tensor& x_in,
                                    const at::Tensor& scale_in, const at::Tensor& shift_in,
                                    double eps) {
  constexpr const char* op = "tsgb_ext.batch_norm_backward";
  cuda_detail::check_cuda(op, "x", x_in);
  const int64_t B = check_batch_norm_backward_args(op, grad_in, x_in, scale_in, shift_in);
  const int64_t C = x_in.size(1), H = x_in.size(2), W = x_in.size(3);

  c10::cuda::OptionalCUDAGuard device_guard(x_in.device());
  const at::MemoryFormat mf = pick_memory_format(x_in);
  const bool cl = mf == at::MemoryFormat::ChannelsLast;
  at::Tensor gx = at::empty({B, C, H, W}, x_in.options().memory_format(mf));
  if (gx.numel() == 0) return gx;

  const at::Tensor x = x_in.contiguous(mf);
  const at::Tensor grad = grad_in.contiguous(mf);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t HW = H * W;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "tsgb_batch_norm_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
    const at::Tensor scale = scale_in.to(acc_type).contiguous();
    const at::Tensor shift = shift_in.to(acc_type).contiguous();
    const scalar_t* g_ptr = grad.const_data_ptr<scalar_t>();
    const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
    scalar_t* o_ptr = gx.mutable_data_ptr<scalar_t>();
    constexpr int V = 16 / sizeof(scalar_t);
    const bool vec_ok = cuda_detail::aligned_to(g_ptr, 16) && cuda_detail::aligned_to(x_ptr, 16) &&
                        cuda_detail::aligned_to(o_ptr, 16) && (cl ? C % V == 0 : HW % V == 0);
    if (vec_ok) {
      launch_bn<scalar_t, acc_t, V>(cl, g_ptr, x_ptr, o_ptr, scale.const_data_ptr<acc_t>(),
                                    shift.const_data_ptr<acc_t>(), gx.numel(), x.numel(), C, HW,
                                    static_cast<acc_t>(eps), stream);
    } else {
      launch_bn<scalar_t, acc_t, 1>(cl, g_ptr, x_ptr, o_ptr, scale.const_data_ptr<acc_t>(),
                                    shift.const_data_ptr<acc_t>(), gx.numel(), x.numel(), C, HW,
                                    static_cast<acc_t>(eps), stream);
    }
  });
  return gx;
}

}  // namespace
}  // namespace tsgb

TORCH_LIBRARY_IMPL(tsgb_ext, CUDA, m) {
  m.impl("batch_norm_backward", &tsgb::batch_norm_backward_cuda);
}
