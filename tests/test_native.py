"""The native backend (csrc/, acl_fused/backends/native.py) at kernel level.

tests/test_backends.py runs the public API against every backend; this file checks what is
specific to the C++ / CUDA ops: each op against the reference in float64 for every family, odd /
even / non-square kernels and mosaics mixing all seven families; the CPU's float32 SIMD tiles,
their remainders, their fallback, wide AKP ranges and NaN, and the AVX2 object's symbols; the
split of a slice over CUDA lanes (on the host); half / bfloat16 computed in
float32 and rounded once; output masks; argument checks; torch.library.opcheck on every op;
the C++ autograd (csrc/autograd.cpp): what it saves, the gradients it asks for, None for the rest;
double backward's recording, its dual-number kernel against the composite, third order and row
check; the why-not reasons (extension
missing, built without CUDA, dtype); torch.compile; and, on a GPU, CUDA against CPU.
"""
from __future__ import annotations

import concurrent.futures
import ctypes
import math
import importlib
import inspect
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from acl_fused import AnalyticConv2d, BackendUnavailable, Family, dispatch, reference
from acl_fused.backends import native
from acl_fused.conv_args import ConvArgs
from acl_fused.families import AKP_COUNT, AKP_NAMES
from acl_fused.layout import Layout
from acl_fused.validation import Problem, make_problem
from acl_cases import TOL, Case
from benchmarks.timing import peak_memory
from conftest import rel_err, skip_or_fail_unavailable

F_ = Family
#: All seven families, interleaved, two of some (rows of one family are not contiguous).
MOSAIC = [F_.LOT, F_.PLAIN, F_.TGD2, F_.GABOR, F_.MEAN, F_.PLAIN, F_.LOG, F_.TGD1, F_.GABOR, F_.TGD2, F_.PLAIN]
#: Odd, even and non-square kernels; 1, 2, 4, 8, 16 and 32 CUDA lanes per slice (a lane a mirror
#: pair up to 32: 11x11's 61 pairs leave 29 lanes two and 3 one).
KERNEL_SIZES = [(1, 1), (1, 2), (2, 2), (3, 3), (4, 4), (3, 5), (5, 2), (7, 7), (8, 6), (11, 11)]
ANALYTIC = [f for f in Family if f != F_.PLAIN]
LOW = [torch.float16, torch.bfloat16]
ops = torch.ops.acl_fused
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def extension():
    """Skips (or fails, where CI requires the backend) when acl_fused._C is not built."""
    if native.EXTENSION_ERROR is not None:
        skip_or_fail_unavailable("native", native.EXTENSION_ERROR)


def make_inputs(codes, cg: int, kernel_size, dtype=torch.float64, device="cpu", seed: int = 0):
    """(akp [A, cg, 6], weight [P, cg, kH, kW] or None, layout) with generic AKPs: the module's
    initialisation plus noise, so every slice has its own orientation and scales."""
    torch.manual_seed(seed)
    m = AnalyticConv2d(cg, len(codes), kernel_size, layout=list(codes), dtype=torch.float64)
    akp = m.akp.detach() + 0.3 * torch.randn_like(m.akp)
    weight = None if m.weight is None else m.weight.detach()
    return (akp.to(device, dtype), None if weight is None else weight.to(device, dtype), m.layout)


def layout_args(layout: Layout, device="cpu"):
    t = layout.tensors(device)
    return t["family_i32"], t["row_i32"]


def reference_grads(akp, weight, layout, kernel_size, grad_w):
    """(W, grad_akp, grad_weight) of the float64 oracle for the output gradient grad_w."""
    leaves = [akp.double().requires_grad_()] + ([] if weight is None else [weight.double().requires_grad_()])
    w = reference.synthesize_layout(leaves[0], leaves[1] if weight is not None else None, layout, kernel_size)
    grads = torch.autograd.grad(w, leaves, grad_w.double(), allow_unused=True, materialize_grads=True)
    return w.detach(), grads[0], (grads[1] if weight is not None else None)


def used_slots(layout: Layout) -> torch.Tensor:
    """[A, 1, 6] bool: the AKP slots each analytic row's family reads."""
    used = torch.zeros(layout.num_analytic, 1, 6, dtype=torch.bool)
    for r, o in enumerate(layout.analytic_channels):
        used[r, :, : AKP_COUNT[Family(layout.codes[o])]] = True
    return used


# -- kernels vs the float64 reference ----------------------------------------------------------
@pytest.mark.parametrize("kernel_size", KERNEL_SIZES, ids=str)
@pytest.mark.parametrize("codes", [[f, F_.PLAIN, f] for f in ANALYTIC] + [MOSAIC],
                         ids=[f.name for f in ANALYTIC] + ["mosaic"])
def test_synthesis_kernels_match_reference_float64(extension, codes, kernel_size):
    akp, weight, layout = make_inputs(codes, 3, kernel_size)
    family, row = layout_args(layout)
    w = ops.synthesize(akp, weight, family, row, list(kernel_size))
    torch.manual_seed(1)
    grad_w = torch.randn(w.shape, dtype=torch.float64)
    w_ref, grad_akp_ref, grad_weight_ref = reference_grads(akp, weight, layout, kernel_size, grad_w)
    assert w.dtype == torch.float64 and w.shape == w_ref.shape
    assert rel_err(w, w_ref) <= 1e-13
    grad_akp, grad_weight = ops.synthesize_backward(grad_w, akp, family, row, [True, True])
    assert grad_akp.shape == akp.shape and rel_err(grad_akp, grad_akp_ref) <= 1e-12
    # Per slot too, so a wrong small derivative cannot hide behind a large one.
    for k in range(6):
        assert rel_err(grad_akp[..., k], grad_akp_ref[..., k]) <= 1e-11, f"slot {k}"
    assert torch.all(grad_akp[~used_slots(layout).expand_as(grad_akp)] == 0)
    assert torch.equal(grad_weight, grad_w[list(layout.plain_channels)])


