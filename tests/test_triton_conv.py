"""The triton_fused backend (acl_fused/backends/triton_conv.py): implicit-GEMM convolution that
synthesizes its weight tiles in registers.

What tests/test_backends.py (the conformance suite, run against every backend) does not already
pin down: shapes that cross every tile edge of the three kernels (M, C_out and K = Cg*kH*kW
tiles; Cg > BLOCK_C in the weight-gradient kernel; a split pixel reduction), geometry corners
(asymmetric 'same', stride and dilation pairs, 'valid', batch 0), float16/bfloat16 parameters,
that backward runs only the kernels ``needs_input_grad`` asks for, that W is never materialised,
determinism, gradcheck of each family, and the TF32 / interpreter switches.
Shapes are small: without a GPU the kernels run in Triton's interpreter.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from acl_fused import Family, acl_conv2d, dispatch
from acl_fused.conv_args import ConvArgs
from acl_fused.layout import make_layout
from acl_fused.validation import make_problem
from acl_cases import TOL, Case
from conftest import compile_for_sm90, rel_err, skip_or_fail_unavailable

NAME = "triton_fused"
F_ = Family
ALL_SEVEN = list(Family)  # every family once, PLAIN included


def backend_module():
    """acl_fused.backends.triton_conv, or skip (fail under ACL_FUSED_REQUIRE_BACKENDS) when it cannot load."""
    try:
        return importlib.import_module(dispatch.BACKENDS[NAME].module)
    except ImportError as e:
        skip_or_fail_unavailable(NAME, str(e))


def require(case: Case, x, akp, layout):
    reason = dispatch.why_not(NAME, case.problem(x, akp, layout))
    if reason is not None:
        skip_or_fail_unavailable(NAME, reason)


MOSAIC3 = [F_.TGD2, F_.PLAIN, F_.GABOR, F_.MEAN, F_.LOG, F_.PLAIN, F_.LOT, F_.TGD1] * 2 + [F_.GABOR] * 3 + [F_.LOT] * 2
CASES = [
    # C_out 21 and 23 > BLOCK_N 16, Cg 18 > BLOCK_C 16 (weight-gradient tiles), K = 162 in 11 K-steps,
    # M = 84 in 3 M-tiles.
    Case("tiles", MOSAIC3[:21], 18, (3, 3), (7, 6), conv=dict(padding=1)),
    # asymmetric 'same' (even kernel, odd dilation): odd pixel at the bottom/right; groups.
    Case("same-even-dilated-groups", ALL_SEVEN + [F_.PLAIN], 4, (4, 2), (6, 7),
         conv=dict(padding="same", dilation=(1, 3), groups=2)),
    Case("stride-dilation-padding-pairs", ALL_SEVEN, 3, (3, 5), (9, 11),
         conv=dict(stride=(2, 3), padding=(2, 1), dilation=(2, 1)), bias=False),
    Case("valid-even", ALL_SEVEN, 2, (2, 2), (5, 6), conv=dict(stride=2, padding="valid")),
    # N*H_out*W_out = 2*12*11 = 264 > 2*_P_CHUNK: the weight-gradient reduction is split.
    Case("split-reduction", [F_.GABOR, F_.PLAIN, F_.LOT], 2, (3, 3), (12, 11), conv=dict(padding=1)),
    Case("batch0", ALL_SEVEN, 3, (3, 3), (5, 5), batch=0, conv=dict(padding=1)),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_forward_and_grads_match_float64_reference(case, dtype):
    (x, akp, weight, bias), layout = case.tensors(dtype)
    require(case, x, akp, layout)
    y, grads = case.run(NAME, x, akp, weight, bias, layout)
    y_ref, grads_ref = case.reference(x, akp, weight, bias, layout)
    assert y.dtype == dtype and y.shape == y_ref.shape
    assert rel_err(y, y_ref) <= TOL[dtype]
    for what, g, g_ref in zip(("x", "akp", "weight", "bias"), grads, grads_ref):
        if g_ref is not None:
            assert g.dtype == dtype and g.shape == g_ref.shape, what
            assert rel_err(g, g_ref) <= TOL[dtype], f"grad {what}: {rel_err(g, g_ref):.3g}"


def test_split_reduction_case_really_splits():
    """Guards the case above: the weight-gradient kernel must see more than one split there."""
    tc = backend_module()
    case = next(c for c in CASES if c.id == "split-reduction")
    p = case.batch * case.hw[0] * case.hw[1]
    splits, per_split = tc._param_split(p, base_programs=1, device=torch.device("cpu"))
    assert splits > 1 and (splits - 1) * per_split < p <= splits * per_split


@pytest.mark.parametrize("low", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_low_precision_parameters(low):
    """float16/bfloat16 params and input (no autocast): tiles synthesized in float32, dot in the
    low precision with float32 accumulation, grads in the params' dtype."""
    case = Case("lowp", ALL_SEVEN * 3, 5, (3, 3), (5, 4), conv=dict(padding=1))
    (x, akp, weight, bias), layout = case.tensors(low)
    require(case, x, akp, layout)
    y, grads = case.run(NAME, x, akp, weight, bias, layout)
    y_ref, grads_ref = case.reference(x, akp, weight, bias, layout)
    assert y.dtype == low and rel_err(y, y_ref) <= TOL[low]
    for what, g, g_ref in zip(("x", "akp", "weight", "bias"), grads, grads_ref):
        assert g.dtype == low and rel_err(g, g_ref) <= TOL[low], what


