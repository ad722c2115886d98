"""SPEC §2-§4 for Triton: the family formulas and their derivatives w.r.t. the raw AKPs.

The one place (for Triton kernels) that knows the closed forms. Every helper is elementwise, so a
weight tile may mix all families in any order: each output is selected with ``tl.where`` by family
code, never multiplied by a mask, so a NaN/inf computed in a branch another family does not use
(e.g. exp of a huge raw value read as sigma) cannot leak into the value or a gradient.

Helpers (all ``@triton.jit``):

* ``grid_xy(i, j, KH, KW, dtype)`` -> (x, y): SPEC §2 grid, ``x = j - (KW-1)/2``,
  ``y = i - (KH-1)/2``, exact in ``dtype`` (computed as ``(2j - (KW-1)) * 0.5``).
* ``akp_count(code)``: number of AKP slots the family reads (SPEC §4 table; 0 for PLAIN).
* ``store_akp_grads(out, code, mask, g0..g5)``: stores a slice's six AKP-gradient sums at
  ``out + 0..5``, exact zeros in the slots the family does not read.
* ``family_value(code, a, p1..p5, x, y, inv_area)`` -> K.
* ``family_value_and_grads(code, a, p1..p5, x, y, inv_area)`` -> (K, dK/da, dK/dp1 .. dK/dp5),
  exact zeros for slots the family does not read and for PLAIN (code 0 gives K = 0: callers
  load plain weights themselves).

``a, p1..p5`` are the raw AKP slots 0..5 of a slice; ``inv_area = 1/(kH*kW)`` as a tensor (0-d
is fine, e.g. ``1.0 / tl.full([], KH * KW, dtype)``); p1..p5, x, y, inv_area are cast to ``a``'s
dtype. Arguments broadcast to one shape; pass AKPs as [BLOCK, 1] and x, y as [1, KK] so the per-slice work
(the positive maps, cos/sin of theta) is done once per slice, not per element. Math runs in
``a``'s dtype (float32 or float64; callers pass float32 for half/bf16). Inexact constants are
built with ``tl.full`` in that dtype, so float64 never sees a float32-rounded 1e-3 or 2*pi.

The family codes are exported as constexprs (PLAIN, GABOR, LOG, LOT, TGD1, TGD2, MEAN).

Cost per element, shared across families: two exp (the Gaussian envelope(s): TGD1's two lobes
and TGD2's two widths are each folded with G(y') into one exp), one cos/sin pair (Gabor's carrier)
and one sqrt (LOT). Per slice: cos/sin(theta) and three exp for the positive maps.
"""
from __future__ import annotations

import triton
import triton.language as tl

# Family codes (acl_fused.families.Family), repeated as literals because @triton.jit code
# cannot read a Python enum; tests/test_triton_synthesis.py checks they agree.
PLAIN = tl.constexpr(0)
GABOR = tl.constexpr(1)
LOG = tl.constexpr(2)
LOT = tl.constexpr(3)
TGD1 = tl.constexpr(4)
TGD2 = tl.constexpr(5)
MEAN = tl.constexpr(6)

POS_EPS = tl.constexpr(1e-3)  # pos(s) = exp(s) + POS_EPS (SPEC §3)
TWO_PI = tl.constexpr(6.283185307179586)


@triton.jit
def grid_xy(i, j, KH, KW, dtype: tl.constexpr):
    """SPEC §2 sampling grid at kernel element (i, j): x along the width, y along the height."""
    x = (2 * j - (KW - 1)).to(dtype) * 0.5
    y = (2 * i - (KH - 1)).to(dtype) * 0.5
    return x, y


@triton.jit
def akp_count(code):
    """Raw AKP slots read by family ``code`` (acl_fused.families.AKP_COUNT; 0 for PLAIN)."""
    return tl.where(code == GABOR, 6,
                    tl.where((code == LOG) | (code == LOT), 2,
                             tl.where((code == TGD1) | (code == TGD2), 3,
                                      tl.where(code == MEAN, 1, 0))))