def test_lot_kink_takes_the_active_branch(extension):
    """SPEC §4: at r = ρ exactly the max(0, .) branch is inactive (zero derivative), as relu's."""
    akp = torch.zeros(1, 1, 6, dtype=torch.float64)
    akp[0, 0, 0] = 1.0
    akp[0, 0, 1] = torch.log(torch.tensor(1.0 - 1e-3, dtype=torch.float64))  # ρ = 1: grid points at r = 1
    layout = Layout([F_.LOT])
    family, row = layout_args(layout)
    grad_w = torch.ones(1, 1, 3, 3, dtype=torch.float64)
    grad_akp, _ = ops.synthesize_backward(grad_w, akp, family, row, [True, False])
    _, grad_ref, _ = reference_grads(akp, None, layout, (3, 3), grad_w)
    assert torch.allclose(grad_akp, grad_ref, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kernel_size", [(3, 3), (4, 5)], ids=str)
def test_float32_kernels_within_spec_tolerance(extension, kernel_size):
    akp, weight, layout = make_inputs(MOSAIC, 4, kernel_size)
    family, row = layout_args(layout)
    torch.manual_seed(2)
    grad_w = torch.randn(len(MOSAIC), 4, *kernel_size, dtype=torch.float64)
    w_ref, grad_akp_ref, grad_weight_ref = reference_grads(akp, weight, layout, kernel_size, grad_w)
    w = ops.synthesize(akp.float(), weight.float(), family, row, list(kernel_size))
    grad_akp, grad_weight = ops.synthesize_backward(grad_w.float(), akp.float(), family, row, [True, True])
    assert w.dtype == grad_akp.dtype == grad_weight.dtype == torch.float32
    assert rel_err(w, w_ref) <= 1e-5
    assert rel_err(grad_akp, grad_akp_ref) <= 1e-5
    assert rel_err(grad_weight, grad_weight_ref) <= 1e-5


@pytest.mark.parametrize("low", LOW, ids=str)
def test_low_precision_computed_in_float32_rounded_once(extension, low):
    """half / bfloat16 run the float32 code on the upcast values, then round once: bitwise the
    float32 kernel's result rounded."""
    akp, weight, layout = make_inputs(MOSAIC, 3, (5, 4), dtype=low)
    family, row = layout_args(layout)
    w = ops.synthesize(akp, weight, family, row, [5, 4])
    assert w.dtype == low
    assert torch.equal(w, ops.synthesize(akp.float(), weight.float(), family, row, [5, 4]).to(low))
    grad_w = torch.randn(w.shape).to(low)
    grads = ops.synthesize_backward(grad_w, akp, family, row, [True, True])
    grads32 = ops.synthesize_backward(grad_w.float(), akp.float(), family, row, [True, True])
    for g, g32 in zip(grads, grads32):
        assert g.dtype == low and torch.equal(g, g32.to(low))


def test_output_mask_skips_outputs(extension):
    akp, weight, layout = make_inputs(MOSAIC, 2, (3, 3))
    family, row = layout_args(layout)
    grad_w = torch.randn(len(MOSAIC), 2, 3, 3, dtype=torch.float64)
    full_akp, full_weight = ops.synthesize_backward(grad_w, akp, family, row, [True, True])
    only_akp = ops.synthesize_backward(grad_w, akp, family, row, [True, False])
    only_weight = ops.synthesize_backward(grad_w, akp, family, row, [False, True])
    assert torch.equal(only_akp[0], full_akp) and only_akp[1].shape == (0,)
    assert only_weight[0].shape == (0,) and torch.equal(only_weight[1], full_weight)


@pytest.mark.parametrize("codes", [[F_.GABOR, F_.MEAN, F_.LOT], [F_.PLAIN, F_.PLAIN]], ids=["no-plain", "no-analytic"])
def test_all_analytic_and_all_plain(extension, codes):
    akp, weight, layout = make_inputs(codes, 2, (3, 2))
    family, row = layout_args(layout)
    w = ops.synthesize(akp, weight, family, row, [3, 2])
    assert torch.allclose(w, reference.synthesize_layout(akp, weight, layout, (3, 2)), rtol=1e-13, atol=1e-15)
    grad_w = torch.randn_like(w)
    grad_akp, grad_weight = ops.synthesize_backward(grad_w, akp, family, row, [True, True])
    assert grad_akp.shape == akp.shape
    assert grad_weight.shape == (layout.num_plain, 2, 3, 2)


# -- CPU SIMD tiles (csrc/cpu/synthesis_avx2.cpp) ------------------------------------------------
#: Input channels per group around the 8-slice tile: one slice (always run one at a time), a
#: partial tile, one full tile, a full tile plus a one-slice remainder, two plus one.
SIMD_CG = [1, 7, 8, 9, 17]
#: Grid points around the 8-point transpose blocks: 1, 6 (none), 8 (one), 9 and 15 (one plus a
#: remainder), 16 (two), 20; 121, the most a tile takes, and 132, which runs one slice at a time.
#: Odd and even point counts: a centre that is its own mirror, or none.
SIMD_KERNELS = [(1, 1), (2, 3), (2, 4), (3, 3), (5, 3), (4, 4), (4, 5), (11, 11), (12, 11)]
REPO = Path(__file__).resolve().parents[1]


def simd_tiles_active() -> bool:
    """Whether float32 CPU synthesis runs the AVX2 tiles in this process: built into acl_fused._C
    (x86-64, GCC) and ATen runs its own AVX2 kernels here (a CPU with AVX2 and FMA, and no
    ATEN_CPU_CAPABILITY=default), the conditions csrc/cpu/synthesis_cpu.cpp checks."""
    lib = ctypes.CDLL(importlib.import_module("acl_fused._C").__file__)
    built = hasattr(lib, "_ZN9acl_fused3cpu16kAvx2TileKernelsE")  # acl_fused::cpu::kAvx2TileKernels
    return built and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


@pytest.mark.parametrize("kernel_size", SIMD_KERNELS, ids=str)
@pytest.mark.parametrize("cg", SIMD_CG)
def test_float32_simd_tiles_match_reference_per_family(extension, cg, kernel_size):
    """Every family in full tiles, partial tiles and one-slice remainders, with and without grid
    points left after the 8-point blocks. Each family's rows of W and each used AKP slot's
    gradient meet SPEC's float32 bound on their own, so one wrong lane, point or slot cannot hide
    behind the rest."""
    codes = list(Family) * 2
    akp, weight, layout = make_inputs(codes, cg, kernel_size)
    family, row = layout_args(layout)
    torch.manual_seed(3)
    grad_w = torch.randn(len(codes), cg, *kernel_size, dtype=torch.float64)
    w_ref, grad_akp_ref, _ = reference_grads(akp, weight, layout, kernel_size, grad_w)
    w = ops.synthesize(akp.float(), weight.float(), family, row, list(kernel_size))
    grad_akp, grad_weight = ops.synthesize_backward(grad_w.float(), akp.float(), family, row, [True, True])
    for f in Family:
        channels = [o for o, code in enumerate(codes) if code == f]
        assert rel_err(w[channels], w_ref[channels]) <= 1e-5, f.name
        if f != F_.PLAIN:
            rows = [layout.row[o] for o in channels]
            for k in range(AKP_COUNT[f]):
                assert rel_err(grad_akp[rows, :, k], grad_akp_ref[rows, :, k]) <= 1e-5, f"{f.name} slot {k}"
    assert torch.all(grad_akp[~used_slots(layout).expand_as(grad_akp)] == 0)
    assert torch.equal(grad_weight, grad_w.float()[list(layout.plain_channels)])


def wide_range_akps(codes, cg: int) -> torch.Tensor:
    """float64 raw AKPs [A, cg, 6] for an all-analytic layout ``codes``: amplitudes N(0, 1), angles
    and phases in (-3 pi, 3 pi), raw scales in [-3, 5] (sigma, gamma, rho from 0.05 to 150 pixels)
    and raw wavelengths in [0, 5] (lambda >= 1 pixel: shorter ones put phases where float32 itself
    cannot meet 1e-5)."""
    akp = torch.empty(len(codes), cg, 6, dtype=torch.float64)
    for r, f in enumerate(codes):
        for k, name in enumerate(AKP_NAMES[f]):
            low, high = {"a": (0, 0), "theta": (-3 * math.pi, 3 * math.pi), "psi": (-3 * math.pi, 3 * math.pi),
                         "s_lambda": (0, 5)}.get(name, (-3, 5))
            akp[r, :, k] = torch.randn(cg, dtype=torch.float64) if name == "a" else torch.empty(
                cg, dtype=torch.float64).uniform_(low, high)
    return akp


@pytest.mark.parametrize("kernel_size", [(3, 3), (4, 5)], ids=str)
def test_float32_simd_tiles_over_wide_akp_ranges(extension, kernel_size):
    """Scales from a twentieth of a pixel to far beyond the kernel, any angle and phase: the tiles'
    exp and sincos over the arguments they meet, underflow included. Each family's W and AKP
    gradients meet SPEC's float32 bound, and every slice of W on its own meets it too, or where
    float32 itself cannot (an exp of -50 carries 50 times the rounding of its argument), stays
    within twice the error of the reference formula evaluated in float32."""
    codes = ANALYTIC * 4
    torch.manual_seed(5)
    akp = wide_range_akps(codes, 16)
    layout = Layout([int(f) for f in codes])
    family, row = layout_args(layout)
    grad_w = torch.randn(len(codes), 16, *kernel_size, dtype=torch.float64)
    w_ref, grad_ref, _ = reference_grads(akp, None, layout, kernel_size, grad_w)
    w = ops.synthesize(akp.float(), None, family, row, list(kernel_size)).double()
    grad_akp, _ = ops.synthesize_backward(grad_w.float(), akp.float(), family, row, [True, False])
    w_float32_formula = reference.synthesize_layout(akp.float(), None, layout, kernel_size).double()

    def slice_err(v):
        return (v - w_ref).flatten(2).norm(dim=2)

    assert torch.all(slice_err(w) <= torch.maximum(1e-5 * w_ref.flatten(2).norm(dim=2),
                                                   2 * slice_err(w_float32_formula)) + 1e-30)
    for f in ANALYTIC:
        rows = [r for r, code in enumerate(codes) if code == f]
        assert rel_err(w[rows], w_ref[rows]) <= 1e-5, f.name
        for k in range(AKP_COUNT[f]):
            assert rel_err(grad_akp[rows, :, k], grad_ref[rows, :, k]) <= 1e-5, f"{f.name} slot {k}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_nan_amplitudes_and_scales_give_nan_slices_like_the_reference(extension, dtype):
    """NaN in an amplitude or in a scale that goes through exp (sigma) makes exactly the slices NaN
    that the reference makes NaN, in the SIMD tiles (float32) and one slice at a time (float64)."""
    codes = ANALYTIC * 2
    torch.manual_seed(6)
    akp = wide_range_akps(codes, 16)
    for r, f in enumerate(codes):
        names = AKP_NAMES[f]
        akp[r, 3, 0] = math.nan
        if "s_sigma" in names:
            akp[r, 9, names.index("s_sigma")] = math.nan
    layout = Layout([int(f) for f in codes])
    family, row = layout_args(layout)
    w_ref = reference.synthesize_layout(akp, None, layout, (3, 3))
    w = ops.synthesize(akp.to(dtype), None, family, row, [3, 3])
    assert torch.isnan(w_ref).any()
    assert torch.equal(torch.isnan(w), torch.isnan(w_ref))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda_only)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_1x1_kernels_take_stand_in_constants_for_tame_slices_only(extension, request, dtype, device):
    """A 1x1 kernel is its centre, where pos() and the rotation only meet zeros: tame slices are
    synthesized from stand-in constants (csrc/families.h StandIns). A NaN or infinite angle or scale,
    or a scale beyond the tame bound, takes the AKPs' own constants: W and the AKP gradients have
    NaN exactly where the reference has, and match it elsewhere. Each such slice is the only one of
    its SIMD tile (8 slices of a row) that is not tame. CUDA runs the same families.h code."""
    if device == "cuda":
        request.getfixturevalue("cuda_kernels")
    codes = ANALYTIC * 2
    torch.manual_seed(7)
    akp = wide_range_akps(codes, 48)
    wild = {3: ("a", math.nan), 9: ("s_sigma", math.nan), 21: ("theta", math.inf), 28: ("s_gamma", math.inf),
            29: ("s_rho", math.inf), 33: ("s_lambda", math.nan), 41: ("s_sigma", 15.0), 45: ("s_rho", -math.inf)}
    for r, f in enumerate(codes):
        for c, (name, value) in wild.items():
            if name in AKP_NAMES[f]:
                akp[r, c, AKP_NAMES[f].index(name)] = value
    layout = Layout([int(f) for f in codes])
    family, row = layout_args(layout, device)
    grad_w = torch.randn(len(codes), 48, 1, 1, dtype=torch.float64)
    w_ref, grad_ref, _ = reference_grads(akp, None, layout, (1, 1), grad_w)
    a, g = akp.to(device, dtype), grad_w.to(device, dtype)
    w = ops.synthesize(a, None, family, row, [1, 1]).cpu()
    grad_akp = ops.synthesize_backward(g, a, family, row, [True, False])[0].cpu()
    used = used_slots(layout).expand_as(grad_ref)
    grad_akp, grad_ref = grad_akp[used], grad_ref[used]
    assert torch.isnan(w_ref).any() and torch.isnan(grad_ref).any()
    assert torch.equal(torch.isnan(w), torch.isnan(w_ref))
    assert torch.equal(torch.isnan(grad_akp), torch.isnan(grad_ref))
    tol = {torch.float32: 1e-5, torch.float64: 1e-12}[dtype]
    assert rel_err(w.nan_to_num(), w_ref.nan_to_num()) <= tol
    assert rel_err(grad_akp.nan_to_num(), grad_ref.nan_to_num()) <= tol


