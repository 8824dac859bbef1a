// One argument check per backward rule, shared by the CPU and CUDA kernels: both devices
// accept and refuse exactly the same arguments with the same messages (op, argument, shape).
// The device-specific check (x on the kernel's device) stays in each kernel file.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <optional>
#include <utility>

#include "common/tsgb_common.h"

namespace tsgb {

// grad, x and y of a windowed rule: 4-D, floating, on one device in one dtype.
inline void check_grad_x_y(const char* op, const at::Tensor& grad, const at::Tensor& x,
                           const at::Tensor& y) {
  check_4d(op, "grad", grad);
  check_4d(op, "x", x);
  check_4d(op, "y", y);
  check_floating(op, "x", x);
  check_same_device_dtype(op, "grad", grad, x);
  check_same_device_dtype(op, "y", y, x);
}

// Sizes every conv rule entry point needs after the checks.
struct ConvShapes {
  Window2d win;
  int64_t B, N, C, H, W, K, Ho, Wo;
};

// conv2d_backward and conv2d_bn_backward (bn given).
inline ConvShapes check_conv2d_backward_args(const char* op, const at::Tensor& grad,
                                             const at::Tensor& x, const at::Tensor& y,
                                             at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                             at::IntArrayRef padding, at::IntArrayRef dilation,
                                             int64_t groups, const BnArgs* bn) {
  check_grad_x_y(op, grad, x, y);
  if (bn != nullptr) {
    check_bn_params(op, y, bn->running_mean, bn->running_var, bn->weight, bn->bias, bn->act);
  }
  const Window2d win = make_window(op, kernel_size, stride, padding, dilation);
  TORCH_CHECK(groups > 0, op, ": groups must be positive, got ", groups);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t K = y.size(1);
  TORCH_CHECK(C % groups == 0, op, ": x's channels (", C, ") must be divisible by groups (",
              groups, "); x has shape ", x.sizes());
  TORCH_CHECK(K % groups == 0, op, ": y's channels (", K, ") must be divisible by groups (",
              groups, "); y has shape ", y.sizes());
  const int64_t Ho = conv_out_size(H, win.kh, win.sh, win.ph, win.dh);
  const int64_t Wo = conv_out_size(W, win.kw, win.sw, win.pw, win.dw);
  TORCH_CHECK(Ho >= 1 && Wo >= 1, op, ": the window (kernel_size ", kernel_size, ", stride ",
              stride, ", padding ", padding, ", dilation ", dilation,
              ") does not fit x's spatial size; x has shape ", x.sizes());
  TORCH_CHECK(y.size(0) == N && y.size(2) == Ho && y.size(3) == Wo, op, ": y must have shape (",
              N, ", K, ", Ho, ", ", Wo, ") for x of shape ", x.sizes(),
              " and this window, got ", y.sizes());
  TORCH_CHECK(grad.size(1) == K && grad.size(2) == Ho && grad.size(3) == Wo, op,
              ": grad must have shape (B, ", K, ", ", Ho, ", ", Wo, ") like y, got ",
              grad.sizes());
  check_target_batch(op, grad, N);
  return {win, grad.size(0), N, C, H, W, K, Ho, Wo};
}

// batch_norm_backward. Returns the gradient batch B.
inline int64_t check_batch_norm_backward_args(const char* op, const at::Tensor& grad,
                                              const at::Tensor& x, const at::Tensor& scale,
                                              const at::Tensor& shift) {
  check_4d(op, "grad", grad);
  check_4d(op, "x", x);
  check_floating(op, "x", x);
  check_same_device_dtype(op, "grad", grad, x);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"scale", scale},
                                 {"shift", shift}}) {
    TORCH_CHECK(t.dim() == 1 && t.size(0) == C, op, ": ", name, " must have shape (", C,
                ",) (x's channels; x has shape ", x.sizes(), "), got ", t.sizes());
    check_floating(op, name, t);
    TORCH_CHECK(t.device() == x.device(), op, ": ", name, " must be on ", x.device(),
                " like x, got ", t.device());
  }
  TORCH_CHECK(grad.size(1) == C && grad.size(2) == H && grad.size(3) == W, op,
              ": grad must have shape (B, ", C, ", ", H, ", ", W, ") like x, got ", grad.sizes());
  check_target_batch(op, grad, N);
  return grad.size(0);
}

// avg_pool2d_backward. An empty stride means stride = kernel_size (torch's avg_pool2d).
struct PoolShapes {
  Window2d win;
  int64_t B, N, C, H, W, Ho, Wo;
};

inline PoolShapes check_avg_pool2d_backward_args(const char* op, const at::Tensor& grad,
                                                 const at::Tensor& x, const at::Tensor& y,
                                                 at::IntArrayRef kernel_size,
                                                 at::IntArrayRef stride, at::IntArrayRef padding,
                                                 bool ceil_mode,
                                                 std::optional<int64_t> divisor_override) {
  check_grad_x_y(op, grad, x, y);
  const at::IntArrayRef st = stride.empty() ? kernel_size : stride;
  const int64_t one[2] = {1, 1};
  const Window2d win = make_window(op, kernel_size, st, padding, at::IntArrayRef(one, 2));
  TORCH_CHECK(win.ph <= win.kh / 2 && win.pw <= win.kw / 2, op,
              ": padding must be at most half of kernel_size, got padding ", padding,
              " and kernel_size ", kernel_size);
  TORCH_CHECK(!divisor_override.has_value() || divisor_override.value() != 0, op,
              ": divisor_override must be non-zero");
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Ho = pool_out_size(H, win.kh, win.sh, win.ph, ceil_mode);
  const int64_t Wo = pool_out_size(W, win.kw, win.sw, win.pw, ceil_mode);
  TORCH_CHECK(Ho >= 1 && Wo >= 1, op, ": the window (kernel_size ", kernel_size, ", stride ",
              st, ", padding ", padding, ") does not fit x's spatial size; x has shape ",
              x.sizes());
  TORCH_CHECK(y.size(0) == N && y.size(1) == C && y.size(2) == Ho && y.size(3) == Wo, op,
              ": y must have shape (", N, ", ", C, ", ", Ho, ", ", Wo, ") for x of shape ",
              x.sizes(), ", kernel_size ", kernel_size, ", stride ", st, ", padding ", padding,
              ", ceil_mode ", ceil_mode, "; got ", y.sizes());
  TORCH_CHECK(grad.size(1) == C && grad.size(2) == Ho && grad.size(3) == Wo, op,
              ": grad must have shape (B, ", C, ", ", Ho, ", ", Wo, ") like y, got ",
              grad.sizes());
  check_target_batch(op, grad, N);
  return {win, grad.size(0), N, C, H, W, Ho, Wo};
}

