"""Conformance suite: every registered backend, through the public API, against the reference.

Each case runs the backend and the pure-PyTorch oracle (acl_fused.reference, in float64) on the
same data and compares outputs and every gradient with the tolerances of SPEC §6:
float64 to round-off (and torch.autograd.gradcheck), float32 within 1e-5 relative norm error,
low precision / autocast within 1e-2. Shapes are small (Triton runs interpreted on CPU) but cross
tile boundaries: C_out 20 > 16, K = Cg*kH*kW up to 72, M = N*H_out*W_out up to 330. The last test
draws combinations of these features at random, from fixed seeds.
"""
from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

from acl_fused import AnalyticConv2d, BackendUnavailable, Family, acl_conv2d, dispatch, reference, synthesize
from acl_fused.conv_args import ConvArgs
from acl_fused.families import AKP_COUNT
from acl_fused.layout import Layout, as_layout, make_layout
from acl_fused.validation import make_problem
from acl_cases import DEVICE, TOL, Case
from conftest import rel_err, skip_or_fail_unavailable

#: The reference runs the suite too: its float32, low-precision and empty-batch behaviour is a
#: contract of its own, and it checks that the harness itself agrees with the oracle.
BACKENDS = list(dispatch.BACKENDS)

F_ = Family
#: Every family, in no particular order, two of some (rows of one family are not contiguous).
MOSAIC = [F_.TGD2, F_.PLAIN, F_.GABOR, F_.MEAN, F_.LOG, F_.PLAIN, F_.LOT, F_.TGD1, F_.GABOR]


def require(name: str, problem) -> None:
    reason = dispatch.why_not(name, problem)
    if reason is not None:
        skip_or_fail_unavailable(name, reason)


