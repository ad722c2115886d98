// AVX2 + FMA tile kernels (tile_kernels.h): 8 slices per tile, one per lane of
// at::vec::Vectorized<float>, with an inline exp (below) and SLEEF's sincos (from libtorch_cpu;
// within a few ulp, like libm's). The families.h formulas run unchanged on the vectors.
//
// Data movement: a tile's AKPs are [8 lanes, 6 slots] in memory, while the formulas want one
// vector per slot and per point (8 lanes each), and visit the points in mirror pairs (e, kk-1-e).
// So a tile's point-vectors live in a small buffer in point order, filled from memory or written
// to it in order: weights in a contiguous tensor are [8 lanes, kk points] and full tiles convert
// with 8x8 register transposes; in a channels_last tensor a point's 8 lanes are adjacent, one load
// or store. The last kk % 8 points of contiguous tiles, and tiles of fewer than 8 slices, go lane
// by lane.
// Measured against lane by lane for every point (1 thread, AnalyticConv2d(256, 256, 3)):
// synthesize_backward 1.48 -> 1.04 ms on the default layout, 4.1 -> 3.0 ms with half Gabor, half
// TGD1; an all-MEAN synthesize (no transcendentals) 0.70 -> 0.31 ms.
//
// setup.py compiles every source with the same flags, so this file asks for AVX2 + FMA itself,
// with a target pragma opened before any include that has code: ATen's vector headers and
// families.h are compiled for AVX2 here and nowhere else. Nothing compiled here may be linked into
// code that runs without AVX2: ATen puts its vector code in the namespace at::vec::AVX2
// (CPU_CAPABILITY below), everything else here is a template on that vector type or in an
// anonymous namespace (tests/test_native.py checks the object's symbols), and synthesis_cpu.cpp
// calls the entry points only after checking the CPU.
#include "cpu/tile_kernels.h"

#if defined(ACL_FUSED_HAVE_AVX2_TILES)

#pragma GCC push_options
#pragma GCC target("avx2,fma")
// GCC turns the zeroing of a tile's six gradient vectors into `rep stos`, whose start-up cost was
// 20% of the AKP-gradient tile kernel on 1x1 kernels; plain vector stores instead (64->128 1x1
// synthesize_backward 31 -> 28-29 us, 256->256 3x3 0.31 -> 0.28-0.32 ms, 2 threads).
#pragma GCC optimize("no-tree-loop-distribute-patterns")
// g++ preprocesses the whole file before it parses the pragma, so it does not define the feature
// macros that -mavx2 -mfma would; sleef.h declares its 8-lane functions only under them.
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif

#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
// GCC compiles the function-pointer thunk of a lambda in ATen's bfloat16 vectors without the
// target pragma and warns that its ABI differs; nothing here uses it.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
#include <ATen/cpu/vec/vec.h>
#pragma GCC diagnostic pop

#include "families.h"

namespace acl_fused {
namespace math {
// exp inline: Vectorized<float>::exp is a call to SLEEF through its dispatcher, and as no vector
// register survives a call, every vector live across it went to the stack and back (perf: the
// call was 29% of synthesize's time). Measured, 256->256 3x3, 2 threads, three runs each: all
// TGD1 synthesize 0.53-0.58 -> 0.44-0.46 ms, default layout 0.24-0.28 -> 0.22-0.23 ms.
// Cephes' expf: x = n ln2 + r with ln2 in two parts (exact n ln2_hi), |r| <= ln2 / 2, a degree-6
// polynomial (about 1 ulp); 2^n as two factors 2^(n/2) 2^(n - n/2), each a normal float, so
// results from overflow (inf) down to denormals come out right. NaN in, NaN out.
template <>
inline at::vec::Vectorized<float> exp<at::vec::Vectorized<float>>(const at::vec::Vectorized<float>& v) {
  const __m256 x = v;
  const __m256 clamped = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-104.f)), _mm256_set1_ps(89.f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(clamped, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), clamped);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i ni = _mm256_cvtps_epi32(n);
  const __m256i half = _mm256_srai_epi32(ni, 1);
  const auto power_of_two = [](__m256i k) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(k, _mm256_set1_epi32(127)), 23));
  };
  const __m256 result = _mm256_mul_ps(_mm256_mul_ps(p, power_of_two(half)), power_of_two(_mm256_sub_epi32(ni, half)));
  return _mm256_blendv_ps(result, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}

