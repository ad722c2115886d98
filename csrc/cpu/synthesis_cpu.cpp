// CPU kernels of acl_fused::synthesize / synthesize_backward: tiles of up to `width` consecutive
// slices (o, c0), (o, c0 + 1), ... of one output channel, in contiguous shares per thread
// (for_each_run), each tile done start to finish by one thread (no reduction across threads).
// float32 tiles of an analytic channel run the SIMD tile kernels (tile_kernels.h, one lane per
// slice) where the CPU has them; float64, one-slice tiles, kernels of more than 128 points (the
// tiles take up to 11x11) and float32 without them run families.h one slice at a time. half /
// bfloat16 are computed in float32 and rounded once.
// Also registers the acl_conv2d composite for CPU.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <optional>
#include <type_traits>
#include <vector>

#include "cpu/tile_kernels.h"
#include "dual.h"
#include "families.h"
#include "ops.h"

namespace acl_fused {
namespace {

using cpu::TileKernels;
using cpu::TileStrides;

// The SIMD tile kernels this CPU can run, or nullptr. ATen's CPU capability is honoured too, so
// ATEN_CPU_CAPABILITY=default turns them off as it does ATen's own vector kernels.
const TileKernels* simd_tile_kernels() {
#if defined(ACL_FUSED_HAVE_AVX2_TILES)
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                           at::get_cpu_capability() != "DEFAULT";
  return avx2 ? &cpu::kAvx2TileKernels : nullptr;
#else
  return nullptr;
#endif
}

// Tiles narrower than this run one slice at a time (measured: one vector of 8 slices costs ~1.5
// scalar slices).
constexpr int kMinSimdLanes = 2;

// Estimated nanoseconds of one slice of family `code` with kk points: a per-slice part (pos(),
// cos θ, ... for the analytic families, and their centre) and a per-point part, fitted to float32
// synthesize on one thread of the AVX2 tiles (AMD EPYC, 256->256 1x1 / 3x3 / 5x5, one family at a
// time; the backward costs 1.2-1.5x as much in the same proportions). Only the ratios matter to the
// split below; the total decides whether a second thread pays for its start.
double slice_cost_ns(int code, int64_t kk) {
  //                                          plain  Gabor  LoG   LoT   TGD1  TGD2  Mean
  static constexpr double kPerSlice[kNumFamilies] = {0.0, 4.9, 2.8, 2.7, 4.5, 3.1, 2.0};
  static constexpr double kPerPoint[kNumFamilies] = {0.15, 1.2, 0.5, 0.35, 0.9, 0.9, 0.13};
  const int f = code >= 0 && code < kNumFamilies ? code : 0;
  return kPerSlice[f] + kPerPoint[f] * static_cast<double>(kk);
}

// Below this estimate the work runs on the calling thread: waking another one costs ~4-5 us
// here (an at::parallel_for over 40k floats takes longer on 2 threads than on 1).
constexpr double kSerialBelowNs = 16000;

// Runs fn(o, c_begin, c_end) over runs of slices (o, c_begin) ... (o, c_end - 1) of one row, which
// cover every slice once; a run starts at a tile of `width` slices (c_begin a multiple of width)
// and only a row's last tile may be short. The tiles, in (o, c) order, are cut into one
// contiguous share per thread of equal estimated cost (slice_cost_ns of the row's family), each
// worked on front to back, so a plain row is one copy. Contiguous shares matter: measured
// (2 threads, 256 rows of 9 KiB memcpy'd), 32 us in two halves against 95 us with the rows
// dealt round-robin and 50 us in round-robin blocks of 16 rows; the costs matter because
// layouts put families in blocks of output channels (default: the analytic ones first).
template <typename Fn>
void for_each_run(const SynthesisShape& s, const int* family, int64_t width, const Fn& fn) {
  const int64_t tiles_per_row = (s.cg + width - 1) / width, tiles = s.c_out * tiles_per_row;
  const int64_t kk = s.kh * s.kw;
  std::vector<double> row_end(s.c_out);  // estimated cost of rows 0 ... o
  double total = 0;
  for (int64_t o = 0; o < s.c_out; ++o) row_end[o] = total += slice_cost_ns(family[o], kk) * s.cg;
  const int64_t shares =
      total < kSerialBelowNs ? 1 : std::clamp<int64_t>(at::get_num_threads(), 1, std::max<int64_t>(tiles, 1));
  // The first tile that starts at or after cost c (tiles, in (o, c) order, split a row's cost evenly).
  const auto first_tile_from = [&](double c) -> int64_t {
    const int64_t o = std::upper_bound(row_end.begin(), row_end.end(), c) - row_end.begin();
    if (o >= s.c_out) return tiles;
    const double row_begin = o > 0 ? row_end[o - 1] : 0.0, row_cost = row_end[o] - row_begin;
    const double t = row_cost > 0 ? std::ceil((c - row_begin) / row_cost * tiles_per_row) : 0.0;
    return o * tiles_per_row + std::clamp<int64_t>(static_cast<int64_t>(t), 0, tiles_per_row);
  };
  const auto share = [&](int64_t j) { return j == 0 ? 0 : j == shares ? tiles : first_tile_from(total * j / shares); };
  const auto run_tiles = [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end;) {
      const int64_t o = i / tiles_per_row, first = i % tiles_per_row;
      const int64_t last = std::min(tiles_per_row, first + (end - i));  // tiles [first, last) of row o
      fn(o, first * width, std::min(s.cg, last * width));
      i += last - first;
    }
  };
  if (shares == 1) {
    run_tiles(0, tiles);
    return;
  }
  at::parallel_for(0, shares, 1, [&](int64_t j_begin, int64_t j_end) { run_tiles(share(j_begin), share(j_end)); });
}

// The SIMD kernels for compute type T (float only) and kernels of this size, or nullptr.
template <typename T>
const TileKernels* tile_kernels_for(const SynthesisShape& s) {
  const TileKernels* simd = std::is_same_v<T, float> ? simd_tile_kernels() : nullptr;
  return simd != nullptr && s.kh * s.kw <= simd->max_points ? simd : nullptr;
}

// A [rows, Cg, kH, kW] tensor as (row, channel, point) strides, point e = i * kW + j: any tensor
// whose height stride is kW times its width stride, contiguous and channels_last ones included.
struct SliceStrides {
  int64_t row, c, point;

