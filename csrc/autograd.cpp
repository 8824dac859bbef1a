// Autograd of the forward ops, in C++ (dispatch key Autograd): each forward op becomes one
// autograd node whose backward calls the matching TSGB backward op through the dispatcher.
//
// This replaces torch.library.register_autograd from Python for the per-layer ops: measured on
// this project's CPU (1 thread, tiny tensors), the Python autograd wrapper cost about 30 us per
// conv call and 75 us per conv -> BN -> ReLU call, against about 8 us for F.conv2d with autograd.
// On a GPU that host time is per layer and per call, and can exceed the kernels' own time.
// The classifier's linear op keeps its Python autograd (tsgb_ext/ops/autograd.py): it runs
// once per call and its rule picks the rows of W it needs in Python.
//
// The calls below go through the dispatcher (below autograd for the forward), so the ops stay
// traceable by torch.compile / AOTAutograd with the fake kernels registered in Python.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "common/tsgb_common.h"

namespace tsgb {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using at::IntArrayRef;
using OptTensor = std::optional<at::Tensor>;

constexpr double kEps = 1e-10;  // shared/TSGB_SPEC.md: eps = 1e-10 throughout

// ---- typed handles to the ops (schemas in csrc/ops.cpp) ----------------------------------------
template <typename Sig>
c10::TypedOperatorHandle<Sig> handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

using ConvSig = at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&, IntArrayRef,
                           IntArrayRef, IntArrayRef, int64_t);
using ConvBnSig = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const OptTensor&, IntArrayRef, IntArrayRef, IntArrayRef,
    int64_t, const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&, double,
    int64_t);
using BnSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                         const OptTensor&, const OptTensor&, double);
using PoolSig = at::Tensor(const at::Tensor&, IntArrayRef, IntArrayRef, IntArrayRef, bool, bool,
                           std::optional<int64_t>);
using ConvBwdSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                              IntArrayRef, IntArrayRef, IntArrayRef, IntArrayRef, int64_t, double);
using ConvBnBwdSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const at::Tensor&, const at::Tensor&, const OptTensor&,
                                const OptTensor&, double, int64_t, IntArrayRef, IntArrayRef,
                                IntArrayRef, IntArrayRef, int64_t, double);
using BnBwdSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, double);
using PoolBwdSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                              IntArrayRef, IntArrayRef, IntArrayRef, bool, bool,
                              std::optional<int64_t>, double);

// The eval-mode BatchNorm as an affine map per channel, y = x * scale + shift, as
// tsgb_hooks.rules.bn_scale_shift computes it (float32 for half-precision statistics), in as
// few launches as ATen allows (on a GPU each is a kernel launch per BN layer per call):
// scale = rsqrt(var + eps) [* w], shift = b - mean * scale (or -mean * scale).
std::tuple<at::Tensor, at::Tensor> bn_scale_shift(const at::Tensor& rm, const at::Tensor& rv,
                                                  const OptTensor& w, const OptTensor& b,
                                                  double eps) {
  const auto st = rv.scalar_type();
  const auto cd = (st == at::kHalf || st == at::kBFloat16) ? at::kFloat : st;
  at::Tensor scale = at::rsqrt(rv.to(cd).add(eps));
  if (w.has_value() && w->defined()) scale.mul_(w->to(cd));
  at::Tensor shift = (b.has_value() && b->defined()) ? at::addcmul(b->to(cd), rm.to(cd), scale, -1)
                                                     : rm.to(cd).mul(scale).neg_();
  return {scale, shift};
}

variable_list with_undefined(at::Tensor gx, size_t n_inputs) {
  variable_list out(n_inputs);
  out[0] = std::move(gx);
  return out;
}

