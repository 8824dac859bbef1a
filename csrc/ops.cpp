// Every op schema of tsgb_ext, in one place.
//
// Forward ops return exactly what torch's own functional op returns (they call it), and are
// registered as CompositeExplicitAutograd so that their autograd reaches the TSGB backward ops
// below: for the per-layer ops the C++ autograd nodes of autograd.cpp (dispatch key Autograd),
// for linear the formula registered from Python (tsgb_ext/ops/autograd.py,
// torch.library.register_autograd).
//
// Backward ops implement the rules of ../shared/TSGB_SPEC.md. Device kernels live in
// csrc/cpu/<rule>.cpp and csrc/cuda/<rule>.cu, one dispatch key per file.
//
// Batched targets: every backward op accepts a gradient whose batch is a positive multiple
// T*N of the saved activations' batch N; gradient sample b pairs with activation sample b % N
// and the result has the gradient's batch. This lets T targets reuse one forward's activations.
#include <Python.h>
#include <torch/library.h>
#include <ATen/ATen.h>

#include "common/checks.h"
#include "common/tsgb_common.h"
#include "cpu/cpu_isa.h"

namespace tsgb {
namespace {

at::Tensor conv2d_forward(const at::Tensor& x, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                          at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  return at::conv2d(x, weight, bias, stride, padding, dilation, groups);
}

// conv2d followed by ReLU, for a Conv2d immediately followed by nn.ReLU in an nn.Sequential
// (VGG). Its backward is the conv rule applied to (grad at the ReLU output, ReLU output):
// g * relu(y) == (g * 1[y > 0]) * y, so the ReLU's own backward pass disappears.
at::Tensor conv2d_relu_forward(const at::Tensor& x, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                               at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  at::Tensor y = at::conv2d(x, weight, bias, stride, padding, dilation, groups);
  return at::relu_(y);
}

// conv2d -> BatchNorm2d (eval) -> activation (0 none, 1 ReLU, 2 ReLU6) as one autograd node,
// for the chains the model conversion finds in a traced graph (ResNet, MobileNet, ...). Returns
// (output, conv output); the conv output is saved for the backward (conv2d_bn_backward folds
// the BN and activation rules into the conv rule's channel reduction: the BN-rule gradient and
// the activation gradient are never materialised). Outputs are bit-identical to running
// torch's conv2d, batch_norm and relu/relu6 one after another.
std::tuple<at::Tensor, at::Tensor> conv2d_bn_act_forward(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    const at::Tensor& running_mean, const at::Tensor& running_var,
    const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias,
    double bn_eps, int64_t act) {
  TORCH_CHECK(act == kActNone || act == kActRelu || act == kActRelu6,
              "tsgb_ext.conv2d_bn_act: act must be 0 (none), 1 (ReLU) or 2 (ReLU6), got ", act);
  at::Tensor y = at::conv2d(x, weight, bias, stride, padding, dilation, groups);
  at::Tensor out = at::batch_norm(y, bn_weight, bn_bias, running_mean, running_var,
                                  /*training=*/false, /*momentum=*/0.0, bn_eps,
                                  at::globalContext().userEnabledCuDNN());
  if (act == kActRelu) {
    at::relu_(out);
  } else if (act == kActRelu6) {
    at::hardtanh_(out, 0.0, 6.0);
  }
  return {out, y};
}

at::Tensor batch_norm_forward(const at::Tensor& x, const at::Tensor& running_mean,
                              const at::Tensor& running_var,
                              const std::optional<at::Tensor>& weight,
                              const std::optional<at::Tensor>& bias, double eps) {
  return at::batch_norm(x, weight, bias, running_mean, running_var, /*training=*/false,
                        /*momentum=*/0.0, eps, at::globalContext().userEnabledCuDNN());
}

at::Tensor avg_pool2d_forward(const at::Tensor& x, at::IntArrayRef kernel_size,
                              at::IntArrayRef stride, at::IntArrayRef padding, bool ceil_mode,
                              bool count_include_pad, std::optional<int64_t> divisor_override) {
  return at::avg_pool2d(x, kernel_size, stride, padding, ceil_mode, count_include_pad,
                        divisor_override);
}

// max_pool2d on devices without a forward kernel of ours (CUDA): torch's own, after the shared
// argument checks (common/checks.h), so every device refuses the same arguments with the same
// messages (torch's would accept a 3-D x). The CPU has kernels that keep no indices
// (csrc/cpu/max_pool2d.cpp); the backward is a kernel per device (csrc/cuda/max_pool2d_backward.cu).
at::Tensor max_pool2d_forward(const at::Tensor& x, at::IntArrayRef kernel_size,
                              at::IntArrayRef stride, at::IntArrayRef padding,
                              at::IntArrayRef dilation, bool ceil_mode) {
  check_max_pool2d_args("tsgb_ext.max_pool2d", x, kernel_size, stride, padding, dilation,
                        ceil_mode);
  return at::max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode);
}

at::Tensor linear_forward(const at::Tensor& x, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias) {
  return at::linear(x, weight, bias);
}

}  // namespace
}  // namespace tsgb

// The compiled module itself is empty: importing it runs the registrations below.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

namespace tsgb {
namespace {
bool built_with_cuda() {
#ifdef TSGB_WITH_CUDA
  return true;
#else
  return false;
#endif
}
}  // namespace
}  // namespace tsgb

