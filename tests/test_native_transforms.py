"""The native backend under torch.func's transforms (acl_fused/backends/native_transforms.py):
every transform against the reference backend in float64, gradcheck of the Functions (backward,
forward mode and their second derivatives), vmap without torch's per-sample fallback, and the
nested forward mode torch cannot run through them, refused."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.func import functional_call, grad, jacfwd, jacrev, jvp, vmap

from acl_fused import AnalyticConv2d, BackendUnavailable, Family
from acl_fused.backends import native, native_transforms
from conftest import rel_err, skip_or_fail_unavailable

F_ = Family
#: All seven families, interleaved, two of some.
MOSAIC = [F_.LOT, F_.PLAIN, F_.TGD2, F_.GABOR, F_.MEAN, F_.PLAIN, F_.LOG, F_.TGD1, F_.GABOR]
LAYOUTS = {"mosaic": MOSAIC, "analytic": [F_.GABOR, F_.TGD1, F_.LOG, F_.MEAN], "plain": [F_.PLAIN] * 3}


@pytest.fixture(autouse=True)
def extension():
    if native.EXTENSION_ERROR is not None:
        skip_or_fail_unavailable("native", native.EXTENSION_ERROR)


def layers(layout=MOSAIC, device="cpu", **conv) -> dict[str, AnalyticConv2d]:
    """The same float64 layer (generic AKPs, a bias) on the native and the reference backend."""
    out = {}
    for backend in ("native", "reference"):
        torch.manual_seed(0)
        m = AnalyticConv2d(3, len(layout), 3, layout=list(layout), backend=backend, dtype=torch.float64, **conv)
        m = m.to(device)
        with torch.no_grad():
            m.akp.add_(0.3 * torch.randn_like(m.akp))
        out[backend] = m
    return out


def parameters(m: AnalyticConv2d) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in m.named_parameters()}


def with_akp(m: AnalyticConv2d, x: torch.Tensor):
    """The layer's output as a function of its AKPs."""
    params = parameters(m)
    return lambda akp: functional_call(m, {**params, "akp": akp}, (x,))


def sample_loss(m: AnalyticConv2d):
    return lambda params, sample: functional_call(m, params, (sample.unsqueeze(0),)).square().sum()


