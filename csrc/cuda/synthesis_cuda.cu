// CUDA kernels of acl_fused::synthesize / synthesize_backward (and synthesize_backward_jvp, double
// backward's, one thread per slice): one launch each for the whole
// mosaic (every family and the plain rows). A group of `lanes` threads (a power of two <= 32, so
// a group never straddles a warp) owns one (o, c) slice: its lanes split the slice's mirror pairs
// of grid points (families.h for_each_pair) and, for the AKP gradient, add their partial sums with
// warp shuffles. No atomics, no shared memory, nothing stored for the backward. Also registers the
// acl_conv2d composite for CUDA.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>

#include "dual.h"
#include "families.h"
#include "ops.h"

namespace acl_fused {
namespace {

constexpr int kThreads = 256;  // a multiple of the warp size: groups stay inside warps

// Lanes per slice: the largest power of two <= min(mirror pairs (kH*kW + 1) / 2, warp size) (4 for
// 3x3, 32 from 8x8): each lane walks its share of the pairs (families.h for_each_pair).
int lanes_per_slice(const SynthesisShape& s) {
  const int64_t limit = std::min<int64_t>((s.kh * s.kw + 1) / 2, C10_WARP_SIZE);
  int lanes = 1;
  while (lanes * 2 <= limit) lanes *= 2;
  return lanes;
}

struct Launch {
  unsigned int blocks;
  int lanes;
};

Launch launch_shape(const SynthesisShape& s) {
  const int lanes = lanes_per_slice(s);
  const int64_t blocks = (s.slices() * lanes + kThreads - 1) / kThreads;
  TORCH_CHECK(blocks <= INT_MAX, "acl_fused: too many (output, input) channel slices for one launch: ", s.slices());
  return {static_cast<unsigned int>(blocks), lanes};
}

// The (o, c) slice this thread works on, and its lane in the slice's group.
struct SliceLane {
  int64_t slice, o, c;
  int lane;
};

__device__ inline SliceLane slice_lane(const SynthesisShape& s, int lanes) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t slice = t / lanes;
  return {slice, slice / s.cg, slice % s.cg, static_cast<int>(t % lanes)};
}

__device__ inline void assert_layout(const SynthesisShape& s, int code, int64_t r) {
  CUDA_KERNEL_ASSERT(code >= 0 && code < kNumFamilies);
  CUDA_KERNEL_ASSERT(r >= 0 && r < (code == kPlain ? s.num_plain : s.num_analytic));
}

template <typename scalar_t>
__global__ void synthesize_kernel(SynthesisShape s, int lanes, const scalar_t* __restrict__ akp,
                                  const scalar_t* __restrict__ weight, const int* __restrict__ family,
                                  const int* __restrict__ row, scalar_t* __restrict__ out) {
  using T = at::opmath_type<scalar_t>;
  const SliceLane t = slice_lane(s, lanes);
  if (t.slice >= s.slices()) return;
  const int code = family[t.o];
  const int64_t r = row[t.o];
  assert_layout(s, code, r);
  const int kh = static_cast<int>(s.kh), kw = static_cast<int>(s.kw), kk = kh * kw;
  scalar_t* w = out + t.slice * kk;
  if (code == kPlain) {
    const scalar_t* src = weight + (r * s.cg + t.c) * kk;
    for (int e = t.lane; e < kk; e += lanes) w[e] = src[e];
    return;
  }
  T p[kAkpSlots];
  const scalar_t* src = akp + (r * s.cg + t.c) * kAkpSlots;
  for (int k = 0; k < kAkpSlots; ++k) p[k] = static_cast<T>(src[k]);
  synthesize_slice<T>(code, p, kh, kw, t.lane, lanes, w);
}

// grad_akp / grad_weight are null when not asked for.
template <typename scalar_t>
__global__ void synthesize_backward_kernel(SynthesisShape s, int lanes, const scalar_t* __restrict__ grad_w,
                                           const scalar_t* __restrict__ akp, const int* __restrict__ family,
                                           const int* __restrict__ row, scalar_t* __restrict__ grad_akp,
                                           scalar_t* __restrict__ grad_weight) {
  using T = at::opmath_type<scalar_t>;
  const SliceLane t = slice_lane(s, lanes);
  // Every exit below is taken by a whole group at once (same slice), so the shuffles at the end
  // always see all lanes of their group.
  if (t.slice >= s.slices()) return;
  const int code = family[t.o];
  const int64_t r = row[t.o];
  assert_layout(s, code, r);
  const int kh = static_cast<int>(s.kh), kw = static_cast<int>(s.kw), kk = kh * kw;
  const scalar_t* g = grad_w + t.slice * kk;
  if (code == kPlain) {
    if (grad_weight != nullptr) {
      scalar_t* dst = grad_weight + (r * s.cg + t.c) * kk;
      for (int e = t.lane; e < kk; e += lanes) dst[e] = g[e];
    }
    return;
  }
  if (grad_akp == nullptr) return;
  T p[kAkpSlots], grad[kAkpSlots];
  const scalar_t* src = akp + (r * s.cg + t.c) * kAkpSlots;
  for (int k = 0; k < kAkpSlots; ++k) p[k] = static_cast<T>(src[k]);
  akp_grad_slice<T>(code, p, kh, kw, t.lane, lanes, g, grad);
  const int first_lane = (threadIdx.x % C10_WARP_SIZE) / lanes * lanes;
  const unsigned group = (lanes == 32 ? 0xffffffffu : (1u << lanes) - 1u) << first_lane;
  for (int offset = lanes / 2; offset > 0; offset /= 2) {
    for (int k = 0; k < kAkpSlots; ++k) grad[k] += __shfl_xor_sync(group, grad[k], offset, lanes);
  }
  if (t.lane == 0) {
    scalar_t* dst = grad_akp + (r * s.cg + t.c) * kAkpSlots;
    for (int k = 0; k < kAkpSlots; ++k) dst[k] = static_cast<scalar_t>(grad[k]);
  }
}

// synthesize_backward_jvp: one thread per slice (double backward only: not tuned).
template <typename scalar_t>
__global__ void synthesize_backward_jvp_kernel(SynthesisShape s, const scalar_t* __restrict__ grad_w,
                                               const scalar_t* __restrict__ akp, const scalar_t* akp_tangent,
                                               const scalar_t* weight_tangent, const int* __restrict__ family,
                                               const int* __restrict__ row, scalar_t* w_tangent,
                                               scalar_t* grad_akp_tangent) {
  const int64_t slice = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (slice >= s.slices()) return;
  assert_layout(s, family[slice / s.cg], row[slice / s.cg]);
  synthesize_backward_jvp_slice<at::opmath_type<scalar_t>>(s, slice, family, row, grad_w, akp, akp_tangent,
                                                           weight_tangent, w_tangent, grad_akp_tangent);
}

at::Tensor synthesize_cuda(const at::Tensor& akp, const std::optional<at::Tensor>& weight, const at::Tensor& family,
                           const at::Tensor& row, at::IntArrayRef kernel_size) {
  const SynthesisShape s = check_synthesize_args(akp, weight, family, row, kernel_size);
  const c10::cuda::CUDAGuard device_guard(akp.device());
  const at::Tensor akp_c = akp.contiguous(), family_c = family.contiguous(), row_c = row.contiguous();
  const at::Tensor weight_c = weight.has_value() ? weight->contiguous() : at::Tensor();
  at::Tensor out = at::empty({s.c_out, s.cg, s.kh, s.kw}, akp.options());
  const Launch launch = launch_shape(s);
  if (launch.blocks == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, akp.scalar_type(), "acl_fused::synthesize", [&] {
    synthesize_kernel<scalar_t><<<launch.blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        s, launch.lanes, akp_c.const_data_ptr<scalar_t>(),
        weight_c.defined() ? weight_c.const_data_ptr<scalar_t>() : nullptr, family_c.const_data_ptr<int>(),
        row_c.const_data_ptr<int>(), out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> synthesize_backward_cuda(const at::Tensor& grad_W, const at::Tensor& akp,
                                                            const at::Tensor& family, const at::Tensor& row,
                                                            std::array<bool, 2> output_mask) {
  const SynthesisShape s = check_synthesize_backward_args(grad_W, akp, family, row);
  const c10::cuda::CUDAGuard device_guard(akp.device());
  const at::Tensor grad_c = in_dtype(grad_W, akp.scalar_type()).contiguous();
  const at::Tensor akp_c = akp.contiguous(), family_c = family.contiguous(), row_c = row.contiguous();
  at::Tensor grad_akp = output_mask[0] ? at::empty_like(akp_c) : at::empty({0}, akp.options());
  at::Tensor grad_weight = output_mask[1] ? at::empty({s.num_plain, s.cg, s.kh, s.kw}, akp.options())
                                          : at::empty({0}, akp.options());
  const Launch launch = launch_shape(s);
  if (launch.blocks == 0 || !(output_mask[0] || output_mask[1])) return {grad_akp, grad_weight};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, akp.scalar_type(), "acl_fused::synthesize_backward", [&] {
    synthesize_backward_kernel<scalar_t><<<launch.blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        s, launch.lanes, grad_c.const_data_ptr<scalar_t>(), akp_c.const_data_ptr<scalar_t>(),
        family_c.const_data_ptr<int>(), row_c.const_data_ptr<int>(),
        output_mask[0] ? grad_akp.mutable_data_ptr<scalar_t>() : nullptr,
        output_mask[1] ? grad_weight.mutable_data_ptr<scalar_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_akp, grad_weight};
}

std::tuple<at::Tensor, at::Tensor> synthesize_backward_jvp_cuda(const std::optional<at::Tensor>& akp_tangent,
                                                                const std::optional<at::Tensor>& weight_tangent,
                                                                const at::Tensor& grad_W, const at::Tensor& akp,
                                                                const at::Tensor& family, const at::Tensor& row,
                                                                std::array<bool, 2> output_mask) {
  const SynthesisShape s = check_synthesize_backward_args(grad_W, akp, family, row);
  check_synthesize_backward_jvp_tangents(akp_tangent, weight_tangent, akp, s);
  const c10::cuda::CUDAGuard device_guard(akp.device());
  const auto in_akp_dtype = [&](const std::optional<at::Tensor>& t) {
    return t.has_value() ? in_dtype(*t, akp.scalar_type()).contiguous() : at::Tensor();
  };
  const at::Tensor grad_c = in_akp_dtype(grad_W), akp_t = in_akp_dtype(akp_tangent);
  const at::Tensor weight_t = in_akp_dtype(weight_tangent);
  const at::Tensor akp_c = akp.contiguous(), family_c = family.contiguous(), row_c = row.contiguous();
  at::Tensor w_tangent =
      output_mask[0] ? at::empty({s.c_out, s.cg, s.kh, s.kw}, akp.options()) : at::empty({0}, akp.options());
  at::Tensor grad_akp_tangent = output_mask[1] ? at::empty_like(akp_c) : at::empty({0}, akp.options());
  const int64_t blocks = (s.slices() + kThreads - 1) / kThreads;
  TORCH_CHECK(blocks <= INT_MAX, "acl_fused: too many (output, input) channel slices for one launch: ", s.slices());
  if (blocks > 0 && (output_mask[0] || output_mask[1])) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, akp.scalar_type(), "acl_fused::synthesize_backward_jvp",
                                    [&] {
      const auto data = [](const at::Tensor& t) { return t.defined() ? t.const_data_ptr<scalar_t>() : nullptr; };
      synthesize_backward_jvp_kernel<scalar_t>
          <<<static_cast<unsigned int>(blocks), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
              s, grad_c.const_data_ptr<scalar_t>(), akp_c.const_data_ptr<scalar_t>(), data(akp_t), data(weight_t),
              family_c.const_data_ptr<int>(), row_c.const_data_ptr<int>(),
              output_mask[0] ? w_tangent.mutable_data_ptr<scalar_t>() : nullptr,
              output_mask[1] ? grad_akp_tangent.mutable_data_ptr<scalar_t>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {in_dtype(w_tangent, grad_W.scalar_type()), grad_akp_tangent};
}

}  // namespace

TORCH_LIBRARY_IMPL(acl_fused, CUDA, m) {
  m.impl("synthesize", &synthesize_cuda);
  m.impl("synthesize_backward", &synthesize_backward_cuda);
  m.impl("synthesize_backward_jvp", &synthesize_backward_jvp_cuda);
  m.impl("acl_conv2d", &acl_conv2d<DispatchedSynthesis>);
  m.impl("acl_conv2d_backward", &acl_conv2d_backward<DispatchedSynthesis>);
}

}  // namespace acl_fused