def synthesis_outputs(akp, weight, family, row, grad_w):
    """(W, grad_akp, grad_weight) of the CPU ops for a 3x3 kernel."""
    return (ops.synthesize(akp, weight, family, row, [3, 3]),
            *ops.synthesize_backward(grad_w, akp, family, row, [True, True]))


def test_float32_without_simd_runs_one_slice_at_a_time(extension, tmp_path):
    """ATEN_CPU_CAPABILITY=default turns the SIMD tiles off, as it does ATen's own vector kernels:
    full tiles then give bitwise what one-channel calls (always one slice at a time) give. With
    the tiles on, results differ from those in rounding only."""
    akp, weight, layout = make_inputs(MOSAIC, 9, (3, 3), dtype=torch.float32)
    family, row = layout_args(layout)
    torch.manual_seed(4)
    grad_w = torch.randn(len(MOSAIC), 9, 3, 3)
    per_slice = [synthesis_outputs(akp[:, c:c + 1], weight[:, c:c + 1], family, row, grad_w[:, c:c + 1])
                 for c in range(9)]
    one_at_a_time = [torch.cat(parts, dim=1) for parts in zip(*per_slice)]

    inputs, outputs = tmp_path / "inputs.pt", tmp_path / "outputs.pt"
    torch.save((akp, weight, family, row, grad_w), inputs)
    script = ("import sys, torch\n"
              "from acl_fused.backends import native  # registers the ops\n"
              "akp, weight, family, row, grad_w = torch.load(sys.argv[1])\n"
              "ops = torch.ops.acl_fused\n"
              "torch.save((ops.synthesize(akp, weight, family, row, [3, 3]),\n"
              "            *ops.synthesize_backward(grad_w, akp, family, row, [True, True])), sys.argv[2])\n")
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    subprocess.run([sys.executable, "-c", script, str(inputs), str(outputs)], env=env, check=True)
    for what, fallback, expected in zip(("W", "grad_akp", "grad_weight"), torch.load(outputs), one_at_a_time):
        assert torch.equal(fallback, expected), what

    here = synthesis_outputs(akp, weight, family, row, grad_w)
    assert torch.equal(here[2], one_at_a_time[2])  # plain rows are copied either way
    w_ref, grad_akp_ref, _ = reference_grads(akp, weight, layout, (3, 3), grad_w)
    for out in (here, one_at_a_time):
        assert rel_err(out[0], w_ref) <= 1e-5 and rel_err(out[1], grad_akp_ref) <= 1e-5
    if simd_tiles_active():
        assert not torch.equal(here[0], one_at_a_time[0]), "the SIMD tiles did not run"


def test_families_split_over_cuda_lanes_as_one_lane(tmp_path):
    """The CUDA kernels split each slice's mirror pairs over lanes and add the lanes' finished AKP
    gradients; tests/cpp/lane_split_check.cpp runs that split of families.h on the host for every
    family, kernels up to 8x8 and 1-32 lanes (the kernels themselves only run on a GPU)."""
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("needs g++ to build tests/cpp/lane_split_check.cpp")
    from torch.utils import cpp_extension

    exe = tmp_path / "lane_split_check"
    include = [f"-I{p}" for p in [REPO / "csrc", *cpp_extension.include_paths()]]
    subprocess.run([cxx, "-std=c++17", "-O1", *include, str(REPO / "tests/cpp/lane_split_check.cpp"), "-o", str(exe)],
                   check=True, capture_output=True)
    run = subprocess.run([str(exe)], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stdout[-2000:]


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="the AVX2 tiles are built on x86-64 only")
def test_avx2_object_shares_no_code_with_the_rest(tmp_path):
    """synthesis_avx2.cpp is compiled for AVX2 in an extension that must load and run on any
    x86-64 CPU. Every symbol its object exports is its own kernel table or in ATen's at::vec::AVX2
    namespace: no inline function shared with the other objects, which the linker could pick for
    code that runs without AVX2. Its static initialiser, run at load time on any CPU, has no
    VEX-encoded (AVX) instruction."""
    tools = {name: shutil.which(name) for name in ("g++", "nm", "objdump")}
    if None in tools.values():
        pytest.skip(f"needs g++ and binutils to inspect the object; missing: {[n for n, p in tools.items() if not p]}")
    from torch.utils import cpp_extension

    obj = tmp_path / "synthesis_avx2.o"
    include = [f"-I{p}" for p in [REPO / "csrc", *cpp_extension.include_paths()]]
    # The C++ standard torch's extension builds use (as scripts/compile_cuda_objects.sh).
    std = "c++20" if "-std=c++20" in inspect.getsource(cpp_extension) else "c++17"
    subprocess.run([tools["g++"], f"-std={std}", "-O3", "-fPIC", *include, "-c",
                    str(REPO / "csrc/cpu/synthesis_avx2.cpp"), "-o", str(obj)], check=True, capture_output=True)
    symbols = subprocess.run([tools["nm"], "--defined-only", "--extern-only", "-C", str(obj)], check=True,
                             capture_output=True, text=True).stdout.splitlines()
    names = [line.split(" ", 2)[2] for line in symbols if line.strip()]
    assert "acl_fused::cpu::kAvx2TileKernels" in names
    assert [n for n in names if n != "acl_fused::cpu::kAvx2TileKernels" and "at::vec::AVX2::" not in n] == []
    disassembly = subprocess.run([tools["objdump"], "-d", "--no-show-raw-insn", str(obj)], check=True,
                                 capture_output=True, text=True).stdout
    initialisers = [block for block in disassembly.split("\n\n") if "<_GLOBAL__sub_I_" in block]
    mnemonics = [line.split("\t")[1].split()[0] for block in initialisers for line in block.splitlines()
                 if line.count("\t") >= 1 and ":" in line.split("\t")[0]]
    assert [m for m in mnemonics if m.startswith("v")] == []


