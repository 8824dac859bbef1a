// BatchNorm2d (eval) backward, CPU: gx = grad * y / (x + eps) with y = x * scale[c] + shift[c]
// recomputed in registers (eval BN is that per-channel affine map), so y is never re-read.
// grad sample b pairs with activation sample b % N.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "common/checks.h"
#include "common/tsgb_common.h"

namespace tsgb {
namespace {

constexpr const char* kOp = "tsgb_ext.batch_norm_backward";

template <typename scalar_t>
void batch_norm_backward_kernel(const at::Tensor& grad, const at::Tensor& x,
                                const at::Tensor& scale, const at::Tensor& shift, at::Tensor& gx,
                                double eps_d, bool channels_last) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = grad.size(0), N = x.size(0), C = x.size(1);
  const int64_t HW = x.size(2) * x.size(3);
  const acc_t eps = static_cast<acc_t>(eps_d);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* gp = grad.const_data_ptr<scalar_t>();
  scalar_t* gxp = gx.mutable_data_ptr<scalar_t>();
  const acc_t* sc = scale.const_data_ptr<acc_t>();
  const acc_t* sh = shift.const_data_ptr<acc_t>();
  const int64_t act_elems = N * C * HW;

  if (!channels_last) {
    // rows = (b, c) planes of HW elements
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, HW));
    at::parallel_for(0, B * C, grain, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t c = row % C;
        const acc_t s = sc[c], t = sh[c];
        const scalar_t* g = gp + row * HW;
        const scalar_t* xr = xp + (row * HW) % act_elems;  // sample b % N, same channel
        scalar_t* o = gxp + row * HW;
        for (int64_t i = 0; i < HW; ++i) {
          const acc_t xv = static_cast<acc_t>(xr[i]);
          o[i] = saturate_cast<scalar_t>(static_cast<acc_t>(g[i]) * (xv * s + t) / (xv + eps));
        }
      }
    });
  } else {
    // rows = (b, pixel) of C contiguous channels
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, C));
    at::parallel_for(0, B * HW, grain, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const scalar_t* g = gp + row * C;
        const scalar_t* xr = xp + (row * C) % act_elems;
        scalar_t* o = gxp + row * C;
        for (int64_t c = 0; c < C; ++c) {
          const acc_t xv = static_cast<acc_t>(xr[c]);
          o[c] = saturate_cast<scalar_t>(static_cast<acc_t>(g[c]) * (xv * sc[c] + sh[c]) / (xv + eps));
        }
      }
    });
  }
}

at::Tensor batch_norm_backward_cpu(const at::Tensor& grad, const at::Tensor& x,
                                   const at::Tensor& scale, const at::Tensor& shift, double eps) {
  TORCH_CHECK(x.device().is_cpu(), kOp, ": CPU kernel called with x on ", x.device());
  const int64_t B = check_batch_norm_backward_args(kOp, grad, x, scale, shift);
  const int64_t C = x.size(1), H = x.size(2), W = x.size(3);
  const at::MemoryFormat fmt = pick_memory_format(x);
  if (x.numel() == 0 || grad.numel() == 0) {
    return at::zeros({B, C, H, W}, x.options().memory_format(fmt));
  }
  const at::Tensor xc = x.contiguous(fmt);
  const at::Tensor gc = grad.contiguous(fmt);
  at::Tensor gx = at::empty({B, C, H, W}, x.options().memory_format(fmt));
  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "tsgb_batch_norm_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
    const at::Tensor sc = scale.to(acc_type).contiguous();
    const at::Tensor sh = shift.to(acc_type).contiguous();
    batch_norm_backward_kernel<scalar_t>(gc, xc, sc, sh, gx, eps, cl);
  });
  return gx;
}

}  // namespace
}  // namespace tsgb

TORCH_LIBRARY_IMPL(tsgb_ext, CPU, m) {
  m.impl("batch_norm_backward", &tsgb::batch_norm_backward_cpu);
}