CASES = [
    Case("mosaic3x3-pad1", MOSAIC, 3, (3, 3), conv=dict(padding=1)),
    Case("even2x3-same-dil", MOSAIC, 3, (2, 3), conv=dict(padding="same", dilation=(2, 1))),
    Case("even4x4-same-groups3", MOSAIC, 6, (4, 4), conv=dict(padding="same", groups=3)),
    Case("stride2-padpair", MOSAIC, 3, (3, 3), conv=dict(stride=2, padding=(1, 2)), bias=False),
    Case("valid5x3-stride21", MOSAIC, 2, (5, 3), conv=dict(stride=(2, 1), padding="valid")),
    Case("1x1", MOSAIC, 4, (1, 1)),
    Case("tiles-default20", list(make_layout(None, 20).codes), 8, (3, 3), hw=(10, 11), batch=3,
         conv=dict(padding=1)),
    Case("all-analytic-groups2", [F_.GABOR, F_.LOT, F_.TGD1, F_.LOG], 4, (3, 3), conv=dict(groups=2, dilation=2)),
    Case("all-plain", [F_.PLAIN] * 4, 3, (3, 2), conv=dict(padding=(0, 1))),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("name", BACKENDS)
def test_conv_forward_and_grads_match_reference(name, case, dtype):
    (x, akp, weight, bias), layout = case.tensors(dtype)
    require(name, case.problem(x, akp, layout))
    y, grads = case.run(name, x, akp, weight, bias, layout)
    y_ref, grads_ref = case.reference(x, akp, weight, bias, layout)
    assert y.dtype == dtype and y.shape == y_ref.shape
    assert rel_err(y, y_ref) <= TOL[dtype], "output"
    for what, g, g_ref in zip(("x", "akp", "weight", "bias"), grads, grads_ref):
        if g_ref is None:
            continue
        assert g.dtype == dtype and g.shape == g_ref.shape, what
        assert rel_err(g, g_ref) <= TOL[dtype], f"grad {what}: {rel_err(g, g_ref):.3g}"


@pytest.mark.skipif(DEVICE.type != "cuda", reason="TF32 needs a CUDA device")
@pytest.mark.parametrize("name", BACKENDS)
def test_tf32_float32_within_spec(name, tf32):
    """SPEC §6: float32 with TF32 allowed (cuDNN's default) within 5e-3 of the float64 oracle."""
    case = next(c for c in CASES if c.id == "tiles-default20")  # crosses every tile boundary
    (x, akp, weight, bias), layout = case.tensors(torch.float32)
    require(name, case.problem(x, akp, layout))
    y, grads = case.run(name, x, akp, weight, bias, layout)
    y_ref, grads_ref = case.reference(x, akp, weight, bias, layout)
    assert rel_err(y, y_ref) <= 5e-3
    assert all(rel_err(g, r) <= 5e-3 for g, r in zip(grads, grads_ref))


@pytest.mark.parametrize("kernel_size", [(3, 3), (2, 3), (5, 4), (1, 1)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", BACKENDS)
def test_synthesize_matches_reference(name, dtype, kernel_size):
    case = Case("synth", MOSAIC * 2, 5, kernel_size)
    (_, akp, weight, _), layout = case.tensors(dtype)
    require(name, make_problem(akp, layout, kernel_size))
    leaves = [akp.clone().requires_grad_(), weight.clone().requires_grad_()]
    w = synthesize(*leaves, layout, kernel_size, backend=name)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    w_ref = reference.synthesize(*ref_leaves, layout, kernel_size)
    assert w.dtype == dtype and w.shape == w_ref.shape
    assert rel_err(w, w_ref) <= TOL[dtype]
    g = torch.randn(w.shape, dtype=torch.float64, device=w.device)
    grads = torch.autograd.grad(w, leaves, g.to(dtype))
    grads_ref = torch.autograd.grad(w_ref, ref_leaves, g)
    for what, gr, gr_ref in zip(("akp", "weight"), grads, grads_ref):
        assert gr.dtype == dtype
        assert rel_err(gr, gr_ref) <= TOL[dtype], what
    # SPEC §5: slots beyond a family's count get exactly zero gradient.
    used = torch.zeros(6, len(layout.analytic_channels), dtype=torch.bool)
    for r, o in enumerate(layout.analytic_channels):
        used[: {1: 6, 2: 2, 3: 2, 4: 3, 5: 3, 6: 1}[layout.codes[o]], r] = True
    assert torch.all(grads[0].permute(2, 0, 1)[~used.to(grads[0].device)] == 0)


@pytest.mark.parametrize("kernel_size", [(3, 3), (1, 1)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", BACKENDS)
def test_nan_in_any_used_akp_slot_gives_nan_where_the_reference_has(name, dtype, kernel_size):
    """A NaN in any AKP slot a family uses makes its slice of W NaN as in the reference (LOT's
    max(0, .) included: torch.relu keeps NaN), and so the output channels convolving with it; the
    other slices and channels keep their values. Row r's slot k is NaN at input channel 1 + k."""
    case = Case("nan", MOSAIC, 7, kernel_size, hw=(4, 5), conv=dict(padding=kernel_size[0] // 2))
    (x, akp, weight, bias), layout = case.tensors(dtype)
    require(name, case.problem(x, akp, layout))
    for r, o in enumerate(layout.analytic_channels):
        for k in range(AKP_COUNT[Family(layout.codes[o])]):
            akp[r, 1 + k, k] = float("nan")
    w = synthesize(akp, weight, layout, kernel_size, backend=name)
    w_ref = reference.synthesize(akp.double(), weight.double(), layout, kernel_size)
    nan_slices = torch.isnan(w_ref).flatten(2).any(2)
    assert nan_slices.sum() == sum(AKP_COUNT[Family(layout.codes[o])] for o in layout.analytic_channels)
    assert torch.equal(torch.isnan(w), torch.isnan(w_ref))
    assert rel_err(w.nan_to_num(), w_ref.nan_to_num()) <= TOL[dtype]
    y = acl_conv2d(x, akp, weight, layout, bias, kernel_size=kernel_size, backend=name, **case.conv)
    y_ref = reference.acl_conv2d(x.double(), akp.double(), weight.double(), layout, bias.double(),
                                 kernel_size=kernel_size, **case.conv)
    assert torch.equal(torch.isnan(y).flatten(2).all(2), nan_slices.any(1).expand(len(x), -1))
    assert torch.equal(torch.isnan(y), torch.isnan(y_ref))
    assert rel_err(y.nan_to_num(), y_ref.nan_to_num()) <= TOL[dtype]


#: Raw scales (s_σ, s_γ, s_λ, s_ρ) up to which kernels and AKP gradients are finite on every backend
#: (README.md, huge raw AKPs): exp overflows at 88.7 (float32) and 709.8 (float64). Gabor's and TGD1's
#: formulas squared γ and σ, NaN from 44.4 (float32) and 354.9 (float64) before they were rewritten.
FINITE_RAW_SCALE = {torch.float32: 80.0, torch.float64: 700.0}


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's numpy: x'^2, σ^2
@pytest.mark.parametrize("kernel_size", [(3, 3), (1, 1), (11, 11)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", BACKENDS)
def test_huge_raw_scales_give_finite_kernels_and_gradients(name, dtype, kernel_size):
    """SPEC §3 (pos(s) = exp(s) + 1e-3: finite raw values, finite kernels) within the range that
    floating point gives it: every scale of every family at FINITE_RAW_SCALE, and at minus it."""
    case = Case("huge", MOSAIC, 2, kernel_size, hw=(4, 5), conv=dict(padding=kernel_size[0] // 2))
    (x, akp, weight, bias), layout = case.tensors(dtype)
    require(name, case.problem(x, akp, layout))
    scale_slots = {F_.GABOR: (2, 3, 4), F_.LOG: (1,), F_.LOT: (1,), F_.TGD1: (2,), F_.TGD2: (2,)}
    for r, o in enumerate(layout.analytic_channels):
        for k in scale_slots.get(Family(layout.codes[o]), ()):
            akp[r, 0, k], akp[r, 1, k] = FINITE_RAW_SCALE[dtype], -FINITE_RAW_SCALE[dtype]
    akp.requires_grad_()
    w = synthesize(akp, weight, layout, kernel_size, backend=name)
    grad_akp, = torch.autograd.grad(w, akp, torch.ones_like(w))
    assert w.isfinite().all() and grad_akp.isfinite().all()
    y = acl_conv2d(x, akp, weight, layout, bias, backend=name, **case.conv)
    grad_akp, = torch.autograd.grad(y, akp, torch.ones_like(y))
    assert y.isfinite().all() and grad_akp.isfinite().all()


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's numpy: exp(s)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", BACKENDS)
def test_tgd1_beyond_the_overflow_of_sigma_is_its_limit_zero(name, dtype):
    """Beyond FINITE_RAW_SCALE's range σ = pos(s_σ) itself overflows to inf: TGD1's lobes, read in
    x'/σ ∓ 1, give the kernel's limit 0 on every backend (the reference's (x' - σ)/σ was inf/inf,
    NaN, where the others gave 0)."""
    layout = Layout([Family.TGD1, Family.TGD1])
    akp = torch.zeros(2, 1, 6, dtype=dtype)
    akp[:, 0, 0], akp[:, 0, 1], akp[:, 0, 2] = 0.7, torch.tensor([0.0, 0.4], dtype=dtype), 1e4
    require(name, make_problem(akp, layout, (3, 3)))
    w = synthesize(akp, None, layout, (3, 3), backend=name)
    assert torch.equal(w.abs(), torch.zeros_like(w))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy
@pytest.mark.parametrize("name", BACKENDS)
def test_unused_akp_slots_get_exactly_zero_gradient_even_from_an_infinite_input(name):
    """SPEC §5: the slots a family does not read have zero gradient. An inf in the input makes
    the weight gradient inf and NaN, and 0 times those is NaN: the zeros must be selected, not
    computed (the fused weight-gradient kernel once summed them)."""
    case = Case("inf-input", MOSAIC, 3, (3, 3), conv=dict(padding=1))
    (x, akp, weight, bias), layout = case.tensors(torch.float64)
    require(name, case.problem(x, akp, layout))
    x[0, 0, 2, 2] = float("inf")
    akp.requires_grad_()
    y = acl_conv2d(x, akp, weight, layout, bias, backend=name, **case.conv)
    grad_akp, = torch.autograd.grad(y, akp, torch.ones_like(y))
    used = torch.tensor([AKP_COUNT[Family(layout.codes[o])] for o in layout.analytic_channels])
    unused = (torch.arange(6) >= used[:, None, None]).expand_as(grad_akp)
    assert unused.any() and not grad_akp[~unused].isfinite().all()  # the case bites
    assert (grad_akp[unused] == 0).all()  # NaN fails


@pytest.mark.parametrize("ks,conv", [(1, dict(stride=2)), (3, dict(stride=3)), (2, dict(stride=2, dilation=2, padding=1))],
                         ids=["1x1-stride2", "3x3-stride3", "2x2-stride2-dil2"])
@pytest.mark.parametrize("name", BACKENDS)
def test_input_gradient_is_zero_where_no_output_reads_the_input(name, ks, conv):
    """Input rows and columns that no output reads (strides and dilations that skip them) get a zero
    input gradient from triton_fused, even from a NaN slice, as from F.conv2d on the CPU, where
    every backend convolves with it (on CUDA the others' convolution is cuDNN's, whatever it gives
    there); elsewhere the NaN reaches the gradient as in the reference, and the values match."""
    layout = as_layout([F_.PLAIN, F_.GABOR])
    gabor = [math.nan, 0.3, 0.2, 0.0, 1.0, 0.4]
    akp = torch.tensor([[gabor, gabor]], dtype=torch.float64, device=DEVICE)
    torch.manual_seed(3)
    weight = torch.randn(1, 2, ks, ks, dtype=torch.float64, device=DEVICE)
    x0 = torch.randn(1, 2, 8, 7, dtype=torch.float64, device=DEVICE)
    require(name, make_problem(akp, layout, (ks, ks), x0, ConvArgs.make(**conv)))

    def input_grad(backend: str) -> torch.Tensor:
        x = x0.clone().requires_grad_()
        y = acl_conv2d(x, akp, weight, layout, backend=backend, **conv)
        return torch.autograd.grad(y, x, torch.ones_like(y))[0]

    x = torch.zeros(1, 2, 8, 7, dtype=torch.float64, requires_grad=True)  # which pixels some output reads
    reads = torch.autograd.grad(F.conv2d(x, torch.ones(1, 2, ks, ks, dtype=torch.float64), **conv).sum(), x)[0]
    unread = (reads == 0).to(DEVICE)
    got, want = input_grad(name), input_grad("reference")
    assert unread.any() and want.isnan().any()  # the case has both kinds of pixel
    if name == "triton_fused" or DEVICE.type == "cpu":
        assert torch.all(got[unread] == 0)
    assert torch.equal(got[~unread].isnan(), want[~unread].isnan())
    assert rel_err(got[~unread].nan_to_num(), want[~unread].nan_to_num()) <= TOL[torch.float64]


GRADCHECK_CASES = [
    # Every family in one mosaic (full gradcheck), even non-square kernel, 'same' padding.
    Case("mosaic", MOSAIC[:8], 2, (3, 2), hw=(4, 3), batch=1, conv=dict(padding="same")),
    Case("strided-dilated-groups", [F_.LOT, F_.GABOR, F_.PLAIN, F_.TGD2], 2, (3, 3), hw=(6, 5), batch=1,
         conv=dict(stride=2, padding=2, dilation=2, groups=2)),
]


@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("name", BACKENDS)
def test_gradcheck_conv_float64(name, case):
    (x, akp, weight, bias), layout = case.tensors(torch.float64)
    require(name, case.problem(x, akp, layout))
    leaves = [t.clone().requires_grad_() for t in (x, akp, weight, bias)]

    def fn(x, akp, weight, bias):
        return acl_conv2d(x, akp, weight, layout, bias, kernel_size=case.kernel_size, backend=name, **case.conv)

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("family", [f for f in Family if f != F_.PLAIN], ids=lambda f: f.name)
@pytest.mark.parametrize("name", BACKENDS)
def test_gradcheck_synthesize_each_family_float64(name, family):
    case = Case("family", [family, F_.PLAIN, family], 2, (4, 3))
    (_, akp, weight, _), layout = case.tensors(torch.float64, seed=int(family))
    require(name, make_problem(akp, layout, case.kernel_size))
    leaves = [akp.clone().requires_grad_(), weight.clone().requires_grad_()]
    assert torch.autograd.gradcheck(lambda a, w: synthesize(a, w, layout, case.kernel_size, backend=name),
                                     leaves, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", BACKENDS)
def test_batch_zero(name):
    case = Case("empty", MOSAIC, 3, (3, 3), batch=0, conv=dict(padding=1))
    (x, akp, weight, bias), layout = case.tensors(torch.float64)
    require(name, case.problem(x, akp, layout))
    y, grads = case.run(name, x, akp, weight, bias, layout)
    assert y.shape == (0, len(MOSAIC), 9, 8)
    leaves = [t.clone().requires_grad_() for t in (x, akp, weight, bias)]
    acl_conv2d(leaves[0], leaves[1], leaves[2], layout, leaves[3], padding=1, backend=name).sum().backward()
    assert all(t.grad is not None and torch.all(t.grad == 0) for t in leaves[1:3])
    assert torch.all(leaves[3].grad == 0)


@pytest.mark.parametrize("name", BACKENDS)
def test_input_without_channels_gives_f_conv2d_s_empty_output(name):
    """x [N, 0, H, W] (akp [A, 0, 6], weight [P, 0, kH, kW]): F.conv2d gives [N, 0, H_out, W_out]
    (ATen's rule for no input channels) and a zero bias gradient; triton_fused, whose kernels would
    give C_out channels, refuses it and says why."""
    layout = as_layout(MOSAIC)
    x, akp = torch.randn(2, 0, 5, 4, dtype=torch.float64, device=DEVICE), torch.randn(layout.num_analytic, 0, 6)
    weight, bias = torch.randn(layout.num_plain, 0, 3, 3), torch.randn(len(MOSAIC))
    akp, weight, bias = (t.to(dtype=torch.float64, device=DEVICE) for t in (akp, weight, bias))
    if name == "triton_fused" and dispatch.why_not("triton", make_problem(akp, layout, (3, 3), x,
                                                                         ConvArgs.make(padding=1))) is None:
        with pytest.raises(BackendUnavailable, match="the input has no channels"):
            acl_conv2d(x, akp, weight, layout, bias, padding=1, backend=name)
        return
    require(name, make_problem(akp, layout, (3, 3), x, ConvArgs.make(padding=1)))
    expected = F.conv2d(x, torch.zeros(len(MOSAIC), 0, 3, 3, dtype=x.dtype, device=DEVICE), bias, padding=1)
    leaves = [t.clone().requires_grad_() for t in (x, akp, weight, bias)]
    y = acl_conv2d(*leaves[:3], layout, leaves[3], padding=1, backend=name)
    assert y.shape == expected.shape == (2, 0, 5, 4)
    grads = torch.autograd.grad(y.sum(), leaves, allow_unused=True, materialize_grads=True)
    assert all(g.shape == t.shape for g, t in zip(grads, leaves)) and torch.all(grads[3] == 0)


@pytest.mark.parametrize("layout_of_input", ["channels_last", "non_contiguous"])
@pytest.mark.parametrize("name", BACKENDS)
def test_input_memory_layouts(name, layout_of_input):
    case = Case("mem", MOSAIC, 4, (3, 3), hw=(7, 10), conv=dict(padding=1, stride=(1, 2)))
    (x, akp, weight, bias), layout = case.tensors(torch.float64)
    require(name, case.problem(x, akp, layout))
    if layout_of_input == "channels_last":
        x_in = x.contiguous(memory_format=torch.channels_last)
    else:
        x_in = torch.stack([x, -x], dim=-1)[..., 0]  # same values, a strided view
        assert not x_in.is_contiguous()
    y, grads = case.run(name, x_in, akp, weight, bias, layout)
    y_ref, grads_ref = case.reference(x, akp, weight, bias, layout)
    assert rel_err(y, y_ref) <= TOL[torch.float64]
    assert all(rel_err(g, r) <= TOL[torch.float64] for g, r in zip(grads, grads_ref))
    if layout_of_input == "channels_last":  # as F.conv2d: the output follows the input's format
        expected = F.conv2d(x_in, torch.zeros(len(MOSAIC), 4, 3, 3, dtype=x.dtype, device=x.device), padding=1,
                            stride=(1, 2))
        assert y.is_contiguous(memory_format=torch.channels_last) == \
            expected.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("kernel_size", [(3, 3), (1, 1)], ids=["3x3", "1x1"])
@pytest.mark.parametrize("formats", [("nchw", "nhwc"), ("nhwc", "nchw"), ("nhwc", "nhwc")],
                         ids=["weight-cl", "input-cl", "both-cl"])
@pytest.mark.parametrize("name", BACKENDS)
def test_output_and_input_gradient_are_laid_out_as_nn_conv2d_s(name, formats, kernel_size):
    """The output and the input gradient have F.conv2d's strides for the input and a weight in the
    plain weight's memory format: after ``layer.to(memory_format=torch.channels_last)`` (which makes
    a 1x1 weight channels_last by its strides) a contiguous input gives a channels_last output, as
    nn.Conv2d's does."""
    case = Case("formats", MOSAIC, 4, kernel_size, hw=(7, 6), conv=dict(padding=kernel_size[0] // 2, stride=(1, 2)))
    (x, akp, weight, bias), layout = case.tensors(torch.float64)
    require(name, case.problem(x, akp, layout))
    x_format, weight_format = ({"nchw": torch.contiguous_format, "nhwc": torch.channels_last}[f] for f in formats)
    x, weight = x.to(memory_format=x_format), weight.to(memory_format=weight_format)
    y, (grad_x, *_) = case.run(name, x, akp, weight, bias, layout)
    y_ref, grads_ref = case.reference(x, akp, weight, bias, layout)
    assert rel_err(y, y_ref) <= TOL[torch.float64] and rel_err(grad_x, grads_ref[0]) <= TOL[torch.float64]
    x_leaf = x.clone().requires_grad_()
    conv_weight = torch.randn(len(MOSAIC), 4, *kernel_size, dtype=x.dtype, device=x.device)
    expected = F.conv2d(x_leaf, conv_weight.to(memory_format=weight_format), **case.conv)
    (expected_grad_x,) = torch.autograd.grad(expected, x_leaf, torch.ones_like(expected))
    assert y.stride() == expected.stride()
    assert grad_x.stride() == expected_grad_x.stride()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("name", BACKENDS)
def test_a_layer_runs_on_its_own_device_while_another_is_current(name):
    """A layer on cuda:1 while cuda:0 is current: its kernels run on cuda:1 (Triton launches on the
    current device unless the backend makes the tensors' current), and agree with the reference."""
    case = CASES[0]
    (x, akp, weight, bias), layout = case.tensors(torch.float64)
    second = [t.to("cuda:1") for t in (x, akp, weight, bias)]
    require(name, case.problem(second[0], second[1], layout))
    with torch.cuda.device(0):
        y, grads = case.run(name, *second, layout)
        torch.cuda.synchronize(1)
    y_ref, grads_ref = case.reference(*(t.cpu() for t in (x, akp, weight, bias)), layout)
    assert y.device == torch.device("cuda:1") and rel_err(y.cpu(), y_ref) <= TOL[torch.float64]
    assert all(rel_err(g.cpu(), r) <= TOL[torch.float64] for g, r in zip(grads, grads_ref))


@pytest.mark.parametrize("name", BACKENDS)
def test_strided_bias_is_read_by_its_strides(name):
    """A bias that is a strided view (every other element of a tensor) gives the reference's output
    and gradient."""
    case = Case("bias", MOSAIC, 3, (3, 3), conv=dict(padding=1))
    (x, akp, weight, bias), layout = case.tensors(torch.float64)
    require(name, case.problem(x, akp, layout))
    strided = torch.stack([bias, -bias], dim=-1)[:, 0].requires_grad_()
    assert not strided.is_contiguous()
    y = acl_conv2d(x, akp, weight, layout, strided, backend=name, **case.conv)
    y_ref = acl_conv2d(x, akp, weight, layout, bias, backend="reference", **case.conv)
    assert rel_err(y, y_ref) <= TOL[torch.float64]
    (grad,) = torch.autograd.grad(y.square().sum(), strided)
    assert rel_err(grad, 2 * y_ref.sum((0, 2, 3))) <= TOL[torch.float64]


@pytest.mark.parametrize("weight_format", [torch.contiguous_format, torch.channels_last], ids=["w-nchw", "w-nhwc"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("name", BACKENDS)
def test_input_gradient_of_asymmetric_padding_is_laid_out_as_f_conv2d_gives_it(name, memory_format, weight_format):
    """padding='same' with an even kernel pads the bottom / right pixel explicitly; the input's
    gradient is then, as F.conv2d's, a tensor of the input's size, laid out as F.conv2d's with a
    weight in the plain weight's format (channels_last when either is), not a view into the padded
    input's gradient (which would keep that alive)."""
    case = Case("same-even", MOSAIC, 3, (2, 4), hw=(5, 6), conv=dict(padding="same"))
    (x, akp, weight, bias), layout = case.tensors(torch.float64)
    require(name, case.problem(x, akp, layout))
    x = x.contiguous(memory_format=memory_format)
    weight = weight.detach().contiguous(memory_format=weight_format).requires_grad_()
    _, (grad_x, *_) = case.run(name, x, akp, weight, bias, layout)
    w = torch.randn(len(MOSAIC), 3, 2, 4, dtype=x.dtype, device=x.device).contiguous(memory_format=weight_format)
    expected = torch.autograd.grad(F.conv2d(x.requires_grad_(), w, padding="same").sum(), x)[0]
    assert grad_x.stride() == expected.stride()
    assert expected.is_contiguous(memory_format=torch.channels_last if torch.channels_last in (
        memory_format, weight_format) else torch.contiguous_format)
    assert grad_x.untyped_storage().nbytes() == x.untyped_storage().nbytes()


@pytest.mark.parametrize("name", BACKENDS)
def test_same_padding_of_an_even_kernel_on_a_one_pixel_input(name):
    """'same' with an even kernel on an input one pixel high (and one wide): F.conv2d pads the one
    extra row or column explicitly, so the input is large enough; every backend runs it, as the
    reference does, to round-off (the fused backend once asked ATen about the unpadded size)."""
    for hw in ((1, 4), (3, 1)):
        case = Case("same-even-1px", MOSAIC, 2, (2, 2), hw=hw, conv=dict(padding="same"))
        (x, akp, weight, bias), layout = case.tensors(torch.float64)
        require(name, case.problem(x, akp, layout))
        y, grads = case.run(name, x, akp, weight, bias, layout)
        y_ref, grads_ref = case.reference(x, akp, weight, bias, layout)
        assert y.shape == (2, len(MOSAIC), *hw)
        for got, want in zip([y, *grads], [y_ref, *grads_ref]):
            assert rel_err(got, want) <= TOL[torch.float64]


@pytest.mark.parametrize("name", BACKENDS)
def test_all_plain_layer_uses_every_parameter(name):
    """An all-plain layout (the default one for a single output channel) still has its empty akp
    parameter in the graph, with an empty gradient: DDP's default (find_unused_parameters=False)
    and autograd.grad over parameters() need every parameter used."""
    m = AnalyticConv2d(3, 1, 3, backend=name, dtype=torch.float64, device=DEVICE)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64, device=DEVICE)
    require(name, make_problem(m.akp, m.layout, m.kernel_size, x, ConvArgs.make()))
    assert m.layout.num_analytic == 0
    grads = torch.autograd.grad(m(x).sum(), list(m.parameters()))
    assert grads[0].shape == m.akp.shape == (0, 3, 6)


#: triton_fused launches its own convolution kernels from Python, which FlopCounterMode (a dispatcher
#: mode) never sees: it counts nothing for that backend (README).
FLOP_COUNTED_BACKENDS = [name for name in BACKENDS if name != "triton_fused"]


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")  # nn.Conv2d's own
@pytest.mark.parametrize("input_grad", [True, False], ids=["x-grad", "no-x-grad"])
@pytest.mark.parametrize("case", [CASES[3], CASES[2], CASES[5]], ids=lambda c: c.id)
@pytest.mark.parametrize("name", FLOP_COUNTED_BACKENDS)
def test_flop_counter_counts_what_it_counts_for_nn_conv2d(name, case, input_grad):
    """torch.utils.flop_counter.FlopCounterMode gives a forward + backward through the layer the
    count it gives nn.Conv2d of the same shape (convolutions only, per op kind: forward, backward),
    with and without the input's gradient."""
    from torch.utils.flop_counter import FlopCounterMode
    (x, akp, weight, bias), layout = case.tensors(torch.float32)
    require(name, case.problem(x, akp, layout))
    m = AnalyticConv2d(case.c_in, layout.out_channels, case.kernel_size, layout=layout, backend=name, device=DEVICE,
                       **case.conv)
    conv = torch.nn.Conv2d(case.c_in, layout.out_channels, case.kernel_size, device=DEVICE, **case.conv)
    x.requires_grad_(input_grad)
    counts = []
    for layer in (m, conv):
        with FlopCounterMode(display=False) as counter:
            layer(x).sum().backward()
        per_op = counter.get_flop_counts()["Global"]
        counts.append(sorted((("backward" in str(op)), n) for op, n in per_op.items()))
    assert counts[0] == counts[1] and counts[1][0][1] > 0


@pytest.mark.parametrize("wanted", ["x", "akp", "weight", "bias"])
@pytest.mark.parametrize("name", BACKENDS)
def test_needs_input_grad_subsets(name, wanted):
    """Only one input requires grad: the backend computes exactly that gradient."""
    case = Case("subset", MOSAIC, 3, (3, 3), conv=dict(padding=1))
    (x, akp, weight, bias), layout = case.tensors(torch.float64)
    require(name, case.problem(x, akp, layout))
    inputs = dict(x=x, akp=akp, weight=weight, bias=bias)
    inputs[wanted] = inputs[wanted].clone().requires_grad_()
    y = acl_conv2d(inputs["x"], inputs["akp"], inputs["weight"], layout, inputs["bias"], padding=1, backend=name)
    (g,) = torch.autograd.grad(y.sum(), inputs[wanted])
    _, grads_ref = case.reference(x, akp, weight, bias, layout)
    ref_inputs = [t.double().requires_grad_() for t in (x, akp, weight, bias)]
    y_ref = acl_conv2d(*ref_inputs[:3], layout, ref_inputs[3], padding=1, backend="reference")
    g_ref = torch.autograd.grad(y_ref.sum(), ref_inputs[["x", "akp", "weight", "bias"].index(wanted)])[0]
    assert rel_err(g, g_ref) <= TOL[torch.float64]


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("name", BACKENDS)
def test_autocast(name, low):
    """SPEC §6: under autocast W is synthesized in float32 and the convolution runs in the low
    precision, like nn.Conv2d; params' grads stay float32; within 1e-2 of the float64 oracle."""
    case = Case("autocast", MOSAIC, 8, (3, 3), conv=dict(padding=1))
    (x, akp, weight, bias), layout = case.tensors(torch.float32)
    with torch.autocast(DEVICE.type, dtype=low):
        problem = make_problem(akp, layout, case.kernel_size, x, ConvArgs.make(padding=1), autocast_dtype=low)
        require(name, problem)
        y, grads = case.run(name, x, akp, weight, bias, layout)
    assert y.dtype == low
    y_ref, grads_ref = case.reference(x, akp, weight, bias, layout)
    assert rel_err(y, y_ref) <= TOL[low]
    for what, g, g_ref in zip(("x", "akp", "weight", "bias"), grads, grads_ref):
        assert g.dtype == torch.float32, what
        assert rel_err(g, g_ref) <= TOL[low], f"grad {what}"


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("name", BACKENDS)
def test_low_precision_parameters_synthesized_in_float32(name, low):
    """float16/bfloat16 parameters: W is synthesized in float32 and rounded once."""
    case = Case("lowp", MOSAIC, 3, (5, 5))
    (_, akp, weight, _), layout = case.tensors(low)
    require(name, make_problem(akp, layout, case.kernel_size))
    w = synthesize(akp, weight, layout, case.kernel_size, backend=name)
    assert w.dtype == low
    once = reference.synthesize(akp.double(), weight.double(), layout, case.kernel_size).to(low)
    # Rounded once from an exact value: at most one unit in the last place away from the
    # correctly rounded float64 result (float32 synthesis differs from float64 far below that).
    ulp = torch.finfo(low).eps * once.double().abs().clamp_min(torch.finfo(low).tiny)
    assert torch.all((w.double() - once.double()).abs() <= ulp)


@pytest.mark.parametrize("name", BACKENDS)
def test_module_with_backend_matches_reference_module(name):
    torch.manual_seed(0)
    ref = AnalyticConv2d(4, 9, 3, stride=2, padding=1, layout=MOSAIC, dtype=torch.float64, device=DEVICE)
    fast = AnalyticConv2d(4, 9, 3, stride=2, padding=1, layout=MOSAIC, backend=name, dtype=torch.float64,
                          device=DEVICE)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64, device=DEVICE)
    require(name, make_problem(fast.akp, fast.layout, fast.kernel_size, x, ConvArgs.make(2, 1)))
    ref(x).square().sum().backward()
    fast(x).square().sum().backward()
    for (n, p), (_, q) in zip(ref.named_parameters(), fast.named_parameters()):
        assert rel_err(q.grad, p.grad) <= TOL[torch.float64], n


#: Every family, small enough for gradgradcheck through interpreted Triton; 'same' with an even
#: kernel pads asymmetrically.
DOUBLE_BACKWARD_CASE = Case("dbl", MOSAIC[:8], 1, (3, 2), hw=(4, 3), batch=1, conv=dict(padding="same"))
#: Backends whose gradgradcheck runs in fast mode (random projections of the Jacobians) where Triton
#: is interpreted: the full mode took 110 s for triton_fused's conv, 23 s for triton's (2-core CPU).
INTERPRETED_GRADGRADCHECK = {"triton", "triton_fused"} if DEVICE.type == "cpu" else set()


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
@pytest.mark.parametrize("name", BACKENDS)
def test_gradgradcheck_conv_float64(name):
    """SPEC §6: every backend claims double backward (the fast ones through
    acl_fused/backends/double_backward.py), so every one passes gradgradcheck: second derivatives
    in x, akp, weight, bias and the output gradient."""
    case = DOUBLE_BACKWARD_CASE
    (x, akp, weight, bias), layout = case.tensors(torch.float64)
    require(name, case.problem(x, akp, layout))
    leaves = [t.clone().requires_grad_() for t in (x, akp, weight, bias)]
    assert torch.autograd.gradgradcheck(
        lambda x, a, w, b: acl_conv2d(x, a, w, layout, b, backend=name, **case.conv), leaves, eps=1e-6, atol=1e-7,
        fast_mode=name in INTERPRETED_GRADGRADCHECK)


@pytest.mark.parametrize("name", BACKENDS)
def test_gradgradcheck_synthesize_float64(name):
    case = DOUBLE_BACKWARD_CASE
    (_, akp, weight, _), layout = case.tensors(torch.float64)
    require(name, make_problem(akp, layout, case.kernel_size))
    leaves = [akp.clone().requires_grad_(), weight.clone().requires_grad_()]
    assert torch.autograd.gradgradcheck(
        lambda a, w: synthesize(a, w, layout, case.kernel_size, backend=name), leaves, eps=1e-6, atol=1e-7,
        fast_mode=name in INTERPRETED_GRADGRADCHECK)


@pytest.mark.parametrize("penalised", ["x", "akp", "weight", "bias", "all"])
@pytest.mark.parametrize("name", BACKENDS)
def test_gradient_penalty_matches_reference(name, penalised):
    """A gradient penalty (the squared norm of some first-order gradients, e.g. R1's on the input)
    through two layers: the parameters' and the input's gradients equal the reference's in float64.
    Each choice leaves the other second-order terms out (a gradient the penalty does not use)."""
    torch.manual_seed(0)
    x0 = torch.randn(2, 3, 7, 6, dtype=torch.float64, device=DEVICE)

    def penalty_grads(backend: str) -> list[torch.Tensor]:
        torch.manual_seed(1)
        net = torch.nn.Sequential(
            AnalyticConv2d(3, 9, 3, stride=2, padding=(1, 0), layout=MOSAIC, backend=backend, dtype=torch.float64,
                           device=DEVICE),
            torch.nn.Softplus(),
            AnalyticConv2d(9, 5, (2, 3), padding="same", backend=backend, dtype=torch.float64, device=DEVICE))
        x = x0.clone().requires_grad_()
        second = net[2]
        wrt = {"x": [x], "akp": [second.akp], "weight": [second.weight], "bias": [second.bias],
               "all": [x, *net.parameters()]}[penalised]
        grads = torch.autograd.grad(net(x).pow(3).sum(), wrt, create_graph=True)
        sum(g.square().sum() for g in grads).backward()
        return [torch.zeros_like(t) if t.grad is None else t.grad for t in (x, *net.parameters())]

    require(name, make_problem(torch.zeros(1, 3, 6, dtype=torch.float64, device=DEVICE), as_layout(MOSAIC), (3, 3),
                               x0, ConvArgs.make(2)))
    for got, want in zip(penalty_grads(name), penalty_grads("reference")):
        assert rel_err(got, want) <= TOL[torch.float64]


@pytest.mark.parametrize("akps", ["nan-amplitude", "overflowing-wavelength"])
@pytest.mark.parametrize("name", BACKENDS)
def test_plain_weight_penalty_ignores_the_akps(name, akps):
    """A penalty on the plain weights' gradient does not depend on the AKPs (which want no
    gradient): an analytic channel whose AKPs are NaN, or overflow (lambda = exp(1000)) where its
    kernel stays finite, leaves the penalty's derivative in x finite, the reference's."""
    gabor = [math.nan, 0.3, 0.2, 0.0, 1.0, 0.4] if akps == "nan-amplitude" else [0.5, 0.3, 0.2, 0.0, 1000.0, 0.4]
    akp = torch.tensor([[gabor, gabor]], dtype=torch.float64, device=DEVICE)
    torch.manual_seed(2)
    weight0 = torch.randn(1, 2, 3, 3, dtype=torch.float64, device=DEVICE)
    x0 = torch.randn(1, 2, 6, 5, dtype=torch.float64, device=DEVICE)
    layout = as_layout([F_.PLAIN, F_.GABOR])
    require(name, make_problem(akp, layout, (3, 3), x0, ConvArgs.make(padding=1)))
    grad_y = torch.randn(1, 2, 6, 5, dtype=torch.float64, device=DEVICE)  # independent of y, NaN there

    def penalty_grad(backend: str) -> torch.Tensor:
        x, weight = x0.clone().requires_grad_(), weight0.clone().requires_grad_()
        y = acl_conv2d(x, akp, weight, layout, padding=1, backend=backend)
        (grad_weight,) = torch.autograd.grad(y, weight, grad_y, create_graph=True)
        return torch.autograd.grad(grad_weight.square().sum(), x)[0]

    got, want = penalty_grad(name), penalty_grad("reference")
    assert want.isfinite().all() and rel_err(got, want) <= TOL[torch.float64]


@pytest.mark.parametrize("name", BACKENDS)
def test_torch_compile_matches_eager(name):
    """A compiled AnalyticConv2d (aot_eager: the graphs Inductor would get, without its minutes of
    compilation here) gives the eager forward and gradients. fullgraph for native and reference;
    not claimed for the Triton backends (interpreted kernels are kept eager on purpose, a graph
    break each, and their compiled kernels have not been traced on a GPU yet)."""
    torch.manual_seed(0)
    layer = AnalyticConv2d(3, 9, 3, padding="same", layout=MOSAIC, backend=name, dtype=torch.float64, device=DEVICE)
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64, device=DEVICE)
    require(name, make_problem(layer.akp, layer.layout, layer.kernel_size, x, ConvArgs.make(padding="same")))
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=name in ("native", "reference"))
    results = []
    for f in (layer, compiled):
        layer.zero_grad()
        y = f(x)
        y.square().sum().backward()
        results.append([y.detach()] + [p.grad.clone() for p in layer.parameters()])
    for eager, comp in zip(*results):
        assert rel_err(comp, eager) <= TOL[torch.float64]


def test_auto_runs_and_unknown_backend_lists_every_reason():
    case = Case("auto", MOSAIC, 3, (3, 3), conv=dict(padding=1))
    (x, akp, weight, bias), layout = case.tensors(torch.float32)
    y = acl_conv2d(x, akp, weight, layout, bias, padding=1)
    y_ref = acl_conv2d(x, akp, weight, layout, bias, padding=1, backend="reference")
    assert rel_err(y, y_ref.double()) <= TOL[torch.float32]
    with pytest.raises(BackendUnavailable, match="unknown backend 'nope'") as info:
        acl_conv2d(x, akp, weight, layout, bias, backend="nope")
    assert all(name in str(info.value) for name in dispatch.BACKENDS)


# -- random combinations ---------------------------------------------------------------------
#: Cases per backend: interpreted Triton on CPU is slow, and its shapes are kept small.
RANDOM_SEEDS = {"native": 40, "triton": 8, "triton_fused": 8, "reference": 4}


def random_call(seed: int, small: bool) -> tuple[Case, torch.dtype, str, str]:
    """(case, dtype, input layout, plain weight layout) drawn from ``seed``: kernel sizes (square,
    non-square, even), groups, stride, dilation, every padding form, channel counts off the CPU
    tiles' 8 lanes, and a random mosaic, which the cases above cover one at a time."""
    rng = random.Random(seed)
    kh, kw = rng.choice([(1, 1), (3, 3), (3, 3), (2, 2), (4, 3), (1, 5), (5, 5), (7, 7), (3, 2)])
    groups = rng.choice([1, 1, 2, 3])
    cg = rng.choice([1, 3, 5] if small else [1, 3, 7, 8, 9, 17])
    layout = [rng.choice(list(Family)) for _ in range(groups * rng.choice([1, 2, 5]))]
    stride, dilation = (rng.choice([1, 2]), rng.choice([1, 2, 3])), (rng.choice([1, 2]), rng.choice([1, 1, 2]))
    padding = rng.choice(["same", "valid", rng.randint(0, 3), (rng.randint(0, 2), rng.randint(0, 3))])
    if padding == "same":
        stride = (1, 1)
    pad = (0, 0) if isinstance(padding, str) else (padding, padding) if isinstance(padding, int) else padding
    hw = tuple(max(1, d * (k - 1) + 1 - 2 * p) + rng.randint(0, 3 if small else 6)
               for k, d, p in zip((kh, kw), dilation, pad))
    case = Case(f"random{seed}", layout, groups * cg, (kh, kw), hw=hw, batch=rng.randint(1, 3),
                conv=dict(stride=stride, padding=padding, dilation=dilation, groups=groups), bias=rng.random() < 0.5)
    return (case, rng.choice([torch.float64, torch.float32]), rng.choice(["nchw", "channels_last", "strided"]),
            rng.choice(["nchw", "channels_last"]))


@pytest.mark.parametrize("name,seed", [(n, s) for n, count in RANDOM_SEEDS.items() for s in range(count)],
                         ids=lambda v: str(v))
def test_random_call_matches_reference(name, seed):
    case, dtype, input_layout, weight_layout = random_call(seed, small=name.startswith("triton"))
    (x, akp, weight, bias), layout = case.tensors(dtype, seed=seed)
    require(name, case.problem(x, akp, layout))
    if input_layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif input_layout == "strided":
        x = torch.stack([x, -x], dim=-1)[..., 0]  # same values, a strided view
    if weight is not None and weight_layout == "channels_last":
        weight = weight.contiguous(memory_format=torch.channels_last)
    y, grads = case.run(name, x, akp, weight, bias, layout)
    y_ref, grads_ref = case.reference(x, akp, weight, bias, layout)
    assert y.dtype == dtype and y.shape == y_ref.shape
    assert rel_err(y, y_ref) <= TOL[dtype], f"{case}: output"
    for what, g, g_ref in zip(("x", "akp", "weight", "bias"), grads, grads_ref):
        if g_ref is not None:
            assert g.shape == g_ref.shape and rel_err(g, g_ref) <= TOL[dtype], f"{case}: grad {what}"