# -- argument checks -----------------------------------------------------------------------------
def test_bad_arguments_raise_clear_errors(extension):
    akp, weight, layout = make_inputs(MOSAIC, 2, (3, 3))
    family, row = layout_args(layout)
    with pytest.raises(RuntimeError, match="akp must have shape"):
        ops.synthesize(akp[..., :5], weight, family, row, [3, 3])
    with pytest.raises(RuntimeError, match="weight must have shape"):
        ops.synthesize(akp, weight, family, row, [3, 2])
    with pytest.raises(RuntimeError, match="family must be a 1-D int32"):
        ops.synthesize(akp, weight, family.long(), row, [3, 3])
    with pytest.raises(RuntimeError, match="same dtype"):
        ops.synthesize(akp, weight.float(), family, row, [3, 3])
    bad_code = family.clone()
    bad_code[0] = 7
    with pytest.raises(RuntimeError, match=r"family\[0\] = 7 is not a family code"):
        ops.synthesize(akp, weight, bad_code, row, [3, 3])
    repeated = row.clone()
    repeated[layout.analytic_channels[1]] = row[layout.analytic_channels[0]]
    with pytest.raises(RuntimeError, match="out of range or used twice"):
        ops.synthesize_backward(torch.zeros(len(MOSAIC), 2, 3, 3, dtype=torch.float64), akp, family, repeated,
                                [True, True])


def test_raw_ops_check_every_size_they_read(extension):
    """The raw ops check what the module never gets wrong but a direct call can, before any kernel
    reads it (found with ASan / UBSan): a grad_W without width (the tiles divided by it: SIGFPE),
    a kernel_size of one int (read past it), a weight that does not match kernel_size where the
    backward needs no W, a grad_output of the wrong batch (float64's convolution backward read past
    it and returned garbage), a zero stride."""
    akp, weight, layout = make_inputs(MOSAIC, 3, (3, 3))
    family, row = layout_args(layout)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    grad_y = torch.randn(2, len(MOSAIC), 8, 8, dtype=torch.float64)
    no_width = torch.randn(len(MOSAIC), 3, 3, 0, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="grad_W's kH and kW must be two positive ints, got 3 x 0"):
        ops.synthesize_backward(no_width, akp, family, row, [True, True])
    with pytest.raises(RuntimeError, match="grad_W's kH and kW must be two positive ints"):
        ops.synthesize_backward_jvp(akp, None, no_width, akp, family, row, [True, True])

    def backward(grad_output=grad_y, kernel_size=(3, 3), stride=(1, 1), dilation=(1, 1),
                 mask=(True, True, True, False)):
        return ops.acl_conv2d_backward(grad_output, x, akp, weight, family, row, list(kernel_size), list(stride),
                                       [1] * 4, list(dilation), 1, list(mask))
    with pytest.raises(RuntimeError, match=r"kernel_size must be two positive ints, got \[3\]"):
        backward(kernel_size=(3,))
    with pytest.raises(RuntimeError, match=r"weight must have shape \[P, 3, 1, 1\], got \[3, 3, 3, 3\]"):
        backward(kernel_size=(1, 1), mask=(False, False, True, False))
    with pytest.raises(RuntimeError, match=r"grad_output must have shape \[2, 11, 8, 8\], got \[1, 11, 8, 8\]"):
        backward(grad_output=grad_y[:1])
    with pytest.raises(RuntimeError, match="stride and dilation must be pairs of positive ints"):
        backward(stride=(0, 1))
    with pytest.raises(RuntimeError, match=r"padded input \(10 x 10\) is smaller than the dilated kernel \(11 x 11\)"):
        backward(dilation=(5, 5))
    with pytest.raises(RuntimeError, match="kernel_size 70000 x 70000 has more than 2\\^31 - 1 points"):
        ops.synthesize(akp[:, :0], weight[:, :0, :1, :1].expand(-1, -1, 70000, 70000), family, row, [70000, 70000])
    grads = backward()   # and the sizes the checks want are the right ones
    assert [tuple(g.shape) for g in grads[:3]] == [tuple(x.shape), tuple(akp.shape), tuple(weight.shape)]


def test_synthesis_reads_akp_at_any_storage_offset(extension):
    """The AVX2 tiles load an AKP row's last two slots as one 8-byte word: an akp starting at an odd
    float offset (a view) must give the same W and gradients as a copy of it."""
    akp, weight, layout = make_inputs(MOSAIC, 9, (3, 3), dtype=torch.float32)
    family, row = layout_args(layout)
    shifted = torch.empty(akp.numel() + 1)[1:].view(akp.shape).copy_(akp)
    assert shifted.storage_offset() == 1
    torch.testing.assert_close(ops.synthesize(shifted, weight, family, row, [3, 3]),
                               ops.synthesize(akp, weight, family, row, [3, 3]), rtol=0, atol=0)
    grad_W = torch.randn(len(MOSAIC), 9, 3, 3)
    for got, want in zip(ops.synthesize_backward(grad_W, shifted, family, row, [True, True]),
                         ops.synthesize_backward(grad_W, akp, family, row, [True, True])):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


# -- opcheck: schema, fake kernels, autograd registration, AOT dispatch ---------------------------
def opcheck_samples():
    """(id, codes, dtype, kernel_size, conv args, input shape, what is channels_last, bias)."""
    return [
        ("mosaic-f64-same-even", MOSAIC, torch.float64, (2, 4), dict(padding="same", groups=1), (2, 3, 6, 7), (),
         True),
        ("mosaic-f32-cl-groups", MOSAIC[:10], torch.float32, (3, 3), dict(padding=1, stride=2, groups=2),
         (1, 4, 7, 6), ("x", "weight"), True),
        # the layer moved to channels_last, its input not (W, and so the output, channels_last); a
        # 1x1 weight is channels_last by its strides only
        ("mosaic-f32-weight-cl-1x1", MOSAIC, torch.float32, (1, 1), dict(stride=2), (2, 3, 5, 4), ("weight",),
         True),
        # unequal sides ('same', even kernel) with a channels_last weight: the input gradient, cloned
        # out of the padded input's, channels_last
        ("mosaic-f32-weight-cl-same-even", MOSAIC, torch.float32, (2, 2), dict(padding="same"), (2, 3, 5, 6),
         ("weight",), False),
        ("bf16-dilated", MOSAIC, torch.bfloat16, (3, 2), dict(padding=(2, 1), dilation=2), (2, 2, 8, 5), (),
         False),
        ("no-plain", [F_.TGD1, F_.GABOR, F_.LOG], torch.float64, (3, 3), dict(padding="valid"), (1, 2, 5, 5),
         (), True),
        ("no-analytic", [F_.PLAIN] * 3, torch.float32, (1, 3), {}, (2, 2, 4, 4), (), True),
        ("batch0", MOSAIC, torch.float64, (3, 3), dict(padding=1), (0, 2, 5, 5), (), True),
    ]


@pytest.mark.parametrize("sample", opcheck_samples(), ids=lambda s: s[0])
def test_opcheck_every_op(extension, sample):
    _, codes, dtype, kernel_size, conv_kw, x_shape, channels_last, with_bias = sample
    conv = ConvArgs.make(**conv_kw)
    cg = x_shape[1] // conv.groups
    akp, weight, layout = make_inputs(codes, cg, kernel_size, dtype=dtype)
    family, row = layout_args(layout)
    x = torch.randn(x_shape, dtype=dtype)
    if "x" in channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if "weight" in channels_last:  # as module.to(memory_format=...) makes it (a 1x1 weight restrided)
        weight = weight.to(memory_format=torch.channels_last)
    bias = torch.randn(len(codes), dtype=dtype) if with_bias else None
    conv_args = [list(kernel_size), list(conv.stride), list(conv.explicit_padding(kernel_size)),
                 list(conv.dilation), conv.groups]
    grad = [t.requires_grad_() for t in (x, akp, weight, bias) if t is not None]
    torch.library.opcheck(ops.synthesize.default, (akp, weight, family, row, list(kernel_size)))
    torch.library.opcheck(ops.acl_conv2d.default, (x, akp, weight, family, row, bias, *conv_args))
    for t in grad:
        t.requires_grad_(False)
    grad_w = torch.randn(len(codes), cg, *kernel_size, dtype=dtype)
    for mask in ([True, True], [False, True]):
        torch.library.opcheck(ops.synthesize_backward.default, (grad_w, akp, family, row, mask))
        torch.library.opcheck(ops.synthesize_backward_jvp.default,
                              (torch.randn_like(akp), weight if weight is None else torch.randn_like(weight), grad_w,
                               akp, family, row, mask))
    y = ops.acl_conv2d(x, akp, weight, family, row, bias, *conv_args)
    for mask in ([True, True, weight is not None, with_bias], [False, True, False, False],
                 [False, False, weight is not None, False]):
        torch.library.opcheck(ops.acl_conv2d_backward.default,
                              (torch.randn_like(y), x, akp, weight, family, row, *conv_args, mask))


