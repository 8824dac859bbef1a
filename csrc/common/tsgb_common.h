// Input checks and window/shape arithmetic shared by the CPU and CUDA kernels.
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <type_traits>
#include <vector>

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

// Reuse of activation memory across CPU calls (csrc/cpu/activation_cache.cpp): hold/release
// keep freed blocks for reuse while any holder exists; inside enter/exit, this thread's CPU
// allocations of 64 KiB and more come from the cache. stats: {installed, holders,
// cached bytes, bytes in use, hits, misses, bound (the largest single call's working set)}.
void activation_cache_hold();
void activation_cache_release();
void activation_scope_enter();
void activation_scope_exit();
std::vector<int64_t> activation_cache_stats();

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

// The largest finite float16 and bfloat16 values.
constexpr float kHalfMax = 65504.0f;
constexpr float kBFloat16Max = 3.38953139e38f;

// The one cast of a result from the accumulation type to the stored type, CPU and CUDA.
// Values beyond a half type's range saturate to its largest finite value instead of becoming
// inf (the rules divide by x + 1e-10, so a float32-finite result can exceed float16's 65504,
// and inf * 0 in the next layer is NaN); NaN stays NaN. Float and double cast plainly.
template <typename T, typename A>
C10_HOST_DEVICE inline T saturate_cast(A v) {
  if constexpr (std::is_same_v<T, c10::Half> || std::is_same_v<T, c10::BFloat16>) {
    constexpr float kMax = std::is_same_v<T, c10::Half> ? kHalfMax : kBFloat16Max;
    const float f = static_cast<float>(v);
    return static_cast<T>(f > kMax ? kMax : (f < -kMax ? -kMax : f));
  } else {
    return static_cast<T>(v);
  }
}

// The largest finite value of a half type (for ATen-op paths that clamp before casting).
inline double half_type_max(at::ScalarType t) {
  return t == at::kHalf ? kHalfMax : (t == at::kBFloat16 ? kBFloat16Max : 0.0);
}

}  // namespace tsgb

namespace tsgb {

// Activations a fused conv -> BatchNorm (eval) block may end with (conv2d_bn_act).
enum BnAct : int64_t { kActNone = 0, kActRelu = 1, kActRelu6 = 2 };

// Per-channel parameters of the BatchNorm (and activation) folded into the conv rule.
template <typename acc_t>
struct BnFold {
  const acc_t* scale;  // (K,) eval BN as an affine map: yb = y * scale[k] + shift[k]
  const acc_t* shift;
  acc_t div_eps;       // the BN rule's divisor stabiliser: the spec's eps (1e-10), never the
                       // module's eps (that one is inside scale, i.e. inside the forward)
  int64_t act;         // BnAct
};

// The conv rule's product g_conv * y for a conv -> BN -> activation block, from the gradient
// g at the block's output (shared/TSGB_SPEC.md, relevance view). The BN rule sends
// g_bn * yb / (y + 1e-10) to the conv output y (the spec's eps, not the module's: the module's
// eps is inside scale), and the activation's ordinary gradient is
// g_bn = g * m(yb), m = 1 (none), 1[yb > 0] (ReLU), 1[0 < yb < 6] (ReLU6), so
//   g_conv * y = g * f,   f = m(yb) * yb * y / (y + div_eps),   yb = y * scale + shift.
// The forward's activation saw the BN output rounded to the tensor's dtype (scalar_t), so the
// mask tests that rounded value: in bfloat16 a BN output in (5.984, 6) is stored as 6.0, where
// ReLU6's gradient is 0 (float16: (5.998, 6)); in float16 a positive value under 2^-25 is
// stored as 0, where ReLU's is 0. The product keeps the unrounded float yb. The mask selects
// yb before the division (a select of values, so CPU loops vectorise); the result is what the
// unfused rules give, also where y + div_eps == 0.
template <int64_t ACT, typename scalar_t, typename acc_t>
C10_HOST_DEVICE inline acc_t bn_act_factor_t(acc_t y, acc_t scale, acc_t shift, acc_t div_eps) {
  acc_t yb = y * scale + shift;
  if constexpr (ACT == kActRelu || ACT == kActRelu6) {
    acc_t seen = yb;  // the activation's input as the forward stored it
    if constexpr (!std::is_same_v<scalar_t, acc_t>) {
      seen = static_cast<acc_t>(static_cast<scalar_t>(yb));
    }
    if constexpr (ACT == kActRelu) {
      yb = seen > acc_t(0) ? yb : acc_t(0);
    } else {
      yb = (seen > acc_t(0)) & (seen < acc_t(6)) ? yb : acc_t(0);
    }
  }
  return yb * y / (y + div_eps);
}

// The same with the activation chosen at run time.
template <typename scalar_t, typename acc_t>
C10_HOST_DEVICE inline acc_t bn_act_factor(acc_t y, acc_t scale, acc_t shift, acc_t div_eps,
                                           int64_t act) {
  return act == kActRelu    ? bn_act_factor_t<kActRelu, scalar_t>(y, scale, shift, div_eps)
         : act == kActRelu6 ? bn_act_factor_t<kActRelu6, scalar_t>(y, scale, shift, div_eps)
                            : bn_act_factor_t<kActNone, scalar_t>(y, scale, shift, div_eps);
}

// The BN arguments of conv2d_bn_backward (CPU and CUDA entry points).
struct BnArgs {
  const at::Tensor& running_mean;
  const at::Tensor& running_var;
  const std::optional<at::Tensor>& weight;
  const std::optional<at::Tensor>& bias;
  double bn_eps;
  int64_t act;
};

// Checks of the BN arguments of conv2d_bn_backward against y's channel count K.
inline void check_bn_params(const char* op, const at::Tensor& y, const at::Tensor& running_mean,
                            const at::Tensor& running_var,
                            const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& bias, int64_t act) {
  const int64_t K = y.size(1);
  auto check = [&](const char* name, const at::Tensor& t) {
    TORCH_CHECK(t.dim() == 1 && t.size(0) == K, op, ": ", name, " must have shape (", K,
                ",) (y's channels), got ", t.sizes());
    TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name,
                " must be a floating tensor, got ", t.scalar_type());
    TORCH_CHECK(t.device() == y.device(), op, ": ", name, " must be on ", y.device(),
                " like x, got ", t.device());
  };
  check("running_mean", running_mean);
  check("running_var", running_var);
  if (weight.has_value() && weight->defined()) check("bn_weight", *weight);
  if (bias.has_value() && bias->defined()) check("bn_bias", *bias);
  TORCH_CHECK(act == kActNone || act == kActRelu || act == kActRelu6, op,
              ": act must be 0 (none), 1 (ReLU) or 2 (ReLU6), got ", act);
}

// The eval BatchNorm of channel k as y * scale + shift, in the order tsgb_hooks.rules uses:
// scale = rsqrt(var + eps) [* weight], shift = -mean * scale [+ bias]. Pointers may be null
// for weight / bias (affine=False).
template <typename acc_t>
C10_HOST_DEVICE inline void bn_scale_shift_at(const acc_t* rm, const acc_t* rv, const acc_t* w,
                                              const acc_t* b, acc_t eps, int64_t k, acc_t& scale,
                                              acc_t& shift) {
#if defined(__CUDA_ARCH__)
  scale = acc_t(1) / ::sqrt(rv[k] + eps);
#else
  scale = acc_t(1) / std::sqrt(rv[k] + eps);
#endif
  if (w != nullptr) scale = scale * w[k];
  shift = -rm[k] * scale;
  if (b != nullptr) shift = shift + b[k];
}

}  // namespace tsgb
