"""Bad input raises a clear Python exception that names the problem, before any kernel runs
(acl_fused.validation, conv_args, layout, and the module's constructor)."""
from __future__ import annotations

import pytest
import torch

import acl_fused
from acl_fused import AnalyticConv2d, Family, reference
from acl_fused.layout import Layout

LAYOUT = Layout([Family.PLAIN, Family.GABOR, Family.LOG, Family.PLAIN])   # 2 plain, 2 analytic
CG = 3


def good(dtype=torch.float32, device="cpu"):
    """Valid (x, akp, weight, bias) for LAYOUT, C_in = 3, 3x3 kernels."""
    kw = dict(dtype=dtype, device=device)
    return (torch.randn(2, CG, 8, 8, **kw), torch.randn(2, CG, 6, **kw), torch.randn(2, CG, 3, 3, **kw),
            torch.randn(4, **kw))


def conv_entry_points():
    """The public API (which validates before picking a backend) and the reference oracle."""
    return [lambda *a, **k: acl_fused.acl_conv2d(*a, backend="reference", **k), reference.acl_conv2d]


def synth_entry_points():
    return [lambda *a, **k: acl_fused.synthesize(*a, backend="reference", **k), reference.synthesize]


CONV = pytest.mark.parametrize("conv2d", conv_entry_points(), ids=["public", "reference"])
SYNTH = pytest.mark.parametrize("synthesize", synth_entry_points(), ids=["public", "reference"])


def test_valid_call_runs():
    """The baseline every other test breaks exactly one thing of."""
    x, akp, weight, bias = good()
    for conv2d in conv_entry_points():
        assert conv2d(x, akp, weight, LAYOUT, bias, padding=1).shape == (2, 4, 8, 8)


# --------------------------------------------------------------------------------------------
# Shapes and ranks.

@SYNTH
@pytest.mark.parametrize("akp, match", [
    (torch.randn(2, 6), r"akp must have shape \[A, C_in/groups, 6\], got \(2, 6\)"),
    (torch.randn(1, 2, 3, 6), r"akp must have shape \[A, C_in/groups, 6\]"),
    (torch.randn(2, CG, 5), r"akp's last dimension must be 6 \(packed AKP slots\), got 5"),
    (torch.randn(2, CG, 7), r"akp's last dimension must be 6"),
    (torch.randn(3, CG, 6), r"akp has 3 rows but the layout has 2 analytic channels"),
    (torch.randn(2, CG + 1, 6), r"akp and weight disagree on C_in/groups: 4 vs 3"),
])
def test_bad_akp_shape(synthesize, akp, match):
    with pytest.raises(ValueError, match=match):
        synthesize(akp, torch.randn(2, CG, 3, 3), LAYOUT)


@SYNTH
@pytest.mark.parametrize("weight, match", [
    (torch.randn(2, CG, 9), r"weight must have shape \[P, C_in/groups, kH, kW\], got \(2, 3, 9\)"),
    (torch.randn(1, CG, 3, 3), r"weight has 1 rows but the layout has 2 plain channels"),
    (None, r"weight has 0 rows but the layout has 2 plain channels"),
])
def test_bad_weight_shape(synthesize, weight, match):
    with pytest.raises(ValueError, match=match):
        synthesize(torch.randn(2, CG, 6), weight, LAYOUT, kernel_size=3)


@SYNTH
def test_akp_missing_for_analytic_layout(synthesize):
    with pytest.raises(ValueError, match="akp has 0 rows but the layout has 2 analytic channels"):
        synthesize(None, torch.randn(2, CG, 3, 3), LAYOUT)


@SYNTH
def test_neither_akp_nor_weight(synthesize):
    with pytest.raises(ValueError, match="at least one of akp and weight must be given"):
        synthesize(None, None, LAYOUT, kernel_size=3)