@triton.jit
def store_akp_grads(out, code, mask, g0, g1, g2, g3, g4, g5):
    """Stores the AKP-gradient sums g0..g5 of slots 0..5 at out + 0..5 where ``mask``, in out's
    dtype; the slots family ``code`` does not read get exactly 0, selected, not summed: their
    derivatives are 0, but 0 times an inf or NaN in dW (an inf in the input) is NaN."""
    used = akp_count(code)
    dtype = out.dtype.element_ty
    tl.store(out + 0, g0.to(dtype), mask=mask)
    tl.store(out + 1, tl.where(used > 1, g1, 0).to(dtype), mask=mask)
    tl.store(out + 2, tl.where(used > 2, g2, 0).to(dtype), mask=mask)
    tl.store(out + 3, tl.where(used > 3, g3, 0).to(dtype), mask=mask)
    tl.store(out + 4, tl.where(used > 4, g4, 0).to(dtype), mask=mask)
    tl.store(out + 5, tl.where(used > 5, g5, 0).to(dtype), mask=mask)


@triton.jit
def _as_dtype_of(a, p1, p2, p3, p4, p5, x, y, inv_area):
    """The other arguments in ``a``'s dtype: the math runs in it."""
    dtype = a.dtype
    return (p1.to(dtype), p2.to(dtype), p3.to(dtype), p4.to(dtype), p5.to(dtype), x.to(dtype), y.to(dtype),
            inv_area.to(dtype))


@triton.jit
def _terms(code, p1, p2, p3, p4, p5, x, y):
    """Intermediates shared by the value and the gradients. The sigma-like raw AKP is slot 1 for
    LOG (s_sigma) and LOT (s_rho), slot 2 for GABOR/TGD1/TGD2; theta is slot 1."""
    dtype = p1.dtype
    eps = tl.full([], POS_EPS, dtype)
    two_pi = tl.full([], TWO_PI, dtype)
    exp_sig = tl.exp(tl.where((code == LOG) | (code == LOT), p1, p2))
    sig = exp_sig + eps  # sigma, or rho for LOT
    exp_gam = tl.exp(p3)
    gam = exp_gam + eps
    exp_lam = tl.exp(p4)
    lam = exp_lam + eps
    cos_t = tl.cos(p1)
    sin_t = tl.sin(p1)
    xr = x * cos_t + y * sin_t
    yr = -x * sin_t + y * cos_t
    r2 = x * x + y * y
    two_s2 = 2 * sig * sig
    # Gabor's and TGD1's exponents in x'/σ, y'/σ and γy'/σ, which stay finite where x'^2, σ^2 and
    # γ^2 overflow (raw scales above ~44 in float32: inf / inf, inf * 0), as csrc/families.h
    xs = xr / sig
    ys = yr / sig
    gys = gam * yr / sig
    t_log = r2 / two_s2
    yr2 = yr * yr
    # exponents of the two Gaussian envelopes (one exp each, whatever the family)
    e1 = tl.where(code == GABOR, -0.5 * (xs * xs + gys * gys),
                  tl.where(code == LOG, -t_log,
                           tl.where(code == TGD1, -0.5 * ((xs - 1) * (xs - 1) + ys * ys), -r2 / two_s2)))
    e2 = tl.where(code == TGD1, -0.5 * ((xs + 1) * (xs + 1) + ys * ys), -(0.25 * (xr * xr) + yr2) / two_s2)
    env1 = tl.exp(e1)
    env2 = tl.exp(e2)
    phase = two_pi * xr / lam + p5
    # LOT: r only appears through r / rho, so r = 0 is regular
    r = tl.sqrt(r2)
    u_in = 1 - r / sig
    u_out = 1 - r / (2 * sig)
    return (exp_sig, sig, exp_gam, gam, exp_lam, lam, xr, yr, xs, ys, gys, r2, t_log,
            env1, env2, phase, r, u_in, u_out)


@triton.jit
def _relu(u):
    """max(0, u) as torch.relu (the reference) has it: NaN stays NaN (tl.maximum may drop it)."""
    return tl.where(u <= 0, 0.0, u)


@triton.jit
def _shape(code, env1, env2, cos_phase, t_log, u_in, u_out, inv_area):
    """K / a for every analytic family (0 for PLAIN)."""
    lot = _relu(u_in) - 0.25 * _relu(u_out)
    return tl.where(code == GABOR, env1 * cos_phase,
                    tl.where(code == LOG, (1 - t_log) * env1,
                             tl.where(code == LOT, lot,
                                      tl.where(code == TGD1, env1 - env2,
                                               tl.where(code == TGD2, env1 - 0.5 * env2,
                                                        tl.where(code == MEAN, inv_area, 0))))))