// ---- conv2d and conv2d_relu (the conv rule on the op's own output) ----------------------------
struct Conv2dFn : public torch::autograd::Function<Conv2dFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const OptTensor& bias, IntArrayRef stride, IntArrayRef padding,
                            IntArrayRef dilation, int64_t groups, bool relu) {
    at::Tensor y;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      static const auto conv = handle<ConvSig>("tsgb_ext::conv2d");
      static const auto conv_relu = handle<ConvSig>("tsgb_ext::conv2d_relu");
      y = (relu ? conv_relu : conv).call(x, weight, bias, stride, padding, dilation, groups);
    }
    ctx->save_for_backward({x, y});
    ctx->saved_data["k"] = weight.sizes().slice(2).vec();
    ctx->saved_data["s"] = stride.vec();
    ctx->saved_data["p"] = padding.vec();
    ctx->saved_data["d"] = dilation.vec();
    ctx->saved_data["g"] = groups;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    if (!grads[0].defined()) return variable_list(8);
    static const auto bwd = handle<ConvBwdSig>("tsgb_ext::conv2d_backward");
    at::Tensor gx = bwd.call(grads[0], saved[0], saved[1], ctx->saved_data["k"].toIntVector(),
                             ctx->saved_data["s"].toIntVector(), ctx->saved_data["p"].toIntVector(),
                             ctx->saved_data["d"].toIntVector(), ctx->saved_data["g"].toInt(), kEps);
    return with_undefined(std::move(gx), 8);
  }
};

at::Tensor conv2d_autograd(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias,
                           IntArrayRef stride, IntArrayRef padding, IntArrayRef dilation,
                           int64_t groups) {
  return Conv2dFn::apply(x, weight, bias, stride, padding, dilation, groups, false);
}

at::Tensor conv2d_relu_autograd(const at::Tensor& x, const at::Tensor& weight,
                                const OptTensor& bias, IntArrayRef stride, IntArrayRef padding,
                                IntArrayRef dilation, int64_t groups) {
  return Conv2dFn::apply(x, weight, bias, stride, padding, dilation, groups, true);
}

// ---- conv2d_bn_act: conv -> BN -> activation, the BN and activation rules folded in -----------
struct Conv2dBnActFn : public torch::autograd::Function<Conv2dBnActFn> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x,
                               const at::Tensor& weight, const OptTensor& bias,
                               IntArrayRef stride, IntArrayRef padding, IntArrayRef dilation,
                               int64_t groups, const at::Tensor& running_mean,
                               const at::Tensor& running_var, const OptTensor& bn_weight,
                               const OptTensor& bn_bias, double bn_eps, int64_t act) {
    at::Tensor out, y;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      static const auto op = handle<ConvBnSig>("tsgb_ext::conv2d_bn_act");
      std::tie(out, y) = op.call(x, weight, bias, stride, padding, dilation, groups, running_mean,
                                 running_var, bn_weight, bn_bias, bn_eps, act);
    }
    // the conv output, not the block's output (which later code often changes in place); the
    // BN parameters as they are (the backward op turns them into scale / shift in its kernel)
    ctx->save_for_backward({x, y, running_mean, running_var, bn_weight.value_or(at::Tensor()),
                            bn_bias.value_or(at::Tensor())});
    ctx->saved_data["k"] = weight.sizes().slice(2).vec();
    ctx->saved_data["s"] = stride.vec();
    ctx->saved_data["p"] = padding.vec();
    ctx->saved_data["d"] = dilation.vec();
    ctx->saved_data["g"] = groups;
    ctx->saved_data["bn_eps"] = bn_eps;
    ctx->saved_data["act"] = act;
    ctx->mark_non_differentiable({y});
    ctx->set_materialize_grads(false);
    return {out, y};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    if (!grads[0].defined()) return variable_list(13);
    static const auto bwd = handle<ConvBnBwdSig>("tsgb_ext::conv2d_bn_backward");
    auto opt = [](const at::Tensor& t) { return t.defined() ? OptTensor(t) : OptTensor(); };
    at::Tensor gx = bwd.call(grads[0], saved[0], saved[1], saved[2], saved[3], opt(saved[4]),
                             opt(saved[5]), ctx->saved_data["bn_eps"].toDouble(),
                             ctx->saved_data["act"].toInt(),
                             ctx->saved_data["k"].toIntVector(), ctx->saved_data["s"].toIntVector(),
                             ctx->saved_data["p"].toIntVector(), ctx->saved_data["d"].toIntVector(),
                             ctx->saved_data["g"].toInt(), kEps);
    return with_undefined(std::move(gx), 13);
  }
};