// One SLEEF call for both (at::vec has no sincos); 3.5 ulp, as Vectorized<float>'s sin and cos.
template <>
inline void sincos<at::vec::Vectorized<float>>(const at::vec::Vectorized<float>& v, at::vec::Vectorized<float>& s,
                                              at::vec::Vectorized<float>& c) {
  const Sleef___m256_2 both = Sleef_sincosf8_u35(v);
  s = both.x;
  c = both.y;
}
}  // namespace math

namespace cpu {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int kLanes = Vec::size();
static_assert(kLanes == 8, "AVX2 float vectors have 8 lanes");

// r[i][j] <- r[j][i].
inline void transpose8x8(__m256 (&r)[8]) {
  __m256 t[8], s[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i) {
    for (int h = 0; h < 2; ++h) {
      s[4 * i + 2 * h] = _mm256_shuffle_ps(t[4 * i + h], t[4 * i + h + 2], _MM_SHUFFLE(1, 0, 1, 0));
      s[4 * i + 2 * h + 1] = _mm256_shuffle_ps(t[4 * i + h], t[4 * i + h + 2], _MM_SHUFFLE(3, 2, 3, 2));
    }
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(s[i], s[i + 4], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(s[i], s[i + 4], 0x31);
  }
}

// Lanes [0, 6) from p[0..5], lanes 6 and 7 zero: one row of kAkpSlots values without reading past it.
inline __m256 load_slots(const float* p) {
  const __m128 low = _mm_loadu_ps(p);
  const __m128 high = _mm_castsi128_ps(_mm_loadu_si64(p + 4));  // p is only float-aligned
  return _mm256_insertf128_ps(_mm256_castps128_ps256(low), high, 1);
}

// A tile's AKPs, one vector per slot. Built from initialisers: an array of Vec would be zeroed
// by Vec's constructor first (64->128 1x1, synthesize_backward: 55 -> 51 us on 1 thread, 41 -> 31 us on 2).
struct TileAkp {
  Vec p[kAkpSlots];
};

// p[k] = slot k of every lane's AKPs; akp is [lanes, kAkpSlots]. Lanes past `lanes` get zero
// AKPs, which give finite kernels (pos(0) > 0); their results are dropped.
TileAkp load_akp(const float* akp, int lanes) {
  __m256 rows[kLanes];
  for (int l = 0; l < kLanes; ++l) rows[l] = l < lanes ? load_slots(akp + l * kAkpSlots) : _mm256_setzero_ps();
  transpose8x8(rows);
  return {{rows[0], rows[1], rows[2], rows[3], rows[4], rows[5]}};
}

// grad_akp [lanes, kAkpSlots] = lane l of grad[0..5].
void store_akp_grad(const Vec* grad, int lanes, float* grad_akp) {
  __m256 rows[kLanes];
  for (int k = 0; k < kLanes; ++k) rows[k] = k < kAkpSlots ? __m256(grad[k]) : _mm256_setzero_ps();
  transpose8x8(rows);
  for (int l = 0; l < lanes; ++l) {
    float* dst = grad_akp + l * kAkpSlots;
    _mm_storeu_ps(dst, _mm256_castps256_ps128(rows[l]));
    _mm_storeu_si64(dst + 4, _mm_castps_si128(_mm256_extractf128_ps(rows[l], 1)));
  }
}

constexpr int kMaxPoints = 128;  // kernels up to 11x11: a tile buffer is 4 KiB of stack

// A tile's point-vectors, in point order: the formulas visit mirror pairs (e, kk - 1 - e), while
// memory is read and written in point order (8x8 transposes want 8 consecutive points).
// (No heap fallback for larger kernels: std::unique_ptr's inline code compiled here for AVX2
// could be what the linker keeps for the other objects.)
class TileBuffer {
 public:
  Vec get(int e) const { return Vec::loadu(data_ + e * kLanes); }
  void set(int e, const Vec& v) { v.store(data_ + e * kLanes); }
  float* point(int e) { return data_ + e * kLanes; }

 private:
  alignas(32) float data_[kMaxPoints * kLanes];
};

// How a tile's point-vectors meet memory: full tiles of slice-major weights (lane stride kH*kW,
// point stride 1) go 8 points at a time through transposes, full tiles of lane-major weights
// (channels_last: lane stride 1) move a point-vector with one load or store, and the rest
// (remainder points, partial tiles) lane by lane.
struct Access {
  int lanes, kk, transposed_end;  // points [0, transposed_end) go through the 8x8 transposes
  bool direct;                    // one vector load / store per point
  cpu::TileStrides strides;

  Access(int lanes_, int kh, int kw, cpu::TileStrides s)
      : lanes(lanes_),
        kk(kh * kw),
        transposed_end(lanes_ == kLanes && s.lane == kk && s.point == 1 ? kk / kLanes * kLanes : 0),
        direct(lanes_ == kLanes && s.lane == 1),
        strides(s) {}
};

// buf = the tile at src (lanes past `lanes` get 0).
void load_tile(const float* src, const Access& a, TileBuffer& buf) {
  for (int e0 = 0; e0 < a.transposed_end; e0 += kLanes) {
    __m256 block[kLanes];
    for (int l = 0; l < kLanes; ++l) block[l] = _mm256_loadu_ps(src + l * a.kk + e0);
    transpose8x8(block);  // block[j]: point e0 + j of every lane
    for (int j = 0; j < kLanes; ++j) buf.set(e0 + j, block[j]);
  }
  for (int e = a.transposed_end; e < a.kk; ++e) {
    if (a.direct) {
      buf.set(e, Vec::loadu(src + e * a.strides.point));
      continue;
    }
    float* lane = buf.point(e);
    for (int l = 0; l < kLanes; ++l) lane[l] = l < a.lanes ? src[l * a.strides.lane + e * a.strides.point] : 0.f;
  }
}

// The tile at dst = buf (its first `lanes` lanes).
void store_tile(const TileBuffer& buf, const Access& a, float* dst) {
  for (int e0 = 0; e0 < a.transposed_end; e0 += kLanes) {
    __m256 block[kLanes];
    for (int j = 0; j < kLanes; ++j) block[j] = buf.get(e0 + j);
    transpose8x8(block);  // block[l]: points e0 ... e0 + 7 of lane l
    for (int l = 0; l < kLanes; ++l) _mm256_storeu_ps(dst + l * a.kk + e0, block[l]);
  }
  for (int e = a.transposed_end; e < a.kk; ++e) {
    if (a.direct) {
      buf.get(e).store(dst + e * a.strides.point);
      continue;
    }
    alignas(32) float lane[kLanes];
    buf.get(e).store(lane);
    for (int l = 0; l < a.lanes; ++l) dst[l * a.strides.lane + e * a.strides.point] = lane[l];
  }
}

// Tiles whose point-vectors are one store each (channels_last, and 1x1 kernels: 8 adjacent
// slices) skip the buffer. Measured (256->256, all analytic, 1 thread): 1x1 synthesize 0.255 ->
// 0.216 ms. The AKP gradient's walk reading g straight from such tiles measured slower (1x1
// synthesize_backward 0.41 -> 0.44 ms; all-Mean 3x3 channels_last 0.32 -> 0.42 ms), so
// akp_grad_avx2 keeps the buffer.
void synthesize_avx2(int code, const float* akp, int lanes, int kh, int kw, float* w, cpu::TileStrides strides) {
  const TileAkp tile = load_akp(akp, lanes);
  const Vec* p = tile.p;
  const Access out(lanes, kh, kw, strides);
  if (out.direct) {
    synthesize_points(code, p, kh, kw, 0, 1, [&](int e, const Vec& v) { v.store(w + e * strides.point); });
    return;
  }
  TileBuffer buf;
  synthesize_points(code, p, kh, kw, 0, 1, [&](int e, const Vec& v) { buf.set(e, v); });
  store_tile(buf, out, w);
}

void akp_grad_avx2(int code, const float* akp, const float* grad_w, cpu::TileStrides strides, int lanes, int kh,
                   int kw, float* grad_akp, float* w, cpu::TileStrides w_strides) {
  const TileAkp tile = load_akp(akp, lanes);
  const Vec* p = tile.p;
  Vec grad[kAkpSlots];
  TileBuffer buf;
  load_tile(grad_w, Access(lanes, kh, kw, strides), buf);
  const auto load_grad = [&](int e) { return buf.get(e); };
  if (w != nullptr) {
    // K replaces g in buf: the walk reads a pair's g before it stores the pair's K.
    akp_grad_and_synthesize_points(code, p, kh, kw, 0, 1, load_grad, [&](int e, const Vec& v) { buf.set(e, v); },
                                   grad);
    store_tile(buf, Access(lanes, kh, kw, w_strides), w);
  } else {
    akp_grad_points(code, p, kh, kw, 0, 1, load_grad, grad);
  }
  store_akp_grad(grad, lanes, grad_akp);
}

}  // namespace

extern const TileKernels kAvx2TileKernels{kLanes, kMaxPoints, &synthesize_avx2, &akp_grad_avx2};

}  // namespace cpu
}  // namespace acl_fused

#pragma GCC pop_options

#endif  // ACL_FUSED_HAVE_AVX2_TILES
