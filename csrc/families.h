#pragma once
// The family formulas of SPEC §2-§4 and their derivatives with respect to the raw AKPs, written
// once for the CPU (g++) and CUDA (nvcc) kernels.
//
// Everything works on one (o, c) slice. A family object is built from the slice's raw AKPs
// (the per-slice constants: pos(), cos θ, sin θ, reciprocals, computed once; for a 1x1 kernel
// stand-ins where they cannot matter, see StandIns) and then
//   value(x, y)              K at grid point (x, y);
//   add_grad(x, y, g, acc)   acc += g * (dK/dp without the per-slice factors), and returns K at
//                            (x, y) from the same exp / cos (callers that only want the gradient
//                            ignore it);
//   centre(), add_centre_grad(g, acc)
//                            the same at the centre (0, 0) of an odd-sized kernel (below);
//   finish(acc)              multiplies the per-slice factors in (d pos / ds, a, 1/σ^n, ...),
// so acc[k] ends as Σ g · dK/dp_k over the points visited. finish() is linear: a kernel may split
// a slice's points over several threads, finish each partial sum, and add the partials.
//
// The grid is symmetric under p = (x, y) -> -p (SPEC §2), and so is every family up to a sign:
// even (K(-p) = K(p): LoG, LoT, TGD2, Mean) or odd (TGD1), which kParity declares; Gabor is
// neither (its phase ψ) and instead gives both points from one exp and one sincos (values /
// add_grads, kParity = kPaired). The walks below visit mirror pairs (p, -p): half the exp / cos
// of visiting every point. Measured on the CPU (AVX2 tiles, 256->256 3x3, float32, 2 threads):
// default layout synthesize 0.32 -> 0.24-0.27 ms, synthesize_backward 0.44 -> 0.32-0.37 ms; all
// Gabor synthesize 0.81 -> 0.65 ms, all TGD1 0.82 -> 0.53 ms.
// An odd-sized kernel's centre x = y = 0 is its own mirror, and there every exp and sincos takes
// 0 (or NaN, where a NaN or infinite AKP makes the formula NaN) except TGD1's, whose two lobes are
// equal there instead (one exp). centre() / add_centre_grad() are value() / add_grad() at (0, 0)
// with the transcendentals of AtCentre (1 - u for exp(-u), v and 1 - v for sin v and cos v): the
// same values bit for bit, exp and sincos being exact at 0, without the calls. That is the whole
// kernel of a 1x1 layer. Measured (AVX2 tiles, 256->256, float32 synthesize, 1 thread, ns a slice):
// 3x3 Gabor 17.3 -> 15.6, LoG 8.7 -> 8.0, TGD2 12.3 -> 10.9; 1x1 Gabor 7.5 -> 6.0, LoG 3.9 -> 2.9,
// TGD2 5.7 -> 3.9; all-analytic 1x1 synthesize_backward (2 threads) 0.28-0.36 -> 0.23-0.24 ms.
// T is the compute type: float (float32 and, for half / bfloat16 parameters, their float32
// synthesis), double, a SIMD vector of floats holding one slice per lane (the CPU kernels'
// at::vec::Vectorized<float>: every slice of an output channel has the channel's family, so
// neighbouring slices run the same code on their own AKPs), or a dual number of float or double
// (dual.h: second derivatives, for double backward). The formulas use only arithmetic and the
// math:: functions below, so the same text serves all of them.
#include <c10/macros/Macros.h>

#include <cmath>