  int64_t at(int64_t r, int64_t c_, int64_t e) const { return r * row + c_ * c + e * point; }
  bool packed(int64_t kk) const { return c == kk && point == 1; }  // a slice's points, slices in a row
  TileStrides tile() const { return {c, point}; }
};

std::optional<SliceStrides> slice_strides(const at::Tensor& t) {
  const int64_t kh = t.size(2), kw = t.size(3);
  if (kh > 1 && kw > 1 && t.stride(2) != kw * t.stride(3)) return std::nullopt;
  return SliceStrides{t.stride(0), t.stride(1), kw > 1 ? t.stride(3) : t.stride(2)};
}

// t itself when it has SliceStrides (a channels_last weight is read in place), else a contiguous copy.
at::Tensor with_slice_strides(const at::Tensor& t) { return slice_strides(t) ? t : t.contiguous(); }

// Slices c0 ... c0 + n - 1 of one row: dst = src. Written in dst's memory order: in a
// channels_last row a point's slices are adjacent, and walking it slice by slice (a stride of Cg
// between points) made this copy the hottest part of a channels_last 256->256 3x3 synthesis.
template <typename T>
void copy_slices(const T* src, SliceStrides from, T* dst, SliceStrides to, int64_t n, int64_t kk) {
  if (from.packed(kk) && to.packed(kk)) {
    std::copy_n(src, n * kk, dst);
  } else if (to.c == 1 && from.c == 1) {
    for (int64_t e = 0; e < kk; ++e) std::copy_n(src + e * from.point, n, dst + e * to.point);
  } else if (to.c < to.point) {
    for (int64_t e = 0; e < kk; ++e) {
      for (int64_t l = 0; l < n; ++l) dst[l * to.c + e * to.point] = src[l * from.c + e * from.point];
    }
  } else {
    for (int64_t l = 0; l < n; ++l) {
      for (int64_t e = 0; e < kk; ++e) dst[l * to.c + e * to.point] = src[l * from.c + e * from.point];
    }
  }
}

// T: float or double, the compute type (half / bfloat16 arrive as float).
template <typename T>
void synthesize_tiles(const SynthesisShape& s, const T* akp, const T* weight, SliceStrides weight_at,
                      const int* family, const int* row, T* out, SliceStrides out_at) {
  const TileKernels* simd = tile_kernels_for<T>(s);
  const int kh = static_cast<int>(s.kh), kw = static_cast<int>(s.kw), kk = kh * kw;
  const int64_t width = simd != nullptr ? simd->width : 1;
  for_each_run(s, family, width, [&](int64_t o, int64_t c_begin, int64_t c_end) {
    const int64_t r = row[o];
    if (family[o] == kPlain) {
      copy_slices(weight + weight_at.at(r, c_begin, 0), weight_at, out + out_at.at(o, c_begin, 0), out_at,
                  c_end - c_begin, kk);
      return;
    }
    for (int64_t c0 = c_begin; c0 < c_end; c0 += width) {
      const int64_t n = std::min(width, c_end - c0);
      T* w = out + out_at.at(o, c0, 0);
      const T* p = akp + (r * s.cg + c0) * kAkpSlots;
      if constexpr (std::is_same_v<T, float>) {
        if (simd != nullptr && n >= kMinSimdLanes) {
          simd->synthesize(family[o], p, static_cast<int>(n), kh, kw, w, out_at.tile());
          continue;
        }
      }
      for (int64_t l = 0; l < n; ++l) {
        synthesize_points(family[o], p + l * kAkpSlots, kh, kw, 0, 1,
                          [&](int e, T v) { w[l * out_at.c + e * out_at.point] = v; });
      }
    }
  });
}

// grad_akp (contiguous) / grad_weight (at grad_weight_at) are null when not asked for. Where w is
// not null (then grad_akp is not either), the same pass also writes W at w_at: plain rows from
// weight, analytic ones from the exp / cos their gradients use.
template <typename T>
void akp_grad_tiles(const SynthesisShape& s, const T* grad_w, SliceStrides grad_at, const T* akp, const T* weight,
                    SliceStrides weight_at, const int* family, const int* row, T* grad_akp, T* grad_weight,
                    SliceStrides grad_weight_at, T* w, SliceStrides w_at) {
  const TileKernels* simd = tile_kernels_for<T>(s);
  const int kh = static_cast<int>(s.kh), kw = static_cast<int>(s.kw), kk = kh * kw;
  const int64_t width = simd != nullptr ? simd->width : 1;
  for_each_run(s, family, width, [&](int64_t o, int64_t c_begin, int64_t c_end) {
    const int64_t r = row[o];
    if (family[o] == kPlain) {
      const int64_t n = c_end - c_begin;
      const T* g = grad_w + grad_at.at(o, c_begin, 0);
      if (grad_weight != nullptr) {
        copy_slices(g, grad_at, grad_weight + grad_weight_at.at(r, c_begin, 0), grad_weight_at, n, kk);
      }
      if (w != nullptr) {
        copy_slices(weight + weight_at.at(r, c_begin, 0), weight_at, w + w_at.at(o, c_begin, 0), w_at, n, kk);
      }
      return;
    }
    if (grad_akp == nullptr) return;
    for (int64_t c0 = c_begin; c0 < c_end; c0 += width) {
      const int64_t n = std::min(width, c_end - c0);
      const T* g = grad_w + grad_at.at(o, c0, 0);
      T* w_tile = w == nullptr ? nullptr : w + w_at.at(o, c0, 0);
      const T* p = akp + (r * s.cg + c0) * kAkpSlots;
      T* dst = grad_akp + (r * s.cg + c0) * kAkpSlots;
      if constexpr (std::is_same_v<T, float>) {
        if (simd != nullptr && n >= kMinSimdLanes) {
          simd->akp_grad(family[o], p, g, grad_at.tile(), static_cast<int>(n), kh, kw, dst, w_tile, w_at.tile());
          continue;
        }
      }
      for (int64_t l = 0; l < n; ++l) {
        akp_grad_and_synthesize_points(
            family[o], p + l * kAkpSlots, kh, kw, 0, 1, [&](int e) { return g[l * grad_at.c + e * grad_at.point]; },
            [&](int e, T v) {
              if (w_tile != nullptr) w_tile[l * w_at.c + e * w_at.point] = v;
            },
            dst + l * kAkpSlots);
      }
    }
  });
}

// W [C_out, Cg, kH, kW] in akp's dtype, synthesized into new_out(shape, compute dtype) (a tensor
// of W's shape with SliceStrides) and returned in its layout (half / bfloat16: computed in
// float32, rounded once).
template <typename NewOut>
at::Tensor synthesize_with(const at::Tensor& akp, const std::optional<at::Tensor>& weight, const at::Tensor& family,
                           const at::Tensor& row, at::IntArrayRef kernel_size, const NewOut& new_out) {
  const SynthesisShape s = check_synthesize_args(akp, weight, family, row, kernel_size);
  check_layout_values(family, row, s);
  const at::ScalarType compute = at::toOpMathType(akp.scalar_type());
  const at::Tensor akp_c = in_dtype(akp, compute).contiguous();
  const at::Tensor family_c = family.contiguous(), row_c = row.contiguous();
  const at::Tensor weight_c = weight.has_value() ? with_slice_strides(in_dtype(*weight, compute)) : at::Tensor();
  at::Tensor out = new_out(s, akp.options().dtype(compute));
  AT_DISPATCH_FLOATING_TYPES(compute, "acl_fused::synthesize", [&] {
    synthesize_tiles<scalar_t>(s, akp_c.const_data_ptr<scalar_t>(),
                               weight_c.defined() ? weight_c.const_data_ptr<scalar_t>() : nullptr,
                               weight_c.defined() ? *slice_strides(weight_c) : SliceStrides{},
                               family_c.const_data_ptr<int>(), row_c.const_data_ptr<int>(),
                               out.mutable_data_ptr<scalar_t>(), *slice_strides(out));
  });
  return in_dtype(out, akp.scalar_type());
}

at::Tensor synthesize_cpu(const at::Tensor& akp, const std::optional<at::Tensor>& weight, const at::Tensor& family,
                          const at::Tensor& row, at::IntArrayRef kernel_size) {
  return synthesize_with(akp, weight, family, row, kernel_size, [](const SynthesisShape& s, at::TensorOptions options) {
    return at::empty({s.c_out, s.cg, s.kh, s.kw}, options);
  });
}

// This thread's W buffer of `dtype` (1-D), kept between calls: the largest W of that dtype so far.
at::Tensor& thread_buffer(at::ScalarType dtype) {
  thread_local std::array<at::Tensor, static_cast<size_t>(at::ScalarType::NumOptions)> buffers;
  return buffers[static_cast<size_t>(dtype)];
}

// The thread's buffer of options' dtype, grown to numel at least; a new buffer replaces it when a
// view handed out is still alive (anyone may keep a tensor they were given).
const at::Tensor& reused_buffer(int64_t numel, const at::TensorOptions& options) {
  at::Tensor& buffer = thread_buffer(options.dtype().toScalarType());
  if (!buffer.defined() || buffer.storage().use_count() > 1 || buffer.numel() < numel) {
    const int64_t capacity = buffer.defined() ? std::max(numel, buffer.numel()) : numel;
    buffer = at::Tensor();  // the old buffer goes first, so that its memory can be the new one's
    buffer = at::empty({capacity}, options);
  }
  return buffer;
}

// (grad_akp, grad_weight) as synthesize_backward_cpu returns them; where w is defined (a tensor
// of W's shape with SliceStrides, in the compute dtype) the same pass also writes W into it.
std::tuple<at::Tensor, at::Tensor> akp_grads(const at::Tensor& grad_W, const at::Tensor& akp,
                                             const std::optional<at::Tensor>& weight, const at::Tensor& family,
                                             const at::Tensor& row, std::array<bool, 2> output_mask,
                                             const at::Tensor& w) {
  const SynthesisShape s = check_synthesize_backward_args(grad_W, akp, family, row);
  check_layout_values(family, row, s);
  // grad_W is taken in akp's dtype first, as on CUDA.
  const at::ScalarType compute = at::toOpMathType(akp.scalar_type());
  const at::Tensor grad_c = with_slice_strides(in_dtype(in_dtype(grad_W, akp.scalar_type()), compute));
  const at::Tensor akp_c = in_dtype(akp, compute).contiguous();
  const at::Tensor family_c = family.contiguous(), row_c = row.contiguous();
  const at::Tensor weight_c = weight.has_value() ? with_slice_strides(in_dtype(*weight, compute)) : at::Tensor();
  const at::TensorOptions options = akp.options().dtype(compute);
  at::Tensor grad_akp = output_mask[0] ? at::empty_like(akp_c) : at::empty({0}, options);
  // The plain rows' gradient in the plain weight's layout where there is one (acl_conv2d_backward:
  // autograd would otherwise copy a contiguous gradient of a channels_last parameter).
  at::Tensor grad_weight = !output_mask[1]     ? at::empty({0}, options)
                           : weight_c.defined() ? at::empty_like(weight_c, options)
                                                : at::empty({s.num_plain, s.cg, s.kh, s.kw}, options);
  AT_DISPATCH_FLOATING_TYPES(compute, "acl_fused::synthesize_backward", [&] {
    akp_grad_tiles<scalar_t>(s, grad_c.const_data_ptr<scalar_t>(), *slice_strides(grad_c),
                             akp_c.const_data_ptr<scalar_t>(),
                             weight_c.defined() ? weight_c.const_data_ptr<scalar_t>() : nullptr,
                             weight_c.defined() ? *slice_strides(weight_c) : SliceStrides{},
                             family_c.const_data_ptr<int>(), row_c.const_data_ptr<int>(),
                             output_mask[0] ? grad_akp.mutable_data_ptr<scalar_t>() : nullptr,
                             output_mask[1] ? grad_weight.mutable_data_ptr<scalar_t>() : nullptr,
                             output_mask[1] ? *slice_strides(grad_weight) : SliceStrides{},
                             w.defined() ? w.mutable_data_ptr<scalar_t>() : nullptr,
                             w.defined() ? *slice_strides(w) : SliceStrides{});
  });
  return {in_dtype(grad_akp, akp.scalar_type()), in_dtype(grad_weight, akp.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor> synthesize_backward_cpu(const at::Tensor& grad_W, const at::Tensor& akp,
                                                           const at::Tensor& family, const at::Tensor& row,
                                                           std::array<bool, 2> output_mask) {
  return akp_grads(grad_W, akp, std::nullopt, family, row, output_mask, at::Tensor());
}

std::tuple<at::Tensor, at::Tensor> synthesize_backward_jvp_cpu(const std::optional<at::Tensor>& akp_tangent,
                                                               const std::optional<at::Tensor>& weight_tangent,
                                                               const at::Tensor& grad_W, const at::Tensor& akp,
                                                               const at::Tensor& family, const at::Tensor& row,
                                                               std::array<bool, 2> output_mask) {
  const SynthesisShape s = check_synthesize_backward_args(grad_W, akp, family, row);
  check_layout_values(family, row, s);
  check_synthesize_backward_jvp_tangents(akp_tangent, weight_tangent, akp, s);
  const at::ScalarType compute = at::toOpMathType(akp.scalar_type());
  const auto compute_copy = [&](const at::Tensor& t) {
    return in_dtype(in_dtype(t, akp.scalar_type()), compute).contiguous();
  };
  const at::Tensor grad_c = compute_copy(grad_W), akp_c = compute_copy(akp);
  const at::Tensor akp_t = akp_tangent.has_value() ? compute_copy(*akp_tangent) : at::Tensor();
  const at::Tensor weight_t = weight_tangent.has_value() ? compute_copy(*weight_tangent) : at::Tensor();
  const at::Tensor family_c = family.contiguous(), row_c = row.contiguous();
  const at::TensorOptions options = akp.options().dtype(compute);
  at::Tensor w_tangent = output_mask[0] ? at::empty({s.c_out, s.cg, s.kh, s.kw}, options) : at::empty({0}, options);
  at::Tensor grad_akp_tangent = output_mask[1] ? at::empty_like(akp_c) : at::empty({0}, options);
  AT_DISPATCH_FLOATING_TYPES(compute, "acl_fused::synthesize_backward_jvp", [&] {
    const auto data = [](const at::Tensor& t) { return t.defined() ? t.const_data_ptr<scalar_t>() : nullptr; };
    const scalar_t *grad = grad_c.const_data_ptr<scalar_t>(), *akp_p = akp_c.const_data_ptr<scalar_t>();
    const scalar_t *akp_t_p = data(akp_t), *weight_t_p = data(weight_t);
    const int *family_p = family_c.const_data_ptr<int>(), *row_p = row_c.const_data_ptr<int>();
    scalar_t* w_t = output_mask[0] ? w_tangent.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* grad_akp_t = output_mask[1] ? grad_akp_tangent.mutable_data_ptr<scalar_t>() : nullptr;
    // Double backward only: one slice at a time, no SIMD tiles.
    at::parallel_for(0, s.slices(), 64, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        synthesize_backward_jvp_slice<scalar_t>(s, i, family_p, row_p, grad, akp_p, akp_t_p, weight_t_p, w_t,
                                                grad_akp_t);
      }
    });
  });
  return {in_dtype(w_tangent, grad_W.scalar_type()), in_dtype(grad_akp_tangent, akp.scalar_type())};
}

// A [C_out, Cg, kH, kW] tensor in `memory_format`, viewing the first elements of this thread's
// reused buffer of its dtype (one as_strided: a chain of views cost a few us a call).
at::Tensor conv_weight_buffer(at::IntArrayRef sizes, at::TensorOptions options, at::MemoryFormat memory_format) {
  const int64_t cg = sizes[1], kh = sizes[2], kw = sizes[3];
  const int64_t numel = sizes[0] * cg * kh * kw;
  const std::array<int64_t, 4> strides = memory_format == at::MemoryFormat::ChannelsLast
                                             ? std::array<int64_t, 4>{cg * kh * kw, 1, kw * cg, cg}
                                             : std::array<int64_t, 4>{cg * kh * kw, kh * kw, kw, 1};
  return reused_buffer(numel, options).as_strided(sizes, strides);
}

}  // namespace

// W lives only for the convolution that uses it, so it is synthesized into this thread's reused
// buffer: glibc's malloc returns a freed multi-MB block to the OS, and a fresh W faults all its
// pages back in on every call. Measured (2 threads, AMD EPYC VM): F.conv2d of a [4, 256, 7, 7]
// input with a 256->256 3x3 weight takes 1.0 ms with a reused weight and 2.5 ms (1170 page
// faults) with a fresh copy each call. The buffers cost the largest W of each dtype on this thread.
// W is laid out as the convolution wants it (channels_last for a channels_last input: oneDNN would
// otherwise copy it, forward and backward).
at::Tensor CpuSynthesis::weight(const at::Tensor& akp, const std::optional<at::Tensor>& weight,
                                const at::Tensor& family, const at::Tensor& row, at::IntArrayRef kernel_size,
                                at::MemoryFormat memory_format) {
  return synthesize_with(akp, weight, family, row, kernel_size, [&](const SynthesisShape& s, at::TensorOptions o) {
    return conv_weight_buffer({s.c_out, s.cg, s.kh, s.kw}, o, memory_format);
  });
}

at::Tensor CpuSynthesis::unfilled_weight(at::IntArrayRef sizes, at::TensorOptions options,
                                         at::MemoryFormat memory_format) {
  return conv_weight_buffer(sizes, options, memory_format);
}

// While grad_input's convolution runs, W and grad_W are not both held beside the parameter
// gradients (nn.Conv2d's weight gradient does not exist yet at its input gradient's peak). W goes
// into this thread's buffer, grad_W freed when the pass returns, except where grad_W is at least
// as large as that buffer (the largest W so far; always so for a network's largest layers): then
// W is written over grad_W, on the lines the same pass has just read, and grad_W becomes the
// buffer in place of the old one, freed before the pass. In a ResNet-18 training step (64 px,
// batch 8), whose 512->512 layers are mostly synthesis, W always into the buffer was 1-5% slower
// (benchmarks/RESULTS.md).
std::tuple<at::Tensor, at::Tensor, at::Tensor> CpuSynthesis::weight_and_grads(
    at::Tensor grad_W, const at::Tensor& akp, const std::optional<at::Tensor>& weight, const at::Tensor& family,
    const at::Tensor& row, at::IntArrayRef kernel_size, at::MemoryFormat memory_format, bool want_weight) {
  const SynthesisShape s = check_synthesize_args(akp, weight, family, row, kernel_size);
  const at::ScalarType compute = at::toOpMathType(akp.scalar_type());
  at::Tensor& buffer = thread_buffer(compute);
  const bool over_grad_W = grad_W.scalar_type() == compute && grad_W.is_contiguous(memory_format) &&
                           (!buffer.defined() || grad_W.numel() >= buffer.numel());
  if (over_grad_W) buffer = at::Tensor();
  const at::Tensor w = over_grad_W ? grad_W
                                   : conv_weight_buffer({s.c_out, s.cg, s.kh, s.kw}, akp.options().dtype(compute),
                                                        memory_format);
  auto [grad_akp, grad_weight] = akp_grads(grad_W, akp, weight, family, row, {true, want_weight}, w);
  if (over_grad_W) buffer = w.as_strided({w.numel()}, {1});
  return {in_dtype(w, akp.scalar_type()), grad_akp, grad_weight};
}

TORCH_LIBRARY_IMPL(acl_fused, CPU, m) {
  m.impl("synthesize", &synthesize_cpu);
  m.impl("synthesize_backward", &synthesize_backward_cpu);
  m.impl("synthesize_backward_jvp", &synthesize_backward_jvp_cpu);
  m.impl("acl_conv2d", &acl_conv2d<CpuSynthesis>);
  m.impl("acl_conv2d_backward", &acl_conv2d_backward<CpuSynthesis>);
}

}  // namespace acl_fused