@SYNTH
def test_empty_weight_gives_the_kernel_size(synthesize):
    """A [0, C_in/g, kH, kW] weight (no plain channel) still says the kernel size."""
    w = synthesize(torch.randn(2, CG, 6), torch.empty(0, CG, 4, 2), [Family.GABOR, Family.LOT])
    assert w.shape == (2, CG, 4, 2)
    with pytest.raises(ValueError, match=r"kernel_size 3 disagrees with weight's kernel \(4, 2\)"):
        synthesize(torch.randn(2, CG, 6), torch.empty(0, CG, 4, 2), [Family.GABOR, Family.LOT], kernel_size=3)
    with pytest.raises(ValueError, match=r"akp and weight disagree on C_in/groups: 3 vs 2"):
        synthesize(torch.randn(2, CG, 6), torch.empty(0, 2, 4, 2), [Family.GABOR, Family.LOT])


@SYNTH
def test_zero_size_kernel(synthesize):
    with pytest.raises(ValueError, match=r"weight's kernel must be at least 1x1, got \(0, 3\)"):
        synthesize(torch.randn(2, CG, 6), torch.randn(2, CG, 0, 3), LAYOUT)


@SYNTH
def test_kernel_size_required_without_plain_weight(synthesize):
    with pytest.raises(ValueError, match="kernel_size is required when there are no plain channels"):
        synthesize(torch.randn(2, CG, 6), None, [Family.GABOR, Family.MEAN])


@SYNTH
@pytest.mark.parametrize("kernel_size, exc, match", [
    (5, ValueError, r"kernel_size 5 disagrees with weight's kernel \(3, 3\)"),
    ((3, 4), ValueError, r"kernel_size \(3, 4\) disagrees with weight's kernel"),
    (0, ValueError, r"kernel_size must be >= 1"),
    ((3,), ValueError, r"kernel_size must be an int or a pair of ints"),
    (3.0, ValueError, r"kernel_size must be an int or a pair of ints"),
])
def test_bad_kernel_size(synthesize, kernel_size, exc, match):
    with pytest.raises(exc, match=match):
        synthesize(torch.randn(2, CG, 6), torch.randn(2, CG, 3, 3), LAYOUT, kernel_size=kernel_size)
    if kernel_size in (0, 3.0, (3,)):   # checked without a weight too
        with pytest.raises(exc, match=match):
            synthesize(torch.randn(2, CG, 6), None, [Family.GABOR, Family.LOG], kernel_size=kernel_size)


@CONV
@pytest.mark.parametrize("shape, match", [
    ((8, 8), r"input must have shape \[N, C_in, H, W\] or \[C_in, H, W\], got \(8, 8\)"),
    ((1, 2, CG, 8, 8), r"input must have shape \[N, C_in, H, W\] or \[C_in, H, W\]"),
    ((CG + 1, 8, 8), r"input has 4 channels but the layer expects C_in = C_in/groups \* groups = 3 \* 1 = 3"),
    ((2, CG + 1, 8, 8), r"input has 4 channels but the layer expects C_in = C_in/groups \* groups = 3 \* 1 = 3"),
])
def test_bad_input_shape(conv2d, shape, match):
    _, akp, weight, bias = good()
    with pytest.raises(ValueError, match=match):
        conv2d(torch.randn(shape), akp, weight, LAYOUT, bias)


@CONV
@pytest.mark.parametrize("bias, exc, match", [
    (torch.randn(3), ValueError, r"bias must have shape \[4\], got \(3,\)"),
    (torch.randn(1, 4), ValueError, r"bias must have shape \[4\], got \(1, 4\)"),
    (torch.randn(4, dtype=torch.float64), TypeError, r"bias dtype torch.float64 differs from the parameters' dtype torch.float32"),
    (torch.arange(4), TypeError, r"bias must be a floating-point tensor .* got torch.int64"),
    ([0.0] * 4, TypeError, r"bias must be a torch.Tensor, got list"),
])
def test_bad_bias(conv2d, bias, exc, match):
    x, akp, weight, _ = good()
    with pytest.raises(exc, match=match):
        conv2d(x, akp, weight, LAYOUT, bias)