namespace acl_fused {

// Family codes of SPEC §4 (also in acl_fused/families.py).
enum FamilyCode : int { kPlain = 0, kGabor = 1, kLog = 2, kLot = 3, kTgd1 = 4, kTgd2 = 5, kMean = 6 };
constexpr int kNumFamilies = 7;
// Width of the packed AKP tensor's last axis (SPEC §5).
constexpr int kAkpSlots = 6;

namespace math {
// Explicit float / double overloads: the same calls resolve to the CUDA device functions under
// nvcc and to libm on the host, and float never silently widens to double.
C10_HOST_DEVICE inline float exp(float v) { return ::expf(v); }
C10_HOST_DEVICE inline double exp(double v) { return ::exp(v); }
C10_HOST_DEVICE inline void sincos(float v, float& s, float& c) {
  s = ::sinf(v);
  c = ::cosf(v);
}
C10_HOST_DEVICE inline void sincos(double v, double& s, double& c) {
  s = ::sin(v);
  c = ::cos(v);
}
C10_HOST_DEVICE inline float sqrt(float v) { return ::sqrtf(v); }
C10_HOST_DEVICE inline double sqrt(double v) { return ::sqrt(v); }
// v where u > 0, else 0 (also when u is NaN: the mask of torch.relu's derivative); v is selected,
// never multiplied by a mask, so an unselected inf or NaN cannot leak into the result.
C10_HOST_DEVICE inline float if_positive(float u, float v) { return u > 0.f ? v : 0.f; }
C10_HOST_DEVICE inline double if_positive(double u, double v) { return u > 0.0 ? v : 0.0; }
// max(0, u) as torch.relu (the reference) has it: NaN stays NaN.
C10_HOST_DEVICE inline float relu(float u) { return u <= 0.f ? 0.f : u; }
C10_HOST_DEVICE inline double relu(double u) { return u <= 0.0 ? 0.0 : u; }

// Any other compute type with at::vec::Vectorized's interface: SIMD vectors (host only) and dual
// numbers (dual.h). Overload resolution prefers the exact float / double functions above for scalars.
template <typename V>
C10_HOST_DEVICE inline V exp(const V& v) { return v.exp(); }
template <typename V>
C10_HOST_DEVICE inline void sincos(const V& v, V& s, V& c) {
  s = v.sin();
  c = v.cos();
}
template <typename V>
C10_HOST_DEVICE inline V sqrt(const V& v) { return v.sqrt(); }
template <typename V>
C10_HOST_DEVICE inline V if_positive(const V& u, const V& v) { return V::blendv(V(0), v, u > V(0)); }
template <typename V>
C10_HOST_DEVICE inline V relu(const V& u) { return V::blendv(u, V(0), u <= V(0)); }

// Whether a comparison holds: for a scalar, its bool; for a SIMD mask (all bits set where it holds,
// +0 where not), in every lane.
C10_HOST_DEVICE inline bool all(bool holds) { return holds; }
template <typename V>
inline bool all(const V& mask) { return mask.zero_mask() == 0; }
}  // namespace math

// The transcendentals a family takes at a grid point: exp(-u), and sin and cos of v. AtCentre
// gives them where every u and v is 0 (or NaN): 1 - u, v and 1 - v are then the same values
// without the calls (see the top of this file).
struct AtPoint {
  template <typename T>
  C10_HOST_DEVICE T exp_minus(T u) const { return math::exp(-u); }
  template <typename T>
  C10_HOST_DEVICE void sincos(T v, T& s, T& c) const { math::sincos(v, s, c); }
};
struct AtCentre {
  template <typename T>
  C10_HOST_DEVICE T exp_minus(T u) const { return T(1) - u; }
  template <typename T>
  C10_HOST_DEVICE void sincos(T v, T& s, T& c) const {
    s = v;
    c = T(1) - v;
  }
};

// How K(-p) relates to K(p) (see the top of this file).
enum class Parity { kEven, kOdd, kPaired };

// Positive quantity read from a raw value (SPEC §3): q = pos(s) = exp(s) + 1e-3.
// dq/ds = exp(s), kept as `grow` for the chain rule.
template <typename T>
struct Positive {
  T value, grow;
  C10_HOST_DEVICE explicit Positive(T raw) : grow(math::exp(raw)) { value = grow + T(1e-3); }
  C10_HOST_DEVICE Positive(T value_, T grow_) : value(value_), grow(grow_) {}
};

// Rotated coordinates of SPEC §2: x' = x cos θ + y sin θ, y' = -x sin θ + y cos θ.
template <typename T>
struct Rotation {
  T c, s;
  C10_HOST_DEVICE explicit Rotation(T theta) { math::sincos(theta, s, c); }
  C10_HOST_DEVICE Rotation(T c_, T s_) : c(c_), s(s_) {}
  C10_HOST_DEVICE T xr(T x, T y) const { return x * c + y * s; }
  C10_HOST_DEVICE T yr(T x, T y) const { return -x * s + y * c; }
};

// Where a family object's pos() and rotation constants come from: the slice's raw AKPs, or
// stand-ins (pos() = 1.001 growing at 1, θ = 0) for a walk that visits only the centre of a tame
// slice: its angles finite and its scales' raw values within [-10, 10]. Its own constants are then
// finite, and at the centre they multiply only exact zeros (x' = y' = q = t = r = 0, and the
// derivative terms made of them), as the stand-ins do: K and the AKP gradients come out as from the
// AKPs' constants (up to the sign of a zero) without their exp / sincos, except where a huge
// amplitude overflows a finish() factor (0 * inf): the stand-ins' factors keep the reference's 0.
// That is a 1x1 kernel's whole walk; larger kernels, and slices with a NaN or infinite angle or
// scale, take the constants from their AKPs (NaN where the reference has NaN). Measured (AVX2
// tiles, float32, synthesize / synthesize_backward): 256->256 1x1, 1 thread, Gabor 339 / 547 ->
// 192 / 376 us, all analytic 216 / 417 -> 137 / 258 us; 64->128 1x1 all analytic, 2 threads,
// 22-23 / 35-36 -> 16-17 / 26 us; 3x3 kernels unchanged.
struct FromAkp {
  template <typename T>
  C10_HOST_DEVICE Positive<T> positive(T raw) const { return Positive<T>(raw); }
  template <typename T>
  C10_HOST_DEVICE Rotation<T> rotation(T theta) const { return Rotation<T>(theta); }
};
struct StandIns {
  template <typename T>
  C10_HOST_DEVICE Positive<T> positive(T) const { return Positive<T>(T(1.001), T(1)); }
  template <typename T>
  C10_HOST_DEVICE Rotation<T> rotation(T) const { return Rotation<T>(T(1), T(0)); }
};

// A tame slice's scales and angles (StandIns).
template <typename T>
C10_HOST_DEVICE bool tame_scale(T raw) { return math::all(raw <= T(10)) && math::all(raw >= T(-10)); }
template <typename T>
C10_HOST_DEVICE bool tame_angle(T theta) { return math::all(theta - theta == T(0)); }

// GABOR: K = a exp(-(x'^2 + γ^2 y'^2) / (2σ^2)) cos(2π x'/λ + ψ); AKPs a, θ, s_σ, s_γ, s_λ, ψ.
// With E the envelope, C, S the cosine and sine of the phase, u = x'/σ, v = γ y'/σ, k = 2π/λ:
//   E = exp(-(u^2 + v^2) / 2)
//   dK/dθ = -a E (C (u y'/σ - u v γ) + S k y')     dK/dσ = a C E (u^2 + v^2)/σ
//   dK/dγ = -a C E v^2/γ                           dK/dλ = a E S k x'/λ      dK/dψ = -a E S
// In u and v, not x'^2, γ^2 and σ^2, which overflow for raw scales above ~44 (float32) where u and
// v do not (σ^2 and γ^2 y'^2 both inf made inf * 0 = NaN): finite raw AKPs, finite kernels and
// gradients (SPEC §3) while pos() is finite. Products with E take E first: where v is huge E is 0
// and (E v) v is 0, where E (v v) would be 0 * inf.
// At -p, x', y', u and v change sign and E does not; the phases ±k x' + ψ take their cosines and sines
// from one sincos(k x') and the per-slice cos ψ, sin ψ. Summing g(p) dK(p) + g(-p) dK(-p), the
// terms even in (x', y') collect g C (ec below), the odd ones g S with the sign of x' (es).
template <typename T>
struct Gabor {
  static constexpr Parity kParity = Parity::kPaired;
  T a, cos_psi, sin_psi, inv_s, k;
  Rotation<T> rot;
  Positive<T> sigma, gamma, lambda;

