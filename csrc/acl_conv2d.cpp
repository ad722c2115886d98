// acl_conv2d: synthesis kernels around ATen's convolution (oneDNN on CPU, cuDNN on CUDA).
// Device-agnostic: each device's W comes from its Synthesis (ops.h), and cpu/ and cuda/
// register the instantiation for their device. W is recomputed in the backward, never saved.
#include <ATen/core/Tensor.h>
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/convolution.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "ops.h"

namespace acl_fused {
namespace {

// F.conv2d's treatment of asymmetric padding ('same' with an even dilated kernel): zero-pad the
// extra rows / columns explicitly, then convolve with the symmetric remainder.
struct PaddedInput {
  at::Tensor x;
  std::array<int64_t, 2> symmetric;  // (height, width) padding left to the convolution
  int64_t top_extra, left_extra;      // where the original input starts inside x
};

PaddedInput pad_input(const at::Tensor& input, at::IntArrayRef padding) {
  TORCH_CHECK(padding.size() == 4 && *std::min_element(padding.begin(), padding.end()) >= 0,
              "acl_fused: padding must be four non-negative ints (top, bottom, left, right), got ", padding);
  const int64_t top = padding[0], bottom = padding[1], left = padding[2], right = padding[3];
  const int64_t pad_h = std::min(top, bottom), pad_w = std::min(left, right);
  PaddedInput out{input, {pad_h, pad_w}, top - pad_h, left - pad_w};
  if (top != bottom || left != right) {
    out.x = at::constant_pad_nd(input, {left - pad_w, right - pad_w, top - pad_h, bottom - pad_h}, 0);
  }
  return out;
}

// Every argument's shape, dtype and device (synthesize's checks too: the backward may never call
// it); the synthesis problem's sizes.
SynthesisShape check_conv_args(const at::Tensor& input, const at::Tensor& akp, const std::optional<at::Tensor>& weight,
                               const at::Tensor& family, const at::Tensor& row, at::IntArrayRef kernel_size,
                               at::IntArrayRef stride, at::IntArrayRef dilation, int64_t groups) {
  const SynthesisShape s = check_synthesize_args(akp, weight, family, row, kernel_size);
  TORCH_CHECK(input.dim() == 4, "acl_fused: input must have shape [N, C_in, H, W], got ", input.sizes());
  TORCH_CHECK(input.device() == akp.device(), "acl_fused: input and akp must be on the same device, got ",
              input.device(), " and ", akp.device());
  TORCH_CHECK(groups >= 1 && input.size(1) == s.cg * groups && s.c_out % groups == 0,
              "acl_fused: input has ", input.size(1), " channels, expected C_in/groups * groups = ", s.cg,
              " * ", groups, " with ", s.c_out, " output channels divisible by groups");
  const auto positive_pair = [](at::IntArrayRef v) { return v.size() == 2 && v[0] >= 1 && v[1] >= 1; };
  TORCH_CHECK(positive_pair(stride) && positive_pair(dilation),
              "acl_fused: stride and dilation must be pairs of positive ints, got ", stride, " and ", dilation);
  return s;
}

// The memory format W is synthesized in: channels_last where the input or the plain weight suggests
// it. With W in it ATen's convolution lays out the output and the input gradient as nn.Conv2d's with
// that input and a weight in the plain weight's format (as acl_fused/validation.py conv_weight_format).
at::MemoryFormat weight_format(const at::Tensor& input, const std::optional<at::Tensor>& weight) {
  const auto channels_last = [](const at::Tensor& t) {
    return t.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
  };
  return channels_last(input) || (weight.has_value() && channels_last(*weight)) ? at::MemoryFormat::ChannelsLast
                                                                                : at::MemoryFormat::Contiguous;
}

// grad_weight laid out as at::empty_like(weight) (a channels_last parameter's gradient is
// channels_last), as autograd wants a parameter's gradient: it would copy it otherwise, and the
// fake kernel promises this layout. The CPU kernels write it so; elsewhere this copies.
// (empty_like keeps the strides of a dense tensor, as parameters are.)
at::Tensor laid_out_like(const at::Tensor& grad_weight, const at::Tensor& weight) {
  if (weight.is_non_overlapping_and_dense() && grad_weight.strides() == weight.strides()) return grad_weight;
  return at::empty_like(weight).copy_(grad_weight);
}

// The backward's order where it wants grad_input and the AKP gradient. Weight gradient first, then
// W and the parameter gradients from one pass (their exp / cos once), then grad_input: a synthesis
// pass fewer, but the parameter gradients (P bytes) are held while grad_input's convolution runs,
// so its peak is at most the convolution's + P, the convolution's being at least the input's size
// X. A strided layer with P > X / 20 and W smaller than the input takes grad_input first: W from a
// synthesis pass of its own, both convolution gradients in one call, then the parameter gradients,
// whose peak is the convolution's. Measured on the CPU (benchmarks/RESULTS.md, session 18; forward
// + backward, batch 4, 112 px; peak against nn.Conv2d's, time of the second order / the first):
// 64->128 3x3 stride 2 NCHW +9% -> +0%, 1x1 projections 64->128 +4..13% -> +0% and 128->256
// +28..59% -> +0..44% (a 1x1 analytic slice packs 6 AKPs against 1 weight), 0.93-1.07x the time;
// oneDNN's strided grad_input peaks highest (an NCHW result is copied twice: three input-sized
// blocks). Where W is larger than the input the weight gradient's convolution peaks higher and the
// synthesis pass costs most (256->512 3x3 at 7 px: -2% -> +0%, 1.02-1.07x the time); at stride 1
// the first order stays within -21..+4% of nn.Conv2d's peak. CUDA takes the same rule, unmeasured.
bool input_gradient_first(at::IntArrayRef stride, int64_t input_bytes, int64_t w_bytes, int64_t param_grad_bytes) {
  const bool strided = std::any_of(stride.begin(), stride.end(), [](int64_t s) { return s > 1; });
  return strided && w_bytes < input_bytes && param_grad_bytes * 20 > input_bytes;
}

}  // namespace

at::Tensor DispatchedSynthesis::weight(const at::Tensor& akp, const std::optional<at::Tensor>& weight,
                                      const at::Tensor& family, const at::Tensor& row, at::IntArrayRef kernel_size,
                                      at::MemoryFormat memory_format) {
  // .to(), not .contiguous(): a tensor that is both contiguous and channels_last (a 1x1 kernel) must
  // get the strides that the convolution reads as memory_format.
  const at::Tensor w = dispatch::synthesize(akp, weight, family, row, kernel_size);
  return w.suggest_memory_format() == memory_format ? w : w.to(w.options(), false, false, memory_format);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> DispatchedSynthesis::weight_and_grads(
    at::Tensor grad_W, const at::Tensor& akp, const std::optional<at::Tensor>& weight,
    const at::Tensor& family, const at::Tensor& row, at::IntArrayRef kernel_size, at::MemoryFormat memory_format,
    bool want_weight) {
  auto [grad_akp, grad_weight] = dispatch::synthesize_backward(grad_W, akp, family, row, {true, want_weight});
  return {DispatchedSynthesis::weight(akp, weight, family, row, kernel_size, memory_format), grad_akp, grad_weight};
}

at::Tensor DispatchedSynthesis::unfilled_weight(at::IntArrayRef sizes, at::TensorOptions options,
                                                at::MemoryFormat memory_format) {
  return at::empty(sizes, options.memory_format(memory_format));
}

template <typename Synthesis>
at::Tensor acl_conv2d(const at::Tensor& input, const at::Tensor& akp, const std::optional<at::Tensor>& weight,
                      const at::Tensor& family, const at::Tensor& row, const std::optional<at::Tensor>& bias,
                      at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                      at::IntArrayRef dilation, int64_t groups) {
  check_conv_args(input, akp, weight, family, row, kernel_size, stride, dilation, groups);
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == family.size(0) && bias->scalar_type() == input.scalar_type(),
                "acl_fused: bias must be a [", family.size(0), "] tensor of input's dtype ", input.scalar_type(),
                ", got ", bias->scalar_type(), " of shape ", bias->sizes());
  }
  // Synthesized in the parameters' dtype (float32 for autocast), then one cast to the conv dtype.
  const at::Tensor w =
      in_dtype(Synthesis::weight(akp, weight, family, row, kernel_size, weight_format(input, weight)),
               input.scalar_type());
  const PaddedInput p = pad_input(input, padding);
  return at::convolution(p.x, w, bias, stride, p.symmetric, dilation, /*transposed=*/false, {0, 0}, groups);
}