std::tuple<at::Tensor, at::Tensor> conv2d_bn_act_autograd(
    const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias, IntArrayRef stride,
    IntArrayRef padding, IntArrayRef dilation, int64_t groups, const at::Tensor& running_mean,
    const at::Tensor& running_var, const OptTensor& bn_weight, const OptTensor& bn_bias,
    double bn_eps, int64_t act) {
  auto outs = Conv2dBnActFn::apply(x, weight, bias, stride, padding, dilation, groups,
                                   running_mean, running_var, bn_weight, bn_bias, bn_eps, act);
  return {outs[0], outs[1]};
}

// ---- batch_norm ------------------------------------------------------------------------------
struct BatchNormFn : public torch::autograd::Function<BatchNormFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x,
                            const at::Tensor& running_mean, const at::Tensor& running_var,
                            const OptTensor& weight, const OptTensor& bias, double eps) {
    at::Tensor y;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      static const auto op = handle<BnSig>("tsgb_ext::batch_norm");
      y = op.call(x, running_mean, running_var, weight, bias, eps);
    }
    auto [scale, shift] = bn_scale_shift(running_mean, running_var, weight, bias, eps);
    ctx->save_for_backward({x, scale, shift});  // not y: it is often changed in place later
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    if (!grads[0].defined()) return variable_list(6);
    static const auto bwd = handle<BnBwdSig>("tsgb_ext::batch_norm_backward");
    return with_undefined(
        // the rule divides by x + 1e-10 (the spec's eps); the module's eps is inside scale only
        bwd.call(grads[0], saved[0], saved[1], saved[2], kEps), 6);
  }
};

at::Tensor batch_norm_autograd(const at::Tensor& x, const at::Tensor& running_mean,
                               const at::Tensor& running_var, const OptTensor& weight,
                               const OptTensor& bias, double eps) {
  return BatchNormFn::apply(x, running_mean, running_var, weight, bias, eps);
}

// ---- avg_pool2d ------------------------------------------------------------------------------
struct AvgPoolFn : public torch::autograd::Function<AvgPoolFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, IntArrayRef kernel_size,
                            IntArrayRef stride, IntArrayRef padding, bool ceil_mode,
                            bool count_include_pad, std::optional<int64_t> divisor_override) {
    at::Tensor y;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      static const auto op = handle<PoolSig>("tsgb_ext::avg_pool2d");
      y = op.call(x, kernel_size, stride, padding, ceil_mode, count_include_pad,
                  divisor_override);
    }
    ctx->save_for_backward({x, y});
    ctx->saved_data["k"] = kernel_size.vec();
    ctx->saved_data["s"] = stride.vec();
    ctx->saved_data["p"] = padding.vec();
    ctx->saved_data["ceil"] = ceil_mode;
    ctx->saved_data["cip"] = count_include_pad;
    ctx->saved_data["div"] = divisor_override.has_value() ? c10::IValue(*divisor_override)
                                                          : c10::IValue();
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    if (!grads[0].defined()) return variable_list(7);
    static const auto bwd = handle<PoolBwdSig>("tsgb_ext::avg_pool2d_backward");
    const c10::IValue& div = ctx->saved_data["div"];
    return with_undefined(
        bwd.call(grads[0], saved[0], saved[1], ctx->saved_data["k"].toIntVector(),
                 ctx->saved_data["s"].toIntVector(), ctx->saved_data["p"].toIntVector(),
                 ctx->saved_data["ceil"].toBool(), ctx->saved_data["cip"].toBool(),
                 div.isNone() ? std::nullopt : std::optional<int64_t>(div.toInt()), kEps),
        7);
  }
};

at::Tensor avg_pool2d_autograd(const at::Tensor& x, IntArrayRef kernel_size, IntArrayRef stride,
                               IntArrayRef padding, bool ceil_mode, bool count_include_pad,
                               std::optional<int64_t> divisor_override) {
  return AvgPoolFn::apply(x, kernel_size, stride, padding, ceil_mode, count_include_pad,
                          divisor_override);
}