# -- autograd -------------------------------------------------------------------------------------
def test_backward_saves_inputs_only_and_recomputes_w(extension):
    """SPEC §7: nothing but the inputs is stored for the backward (W is recomputed)."""
    akp, weight, layout = make_inputs(MOSAIC, 2, (3, 3))
    x = torch.randn(2, 2, 6, 5, dtype=torch.float64, requires_grad=True)
    akp.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = native.conv2d(x, akp, weight, layout, None, ConvArgs.make(padding=1), (3, 3))
        w = native.synthesize(akp, weight, layout, (3, 3))
    family, row = layout_args(layout)
    inputs = {t.data_ptr() for t in (x, akp, weight, family, row)}
    assert saved and all(t.data_ptr() in inputs for t in saved)
    assert not any(t.shape == w.shape for t in saved)
    y.sum().backward()
    assert x.grad is not None and akp.grad is not None


#: float64 native vs float64 oracle: round-off only (tighter than TOL, which is for every backend).
FLOAT64_BOUND = 1e-12


@pytest.mark.parametrize("conv", [{"padding": "same", "dilation": 2}, {"stride": 2, "padding": (2, 1), "groups": 2}],
                         ids=str)
def test_bound_conv2d_is_f_conv2d_of_w(extension, conv):
    """native.bind_conv2d (what a module's call plan runs) is F.conv2d with W: output and
    gradients, asymmetric 'same' padding, stride, dilation and groups included."""
    args = ConvArgs.make(**conv)
    akp, weight, layout = make_inputs(MOSAIC + [F_.PLAIN], 2, (4, 3))   # 12 channels: groups of 2
    akp.requires_grad_(), weight.requires_grad_()
    x = torch.randn(2, 2 * args.groups, 7, 6, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(layout.out_channels, dtype=torch.float64, requires_grad=True)
    inputs = (x, akp, weight, bias)
    y = native.bind_conv2d(layout, args, (4, 3), x.device)(x, akp, weight, bias)
    want = torch.nn.functional.conv2d(x, native.synthesize(akp, weight, layout, (4, 3)), bias, args.stride,
                                      args.padding, args.dilation, args.groups)
    grad = torch.randn_like(want)
    assert rel_err(y, want) <= FLOAT64_BOUND
    for g, g_want in zip(torch.autograd.grad(y, inputs, grad), torch.autograd.grad(want, inputs, grad)):
        assert rel_err(g, g_want) <= FLOAT64_BOUND


def native_matches_reference_on_cpu(case: Case, dtype: torch.dtype, seed: int = 0,
                                    memory_format=torch.contiguous_format):
    """Runs ``case`` through the native backend on CPU tensors (input and plain weight in
    ``memory_format``) and asserts output and gradients against the float64 oracle (SPEC §6).
    Returns the (akp, weight, layout) it used."""
    (x, akp, weight, bias), layout = case.tensors(dtype, seed)
    x, akp, weight, bias = (None if t is None else t.cpu() for t in (x, akp, weight, bias))
    x, weight = x.contiguous(memory_format=memory_format), weight.contiguous(memory_format=memory_format)
    y, grads = case.run("native", x, akp, weight, bias, layout)
    y_ref, grads_ref = case.reference(x, akp, weight, bias, layout)
    bound = FLOAT64_BOUND if dtype == torch.float64 else TOL[dtype]
    assert rel_err(y, y_ref) <= bound
    assert all(rel_err(g, g_ref) <= bound for g, g_ref in zip(grads, grads_ref))
    return akp, weight, layout


def test_conv_weight_buffer_follows_size_and_dtype_changes(extension):
    """On the CPU the convolution's W is synthesized into a buffer reused from call to call
    (csrc/cpu/synthesis_cpu.cpp): layers of growing and shrinking W and of both dtypes, called in
    turn, forward and backward, still equal the reference."""
    layers = [(3, (3, 3), torch.float64), (9, (5, 4), torch.float64), (2, (3, 3), torch.float32),
              (9, (5, 4), torch.float32), (3, (2, 2), torch.float64)]
    for _ in range(2):
        for seed, (cg, kernel_size, dtype) in enumerate(layers):
            case = Case(f"buffer{seed}", MOSAIC, cg, kernel_size, hw=(7, 6), conv={"padding": 1})
            native_matches_reference_on_cpu(case, dtype, seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_cpu_kernels_split_over_threads_as_on_one(extension, dtype, memory_format):
    """The CPU kernels cut the tiles into one contiguous share per thread of equal estimated cost
    and work on runs of a row (csrc/cpu/synthesis_cpu.cpp for_each_run). With 1, 2, 3 and 24
    threads (33 rows of mixed families: the shares' edges fall mid-row, and with 24 threads some
    shares hold a few tiles only), W, the AKP gradient and the plain-weight gradient are bitwise
    those of one thread, and W matches the reference."""
    codes = MOSAIC * 3  # 33 rows, plain ones in between analytic ones
    akp, weight, layout = make_inputs(codes, 150, (3, 3), dtype=dtype)
    weight = weight.contiguous(memory_format=memory_format)
    family, row = layout_args(layout)
    grad_w = torch.randn(len(codes), 150, 3, 3, dtype=dtype).contiguous(memory_format=memory_format)
    threads = torch.get_num_threads()
    outputs = []
    try:
        for n in (1, 2, 3, 24):
            torch.set_num_threads(n)
            outputs.append((ops.synthesize(akp, weight, family, row, [3, 3]),
                            *ops.synthesize_backward(grad_w, akp, family, row, [True, True])))
    finally:
        torch.set_num_threads(threads)
    for out in outputs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(out, outputs[0]))
    w_ref = reference.synthesize_layout(akp.double(), weight.double(), layout, (3, 3))
    assert rel_err(outputs[0][0], w_ref) <= (FLOAT64_BOUND if dtype == torch.float64 else TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("cg, kernel_size", [(16, (3, 3)), (11, (2, 4)), (3, (3, 1))])
def test_channels_last_weights_and_gradients_are_read_and_written_in_place(extension, dtype, cg, kernel_size):
    """The CPU kernels take channels_last tensors as they are: a channels_last plain weight (what
    module.to(memory_format=torch.channels_last) makes), the channels_last W synthesized for a
    channels_last input, and the channels_last weight gradient oneDNN gives back. Full SIMD tiles
    (16 channels), partial ones (11) and one slice at a time (float64; 3 channels) against the
    float64 reference."""
    cl = torch.channels_last
    case = Case("channels_last", MOSAIC, cg, kernel_size, hw=(7, 6), conv={"padding": 1})
    akp, weight, layout = native_matches_reference_on_cpu(case, dtype, memory_format=cl)
    # The ops alone: a channels_last weight in, a channels_last weight gradient in.
    family, row = layout_args(layout)
    with torch.no_grad():
        w = ops.synthesize(akp, weight, family, row, list(kernel_size))
        w_ref = reference.synthesize_layout(akp.double(), weight.double(), layout, kernel_size)
        assert w.is_contiguous() and rel_err(w, w_ref) <= (FLOAT64_BOUND if dtype == torch.float64 else TOL[dtype])
        grad_w = torch.randn_like(w).contiguous(memory_format=cl)
        grad_akp, grad_weight = ops.synthesize_backward(grad_w, akp, family, row, [True, True])
        expected = ops.synthesize_backward(grad_w.contiguous(), akp, family, row, [True, True])
    assert torch.equal(grad_akp, expected[0]) and torch.equal(grad_weight, expected[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_backward_w_from_the_akp_gradient_pass_is_the_forward_w(extension, dtype, memory_format):
    """With grad_input and the AKP gradient both wanted, the CPU backward synthesizes W in the pass
    that computes the AKP gradient (csrc/acl_conv2d.cpp); without the AKP gradient it synthesizes W
    alone. Both must give the same grad_input (the same W, up to rounding)."""
    akp, weight, layout = make_inputs(MOSAIC, 16, (3, 3), dtype=dtype)
    x = torch.randn(2, 16, 6, 5, dtype=dtype).contiguous(memory_format=memory_format)
    conv = ConvArgs.make(padding=1)
    grad_x = {}
    for with_akp in (True, False):
        leaves = [t.detach().requires_grad_(want) for t, want in ((x, True), (akp, with_akp), (weight, False))]
        y = native.conv2d(*leaves, layout, None, conv, (3, 3))
        y.backward(torch.ones_like(y))
        grad_x[with_akp] = leaves[0].grad
    assert rel_err(grad_x[True], grad_x[False]) <= (1e-14 if dtype == torch.float64 else 1e-6)


@pytest.mark.parametrize("larger_layer_first", [False, True], ids=["W-over-grad_W", "W-into-buffer"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_cpu_backward_holds_no_w_beside_the_weight_gradient(extension, memory_format, larger_layer_first):
    """The CPU backward's peak memory is aten.convolution_backward's (the same convolution with a
    plain W: grad_input and the weight gradient) plus the parameter gradients, which it holds while
    grad_input's convolution runs. Not more: no W-sized block is held beside the weight gradient
    then. W is written over the weight gradient, which replaces the thread's W buffer (the old one
    freed), where the buffer is no larger (a fresh thread's first layer), and goes into the buffer,
    the weight gradient freed, where it is (after a larger layer). (csrc/cpu/synthesis_cpu.cpp;
    writing W over the weight gradient and keeping the buffer held one W more.)"""
    # A shape where grad_input's convolution plus one W needs more than the weight gradient's
    # convolution (in both formats), so that a W held beside the weight gradient shows.
    akp, weight, layout = make_inputs(MOSAIC * 6, 64, (3, 3), dtype=torch.float32)
    family, row = layout_args(layout)
    x = torch.randn(8, 64, 14, 14).contiguous(memory_format=memory_format)
    w = native.synthesize(akp, weight, layout, (3, 3)).contiguous(memory_format=memory_format)
    grad_y = torch.randn(8, w.shape[0], 14, 14).contiguous(memory_format=memory_format)
    mask = [True, True, True, False]

    def acl_backward():
        return ops.acl_conv2d_backward(grad_y, x, akp, weight, family, row, [3, 3], [1, 1], [1] * 4, [1, 1], 1, mask)

    def plain_backward(output_mask):
        return lambda: torch.ops.aten.convolution_backward(grad_y, x, w, None, [1, 1], [1, 1], [1, 1], False,
                                                           [0, 0], 1, output_mask)

    def measure():
        if larger_layer_first:
            big = make_inputs(MOSAIC * 12, 64, (3, 3), dtype=torch.float32)
            ops.acl_conv2d_backward(torch.cat([grad_y, grad_y], 1), x, big[0], big[1], *layout_args(big[2]), [3, 3],
                                    [1, 1], [1] * 4, [1, 1], 1, mask)
        return acl_backward(), [peak_memory(f, torch.device("cpu")) for f in
                                (acl_backward, plain_backward([False, True, False]), plain_backward([True, False, False]))]

    # In a thread of its own: the W buffers are per thread, and a new thread has none.
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        (_, grad_akp, grad_weight, _), peaks = pool.submit(measure).result()
    if None in peaks:
        pytest.skip("torch's profiler has no allocation event tree here (benchmarks.timing.peak_memory)")
    param_grads = grad_akp.nbytes + grad_weight.nbytes
    assert peaks[0] <= max(peaks[1], peaks[2]) + param_grads, (peaks, param_grads, w.nbytes)


@pytest.mark.parametrize("batch", [4, 48])
@pytest.mark.parametrize("kernel", [3, 1])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_strided_cpu_backward_peak_memory(extension, memory_format, kernel, batch):
    """A strided layer's CPU backward against aten.convolution_backward's peak (both gradients of
    the same convolution with a plain W, one call; csrc/acl_conv2d.cpp input_gradient_first).
    Batch 4: the parameter gradients are more than 5% of the input (and W is smaller than it), so
    grad_input comes first, before they exist, and the peak is the convolution's (the weight
    gradient first held them at oneDNN's strided grad_input peak: +5..9% here). Batch 48: they are
    less, the order with a synthesis pass fewer holds them, and the peak stays within the
    convolution's + 5%."""
    akp, weight, layout = make_inputs(MOSAIC * 6, 32, (kernel, kernel), dtype=torch.float32)
    family, row = layout_args(layout)
    x = torch.randn(batch, 32, 28, 28).contiguous(memory_format=memory_format)
    w = native.synthesize(akp, weight, layout, (kernel, kernel)).contiguous(memory_format=memory_format)
    pad = kernel // 2
    grad_y = torch.randn_like(torch.nn.functional.conv2d(x, w, None, 2, pad))
    mask = [True, True, True, False]
    peaks = [peak_memory(f, torch.device("cpu")) for f in (
        lambda: ops.acl_conv2d_backward(grad_y, x, akp, weight, family, row, [kernel] * 2, [2, 2], [pad] * 4,
                                        [1, 1], 1, mask),
        lambda: torch.ops.aten.convolution_backward(grad_y, x, w, None, [2, 2], [pad] * 2, [1, 1], False, [0, 0], 1,
                                                    [True, True, False]))]
    if None in peaks:
        pytest.skip("torch's profiler has no allocation event tree here (benchmarks.timing.peak_memory)")
    param_grad_bytes = akp.nbytes + weight.nbytes
    if batch == 4:
        assert param_grad_bytes * 20 > x.nbytes > w.nbytes
        assert peaks[0] <= peaks[1], peaks
    else:
        assert param_grad_bytes * 20 <= x.nbytes
        assert peaks[0] <= 1.05 * peaks[1], (peaks, param_grad_bytes)


@pytest.mark.parametrize("mask", [[True, True, True, False], [False, False, True, False]], ids=["fused", "weight-only"])
def test_plain_weight_gradient_has_the_weights_layout(extension, mask):
    """acl_conv2d_backward gives the plain weight's gradient the weight's own layout (what
    at::empty_like(weight) makes: a channels_last parameter, a channels_last gradient), so autograd
    need not copy it; its values are those of a contiguous weight's. "fused": W and the AKP
    gradient in one pass (the CPU kernels write this layout); "weight-only": the other path (a copy)."""
    cl = torch.channels_last
    akp, weight, layout = make_inputs(MOSAIC, 16, (3, 3), dtype=torch.float32)
    family, row = layout_args(layout)
    x = torch.randn(2, 16, 6, 5).contiguous(memory_format=cl)
    args = [[3, 3], [1, 1], [1, 1, 1, 1], [1, 1], 1]
    grad_y = torch.randn_like(ops.acl_conv2d(x, akp, weight, family, row, None, *args))
    grads = {fmt: ops.acl_conv2d_backward(grad_y, x, akp, weight.contiguous(memory_format=fmt), family, row, *args,
                                          mask)[2]
             for fmt in (cl, torch.contiguous_format)}
    assert grads[cl].stride() == weight.contiguous(memory_format=cl).stride() != weight.stride()
    assert grads[torch.contiguous_format].stride() == weight.stride()
    assert rel_err(grads[cl], grads[torch.contiguous_format].double()) <= 1e-6


def test_autograd_kernels_are_the_cpp_ones(extension):
    """Every op's autograd is registered at the Autograd key by csrc/autograd.cpp (C++, one
    registration for every device), not in Python (torch.library.register_autograd re-packs the
    arguments and runs a Python autograd.Function on every call)."""
    for name in ("synthesize", "synthesize_backward", "acl_conv2d", "acl_conv2d_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"acl_fused::{name}", "Autograd"), name
        autograd = [line for line in torch._C._dispatch_dump(f"acl_fused::{name}").splitlines()
                    if line.startswith("Autograd")]
        assert len(autograd) == 1 and "csrc/autograd.cpp" in autograd[0], (name, autograd)


class RecordMasks(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the output_mask each backward op is called with (below autograd)."""

    def __init__(self):
        super().__init__()
        self.masks = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (ops.synthesize_backward.default, ops.acl_conv2d_backward.default):
            self.masks[func.__name__.split(".")[0]] = list(args[-1])
        return func(*args, **(kwargs or {}))


#: (which of input, akp, weight, bias require grad, whether weight and bias are given).
GRAD_CASES = [(wants, True) for wants in [(True, True, True, True), (False, True, False, False),
                                          (True, False, False, False), (False, False, True, True),
                                          (False, False, False, True)]]
GRAD_CASES += [(wants, False) for wants in [(True, True, True, True), (False, True, False, False),
                                            (True, False, True, True)]]


@pytest.mark.parametrize("wants, with_weight_and_bias", GRAD_CASES,
                         ids=["".join("xawb"[i] for i in range(4) if w[i]) + ("" if wb else "-no-weight-no-bias")
                              for w, wb in GRAD_CASES])
def test_gradients_only_where_needed(extension, wants, with_weight_and_bias):
    """The C++ autograd asks the backward op for exactly the gradients autograd needs (its
    output_mask), returns them right (float64 reference) and gives None, never an empty tensor,
    for the rest: absent weight / bias included."""
    codes = MOSAIC if with_weight_and_bias else [F_.GABOR, F_.TGD1, F_.LOT]
    akp, weight, layout = make_inputs(codes, 2, (3, 2))
    family, row = layout_args(layout)
    torch.manual_seed(5)
    x = torch.randn(2, 2, 6, 5, dtype=torch.float64)
    bias = torch.randn(len(codes), dtype=torch.float64) if with_weight_and_bias else None
    conv = ConvArgs.make(padding="same")
    conv_args = [[3, 2], list(conv.stride), list(conv.explicit_padding((3, 2))), list(conv.dilation), conv.groups]
    leaves = [t if t is None else t.clone().requires_grad_(want) for t, want in zip((x, akp, weight, bias), wants)]
    y = ops.acl_conv2d(leaves[0], leaves[1], leaves[2], family, row, leaves[3], *conv_args)
    grad_y = torch.randn_like(y)
    with RecordMasks() as record:
        y.backward(grad_y)
    present = [t is not None and t.requires_grad for t in leaves]
    assert record.masks == {"acl_conv2d_backward": present}

    ref_leaves = [None if t is None else t.detach().clone().requires_grad_() for t in (x, akp, weight, bias)]
    y_ref = reference.conv2d_layout(ref_leaves[0], ref_leaves[1], ref_leaves[2], layout, ref_leaves[3], conv, (3, 2))
    y_ref.backward(grad_y)
    assert rel_err(y, y_ref) <= 1e-12
    for name, t, ref, needed in zip(("input", "akp", "weight", "bias"), leaves, ref_leaves, present):
        if needed:
            assert t.grad.shape == t.shape and rel_err(t.grad, ref.grad) <= 1e-12, name
        elif t is not None:
            assert t.grad is None, name

    # synthesize: the same for (akp, weight).
    leaves = [t if t is None else t.detach().clone().requires_grad_(want) for t, want in zip((akp, weight), wants[1:3])]
    if not any(t is not None and t.requires_grad for t in leaves):
        return
    w = ops.synthesize(leaves[0], leaves[1], family, row, [3, 2])
    grad_w = torch.randn_like(w)
    with RecordMasks() as record:
        w.backward(grad_w)
    present = [t is not None and t.requires_grad for t in leaves]
    assert record.masks == {"synthesize_backward": present}
    _, grad_akp_ref, grad_weight_ref = reference_grads(akp, weight, layout, (3, 2), grad_w)
    for name, t, ref, needed in zip(("akp", "weight"), leaves, (grad_akp_ref, grad_weight_ref), present):
        if needed:
            assert t.grad.shape == t.shape and rel_err(t.grad, ref) <= 1e-12, name
        elif t is not None:
            assert t.grad is None, name


def test_first_order_backward_records_no_graph_and_create_graph_does(extension):
    """A plain backward runs the backward op below autograd (nothing saved for a second
    derivative); create_graph=True records its steps as differentiable ops (the AKP gradient from
    synthesize_backward, whose own backward is the double-backward op)."""
    akp, weight, layout = make_inputs(MOSAIC, 2, (3, 3))
    akp.requires_grad_()
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64)
    y = native.conv2d(x, akp, weight, layout, None, ConvArgs.make(), (3, 3))
    (g,) = torch.autograd.grad(y.square().sum(), akp, retain_graph=True)
    assert g.grad_fn is None
    (g,) = torch.autograd.grad(y.square().sum(), akp, create_graph=True)
    assert g.grad_fn.name().endswith("SynthesizeBackwardFunction>")


def test_third_order_gradgradcheck_float64(extension):
    """Double backward's results are differentiable again (the composite ops record what they
    compute): gradgradcheck of a function that returns first-order gradients checks the third
    derivatives."""
    akp, weight, layout = make_inputs(MOSAIC[:8], 1, (3, 2))
    x = torch.randn(1, 1, 4, 3, dtype=torch.float64)
    conv = ConvArgs.make(stride=(1, 2), padding=1)

    def gradients(x, akp, weight):
        y = native.conv2d(x, akp, weight, layout, None, conv, (3, 2))
        return torch.autograd.grad(y.pow(3).sum(), (x, akp, weight), create_graph=True)

    leaves = [t.clone().requires_grad_() for t in (x, akp, weight)]
    assert torch.autograd.gradgradcheck(gradients, leaves, eps=1e-6, atol=1e-6)


def test_double_backward_takes_any_row_map_and_third_order_the_layouts(extension):
    """The raw ops take any one-to-one row map, and so does double backward's kernel. The composite
    that a recorded double backward (third order) runs rebuilds the Layout from family, so there a
    map other than the layout's is refused by name instead of mixing rows up."""
    akp, weight, layout = make_inputs([F_.GABOR, F_.LOG, F_.PLAIN], 2, (3, 3))
    family, row = layout_args(layout)
    swapped = row.clone()
    swapped[:2] = swapped[:2].flip(0)  # the two analytic channels exchange their akp rows

    def second_order(akp, row, create_graph=False):
        akp = akp.detach().requires_grad_()
        w = ops.synthesize(akp, weight, family, row, [3, 3])
        (g,) = torch.autograd.grad(w.pow(3).sum(), akp, create_graph=True)
        return torch.autograd.grad(g.square().sum(), akp, create_graph=create_graph)[0]

    assert rel_err(second_order(akp, swapped), second_order(akp.flip(0), row).flip(0)) <= 1e-14
    with pytest.raises(ValueError, match="double backward needs row = the layout's row"):
        second_order(akp, swapped, create_graph=True)


# -- double backward's kernel: synthesize_backward_jvp ------------------------------------------
def composite_double_backward(gg_akp, gg_weight, grad_w, akp, layout, mask=(True, True)):
    """synthesize_double_backward, the composite op (autograd through the reference formulas)."""
    return ops.synthesize_double_backward(gg_akp, gg_weight, grad_w, akp, *layout_args(layout, akp.device),
                                          list(mask))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda_only)])
@pytest.mark.parametrize("kernel_size", [(1, 1), (2, 3), (3, 3), (5, 4)], ids=str)
def test_synthesize_backward_jvp_is_synthesis_double_backward(extension, request, kernel_size, device):
    """synthesize_backward_jvp (families.h's pass in dual numbers, csrc/dual.h), what double backward
    runs where nothing records a graph, gives synthesize_double_backward's results (the composite's:
    autograd twice through the reference formulas) for every family: float64 to round-off, float32
    within TOL of the float64 composite, each tangent given or None, each output alone."""
    if device == "cuda":
        request.getfixturevalue("cuda_kernels")
    akp, weight, layout = make_inputs(MOSAIC * 2, 3, kernel_size, device=device)
    torch.manual_seed(8)
    grad_w = torch.randn(layout.out_channels, 3, *kernel_size, dtype=torch.float64, device=device)
    gg_akp, gg_weight = torch.randn_like(akp), torch.randn_like(weight)
    family, row = layout_args(layout, device)
    for tangents in ((gg_akp, gg_weight), (gg_akp, None), (None, gg_weight)):
        want = composite_double_backward(*tangents, grad_w, akp, layout)
        got = ops.synthesize_backward_jvp(*tangents, grad_w, akp, family, row, [True, True])
        for g, w, name in zip(got, want, ("W", "akp")):
            assert g.dtype == torch.float64 and rel_err(g, w) <= 1e-13, name
        got32 = ops.synthesize_backward_jvp(*(None if t is None else t.float() for t in tangents), grad_w.float(),
                                            akp.float(), family, row, [True, True])
        for g, w, name in zip(got32, want, ("W", "akp")):
            assert g.dtype == torch.float32 and rel_err(g, w) <= TOL[torch.float32], name
    for mask, kept in (([True, False], 0), ([False, True], 1)):
        got = ops.synthesize_backward_jvp(gg_akp, gg_weight, grad_w, akp, family, row, mask)
        want = composite_double_backward(gg_akp, gg_weight, grad_w, akp, layout)
        assert got[1 - kept].shape == (0,) and rel_err(got[kept], want[kept]) <= 1e-13


def test_synthesize_backward_jvp_keeps_nan_where_the_composite_has_it(extension):
    """NaN amplitudes and scales: NaN wherever the composite has NaN, more only in slices with a NaN
    AKP (dual numbers multiply a NaN by a zero tangent where autograd has no term: Mean's a / kk),
    and the composite's values elsewhere (wide AKP ranges, 3x3 and 1x1, whose tame slices take
    stand-in constants)."""
    codes = ANALYTIC * 2
    torch.manual_seed(9)
    akp = wide_range_akps(codes, 16)
    for r, f in enumerate(codes):
        akp[r, 3, 0] = math.nan
        if "s_sigma" in AKP_NAMES[f]:
            akp[r, 9, AKP_NAMES[f].index("s_sigma")] = math.nan
    layout = Layout([int(f) for f in codes])
    for kernel_size in ((3, 3), (1, 1)):
        grad_w = torch.randn(len(codes), 16, *kernel_size, dtype=torch.float64)
        gg_akp = torch.randn_like(akp)
        want = composite_double_backward(gg_akp, None, grad_w, akp, layout)
        got = ops.synthesize_backward_jvp(gg_akp, None, grad_w, akp, *layout_args(layout), [True, True])
        nan_slices = torch.isnan(akp).any(2)  # [A, 16]
        for g, w in zip(got, want):
            nan, extra = torch.isnan(w), torch.isnan(g) & ~torch.isnan(w)
            assert nan.any() and torch.isnan(g[nan]).all()
            assert not (extra.flatten(2).any(2) & ~nan_slices).any()
            assert rel_err(g[~nan & ~extra], w[~nan & ~extra]) <= 1e-12


def test_synthesize_backward_jvp_checks_its_tangents(extension):
    akp, weight, layout = make_inputs(MOSAIC, 2, (3, 3))
    family, row = layout_args(layout)
    grad_w = torch.randn(len(MOSAIC), 2, 3, 3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"akp_tangent must be a floating-point tensor of shape \[8, 2, 6\]"):
        ops.synthesize_backward_jvp(akp[:, :1], None, grad_w, akp, family, row, [True, True])
    with pytest.raises(RuntimeError, match=r"weight_tangent must be a floating-point tensor of shape \[3, 2, 3, 3\]"):
        ops.synthesize_backward_jvp(None, weight[:, :, :2], grad_w, akp, family, row, [True, True])
    with pytest.raises(RuntimeError, match="weight_tangent must be a floating-point tensor"):
        ops.synthesize_backward_jvp(None, weight.int(), grad_w, akp, family, row, [True, True])


def test_double_backward_takes_the_jvp_kernel_unless_it_records_a_graph(extension):
    """A gradient penalty's backward records nothing: synthesis's second derivatives come from
    synthesize_backward_jvp. Third order records the double backward: the composite, differentiable
    again, runs instead."""
    akp, weight, layout = make_inputs(MOSAIC, 2, (3, 3))
    akp.requires_grad_()
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64, requires_grad=True)

    def ops_run(third_order: bool) -> set[str]:
        y = native.conv2d(x, akp, weight, layout, None, ConvArgs.make(padding=1), (3, 3))
        (g,) = torch.autograd.grad(y.pow(3).sum(), akp, create_graph=True)
        with torch.profiler.profile() as prof:
            (gg,) = torch.autograd.grad(g.square().sum(), akp, create_graph=third_order)
            if third_order:
                gg.sum().backward()
        return {e.name for e in prof.events()}

    names = ops_run(third_order=False)
    assert "acl_fused::synthesize_backward_jvp" in names and "acl_fused::synthesize_double_backward" not in names
    assert "acl_fused::synthesize_double_backward" in ops_run(third_order=True)


# -- why_not reasons ----------------------------------------------------------------------------
def test_missing_extension_reason_says_how_to_build(monkeypatch):
    def no_extension(name):
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(importlib, "import_module", no_extension)
    reason = native._load_extension()
    assert "acl_fused._C" in reason and "pip install --no-build-isolation -e ." in reason
    assert "ACL_FUSED_NO_EXT" in reason
    monkeypatch.undo()

    monkeypatch.setattr(native, "EXTENSION_ERROR", reason)
    akp, weight, layout = make_inputs(MOSAIC, 2, (3, 3))
    problem = make_problem(akp, layout, (3, 3))
    assert native.why_not(problem) == reason
    assert dispatch.select("auto", problem).__name__ == "acl_fused.backends.reference"
    with pytest.raises(BackendUnavailable, match="pip install"):
        dispatch.select("native", problem)
    with pytest.raises(RuntimeError, match="not available"):
        native.synthesize(akp, weight, layout, (3, 3))


def test_why_not_device_and_dtype_reasons(extension, monkeypatch):
    layout = Layout(MOSAIC)
    cpu = Problem(device=torch.device("cpu"), dtype=torch.float32, kernel_size=(3, 3), layout=layout)
    assert native.why_not(cpu) is None
    assert "unsupported parameter dtype" in native.why_not(
        Problem(device=torch.device("cpu"), dtype=torch.int32, kernel_size=(3, 3), layout=layout))
    assert "CPU and CUDA only" in native.why_not(
        Problem(device=torch.device("meta"), dtype=torch.float32, kernel_size=(3, 3), layout=layout))
    monkeypatch.setattr(native, "has_cuda_kernels", lambda: False)
    reason = native.why_not(Problem(device=torch.device("cuda"), dtype=torch.float32, kernel_size=(3, 3),
                                    layout=layout))
    assert "without its CUDA kernels" in reason and "ACL_FUSED_CUDA=1" in reason


# -- torch.compile ------------------------------------------------------------------------------
def test_ops_compile_fullgraph_forward_and_backward(extension):
    akp, weight, layout = make_inputs(MOSAIC + [F_.MEAN], 2, (3, 4), dtype=torch.float32)
    family, row = layout_args(layout)
    x = torch.randn(2, 4, 7, 6)
    bias = torch.randn(len(MOSAIC) + 1)

    def fn(x, akp, weight, bias):
        w = ops.synthesize(akp, weight, family, row, [3, 4])
        y = ops.acl_conv2d(x, akp, weight, family, row, bias, [3, 4], [1, 1], [1, 1, 1, 2], [1, 1], 2)
        return y.square().sum() + w.sum()

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True)
    results = []
    for f in (fn, compiled):
        leaves = [t.clone().requires_grad_() for t in (x, akp, weight, bias)]
        out = f(*leaves)
        results.append((out, torch.autograd.grad(out, leaves)))
    (out, grads), (out_c, grads_c) = results
    assert torch.allclose(out_c, out, rtol=1e-6)
    for g, g_c in zip(grads, grads_c):
        assert torch.allclose(g_c, g, rtol=1e-5, atol=1e-6)


def test_module_compiles_without_graph_breaks(extension):
    torch.manual_seed(0)
    m = AnalyticConv2d(4, 12, 3, padding="same", groups=2, layout=MOSAIC + [F_.MEAN], backend="native")
    x = torch.randn(2, 4, 8, 8)
    torch._dynamo.reset()
    compiled = torch.compile(m, fullgraph=True)
    results = []
    for f in (m, compiled):
        m.zero_grad()
        xi = x.clone().requires_grad_()
        y = f(xi)
        y.square().sum().backward()
        results.append([y, xi.grad] + [p.grad.clone() for p in m.parameters()])
    for eager, comp in zip(*results):
        assert torch.allclose(comp, eager, rtol=1e-5, atol=1e-6)


# -- CUDA ---------------------------------------------------------------------------------------
@pytest.fixture
def cuda_kernels(extension):
    if not native.has_cuda_kernels():
        skip_or_fail_unavailable("native", "acl_fused._C was built without its CUDA kernels")


@cuda_only
@pytest.mark.parametrize("kernel_size", KERNEL_SIZES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_cuda_kernels_match_cpu_kernels(cuda_kernels, dtype, kernel_size):
    """Same code (families.h) on both devices: CUDA agrees with CPU to round-off in the compute
    type, across 1 to 32 lanes per slice and a slice count that leaves partial warps."""
    akp, weight, layout = make_inputs(MOSAIC * 3, 5, kernel_size, dtype=dtype)
    grad_w = torch.randn(len(MOSAIC) * 3, 5, *kernel_size, dtype=torch.float64).to(dtype)
    # Low precision: both round the same float32 values once, so at most a few elements differ by
    # one unit in the last place (a relative norm error well below eps).
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, torch.finfo(dtype).eps)
    out = {}
    for device in ("cpu", "cuda"):
        family, row = layout_args(layout, device)
        a, w, g = (t.to(device) for t in (akp, weight, grad_w))
        stream = torch.cuda.Stream() if device == "cuda" else None
        if stream is not None:  # the inputs were copied on the default stream
            stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # kernels must run on the current stream
            result = (ops.synthesize(a, w, family, row, list(kernel_size)),
                      *ops.synthesize_backward(g, a, family, row, [True, True]))
        if stream is not None:
            torch.cuda.current_stream().wait_stream(stream)
        out[device] = [t.cpu() for t in result]
    for what, c, g in zip(("W", "grad_akp", "grad_weight"), out["cpu"], out["cuda"]):
        assert g.dtype == dtype and rel_err(g, c) <= tol, what


@cuda_only
def test_cuda_conv_matches_reference(cuda_kernels):
    akp, weight, layout = make_inputs(MOSAIC, 3, (4, 4), device="cuda")
    x = torch.randn(2, 3, 9, 8, dtype=torch.float64, device="cuda")
    conv = ConvArgs.make(padding="same")
    leaves = [t.clone().requires_grad_() for t in (x, akp, weight)]
    y = native.conv2d(*leaves, layout, None, conv, (4, 4))
    y_ref = reference.conv2d_layout(*leaves, layout, None, conv, (4, 4))
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves, g)
    grads_ref = torch.autograd.grad(y_ref, leaves, g)
    assert rel_err(y, y_ref) <= 1e-12
    assert all(rel_err(a, b) <= 1e-12 for a, b in zip(grads, grads_ref))
