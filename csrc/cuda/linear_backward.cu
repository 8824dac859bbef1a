// TSGB-FC backward on CUDA (the classifier rule of shared/TSGB_SPEC.md):
//   zp = x @ W+^T,  zn = x @ W-^T,  beta = zp / |zn|  (0 where |zn| <= eps)
//   gx = grad @ W+ + (grad * beta) @ W-
// grad (T*N, out) pairs sample b with x's sample b % N.
//
// Matrix products go to cuBLAS (at::mm / at::addmm) in fp32 for fp16/bf16 input (fp64 for
// double), the result is cast to x's dtype. One small elementwise kernel forms grad * beta
// directly (beta itself is never stored). beta is defined as 0 where |zn| <= eps (x orthogonal
// to every negative weight: no negative evidence to balance) and clamped to the finite range,
// and fp16/bf16 results saturate at the type's largest finite value, so finite input never
// yields NaN or inf.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "cuda/tsgb_cuda.cuh"

namespace tsgb {
namespace {

using cuda_detail::kThreads;

// gb[b, o] = grad[b, o] * beta[b % N, o], beta = zp / |zn| or 0. zp, zn: (N, out); gb: (B, out).
template <typename acc_t>
__global__ void grad_beta_kernel(const acc_t* __restrict__ grad, const acc_t* __restrict__ zp,
                                 const acc_t* __restrict__ zn, acc_t* __restrict__ gb,
                                 int64_t total, int64_t znumel, acc_t eps) {
  constexpr acc_t kMax = std::numeric_limits<acc_t>::max();
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t z = e % znumel;  // row-major (B, out): b -> b % N
    const acc_t den = zn[z] < acc_t(0) ? -zn[z] : zn[z];
    acc_t beta = acc_t(0);
    if (den > eps) {
      beta = zp[z] / den;
      beta = beta > kMax ? kMax : (beta < -kMax ? -kMax : beta);
    }
    gb[e] = grad[e] * beta;
  }
}

at::Tensor linear_backward_cuda(const at::Tensor& grad_in, const at::Tensor& x_in,
                                const at::Tensor& wpos_in, const at::Tensor& wneg_in,
                                double eps) {
  constexpr const char* op = "tsgb_ext.linear_backward";
  cuda_detail::check_cuda(op, "x", x_in);
  check_linear_backward_args(op, grad_in, x_in, wpos_in, wneg_in);
  const int64_t B = grad_in.size(0), N = x_in.size(0), in = x_in.size(1);
  const int64_t out = wpos_in.size(0);

  c10::cuda::OptionalCUDAGuard device_guard(x_in.device());
  if (B == 0 || in == 0) return at::empty({B, in}, x_in.options());
  if (out == 0) return at::zeros({B, in}, x_in.options());

  const at::ScalarType acc_type =
      x_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor x = x_in.to(acc_type);
  const at::Tensor wpos = wpos_in.to(acc_type);
  const at::Tensor wneg = wneg_in.to(acc_type);
  const at::Tensor grad = grad_in.to(acc_type).contiguous();
  const at::Tensor zp = at::mm(x, wpos.t()).contiguous();  // (N, out)
  const at::Tensor zn = at::mm(x, wneg.t()).contiguous();
  at::Tensor gb = at::empty({B, out}, grad.options());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t total = B * out;
  const unsigned int grid = cuda_detail::grid_for(total, kThreads);
  AT_DISPATCH_FLOATING_TYPES(acc_type, "tsgb_linear_backward_cuda", [&] {
    grad_beta_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        grad.const_data_ptr<scalar_t>(), zp.const_data_ptr<scalar_t>(),
        zn.const_data_ptr<scalar_t>(), gb.mutable_data_ptr<scalar_t>(), total, N * out,
        static_cast<scalar_t>(eps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  // gx = grad @ W+ + gb @ W-
  at::Tensor gx = at::addmm(at::mm(grad, wpos), gb, wneg);
  // half types saturate at their largest finite value, like every kernel's saturate_cast
  // (x nearly orthogonal to W- gives a beta far beyond float16's 65504)
  if (const double m = half_type_max(x_in.scalar_type()); m > 0) gx.clamp_(-m, m);
  return gx.to(x_in.scalar_type());
}

}  // namespace
}  // namespace tsgb

TORCH_LIBRARY_IMPL(tsgb_ext, CUDA, m) {
  m.impl("linear_backward", &tsgb::linear_backward_cuda);
}
