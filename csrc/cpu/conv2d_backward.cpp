// TSGB-Conv backward, CPU: the ops' entry points and the choice of instruction set.
//
// The kernels (csrc/cpu/conv2d_backward_impl.h) are compiled three times: here for the baseline
// of the build (x86-64: SSE2), in isa_avx2.cpp for AVX2 + FMA and in isa_avx512.cpp for
// AVX-512; the widest copy the CPU runs is used (cpu_isa.h: checked once, TSGB_CPU_ISA or the op
// tsgb_ext::cpu_isa choose another). The kernels are loops written for the compiler to
// vectorise; measured figures in the README (Backends).
#define TSGB_ISA_SUFFIX _default
#include "cpu/conv2d_backward_impl.h"

#include <torch/library.h>

#include "cpu/cpu_isa.h"

namespace tsgb {

#if TSGB_HAVE_X86_TUS
#define TSGB_DECLARE_CONV_RULE(name)                                                           \
  at::Tensor name(const char* op, const at::Tensor& grad, const at::Tensor& x,                 \
                  const at::Tensor& y, at::IntArrayRef kernel_size, at::IntArrayRef stride,   \
                  at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,          \
                  double eps, const BnArgs* bn);
TSGB_DECLARE_CONV_RULE(conv_rule_cpu_avx2)
TSGB_DECLARE_CONV_RULE(conv_rule_cpu_avx512)
#undef TSGB_DECLARE_CONV_RULE
#endif

namespace {

at::Tensor conv2d_backward_cpu(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& y,
                               at::IntArrayRef kernel_size, at::IntArrayRef stride,
                               at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                               double eps) {
  return TSGB_ISA_CALL(conv_rule_cpu, "tsgb_ext.conv2d_backward", grad, x, y, kernel_size, stride,
                       padding, dilation, groups, eps, nullptr);
}

at::Tensor conv2d_bn_backward_cpu(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& y,
                                  const at::Tensor& running_mean, const at::Tensor& running_var,
                                  const std::optional<at::Tensor>& bn_weight,
                                  const std::optional<at::Tensor>& bn_bias, double bn_eps,
                                  int64_t act, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                  at::IntArrayRef padding, at::IntArrayRef dilation,
                                  int64_t groups, double eps) {
  const BnArgs bn{running_mean, running_var, bn_weight, bn_bias, bn_eps, act};
  return TSGB_ISA_CALL(conv_rule_cpu, "tsgb_ext.conv2d_bn_backward", grad, x, y, kernel_size,
                       stride, padding, dilation, groups, eps, &bn);
}

}  // namespace
}  // namespace tsgb

TORCH_LIBRARY_IMPL(tsgb_ext, CPU, m) {
  m.impl("conv2d_backward", &tsgb::conv2d_backward_cpu);
  m.impl("conv2d_bn_backward", &tsgb::conv2d_bn_backward_cpu);
}
