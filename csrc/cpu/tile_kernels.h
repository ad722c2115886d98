#pragma once
// SIMD synthesis kernels for the CPU, float32 compute: one lane per (o, c) slice. A *tile* is
// `lanes` (1 <= lanes <= width) consecutive slices c0, c0 + 1, ... of one analytic output
// channel, so all of one family: each grid point is evaluated for the whole tile at once with the
// families.h formulas on vectors (lanes past `lanes` compute on zero AKPs and are dropped).
//
// Each instruction set's kernels live in their own translation unit compiled for that set
// (synthesis_avx2.cpp); synthesis_cpu.cpp picks them at run time and only when the CPU has the
// instructions, so a wheel built here still runs on any x86-64 CPU. This header is all the two
// sides share: plain pointers, no vector types (and no inline code: see synthesis_avx2.cpp).

#include <cstdint>

namespace acl_fused {
namespace cpu {

// Where a tile's weights are: point e = i * kw + j of lane l at w[l * lane + e * point]. A
// contiguous [C_out, Cg, kH, kW] tensor has (lane, point) = (kH * kW, 1), a channels_last one (1, Cg).
struct TileStrides {
  int64_t lane, point;
};

struct TileKernels {
  int width;       // slices per tile (SIMD lanes)
  int max_points;  // largest kH * kW the kernels take
  // w [lanes, kh, kw] (at `strides`) = the slices' kernels from akp [lanes, kAkpSlots] (raw AKPs
  // of family `code`).
  void (*synthesize)(int code, const float* akp, int lanes, int kh, int kw, float* w, TileStrides strides);
  // grad_akp [lanes, kAkpSlots] = the AKP gradients (0 in unused slots) for grad_w [lanes, kh, kw]
  // (at `strides`); and, where w is not null, w [lanes, kh, kw] (at `w_strides`) = the kernels,
  // from the same exp / cos.
  void (*akp_grad)(int code, const float* akp, const float* grad_w, TileStrides strides, int lanes, int kh, int kw,
                   float* grad_akp, float* w, TileStrides w_strides);
};

// AVX2 + FMA kernels (8 lanes), built where GCC targets x86-64 (synthesis_avx2.cpp asks for the
// instructions with GCC's target pragma). Call only on a CPU that has AVX2 and FMA.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define ACL_FUSED_HAVE_AVX2_TILES 1
extern const TileKernels kAvx2TileKernels;
#endif

}  // namespace cpu
}  // namespace acl_fused
