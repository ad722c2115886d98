"""The pure-PyTorch oracle (acl_fused.reference) against SPEC §2-§6.

Everything else is checked against this module, so it is itself checked against an independent,
per-element evaluation of the SPEC formulas written with Python's ``math`` (below), against values
derived by hand, against the formulas' analytic properties (symmetries, zero integrals), and
against ``torch.nn.functional.conv2d`` for the convolution arguments.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from acl_fused import AKP_COUNT, Family, reference
from acl_fused.families import ANALYTIC_FAMILIES, POS_EPS, pos
from acl_fused.layout import Layout
from conftest import rel_err

KERNELS = [(3, 3), (4, 4), (5, 5), (3, 5), (4, 3), (1, 1), (2, 7)]


# --------------------------------------------------------------------------------------------
# An independent evaluation of SPEC §2-§4, one element at a time, in Python floats.

def spec_pos(s: float) -> float:
    return math.exp(s) + 1e-3


def spec_element(family: Family, p: list[float], x: float, y: float, kh: int, kw: int) -> float:
    """K_family at (x, y) for raw AKPs p (SPEC §4), written straight from the table."""
    def g(u: float, s: float) -> float:
        return math.exp(-u * u / (2 * s * s))

    def tri(r: float, rho: float) -> float:
        return max(0.0, 1 - r / rho)

    a = p[0]
    if family == Family.GABOR:
        theta, sigma, gamma, lam, psi = p[1], spec_pos(p[2]), spec_pos(p[3]), spec_pos(p[4]), p[5]
    elif family in (Family.TGD1, Family.TGD2):
        theta, sigma = p[1], spec_pos(p[2])
    else:
        theta = 0.0
    xr = x * math.cos(theta) + y * math.sin(theta)
    yr = -x * math.sin(theta) + y * math.cos(theta)
    r2 = x * x + y * y
    if family == Family.GABOR:
        envelope = math.exp(-(xr ** 2 + gamma ** 2 * yr ** 2) / (2 * sigma ** 2))
        return a * envelope * math.cos(2 * math.pi * xr / lam + psi)
    if family == Family.LOG:
        sigma = spec_pos(p[1])
        return a * (1 - r2 / (2 * sigma ** 2)) * math.exp(-r2 / (2 * sigma ** 2))
    if family == Family.LOT:
        rho = spec_pos(p[1])
        r = math.sqrt(r2)
        return a * (tri(r, rho) - 0.25 * tri(r, 2 * rho))
    if family == Family.TGD1:
        return a * (g(xr - sigma, sigma) - g(xr + sigma, sigma)) * g(yr, sigma)
    if family == Family.TGD2:
        return a * (g(xr, sigma) - 0.5 * g(xr, 2 * sigma)) * g(yr, sigma)
    if family == Family.MEAN:
        return a / (kh * kw)
    raise AssertionError(family)


def spec_weight(akp: torch.Tensor, weight, codes: list[int], kernel_size: tuple[int, int]) -> torch.Tensor:
    """W of SPEC §5 by loops: output channel o takes the next plain row or the next AKP row."""
    kh, kw = kernel_size
    cg = akp.shape[1]
    out = []
    plain_row = analytic_row = 0
    for code in codes:
        if code == Family.PLAIN:
            out.append(weight[plain_row].tolist())
            plain_row += 1
            continue
        slices = []
        for c in range(cg):
            p = akp[analytic_row, c].tolist()
            slices.append([[spec_element(Family(code), p, j - (kw - 1) / 2, i - (kh - 1) / 2, kh, kw)
                            for j in range(kw)] for i in range(kh)])
        out.append(slices)
        analytic_row += 1
    return torch.tensor(out, dtype=torch.float64)


# --------------------------------------------------------------------------------------------
# Random AKPs that are generic (no family at a symmetric point) and keep LOT off its kinks.

def grid_radii(kernel_size: tuple[int, int]) -> torch.Tensor:
    x, y = reference.grid(kernel_size, torch.float64, torch.device("cpu"))
    return (x * x + y * y).sqrt().flatten()


def random_akp(codes: list[int], cg: int, kernel_size: tuple[int, int], seed: int,
               dtype=torch.float64) -> torch.Tensor:
    """[A, cg, 6] raw AKPs: amplitudes ~ N(0, 1), angles ~ U(-pi, pi), scales of the order of the
    kernel extent (so every term of every formula matters), unused slots random (never read)."""
    gen = torch.Generator().manual_seed(seed)
    k = max(kernel_size)

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return torch.empty(cg, dtype=torch.float64).uniform_(lo, hi, generator=gen)

    def raw_scale(fraction_of_k: float) -> torch.Tensor:
        return torch.log(fraction_of_k * k * uniform(0.6, 1.6))

    analytic = [c for c in codes if c != Family.PLAIN]
    akp = torch.randn(len(analytic), cg, 6, generator=gen, dtype=torch.float64)
    radii = grid_radii(kernel_size)
    for r, code in enumerate(analytic):
        if code == Family.GABOR:
            akp[r, :, 1:6] = torch.stack([uniform(-math.pi, math.pi), raw_scale(0.3), uniform(-0.5, 0.5),
                                          raw_scale(0.6), uniform(-math.pi, math.pi)], 1)
        elif code in (Family.TGD1, Family.TGD2):
            akp[r, :, 1:3] = torch.stack([uniform(-math.pi, math.pi), raw_scale(0.2)], 1)
        elif code == Family.LOG:
            akp[r, :, 1] = raw_scale(0.2)
        elif code == Family.LOT:
            akp[r, :, 1] = raw_scale(0.3)
            # gradcheck perturbs s_rho by 1e-6: keep every grid radius 1e-2 away from the kinks
            # r = rho and r = 2 rho (they have a test of their own)
            for c in range(cg):
                while min((radii - pos(akp[r, c, 1])).abs().min(),
                          (radii - 2 * pos(akp[r, c, 1])).abs().min()) < 1e-2:
                    akp[r, c, 1] += 0.03
    return akp.to(dtype)


def random_weight(codes: list[int], cg: int, kernel_size, seed: int, dtype=torch.float64):
    n = sum(c == Family.PLAIN for c in codes)
    if n == 0:
        return None
    gen = torch.Generator().manual_seed(seed + 1000)
    return torch.randn(n, cg, *kernel_size, generator=gen, dtype=torch.float64).to(dtype)


MOSAIC = [Family.TGD2, Family.PLAIN, Family.GABOR, Family.MEAN, Family.LOG, Family.PLAIN, Family.LOT,
          Family.TGD1, Family.GABOR]


# --------------------------------------------------------------------------------------------
# SPEC formulas, element by element.

@pytest.mark.parametrize("kernel_size", KERNELS, ids=lambda k: f"{k[0]}x{k[1]}")
@pytest.mark.parametrize("family", ANALYTIC_FAMILIES, ids=lambda f: f.name)
def test_synthesis_equals_spec_elementwise(family, kernel_size):
    codes = [int(family)] * 3
    akp = random_akp(codes, 2, kernel_size, seed=int(family))
    got = reference.synthesize(akp, None, codes, kernel_size)
    want = spec_weight(akp, None, codes, kernel_size)
    assert got.shape == (3, 2, *kernel_size)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kernel_size", [(3, 3), (4, 2)], ids=lambda k: f"{k[0]}x{k[1]}")
def test_mosaic_equals_spec_elementwise(kernel_size):
    """Plain rows and analytic rows land on their output channels, in any order."""
    codes = [int(c) for c in MOSAIC]
    akp, weight = random_akp(codes, 3, kernel_size, seed=7), random_weight(codes, 3, kernel_size, seed=7)
    for family in (codes, Layout(codes), torch.tensor(codes), [Family(c).name.lower() for c in codes]):
        got = reference.synthesize(akp, weight, family, kernel_size)
        torch.testing.assert_close(got, spec_weight(akp, weight, codes, kernel_size), rtol=1e-12, atol=1e-14)


def test_grid_is_spec_section_2():
    x, y = reference.grid((3, 4), torch.float64, torch.device("cpu"))
    assert x.flatten().tolist() == [-1.5, -0.5, 0.5, 1.5]   # along the width, half-integers
    assert y.flatten().tolist() == [-1.0, 0.0, 1.0]         # along the height
    assert x.shape == (1, 1, 1, 4) and y.shape == (1, 1, 3, 1)
    # and synthesis uses it that way round: a LOG kernel with sigma = 1 reads r^2 off the grid
    sigma_raw = math.log(1.0 - POS_EPS)
    w = reference.synthesize(torch.tensor([[[1.0, sigma_raw, 0, 0, 0, 0]]], dtype=torch.float64), None,
                             [Family.LOG], (2, 4))[0, 0]
    r2 = torch.tensor([[2.5, 0.5, 0.5, 2.5]] * 2, dtype=torch.float64)   # x^2 + y^2, y = -+0.5
    torch.testing.assert_close(w, (1 - r2 / 2) * torch.exp(-r2 / 2), rtol=1e-12, atol=1e-14)


def test_pos():
    s = torch.tensor([-50.0, 0.0, math.log(2.0), 3.0], dtype=torch.float64)
    assert pos(s).tolist() == pytest.approx([1e-3, 1.001, 2.001, math.exp(3.0) + 1e-3], rel=1e-15, abs=1e-18)
    assert POS_EPS == 1e-3


# --------------------------------------------------------------------------------------------
# Hand-derived values and symmetries.

def one(family: Family, *p: float, kernel_size=(5, 5)) -> torch.Tensor:
    """The [kH, kW] kernel of one slice with raw AKPs p."""
    akp = torch.zeros(1, 1, 6, dtype=torch.float64)
    akp[0, 0, :len(p)] = torch.tensor(p, dtype=torch.float64)
    return reference.synthesize(akp, None, [family], kernel_size)[0, 0]


def raw(q: float) -> float:
    """Raw value whose pos() is q."""
    return math.log(q - POS_EPS)


@pytest.mark.parametrize("kernel_size", [(3, 3), (5, 7), (9, 9)])
def test_log_centre_is_amplitude(kernel_size):
    w = one(Family.LOG, -1.7, raw(0.8), kernel_size=kernel_size)
    assert w[kernel_size[0] // 2, kernel_size[1] // 2].item() == pytest.approx(-1.7, rel=1e-15)
    assert w.min() == w[kernel_size[0] // 2, kernel_size[1] // 2]  # a < 0: the hat's peak is its minimum
    w = one(Family.LOG, 2.0, raw(0.8), kernel_size=kernel_size)
    assert w.max().item() == pytest.approx(2.0, rel=1e-15)


@pytest.mark.parametrize("kernel_size", [(3, 3), (4, 6), (1, 5)])
def test_mean_is_amplitude_over_area(kernel_size):
    w = one(Family.MEAN, 3.0, 11.0, -4.0, kernel_size=kernel_size)  # slots 1.. unused
    assert torch.equal(w, torch.full(kernel_size, 3.0 / (kernel_size[0] * kernel_size[1]), dtype=torch.float64))


@pytest.mark.parametrize("family", [Family.TGD1, Family.TGD2])
@pytest.mark.parametrize("kernel_size", [(5, 5), (4, 6)])
def test_tgd_point_symmetry(family, kernel_size):
    """TGD1 is odd, TGD2 even under (x, y) -> (-x, -y) (which reverses both weight axes)."""
    w = one(family, 1.3, 0.7, raw(1.1), kernel_size=kernel_size)
    sign = -1 if family == Family.TGD1 else 1
    torch.testing.assert_close(w.flip(0, 1), sign * w, rtol=1e-13, atol=1e-15)
    assert w.abs().max() > 0.1


@pytest.mark.parametrize("theta", [0.0, math.pi / 2, math.pi / 4, 2.5])
def test_tgd1_positive_lobe_toward_theta(theta):
    """The positive lobe sits at +sigma along (cos theta, sin theta): x along the width (j),
    y along the height (i)."""
    sigma = 2.0
    w = one(Family.TGD1, 1.0, theta, raw(sigma), kernel_size=(15, 15))
    i, j = divmod(int(w.argmax()), 15)
    x, y = j - 7, i - 7
    direction = (x * math.cos(theta) + y * math.sin(theta)) / math.hypot(x, y)
    assert direction > 0.9
    assert w.argmin() == (14 - i) * 15 + (14 - j)
    # exactly on the axis, for theta = 0: K(x, 0) = a (G(x - s) - G(x + s)), maximal near x = s
    if theta == 0.0:
        x = torch.arange(15, dtype=torch.float64) - 7
        g = lambda u: torch.exp(-u * u / (2 * sigma ** 2))  # noqa: E731
        torch.testing.assert_close(w[7], g(x - sigma) - g(x + sigma), rtol=1e-13, atol=1e-15)


def test_tgd2_shape_along_theta():
    """At theta = 0 the centre row is G_s(x) - G_2s(x) / 2 and the centre column G_s(y) / 2."""
    s = 1.5
    w = one(Family.TGD2, 2.0, 0.0, raw(s), kernel_size=(7, 9))
    x = torch.arange(9, dtype=torch.float64) - 4
    y = torch.arange(7, dtype=torch.float64) - 3
    g = lambda u, t: torch.exp(-u * u / (2 * t * t))  # noqa: E731
    torch.testing.assert_close(w[3], 2.0 * (g(x, s) - 0.5 * g(x, 2 * s)), rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(w[:, 4], 2.0 * 0.5 * g(y, s), rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("kernel_size", [(7, 7), (6, 9)])
def test_gabor_along_x_axis(kernel_size):
    """theta = 0, psi = 0: the row y = 0 is a exp(-x^2 / (2 sigma^2)) cos(2 pi x / lambda), for any
    gamma (y' = 0 there)."""
    a, sigma, lam = -0.6, 1.7, 3.2
    w = one(Family.GABOR, a, 0.0, raw(sigma), 1.3, raw(lam), 0.0, kernel_size=kernel_size)
    kh, kw = kernel_size
    x = torch.arange(kw, dtype=torch.float64) - (kw - 1) / 2
    want = a * torch.exp(-x ** 2 / (2 * sigma ** 2)) * torch.cos(2 * math.pi * x / lam)
    if kh % 2:
        torch.testing.assert_close(w[kh // 2], want, rtol=1e-13, atol=1e-15)
    # theta rotates: at theta = pi/2 the column x = 0 carries the same profile along y
    w = one(Family.GABOR, a, math.pi / 2, raw(sigma), 1.3, raw(lam), 0.0, kernel_size=(kw, kw))
    if kw % 2:
        torch.testing.assert_close(w[:, kw // 2], want, rtol=1e-13, atol=1e-15)


def test_gabor_gamma_and_psi():
    """gamma squeezes the envelope across the orientation; psi shifts the phase (cos -> -sin)."""
    w = one(Family.GABOR, 1.0, 0.0, raw(2.0), raw(2.0), raw(4.0), -math.pi / 2, kernel_size=(5, 5))
    y = torch.arange(5, dtype=torch.float64) - 2
    # column x = 1: a exp(-(1 + 4 y^2) / 8) cos(2 pi / 4 - pi / 2) = exp(-(1 + 4 y^2) / 8)
    torch.testing.assert_close(w[:, 3], torch.exp(-(1 + 4 * y ** 2) / 8), rtol=1e-13, atol=1e-15)
    assert w[2, 2].item() == pytest.approx(0.0, abs=1e-15)  # cos(-pi/2) = 0 at the centre


def test_lot_values_at_zero_rho_and_two_rho():
    """K(r = 0) = a (1 - 1/4), K(rho) = -a/8 (the surround's bottom), K(2 rho) = 0 and beyond."""
    a = 1.6
    s_rho = exact_raw_for_rho_one()
    w = one(Family.LOT, a, s_rho, kernel_size=(7, 7))
    assert w[3, 3].item() == pytest.approx(a * 0.75, rel=1e-15)
    for i, j in ((3, 4), (2, 3), (3, 2), (4, 3)):   # r = 1 = rho
        assert w[i, j].item() == pytest.approx(-a / 8, rel=1e-15)
    for i, j in ((3, 5), (1, 3)):                   # r = 2 = 2 rho
        assert w[i, j].item() == 0.0
    assert torch.all(w[0] == 0) and torch.all(w[:, 6] == 0)  # r > 2 rho
    # between: r = sqrt(2): tri = 0, outer tent 1 - sqrt(2)/2
    assert w[2, 2].item() == pytest.approx(-a / 4 * (1 - math.sqrt(2) / 2), rel=1e-14)


def exact_raw_for_rho_one() -> float:
    """A raw value whose pos() is exactly 1.0 in float64 (so r = rho ties exactly on the grid)."""
    s = math.log(1 - POS_EPS)
    for _ in range(64):
        rho = pos(torch.tensor(s, dtype=torch.float64)).item()
        if rho == 1.0:
            return s
        s = math.nextafter(s, -math.inf if rho > 1 else math.inf)
    raise AssertionError("no raw value maps exactly to rho = 1")


# --------------------------------------------------------------------------------------------
# Zero integrals in the continuous limit: scales much larger than a pixel, kernels covering the
# support (or 8 widths of the Gaussian), so sum * (cell area 1) approximates the integral.

def zero_integral_ratio(w: torch.Tensor) -> float:
    return (w.sum() / w.abs().sum()).abs().item()


def test_log_zero_integral():
    # sigma = 6 px, half-width 48 = 8 sigma: truncation ~exp(-32), sampling error ~exp(-2 pi^2 sigma^2)
    assert zero_integral_ratio(one(Family.LOG, 1.0, raw(6.0), kernel_size=(97, 97))) < 1e-10


def test_lot_zero_integral():
    # rho = 20 px: the tents are piecewise linear, so the pixel sum's error is O(1 / rho^2)
    # relative (measured 4e-4 here; 1e-2 for rho = 2): the bound shrinks as the grid refines
    ratios = [zero_integral_ratio(one(Family.LOT, 1.0, raw(rho), kernel_size=(k, k)))
              for rho, k in ((5.0, 21), (20.0, 81))]
    assert ratios[1] < 1e-3 and ratios[1] < ratios[0] / 4


@pytest.mark.parametrize("theta", [0.0, 0.4, 2.0])
def test_tgd1_zero_integral(theta):
    # odd under (x, y) -> (-x, -y) on a symmetric grid: the sum vanishes to round-off
    assert zero_integral_ratio(one(Family.TGD1, 1.0, theta, raw(5.0), kernel_size=(81, 81))) < 1e-13


@pytest.mark.parametrize("theta", [0.0, 0.4, 2.0])
def test_tgd2_zero_integral_along_theta(theta):
    s = 4.0
    w = one(Family.TGD2, 1.0, theta, raw(s), kernel_size=(129, 129))
    assert zero_integral_ratio(w) < 1e-8
    if theta == 0.0:   # every line along theta integrates to zero by itself
        rows = w.sum(1) / w.abs().sum(1)
        assert rows.abs().max() < 1e-8


# --------------------------------------------------------------------------------------------
# Gradients.

@pytest.mark.parametrize("kernel_size", [(3, 3), (4, 4), (2, 5)], ids=lambda k: f"{k[0]}x{k[1]}")
@pytest.mark.parametrize("family", ANALYTIC_FAMILIES, ids=lambda f: f.name)
def test_synthesize_gradcheck(family, kernel_size):
    codes = [int(family), int(Family.PLAIN), int(family)]
    akp = random_akp(codes, 2, kernel_size, seed=10 + int(family)).requires_grad_()
    weight = random_weight(codes, 2, kernel_size, seed=3).requires_grad_()
    layout = Layout(codes)
    assert torch.autograd.gradcheck(lambda a, w: reference.synthesize(a, w, layout, kernel_size), (akp, weight))


@pytest.mark.parametrize("family", ANALYTIC_FAMILIES, ids=lambda f: f.name)
def test_acl_conv2d_gradcheck(family):
    codes = [int(Family.PLAIN), int(family), int(family)]
    kernel_size = (3, 2)
    akp = random_akp(codes, 2, kernel_size, seed=20 + int(family)).requires_grad_()
    weight = random_weight(codes, 2, kernel_size, seed=5).requires_grad_()
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, a, w, b: reference.acl_conv2d(x, a, w, codes, b, padding=1, stride=(1, 2)),
        (x, akp, weight, bias))


def test_acl_conv2d_gradcheck_all_analytic_grouped():
    """No plain channel (weight None, kernel_size given), groups, even kernel with 'same'."""
    codes = [int(c) for c in ANALYTIC_FAMILIES]
    akp = random_akp(codes, 2, (2, 2), seed=31).requires_grad_()
    x = torch.randn(1, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, a: reference.acl_conv2d(x, a, None, codes, groups=2, padding="same", kernel_size=2), (x, akp))


@pytest.mark.parametrize("family", ANALYTIC_FAMILIES, ids=lambda f: f.name)
def test_unused_akp_slots_get_exactly_zero_gradient(family):
    codes = [int(family)] * 2
    akp = random_akp(codes, 3, (4, 5), seed=40).requires_grad_()
    w = reference.synthesize(akp, None, codes, (4, 5))
    w.backward(torch.randn_like(w))
    used = AKP_COUNT[family]
    assert torch.all(akp.grad[..., used:] == 0)
    assert torch.all(akp.grad[..., :used].abs() > 0)  # and every used slot does get one


def test_lot_gradient_at_kinks():
    """SPEC §4: at r = rho and r = 2 rho the gradient is that of the active branch, and max(0, .)
    has zero derivative at its tie. With rho = 1 exactly, on a 5x5 grid (raw s, drho/ds = e^s):
      r = 1 = rho:    K = a (max(0, 1 - r/rho) - 1/4 (1 - r/(2 rho)))
                      dK/da = -1/8,  dK/ds = a (0 - 1/4 * r / (2 rho^2)) e^s = -a e^s / 8
      r = 2 = 2 rho:  both tents at or past their tie: dK/da = dK/ds = 0
      r = 0:          dK/da = 3/4, dK/ds = 0 (neither tent's slope depends on rho at r = 0)."""
    s = exact_raw_for_rho_one()
    a = 1.3
    akp = torch.tensor([[[a, s, 0, 0, 0, 0]]], dtype=torch.float64, requires_grad=True)
    w = reference.synthesize(akp, None, [Family.LOT], (5, 5))[0, 0]
    expected = {(2, 3): (-1 / 8, -a * math.exp(s) / 8), (2, 4): (0.0, 0.0), (4, 2): (0.0, 0.0),
                (2, 2): (0.75, 0.0)}
    for (i, j), (d_a, d_s) in expected.items():
        (g,) = torch.autograd.grad(w[i, j], akp, retain_graph=True)
        assert g[0, 0, 0].item() == pytest.approx(d_a, rel=1e-15, abs=1e-300), (i, j)
        assert g[0, 0, 1].item() == pytest.approx(d_s, rel=1e-14, abs=1e-300), (i, j)


# --------------------------------------------------------------------------------------------
# The convolution: nn.functional.conv2d semantics on the synthesized weight.

CONV_ARGS = [
    dict(),
    dict(stride=2, padding=1),
    dict(stride=(2, 1), padding=(1, 0)),
    dict(padding="same"),
    dict(padding="same", dilation=2),
    dict(padding="valid"),
    dict(dilation=(2, 1), padding=(2, 1)),
    dict(groups=3, padding=1),
    dict(groups=3, stride=(1, 3), dilation=(1, 2)),
]


@pytest.mark.parametrize("kernel_size", [(3, 3), (2, 4)], ids=lambda k: f"{k[0]}x{k[1]}")
@pytest.mark.parametrize("conv", CONV_ARGS, ids=str)
@pytest.mark.parametrize("bias", [True, False])
def test_conv_matches_functional_conv2d(conv, kernel_size, bias):
    codes = [int(c) for c in MOSAIC]
    groups = conv.get("groups", 1)
    c_in, cg = 6, 6 // groups
    if len(codes) % groups:
        pytest.fail("test layout must divide by groups")
    akp = random_akp(codes, cg, kernel_size, seed=50).requires_grad_()
    weight = random_weight(codes, cg, kernel_size, seed=50).requires_grad_()
    b = torch.randn(len(codes), dtype=torch.float64, requires_grad=True) if bias else None
    x = torch.randn(2, c_in, 9, 8, dtype=torch.float64, requires_grad=True)
    y = reference.acl_conv2d(x, akp, weight, codes, b, **conv)
    w = spec_weight(akp.detach(), weight.detach(), codes, kernel_size).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    b2 = None if b is None else b.detach().clone().requires_grad_()
    want = F.conv2d(x2, w, b2, **conv)
    assert y.shape == want.shape
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    y.backward(g)
    want.backward(g)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-12, atol=1e-12)
    if b is not None:
        torch.testing.assert_close(b.grad, b2.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(weight.grad, w.grad[[o for o, c in enumerate(codes) if c == 0]], rtol=1e-12, atol=1e-12)


def test_conv_gradcheck_with_conv_args():
    codes = [int(c) for c in MOSAIC]
    akp = random_akp(codes, 1, (2, 3), seed=60).requires_grad_()
    weight = random_weight(codes, 1, (2, 3), seed=60).requires_grad_()
    x = torch.randn(1, 3, 3, 4, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, a, w, b: reference.acl_conv2d(x, a, w, codes, b, padding="same", dilation=(1, 2), groups=3),
        (x, akp, weight, bias))


def test_batch_zero():
    codes = [int(c) for c in MOSAIC]
    akp = random_akp(codes, 2, (3, 3), seed=70).requires_grad_()
    weight = random_weight(codes, 2, (3, 3), seed=70).requires_grad_()
    bias = torch.randn(9, dtype=torch.float64, requires_grad=True)
    x = torch.randn(0, 2, 7, 6, dtype=torch.float64, requires_grad=True)
    y = reference.acl_conv2d(x, akp, weight, codes, bias, stride=2, padding=1)
    assert y.shape == (0, 9, 4, 3)
    y.sum().backward()
    assert torch.all(akp.grad == 0) and torch.all(weight.grad == 0) and torch.all(bias.grad == 0)
    assert x.grad.shape == x.shape


def test_float32_within_1e_5_of_float64():
    codes = [int(c) for c in MOSAIC]
    akp = random_akp(codes, 4, (5, 5), seed=80)
    weight = random_weight(codes, 4, (5, 5), seed=80)
    bias = torch.randn(9, dtype=torch.float64)
    x = torch.randn(2, 4, 12, 11, dtype=torch.float64)
    results = {}
    for dtype in (torch.float64, torch.float32):
        params = [t.detach().to(dtype).requires_grad_() for t in (x, akp, weight, bias)]
        y = reference.acl_conv2d(params[0], params[1], params[2], codes, params[3], padding=2)
        assert y.dtype == dtype
        y.backward(torch.ones_like(y))
        results[dtype] = [y] + [p.grad for p in params]
        assert all(p.grad.dtype == dtype for p in params)
    for got, want in zip(results[torch.float32], results[torch.float64]):
        assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_params_synthesized_in_float32_rounded_once(dtype):
    codes = [int(c) for c in MOSAIC]
    akp = random_akp(codes, 3, (5, 5), seed=85).to(dtype).requires_grad_()
    weight = random_weight(codes, 3, (5, 5), seed=85).to(dtype)
    w = reference.synthesize(akp, weight, codes)
    assert w.dtype == dtype
    assert torch.equal(w, reference.synthesize(akp.detach().float(), weight.float(), codes).to(dtype))
    w.sum().backward()
    assert akp.grad.dtype == dtype


def test_autocast_bfloat16():
    """Under CPU autocast: W synthesized in float32, the convolution in bfloat16 (nn.Conv2d's
    rule), output within 1e-2 of float64, parameters' gradients in float32."""
    codes = [int(c) for c in MOSAIC]
    akp64 = random_akp(codes, 4, (3, 3), seed=90)
    weight64 = random_weight(codes, 4, (3, 3), seed=90)
    bias64 = torch.randn(9, dtype=torch.float64)
    x64 = torch.randn(2, 4, 10, 10, dtype=torch.float64)
    want = reference.acl_conv2d(x64, akp64, weight64, codes, bias64, padding=1)
    x, akp, weight, bias = (t.float().requires_grad_() for t in (x64, akp64, weight64, bias64))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = reference.acl_conv2d(x, akp, weight, codes, bias, padding=1)
        # the same thing spelled out: float32 synthesis, rounded once to bfloat16 by the conv
        w32 = reference.synthesize(akp.detach(), weight.detach(), codes)
    assert w32.dtype == torch.float32
    assert y.dtype == torch.bfloat16
    exact = F.conv2d(x.detach().bfloat16(), w32.bfloat16(), bias.detach().bfloat16(), padding=1)
    assert torch.equal(y.detach(), exact)
    assert rel_err(y, want) < 1e-2
    # a generic upstream gradient (all-ones would make grad_x a sum of kernel taps, whose
    # cancellation turns bfloat16's per-element rounding into percents)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(91)).bfloat16()
    y.backward(g)
    for p in (x, akp, weight, bias):
        assert p.grad.dtype == torch.float32
    x64r, akp64r, weight64r, bias64r = (t.clone().requires_grad_() for t in (x64, akp64, weight64, bias64))
    reference.acl_conv2d(x64r, akp64r, weight64r, codes, bias64r, padding=1).backward(g.double())
    for p, p64 in ((akp, akp64r), (weight, weight64r), (bias, bias64r), (x, x64r)):
        assert rel_err(p.grad, p64.grad) < 1e-2