  template <typename Source = FromAkp>
  C10_HOST_DEVICE explicit Gabor(const T* p, Source src = {})
      : a(p[0]),
        rot(src.rotation(p[1])),
        sigma(src.positive(p[2])),
        gamma(src.positive(p[3])),
        lambda(src.positive(p[4])) {
    math::sincos(p[5], sin_psi, cos_psi);
    inv_s = T(1) / sigma.value;
    k = T(6.283185307179586) / lambda.value;
  }
  C10_HOST_DEVICE static bool tame(const T* p) {
    return tame_angle(p[1]) && tame_scale(p[2]) && tame_scale(p[3]) && tame_scale(p[4]);
  }
  // (K(p), K(-p)) at p = (x, y).
  C10_HOST_DEVICE void values(T x, T y, T& plus, T& minus) const { values_from(at(x, y, AtPoint()), plus, minus); }
  // acc += g_plus dK(p) + g_minus dK(-p) (without the per-slice factors); (K(p), K(-p)).
  C10_HOST_DEVICE void add_grads(T x, T y, T g_plus, T g_minus, T* acc, T& plus, T& minus) const {
    add_grads_from(at(x, y, AtPoint()), g_plus, g_minus, acc, plus, minus);
  }
  // K at the centre, and add_grads there (g_minus = 0).
  C10_HOST_DEVICE T centre() const {
    T plus, minus;
    values_from(at(T(0), T(0), AtCentre()), plus, minus);
    return plus;
  }
  C10_HOST_DEVICE T add_centre_grad(T g, T* acc) const {
    T plus, minus;
    add_grads_from(at(T(0), T(0), AtCentre()), g, T(0), acc, plus, minus);
    return plus;
  }
  C10_HOST_DEVICE void finish(T* acc) const {
    acc[1] *= -a;
    acc[2] *= a * (sigma.grow * inv_s);
    acc[3] *= -a * (gamma.grow / gamma.value);
    acc[4] *= a * k * (lambda.grow / lambda.value);
    acc[5] *= -a;
  }