template <typename Synthesis>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> acl_conv2d_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& akp,
    const std::optional<at::Tensor>& weight, const at::Tensor& family, const at::Tensor& row,
    at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    int64_t groups, std::array<bool, 4> output_mask) {
  const int64_t c_out = check_conv_args(input, akp, weight, family, row, kernel_size, stride, dilation, groups).c_out;
  const bool want_input = output_mask[0], want_akp = output_mask[1], want_weight = output_mask[2];
  const bool want_bias = output_mask[3], want_w = want_akp || want_weight;

  // Gradients not asked for are returned as empty [0] tensors (made at the end, only for those).
  at::Tensor grad_input, grad_akp, grad_weight, grad_bias;
  const auto results = [&] {
    const auto or_empty = [](at::Tensor& grad, const at::Tensor& like) {
      return grad.defined() ? std::move(grad) : at::empty({0}, like.options());
    };
    return std::make_tuple(or_empty(grad_input, input), or_empty(grad_akp, akp), or_empty(grad_weight, akp),
                           or_empty(grad_bias, input));
  };
  if (!(want_input || want_w || want_bias)) return results();
  const at::ScalarType dtype = input.scalar_type();
  const at::MemoryFormat memory_format = weight_format(input, weight);
  const PaddedInput p = pad_input(input, padding);
  // ATen's convolution backward does not check every size of it (float64 on the CPU reads past a
  // grad_output of too small a batch). An input without channels has an output without channels.
  const int64_t output_channels = input.size(1) == 0 ? 0 : c_out;
  const auto padded = [&](int d) { return p.x.size(2 + d) + 2 * p.symmetric[d]; };
  const auto span = [&](int d) { return dilation[d] * (kernel_size[d] - 1) + 1; };
  TORCH_CHECK(padded(0) >= span(0) && padded(1) >= span(1), "acl_fused: the padded input (", padded(0), " x ",
              padded(1), ") is smaller than the dilated kernel (", span(0), " x ", span(1), ")");
  const auto output_size = [&](int d) { return (padded(d) - span(d)) / stride[d] + 1; };
  TORCH_CHECK(grad_output.dim() == 4 && grad_output.size(0) == input.size(0) &&
                  grad_output.size(1) == output_channels && grad_output.size(2) == output_size(0) &&
                  grad_output.size(3) == output_size(1),
              "acl_fused: grad_output must have shape [", input.size(0), ", ", output_channels, ", ", output_size(0),
              ", ", output_size(1), "], got ", grad_output.sizes());
  const std::vector<int64_t> bias_sizes{c_out};
  const at::Tensor grad_y = in_dtype(grad_output, dtype);
  const auto convolution_backward = [&](const at::Tensor& w, std::array<bool, 3> mask) {
    return at::convolution_backward(grad_y, p.x, w,
                                    mask[2] ? at::OptionalIntArrayRef(bias_sizes) : std::nullopt, stride,
                                    p.symmetric, dilation, /*transposed=*/false, {0, 0}, groups, mask);
  };
  // The weight and bias gradients do not read W's values (only grad_input does): they get an
  // unfilled tensor of W's shape.
  const auto shape_only = [&] {
    return Synthesis::unfilled_weight({c_out, akp.size(1), kernel_size[0], kernel_size[1]}, input.options(),
                                      memory_format);
  };
  at::Tensor gx, gw, gb;
  const int64_t element_size = akp.element_size();
  const int64_t w_bytes = c_out * akp.size(1) * kernel_size[0] * kernel_size[1] * element_size;
  const int64_t param_grad_bytes =
      (akp.numel() + (want_weight && weight.has_value() ? weight->numel() : 0)) * element_size;
  if (want_input && want_akp && !input_gradient_first(stride, input.nbytes(), w_bytes, param_grad_bytes)) {
    // Weight gradient first, then W and the AKP gradient from one pass (their exp / cos once),
    // then grad_input: one synthesis pass less than W, convolution, AKP gradient.
    std::tie(std::ignore, gw, gb) = convolution_backward(shape_only(), {false, true, want_bias});
    // gw is given away: by grad_input's convolution it is W's memory or freed (CpuSynthesis).
    at::Tensor w;
    std::tie(w, grad_akp, grad_weight) =
        Synthesis::weight_and_grads(in_dtype(std::exchange(gw, at::Tensor()), akp.scalar_type()), akp, weight,
                                    family, row, kernel_size, memory_format, want_weight);
    gx = std::get<0>(convolution_backward(in_dtype(w, dtype), {true, false, false}));
  } else {
    const at::Tensor w =
        want_input ? in_dtype(Synthesis::weight(akp, weight, family, row, kernel_size, memory_format), dtype)
                   : shape_only();
    std::tie(gx, gw, gb) = convolution_backward(w, {want_input, want_w, want_bias});
    if (want_w) {
      std::tie(grad_akp, grad_weight) =
          dispatch::synthesize_backward(in_dtype(gw, akp.scalar_type()), akp, family, row, {want_akp, want_weight});
    }
  }
  if (want_input) {
    // Of an explicitly padded input, a tensor of its own (not a view that keeps the padded one
    // alive), laid out as the convolution's gradient suggests: F.conv2d's is constant_pad_nd's
    // backward, a clone of the narrowed gradient.
    grad_input = p.x.is_same(input)
                     ? gx
                     : gx.narrow(2, p.top_extra, input.size(2)).narrow(3, p.left_extra, input.size(3)).clone();
  }
  if (want_bias) grad_bias = gb;
  if (want_weight && weight.has_value()) grad_weight = laid_out_like(grad_weight, *weight);
  return results();
}

#define ACL_FUSED_INSTANTIATE(Synthesis)                                                                    \
  template at::Tensor acl_conv2d<Synthesis>(                                                               \
      const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,            \
      const at::Tensor&, const std::optional<at::Tensor>&, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, \
      at::IntArrayRef, int64_t);                                                                          \
  template std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> acl_conv2d_backward<Synthesis>(       \
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,            \
      const at::Tensor&, const at::Tensor&, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef,              \
      at::IntArrayRef, int64_t, std::array<bool, 4>);
ACL_FUSED_INSTANTIATE(DispatchedSynthesis)
ACL_FUSED_INSTANTIATE(CpuSynthesis)
#undef ACL_FUSED_INSTANTIATE

}  // namespace acl_fused
