#pragma once
// Host-side declarations shared by the per-device kernel files: argument checks of the ops
// defined in ops.cpp, and the device-agnostic acl_conv2d composite (acl_conv2d.cpp).
#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>

#include <array>
#include <optional>
#include <tuple>

namespace acl_fused {

// Sizes of one synthesis problem: W is [c_out, cg, kh, kw], akp [num_analytic, cg, 6],
// weight [num_plain, cg, kh, kw].
struct SynthesisShape {
  int64_t c_out, cg, kh, kw, num_analytic, num_plain;
  C10_HOST_DEVICE int64_t slices() const { return c_out * cg; }
};

// Shapes, dtypes and devices of acl_fused::synthesize's arguments (TORCH_CHECK, PyTorch-style).
SynthesisShape check_synthesize_args(const at::Tensor& akp, const std::optional<at::Tensor>& weight,
                                     const at::Tensor& family, const at::Tensor& row,
                                     at::IntArrayRef kernel_size);
// Same for acl_fused::synthesize_backward.
SynthesisShape check_synthesize_backward_args(const at::Tensor& grad_W, const at::Tensor& akp,
                                              const at::Tensor& family, const at::Tensor& row);
// The tangents of acl_fused::synthesize_backward_jvp: akp's shape, weight's [P, Cg, kH, kW].
void check_synthesize_backward_jvp_tangents(const std::optional<at::Tensor>& akp_tangent,
                                            const std::optional<at::Tensor>& weight_tangent, const at::Tensor& akp,
                                            const SynthesisShape& shape);
// Family codes in range and rows inside akp / weight. Reads the values: host tensors only (on
// CUDA the kernels assert instead, so that no call synchronises).
void check_layout_values(const at::Tensor& family, const at::Tensor& row, const SynthesisShape& shape);

// t in dtype: t itself when it has it. Tensor::to goes through the dispatcher even when it has
// nothing to do, and a training step made ~16 such calls.
inline at::Tensor in_dtype(const at::Tensor& t, at::ScalarType dtype) {
  return t.scalar_type() == dtype ? t : t.to(dtype);
}

// Where a device's acl_conv2d kernels get W (the synthesize op's result, in the convolution's
// memory format) and, for the backward, W with the gradients of the synthesize_backward op.
//   weight(akp, weight, family, row, kernel_size, memory_format) -> W
//   weight_and_grads(grad_W, akp, weight, family, row, kernel_size, memory_format, want_weight)
//       -> (W, grad_akp, grad_weight: empty [0] when not wanted); grad_W is the caller's to give
//       away: it is freed, or becomes the memory of W, before W's convolution
//   unfilled_weight(sizes, options, memory_format) -> a tensor of W's shape whose values are never
//       read (the weight gradient's convolution needs one for its shape)
// DispatchedSynthesis (CUDA) calls the ops (the caching allocator reuses W's memory; a format copy
// is the one cuDNN would make); CpuSynthesis (cpu/) writes W in the format, into a buffer each
// thread reuses (every W-sized tensor here: glibc's malloc would fault fresh ones in each call),
// and computes W and the gradients in one pass.
#define ACL_FUSED_DECLARE_SYNTHESIS(Name)                                                                     \
  struct Name {                                                                                               \
    static at::Tensor weight(const at::Tensor& akp, const std::optional<at::Tensor>& weight,                  \
                             const at::Tensor& family, const at::Tensor& row, at::IntArrayRef kernel_size,     \
                             at::MemoryFormat memory_format);                                                  \
    static std::tuple<at::Tensor, at::Tensor, at::Tensor> weight_and_grads(                                    \
        at::Tensor grad_W, const at::Tensor& akp, const std::optional<at::Tensor>& weight,                     \
        const at::Tensor& family, const at::Tensor& row, at::IntArrayRef kernel_size,                          \
        at::MemoryFormat memory_format, bool want_weight);                                                     \
    static at::Tensor unfilled_weight(at::IntArrayRef sizes, at::TensorOptions options,                        \
                                      at::MemoryFormat memory_format);                                          \
  };
ACL_FUSED_DECLARE_SYNTHESIS(DispatchedSynthesis)
ACL_FUSED_DECLARE_SYNTHESIS(CpuSynthesis)
#undef ACL_FUSED_DECLARE_SYNTHESIS

// The CPU / CUDA kernel of acl_fused::acl_conv2d (device-agnostic around Synthesis;
// instantiated in acl_conv2d.cpp for the two above).
template <typename Synthesis>
at::Tensor acl_conv2d(const at::Tensor& input, const at::Tensor& akp, const std::optional<at::Tensor>& weight,
                      const at::Tensor& family, const at::Tensor& row, const std::optional<at::Tensor>& bias,
                      at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                      at::IntArrayRef dilation, int64_t groups);

// The CPU / CUDA kernel of acl_fused::acl_conv2d_backward.
template <typename Synthesis>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> acl_conv2d_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& akp,
    const std::optional<at::Tensor>& weight, const at::Tensor& family, const at::Tensor& row,
    at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    int64_t groups, std::array<bool, 4> output_mask);

// The ops called through the dispatcher (from the acl_conv2d composite and the autograd kernels):
// each call goes to the kernel of the keys still active (autograd, then device or fake).
namespace dispatch {
at::Tensor synthesize(const at::Tensor& akp, const std::optional<at::Tensor>& weight, const at::Tensor& family,
                      const at::Tensor& row, at::IntArrayRef kernel_size);
std::tuple<at::Tensor, at::Tensor> synthesize_backward(const at::Tensor& grad_W, const at::Tensor& akp,
                                                       const at::Tensor& family, const at::Tensor& row,
                                                       std::array<bool, 2> output_mask);
at::Tensor acl_conv2d(const at::Tensor& input, const at::Tensor& akp, const std::optional<at::Tensor>& weight,
                      const at::Tensor& family, const at::Tensor& row, const std::optional<at::Tensor>& bias,
                      at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                      at::IntArrayRef dilation, int64_t groups);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> acl_conv2d_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& akp,
    const std::optional<at::Tensor>& weight, const at::Tensor& family, const at::Tensor& row,
    at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    int64_t groups, std::array<bool, 4> output_mask);
std::tuple<at::Tensor, at::Tensor> synthesize_double_backward(const std::optional<at::Tensor>& grad_grad_akp,
                                                              const std::optional<at::Tensor>& grad_grad_weight,
                                                              const at::Tensor& grad_W, const at::Tensor& akp,
                                                              const at::Tensor& family, const at::Tensor& row,
                                                              std::array<bool, 2> output_mask);
std::tuple<at::Tensor, at::Tensor> synthesize_backward_jvp(const std::optional<at::Tensor>& akp_tangent,
                                                           const std::optional<at::Tensor>& weight_tangent,
                                                           const at::Tensor& grad_W, const at::Tensor& akp,
                                                           const at::Tensor& family, const at::Tensor& row,
                                                           std::array<bool, 2> output_mask);
}  // namespace dispatch

}  // namespace acl_fused