#: name -> (layer, input [4, 3, 5, 5]) -> what the transform gives.
TRANSFORMS = {
    "grad": lambda m, x: grad(lambda p: functional_call(m, p, (x,)).square().sum())(parameters(m)),
    "per_sample_grads": lambda m, x: vmap(grad(sample_loss(m)), in_dims=(None, 0))(parameters(m), x),
    "jacrev": lambda m, x: jacrev(lambda a: with_akp(m, x[:1])(a).sum((0, 2, 3)))(parameters(m)["akp"]),
    "jvp": lambda m, x: jvp(with_akp(m, x), (parameters(m)["akp"],), (torch.ones_like(parameters(m)["akp"]),)),
    "jvp_of_input_and_params": lambda m, x: jvp(lambda p, xx: functional_call(m, p, (xx,)), (parameters(m), x),
                                                ({k: v.cos() for k, v in parameters(m).items()}, x.sin())),
    "jacfwd": lambda m, x: jacfwd(lambda a: with_akp(m, x[:1])(a).sum((0, 2, 3)))(parameters(m)["akp"]),
    "hessian": lambda m, x: jacfwd(jacrev(lambda a: with_akp(m, x[:1])(a).square().sum()))(parameters(m)["akp"]),
    "grad_of_grad": lambda m, x: grad(lambda a: grad(lambda b: with_akp(m, x)(b).square().sum())(a).sin().sum())(
        parameters(m)["akp"]),
    "third_order": lambda m, x: grad(lambda a: grad(lambda b: grad(lambda c: with_akp(m, x)(c).pow(3).sum())(b)
                                                    .square().sum())(a).sum())(parameters(m)["akp"]),
    "jacfwd_of_jacrev_of_jacrev": lambda m, x: jacfwd(jacrev(jacrev(
        lambda a: with_akp(m, x[:1])(torch.cat([a, parameters(m)["akp"][2:]])).pow(3).sum())))(
        parameters(m)["akp"][:2]),
    "ensemble": lambda m, x: vmap(lambda p: functional_call(m, p, (x,)))(
        {k: torch.stack([v, 1.5 * v, v.sin()]) for k, v in parameters(m).items()}),
    "vmap_of_jvp": lambda m, x: vmap(lambda xi: jvp(with_akp(m, xi.unsqueeze(0)), (parameters(m)["akp"],),
                                                    (parameters(m)["akp"].cos(),))[1])(x),
    "functionalize": lambda m, x: torch.func.functionalize(m)(x),
}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
@pytest.mark.parametrize("name", TRANSFORMS)
def test_every_transform_matches_the_reference_float64(name, device):
    """What each torch.func transform gives through native is what it gives through the reference
    (the oracle: pure PyTorch, its derivatives torch's own), with no per-sample fallback warning
    (vmap takes the Functions' batching rules)."""
    if device == "cuda" and not native.has_cuda_kernels():
        skip_or_fail_unavailable("native", "acl_fused._C was built without its CUDA kernels")
    ms = layers(padding=1, stride=(1, 2), device=device)
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64, device=device)
    want = TRANSFORMS[name](ms["reference"], x)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*batching rule.*")
        got = TRANSFORMS[name](ms["native"], x)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("layout, name", [(layout, name) for layout in LAYOUTS
                                          for name in ("per_sample_grads", "jvp", "hessian", "ensemble")
                                          if (layout, name) != ("plain", "hessian")])  # no AKPs to differentiate