@pytest.mark.parametrize("wanted", [("x",), ("akp",), ("weight",), ("bias",), ("akp", "weight"), ("x", "akp")])
def test_backward_runs_only_the_kernels_needed(monkeypatch, wanted):
    """needs_input_grad: grad_x's kernel runs only when x needs a grad, the weight-gradient kernel
    only for akp/weight, and that one's epilogue only for the parameter asked for."""
    tc = backend_module()
    case = Case("subset", ALL_SEVEN * 2, 3, (3, 3), (5, 6), conv=dict(padding=1))
    (x, akp, weight, bias), layout = case.tensors(torch.float64)
    require(case, x, akp, layout)
    calls = []
    grad_input, grad_params = tc._grad_input, tc._grad_params

    def spy_input(*args, **kwargs):
        calls.append("x")
        return grad_input(*args, **kwargs)

    def spy_params(grad_y, x, akp, weight, ops, want_akp, want_weight):
        calls.append(("params", want_akp, want_weight))
        return grad_params(grad_y, x, akp, weight, ops, want_akp, want_weight)

    monkeypatch.setattr(tc, "_grad_input", spy_input)
    monkeypatch.setattr(tc, "_grad_params", spy_params)
    names = ("x", "akp", "weight", "bias")
    inputs = dict(zip(names, (x, akp, weight, bias)))
    for n in wanted:
        inputs[n] = inputs[n].clone().requires_grad_()
    y = acl_conv2d(*(inputs[n] for n in names[:3]), layout, inputs["bias"], padding=1, backend=NAME)
    grads = torch.autograd.grad(y.square().sum(), [inputs[n] for n in wanted])
    expected = (["x"] if "x" in wanted else []) + (
        [("params", "akp" in wanted, "weight" in wanted)] if {"akp", "weight"} & set(wanted) else [])
    assert calls == expected
    ref = {n: t.clone().requires_grad_() for n, t in zip(names, (x, akp, weight, bias))}
    y_ref = acl_conv2d(*(ref[n] for n in names[:3]), layout, ref["bias"], padding=1, backend="reference")
    grads_ref = torch.autograd.grad(y_ref.square().sum(), [ref[n] for n in wanted])
    assert all(rel_err(g, r) <= TOL[torch.float64] for g, r in zip(grads, grads_ref))


