// CPU kernels of acl_fused::synthesize / synthesize_backward: at::parallel_for over the
// (o, c) slices of W, each slice done start to finish by one thread (no reduction across
// threads). Also registers the acl_conv2d composite for CPU.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>

#include "families.h"
#include "ops.h"

namespace acl_fused {
namespace {

// Slices per parallel_for chunk: ~4k grid points, enough to amortise a task.
int64_t grain(const SynthesisShape& s) { return std::max<int64_t>(1, 4096 / (s.kh * s.kw)); }

// Runs fn(o, c) over all (o, c) slices. at::parallel_for gives each thread one contiguous range
// of the iteration space, and layouts put families in blocks of output channels (default: plain
// first), so slices are visited with o fastest: every thread gets the same mix of families. In
// (o, c) order one thread would copy the plain rows while the other computed every analytic one
// (measured: no speed-up from 2 threads on AnalyticConv2d(256, 256, 3)'s default layout).
template <typename Fn>
void for_each_slice(const SynthesisShape& s, const Fn& fn) {
  at::parallel_for(0, s.slices(), grain(s), [&](int64_t begin, int64_t end) {
    int64_t o = begin % s.c_out, c = begin / s.c_out;
    for (int64_t i = begin; i < end; ++i) {
      fn(o, c);
      if (++o == s.c_out) {
        o = 0;
        ++c;
      }
    }
  });
}

template <typename scalar_t>
void synthesize_slices(const SynthesisShape& s, const scalar_t* akp, const scalar_t* weight, const int* family,
                       const int* row, scalar_t* out) {
  using T = at::opmath_type<scalar_t>;
  const int64_t kk = s.kh * s.kw;
  for_each_slice(s, [&](int64_t o, int64_t c) {
    const int64_t r = row[o];
    scalar_t* w = out + (o * s.cg + c) * kk;
    if (family[o] == kPlain) {
      std::copy_n(weight + (r * s.cg + c) * kk, kk, w);
      return;
    }
    T p[kAkpSlots];
    const scalar_t* src = akp + (r * s.cg + c) * kAkpSlots;
    for (int k = 0; k < kAkpSlots; ++k) p[k] = static_cast<T>(src[k]);
    synthesize_slice<T>(family[o], p, s.kh, s.kw, 0, 1, w);
  });
}

template <typename scalar_t>
void akp_grad_slices(const SynthesisShape& s, const scalar_t* grad_w, const scalar_t* akp, const int* family,
                     const int* row, scalar_t* grad_akp, scalar_t* grad_weight) {
  using T = at::opmath_type<scalar_t>;
  const int64_t kk = s.kh * s.kw;
  for_each_slice(s, [&](int64_t o, int64_t c) {
    const int64_t r = row[o];
    const scalar_t* g = grad_w + (o * s.cg + c) * kk;
    if (family[o] == kPlain) {
      if (grad_weight != nullptr) std::copy_n(g, kk, grad_weight + (r * s.cg + c) * kk);
      return;
    }
    if (grad_akp == nullptr) return;
    T p[kAkpSlots], grad[kAkpSlots];
    const scalar_t* src = akp + (r * s.cg + c) * kAkpSlots;
    for (int k = 0; k < kAkpSlots; ++k) p[k] = static_cast<T>(src[k]);
    akp_grad_slice<T>(family[o], p, s.kh, s.kw, 0, 1, g, grad);
    scalar_t* dst = grad_akp + (r * s.cg + c) * kAkpSlots;
    for (int k = 0; k < kAkpSlots; ++k) dst[k] = static_cast<scalar_t>(grad[k]);
  });
}

at::Tensor synthesize_cpu(const at::Tensor& akp, const std::optional<at::Tensor>& weight, const at::Tensor& family,
                          const at::Tensor& row, at::IntArrayRef kernel_size) {
  const SynthesisShape s = check_synthesize_args(akp, weight, family, row, kernel_size);
  check_layout_values(family, row, s);
  const at::Tensor akp_c = akp.contiguous(), family_c = family.contiguous(), row_c = row.contiguous();
  const at::Tensor weight_c = weight.has_value() ? weight->contiguous() : at::Tensor();
  at::Tensor out = at::empty({s.c_out, s.cg, s.kh, s.kw}, akp.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, akp.scalar_type(), "acl_fused::synthesize", [&] {
    synthesize_slices<scalar_t>(s, akp_c.const_data_ptr<scalar_t>(),
                                weight_c.defined() ? weight_c.const_data_ptr<scalar_t>() : nullptr,
                                family_c.const_data_ptr<int>(), row_c.const_data_ptr<int>(),
                                out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> synthesize_backward_cpu(const at::Tensor& grad_W, const at::Tensor& akp,
                                                           const at::Tensor& family, const at::Tensor& row,
                                                           std::array<bool, 2> output_mask) {
  const SynthesisShape s = check_synthesize_backward_args(grad_W, akp, family, row);
  check_layout_values(family, row, s);
  const at::Tensor grad_c = grad_W.to(akp.scalar_type()).contiguous();
  const at::Tensor akp_c = akp.contiguous(), family_c = family.contiguous(), row_c = row.contiguous();
  at::Tensor grad_akp = output_mask[0] ? at::empty_like(akp_c) : at::empty({0}, akp.options());
  at::Tensor grad_weight =
      output_mask[1] ? at::empty({s.num_plain, s.cg, s.kh, s.kw}, akp.options()) : at::empty({0}, akp.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, akp.scalar_type(), "acl_fused::synthesize_backward", [&] {
    akp_grad_slices<scalar_t>(s, grad_c.const_data_ptr<scalar_t>(), akp_c.const_data_ptr<scalar_t>(),
                              family_c.const_data_ptr<int>(), row_c.const_data_ptr<int>(),
                              output_mask[0] ? grad_akp.mutable_data_ptr<scalar_t>() : nullptr,
                              output_mask[1] ? grad_weight.mutable_data_ptr<scalar_t>() : nullptr);
  });
  return {grad_akp, grad_weight};
}

}  // namespace

TORCH_LIBRARY_IMPL(acl_fused, CPU, m) {
  m.impl("synthesize", &synthesize_cpu);
  m.impl("synthesize_backward", &synthesize_backward_cpu);
  m.impl("acl_conv2d", &acl_conv2d);
  m.impl("acl_conv2d_backward", &acl_conv2d_backward);
}

}  // namespace acl_fused
