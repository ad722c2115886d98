#pragma once
// Dual numbers v + d·ε (ε² = 0) as a compute type of families.h: its formulas, run on AKPs whose
// tangents d are a direction, give each result's directional derivative along it in .d. Run
// through the pass that computes W and the AKP gradient Σ g · dK/dp for a fixed g, that is the
// tangent of W (J · direction) and of the AKP gradient (the second derivatives of K, contracted
// with g and the direction): what double backward wants (acl_fused::synthesize_backward_jvp). One
// more set of formulas to keep in step with the first-order ones is what this avoids.
//
// families.h calls math::exp / sincos / sqrt / relu / if_positive, whose generic overloads take
// any type with at::vec::Vectorized's members (exp, sin, cos, sqrt, blendv); comparisons compare
// values (a branch taken is taken for the tangent too: LoT's one-sided derivative at its kinks).
// A NaN or infinite value times a zero tangent makes a NaN tangent, where autograd may have no
// such term (the reference's a / (kH kW) keeps a finite derivative in a NaN amplitude): results
// are NaN wherever the reference's are, and at most in more places of a slice with a NaN AKP.
#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "families.h"
#include "ops.h"

namespace acl_fused {

template <typename T>
struct Dual {
  T v, d;

  C10_HOST_DEVICE Dual() : v(0), d(0) {}
  C10_HOST_DEVICE Dual(T value, T tangent) : v(value), d(tangent) {}
  // A constant (T(2), T(1e-3), a grid coordinate): no tangent.
  template <typename S, typename = std::enable_if_t<std::is_arithmetic_v<S>>>
  C10_HOST_DEVICE Dual(S value) : v(static_cast<T>(value)), d(0) {}

  C10_HOST_DEVICE Dual operator-() const { return {-v, -d}; }
  C10_HOST_DEVICE friend Dual operator+(const Dual& a, const Dual& b) { return {a.v + b.v, a.d + b.d}; }
  C10_HOST_DEVICE friend Dual operator-(const Dual& a, const Dual& b) { return {a.v - b.v, a.d - b.d}; }
  C10_HOST_DEVICE friend Dual operator*(const Dual& a, const Dual& b) {
    return {a.v * b.v, a.d * b.v + a.v * b.d};
  }
  C10_HOST_DEVICE friend Dual operator/(const Dual& a, const Dual& b) {
    const T q = a.v / b.v;
    return {q, (a.d - q * b.d) / b.v};
  }
  C10_HOST_DEVICE Dual& operator+=(const Dual& b) { return *this = *this + b; }
  C10_HOST_DEVICE Dual& operator*=(const Dual& b) { return *this = *this * b; }
  C10_HOST_DEVICE Dual& operator/=(const Dual& b) { return *this = *this / b; }
  C10_HOST_DEVICE friend bool operator<=(const Dual& a, const Dual& b) { return a.v <= b.v; }
  C10_HOST_DEVICE friend bool operator>=(const Dual& a, const Dual& b) { return a.v >= b.v; }
  C10_HOST_DEVICE friend bool operator>(const Dual& a, const Dual& b) { return a.v > b.v; }
  C10_HOST_DEVICE friend bool operator==(const Dual& a, const Dual& b) { return a.v == b.v; }

  C10_HOST_DEVICE Dual exp() const {
    const T e = math::exp(v);
    return {e, e * d};
  }
  C10_HOST_DEVICE Dual sin() const {
    T s, c;
    math::sincos(v, s, c);
    return {s, c * d};
  }
  C10_HOST_DEVICE Dual cos() const {
    T s, c;
    math::sincos(v, s, c);
    return {c, -s * d};
  }
  // A constant keeps no tangent, also at 0 (LoT's r at the centre), where d / (2 sqrt v) is 0 / 0.
  C10_HOST_DEVICE Dual sqrt() const {
    const T r = math::sqrt(v);
    return {r, d == T(0) ? T(0) : d / (T(2) * r)};
  }
  // a where !take_b, else b (at::vec::Vectorized's blendv, for one value).
  C10_HOST_DEVICE static Dual blendv(const Dual& a, const Dual& b, bool take_b) { return take_b ? b : a; }
};

// One slice (o, c) of acl_fused::synthesize_backward_jvp, computed in T from contiguous tensors of
// scalar_t: W's tangent at the slice's kH * kW points and, for an analytic slice, its AKP
// gradient's tangent. A tangent pointer is null where there is no tangent (double backward: the
// loss does not use that gradient), an output's where it is not wanted. No AKP tangent makes an
// analytic slice's tangents 0 without its formulas: a NaN or infinite value there must not turn
// them NaN (0 · NaN), as it would a plain weight's penalty that does not depend on the AKPs.
template <typename T, typename scalar_t>
C10_HOST_DEVICE void synthesize_backward_jvp_slice(const SynthesisShape& s, int64_t slice, const int* family,
                                                   const int* row, const scalar_t* grad_w, const scalar_t* akp,
                                                   const scalar_t* akp_tangent, const scalar_t* weight_tangent,
                                                   scalar_t* w_tangent, scalar_t* grad_akp_tangent) {
  const int64_t o = slice / s.cg, c = slice % s.cg, r = row[o];
  const int kh = static_cast<int>(s.kh), kw = static_cast<int>(s.kw), kk = kh * kw;
  scalar_t* w_t = w_tangent == nullptr ? nullptr : w_tangent + slice * kk;
  if (family[o] == kPlain) {
    const scalar_t* t = weight_tangent == nullptr ? nullptr : weight_tangent + (r * s.cg + c) * kk;
    if (w_t != nullptr) {
      for (int e = 0; e < kk; ++e) w_t[e] = t == nullptr ? scalar_t(0) : t[e];
    }
    return;
  }
  const int64_t slots = (r * s.cg + c) * kAkpSlots;
  if (akp_tangent == nullptr) {
    if (w_t != nullptr) {
      for (int e = 0; e < kk; ++e) w_t[e] = scalar_t(0);
    }
    if (grad_akp_tangent != nullptr) {
      for (int k = 0; k < kAkpSlots; ++k) grad_akp_tangent[slots + k] = scalar_t(0);
    }
    return;
  }
  Dual<T> p[kAkpSlots], grad[kAkpSlots];
  for (int k = 0; k < kAkpSlots; ++k) {
    p[k] = Dual<T>(static_cast<T>(akp[slots + k]), static_cast<T>(akp_tangent[slots + k]));
  }
  const scalar_t* g = grad_w + slice * kk;
  akp_grad_and_synthesize_points(
      family[o], p, kh, kw, 0, 1, [&](int e) { return Dual<T>(static_cast<T>(g[e]), T(0)); },
      [&](int e, const Dual<T>& value) {
        if (w_t != nullptr) w_t[e] = static_cast<scalar_t>(value.d);
      },
      grad);
  if (grad_akp_tangent != nullptr) {
    for (int k = 0; k < kAkpSlots; ++k) grad_akp_tangent[slots + k] = static_cast<scalar_t>(grad[k].d);
  }
}

}  // namespace acl_fused