@triton.jit
def family_value(code, a, p1, p2, p3, p4, p5, x, y, inv_area):
    """K of family ``code`` at (x, y) for raw AKPs a, p1..p5 (0 for PLAIN); see the module doc."""
    p1, p2, p3, p4, p5, x, y, inv_area = _as_dtype_of(a, p1, p2, p3, p4, p5, x, y, inv_area)
    (exp_sig, sig, exp_gam, gam, exp_lam, lam, xr, yr, xs, ys, gys, r2, t_log,
     env1, env2, phase, r, u_in, u_out) = _terms(code, p1, p2, p3, p4, p5, x, y)
    return a * _shape(code, env1, env2, tl.cos(phase), t_log, u_in, u_out, inv_area)


@triton.jit
def family_value_and_grads(code, a, p1, p2, p3, p4, p5, x, y, inv_area):
    """(K, dK/da, dK/dp1, ..., dK/dp5) w.r.t. the raw AKPs; exact zeros for unused slots and PLAIN.

    LOT's kinks follow SPEC §4: a max(0, u) branch contributes only where u > 0 (zero derivative
    at the tie), exactly like torch.relu in the reference.
    """
    p1, p2, p3, p4, p5, x, y, inv_area = _as_dtype_of(a, p1, p2, p3, p4, p5, x, y, inv_area)
    two_pi = tl.full([], TWO_PI, a.dtype)
    (exp_sig, sig, exp_gam, gam, exp_lam, lam, xr, yr, xs, ys, gys, r2, t_log,
     env1, env2, phase, r, u_in, u_out) = _terms(code, p1, p2, p3, p4, p5, x, y)
    cos_phase = tl.cos(phase)
    sin_phase = tl.sin(phase)
    shape = _shape(code, env1, env2, cos_phase, t_log, u_in, u_out, inv_area)
    value = a * shape

    sig2 = sig * sig
    sig3 = sig2 * sig
    # d/dtheta uses d xr/dtheta = yr, d yr/dtheta = -xr; d/ds = d/dq * exp(s) for q = pos(s)
    # Gabor's products with the envelope take it first: (a E v) v is 0 where v is huge, a E (v v)
    # would be 0 * inf
    a_env = a * env1
    a_env_xs = a_env * xs
    a_env_gys = a_env * gys
    gabor_dtheta = (cos_phase * (a_env_gys * xs * gam - a_env_xs * ys)
                    - a_env * sin_phase * (two_pi * yr / lam))
    gabor_dsig = cos_phase * (a_env_xs * xs + a_env_gys * gys) * (exp_sig / sig)
    gabor_dgam = -cos_phase * (a_env_gys * gys) * (exp_gam / gam)
    gabor_dlam = a_env * sin_phase * (two_pi * xr / lam) * (exp_lam / lam)
    gabor_dpsi = -a_env * sin_phase
    log_dsig = a_env * (2 * t_log * (2 - t_log) / sig) * exp_sig
    lot_drho = a * (tl.where(u_in > 0, r / sig2, 0) - 0.25 * tl.where(u_out > 0, r / (2 * sig2), 0)) * exp_sig
    lobes_sum = a * (env1 + env2)
    tgd1_dtheta = lobes_sum * ys
    tgd1_dsig = a * (xs * (env1 * (xs - 1) - env2 * (xs + 1)) + (env1 - env2) * (ys * ys)) * (exp_sig / sig)
    tgd2_dtheta = -0.375 * a * env2 * (xr * yr) / sig2
    tgd2_dsig = a * (env1 * r2 - 0.5 * env2 * (0.25 * (xr * xr) + yr * yr)) / sig3 * exp_sig

    d_p1 = tl.where(code == GABOR, gabor_dtheta,
                    tl.where(code == LOG, log_dsig,
                             tl.where(code == LOT, lot_drho,
                                      tl.where(code == TGD1, tgd1_dtheta,
                                               tl.where(code == TGD2, tgd2_dtheta, 0)))))
    d_p2 = tl.where(code == GABOR, gabor_dsig,
                    tl.where(code == TGD1, tgd1_dsig,
                             tl.where(code == TGD2, tgd2_dsig, 0)))
    d_p3 = tl.where(code == GABOR, gabor_dgam, 0)
    d_p4 = tl.where(code == GABOR, gabor_dlam, 0)
    d_p5 = tl.where(code == GABOR, gabor_dpsi, 0)
    return value, shape, d_p1, d_p2, d_p3, d_p4, d_p5
