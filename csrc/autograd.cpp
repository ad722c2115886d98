// Autograd of the acl_fused ops: C++ autograd Functions registered once for every device at the
// Autograd key (as torchvision's csrc/ops/autograd/). torch.library.register_autograd did the same
// in Python at ~130 us a call (argument re-packing, a redispatch and a Python Function per call),
// more than a GPU convolution of a training-size layer takes.
//
// synthesize / acl_conv2d save their inputs only, never W, and their backward recomputes W inside
// the backward op (SPEC §7). Gradients are computed only for the inputs that need them, and an
// output a backward op skipped (an empty [0] tensor) reaches autograd as undefined (None).
// A backward that records a graph (create_graph=True) runs as differentiable steps instead, which
// makes it differentiable in turn (double backward, and higher orders).
#include <torch/autograd.h>
#include <torch/library.h>

#include "ops.h"

namespace acl_fused {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// A gradient the backward op computed, or the undefined tensor autograd reads as None.
at::Tensor grad_if(bool wanted, at::Tensor grad) { return wanted ? std::move(grad) : at::Tensor(); }

std::optional<at::Tensor> optional_tensor(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

bool requires_grad(const at::Tensor& t) { return t.requires_grad(); }
bool requires_grad(const std::optional<at::Tensor>& t) { return t.has_value() && t->requires_grad(); }

// Whether autograd records this call (Function::apply's test). When it does not (no_grad,
// inference, a backward without create_graph) the op runs straight below autograd, skipping
// Function::apply's bookkeeping: measured 4.8 -> 3.6 us a no_grad synthesize call (8->8 3x3,
// 1 thread, AMD EPYC).
template <typename... Tensors>
bool records_graph(const Tensors&... tensors) {
  return at::GradMode::is_enabled() && (requires_grad(tensors) || ...);
}

bool has_tangent(const at::Tensor& t) { return t.defined() && t._fw_grad(/*level=*/0).defined(); }
bool has_tangent(const std::optional<at::Tensor>& t) { return t.has_value() && has_tangent(*t); }

// Forward-mode AD has no formula here: without this check torch.func.jvp / jacfwd read the
// tangents these Functions drop as zeros (a silently wrong answer).
template <typename... Tensors>
void refuse_forward_ad(const char* op, const Tensors&... tensors) {
  TORCH_CHECK(!(has_tangent(tensors) || ...), "acl_fused native backend: forward-mode AD (torch.func.jvp, "
              "torch.func.jacfwd, torch.autograd.forward_ad) through ", op,
              " is not supported; call it through acl_fused.synthesize / acl_conv2d / AnalyticConv2d, whose "
              "native backend takes part in forward mode, or use backend='reference'");
}

class SynthesizeFunction : public torch::autograd::Function<SynthesizeFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& akp, const std::optional<at::Tensor>& weight,
                            const at::Tensor& family, const at::Tensor& row, at::IntArrayRef kernel_size) {
    // grad_weight is grad_W's plain rows: weight itself is not needed.
    ctx->save_for_backward({akp, family, row});
    ctx->saved_data["has_weight"] = weight.has_value();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return dispatch::synthesize(akp, weight, family, row, kernel_size);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    // needs_input_grad counts tensor arguments only: weight, when given, is the second.
    const bool want_akp = ctx->needs_input_grad(0);
    const bool want_weight = ctx->saved_data["has_weight"].toBool() && ctx->needs_input_grad(1);
    at::Tensor grad_akp, grad_weight;
    if (want_akp || want_weight) {
      std::tie(grad_akp, grad_weight) =
          dispatch::synthesize_backward(grad_outputs[0], saved[0], saved[1], saved[2], {want_akp, want_weight});
    }
    return {grad_if(want_akp, grad_akp), grad_if(want_weight, grad_weight), {}, {}, {}};
  }
};

class AclConv2dFunction : public torch::autograd::Function<AclConv2dFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& akp,
                            const std::optional<at::Tensor>& weight, const at::Tensor& family, const at::Tensor& row,
                            const std::optional<at::Tensor>& bias, at::IntArrayRef kernel_size,
                            at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                            int64_t groups) {
    // W is synthesized again from (akp, weight) in the backward; bias is not needed there.
    ctx->save_for_backward({input, akp, weight.value_or(at::Tensor()), family, row});
    ctx->saved_data["has_bias"] = bias.has_value();
    ctx->saved_data["kernel_size"] = kernel_size;
    ctx->saved_data["stride"] = stride;
    ctx->saved_data["padding"] = padding;
    ctx->saved_data["dilation"] = dilation;
    ctx->saved_data["groups"] = groups;
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return dispatch::acl_conv2d(input, akp, weight, family, row, bias, kernel_size, stride, padding, dilation,
                                groups);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &input = saved[0], &akp = saved[1], &weight = saved[2], &family = saved[3], &row = saved[4];
    // needs_input_grad counts tensor arguments only: (input, akp, [weight], family, row, [bias]).
    const bool has_weight = weight.defined(), has_bias = ctx->saved_data["has_bias"].toBool();
    const std::array<bool, 4> mask{ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                   has_weight && ctx->needs_input_grad(2),
                                   has_bias && ctx->needs_input_grad(has_weight ? 5 : 4)};
    at::Tensor grad_input, grad_akp, grad_weight, grad_bias;
    if (mask[0] || mask[1] || mask[2] || mask[3]) {
      auto& data = ctx->saved_data;
      std::tie(grad_input, grad_akp, grad_weight, grad_bias) = dispatch::acl_conv2d_backward(
          grad_outputs[0], input, akp, optional_tensor(weight), family, row, data["kernel_size"].toIntVector(),
          data["stride"].toIntVector(), data["padding"].toIntVector(), data["dilation"].toIntVector(),
          data["groups"].toInt(), mask);
    }
    return {grad_if(mask[0], grad_input), grad_if(mask[1], grad_akp), grad_if(mask[2], grad_weight), {}, {},
            grad_if(mask[3], grad_bias), {}, {}, {}, {}, {}};
  }
};