TORCH_LIBRARY(tsgb_ext, m) {
  // Whether CUDA kernels were compiled into this build.
  m.def("built_with_cuda() -> bool", &tsgb::built_with_cuda);
  // Reuse of activation memory across CPU calls (csrc/cpu/activation_cache.cpp).
  m.def("activation_cache_hold() -> ()", &tsgb::activation_cache_hold);
  m.def("activation_cache_release() -> ()", &tsgb::activation_cache_release);
  m.def("activation_scope_enter() -> ()", &tsgb::activation_scope_enter);
  m.def("activation_scope_exit() -> ()", &tsgb::activation_scope_exit);
  m.def("activation_cache_stats() -> int[]", &tsgb::activation_cache_stats);
  // The instruction set of the CPU kernels compiled more than once (csrc/cpu/cpu_isa.h): the
  // active one; with `set` ("default", "avx2", "auto") switch first and return the previous one.
  m.def("cpu_isa(str? set=None) -> str", &tsgb::cpu_isa_op);
  // ---- forward ops (outputs bit-identical to torch's) ----
  m.def("conv2d(Tensor x, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, "
        "int[2] dilation, int groups) -> Tensor");
  m.def("conv2d_relu(Tensor x, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, "
        "int[2] dilation, int groups) -> Tensor");
  m.def("conv2d_bn_act(Tensor x, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, "
        "int[2] dilation, int groups, Tensor running_mean, Tensor running_var, "
        "Tensor? bn_weight, Tensor? bn_bias, float bn_eps, int act) -> (Tensor, Tensor)");
  m.def("batch_norm(Tensor x, Tensor running_mean, Tensor running_var, Tensor? weight, "
        "Tensor? bias, float eps) -> Tensor");
  m.def("avg_pool2d(Tensor x, int[2] kernel_size, int[2] stride, int[2] padding, "
        "bool ceil_mode, bool count_include_pad, int? divisor_override) -> Tensor");
  m.def("linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  // max_pool2d as torch computes it, without indices; its backward is the ordinary gradient.
  m.def("max_pool2d(Tensor x, int[2] kernel_size, int[2] stride, int[2] padding, "
        "int[2] dilation, bool ceil_mode) -> Tensor");

  // ---- backward rules ----
  // TSGB-Conv, group-aware. y is the conv output (bias included).
  m.def("conv2d_backward(Tensor grad, Tensor x, Tensor y, int[2] kernel_size, int[2] stride, "
        "int[2] padding, int[2] dilation, int groups, float eps) -> Tensor");
  // The conv rule of a conv -> BN (eval) -> activation block, from the gradient at the block's
  // output: the conv rule with g_conv * y = g * m(yb) * yb * y / (y + eps), yb = y * scale +
  // shift (the BN's per-channel affine map, computed from its parameters and bn_eps inside the
  // kernels: bn_eps is used there only), m the activation's gradient mask (act 0 none, 1 ReLU,
  // 2 ReLU6). y: conv output. eps (1e-10) stabilises both divisions of the block.
  m.def("conv2d_bn_backward(Tensor grad, Tensor x, Tensor y, Tensor running_mean, "
        "Tensor running_var, Tensor? bn_weight, Tensor? bn_bias, float bn_eps, int act, "
        "int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, int groups, "
        "float eps) -> Tensor");
  // BatchNorm: gx = g * y / (x + eps), with y = x * scale[c] + shift[c] recomputed in
  // registers (the eval-mode BN is that affine map), so y is never stored or re-read. eps is
  // the spec's 1e-10, not the module's eps (which is inside scale, as in the forward).
  m.def("batch_norm_backward(Tensor grad, Tensor x, Tensor scale, Tensor shift, float eps) "
        "-> Tensor");
  // AvgPool2d: gx = avg_pool2d_backward(g * y) / (x + eps).
  m.def("avg_pool2d_backward(Tensor grad, Tensor x, Tensor y, int[2] kernel_size, "
        "int[2] stride, int[2] padding, bool ceil_mode, bool count_include_pad, "
        "int? divisor_override, float eps) -> Tensor");
  // TSGB-FC: zp = x W+^T, zn = x W-^T, beta = zp/|zn| (0 where |zn| <= eps),
  // gx = g W+ + (g * beta) W-.  x: (N, in), grad: (T*N, out), weight_pos/neg: (out, in).
  m.def("linear_backward(Tensor grad, Tensor x, Tensor weight_pos, Tensor weight_neg, "
        "float eps) -> Tensor");
  // MaxPool2d (ordinary gradient, not a TSGB rule): gx gets grad at the tap torch's forward
  // picked in each window (the first equal to y, the last NaN when y is NaN), found from x and y.
  m.def("max_pool2d_backward(Tensor grad, Tensor x, Tensor y, int[2] kernel_size, "
        "int[2] stride, int[2] padding, int[2] dilation, bool ceil_mode) -> Tensor");
}

TORCH_LIBRARY_IMPL(tsgb_ext, CompositeExplicitAutograd, m) {
  m.impl("conv2d", &tsgb::conv2d_forward);
  m.impl("conv2d_relu", &tsgb::conv2d_relu_forward);
  m.impl("conv2d_bn_act", &tsgb::conv2d_bn_act_forward);
  m.impl("batch_norm", &tsgb::batch_norm_forward);
  m.impl("avg_pool2d", &tsgb::avg_pool2d_forward);
  m.impl("linear", &tsgb::linear_forward);
  m.impl("max_pool2d", &tsgb::max_pool2d_forward);
}