// ---- max_pool2d (ordinary gradient) ---------------------------------------------------------
using MaxPoolSig = at::Tensor(const at::Tensor&, IntArrayRef, IntArrayRef, IntArrayRef,
                              IntArrayRef, bool);
using MaxPoolBwdSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                 IntArrayRef, IntArrayRef, IntArrayRef, IntArrayRef, bool);

const c10::TypedOperatorHandle<MaxPoolSig>& max_pool2d_op() {
  static const auto op = handle<MaxPoolSig>("tsgb_ext::max_pool2d");
  return op;
}

// The backward needs y to find the tap each window chose, but a model may change the pool's
// output in place later in its forward (`y = pool(x); y.mul_(0.5)`, `relu_(pool(x))`, `+=`),
// which is valid PyTorch: torch's own max_pool2d saves its input and indices, never its output.
// Saving y with save_for_backward would make such models fail ("modified by an inplace
// operation"). So only x is saved; y is kept as a detached alias (it shares y's storage and
// version counter, and holds no grad_fn, so no reference cycle output -> node -> output) with
// its version at save time. If that version moved by backward time, y is recomputed from x
// with the same forward op, which gives the same values bit for bit.
struct MaxPoolFn : public torch::autograd::Function<MaxPoolFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, IntArrayRef kernel_size,
                            IntArrayRef stride, IntArrayRef padding, IntArrayRef dilation,
                            bool ceil_mode) {
    at::Tensor y;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      y = max_pool2d_op().call(x, kernel_size, stride, padding, dilation, ceil_mode);
    }
    ctx->save_for_backward({x});
    ctx->saved_data["y"] = y.detach();
    ctx->saved_data["y_version"] = static_cast<int64_t>(y._version());
    ctx->saved_data["k"] = kernel_size.vec();
    ctx->saved_data["s"] = stride.vec();
    ctx->saved_data["p"] = padding.vec();
    ctx->saved_data["d"] = dilation.vec();
    ctx->saved_data["ceil"] = ceil_mode;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    if (!grads[0].defined()) return variable_list(6);
    const at::Tensor& x = saved[0];
    const auto k = ctx->saved_data["k"].toIntVector(), s = ctx->saved_data["s"].toIntVector(),
               p = ctx->saved_data["p"].toIntVector(), d = ctx->saved_data["d"].toIntVector();
    const bool ceil = ctx->saved_data["ceil"].toBool();
    at::Tensor y = ctx->saved_data["y"].toTensor();
    if (y._version() != ctx->saved_data["y_version"].toInt()) {  // changed in place since
      at::AutoDispatchBelowADInplaceOrView guard;
      y = max_pool2d_op().call(x, k, s, p, d, ceil);
    }
    static const auto bwd = handle<MaxPoolBwdSig>("tsgb_ext::max_pool2d_backward");
    return with_undefined(bwd.call(grads[0], x, y, k, s, p, d, ceil), 6);
  }
};

at::Tensor max_pool2d_autograd(const at::Tensor& x, IntArrayRef kernel_size, IntArrayRef stride,
                               IntArrayRef padding, IntArrayRef dilation, bool ceil_mode) {
  return MaxPoolFn::apply(x, kernel_size, stride, padding, dilation, ceil_mode);
}

}  // namespace
}  // namespace tsgb

TORCH_LIBRARY_IMPL(tsgb_ext, Autograd, m) {
  m.impl("max_pool2d", &tsgb::max_pool2d_autograd);
  m.impl("conv2d", &tsgb::conv2d_autograd);
  m.impl("conv2d_relu", &tsgb::conv2d_relu_autograd);
  m.impl("conv2d_bn_act", &tsgb::conv2d_bn_act_autograd);
  m.impl("batch_norm", &tsgb::batch_norm_autograd);
  m.impl("avg_pool2d", &tsgb::avg_pool2d_autograd);
}
