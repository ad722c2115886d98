// The acl_fused operator library: every op schema, in one place, with the typed handles that
// call the ops through the dispatcher. Kernels are registered per device in cpu/ and cuda/,
// autograd in autograd.cpp; fake (meta) kernels in acl_fused/backends/native.py.
#include <Python.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <limits>
#include <vector>

#include "families.h"
#include "ops.h"

// `import acl_fused._C` loads this shared library, which runs the registrations below.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "acl_fused native ops (torch.ops.acl_fused)", -1,
                               nullptr};
  return PyModule_Create(&module);
}

TORCH_LIBRARY(acl_fused, m) {
  // W [C_out, Cg, kH, kW] from akp [A, Cg, 6] and weight [P, Cg, kH, kW] (None when P = 0);
  // family, row: int32 [C_out] family code of each output channel and its row in weight (plain)
  // or akp (analytic). W has akp's dtype; half / bfloat16 are computed in float32, rounded once.
  m.def("synthesize(Tensor akp, Tensor? weight, Tensor family, Tensor row, int[2] kernel_size) -> Tensor");
  // (grad_akp [A, Cg, 6] with zeros in unused slots, grad_weight [C_out - A, Cg, kH, kW]), both in
  // akp's dtype, from grad_W [C_out, Cg, kH, kW]. An output not asked for in output_mask
  // (akp, weight) is returned as an empty tensor of shape [0].
  m.def("synthesize_backward(Tensor grad_W, Tensor akp, Tensor family, Tensor row, bool[2] output_mask) "
        "-> (Tensor grad_akp, Tensor grad_weight)");
  // y = conv2d(input, synthesize(...), bias) in input's dtype. padding is explicit
  // (top, bottom, left, right); asymmetric padding is handled as F.conv2d does for 'same'.
  // bias, when given, has input's dtype.
  m.def("acl_conv2d(Tensor input, Tensor akp, Tensor? weight, Tensor family, Tensor row, Tensor? bias, "
        "int[2] kernel_size, int[2] stride, int[4] padding, int[2] dilation, int groups) -> Tensor");
  // Gradients of acl_conv2d for (input, akp, weight, bias); grad_akp / grad_weight in akp's
  // dtype, grad_input / grad_bias in input's. Outputs not in output_mask are empty tensors [0].
  m.def("acl_conv2d_backward(Tensor grad_output, Tensor input, Tensor akp, Tensor? weight, Tensor family, "
        "Tensor row, int[2] kernel_size, int[2] stride, int[4] padding, int[2] dilation, int groups, "
        "bool[4] output_mask) -> (Tensor grad_input, Tensor grad_akp, Tensor grad_weight, Tensor grad_bias)");
  // Double backward of synthesize_backward (csrc/autograd.cpp): the gradients w.r.t. (grad_W, akp)
  // (those in output_mask; the others are empty tensors [0]) of a loss whose gradients w.r.t. its
  // outputs are the grad_grad_* (None: not used). A composite op implemented in Python
  // (acl_fused/backends/double_backward.py, registered by acl_fused/backends/native.py),
  // differentiable again (third and higher orders).
  m.def("synthesize_double_backward(Tensor? grad_grad_akp, Tensor? grad_grad_weight, Tensor grad_W, Tensor akp, "
        "Tensor family, Tensor row, bool[2] output_mask) -> (Tensor grad_grad_W, Tensor grad_akp)");
  // The tangents of synthesize's W and of synthesize_backward's grad_akp (grad_W held fixed) along
  // (akp_tangent, weight_tangent) (None: no tangent; without akp_tangent the analytic rows' are 0,
  // whatever their AKPs), in grad_W's and akp's dtype; not asked for in output_mask: empty [0]. The second derivatives being symmetric, these are exactly
  // synthesize_double_backward's (grad_grad_W, grad_akp) for (grad_grad_akp, grad_grad_weight) =
  // the tangents: what it runs where nothing records a graph (csrc/autograd.cpp). Not differentiable.
  m.def("synthesize_backward_jvp(Tensor? akp_tangent, Tensor? weight_tangent, Tensor grad_W, Tensor akp, "
        "Tensor family, Tensor row, bool[2] output_mask) -> (Tensor W_tangent, Tensor grad_akp_tangent)");
}