@CONV
@pytest.mark.parametrize("conv, shape, match", [
    (dict(), (2, CG, 2, 8), r"input height 2 \(\+0 padding\) is smaller than the dilated kernel \(3\)"),
    (dict(padding=(0, 1), dilation=(1, 2)), (2, CG, 8, 2), r"input width 2 \(\+2 padding\) is smaller than the dilated kernel \(5\)"),
    (dict(dilation=3, padding=1), (2, CG, 4, 4), r"input height 4 \(\+2 padding\) is smaller than the dilated kernel \(7\)"),
    (dict(padding="valid"), (2, CG, 8, 2), r"input width 2 \(\+0 padding\) is smaller than the dilated kernel \(3\)"),
])
def test_kernel_larger_than_padded_input(conv2d, conv, shape, match):
    _, akp, weight, bias = good()
    with pytest.raises(ValueError, match=match):
        conv2d(torch.randn(shape), akp, weight, LAYOUT, bias, **conv)


# --------------------------------------------------------------------------------------------
# dtypes and devices.

@CONV
@pytest.mark.parametrize("which", ["input", "akp", "weight"])
def test_non_float_tensors(conv2d, which):
    x, akp, weight, bias = good()
    args = dict(input=x, akp=akp, weight=weight)
    args[which] = args[which].to(torch.int32)
    with pytest.raises(TypeError, match=rf"{which} must be a floating-point tensor .*got torch.int32"):
        conv2d(args["input"], args["akp"], args["weight"], LAYOUT, bias)


@CONV
def test_complex_and_non_tensor_inputs(conv2d):
    x, akp, weight, bias = good()
    with pytest.raises(TypeError, match="input must be a floating-point tensor .*complex64"):
        conv2d(x.to(torch.complex64), akp, weight, LAYOUT, bias)
    with pytest.raises(TypeError, match="akp must be a torch.Tensor, got list"):
        conv2d(x, akp.tolist(), weight, LAYOUT, bias)
    with pytest.raises(TypeError, match="input must be a torch.Tensor, got ndarray"):
        conv2d(x.numpy(), akp, weight, LAYOUT, bias)


@CONV
def test_mixed_dtypes(conv2d):
    x, akp, weight, bias = good()
    with pytest.raises(TypeError, match=r"akp and weight must have the same dtype, got torch.float32 and torch.float64"):
        conv2d(x, akp, weight.double(), LAYOUT, bias)
    with pytest.raises(TypeError, match=r"input dtype torch.float64 differs from the parameters' dtype torch.float32"):
        conv2d(x.double(), akp, weight, LAYOUT, bias)


@CONV
def test_mixed_devices(conv2d):
    """The meta device stands in for a second device: every check fires before any data is read."""
    x, akp, weight, bias = good()
    meta = lambda t: t.to("meta")  # noqa: E731
    with pytest.raises(ValueError, match=r"akp and weight must be on the same device, got cpu and meta"):
        conv2d(x, akp, meta(weight), LAYOUT, bias)
    with pytest.raises(ValueError, match=r"input and parameters must be on the same device, got meta and cpu"):
        conv2d(meta(x), akp, weight, LAYOUT, bias)
    with pytest.raises(ValueError, match=r"bias must be on the parameters' device cpu, got meta"):
        conv2d(x, akp, weight, LAYOUT, meta(bias))


# --------------------------------------------------------------------------------------------
# Convolution arguments.

@CONV
@pytest.mark.parametrize("conv, match", [
    (dict(stride=0), r"stride must be >= 1, got \(0, 0\)"),
    (dict(stride=(1, -2)), r"stride must be >= 1, got \(1, -2\)"),
    (dict(stride=(1, 2, 3)), r"stride must be an int or a pair of ints, got \(1, 2, 3\)"),
    (dict(stride=1.5), r"stride must be an int or a pair of ints, got 1.5"),
    (dict(stride=True), r"stride must be an int or a pair of ints, got True"),
    (dict(padding=-1), r"padding must be >= 0, got \(-1, -1\)"),
    (dict(padding=(1, "1")), r"padding must be an int or a pair of ints"),
    (dict(padding="full"), r"Invalid padding string 'full', should be one of \('valid', 'same'\)"),
    (dict(padding="SAME"), r"Invalid padding string 'SAME'"),
    (dict(dilation=0), r"dilation must be >= 1, got \(0, 0\)"),
    (dict(dilation=[2]), r"dilation must be an int or a pair of ints, got \[2\]"),
    (dict(groups=0), r"groups must be a positive int, got 0"),
    (dict(groups=1.0), r"groups must be a positive int, got 1.0"),
    (dict(groups=False), r"groups must be a positive int, got False"),
    (dict(padding="same", stride=2), r"^padding='same' is not supported for strided convolutions$"),
    (dict(padding="same", stride=(1, 2)), r"^padding='same' is not supported for strided convolutions$"),
])
def test_bad_conv_args(conv2d, conv, match):
    x, akp, weight, bias = good()
    with pytest.raises(ValueError, match=match):
        conv2d(x, akp, weight, LAYOUT, bias, **conv)