def test_layouts_without_plain_or_analytic_channels(layout, name):
    """No plain weight (weight None) and no analytic channel (akp [0, Cg, 6]) through the batching
    rules and the derivatives."""
    ms = layers(LAYOUTS[layout], padding=1)
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(TRANSFORMS[name](ms["native"], x), TRANSFORMS[name](ms["reference"], x),
                               rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("channels_last", ["input", "layer"])
@pytest.mark.parametrize("name", ["ensemble", "per_sample_grads", "jacrev", "vmap_of_jvp", "hessian"])
def test_transforms_with_a_channels_last_input_or_layer(name, channels_last):
    """A channels_last input or layer under vmap, where W is a batched tensor whose memory format
    cannot be set (an ensemble raised "required rank 4 tensor to use channels_last format" on both
    backends): as nn.Conv2d, no layout is imposed there. The ensemble is checked against its
    parameter sets run one by one, without vmap."""
    ms = layers(padding=1, stride=(1, 2))
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    if channels_last == "layer":
        ms = {k: m.to(memory_format=torch.channels_last) for k, m in ms.items()}
    else:
        x = x.to(memory_format=torch.channels_last)
    want = TRANSFORMS[name](ms["reference"], x)
    torch.testing.assert_close(TRANSFORMS[name](ms["native"], x), want, rtol=1e-9, atol=1e-12)
    if name == "ensemble":
        sets = [{k: f(v) for k, v in parameters(ms["native"]).items()}
                for f in (lambda v: v, lambda v: 1.5 * v, torch.sin)]
        torch.testing.assert_close(want, torch.stack([functional_call(ms["native"], p, (x,)) for p in sets]),
                                   rtol=1e-9, atol=1e-12)


def test_vmap_over_input_keeps_nn_conv2d_s_layout_and_ensembles_compile():
    """Only a batched W is left in its layout: vmapped over the input alone, a layer moved to
    channels_last gives nn.Conv2d's channels_last output; an ensemble over a channels_last input
    also runs under torch.compile (fullgraph, where Dynamo runs vmap itself: auto takes the
    reference there), as nn.Conv2d's does."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 9, 3, padding=1, dtype=torch.float64).to(memory_format=torch.channels_last)
    x = torch.randn(4, 2, 3, 6, 6, dtype=torch.float64)
    want = vmap(conv)(x)
    for backend, m in layers(padding=1).items():
        m = m.to(memory_format=torch.channels_last)
        got = vmap(m)(x)
        assert got.stride() == want.stride(), (backend, got.stride(), want.stride())
        torch.testing.assert_close(got, torch.stack([m(xi) for xi in x]), rtol=1e-9, atol=1e-12)
    m = layers(padding=1)["reference"]
    m.backend = "auto"
    sets = {k: torch.stack([v, 1.5 * v]) for k, v in parameters(m).items()}
    x_cl = x[0].contiguous(memory_format=torch.channels_last)
    ensemble = torch.compile(lambda p: vmap(lambda q: functional_call(m, q, (x_cl,)))(p), backend="aot_eager",
                             fullgraph=True)
    torch.testing.assert_close(ensemble(sets), vmap(lambda q: functional_call(m, q, (x_cl,)))(sets), rtol=1e-9,
                               atol=1e-12)
    torch._dynamo.reset()


def test_float32_within_spec_tolerance_of_the_float64_reference():
    """SPEC §6's float32 bound (1e-5 relative) on per-sample gradients and a jvp."""
    ms = layers(MOSAIC, padding=1)
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    single = layers(MOSAIC, padding=1)["native"].float()
    for name in ("per_sample_grads", "jvp"):
        want = torch.utils._pytree.tree_leaves(TRANSFORMS[name](ms["reference"], x))
        got = torch.utils._pytree.tree_leaves(TRANSFORMS[name](single, x.float()))
        for g, w in zip(got, want):
            assert rel_err(g, w) <= 1e-5, name


def test_forward_mode_ad_outside_torch_func():
    """A forward_ad dual level takes native's forward-mode rules too (the ops' C++ autograd refuses it)."""
    ms = layers(MOSAIC, padding=1)
    x, v = torch.randn(2, 3, 5, 5, dtype=torch.float64), torch.randn(2, 3, 5, 5, dtype=torch.float64)
    tangents = {}
    for backend, m in ms.items():
        with fwAD.dual_level():
            akp = fwAD.make_dual(m.akp.detach(), torch.ones_like(m.akp))
            y = functional_call(m, {**parameters(m), "akp": akp}, (fwAD.make_dual(x, v),))
            tangents[backend] = fwAD.unpack_dual(y).tangent
    torch.testing.assert_close(tangents["native"], tangents["reference"], rtol=1e-9, atol=1e-12)


def test_gradcheck_and_gradgradcheck_of_the_functions():
    """The Functions' backward and forward-mode rules against finite differences, and their
    second derivatives (gradgradcheck, forward over reverse), for every family."""
    m = layers(MOSAIC)["native"]
    akp, weight = m.akp.detach().clone().requires_grad_(), m.weight.detach().clone().requires_grad_()

    def synthesize(akp, weight):
        return native_transforms.synthesize(akp, weight, m.layout, (3, 3))
    assert torch.autograd.gradcheck(synthesize, (akp, weight), check_forward_ad=True, check_backward_ad=True)
    assert torch.autograd.gradgradcheck(synthesize, (akp, weight), check_fwd_over_rev=True)


def test_nested_forward_mode_is_refused_and_auto_takes_the_reference():
    """torch does not nest autograd.Functions' forward-mode rules (a jvp inside a jvp reads them as
    zero): native refuses nested forward mode, naming it, and auto runs the reference there."""
    ms = layers(MOSAIC, padding=1)
    x = torch.randn(1, 3, 5, 5, dtype=torch.float64)
    akp = parameters(ms["native"])["akp"]
    with pytest.raises(BackendUnavailable, match="native: torch.func's nested jvp transform is running.*; reference can"):
        jacfwd(jacfwd(lambda a: with_akp(ms["native"], x)(a).sum()))(akp)
    auto = layers(MOSAIC, padding=1)["native"]
    auto.backend = "auto"
    torch.testing.assert_close(jacfwd(jacfwd(lambda a: with_akp(auto, x)(a).sum()))(akp),
                               jacfwd(jacfwd(lambda a: with_akp(ms["reference"], x)(a).sum()))(akp))


def test_functionalize_with_another_transform_is_refused_and_auto_takes_the_reference():
    """torch has no functionalize rule for autograd.Functions ("NYI: Functionalize rule for
    custom_function_call"): native refuses functionalize together with grad, and auto runs the
    reference there; functionalize alone runs the ops (TRANSFORMS["functionalize"])."""
    ms = layers(MOSAIC, padding=1)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)

    def functionalized_grad(m):
        return torch.func.functionalize(grad(lambda p: functional_call(m, p, (x,)).square().sum()))(parameters(m))
    with pytest.raises(BackendUnavailable, match="native: torch.func.functionalize is running together with grad"):
        functionalized_grad(ms["native"])
    auto = layers(MOSAIC, padding=1)["native"]
    auto.backend = "auto"
    torch.testing.assert_close(functionalized_grad(auto), functionalized_grad(ms["reference"]))