 private:
  // x', y', u, v, the envelope E and (s, c) = sincos(k x') at grid point (x, y).
  struct Point {
    T xr, yr, u, v, envelope, s, c;
  };
  template <typename At>
  C10_HOST_DEVICE Point at(T x, T y, At at_) const {
    const T xr = rot.xr(x, y), yr = rot.yr(x, y), u = xr * inv_s, v = gamma.value * yr * inv_s;
    Point pt{xr, yr, u, v, at_.exp_minus(T(0.5) * (u * u + v * v)), T(0), T(0)};
    at_.sincos(k * xr, pt.s, pt.c);
    return pt;
  }
  C10_HOST_DEVICE void values_from(const Point& pt, T& plus, T& minus) const {
    const T ae = a * pt.envelope;
    const T even = pt.c * cos_psi, odd = pt.s * sin_psi;  // cos(±k x' + ψ) = even ∓ odd
    plus = ae * (even - odd);
    minus = ae * (even + odd);
  }
  C10_HOST_DEVICE void add_grads_from(const Point& pt, T g_plus, T g_minus, T* acc, T& plus, T& minus) const {
    const T xr = pt.xr, yr = pt.yr, u = pt.u, v = pt.v, envelope = pt.envelope, s = pt.s, c = pt.c;
    const T cos_plus = c * cos_psi - s * sin_psi, cos_minus = c * cos_psi + s * sin_psi;
    const T sin_plus = s * cos_psi + c * sin_psi, sin_minus = c * sin_psi - s * cos_psi;
    const T ec = envelope * (g_plus * cos_plus + g_minus * cos_minus);
    const T es = envelope * (g_plus * sin_plus - g_minus * sin_minus);
    const T ec_u = ec * u, ec_v = ec * v;
    acc[0] += ec;
    acc[1] += ec_u * (yr * inv_s) - ec_v * u * gamma.value + yr * es * k;
    acc[2] += ec_u * u + ec_v * v;
    acc[3] += ec_v * v;
    acc[4] += es * xr;
    acc[5] += envelope * (g_plus * sin_plus + g_minus * sin_minus);
    plus = a * envelope * cos_plus;
    minus = a * envelope * cos_minus;
  }
};

// LOG: K = a (1 - t) exp(-t), t = r^2 / (2σ^2); AKPs a, s_σ.  dK/dσ = 2a t (2 - t) exp(-t) / σ.
template <typename T>
struct LoG {
  static constexpr Parity kParity = Parity::kEven;
  T a, inv_2s2;
  Positive<T> sigma;

  template <typename Source = FromAkp>
  C10_HOST_DEVICE explicit LoG(const T* p, Source src = {}) : a(p[0]), sigma(src.positive(p[1])) {
    inv_2s2 = T(1) / (T(2) * sigma.value * sigma.value);
  }
  C10_HOST_DEVICE static bool tame(const T* p) { return tame_scale(p[1]); }
  C10_HOST_DEVICE T value(T x, T y) const { return value_from(at(x, y, AtPoint())); }
  C10_HOST_DEVICE T add_grad(T x, T y, T g, T* acc) const { return add_grad_from(at(x, y, AtPoint()), g, acc); }
  C10_HOST_DEVICE T centre() const { return value_from(at(T(0), T(0), AtCentre())); }
  C10_HOST_DEVICE T add_centre_grad(T g, T* acc) const { return add_grad_from(at(T(0), T(0), AtCentre()), g, acc); }
  C10_HOST_DEVICE void finish(T* acc) const { acc[1] *= T(2) * a / sigma.value * sigma.grow; }