def test_same_with_stride_matches_pytorch_text():
    """The text is PyTorch's own, so code that matches on it keeps working."""
    x, akp, weight, bias = good()
    with pytest.raises(RuntimeError) as torch_error:
        torch.nn.functional.conv2d(x, torch.randn(4, CG, 3, 3), padding="same", stride=2)
    with pytest.raises(ValueError) as ours:
        reference.acl_conv2d(x, akp, weight, LAYOUT, bias, padding="same", stride=2)
    assert str(ours.value) == str(torch_error.value)


@CONV
def test_groups_must_divide_channels(conv2d):
    x, akp, weight, bias = good()
    # C_out = 4 is not divisible by 3 groups
    with pytest.raises(ValueError, match=r"out_channels \(4\) must be divisible by groups \(3\)"):
        conv2d(torch.randn(2, 9, 8, 8), akp, weight, LAYOUT, bias, groups=3)
    # C_in/groups = 3 from the parameters, groups = 2: the input must have 6 channels
    with pytest.raises(ValueError, match=r"input has 3 channels but the layer expects C_in = C_in/groups \* groups = 3 \* 2 = 6"):
        conv2d(x, akp, weight, LAYOUT, bias, groups=2)


# --------------------------------------------------------------------------------------------
# The family vector of the functional API.

@SYNTH
@pytest.mark.parametrize("family, exc, match", [
    ([0, 1, 2, 9], ValueError, r"unknown ACL family code 9; valid codes are 0..6"),
    ([0, 1, -1, 0], ValueError, r"unknown ACL family code -1"),
    (["plain", "gabor", "dog", "plain"], ValueError, r"unknown ACL family name 'dog'; expected one of PLAIN, GABOR"),
    (torch.tensor([0, 1, 2, 0.0]), TypeError, r"family must be an integer tensor of family codes, got torch.float32"),
    (torch.tensor([[0, 1, 2, 0]]), ValueError, r"family must be a 1-D tensor of family codes, got shape \(1, 4\)"),
    ([], ValueError, r"family must name at least one output channel"),
    (Layout([]), ValueError, r"family must name at least one output channel"),
    ("plain", TypeError, r"family must be a Layout, a sequence of family names/codes or a 1-D integer tensor, got str"),
    ({"plain": 2, "gabor": 2}, TypeError, r"family must be a Layout, a sequence .* got dict"),
    (None, TypeError, r"family must be a Layout, a sequence .* got NoneType"),
])
def test_bad_family_vector(synthesize, family, exc, match):
    with pytest.raises(exc, match=match):
        synthesize(torch.randn(2, CG, 6), torch.randn(2, CG, 3, 3), family)


@SYNTH
def test_family_vector_count_mismatch(synthesize):
    # 3 analytic channels named, 2 AKP rows given
    with pytest.raises(ValueError, match="akp has 2 rows but the layout has 3 analytic channels"):
        synthesize(torch.randn(2, CG, 6), torch.randn(2, CG, 3, 3), ["plain", "gabor", "log", "lot", "plain"])


def test_unknown_backend():
    x, akp, weight, bias = good()
    with pytest.raises(acl_fused.BackendUnavailable, match=r"backend 'fastest' cannot run"):
        acl_fused.acl_conv2d(x, akp, weight, LAYOUT, bias, backend="fastest")


# --------------------------------------------------------------------------------------------
# The module's constructor and forward.

