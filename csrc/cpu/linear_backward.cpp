// TSGB-FC backward (the classifier), CPU:
//   zp = x W+^T, zn = x W-^T                       (per activation sample, (N, out))
//   beta = zp / |zn| where |zn| > eps, else 0      (defined, never NaN/inf for finite input)
//   gx = grad W+ + (grad * beta[b % N]) W-          ((B, in), B = T*N)
// A small layer: the products go to at::mm, computed in the opmath dtype (float for half types).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "common/tsgb_common.h"

namespace tsgb {
namespace {

constexpr const char* kOp = "tsgb_ext.linear_backward";

at::Tensor linear_backward_cpu(const at::Tensor& grad, const at::Tensor& x,
                               const at::Tensor& weight_pos, const at::Tensor& weight_neg,
                               double eps) {
  TORCH_CHECK(grad.dim() == 2, kOp, ": grad must be 2-D (B, out), got shape ", grad.sizes());
  TORCH_CHECK(x.dim() == 2, kOp, ": x must be 2-D (N, in), got shape ", x.sizes());
  TORCH_CHECK(weight_pos.dim() == 2, kOp, ": weight_pos must be 2-D (out, in), got shape ",
              weight_pos.sizes());
  TORCH_CHECK(weight_neg.dim() == 2, kOp, ": weight_neg must be 2-D (out, in), got shape ",
              weight_neg.sizes());
  check_floating(kOp, "x", x);
  check_same_device_dtype(kOp, "grad", grad, x);
  check_floating(kOp, "weight_pos", weight_pos);
  check_floating(kOp, "weight_neg", weight_neg);
  TORCH_CHECK(x.device().is_cpu(), kOp, ": CPU kernel called with x on ", x.device());
  TORCH_CHECK(weight_pos.device() == x.device(), kOp, ": weight_pos must be on ", x.device(),
              " like x, got ", weight_pos.device());
  TORCH_CHECK(weight_neg.device() == x.device(), kOp, ": weight_neg must be on ", x.device(),
              " like x, got ", weight_neg.device());
  const int64_t N = x.size(0), in = x.size(1), out = grad.size(1);
  TORCH_CHECK(weight_pos.size(0) == out && weight_pos.size(1) == in, kOp,
              ": weight_pos must have shape (", out, ", ", in, ") = (grad's out, x's in), got ",
              weight_pos.sizes());
  TORCH_CHECK(weight_neg.sizes() == weight_pos.sizes(), kOp,
              ": weight_neg must have weight_pos's shape ", weight_pos.sizes(), ", got ",
              weight_neg.sizes());
  const int64_t B = grad.size(0);
  const int64_t T = check_target_batch(kOp, grad, N);
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
  // Divide only where valid so that no inf/NaN is ever formed.
  const at::Tensor safe = at::where(valid, zn_abs, at::ones_like(zn_abs));
  at::Tensor beta = at::where(valid, zp / safe, at::zeros_like(zp));
  if (T > 1) beta = beta.repeat({T, 1});  // row b is activation sample b % N
  at::Tensor gx = at::mm(gf, wp);
  gx.addmm_(gf * beta, wn);
  return gx.to(x.scalar_type());
}

}  // namespace
}  // namespace tsgb

TORCH_LIBRARY_IMPL(tsgb_ext, CPU, m) {
  m.impl("linear_backward", &tsgb::linear_backward_cpu);
}