namespace acl_fused {
namespace {

bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

void check_akp(const at::Tensor& akp) {
  TORCH_CHECK(akp.dim() == 3 && akp.size(2) == kAkpSlots, "acl_fused: akp must have shape [A, C_in/groups, ",
              kAkpSlots, "], got ", akp.sizes());
  TORCH_CHECK(is_float_type(akp.scalar_type()), "acl_fused: akp must be float16, bfloat16, float32 or float64, got ",
              akp.scalar_type());
}

void check_index_tensor(const at::Tensor& t, const char* name, const at::Tensor& akp) {
  TORCH_CHECK(t.dim() == 1 && t.scalar_type() == at::kInt, "acl_fused: ", name, " must be a 1-D int32 tensor, got ",
              t.scalar_type(), " of shape ", t.sizes());
  TORCH_CHECK(t.device() == akp.device(), "acl_fused: ", name, " must be on akp's device ", akp.device(), ", got ",
              t.device());
}

// family / row: int32 [C_out] on akp's device; returns C_out.
int64_t check_layout_tensors(const at::Tensor& akp, const at::Tensor& family, const at::Tensor& row) {
  check_index_tensor(family, "family", akp);
  check_index_tensor(row, "row", akp);
  TORCH_CHECK(family.size(0) == row.size(0), "acl_fused: family and row must have the same length, got ",
              family.size(0), " and ", row.size(0));
  return family.size(0);
}

// A kernel's kH x kW: positive, with few enough points for the kernels' int indices.
void check_kernel_points(int64_t kh, int64_t kw, const char* what) {
  TORCH_CHECK(kh >= 1 && kw >= 1, "acl_fused: ", what, " must be two positive ints, got ", kh, " x ", kw);
  TORCH_CHECK(kh <= std::numeric_limits<int>::max() / kw, "acl_fused: ", what, " ", kh, " x ", kw,
              " has more than 2^31 - 1 points");
}

}  // namespace

SynthesisShape check_synthesize_args(const at::Tensor& akp, const std::optional<at::Tensor>& weight,
                                     const at::Tensor& family, const at::Tensor& row,
                                     at::IntArrayRef kernel_size) {
  check_akp(akp);
  TORCH_CHECK(kernel_size.size() == 2, "acl_fused: kernel_size must be two positive ints, got ", kernel_size);
  check_kernel_points(kernel_size[0], kernel_size[1], "kernel_size");
  const int64_t c_out = check_layout_tensors(akp, family, row);
  SynthesisShape shape{c_out, akp.size(1), kernel_size[0], kernel_size[1], akp.size(0), 0};
  if (weight.has_value()) {
    const at::Tensor& w = *weight;
    TORCH_CHECK(w.dim() == 4 && w.size(1) == shape.cg && w.size(2) == shape.kh && w.size(3) == shape.kw,
                "acl_fused: weight must have shape [P, ", shape.cg, ", ", shape.kh, ", ", shape.kw, "], got ",
                w.sizes());
    TORCH_CHECK(w.scalar_type() == akp.scalar_type(), "acl_fused: weight and akp must have the same dtype, got ",
                w.scalar_type(), " and ", akp.scalar_type());
    TORCH_CHECK(w.device() == akp.device(), "acl_fused: weight and akp must be on the same device, got ",
                w.device(), " and ", akp.device());
    shape.num_plain = w.size(0);
  }
  TORCH_CHECK(shape.num_analytic + shape.num_plain == c_out, "acl_fused: akp has ", shape.num_analytic,
              " rows and weight ", shape.num_plain, ", but family lists ", c_out, " output channels");
  return shape;
}

SynthesisShape check_synthesize_backward_args(const at::Tensor& grad_W, const at::Tensor& akp,
                                              const at::Tensor& family, const at::Tensor& row) {
  check_akp(akp);
  const int64_t c_out = check_layout_tensors(akp, family, row);
  TORCH_CHECK(grad_W.dim() == 4 && grad_W.size(0) == c_out && grad_W.size(1) == akp.size(1),
              "acl_fused: grad_W must have shape [", c_out, ", ", akp.size(1), ", kH, kW], got ", grad_W.sizes());
  check_kernel_points(grad_W.size(2), grad_W.size(3), "grad_W's kH and kW");
  TORCH_CHECK(is_float_type(grad_W.scalar_type()), "acl_fused: grad_W must be a floating-point tensor, got ",
              grad_W.scalar_type());
  TORCH_CHECK(grad_W.device() == akp.device(), "acl_fused: grad_W must be on akp's device ", akp.device(),
              ", got ", grad_W.device());
  TORCH_CHECK(akp.size(0) <= c_out, "acl_fused: akp has ", akp.size(0), " rows but family lists only ", c_out,
              " output channels");
  return {c_out, akp.size(1), grad_W.size(2), grad_W.size(3), akp.size(0), c_out - akp.size(0)};
}

void check_synthesize_backward_jvp_tangents(const std::optional<at::Tensor>& akp_tangent,
                                            const std::optional<at::Tensor>& weight_tangent, const at::Tensor& akp,
                                            const SynthesisShape& shape) {
  const auto check = [&](const std::optional<at::Tensor>& t, const char* name, at::IntArrayRef sizes) {
    if (!t.has_value()) return;
    TORCH_CHECK(t->sizes() == sizes && is_float_type(t->scalar_type()) && t->device() == akp.device(),
                "acl_fused: ", name, " must be a floating-point tensor of shape ", sizes, " on ", akp.device(),
                ", got ", t->scalar_type(), " of shape ", t->sizes(), " on ", t->device());
  };
  check(akp_tangent, "akp_tangent", akp.sizes());
  check(weight_tangent, "weight_tangent", {shape.num_plain, shape.cg, shape.kh, shape.kw});
}

void check_layout_values(const at::Tensor& family, const at::Tensor& row, const SynthesisShape& shape) {
  const at::Tensor f = family.contiguous(), r = row.contiguous();
  const int* codes = f.data_ptr<int>();
  const int* rows = r.data_ptr<int>();
  // Each plain row and each analytic row must be used by exactly one output channel.
  std::vector<char> plain_seen(shape.num_plain, 0), analytic_seen(shape.num_analytic, 0);
  for (int64_t o = 0; o < shape.c_out; ++o) {
    TORCH_CHECK(codes[o] >= 0 && codes[o] < kNumFamilies, "acl_fused: family[", o, "] = ", codes[o],
                " is not a family code (0..", kNumFamilies - 1, ")");
    auto& seen = codes[o] == kPlain ? plain_seen : analytic_seen;
    TORCH_CHECK(rows[o] >= 0 && rows[o] < static_cast<int64_t>(seen.size()) && !seen[rows[o]], "acl_fused: row[",
                o, "] = ", rows[o], " is out of range or used twice (", seen.size(), " ",
                codes[o] == kPlain ? "plain" : "analytic", " rows)");
    seen[rows[o]] = 1;
  }
}

namespace dispatch {
namespace {

// The handle of op `name` typed as the C++ function Signature (whose types follow its schema).
template <typename Signature>
c10::TypedOperatorHandle<Signature> typed_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

}  // namespace

at::Tensor synthesize(const at::Tensor& akp, const std::optional<at::Tensor>& weight, const at::Tensor& family,
                      const at::Tensor& row, at::IntArrayRef kernel_size) {
  static const auto op = typed_op<decltype(synthesize)>("acl_fused::synthesize");
  return op.call(akp, weight, family, row, kernel_size);
}

std::tuple<at::Tensor, at::Tensor> synthesize_backward(const at::Tensor& grad_W, const at::Tensor& akp,
                                                       const at::Tensor& family, const at::Tensor& row,
                                                       std::array<bool, 2> output_mask) {
  static const auto op = typed_op<decltype(synthesize_backward)>("acl_fused::synthesize_backward");
  return op.call(grad_W, akp, family, row, output_mask);
}

at::Tensor acl_conv2d(const at::Tensor& input, const at::Tensor& akp, const std::optional<at::Tensor>& weight,
                      const at::Tensor& family, const at::Tensor& row, const std::optional<at::Tensor>& bias,
                      at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                      at::IntArrayRef dilation, int64_t groups) {
  static const auto op = typed_op<decltype(acl_conv2d)>("acl_fused::acl_conv2d");
  return op.call(input, akp, weight, family, row, bias, kernel_size, stride, padding, dilation, groups);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> acl_conv2d_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& akp,
    const std::optional<at::Tensor>& weight, const at::Tensor& family, const at::Tensor& row,
    at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    int64_t groups, std::array<bool, 4> output_mask) {
  static const auto op = typed_op<decltype(acl_conv2d_backward)>("acl_fused::acl_conv2d_backward");
  return op.call(grad_output, input, akp, weight, family, row, kernel_size, stride, padding, dilation, groups,
                 output_mask);
}

std::tuple<at::Tensor, at::Tensor> synthesize_double_backward(const std::optional<at::Tensor>& grad_grad_akp,
                                                              const std::optional<at::Tensor>& grad_grad_weight,
                                                              const at::Tensor& grad_W, const at::Tensor& akp,
                                                              const at::Tensor& family, const at::Tensor& row,
                                                              std::array<bool, 2> output_mask) {
  static const auto op = typed_op<decltype(synthesize_double_backward)>("acl_fused::synthesize_double_backward");
  return op.call(grad_grad_akp, grad_grad_weight, grad_W, akp, family, row, output_mask);
}

std::tuple<at::Tensor, at::Tensor> synthesize_backward_jvp(const std::optional<at::Tensor>& akp_tangent,
                                                           const std::optional<at::Tensor>& weight_tangent,
                                                           const at::Tensor& grad_W, const at::Tensor& akp,
                                                           const at::Tensor& family, const at::Tensor& row,
                                                           std::array<bool, 2> output_mask) {
  static const auto op = typed_op<decltype(synthesize_backward_jvp)>("acl_fused::synthesize_backward_jvp");
  return op.call(akp_tangent, weight_tangent, grad_W, akp, family, row, output_mask);
}

}  // namespace dispatch
}  // namespace acl_fused
