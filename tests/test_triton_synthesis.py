"""Triton family helpers (acl_fused/backends/triton_families.py) and the "triton" backend's
kernels and autograd Functions (acl_fused/backends/triton_synthesis.py), at kernel level.

The public API against every backend is tests/test_backends.py; this file checks what is specific
to the Triton code: the formulas and derivatives against autograd on the reference, mosaics in any
order, block boundaries, exact zeros, rounding of half params, what backward saves, why_not.
"""
import math

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed")
tl = pytest.importorskip("triton.language")

from acl_fused.backends import triton_families as tf  # noqa: E402
from acl_fused.families import AKP_COUNT, Family  # noqa: E402
from acl_fused.reference import family_kernel, grid  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ALL_CODES = [int(f) for f in Family]


@triton.jit
def _families_probe(code_ptr, akp_ptr, out_ptr, n_slices, KH: tl.constexpr, KW: tl.constexpr,
                    KK_PAD: tl.constexpr, BLOCK: tl.constexpr):
    """out[s] = [K, dK/da, dK/dp1..dK/dp5, family_value K, akp_count] over the grid, per slice s."""
    dtype: tl.constexpr = akp_ptr.dtype.element_ty
    s = tl.arange(0, BLOCK)
    ok = s < n_slices
    code = tl.load(code_ptr + s, mask=ok, other=0)[:, None]
    a = tl.load(akp_ptr + s * 6 + 0, mask=ok, other=0)[:, None]
    p1 = tl.load(akp_ptr + s * 6 + 1, mask=ok, other=0)[:, None]
    p2 = tl.load(akp_ptr + s * 6 + 2, mask=ok, other=0)[:, None]
    p3 = tl.load(akp_ptr + s * 6 + 3, mask=ok, other=0)[:, None]
    p4 = tl.load(akp_ptr + s * 6 + 4, mask=ok, other=0)[:, None]
    p5 = tl.load(akp_ptr + s * 6 + 5, mask=ok, other=0)[:, None]
    kk = tl.arange(0, KK_PAD)
    x, y = tf.grid_xy(kk // KW, kk % KW, KH, KW, dtype)
    x = x[None, :]
    y = y[None, :]
    inv_area = 1.0 / tl.full([], KH * KW, dtype)
    k, da, d1, d2, d3, d4, d5 = tf.family_value_and_grads(code, a, p1, p2, p3, p4, p5, x, y, inv_area)
    value = tf.family_value(code, a, p1, p2, p3, p4, p5, x, y, inv_area)
    count = (tf.akp_count(code) + 0 * kk[None, :]).to(dtype)
    m = ok[:, None] & (kk < KH * KW)[None, :]
    out = out_ptr + s[:, None] * (9 * KH * KW) + kk[None, :]
    tl.store(out + 0 * KH * KW, k, mask=m)
    tl.store(out + 1 * KH * KW, da, mask=m)
    tl.store(out + 2 * KH * KW, d1, mask=m)
    tl.store(out + 3 * KH * KW, d2, mask=m)
    tl.store(out + 4 * KH * KW, d3, mask=m)
    tl.store(out + 5 * KH * KW, d4, mask=m)
    tl.store(out + 6 * KH * KW, d5, mask=m)
    tl.store(out + 7 * KH * KW, value, mask=m)
    tl.store(out + 8 * KH * KW, count, mask=m)


def probe(codes: list[int], akp: torch.Tensor, kernel_size: tuple[int, int]) -> torch.Tensor:
    """[S, 9, kH*kW] from the probe kernel for slices with family codes ``codes`` and AKPs akp [S, 6]."""
    kh, kw = kernel_size
    out = torch.full((len(codes), 9, kh * kw), float("nan"), dtype=akp.dtype, device=akp.device)
    code = torch.tensor(codes, dtype=torch.int32, device=akp.device)
    _families_probe[(1,)](code, akp.contiguous(), out, len(codes), kh, kw,
                          triton.next_power_of_2(kh * kw), triton.next_power_of_2(len(codes)))
    return out


def reference_value_and_grads(codes: list[int], akp: torch.Tensor, kernel_size: tuple[int, int]) -> torch.Tensor:
    """[S, 7, kH*kW]: K and dK/d akp[s, 0..5] by autograd on acl_fused.reference.family_kernel."""
    kh, kw = kernel_size
    x, y = grid(kernel_size, akp.dtype, akp.device)
    out = torch.zeros(len(codes), 7, kh * kw, dtype=akp.dtype, device=akp.device)
    for s, code in enumerate(codes):
        if code == Family.PLAIN:
            continue
        p = akp[s].detach().view(1, 1, 6).clone().requires_grad_(True)
        k = family_kernel(Family(code), p, x, y).reshape(-1)
        out[s, 0] = k.detach()
        for e in range(kh * kw):
            (g,) = torch.autograd.grad(k[e], p, retain_graph=True)
            out[s, 1:, e] = g.reshape(6)
    return out


def assert_matches_reference(codes, akp, kernel_size):
    got = probe(codes, akp, kernel_size)
    want = reference_value_and_grads(codes, akp, kernel_size)
    assert torch.isfinite(got).all()
    # float64 round-off: relative to the slice's largest entry (the reference itself cancels,
    # e.g. TGD1's two lobes for a huge sigma), plus an absolute floor scaled by the amplitude a.
    tol = 1e-10 * want.abs().amax(dim=2, keepdim=True) + 1e-14 * akp[:, 0].abs()[:, None, None]
    err = (got[:, :7] - want).abs()
    worst = (err / tol.clamp_min(1e-300)).amax()
    assert (err <= tol).all(), f"worst error / tolerance = {worst.item():.3g}"
    # family_value is the value family_value_and_grads gives, bit for bit
    assert torch.equal(got[:, 7], got[:, 0])
    return got


def test_family_codes_match_the_python_enum():
    for f in Family:
        assert getattr(tf, f.name).value == int(f)
    assert tf.POS_EPS.value == 1e-3


@pytest.mark.parametrize("kernel_size", [(3, 3), (4, 4), (5, 2), (1, 1), (2, 3)])
def test_value_and_grads_match_autograd_on_the_reference(kernel_size):
    torch.manual_seed(0)
    codes = [ALL_CODES[(7 * i + 3 * (i // 7)) % 7] for i in range(42)]  # every family, shuffled
    akp = torch.randn(len(codes), 6, dtype=torch.float64, device=DEVICE) * 1.5
    got = assert_matches_reference(codes, akp, kernel_size)
    # exact zeros: PLAIN gives K = 0 and no gradient; unused slots have no gradient
    for s, code in enumerate(codes):
        used = 0 if code == Family.PLAIN else AKP_COUNT[Family(code)]
        assert (got[s, 1 + used:7] == 0).all(), Family(code).name
        assert (got[s, 8] == used).all()
        if code == Family.PLAIN:
            assert (got[s, 0] == 0).all()


@pytest.mark.parametrize("limit", [10.0, 60.0])
def test_extreme_raw_values_stay_finite_and_exact(limit):
    """Raw AKPs far into the tails (exp(60) ~ 1e26): envelopes underflow, carriers oscillate fast;
    whatever an unselected family computes from these slots must not leak a NaN."""
    torch.manual_seed(1)
    codes = ALL_CODES * 24
    akp = (torch.rand(len(codes), 6, dtype=torch.float64, device=DEVICE) * 2 - 1) * limit
    assert_matches_reference(codes, akp, (3, 4))


def test_lot_kinks_take_the_active_branch():
    """SPEC §4: at r = rho (and r = 2 rho) max(0, .) sits at its tie and contributes no derivative,
    exactly like torch.relu in the reference; r = 0 (the centre) is regular."""
    rho_one = math.log(1.0 - 1e-3)   # pos(s) == 1.0 exactly: the 3x3 edge centres sit at r = rho
    rho_half = math.log(0.5 - 1e-3)  # pos(s) == 0.5 exactly: the same points sit at r = 2 rho
    akp = torch.zeros(2, 6, dtype=torch.float64, device=DEVICE)
    akp[:, 0] = 1.7
    akp[0, 1], akp[1, 1] = rho_one, rho_half
    assert (torch.exp(akp[:, 1]) + 1e-3).tolist() == [1.0, 0.5]
    got = assert_matches_reference([int(Family.LOT)] * 2, akp, (3, 3))
    edge = [1, 3, 5, 7]
    # at r = rho: only the outer tent is active, d/ds = -a/4 * r/(2 rho^2) * exp(s)
    expected = -0.25 * 1.7 * 1.0 / 2 * (1.0 - 1e-3)
    torch.testing.assert_close(got[0, 2, edge], torch.full((4,), expected, dtype=torch.float64, device=DEVICE))
    # at r = 2 rho nothing is active
    assert (got[1, 2, edge] == 0).all()
    assert (got[:, 2, 4] == 0).all()  # the centre r = 0


def test_float32_within_spec_tolerance():
    """float32 math (SPEC §6: 1e-5 relative norm error) per family and per output, against the
    same kernel run in float64 on the same (float32-representable) AKPs. Drawn on the CPU, so that
    a GPU run checks the same values; Gabor's wavelength at least one pixel (raw s_lambda >= 0):
    shorter ones alias on the grid, and the phase of hundreds of radians they give made the
    s_lambda gradient's error 0.73 of the bound under IEEE float32 already (GPU float32 divides
    and exps are a few ulp)."""
    torch.manual_seed(2)
    codes = ALL_CODES * 12
    akp32 = torch.randn(len(codes), 6, dtype=torch.float64)
    gabor = torch.tensor(codes) == int(Family.GABOR)
    akp32[gabor, 4] = akp32[gabor, 4].clamp(min=0.0)
    akp32 = akp32.float().to(DEVICE)
    got = probe(codes, akp32, (3, 3))
    assert got.dtype == torch.float32
    want = probe(codes, akp32.double(), (3, 3))
    family = torch.tensor(codes, device=DEVICE)
    for f in ALL_CODES[1:]:
        rows = family == f
        err = (got[rows, :7].double() - want[rows, :7]).norm(dim=(0, 2))
        assert (err <= 1e-5 * want[rows, :7].norm(dim=(0, 2))).all(), (Family(f).name, err)


# ------------------------------------------------------------------ synthesis and AKP-gradient kernels

from acl_fused import acl_conv2d, synthesize  # noqa: E402
from acl_fused.backends import triton_synthesis as ts  # noqa: E402
from acl_fused.conv_args import ConvArgs  # noqa: E402
from acl_fused.layout import Layout  # noqa: E402
from acl_fused.reference import synthesize_layout  # noqa: E402
from acl_fused.validation import Problem  # noqa: E402
from conftest import compile_for_sm90  # noqa: E402

#: all seven families, in an order where no two neighbours share a family
MOSAIC = [4, 0, 6, 1, 3, 0, 5, 2, 1, 6, 0, 3]


def mosaic_params(codes, cg, kernel_size, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    layout = Layout(codes)
    akp = torch.randn(layout.num_analytic, cg, 6, dtype=torch.float64, device=DEVICE).to(dtype)
    weight = torch.randn(layout.num_plain, cg, *kernel_size, dtype=torch.float64, device=DEVICE).to(dtype)
    return layout, akp, (weight if layout.num_plain else None)


def kernels(akp, weight, layout, kernel_size, grad_w):
    """(W, d akp, d weight) from the two kernels, no autograd."""
    idx = layout.tensors(akp.device)
    w = ts.synthesize_weight(akp, weight, idx["family_i32"], idx["row_i32"], kernel_size)
    d_akp, d_weight = ts.akp_and_weight_grads(grad_w, akp, weight, idx["family_i32"], idx["row_i32"],
                                              kernel_size, True, True)
    return w, d_akp, d_weight


def reference_kernels(akp, weight, layout, kernel_size, grad_w):
    """(W, d akp, d weight) by autograd on acl_fused.reference."""
    leaves = [t if t is None else t.detach().clone().requires_grad_() for t in (akp, weight)]
    w = synthesize_layout(leaves[0], leaves[1], layout, kernel_size)
    present = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(w, present, grad_w, allow_unused=True, materialize_grads=True))
    return (w.detach(), *[None if t is None else next(grads) for t in leaves])


@pytest.mark.parametrize("tile", [32, 512], ids=["tile32", "tile512"])
@pytest.mark.parametrize("kernel_size", [(3, 3), (4, 2), (1, 5)], ids=str)
def test_kernels_match_reference_float64_across_blocks(monkeypatch, tile, kernel_size):
    """Every family in a shuffled mosaic; C_out * Cg slices cross many program tiles (tile32 puts
    a tile boundary inside every output channel), and a GPU-sized tile."""
    monkeypatch.setattr(ts, "_INTERPRETER_TILE", tile)
    monkeypatch.setattr(ts, "_SYNTH_TILE", tile)
    monkeypatch.setattr(ts, "_GRAD_TILE", tile)
    codes = MOSAIC + MOSAIC[::-1][:5]
    layout, akp, weight = mosaic_params(codes, 5, kernel_size)
    grad_w = torch.randn(len(codes), 5, *kernel_size, dtype=torch.float64, device=DEVICE)
    got = kernels(akp, weight, layout, kernel_size, grad_w)
    want = reference_kernels(akp, weight, layout, kernel_size, grad_w)
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got[1], want[1], rtol=1e-11, atol=1e-13)
    assert torch.equal(got[2], want[2])  # plain rows: dW copied


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the kernels run for real in the tests above")
@pytest.mark.parametrize("dtypes", [("float32", "float32"), ("bfloat16", "bfloat16"), ("float64", "float64")],
                         ids=["f32", "bf16", "f64"])
def test_kernels_compile_for_h100_without_spilling(dtypes):
    """Both kernels compile for sm_90a with the launch constants they run with (parameters' dtype,
    weight gradient's dtype), for 1x1, 3x3 and 7x7 kernels, keeping every value in registers."""
    out = compile_for_sm90("triton", *dtypes, "1", "1", "3", "3", "7", "7")
    assert out.count("compiled") == 6 and out.count("spills 0\n") == 6, out


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy
def test_unused_slots_are_exactly_zero_even_for_non_finite_dw():
    kernel_size = (3, 3)
    layout, akp, weight = mosaic_params(MOSAIC, 3, kernel_size)
    grad_w = torch.randn(len(MOSAIC), 3, *kernel_size, dtype=torch.float64, device=DEVICE)
    grad_w[::2, :, 1, 1] = float("inf")
    grad_w[1::2, :, 0, 2] = float("nan")
    _, d_akp, _ = kernels(akp, weight, layout, kernel_size, grad_w)
    for r, o in enumerate(layout.analytic_channels):
        used = AKP_COUNT[Family(layout.codes[o])]
        assert (d_akp[r, :, used:] == 0).all()
        assert not torch.isfinite(d_akp[r, :, :used]).all()  # the inf/NaN does reach used slots


def test_strided_dw_and_weight():
    """dW may come back channels_last, or expanded (stride 0) from a sum; weight may be a view."""
    kernel_size = (3, 2)
    layout, akp, weight = mosaic_params(MOSAIC, 4, kernel_size)
    weight_view = torch.cat([weight, weight], dim=1)[:, ::2]
    assert not weight_view.is_contiguous()
    shape = (len(MOSAIC), 4, *kernel_size)
    for grad_w in (torch.randn(shape, dtype=torch.float64, device=DEVICE).contiguous(memory_format=torch.channels_last),
                   torch.ones((), dtype=torch.float64, device=DEVICE).expand(shape)):
        got = kernels(akp, weight_view, layout, kernel_size, grad_w)
        want = reference_kernels(akp, weight_view, layout, kernel_size, grad_w)
        for g, r in zip(got, want):
            torch.testing.assert_close(g, r, rtol=1e-11, atol=1e-13)


def test_no_plain_or_no_analytic_channels():
    kernel_size = (2, 2)
    for codes in ([1, 2, 3, 4, 5, 6], [0, 0, 0]):
        layout, akp, weight = mosaic_params(codes, 2, kernel_size)
        grad_w = torch.randn(len(codes), 2, *kernel_size, dtype=torch.float64, device=DEVICE)
        got = kernels(akp, weight, layout, kernel_size, grad_w)
        want = reference_kernels(akp, weight, layout, kernel_size, grad_w)
        torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(got[1], want[1], rtol=1e-11, atol=1e-13)
        assert (got[2] is None) == (weight is None)


def test_float32_within_spec_tolerance_vs_float64_reference():
    kernel_size = (5, 4)
    layout, akp, weight = mosaic_params(MOSAIC * 2, 6, kernel_size)
    grad_w = torch.randn(len(layout.codes), 6, *kernel_size, dtype=torch.float64, device=DEVICE)
    want = reference_kernels(akp, weight, layout, kernel_size, grad_w)
    got = kernels(akp.float(), weight.float(), layout, kernel_size, grad_w.float())
    for g, r in zip(got, want):
        assert g.dtype == torch.float32
        assert (g.double() - r).norm() <= 1e-5 * r.norm()


@pytest.mark.parametrize("low", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_half_params_are_synthesized_in_float32_and_rounded_once(low):
    """W = round(float32 synthesis); d akp = round(float32 chain rule of the low-precision dW)."""
    kernel_size = (3, 3)
    layout, akp, weight = mosaic_params(MOSAIC, 3, kernel_size, dtype=low)
    grad_w = torch.randn(len(MOSAIC), 3, *kernel_size, device=DEVICE).to(low)
    w, d_akp, d_weight = kernels(akp, weight, layout, kernel_size, grad_w)
    w32, d_akp32, _ = kernels(akp.float(), weight.float(), layout, kernel_size, grad_w.float())
    assert w.dtype == d_akp.dtype == d_weight.dtype == low
    assert torch.equal(w, w32.to(low))
    assert torch.equal(d_akp, d_akp32.to(low))
    assert torch.equal(d_weight, grad_w[list(layout.plain_channels)])


def test_conv_function_saves_x_and_params_never_w():
    kernel_size = (3, 3)
    layout, akp, weight = mosaic_params([1, 0, 2, 3, 4, 5, 6], 4, kernel_size)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64, device=DEVICE, requires_grad=True)
    akp.requires_grad_()
    weight.requires_grad_()
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = ts.conv2d(x, akp, weight, layout, None, ConvArgs.make(padding=1), kernel_size)
    idx = layout.tensors(akp.device)
    allowed = {t.data_ptr() for t in (x, akp, weight, idx["family_i32"], idx["row_i32"])}
    assert saved and {t.data_ptr() for t in saved} <= allowed
    assert all(t.shape != (7, 4, 3, 3) for t in saved)
    y.sum().backward()
    assert akp.grad is not None and weight.grad is not None and x.grad is not None


def _problem(device="cpu", dtype=torch.float32):
    return Problem(device=torch.device(device), dtype=dtype, kernel_size=(3, 3), layout=Layout([0, 1]))


def test_why_not_reasons(monkeypatch):
    assert ts.why_not(_problem("cuda")) is None
    assert "dtype" in ts.why_not(_problem(dtype=torch.int32))
    assert "'mps'" in ts.why_not(_problem("mps"))
    monkeypatch.setattr(ts, "INTERPRETED", True)
    assert ts.why_not(_problem("cpu")) is None
    monkeypatch.setattr(ts, "INTERPRETED", False)
    assert "set TRITON_INTERPRET=1 before importing acl_fused" in ts.why_not(_problem("cpu"))


def test_why_not_without_triton_installed():
    """With triton absent, `import acl_fused` still works and dispatch names the missing module."""
    import subprocess
    import sys
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, acl_fused\n"
            "from acl_fused import dispatch\n"
            "from acl_fused.layout import Layout\n"
            "from acl_fused.validation import Problem\n"
            "p = Problem(torch.device('cpu'), torch.float32, (3, 3), Layout([0, 1]))\n"
            "print(dispatch.why_not('triton', p))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "triton_synthesis" in out.stdout and "triton" in out.stdout.split(":", 1)[1]


@pytest.mark.skipif(not ts.INTERPRETED and DEVICE == "cpu", reason="needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("entry", ["conv2d", "synthesize"])
def test_runs_under_torch_compile(entry):
    """Under the interpreter the launches stay eager (dynamo cannot capture an interpreted kernel);
    on a GPU dynamo captures the Triton kernels. Either way the compiled function is exact."""
    kernel_size = (3, 3)
    layout, akp, weight = mosaic_params(MOSAIC[:7], 3, kernel_size)
    leaves = [torch.randn(2, 3, 6, 5, dtype=torch.float64, device=DEVICE), akp, weight]

    def f(x, akp, weight):
        if entry == "synthesize":
            return (synthesize(akp, weight, layout, kernel_size, backend="triton") * x[0, :, :3, :3]).square().sum()
        return acl_conv2d(x, akp, weight, layout, None, padding=1, backend="triton").square().sum()

    torch._dynamo.reset()
    results = []
    for fn in (f, torch.compile(f, backend="aot_eager")):
        inputs = [t.detach().clone().requires_grad_() for t in leaves]
        loss = fn(*inputs)
        results.append([loss, *torch.autograd.grad(loss, inputs)])
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