// linear_backward. Returns T (targets per sample).
inline int64_t check_linear_backward_args(const char* op, const at::Tensor& grad,
                                          const at::Tensor& x, const at::Tensor& weight_pos,
                                          const at::Tensor& weight_neg) {
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D (N, in), got shape ", x.sizes());
  TORCH_CHECK(grad.dim() == 2, op, ": grad must be 2-D (B, out), got shape ", grad.sizes());
  TORCH_CHECK(weight_pos.dim() == 2, op, ": weight_pos must be 2-D (out, in), got shape ",
              weight_pos.sizes());
  TORCH_CHECK(weight_neg.dim() == 2, op, ": weight_neg must be 2-D (out, in), got shape ",
              weight_neg.sizes());
  check_floating(op, "x", x);
  check_same_device_dtype(op, "grad", grad, x);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"weight_pos", weight_pos},
                                 {"weight_neg", weight_neg}}) {
    check_floating(op, name, t);
    TORCH_CHECK(t.device() == x.device(), op, ": ", name, " must be on ", x.device(),
                " like x, got ", t.device());
  }
  const int64_t N = x.size(0), in = x.size(1), out = weight_pos.size(0);
  TORCH_CHECK(weight_pos.size(1) == in, op, ": weight_pos must have shape (out, ", in,
              ") for x of shape ", x.sizes(), ", got ", weight_pos.sizes());
  TORCH_CHECK(weight_neg.sizes() == weight_pos.sizes(), op,
              ": weight_neg must have weight_pos's shape ", weight_pos.sizes(), ", got ",
              weight_neg.sizes());
  TORCH_CHECK(grad.size(1) == out, op, ": grad must have shape (B, ", out,
              ") for weights of shape ", weight_pos.sizes(), ", got ", grad.sizes());
  return check_target_batch(op, grad, N);
}

// max_pool2d (forward and the ordinary-gradient backward): torch's max_pool2d arguments and
// its output size (dilation included; ceil_mode windows start inside the padded input).
inline int64_t max_pool_out_size(int64_t in, int64_t k, int64_t s, int64_t p, int64_t d,
                                 bool ceil_mode) {
  const int64_t span = in + 2 * p - d * (k - 1) - 1 + (ceil_mode ? s - 1 : 0);
  int64_t out = (span >= 0 ? span / s : -((-span + s - 1) / s)) + 1;
  if (ceil_mode && (out - 1) * s >= in + p) --out;
  return out;
}

inline PoolShapes check_max_pool2d_args(const char* op, const at::Tensor& x,
                                        at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                        at::IntArrayRef padding, at::IntArrayRef dilation,
                                        bool ceil_mode) {
  check_4d(op, "x", x);
  check_floating(op, "x", x);
  const Window2d win = make_window(op, kernel_size, stride, padding, dilation);
  TORCH_CHECK(win.ph <= win.kh / 2 && win.pw <= win.kw / 2, op,
              ": padding must be at most half of kernel_size, got padding ", padding,
              " and kernel_size ", kernel_size);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Ho = max_pool_out_size(H, win.kh, win.sh, win.ph, win.dh, ceil_mode);
  const int64_t Wo = max_pool_out_size(W, win.kw, win.sw, win.pw, win.dw, ceil_mode);
  TORCH_CHECK(Ho >= 1 && Wo >= 1, op, ": the window (kernel_size ", kernel_size, ", stride ",
              stride, ", padding ", padding, ", dilation ", dilation,
              ") does not fit x's spatial size; x has shape ", x.sizes());
  return {win, N, N, C, H, W, Ho, Wo};
}

inline PoolShapes check_max_pool2d_backward_args(const char* op, const at::Tensor& grad,
                                                 const at::Tensor& x, const at::Tensor& y,
                                                 at::IntArrayRef kernel_size,
                                                 at::IntArrayRef stride, at::IntArrayRef padding,
                                                 at::IntArrayRef dilation, bool ceil_mode) {
  check_grad_x_y(op, grad, x, y);
  const PoolShapes s = check_max_pool2d_args(op, x, kernel_size, stride, padding, dilation,
                                             ceil_mode);
  TORCH_CHECK(y.size(0) == s.N && y.size(1) == s.C && y.size(2) == s.Ho && y.size(3) == s.Wo,
              op, ": y must have shape (", s.N, ", ", s.C, ", ", s.Ho, ", ", s.Wo,
              ") for x of shape ", x.sizes(), " and this window, got ", y.sizes());
  TORCH_CHECK(grad.sizes() == y.sizes(), op, ": grad must have y's shape ", y.sizes(), ", got ",
              grad.sizes());
  return s;
}

}  // namespace tsgb