 private:
  // t and exp(-t) at grid point (x, y).
  struct Point {
    T t, e;
  };
  template <typename At>
  C10_HOST_DEVICE Point at(T x, T y, At at_) const {
    const T t = (x * x + y * y) * inv_2s2;
    return {t, at_.exp_minus(t)};
  }
  C10_HOST_DEVICE T value_from(const Point& pt) const { return a * (T(1) - pt.t) * pt.e; }
  C10_HOST_DEVICE T add_grad_from(const Point& pt, T g, T* acc) const {
    const T ge = g * pt.e;
    acc[0] += ge * (T(1) - pt.t);
    acc[1] += ge * pt.t * (T(2) - pt.t);
    return value_from(pt);
  }
};

// LOT: K = a (max(0, 1 - r/ρ) - ¼ max(0, 1 - r/(2ρ))); AKPs a, s_ρ.
// dK/dρ = a r/ρ^2 ([1 - r/ρ > 0] - ⅛ [1 - r/(2ρ) > 0]): the active branch, zero at the tie (SPEC §4).
template <typename T>
struct LoT {
  static constexpr Parity kParity = Parity::kEven;
  T a, two_rho;
  Positive<T> rho;

  template <typename Source = FromAkp>
  C10_HOST_DEVICE explicit LoT(const T* p, Source src = {}) : a(p[0]), rho(src.positive(p[1])) {
    two_rho = T(2) * rho.value;
  }
  C10_HOST_DEVICE static bool tame(const T* p) { return tame_scale(p[1]); }
  C10_HOST_DEVICE T value(T x, T y) const { return value_from(math::sqrt(x * x + y * y)); }
  C10_HOST_DEVICE T add_grad(T x, T y, T g, T* acc) const { return add_grad_from(math::sqrt(x * x + y * y), g, acc); }
  C10_HOST_DEVICE T centre() const { return value_from(T(0)); }
  C10_HOST_DEVICE T add_centre_grad(T g, T* acc) const { return add_grad_from(T(0), g, acc); }
  C10_HOST_DEVICE void finish(T* acc) const { acc[1] *= a / (rho.value * rho.value) * rho.grow; }

 private:
  // From r.
  C10_HOST_DEVICE T value_from(T r) const {
    return a * (math::relu(T(1) - r / rho.value) - T(0.25) * math::relu(T(1) - r / two_rho));
  }
  C10_HOST_DEVICE T add_grad_from(T r, T g, T* acc) const {
    const T inner = T(1) - r / rho.value, outer = T(1) - r / two_rho;
    const T tents = math::relu(inner) - T(0.25) * math::relu(outer);
    acc[0] += g * tents;
    acc[1] += g * r * (math::if_positive(inner, T(1)) - math::if_positive(outer, T(0.125)));
    return a * tents;
  }
};

// TGD1: K = a (G(x' - σ) - G(x' + σ)) G(y'), G(u) = exp(-u^2 / (2σ^2)); AKPs a, θ, s_σ.
// With u = x'/σ, w = y'/σ, P = G(x' - σ) G(y') = exp(-((u - 1)^2 + w^2) / 2), M likewise with
// u + 1 (one exp each), D = P - M:
//   dK/dθ = a w (P + M)
//   dK/dσ = a (u (P (u - 1) - M (u + 1)) + D w^2) / σ
// (in u and w: (x' - σ)^2 / (2σ^2) was inf / inf = NaN for raw scales above ~44 in float32).
template <typename T>
struct Tgd1 {
  static constexpr Parity kParity = Parity::kOdd;
  T a, inv_s;
  Rotation<T> rot;
  Positive<T> sigma;

  template <typename Source = FromAkp>
  C10_HOST_DEVICE explicit Tgd1(const T* p, Source src = {})
      : a(p[0]), rot(src.rotation(p[1])), sigma(src.positive(p[2])) {
    inv_s = T(1) / sigma.value;
  }
  C10_HOST_DEVICE static bool tame(const T* p) { return tame_angle(p[1]) && tame_scale(p[2]); }
  C10_HOST_DEVICE T value(T x, T y) const { return value_from(lobes(x, y)); }
  C10_HOST_DEVICE T add_grad(T x, T y, T g, T* acc) const { return add_grad_from(lobes(x, y), g, acc); }
  C10_HOST_DEVICE T centre() const { return value_from(centre_lobes()); }
  C10_HOST_DEVICE T add_centre_grad(T g, T* acc) const { return add_grad_from(centre_lobes(), g, acc); }
  C10_HOST_DEVICE void finish(T* acc) const {
    acc[1] *= a;
    acc[2] *= a * (sigma.grow * inv_s);
  }