@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(in_channels=0), ValueError, r"in_channels must be a positive int, got 0"),
    (dict(in_channels=3.0), ValueError, r"in_channels must be a positive int, got 3.0"),
    (dict(out_channels=0), ValueError, r"out_channels must be a positive int, got 0"),
    (dict(in_channels=6, groups=4), ValueError, r"in_channels \(6\) must be divisible by groups \(4\)"),
    (dict(out_channels=6, groups=4, in_channels=8), ValueError, r"out_channels \(6\) must be divisible by groups \(4\)"),
    (dict(groups=0), ValueError, r"groups must be a positive int, got 0"),
    (dict(kernel_size=0), ValueError, r"kernel_size must be >= 1"),
    (dict(kernel_size=(3, 3, 3)), ValueError, r"kernel_size must be an int or a pair of ints"),
    (dict(padding="same", stride=2), ValueError, r"padding='same' is not supported for strided convolutions"),
    (dict(padding="circular"), ValueError, r"Invalid padding string 'circular'"),
    (dict(layout={"gabor": 3}), ValueError, r"layout counts add up to 3 channels \(GABOR=3\) but out_channels is 4"),
    (dict(layout=["gabor"] * 5), ValueError, r"layout lists 5 channels but out_channels is 4"),
    (dict(layout=Layout([1, 2])), ValueError, r"layout lists 2 channels but out_channels is 4"),
    (dict(layout=["gabor", "plain", "log", "sobel"]), ValueError, r"unknown ACL family name 'sobel'"),
])
def test_module_constructor(kwargs, exc, match):
    args = dict(in_channels=3, out_channels=4, kernel_size=3) | kwargs
    with pytest.raises(exc, match=match):
        AnalyticConv2d(**args)


def test_module_takes_numpy_integers_as_nn_conv2d_does():
    """Sizes computed with numpy (np.int64 and the like) are ints to nn.Conv2d; here too, stored as
    Python ints, and the layer is the one the same Python ints build."""
    np = pytest.importorskip("numpy", reason="numpy is not installed")
    i = np.int64
    kwargs = dict(stride=i(2), padding=(i(1), 2), dilation=np.int32(1), groups=i(2),
                  layout={"gabor": i(4), "log": np.uint8(2), "plain": 2}, backend="reference")
    with_numpy = AnalyticConv2d(i(4), np.int32(8), (i(3), 3), **kwargs)
    torch.nn.Conv2d(i(4), np.int32(8), (i(3), 3), stride=i(2), padding=(i(1), 2), groups=i(2))  # the same args
    as_python = {k: (v if k != "layout" else {f: int(n) for f, n in v.items()}) for k, v in kwargs.items()}
    as_python.update(stride=2, padding=(1, 2), dilation=1, groups=2)
    torch.manual_seed(0)
    reference_layer = AnalyticConv2d(4, 8, 3, **as_python)
    with_numpy.load_state_dict(reference_layer.state_dict())
    assert repr(with_numpy) == repr(reference_layer)
    assert all(type(v) is int for v in (with_numpy.in_channels, with_numpy.out_channels, with_numpy.groups,
                                        *with_numpy.stride, *with_numpy.padding, *with_numpy.kernel_size))
    x = torch.randn(2, 4, 9, 9)
    torch.testing.assert_close(with_numpy(x), reference_layer(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"in_channels must be a positive int, got np.float64\(3.0\)|got 3.0"):
        AnalyticConv2d(np.float64(3.0), 4, 3)


def test_module_forward_checks_input():
    layer = AnalyticConv2d(3, 4, 3, backend="reference")
    with pytest.raises(ValueError, match=r"input has 5 channels but the layer expects C_in = C_in/groups \* groups = 3 \* 1 = 3"):
        layer(torch.randn(1, 5, 8, 8))
    with pytest.raises(TypeError, match=r"input dtype torch.float64 differs from the parameters' dtype torch.float32"):
        layer(torch.randn(1, 3, 8, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"input height 2 \(\+0 padding\) is smaller than the dilated kernel \(3\)"):
        layer(torch.randn(1, 3, 2, 8))
