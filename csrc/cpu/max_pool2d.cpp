// max_pool2d for the native backend on the CPU: the forward without indices, and its ordinary
// gradient (TSGB_SPEC.md: MaxPool keeps its gradient) found again from the saved input and
// output. torch's CPU max_pool2d computes and stores int64 indices even without autograd and
// scans windows one element at a time: measured (2-core Intel Xeon, torch 2.14.1, 2026-11-26,
// float32, NCHW) 21 ms for ResNet50's stem pool at batch 4 (64 x 112 x 112) and 57 ms for
// VGG16's first pool (64 x 224 x 224), with or without grad. These kernels take the window
// taps as whole rows (compiled per instruction set, cpu_isa.h), and the backward scans each
// window once more for the tap torch's forward chose. Outputs and gradients are the same
// values torch's kernels give (csrc/cpu/max_pool2d_impl.h; tests/test_op_max_pool2d.py compares
// them bit for bit, NaN, -inf and +-0 ties included).
#define TSGB_ISA_SUFFIX _default
#include "cpu/max_pool2d_impl.h"

#include <torch/library.h>

#include "cpu/cpu_isa.h"

namespace tsgb {

#if TSGB_HAVE_X86_TUS
void max_pool2d_forward_kernel_avx2(const at::Tensor&, at::Tensor&, const PoolShapes&, bool);
void max_pool2d_forward_kernel_avx512(const at::Tensor&, at::Tensor&, const PoolShapes&, bool);
void max_pool2d_backward_kernel_avx2(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                     at::Tensor&, const PoolShapes&, bool);
void max_pool2d_backward_kernel_avx512(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                       at::Tensor&, const PoolShapes&, bool);
#endif

namespace {

at::Tensor max_pool2d_cpu(const at::Tensor& x, at::IntArrayRef kernel_size,
                          at::IntArrayRef stride, at::IntArrayRef padding,
                          at::IntArrayRef dilation, bool ceil_mode) {
  constexpr const char* kOp = "tsgb_ext.max_pool2d";
  TORCH_CHECK(x.device().is_cpu(), kOp, ": CPU kernel called with x on ", x.device());
  const PoolShapes s = check_max_pool2d_args(kOp, x, kernel_size, stride, padding, dilation,
                                             ceil_mode);
  const at::MemoryFormat fmt = pick_memory_format(x);
  at::Tensor y = at::empty({s.N, s.C, s.Ho, s.Wo}, x.options().memory_format(fmt));
  if (y.numel() == 0) return y;
  const at::Tensor xc = x.contiguous(fmt);
  TSGB_ISA_CALL(max_pool2d_forward_kernel, xc, y, s, fmt == at::MemoryFormat::ChannelsLast);
  return y;
}

at::Tensor max_pool2d_backward_cpu(const at::Tensor& grad, const at::Tensor& x,
                                   const at::Tensor& y, at::IntArrayRef kernel_size,
                                   at::IntArrayRef stride, at::IntArrayRef padding,
                                   at::IntArrayRef dilation, bool ceil_mode) {
  constexpr const char* kOp = "tsgb_ext.max_pool2d_backward";
  TORCH_CHECK(x.device().is_cpu(), kOp, ": CPU kernel called with x on ", x.device());
  const PoolShapes s = check_max_pool2d_backward_args(kOp, grad, x, y, kernel_size, stride,
                                                      padding, dilation, ceil_mode);
  const at::MemoryFormat fmt = pick_memory_format(x);
  at::Tensor gx = at::empty({s.N, s.C, s.H, s.W}, x.options().memory_format(fmt));
  if (gx.numel() == 0) return gx;
  const at::Tensor gc = grad.contiguous(fmt), xc = x.contiguous(fmt), yc = y.contiguous(fmt);
  TSGB_ISA_CALL(max_pool2d_backward_kernel, gc, xc, yc, gx, s,
                fmt == at::MemoryFormat::ChannelsLast);
  return gx;
}

}  // namespace
}  // namespace tsgb

TORCH_LIBRARY_IMPL(tsgb_ext, CPU, m) {
  m.impl("max_pool2d", &tsgb::max_pool2d_cpu);
  m.impl("max_pool2d_backward", &tsgb::max_pool2d_backward_cpu);
}
