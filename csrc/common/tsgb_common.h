// Input checks and window/shape arithmetic shared by the CPU and CUDA kernels.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstdint>

namespace tsgb {

// A 2-D window geometry (conv or pool): kernel, stride, padding, dilation.
struct Window2d {
  int64_t kh, kw, sh, sw, ph, pw, dh, dw;
};

inline Window2d make_window(const char* op, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                            at::IntArrayRef padding, at::IntArrayRef dilation) {
  TORCH_CHECK(kernel_size.size() == 2, op, ": kernel_size must have 2 elements, got ",
              kernel_size);
  TORCH_CHECK(stride.size() == 2, op, ": stride must have 2 elements, got ", stride);
  TORCH_CHECK(padding.size() == 2, op, ": padding must have 2 elements, got ", padding);
  TORCH_CHECK(dilation.size() == 2, op, ": dilation must have 2 elements, got ", dilation);
  Window2d w{kernel_size[0], kernel_size[1], stride[0], stride[1],
             padding[0],     padding[1],     dilation[0], dilation[1]};
  TORCH_CHECK(w.kh > 0 && w.kw > 0, op, ": kernel_size must be positive, got ", kernel_size);
  TORCH_CHECK(w.sh > 0 && w.sw > 0, op, ": stride must be positive, got ", stride);
  TORCH_CHECK(w.ph >= 0 && w.pw >= 0, op, ": padding must be non-negative, got ", padding);
  TORCH_CHECK(w.dh > 0 && w.dw > 0, op, ": dilation must be positive, got ", dilation);
  return w;
}

// Output extent of a convolution window along one dimension (floor mode).
inline int64_t conv_out_size(int64_t in, int64_t k, int64_t s, int64_t p, int64_t d) {
  return (in + 2 * p - d * (k - 1) - 1) / s + 1;
}

inline void check_4d(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.dim() == 4, op, ": ", name, " must be 4-D (N, C, H, W), got shape ", t.sizes());
}

inline void check_floating(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name,
              " must be a floating tensor, got ", t.scalar_type());
}

inline void check_same_device_dtype(const char* op, const char* name, const at::Tensor& t,
                                    const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " must be on ", ref.device(),
              " like x, got ", t.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " must have dtype ",
              ref.scalar_type(), " like x, got ", t.scalar_type());
}

// grad's batch must be a positive multiple T*N of the activations' batch N (T targets).
inline int64_t check_target_batch(const char* op, const at::Tensor& grad, int64_t n) {
  const int64_t b = grad.size(0);
  if (n == 0) {
    TORCH_CHECK(b == 0, op, ": grad batch must be 0 when x's batch is 0, got ", b);
    return 1;
  }
  TORCH_CHECK(b > 0 && b % n == 0, op, ": grad batch must be a positive multiple of x's batch ",
              n, " (T targets x N samples), got ", b);
  return b / n;
}

// The memory format the kernels should iterate in: channels_last when the activations are.
inline at::MemoryFormat pick_memory_format(const at::Tensor& x) {
  return x.suggest_memory_format() == at::MemoryFormat::ChannelsLast
             ? at::MemoryFormat::ChannelsLast
             : at::MemoryFormat::Contiguous;
}

}  // namespace tsgb

namespace tsgb {

// Output extent of a pooling window along one dimension, exactly like torch's
// pooling_output_shape (dilation 1): with ceil_mode the last window must start inside the
// input or the left padding, otherwise it is dropped.
inline int64_t pool_out_size(int64_t in, int64_t k, int64_t s, int64_t p, bool ceil_mode) {
  const int64_t num = in + 2 * p - (k - 1) - 1 + (ceil_mode ? s - 1 : 0);
  // floor division (num may be negative for tiny inputs)
  int64_t out = (num >= 0 ? num / s : -((-num + s - 1) / s)) + 1;
  if (ceil_mode && (out - 1) * s >= in + p) {
    --out;
  }
  return out;
}

// Ceiling division for a >= 0, b > 0.
inline int64_t ceil_div_nonneg(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace tsgb