 private:
  // u, w, P and M at grid point (x, y).
  struct Lobes {
    T u, w, plus, minus;
  };
  C10_HOST_DEVICE Lobes lobes(T x, T y) const {
    const T u = rot.xr(x, y) * inv_s, w = rot.yr(x, y) * inv_s, across = w * w;
    return {u, w, math::exp(T(-0.5) * ((u - T(1)) * (u - T(1)) + across)),
            math::exp(T(-0.5) * ((u + T(1)) * (u + T(1)) + across))};
  }
  // The lobes' exponents are not 0 at the centre, but equal there ((0 - 1)^2 = (0 + 1)^2): one exp.
  C10_HOST_DEVICE Lobes centre_lobes() const {
    const T u = rot.xr(T(0), T(0)) * inv_s, w = rot.yr(T(0), T(0)) * inv_s;
    const T both = math::exp(T(-0.5) * ((u - T(1)) * (u - T(1)) + w * w));
    return {u, w, both, both};
  }
  C10_HOST_DEVICE T value_from(const Lobes& l) const { return a * (l.plus - l.minus); }
  C10_HOST_DEVICE T add_grad_from(const Lobes& l, T g, T* acc) const {
    const T u = l.u, w = l.w;
    const T gp = g * l.plus, gm = g * l.minus, d = gp - gm;
    acc[0] += d;
    acc[1] += w * (gp + gm);
    acc[2] += u * (gp * (u - T(1)) - gm * (u + T(1))) + d * w * w;
    return value_from(l);
  }
};

// TGD2: K = a (G_σ(x') - ½ G_2σ(x')) G_σ(y'); AKPs a, θ, s_σ.
// With N = G_σ(x') G_σ(y'), W = G_2σ(x') G_σ(y') (one exp each), D = N - W/2:
//   dK/dθ = -⅜ a x' y' W / σ^2
//   dK/dσ = a (x'^2 (N - W/8) + D y'^2) / σ^3
template <typename T>
struct Tgd2 {
  static constexpr Parity kParity = Parity::kEven;
  T a, inv_2s2;
  Rotation<T> rot;
  Positive<T> sigma;

  template <typename Source = FromAkp>
  C10_HOST_DEVICE explicit Tgd2(const T* p, Source src = {})
      : a(p[0]), rot(src.rotation(p[1])), sigma(src.positive(p[2])) {
    inv_2s2 = T(1) / (T(2) * sigma.value * sigma.value);
  }
  C10_HOST_DEVICE static bool tame(const T* p) { return tame_angle(p[1]) && tame_scale(p[2]); }
  C10_HOST_DEVICE T value(T x, T y) const { return value_from(lobes(x, y, AtPoint())); }
  C10_HOST_DEVICE T add_grad(T x, T y, T g, T* acc) const { return add_grad_from(lobes(x, y, AtPoint()), g, acc); }
  C10_HOST_DEVICE T centre() const { return value_from(lobes(T(0), T(0), AtCentre())); }
  C10_HOST_DEVICE T add_centre_grad(T g, T* acc) const {
    return add_grad_from(lobes(T(0), T(0), AtCentre()), g, acc);
  }
  C10_HOST_DEVICE void finish(T* acc) const {
    const T s = sigma.value;
    acc[1] *= T(-0.375) * a / (s * s);
    acc[2] *= a / (s * s * s) * sigma.grow;
  }