class AllocationLog(TorchDispatchMode):
    """Shapes of every tensor with memory that any ATen op returns (allocations included), forward
    and backward; meta tensors (shapes and strides alone) are not counted."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.shapes += [(str(func), tuple(t.shape)) for t in tree_leaves(out)
                        if isinstance(t, torch.Tensor) and not t.is_meta]
        return out


def w_like(shapes, layout, cg: int, kernel_size) -> list:
    """Tensors that hold synthesized kernel slices: shape [..., R, Cg, kH, kW] with more rows R
    than the plain weight has, or the element count of W or of its analytic part (also catches
    flattened copies)."""
    kh, kw = kernel_size
    sizes = {n * cg * kh * kw for n in (layout.out_channels, layout.num_analytic)}
    return [(op, s) for op, s in shapes
            if (len(s) >= 4 and s[-3:] == (cg, kh, kw) and s[-4] > layout.num_plain)
            or (s and torch.Size(s).numel() in sizes)]


@pytest.mark.parametrize("backend", [NAME, "reference"])
def test_synthesized_weight_is_never_materialised(backend):
    """No [C_out, Cg, kH, kW]-like tensor is created in forward or backward, and the autograd node
    saves exactly x, akp and weight. The reference path, which does build W, is flagged by the
    same check (so the check can fail)."""
    case = Case("no-W", ALL_SEVEN, 4, (3, 3), (6, 5), conv=dict(padding=1))
    (x, akp, weight, bias), layout = case.tensors(torch.float64)
    if backend == NAME:
        require(case, x, akp, layout)
    cg, kh, kw = akp.shape[1], *case.kernel_size
    legit = {t.numel() for t in (x, akp, weight, bias)} | {2 * 7 * 6 * 5, 2 * akp.numel(), 3 * akp.numel()}
    assert not legit & {n * cg * kh * kw for n in (7, 6)}, "test shapes must not alias W's size"
    leaves = [t.clone().requires_grad_() for t in (x, akp, weight, bias)]
    with AllocationLog() as forward_log:
        y = acl_conv2d(*leaves[:3], layout, leaves[3], padding=1, backend=backend)
    with AllocationLog() as backward_log:
        y.backward(torch.randn_like(y))
    flagged = w_like(forward_log.shapes + backward_log.shapes, layout, cg, case.kernel_size)
    if backend == "reference":
        assert flagged, "the check must flag a path that materialises W"
        return
    assert forward_log.shapes and backward_log.shapes  # the log saw the calls
    assert not flagged, flagged
    y = acl_conv2d(*leaves[:3], layout, leaves[3], padding=1, backend=backend)
    saved = y.grad_fn.saved_tensors
    assert len(saved) == 3 and all(s is not None and s.data_ptr() == t.data_ptr() and s.shape == t.shape
                                   for s, t in zip(saved, leaves[:3]))


def test_backward_is_deterministic():
    """The split weight-gradient reduction sums per-split partials in a fixed order: two backward
    passes agree bit for bit."""
    case = next(c for c in CASES if c.id == "split-reduction")
    (x, akp, weight, bias), layout = case.tensors(torch.float32)
    require(case, x, akp, layout)
    _, first = case.run(NAME, x, akp, weight, bias, layout)
    _, second = case.run(NAME, x, akp, weight, bias, layout)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("layout", [[f, F_.PLAIN, f] for f in Family if f != F_.PLAIN] + [ALL_SEVEN],
                         ids=[f.name for f in Family if f != F_.PLAIN] + ["all-seven"])
def test_gradcheck_float64(layout):
    """float64 gradcheck of the whole op (x, akp, weight, bias) for each family and the full mosaic
    (fast mode: random projections, which is what keeps the interpreter affordable)."""
    case = Case("gc", layout, 2, (3, 2), (4, 5), batch=1, conv=dict(padding="same", dilation=(2, 1)))
    (x, akp, weight, bias), lay = case.tensors(torch.float64, seed=len(layout) + int(layout[0]))
    require(case, x, akp, lay)
    leaves = [t.clone().requires_grad_() for t in (x, akp, weight, bias)]

    def fn(x, akp, weight, bias):
        return acl_conv2d(x, akp, weight, lay, bias, kernel_size=case.kernel_size, backend=NAME, **case.conv)

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, fast_mode=True)


def test_tf32_follows_pytorch_convolution_flag():
    """float32 dots use TF32 exactly when PyTorch would for a cuDNN convolution (on a GPU)."""
    tc = backend_module()
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        assert tc._tf32_allowed() is False
        assert tc._dot_precision(torch.float32) == "ieee"
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=True):
        assert tc._tf32_allowed() is True
        assert tc._dot_precision(torch.float32) == ("ieee" if tc.INTERPRETED else "tf32")
        assert tc._dot_precision(torch.float64) == "ieee"


def test_why_not_names_the_missing_piece(monkeypatch):
    tc = backend_module()
    case = Case("why", ALL_SEVEN, 2, (3, 3), (5, 5))
    (x, akp, _, _), layout = case.tensors(torch.float32)
    problem = case.problem(x, akp, layout)
    monkeypatch.setattr(tc, "INTERPRETED", False)
    assert "TRITON_INTERPRET" in tc.why_not(problem)
    meta = make_problem(akp.to("meta"), layout, case.kernel_size, x.to("meta"), ConvArgs.make())
    assert "meta" in tc.why_not(meta)
    monkeypatch.setattr(tc, "INTERPRETED", True)
    depthwise = 65536  # one program column a group: more than CUDA's grid allows on that axis
    depthwise_layout = make_layout({"mean": depthwise}, depthwise)
    many_groups = make_problem(torch.empty(depthwise, 1, 6, device="meta"), depthwise_layout, (3, 3),
                               torch.empty(1, depthwise, 5, 5, device="meta"), ConvArgs.make(groups=depthwise))
    many_groups = dataclasses.replace(many_groups, device=torch.device("cuda"))
    assert "groups=65536" in tc.why_not(many_groups)
    assert tc.why_not(dataclasses.replace(many_groups, conv=ConvArgs.make(groups=65535))) is None

    def huge(width, padding=0):  # pixels in int32: 1024 x (2**21 - 1) is the most there is room for
        problem = make_problem(torch.empty(1, 1, 6, device="meta"), make_layout({"mean": 1}, 1), (1, 1),
                               torch.empty(1, 1, 1024, width, device="meta"), ConvArgs.make(padding=padding))
        return tc.why_not(dataclasses.replace(problem, device=torch.device("cuda")))
    assert huge(2**21 - 1) is None
    assert "2147483648 pixels" in huge(2**21)
    assert "2147484672 pixels" in huge(2**21 - 1, padding=(0, 1))  # the padded input's
    monkeypatch.setattr(tc, "INTERPRETER_ERROR", tc.interpreter_error("3.6.0", "2.4.6"))
    assert "numpy<2.4" in tc.why_not(problem)


@pytest.mark.parametrize("versions, refused", [(("3.6.0", "2.4.6"), True), (("3.6.0", "2.3.5"), False),
                                               (("3.7.0", "2.4.6"), False), (("3.9.0", "2.4.6"), False)])
def test_interpreter_versions_that_cannot_run_the_kernels(versions, refused):
    """Seen: Triton 3.6.0's interpreter fails every K loop under NumPy 2.4.6 and runs under 2.3.5;
    3.7.0 runs under 2.4.6."""
    assert (backend_module().interpreter_error(*versions) is not None) == refused


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the kernels run for real in the tests above")
@pytest.mark.parametrize("dtypes", [("float32", "float32", "tf32"), ("float32", "float32", "ieee"),
                                    ("bfloat16", "float32", "ieee"), ("float64", "float64", "ieee")],
                         ids=["f32-tf32", "f32-ieee", "bf16-autocast", "f64"])
def test_kernels_compile_for_h100(dtypes):
    """The interpreter runs the kernels' Python, not Triton's GPU compiler, which has rules of its
    own (dot operand types, branch result types, float64 dots): compile for sm_90a here, with the
    candidate each kernel runs first (and alone with ACL_FUSED_AUTOTUNE=0), which must not spill
    registers to local memory; 3x3 and the 7x7 stem's kernel (1x1, 1x3 and 11x11 compiled
    spill-free too when tried, session 23)."""
    backend_module()
    out = compile_for_sm90(NAME, *dtypes, "3", "3", "7", "7")
    assert out.count("compiled") == 6 and out.count("spills 0\n") == 6, out


@pytest.mark.parametrize("setting, expected", [(None, "6 1 3"), ("0", "1 1 1")])
def test_autotune_switch(setting, expected):
    """ACL_FUSED_AUTOTUNE=0 (the GPU test run's setting) keeps one candidate per kernel; by default
    the compiled kernels tune over all of them (checked in a process without the interpreter)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "ACL_FUSED_AUTOTUNE")}
    if setting is not None:
        env["ACL_FUSED_AUTOTUNE"] = setting
    out = subprocess.run([sys.executable, "-c", "import acl_fused.backends.triton_conv as t; "
                          "print(*(len(c) for c in t._GEMM_CONFIGS.values()), len(t._PARAM_CONFIGS))"],
                         env=env, capture_output=True, text=True, check=True).stdout.split("\n")[-2]
    assert out == expected