// synthesize_backward, recorded only when a backward builds a graph (create_graph=True; the
// recorded acl_conv2d_backward below is made of it, synthesize and ATen's convolution_backward).
// Its own backward (double backward) takes the second derivatives of the families along the
// incoming gradients from synthesize_backward_jvp (families.h in dual numbers, csrc/dual.h), or,
// when that backward records a graph too (third order), from the synthesize_double_backward
// composite (acl_fused/backends/double_backward.py: autograd through the reference formulas).
// Undefined incoming gradients stay undefined (no zeros materialised): each is a term skipped.
class SynthesizeBackwardFunction : public torch::autograd::Function<SynthesizeBackwardFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& grad_W, const at::Tensor& akp,
                               const at::Tensor& family, const at::Tensor& row, std::array<bool, 2> output_mask) {
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({grad_W, akp, family, row});
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [grad_akp, grad_weight] = dispatch::synthesize_backward(grad_W, akp, family, row, output_mask);
    return {grad_akp, grad_weight};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_grads) {
    const variable_list saved = ctx->get_saved_variables();
    const std::array<bool, 2> mask{ctx->needs_input_grad(0), ctx->needs_input_grad(1)};
    if (!(mask[0] || mask[1])) return {{}, {}, {}, {}, {}};
    const auto args = std::make_tuple(optional_tensor(grad_grads[0]), optional_tensor(grad_grads[1]), saved[0],
                                      saved[1], saved[2], saved[3], mask);
    // The kernel's one pass gives what the composite gives (tests/test_native.py), which builds and
    // walks the reference's graph of a few hundred small ops twice: measured on the CPU (2 threads,
    // 64->64 3x3, default layout: 4k slices) 0.47 ms against the composite's 20 ms (256->256: 7.2
    // against 64 ms). With the recorded steps above, a step penalising the input's and the
    // parameters' gradients (benchmarks.gradient_penalty) went from 1.53-2.20x nn.Conv2d's step to
    // 0.94-1.09x (4 runs each, alternating, same day; the reference: 1.31-1.88x).
    auto [grad_grad_W, grad_akp] = at::GradMode::is_enabled()
                                       ? std::apply(dispatch::synthesize_double_backward, args)
                                       : std::apply(dispatch::synthesize_backward_jvp, args);
    return {grad_if(mask[0], grad_grad_W), grad_if(mask[1], grad_akp), {}, {}, {}};
  }
};

at::Tensor synthesize_autograd(const at::Tensor& akp, const std::optional<at::Tensor>& weight,
                               const at::Tensor& family, const at::Tensor& row, at::IntArrayRef kernel_size) {
  refuse_forward_ad("synthesize", akp, weight);
  if (records_graph(akp, weight)) return SynthesizeFunction::apply(akp, weight, family, row, kernel_size);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return dispatch::synthesize(akp, weight, family, row, kernel_size);
}

std::tuple<at::Tensor, at::Tensor> synthesize_backward_autograd(const at::Tensor& grad_W, const at::Tensor& akp,
                                                                const at::Tensor& family, const at::Tensor& row,
                                                                std::array<bool, 2> output_mask) {
  if (records_graph(grad_W, akp)) {
    const variable_list grads = SynthesizeBackwardFunction::apply(grad_W, akp, family, row, output_mask);
    return {grads[0], grads[1]};
  }
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return dispatch::synthesize_backward(grad_W, akp, family, row, output_mask);
}

at::Tensor acl_conv2d_autograd(const at::Tensor& input, const at::Tensor& akp,
                               const std::optional<at::Tensor>& weight, const at::Tensor& family,
                               const at::Tensor& row, const std::optional<at::Tensor>& bias,
                               at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                               at::IntArrayRef dilation, int64_t groups) {
  refuse_forward_ad("acl_conv2d", input, akp, weight, bias);
  if (records_graph(input, akp, weight, bias)) {
    return AclConv2dFunction::apply(input, akp, weight, family, row, bias, kernel_size, stride, padding, dilation,
                                    groups);
  }
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return dispatch::acl_conv2d(input, akp, weight, family, row, bias, kernel_size, stride, padding, dilation, groups);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> acl_conv2d_backward_autograd(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& akp,
    const std::optional<at::Tensor>& weight, const at::Tensor& family, const at::Tensor& row,
    at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    int64_t groups, std::array<bool, 4> output_mask) {
  if (records_graph(grad_output, input, akp, weight)) {
    // A backward that builds a graph takes its steps as differentiable ops, recorded one by one:
    // synthesize (through the dispatcher), ATen's convolution_backward and synthesize_backward
    // (DispatchedSynthesis: no CPU buffers, nothing written in place). Their own backwards then
    // make the double backward (the convolution's, ATen's), and the weight gradient, which it
    // needs, is not computed a second time.
    return acl_conv2d_backward<DispatchedSynthesis>(grad_output, input, akp, weight, family, row, kernel_size,
                                                    stride, padding, dilation, groups, output_mask);
  }
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return dispatch::acl_conv2d_backward(grad_output, input, akp, weight, family, row, kernel_size, stride, padding,
                                       dilation, groups, output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(acl_fused, Autograd, m) {
  m.impl("synthesize", &synthesize_autograd);
  m.impl("synthesize_backward", &synthesize_backward_autograd);
  m.impl("acl_conv2d", &acl_conv2d_autograd);
  m.impl("acl_conv2d_backward", &acl_conv2d_backward_autograd);
}

}  // namespace acl_fused