def test_under_torch_compile_a_transform_runs_on_the_reference_and_native_says_why_not():
    """Dynamo runs torch.func's transforms over the ops it traces, where the ops' C++ autograd cannot
    take part (nor can Dynamo trace the Functions' transform rules): auto takes the reference there
    (one graph, eager's gradients); native refuses, naming the case; a plain torch.compile still
    captures native's op."""
    ms = layers(MOSAIC, padding=1)
    auto = layers(MOSAIC, padding=1)["native"]
    auto.backend = "auto"
    x = torch.randn(3, 3, 5, 5, dtype=torch.float64)
    graphs = []

    def capture(gm, example_inputs):
        graphs.append([str(n.target) for n in gm.graph.nodes if n.op == "call_function"])
        return gm.forward
    per_sample = TRANSFORMS["per_sample_grads"]
    got = torch.compile(per_sample, backend=capture, fullgraph=True)(auto, x)
    assert len(graphs) == 1 and not any("acl_fused" in target for target in graphs[0])
    torch.testing.assert_close(got, per_sample(ms["reference"], x), rtol=1e-9, atol=1e-12)
    with pytest.raises(Exception, match="native: torch.compile is tracing a torch.func transform.*; reference can"):
        torch.compile(per_sample, backend=capture, fullgraph=True)(ms["native"], x)
    graphs.clear()
    torch.compile(auto, backend=capture, fullgraph=True)(x)
    assert graphs == [["acl_fused.acl_conv2d.default"]]


def test_auto_takes_native_under_the_transforms_it_takes_part_in():
    """Measured faster than the reference under them (dispatch.auto_order)."""
    m = layers(MOSAIC, padding=1)["native"]
    m.backend = "auto"
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    calls = []
    real = native_transforms.conv2d

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)
    try:
        native_transforms.conv2d = spy
        TRANSFORMS["per_sample_grads"](m, x)
        TRANSFORMS["jvp"](m, x)
    finally:
        native_transforms.conv2d = real
    assert len(calls) == 2


def test_the_ops_themselves_refuse_forward_mode():
    """Called straight (not through the backend), the ops' C++ autograd has no forward-mode rule
    and refuses dual inputs rather than drop their tangents."""
    m = layers(MOSAIC)["native"]
    idx = m.layout.tensors("cpu")
    with fwAD.dual_level(), pytest.raises(RuntimeError, match="native backend: forward-mode AD"):
        torch.ops.acl_fused.synthesize(fwAD.make_dual(m.akp.detach(), torch.ones_like(m.akp)), m.weight.detach(),
                                       idx["family_i32"], idx["row_i32"], [3, 3])
