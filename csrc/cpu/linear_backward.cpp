// TSGB-FC backward (the classifier), CPU:
//   zp = x W+^T, zn = x W-^T                       (per activation sample, (N, out))
//   beta = zp / |zn| where |zn| > eps, else 0      (defined, never NaN/inf for finite input;
//                                                   clamped to the accumulation type's range)
//   gx = grad W+ + (grad * beta[b % N]) W-          ((B, in), B = T*N)
// A small layer: the products go to at::mm, computed in the opmath dtype (float for half types);
// half-type results saturate at the type's largest finite value.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <limits>

#include "common/checks.h"
#include "common/tsgb_common.h"

namespace tsgb {
namespace {

constexpr const char* kOp = "tsgb_ext.linear_backward";

at::Tensor linear_backward_cpu(const at::Tensor& grad, const at::Tensor& x,
                               const at::Tensor& weight_pos, const at::Tensor& weight_neg,
                               double eps) {
  TORCH_CHECK(x.device().is_cpu(), kOp, ": CPU kernel called with x on ", x.device());
  const int64_t T = check_linear_backward_args(kOp, grad, x, weight_pos, weight_neg);
  const int64_t B = grad.size(0), in = x.size(1), out = grad.size(1);
  if (B == 0 || in == 0 || out == 0) {
    return at::zeros({B, in}, x.options());
  }
  at::ScalarType acc_type = x.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "tsgb_linear_backward_cpu", [&] {
    acc_type = c10::CppTypeToScalarType<at::opmath_type<scalar_t>>::value;
  });
  const at::Tensor xf = x.to(acc_type);
  const at::Tensor gf = grad.to(acc_type);
  const at::Tensor wp = weight_pos.to(acc_type);
  const at::Tensor wn = weight_neg.to(acc_type);
  const at::Tensor zp = at::mm(xf, wp.t());
  const at::Tensor zn_abs = at::mm(xf, wn.t()).abs_();
  const at::Tensor valid = zn_abs > eps;
  // Divide only where valid so that no inf/NaN is ever formed; clamp to the finite range (as
  // the CUDA kernel does): zp / |zn| can exceed float's range, and inf * 0 in the product
  // with W- would be NaN.
  const at::Tensor safe = at::where(valid, zn_abs, at::ones_like(zn_abs));
  const double acc_max = acc_type == at::kDouble ? std::numeric_limits<double>::max()
                                                 : std::numeric_limits<float>::max();
  at::Tensor beta = at::where(valid, (zp / safe).clamp_(-acc_max, acc_max), at::zeros_like(zp));
  if (T > 1) beta = beta.repeat({T, 1});  // row b is activation sample b % N
  at::Tensor gx = at::mm(gf, wp);
  gx.addmm_(gf * beta, wn);
  // half types saturate at their largest finite value, like every kernel's saturate_cast
  // (x nearly orthogonal to W- gives a beta far beyond float16's 65504)
  if (const double m = half_type_max(x.scalar_type()); m > 0) gx.clamp_(-m, m);
  return gx.to(x.scalar_type());
}

}  // namespace
}  // namespace tsgb

TORCH_LIBRARY_IMPL(tsgb_ext, CPU, m) {
  m.impl("linear_backward", &tsgb::linear_backward_cpu);
}