 private:
  // x', y', N and W at grid point (x, y).
  struct Lobes {
    T xr, yr, narrow, wide;
  };
  template <typename At>
  C10_HOST_DEVICE Lobes lobes(T x, T y, At at_) const {
    const T xr = rot.xr(x, y), yr = rot.yr(x, y), along = xr * xr, across = yr * yr;
    return {xr, yr, at_.exp_minus((along + across) * inv_2s2), at_.exp_minus((T(0.25) * along + across) * inv_2s2)};
  }
  C10_HOST_DEVICE T value_from(const Lobes& l) const { return a * (l.narrow - T(0.5) * l.wide); }
  C10_HOST_DEVICE T add_grad_from(const Lobes& l, T g, T* acc) const {
    const T xr = l.xr, yr = l.yr;
    const T gn = g * l.narrow, gw = g * l.wide, d = gn - T(0.5) * gw;
    acc[0] += d;
    acc[1] += xr * yr * gw;
    acc[2] += xr * xr * (gn - T(0.125) * gw) + d * yr * yr;
    return value_from(l);
  }
};

// MEAN: K = a / (kH kW); AKP a.
template <typename T>
struct Mean {
  static constexpr Parity kParity = Parity::kEven;
  T area, level;
  C10_HOST_DEVICE Mean(const T* p, T area_) : area(area_), level(p[0] / area_) {}
  C10_HOST_DEVICE T value(T, T) const { return level; }
  C10_HOST_DEVICE T add_grad(T, T, T g, T* acc) const {
    acc[0] += g;
    return level;
  }
  C10_HOST_DEVICE T centre() const { return level; }
  C10_HOST_DEVICE T add_centre_grad(T g, T* acc) const { return add_grad(T(0), T(0), g, acc); }
  C10_HOST_DEVICE void finish(T* acc) const { acc[0] /= area; }
};

// Calls visit(family object) for an analytic family code; does nothing for any other code
// (callers check codes: TORCH_CHECK on the host, CUDA_KERNEL_ASSERT on the device).
template <typename T, typename Visitor>
C10_HOST_DEVICE void visit_family(int code, const T* p, int kh, int kw, Visitor&& visit) {
  switch (code) {
    case kGabor: visit(Gabor<T>(p)); break;
    case kLog: visit(LoG<T>(p)); break;
    case kLot: visit(LoT<T>(p)); break;
    case kTgd1: visit(Tgd1<T>(p)); break;
    case kTgd2: visit(Tgd2<T>(p)); break;
    case kMean: visit(Mean<T>(p, T(kh * kw))); break;
    default: break;
  }
}

// Whether a slice of family `code` is tame (StandIns).
template <typename T>
C10_HOST_DEVICE bool tame(int code, const T* p) {
  switch (code) {
    case kGabor: return Gabor<T>::tame(p);
    case kLog: return LoG<T>::tame(p);
    case kLot: return LoT<T>::tame(p);
    case kTgd1: return Tgd1<T>::tame(p);
    case kTgd2: return Tgd2<T>::tame(p);
    default: return true;
  }
}

// visit_family with stand-in constants, for the walk of a 1x1 kernel (its centre alone) over a
// tame slice. (A visit of its own: choosing the constants inside visit_family changed how GCC
// compiled the walks of larger kernels, 1 thread: with a ternary, 3x3 LoT synthesize 355 -> 440
// us; with a Source argument, 3x3 all analytic 600 -> 623-644 us.)
template <typename T, typename Visitor>
C10_HOST_DEVICE void visit_stand_in_family(int code, const T* p, Visitor&& visit) {
  switch (code) {
    case kGabor: visit(Gabor<T>(p, StandIns())); break;
    case kLog: visit(LoG<T>(p, StandIns())); break;
    case kLot: visit(LoT<T>(p, StandIns())); break;
    case kTgd1: visit(Tgd1<T>(p, StandIns())); break;
    case kTgd2: visit(Tgd2<T>(p, StandIns())); break;
    case kMean: visit(Mean<T>(p, T(1))); break;
    default: break;
  }
}

// (K(p), K(-p)) at p = (x, y), for any family.
template <typename Family, typename T>
C10_HOST_DEVICE void pair_values(const Family& f, T x, T y, T& plus, T& minus) {
  if constexpr (Family::kParity == Parity::kPaired) {
    f.values(x, y, plus, minus);
  } else {
    plus = f.value(x, y);
    minus = Family::kParity == Parity::kEven ? plus : -plus;
  }
}

// acc += g_plus dK(p) + g_minus dK(-p) (without the per-slice factors) and (K(p), K(-p)), for any
// family: an even family's derivatives are even too, an odd one's odd.
template <typename Family, typename T>
C10_HOST_DEVICE void pair_add_grads(const Family& f, T x, T y, T g_plus, T g_minus, T* acc, T& plus, T& minus) {
  if constexpr (Family::kParity == Parity::kPaired) {
    f.add_grads(x, y, g_plus, g_minus, acc, plus, minus);
  } else if constexpr (Family::kParity == Parity::kEven) {
    plus = minus = f.add_grad(x, y, g_plus + g_minus, acc);
  } else {
    plus = f.add_grad(x, y, g_plus - g_minus, acc);
    minus = -plus;
  }
}

// Calls fn(e, mirror, x, y) for the mirror pairs of a kernel's elements: e = first, first + step,
// ... < (kh * kw + 1) / 2 and mirror = kh * kw - 1 - e, with (x, y) the grid point of e = i * kw + j
// (SPEC §2: x along the width, y along the height) and (-x, -y) that of mirror. An odd-sized
// kernel's centre is its own mirror (e == mirror, x = y = 0). (i, j) advance by additions: no integer
// division per pair.
template <typename T, typename Fn>
C10_HOST_DEVICE void for_each_pair(int kh, int kw, int first, int step, Fn&& fn) {
  const T cx = T(kw - 1) / T(2), cy = T(kh - 1) / T(2);
  const int kk = kh * kw, di = step / kw, dj = step % kw;
  int i = first / kw, j = first % kw;
  for (int e = first; e < (kk + 1) / 2; e += step) {
    fn(e, kk - 1 - e, T(j) - cx, T(i) - cy);
    i += di;
    j += dj;
    if (j >= kw) {
      j -= kw;
      ++i;
    }
  }
}

// store(e, K_code(p) at element e) for every element of the mirror pairs e = first, first + step,
// ... (see for_each_pair) of one analytic slice (or of one lane-per-slice vector of slices).
template <typename T, typename Store>
C10_HOST_DEVICE void synthesize_points(int code, const T* p, int kh, int kw, int first, int step, Store&& store) {
  if (kh * kw == 1 && first == 0 && tame(code, p)) {
    visit_stand_in_family(code, p, [&](const auto& family) { store(0, family.centre()); });
    return;
  }
  visit_family(code, p, kh, kw, [&](const auto& family) {
    for_each_pair<T>(kh, kw, first, step, [&](int e, int mirror, T x, T y) {
      if (e == mirror) {
        store(e, family.centre());
        return;
      }
      T plus, minus;
      pair_values(family, x, y, plus, minus);
      store(e, plus);
      store(mirror, minus);
    });
  });
}

// grad[k] = Σ g(e) · dK_code(p)[e] / dp_k over the elements of the mirror pairs e = first,
// first + step, ... (see for_each_pair), for all kAkpSlots slots (unused slots get 0); g(e) gives
// the weight gradient at element e. store(e, K_code(p) at element e) at the same elements: the
// kernel and its AKP gradient in one walk, every exp / cos computed once (store may do nothing).
// A pair's g is read before its K is stored, so store may overwrite what g reads.
template <typename T, typename LoadGrad, typename Store>
C10_HOST_DEVICE void akp_grad_and_synthesize_points(int code, const T* p, int kh, int kw, int first, int step,
                                                    LoadGrad&& g, Store&& store, T* grad) {
  for (int k = 0; k < kAkpSlots; ++k) grad[k] = T(0);
  if (kh * kw == 1 && first == 0 && tame(code, p)) {
    visit_stand_in_family(code, p, [&](const auto& family) {
      store(0, family.add_centre_grad(g(0), grad));
      family.finish(grad);
    });
    return;
  }
  visit_family(code, p, kh, kw, [&](const auto& family) {
    for_each_pair<T>(kh, kw, first, step, [&](int e, int mirror, T x, T y) {
      if (e == mirror) {
        store(e, family.add_centre_grad(g(e), grad));
        return;
      }
      T plus, minus;
      pair_add_grads(family, x, y, g(e), g(mirror), grad, plus, minus);
      store(e, plus);
      store(mirror, minus);
    });
    family.finish(grad);
  });
}

// akp_grad_and_synthesize_points without the kernel.
template <typename T, typename LoadGrad>
C10_HOST_DEVICE void akp_grad_points(int code, const T* p, int kh, int kw, int first, int step, LoadGrad&& g,
                                     T* grad) {
  akp_grad_and_synthesize_points(code, p, kh, kw, first, step, g, [](int, const T&) {}, grad);
}

// w[e] = K_code(p) at the elements of the mirror pairs e = first, first + step, ... (see
// for_each_pair) of one analytic slice.
template <typename T, typename scalar_t>
C10_HOST_DEVICE void synthesize_slice(int code, const T* p, int kh, int kw, int first, int step,
                                      scalar_t* w) {
  synthesize_points(code, p, kh, kw, first, step, [&](int e, T v) { w[e] = static_cast<scalar_t>(v); });
}

// grad[k] = Σ g[e] · dK_code(p)[e] / dp_k over the elements of the mirror pairs e = first,
// first + step, ... (see for_each_pair) of one analytic slice, for all kAkpSlots slots (unused
// slots get 0).
template <typename T, typename scalar_t>
C10_HOST_DEVICE void akp_grad_slice(int code, const T* p, int kh, int kw, int first, int step,
                                    const scalar_t* g, T* grad) {
  akp_grad_points(code, p, kh, kw, first, step, [&](int e) { return static_cast<T>(g[e]); }, grad);
}

}  // namespace acl_fused
