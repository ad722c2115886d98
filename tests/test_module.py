"""AnalyticConv2d as an nn.Conv2d drop-in (reference backend: these tests are about the module, not
about a backend), its initialisation, its reports and the PyTorch machinery around modules."""
from __future__ import annotations

import copy
import io
import math
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from acl_fused import AKP_COUNT, AnalyticConv2d, BackendUnavailable, Family
from acl_fused.backends import native
from acl_fused.families import ANALYTIC_FAMILIES, pos
from conftest import skip_or_fail_unavailable

ALL_FAMILIES = [Family.TGD2, Family.PLAIN, Family.GABOR, Family.MEAN, Family.LOG, Family.PLAIN, Family.LOT,
                Family.TGD1, Family.GABOR]


def layer(*args, **kwargs) -> AnalyticConv2d:
    kwargs.setdefault("backend", "reference")
    return AnalyticConv2d(*args, **kwargs)


def perturbed(m: AnalyticConv2d, seed: int = 0) -> AnalyticConv2d:
    """Move AKPs off their initial values so every slot a family reads matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        m.akp.add_(0.1 * torch.randn(m.akp.shape, generator=gen, dtype=m.akp.dtype))
    return m


# --------------------------------------------------------------------------------------------
# Drop-in semantics.

MODULE_CASES = [
    dict(c_in=4, c_out=9, k=3, layout=ALL_FAMILIES, conv=dict(padding=1)),
    dict(c_in=6, c_out=9, k=(3, 2), layout=ALL_FAMILIES, conv=dict(groups=3, stride=2, padding=(1, 0))),
    dict(c_in=4, c_out=8, k=3, layout=None, conv=dict(padding="same", dilation=2), bias=False),
    dict(c_in=4, c_out=6, k=5, layout=[f for f in ANALYTIC_FAMILIES], conv=dict(padding="valid")),   # weight is None
    dict(c_in=4, c_out=4, k=2, layout={"plain": 4}, conv=dict(stride=(1, 2), padding="valid")),        # akp is [0, 4, 6]
    dict(c_in=4, c_out=4, k=3, layout={"gabor": 2, "lot": 2}, conv=dict(groups=4, padding=1)),        # depthwise
]


@pytest.mark.parametrize("case", MODULE_CASES, ids=lambda c: f"{c['c_in']}-{c['c_out']}-{c['conv']}")
def test_forward_and_grads_match_conv2d_on_synthesized_weight(case):
    torch.manual_seed(0)
    m = perturbed(layer(case["c_in"], case["c_out"], case["k"], layout=case["layout"], bias=case.get("bias", True),
                        dtype=torch.float64, **case["conv"]))
    if case["layout"] is not None and all(Family(f) != Family.PLAIN for f in m.layout.codes):
        assert m.weight is None
    if m.layout.num_analytic == 0:
        assert m.akp.shape == (0, case["c_in"] // m.groups, 6)
    assert (m.bias is None) == (not case.get("bias", True))
    x = torch.randn(2, case["c_in"], 9, 10, dtype=torch.float64)
    y = m(x)
    w = m.synthesize()
    assert w.shape == (case["c_out"], case["c_in"] // m.groups, *m.kernel_size)
    want = F.conv2d(x, w, m.bias, **case["conv"])
    torch.testing.assert_close(y, want, rtol=0, atol=0)
    ref_conv = nn.Conv2d(case["c_in"], case["c_out"], case["k"], bias=case.get("bias", True), dtype=torch.float64,
                         **case["conv"])
    assert y.shape == ref_conv(x).shape
    # gradients reach every parameter, and equal those through the synthesized weight
    g = torch.randn_like(y)
    params = [p for p in (m.akp, m.weight, m.bias) if p is not None and p.numel()]
    got = torch.autograd.grad(y, params, g)
    want = torch.autograd.grad(F.conv2d(x, m.synthesize(), m.bias, **case["conv"]), params, g)
    for a, b in zip(got, want):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert sorted(n for n, _ in m.named_parameters()) == sorted(
        n for n, p in (("akp", m.akp), ("weight", m.weight), ("bias", m.bias)) if p is not None)


def test_backward_populates_grads():
    m = perturbed(layer(3, 9, 3, layout=ALL_FAMILIES, padding=1))
    m(torch.randn(2, 3, 6, 6)).square().mean().backward()
    for p in m.parameters():
        assert p.grad is not None and p.grad.dtype == p.dtype
    used = torch.tensor([[AKP_COUNT[Family(c)] for c in m.layout.codes if c]]).T  # [A, 1]
    slots = torch.arange(6)
    assert torch.all((m.akp.grad != 0) == (slots < used)[:, None, :])   # used slots only


def test_conv2d_attributes():
    m = layer(4, 8, (3, 5), stride=2, padding=(1, 2), dilation=(1, 2), groups=2, bias=False)
    assert (m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups) == (
        4, 8, (3, 5), (2, 2), (1, 2), (1, 2), 2)
    assert m.bias is None
    assert m.family.dtype == torch.int64 and m.family.tolist() == list(m.layout.codes)
    assert layer(2, 2, 3, padding="same").padding == "same"


def test_assigned_conv_attributes_take_effect_and_are_validated():
    """As with nn.Conv2d, assigning stride / padding / dilation changes the forward pass."""
    torch.manual_seed(0)
    m = layer(4, 6, 3, padding=1, dtype=torch.float64)
    x = torch.randn(1, 4, 9, 9, dtype=torch.float64)
    m.stride, m.padding, m.dilation = 2, "valid", (1, 2)
    assert (m.stride, m.padding, m.dilation) == ((2, 2), "valid", (1, 2))
    want = F.conv2d(x, m.synthesize(), m.bias, stride=2, dilation=(1, 2))
    torch.testing.assert_close(m(x), want, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="padding='same' is not supported for strided convolutions"):
        m.padding = "same"
    with pytest.raises(ValueError, match="dilation"):
        m.dilation = 0
    with pytest.raises(AttributeError):
        m.groups = 2


# --------------------------------------------------------------------------------------------
# Initialisation.

@pytest.mark.parametrize("kernel_size", [3, 5, 7, (3, 5)])
def test_init_orientations_and_scales(kernel_size):
    torch.manual_seed(1)
    m = layer(8, 12, kernel_size, layout={f: 2 for f in ANALYTIC_FAMILIES})
    k = max(m.kernel_size)
    nat = m.natural_akps()
    for name in ("GABOR", "TGD1", "TGD2"):
        theta = nat[name]["theta"].flatten().double().sort().values
        n = theta.numel()
        # n orientations evenly spaced by pi/n inside [0, pi), shifted by one random offset
        assert theta.min() >= 0 and theta.max() < math.pi
        torch.testing.assert_close(theta.diff(), torch.full((n - 1,), math.pi / n, dtype=torch.float64),
                                   rtol=0, atol=1e-5)
        # and shuffled: not increasing along the channels
        assert not torch.all(nat[name]["theta"].flatten().diff() > 0)

    def within(v: torch.Tensor, centre: float) -> bool:   # the jitter: U(0.8, 1.25) x centre
        return bool(torch.all(v >= 0.8 * centre - 1e-5) and torch.all(v <= 1.25 * centre + 1e-5))

    assert within(nat["GABOR"]["sigma"], k / 4)
    assert within(nat["GABOR"]["lambda"], max(2.0, k / 2))
    assert torch.all(nat["GABOR"]["lambda"] >= 2.0 - 1e-5)   # the jitter keeps the wavelength at 2 px or more
    torch.testing.assert_close(nat["GABOR"]["gamma"], torch.ones(2, 8))
    assert torch.all(nat["GABOR"]["psi"].abs() <= math.pi)
    for name in ("LOG", "TGD1", "TGD2"):
        assert within(nat[name]["sigma"], k / 6)
    assert within(nat["LOT"]["rho"], k / 3)
    # the jitter does jitter
    assert nat["LOG"]["sigma"].std() > 0.01 * k / 6


def test_init_second_moment_matches_conv2d():
    """Each family's synthesized slices get E[W^2] = 1 / (3 fan_in), the second moment of
    nn.Conv2d's default kaiming_uniform_(a=sqrt(5)) weights. Amplitudes are z * std / rms_f with
    z ~ N(0, 1) and rms_f the family's rms of K with a = 1, so the family's mean square is the
    mean of z^2 m_s / mean(m_s) over its slices s: relative standard deviation about sqrt(2 / n)
    (slightly more where the slices' m_s spread). With n = 96 * 32 = 3072 slices (512 per family) that is 2.6% (6.3%):
    the bounds below are 5 standard deviations, so a seeded run that fails is a real bug (a wrong
    fan_in or a missing rms would be off by a factor ~2 to 50)."""
    torch.manual_seed(0)
    c_in, c_out, k = 32, 96, 5
    fan_in = c_in * k * k
    m = layer(c_in, c_out, k, layout={f: 16 for f in ANALYTIC_FAMILIES})
    w = m.synthesize().detach().double()
    target = 1 / (3 * fan_in)
    conv = nn.Conv2d(c_in, c_out, k).weight.detach().double()
    assert conv.square().mean().item() == pytest.approx(target, rel=0.02)   # the target is nn.Conv2d's
    assert w.square().mean().item() == pytest.approx(target, rel=5 * math.sqrt(2 / (c_out * c_in)))
    for f, rows in m.layout.family_rows.items():
        wf = w[[m.layout.analytic_channels[r] for r in rows]]
        assert wf.square().mean().item() == pytest.approx(target, rel=5 * math.sqrt(2 / wf[:, :, 0, 0].numel())), f.name
    # mixed layouts: plain rows and bias exactly as nn.Conv2d draws them
    m = layer(c_in, c_out, k)
    bound = 1 / math.sqrt(fan_in)
    assert m.weight.abs().max() <= bound and m.bias.abs().max() <= bound
    assert m.weight.square().mean().item() == pytest.approx(target, rel=0.05)


def test_init_amplitudes_bounded_for_nearly_vanishing_slices():
    """A TGD1 slice across a 1x3 kernel oriented along the short axis is nearly zero on the grid;
    amplitudes are normalised per family, so it does not get a huge amplitude (normalising per
    slice gave |a| up to ~7000 std here)."""
    torch.manual_seed(0)
    m = layer(16, 48, (1, 3), layout={"tgd1": 48})
    std = 1 / math.sqrt(3 * 16 * 3)
    assert m.akp[..., 0].abs().max().item() < 100 * std


def test_init_is_seeded_and_dtype_device_aware():
    torch.manual_seed(3)
    a = layer(4, 8, 3)
    torch.manual_seed(3)
    b = layer(4, 8, 3)
    assert torch.equal(a.akp, b.akp) and torch.equal(a.weight, b.weight)
    m = layer(4, 8, 3, dtype=torch.float64, device="meta")
    assert m.akp.dtype == torch.float64 and m.akp.device.type == "meta" and m.family.device.type == "meta"


def test_reset_parameters_redraws():
    torch.manual_seed(4)
    m = layer(4, 8, 3)
    before = m.akp.detach().clone()
    m.reset_parameters()
    assert not torch.equal(before, m.akp)


# --------------------------------------------------------------------------------------------
# Reading the layer.

def test_extra_repr_shows_layout():
    m = layer(3, 8, 3, padding=1, layout={"plain": 2, "gabor": 3, "lot": 3})
    assert repr(m) == ("AnalyticConv2d(3, 8, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), "
                       "layout=[PLAIN=2, GABOR=3, LOT=3], backend='reference')")
    m = AnalyticConv2d(4, 4, 2, padding="same", dilation=2, groups=2, bias=False)
    assert repr(m) == ("AnalyticConv2d(4, 4, kernel_size=(2, 2), stride=(1, 1), padding='same', dilation=(2, 2), "
                       "groups=2, bias=False, layout=[PLAIN=2, GABOR=1, LOG=1])")


def test_natural_akps_units():
    m = perturbed(layer(2, 9, 3, layout=ALL_FAMILIES))
    nat = m.natural_akps()
    assert set(nat) == {"GABOR", "LOG", "LOT", "TGD1", "TGD2", "MEAN"}
    expected_keys = {"GABOR": ["a", "theta", "sigma", "gamma", "lambda", "psi"], "LOG": ["a", "sigma"],
                     "LOT": ["a", "rho"], "TGD1": ["a", "theta", "sigma"], "TGD2": ["a", "theta", "sigma"],
                     "MEAN": ["a"]}
    akp = m.akp.detach()
    for name, keys in expected_keys.items():
        entry = nat[name]
        assert list(entry) == ["channels"] + keys
        channels = entry["channels"].tolist()
        assert channels == [o for o, f in enumerate(ALL_FAMILIES) if f.name == name]
        rows = [m.layout.row[o] for o in channels]
        for i, key in enumerate(keys):
            raw = akp[rows, :, i]
            want = pos(raw) if key in ("sigma", "gamma", "lambda", "rho") else raw
            assert entry[key].shape == (len(rows), 2)
            torch.testing.assert_close(entry[key], want, rtol=0, atol=0)
    assert not any(v.requires_grad for e in nat.values() for v in e.values())


def test_parameter_report_readme_numbers():
    r = layer(64, 64, 3).parameter_report()
    assert (r.acl_total, r.conv_total) == (24448, 36928)
    assert f"{100 * r.saving:.1f}" == "33.8"
    assert r.conv_total == sum(p.numel() for p in nn.Conv2d(64, 64, 3).parameters())
    assert "saving 33.8%" in str(r)


@pytest.mark.parametrize("k", [3, 5, 7])
def test_parameter_report_per_family(k):
    cg = 4
    m = layer(8, 14, k, groups=2, layout={"plain": 2, "gabor": 2, "log": 2, "lot": 2, "tgd1": 2, "tgd2": 2, "mean": 2})
    r = m.parameter_report()
    per_slice = {"PLAIN": k * k, "GABOR": 6, "LOG": 2, "LOT": 2, "TGD1": 3, "TGD2": 3, "MEAN": 1}
    assert [row[0] for row in r.rows] == list(per_slice)
    for name, n, acl, conv in r.rows:
        assert (n, acl, conv) == (2, 2 * cg * per_slice[name], 2 * cg * k * k)
    assert r.bias == 14
    assert r.conv_total == sum(p.numel() for p in nn.Conv2d(8, 14, k, groups=2).parameters())
    # the report counts the AKPs a family reads; the packed akp tensor also holds unused slots
    unused = sum((6 - AKP_COUNT[Family(c)]) * cg for c in m.layout.codes if c)
    assert r.acl_total == sum(p.numel() for p in m.parameters()) - unused
    assert layer(8, 14, k, bias=False).parameter_report().bias == 0


# --------------------------------------------------------------------------------------------
# state_dict, copies, dtypes, memory formats.

def test_state_dict_round_trip():
    torch.manual_seed(5)
    a = perturbed(layer(3, 9, 3, layout=ALL_FAMILIES, padding=1))
    sd = a.state_dict()
    assert set(sd) == {"akp", "weight", "bias", "family"}
    assert sd["family"].tolist() == [int(f) for f in ALL_FAMILIES]
    b = layer(3, 9, 3, layout=ALL_FAMILIES, padding=1)
    b.load_state_dict(sd)
    x = torch.randn(2, 3, 7, 7)
    assert torch.equal(a(x), b(x))
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    c = layer(3, 9, 3, layout=ALL_FAMILIES, padding=1)
    c.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(a(x), c(x))


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_a_layer_loaded_or_run_under_inference_mode_trains_afterwards(backend):
    """A checkpoint loaded inside torch.inference_mode() (an evaluation script), or a first call
    under it, then a training step: the layout's cached index tensors are made outside the mode,
    so autograd can save them."""
    torch.manual_seed(5)
    saved = perturbed(layer(3, 9, 3, layout=ALL_FAMILIES, padding=1))
    x = torch.randn(2, 3, 7, 7)
    loaded = layer(3, 9, 3, layout=ALL_FAMILIES[::-1], padding=1, backend=backend)
    first_call = layer(3, 9, 3, layout=[Family.LOT] * 9, padding=1, backend=backend)  # a layout of its own
    with torch.inference_mode():
        loaded.load_state_dict(saved.state_dict())
        first_call(x)
    for m in (loaded, first_call):
        m(x).square().sum().backward()
        assert m.akp.grad is not None and m.akp.grad.abs().sum() > 0
    torch.testing.assert_close(loaded(x), saved(x))


def test_type_keeps_the_family_codes_integers():
    """nn.Module.type(dtype) casts every buffer; the family codes stay int64, so the state dict
    still loads."""
    m = layer(3, 9, 3, layout=ALL_FAMILIES, padding=1).type(torch.float64)
    assert m.family.dtype == torch.int64 and m.akp.dtype == torch.float64
    fresh = layer(3, 9, 3, layout=ALL_FAMILIES[::-1], padding=1, dtype=torch.float64)
    fresh.load_state_dict(m.state_dict())
    assert fresh.layout == m.layout


def test_load_adopts_a_rearranged_layout():
    """Same numbers of analytic and plain channels, another arrangement: the parameters fit, and
    loading restores the saved layout (the family buffer is part of the saved state)."""
    torch.manual_seed(6)
    saved = perturbed(layer(3, 6, 3, layout=["plain", "gabor", "log", "plain", "lot", "tgd1"]))
    fresh = layer(3, 6, 3, layout=["tgd2", "plain", "mean", "mean", "plain", "gabor"])
    fresh.load_state_dict(saved.state_dict())
    assert fresh.layout == saved.layout
    assert fresh.family.tolist() == list(saved.layout.codes)
    x = torch.randn(1, 3, 6, 6)
    assert torch.equal(fresh(x), saved(x))
    assert "PLAIN=2, GABOR=1, LOG=1, LOT=1, TGD1=1" in repr(fresh)
    fresh = layer(3, 6, 3, layout=["tgd2", "plain", "mean", "mean", "plain", "gabor"])
    fresh.load_state_dict(saved.state_dict(), assign=True)
    assert fresh.layout == saved.layout and torch.equal(fresh(x), saved(x))


def test_load_refuses_a_layout_the_parameters_cannot_hold():
    """Different numbers of analytic / plain channels: a clear error, and this module's layout and
    family buffer are left as they were (not half-adopted)."""
    saved = layer(3, 6, 3, layout=["plain", "gabor", "log", "plain", "lot", "tgd1"])
    fresh = layer(3, 6, 3)   # default: 3 plain, 3 analytic
    before = fresh.layout
    with pytest.raises(RuntimeError, match=r"family: the saved layout \(PLAIN=2, GABOR=1, LOG=1, LOT=1, TGD1=1\) "
                                           r"has 4 analytic and 2 plain channels but this module's .* has 3 and 3; "
                                           r"build the module with layout=state_dict\['family'\]"):
        fresh.load_state_dict(saved.state_dict())
    assert fresh.layout == before and fresh.family.tolist() == list(before.codes)
    # the advice works
    sd = saved.state_dict()
    rebuilt = layer(3, 6, 3, layout=sd["family"])
    rebuilt.load_state_dict(sd)
    x = torch.randn(1, 3, 5, 5)
    assert torch.equal(rebuilt(x), saved(x))


@pytest.mark.parametrize("family, match", [
    (torch.tensor([0, 1, 2, 0, 3, 9]), r"family: unknown ACL family code 9"),
    (torch.tensor([0, 1, 2, 0, 3]), r"family: layout lists 5 channels but out_channels is 6"),
])
def test_load_rejects_an_invalid_family(family, match):
    saved = layer(3, 6, 3, layout=["plain", "gabor", "log", "plain", "lot", "tgd1"])
    fresh = layer(3, 6, 3, layout=["plain", "gabor", "log", "plain", "lot", "tgd1"])
    sd = saved.state_dict()
    sd["family"] = family
    with pytest.raises(RuntimeError, match=match):
        fresh.load_state_dict(sd)
    assert fresh.family.tolist() == [0, 1, 2, 0, 3, 4]


def test_load_nested_with_prefix():
    net = nn.Sequential(layer(3, 4, 3, layout=["plain", "log", "lot", "plain"]), nn.ReLU())
    other = nn.Sequential(layer(3, 4, 3, layout=["log", "plain", "plain", "lot"]), nn.ReLU())
    other.load_state_dict(net.state_dict())
    assert other[0].layout == net[0].layout


def test_to_dtype_and_double():
    torch.manual_seed(7)
    m = perturbed(layer(3, 9, 3, layout=ALL_FAMILIES, padding=1))
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    want = layer(3, 9, 3, layout=ALL_FAMILIES, padding=1, dtype=torch.float64)
    want.load_state_dict(m.state_dict())
    for converted in (copy.deepcopy(m).double(), copy.deepcopy(m).to(torch.float64)):
        assert converted.akp.dtype == converted.weight.dtype == converted.bias.dtype == torch.float64
        assert converted.family.dtype == torch.int64   # integer buffer untouched
        assert converted.layout == m.layout
        torch.testing.assert_close(converted(x), want(x), rtol=0, atol=0)
    assert m.float()(x.float()).dtype == torch.float32


def test_channels_last_input():
    torch.manual_seed(8)
    m = perturbed(layer(4, 9, 3, layout=ALL_FAMILIES, padding=1, dtype=torch.float64))
    x = torch.randn(2, 4, 7, 6, dtype=torch.float64)
    xc = x.to(memory_format=torch.channels_last).requires_grad_()
    y = m(xc)
    torch.testing.assert_close(y, m(x), rtol=1e-12, atol=1e-14)
    want = F.conv2d(xc, m.synthesize(), m.bias, padding=1)
    assert y.is_contiguous(memory_format=torch.channels_last) == want.is_contiguous(memory_format=torch.channels_last)
    assert y.stride() == want.stride()
    y.sum().backward()
    assert xc.grad.shape == x.shape


def test_forward_checks_every_change_of_the_call(monkeypatch):
    """A forward call reuses the checks and backend choice of the last call when nothing they read
    changed (input dtype / device / shape, parameters' dtype / device / shape, autocast, layout,
    convolution arguments, backend), and checks again otherwise."""
    from acl_fused import functional
    checks = []
    real = functional.checked_conv2d_call
    monkeypatch.setattr(functional, "checked_conv2d_call", lambda *a, **k: checks.append(1) or real(*a, **k))
    torch.manual_seed(10)
    m = perturbed(layer(3, 9, 3, layout=ALL_FAMILIES, padding=1))
    x = torch.randn(2, 3, 6, 6)
    y = m(x)
    assert torch.equal(m(x.clone()), y) and len(checks) == 1   # same signature: checked once
    with pytest.raises(ValueError, match="input has 4 channels"):
        m(torch.randn(2, 4, 6, 6))
    with pytest.raises(TypeError, match="input dtype torch.float64 differs"):
        m(x.double())
    with pytest.raises(ValueError, match="input height 0"):
        m(torch.randn(2, 3, 0, 6))
    with pytest.raises(TypeError, match="input must be a torch.Tensor"):
        m(x.numpy())
    assert torch.equal(m(x), y)
    m.padding = 0
    assert m(x).shape[-2:] == (4, 4)
    m.padding = 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert m(x).dtype == torch.bfloat16
    assert m(x).dtype == torch.float32
    m.bias = nn.Parameter(torch.zeros(5))
    with pytest.raises(ValueError, match="bias must have shape"):
        m(x)
    m.bias = None
    torch.testing.assert_close(m.double()(x.double()), F.conv2d(x.double(), m.synthesize(), None, padding=1))
    calls = len(checks)
    m(x.double())
    assert len(checks) == calls
    del m.__dict__["_call_plan"]   # as in a module pickled before the plan existed
    m(x.double())
    assert len(checks) == calls + 1
    # An empty plain weight stands for none: the checks replace it on every call, nothing is kept.
    a = perturbed(layer(3, 9, 3, layout={Family.GABOR: 9}, padding=1))
    want = a(x)
    a.weight = nn.Parameter(torch.empty(0, 3, 3, 3))
    calls = len(checks)
    assert torch.equal(a(x), want) and torch.equal(a(x), want) and len(checks) == calls + 2


def test_meta_device_forward():
    """Shape inference on the meta device, as nn.Conv2d allows (autocast does not know 'meta', so
    asking whether it is on must not raise)."""
    m = layer(4, 9, 3, layout=ALL_FAMILIES, stride=2, padding=1, device="meta")
    y = m(torch.empty(2, 4, 9, 8, device="meta"))
    assert y.device.type == "meta" and y.shape == nn.Conv2d(4, 9, 3, stride=2, padding=1)(torch.empty(2, 4, 9, 8)).shape


@pytest.mark.parametrize("padding", [(1, 2), "same"], ids=["pair", "same"])
@pytest.mark.parametrize("padding_mode", ["reflect", "replicate", "circular", "zeros"])
def test_padding_modes_as_nn_conv2d(padding_mode, padding):
    """padding_mode as nn.Conv2d's, on a Conv2d that holds the synthesized weight: the same output
    and input gradient (batched, unbatched, through the reused call plan; 'reflect' compiled too)."""
    torch.manual_seed(8)
    torch._dynamo.reset()  # each case compiles its modules afresh: no recompile limit across cases
    for backend in ("reference", "auto"):
        m = perturbed(layer(4, 9, (3, 4), padding=padding, dilation=(1, 2), padding_mode=padding_mode,
                            layout=ALL_FAMILIES, backend=backend))
        conv = nn.Conv2d(4, 9, (3, 4), padding=padding, dilation=(1, 2), padding_mode=padding_mode)
        with torch.no_grad():
            conv.weight.copy_(m.synthesize())
            conv.bias.copy_(m.bias)
        compiled = torch.compile(m, backend="aot_eager", fullgraph=True) if padding_mode == "reflect" else m
        for shape in ((2, 4, 7, 9), (2, 4, 7, 9), (4, 6, 8)):
            x = torch.randn(shape, requires_grad=True)
            x2 = x.detach().clone().requires_grad_()
            y, y_conv = m(x), conv(x2)
            y.square().sum().backward()
            y_conv.square().sum().backward()
            assert y.shape == y_conv.shape and torch.allclose(y, y_conv, atol=1e-5)
            assert torch.allclose(x.grad, x2.grad, atol=1e-4)
            assert torch.allclose(compiled(x), y, atol=1e-6)
    assert "padding_mode='reflect'" in repr(layer(4, 9, 3, padding_mode="reflect"))
    with pytest.raises(ValueError, match="padding_mode must be one of"):
        layer(4, 9, 3, padding_mode="mirror")


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("case", MODULE_CASES, ids=lambda c: f"{c['c_in']}-{c['c_out']}-{c['conv']}")
def test_to_conv2d_computes_what_the_layer_computes(case, backend):
    """to_conv2d: an nn.Conv2d with the layer's arguments (padding_mode too), its W and a copy of
    its bias, dtype and training mode; the same output, no tie to the layer afterwards."""
    torch.manual_seed(0)
    m = perturbed(layer(case["c_in"], case["c_out"], case["k"], layout=case["layout"], bias=case.get("bias", True),
                        padding_mode="circular" if case["conv"].get("padding") == 1 else "zeros",
                        dtype=torch.float64, backend=backend, **case["conv"])).eval()
    conv = m.to_conv2d()
    assert type(conv) is nn.Conv2d and not conv.training
    for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                 "padding_mode"):
        assert getattr(conv, name) == getattr(m, name), name
    assert conv.weight.dtype == torch.float64 and conv.weight.requires_grad and conv.weight.is_leaf
    assert (conv.bias is None) == (m.bias is None)
    assert [n for n, _ in conv.named_parameters()] == ["weight"] + (["bias"] if m.bias is not None else [])
    x = torch.randn(2, case["c_in"], 9, 8, dtype=torch.float64)
    torch.testing.assert_close(conv(x), m(x), rtol=1e-12, atol=1e-12)
    y = m(x)
    with torch.no_grad():
        conv.weight.add_(1.0)
        if conv.bias is not None:
            conv.bias.add_(1.0)
    assert torch.equal(m(x), y)


def test_to_conv2d_keeps_the_plain_weights_memory_format_and_converts_whole_networks():
    torch.manual_seed(0)
    net = nn.Sequential(layer(3, 8, 3, padding=1), nn.ReLU(),
                        nn.Sequential(layer(8, 8, 1, layout={"gabor": 8}, bias=False), nn.BatchNorm2d(8)))
    net = perturbed(perturbed(net[0]) and net[2][0]) and net
    net = net.to(memory_format=torch.channels_last)
    relu, batch_norm = net[1], net[2][1]
    x = torch.randn(2, 3, 6, 6).contiguous(memory_format=torch.channels_last)
    y = net(x)
    converted = AnalyticConv2d.convert_to_conv2d(net)
    assert converted is net and net[1] is relu and net[2][1] is batch_norm
    assert [type(net[0]), type(net[2][0])] == [nn.Conv2d, nn.Conv2d]
    assert net[0].weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(net(x), y)
    single = layer(3, 4, 3)
    assert type(AnalyticConv2d.convert_to_conv2d(single)) is nn.Conv2d
    meta = layer(3, 4, 3, device="meta").to_conv2d()
    assert meta.weight.is_meta and meta.bias.is_meta


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("case", MODULE_CASES, ids=lambda c: f"{c['c_in']}-{c['c_out']}-{c['conv']}")
def test_from_conv2d_keeps_the_plain_channels_kernels(case, backend):
    """from_conv2d: nn.Conv2d's arguments, dtype and bias; its plain channels convolve with the
    conv's kernels of those channels, so an all-plain layout computes what the conv computes and
    to_conv2d gives the conv back."""
    torch.manual_seed(0)
    conv = nn.Conv2d(case["c_in"], case["c_out"], case["k"], bias=case.get("bias", True), dtype=torch.float64,
                     padding_mode="circular" if case["conv"].get("padding") == 1 else "zeros", **case["conv"])
    x = torch.randn(2, case["c_in"], 9, 8, dtype=torch.float64)
    m = AnalyticConv2d.from_conv2d(conv, layout=case["layout"], backend=backend)
    assert (m.backend, m.akp.dtype, m.padding_mode) == (backend, torch.float64, conv.padding_mode)
    for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups"):
        assert getattr(m, name) == getattr(conv, name), name
    plain = list(m.layout.plain_channels)
    torch.testing.assert_close(m(x)[:, plain], conv(x)[:, plain], rtol=1e-12, atol=1e-12)
    all_plain = AnalyticConv2d.from_conv2d(conv, layout={"plain": case["c_out"]}, backend=backend)
    torch.testing.assert_close(all_plain(x), conv(x), rtol=1e-12, atol=1e-12)
    back = all_plain.to_conv2d()
    assert torch.equal(back.weight, conv.weight) and (conv.bias is None or torch.equal(back.bias, conv.bias))
    with torch.no_grad():
        conv.weight.add_(1.0)
    assert not torch.equal(all_plain.weight, conv.weight[plain])  # copies, not views


def test_convert_from_conv2d_replaces_every_plain_nn_conv2d():
    class Custom(nn.Conv2d):  # a subclass may compute something else: left alone
        pass
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                        nn.Sequential(nn.Conv2d(8, 6, 1, bias=False), Custom(6, 4, 1))).to(memory_format=torch.channels_last)
    relu, custom = net[1], net[2][1]
    seen = []
    converted = AnalyticConv2d.convert_from_conv2d(net, layout=lambda c: seen.append(c.out_channels) or {"plain": c.out_channels})
    assert converted is net and net[1] is relu and net[2][1] is custom and seen == [8, 6]
    assert [type(net[0]), type(net[2][0])] == [AnalyticConv2d, AnalyticConv2d]
    assert net[0].weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 5, 5)
    assert net(x).shape == (2, 4, 5, 5)
    assert type(AnalyticConv2d.convert_from_conv2d(nn.Conv2d(3, 4, 3))) is AnalyticConv2d
    frozen = AnalyticConv2d.from_conv2d(nn.Conv2d(3, 4, 3).eval().requires_grad_(False), backend="reference")
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())
    back = frozen.to_conv2d()
    assert not back.training and not any(p.requires_grad for p in back.parameters())
    with pytest.raises(TypeError, match="from_conv2d takes an nn.Conv2d, got Custom"):
        AnalyticConv2d.from_conv2d(custom)


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_fx_symbolic_trace_records_one_call_a_layer(backend):
    """torch.fx.symbolic_trace (torchvision's feature extraction, FX quantization) takes networks of
    AnalyticConv2d as it takes nn.Conv2d's: one node a layer, the same output and gradients."""
    torch.manual_seed(0)
    net = nn.Sequential(perturbed(layer(3, 9, 3, padding=1, padding_mode="reflect", layout=ALL_FAMILIES, backend=backend)),
                        nn.ReLU(),
                        perturbed(layer(9, 4, (1, 2), stride=2, bias=False, layout={"gabor": 4}, backend=backend)))
    traced = torch.fx.symbolic_trace(net)
    calls = [n for n in traced.graph.nodes if n.op == "call_function" and "fx_conv2d" in str(n.target)]
    assert len(calls) == 2
    x = torch.randn(2, 3, 7, 6)
    y = net(x)
    grads = torch.autograd.grad(y.square().sum(), list(net.parameters()))
    y_traced = traced(x)
    assert torch.equal(y_traced, y)
    grads_traced = torch.autograd.grad(y_traced.square().sum(), list(traced.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_traced))


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_jit_trace_passes_its_check_and_gives_the_eager_output_and_gradients(backend):
    """torch.jit.trace (with its check, which traces again and compares the graphs) of a network of
    layers, one of them channels_last: the traced network computes what the eager one does."""
    torch.manual_seed(0)
    net = nn.Sequential(perturbed(layer(3, 9, 3, padding=1, layout=ALL_FAMILIES, backend=backend)), nn.ReLU(),
                        perturbed(layer(9, 4, (1, 2), stride=2, layout=ALL_FAMILIES[:4], backend=backend)))
    net[2].to(memory_format=torch.channels_last)  # its output channels_last (validation.suggests_channels_last)
    x = torch.randn(2, 3, 7, 6)
    traced = torch.jit.trace(net, x)
    x = torch.randn(2, 3, 7, 6)
    y, y_traced = net(x), traced(x)
    torch.testing.assert_close(y_traced, y)  # round-off apart: the traced graph orders some ops its own way
    assert y_traced.stride() == y.stride()
    grads = torch.autograd.grad(y.square().sum(), list(net.parameters()))
    grads_traced = torch.autograd.grad(y_traced.square().sum(), list(traced.parameters()))
    torch.testing.assert_close(grads_traced, grads)


def test_jit_script_is_refused_with_the_alternatives():
    """torch.jit.script of a network holding a layer says why it cannot and what to use instead,
    rather than failing inside the TorchScript compiler on a Python-only line."""
    net = nn.Sequential(layer(3, 4, 3), nn.ReLU())
    with pytest.raises(RuntimeError, match="cannot be compiled by torch.jit.script.*torch.compile, torch.export or "
                                           "torch.jit.trace"):
        torch.jit.script(net)


def test_deferred_init_fills_the_family_buffer():
    """Built on meta (with device= or inside a `with torch.device("meta")` block, as nn.Conv2d
    allows), then to_empty + reset_parameters (FSDP's deferred init): the family buffer, which the
    state dict saves, holds the layout again, and the module loads into a fresh one."""
    with torch.device("meta"):
        assert layer(4, 9, 3, layout=ALL_FAMILIES).akp.is_meta
    with torch.device("meta"):  # to_empty inside the block too: the codes are not made on meta
        in_block = layer(4, 9, 3, layout=ALL_FAMILIES).to_empty(device="cpu")
    m = layer(4, 9, 3, layout=ALL_FAMILIES, device="meta").to_empty(device="cpu")
    x = torch.randn(1, 4, 5, 5)
    for m in (in_block, m):
        m.reset_parameters()
        assert m.family.tolist() == [int(f) for f in ALL_FAMILIES]
        fresh = layer(4, 9, 3, layout=ALL_FAMILIES)
        fresh.load_state_dict(m.state_dict())
        assert torch.equal(fresh(x), m(x))


def test_the_state_dict_saves_the_layout_whatever_was_written_into_the_family_buffer():
    """Buffer-wide utilities write into the family buffer: EMA with use_buffers=True (torchvision's
    recipe) averages the int64 codes and truncates them ([1, 2, 3, 4, 5, 6] -> [1, 2, 2, 4, 5, 5] at a
    decay of 0.9), skip_init leaves it uninitialised. The layer computes with its layout, and its
    state dict saves that layout: a fresh layer loaded from it computes the same."""
    torch.manual_seed(0)
    model = perturbed(layer(3, 12, 3, padding=1))
    ema = torch.optim.swa_utils.AveragedModel(
        model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.9), use_buffers=True)
    with torch.no_grad():
        model.akp.add_(0.5)
    ema.update_parameters(model)
    ema.update_parameters(model)
    assert ema.module.family.tolist() != list(model.layout.codes)  # what EMA does to an int buffer
    skipped = torch.nn.utils.skip_init(AnalyticConv2d, 3, 12, 3, padding=1, layout=ALL_FAMILIES + [Family.LOG] * 3,
                                       backend="reference")
    with torch.no_grad():
        skipped.akp.normal_()
        skipped.weight.normal_()
        skipped.bias.zero_()
    x = torch.randn(2, 3, 6, 6)
    for m in (ema.module, skipped):
        assert m.state_dict()["family"].tolist() == list(m.layout.codes)
        fresh = layer(3, 12, 3, padding=1, layout=m.layout.codes[::-1])  # same counts, other arrangement
        fresh.load_state_dict(m.state_dict())
        assert fresh.layout.codes == m.layout.codes
        assert torch.equal(fresh(x), m(x))
    # A module pickled before the layer knew its own buffer (no _family_buffer): the buffer is its own,
    # whatever EMA wrote into it, and it runs as before.
    state = ema.module.__getstate__()
    del state["_family_buffer"]
    old = AnalyticConv2d.__new__(AnalyticConv2d)
    old.__setstate__(state)
    assert torch.equal(old(x), ema.module(x))


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_a_family_buffer_passed_in_must_hold_the_layout(backend):
    """torch.func.functional_call with another layer's buffers, or a vmapped ensemble of stacked
    buffers: a layer computes with its own layout, so a family buffer holding another arrangement
    is refused (it ran the other layer's parameters in this layout without a word); the same
    layout, or the module's own buffer, runs."""
    torch.manual_seed(1)
    a = perturbed(layer(3, 4, 3, layout=["plain", "gabor", "log", "plain"], backend=backend))
    b = perturbed(layer(3, 4, 3, layout=["log", "plain", "plain", "gabor"], backend=backend), seed=1)
    same = perturbed(layer(3, 4, 3, layout=a.layout.codes, backend=backend), seed=2)
    x = torch.randn(2, 3, 6, 6)
    state = lambda m: {**dict(m.named_parameters()), **dict(m.named_buffers())}
    with pytest.raises(ValueError, match=r"family buffer holds \[2, 0, 0, 1\] but this layer computes with its "
                                         r"layout \[0, 1, 2, 0\]"):
        torch.func.functional_call(a, state(b), (x,))
    assert torch.equal(torch.func.functional_call(a, state(same), (x,)), same(x))
    a.family = b.family
    with pytest.raises(ValueError, match="tensor in place of its family buffer holds"):
        a(x)
    a.float()  # moves nothing: b's buffer is left as it is
    assert b.family.tolist() == list(b.layout.codes)
    a.family = same.family.clone()
    run = lambda members: torch.func.vmap(lambda p, buf: torch.func.functional_call(a, (p, buf), (x,)))(
        *torch.func.stack_module_state(members))
    with pytest.raises(ValueError, match=r"holds \[\[0, 1, 2, 0\], \[2, 0, 0, 1\]\]"):
        run([a, b])
    torch.testing.assert_close(run([a, same]), torch.stack([a(x), same(x)]))


def test_unbatched_input_as_nn_conv2d():
    """[C_in, H, W] in, [C_out, H_out, W_out] out, gradients included, as nn.Conv2d."""
    torch.manual_seed(3)
    for backend in ("reference", "auto"):
        m = perturbed(layer(4, 9, 3, layout=ALL_FAMILIES, padding=1, backend=backend))
        x = torch.randn(4, 6, 5, requires_grad=True)
        y = m(x)
        y.square().sum().backward()
        x2 = x.detach().clone().requires_grad_()
        y_conv = F.conv2d(x2, m.synthesize().detach(), m.bias.detach(), padding=1)
        y_conv.square().sum().backward()
        assert y.shape == y_conv.shape == (9, 6, 5)
        assert torch.allclose(y, y_conv, atol=1e-6) and torch.allclose(x.grad, x2.grad, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "auto", "native"])
def test_float64_input_under_autocast_runs_in_float64_as_nn_conv2d(backend):
    """CPU autocast leaves float64 alone: a float64 layer computes in float64 there (nn.Conv2d
    does); float32 parameters with a float64 input are refused, and float64 parameters with a
    float32 input (nn.Conv2d raises for both; native ran the latter in bfloat16)."""
    if backend == "native" and native.EXTENSION_ERROR is not None:
        skip_or_fail_unavailable("native", native.EXTENSION_ERROR)
    torch.manual_seed(4)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    m = perturbed(layer(4, 9, 3, layout=ALL_FAMILIES, padding=1, backend=backend, dtype=torch.float64))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
        with pytest.raises(TypeError, match="differs from the parameters' dtype"):
            layer(4, 9, 3, backend=backend)(x)
        with pytest.raises(TypeError, match="float64 parameters with a torch.float32 input under autocast"):
            m(x.float())
    assert y.dtype == torch.float64
    assert torch.allclose(y, F.conv2d(x, m.synthesize().detach(), m.bias.detach(), padding=1), atol=1e-12)


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_torch_export_leaves_a_module_never_called_working(backend):
    """torch.export traces with fake tensors; the layout's index tensors made then must not be what
    the module's later eager calls read (they returned fake tensors)."""
    torch.manual_seed(5)
    m = perturbed(layer(4, 9, 3, layout=ALL_FAMILIES, padding=1, backend=backend))
    x = torch.randn(2, 4, 6, 5)
    exported = torch.export.export(m, (x,))
    want = F.conv2d(x, m.synthesize().detach(), m.bias.detach(), padding=1)
    for y in (m(x), exported.module()(x), copy.deepcopy(m)(x)):
        assert type(y) is torch.Tensor and torch.allclose(y, want, atol=1e-6)


def test_forward_mode_ad_gives_the_exact_tangent():
    """torch.func.jvp and a forward_ad dual level give the exact tangent on the backend auto picks
    (tests/test_native_transforms.py checks native's against the reference's)."""
    torch.manual_seed(6)
    x, v = torch.randn(2, 4, 6, 5), torch.randn(2, 4, 6, 5)
    m = perturbed(layer(4, 9, 3, layout=ALL_FAMILIES, padding=1, backend="auto"))
    want = F.conv2d(v, m.synthesize().detach(), padding=1)
    _, tangent = torch.func.jvp(m, (x,), (v,))
    assert torch.allclose(tangent, want, atol=1e-6)
    import torch.autograd.forward_ad as fwAD
    with fwAD.dual_level():
        assert torch.allclose(fwAD.unpack_dual(m(fwAD.make_dual(x, v))).tangent, want, atol=1e-6)


def test_torch_func_transforms_run_on_a_backend_that_takes_part_in_them():
    """Per-sample gradients (vmap of grad over functional_call) with backend='auto' give what eager
    autograd gives sample by sample; a backend that cannot take part in a transform (Triton's)
    names it when asked for, and auto passes it over."""
    torch.manual_seed(7)
    m = perturbed(layer(4, 9, 3, layout=ALL_FAMILIES, padding=1, backend="auto"))
    params = {k: v.detach() for k, v in m.named_parameters()}
    x = torch.randn(3, 4, 6, 5)

    def loss(p, sample):
        return torch.func.functional_call(m, p, (sample.unsqueeze(0),)).square().sum()
    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x)
    for i in range(x.shape[0]):
        m.zero_grad()
        m(x[i:i + 1]).square().sum().backward()
        for name, p in m.named_parameters():
            torch.testing.assert_close(per_sample[name][i], p.grad, rtol=1e-4, atol=1e-5)
    triton = layer(4, 9, 3, layout=ALL_FAMILIES, padding=1, backend="triton")
    with pytest.raises(BackendUnavailable, match=r"triton: torch.func's grad transform is running.*\breference can"):
        torch.func.grad(lambda p: torch.func.functional_call(triton, p, (x,)).sum())(
            {k: v.detach() for k, v in triton.named_parameters()})


def test_torch_compile_of_per_sample_gradients_matches_eager():
    """torch.compile(vmap(grad(...))) on the reference path gives eager's per-sample gradients
    (Inductor, torch 2.13 CPU, compiled index_select's backward under vmap(grad) into wrong ones:
    reference.py gathers by indexing)."""
    torch.manual_seed(8)
    m = perturbed(layer(3, 9, 3, layout=ALL_FAMILIES, padding=1))
    params = {k: v.detach() for k, v in m.named_parameters()}
    x = torch.randn(3, 3, 5, 5)

    def per_sample(p, inputs):
        return torch.func.vmap(torch.func.grad(
            lambda q, sample: torch.func.functional_call(m, q, (sample.unsqueeze(0),)).square().sum()),
            in_dims=(None, 0))(p, inputs)
    torch.testing.assert_close(torch.compile(per_sample)(params, x), per_sample(params, x), rtol=1e-4, atol=1e-5)


def test_deepcopy_and_pickle():
    torch.manual_seed(9)
    m = perturbed(layer(3, 9, 3, layout=ALL_FAMILIES, padding=1))
    x = torch.randn(1, 3, 5, 5)
    m(x)   # populate the layout's device cache first: copies must carry or rebuild it
    for other in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert other.layout == m.layout and other.akp is not m.akp
        assert torch.equal(other(x), m(x))
        other.akp.data.add_(1.0)
        assert not torch.equal(other.akp, m.akp)
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert torch.equal(loaded(x), m(x))


# --------------------------------------------------------------------------------------------
# torch.compile and DDP.

def test_torch_compile_matches_eager():
    """fullgraph=True: tracing the module (validation, dispatch, reference synthesis) must not
    break the graph. aot_eager runs the traced forward and backward graphs without Inductor's C++
    compile (minutes on this machine); the graphs are what Inductor would compile."""
    torch._dynamo.reset()
    torch.manual_seed(10)
    m = perturbed(layer(3, 9, 3, layout=ALL_FAMILIES, padding=1))
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    y_c = compiled(x)
    grads_c = torch.autograd.grad(y_c.square().sum(), [x, m.akp, m.weight, m.bias])
    y = m(x)
    grads = torch.autograd.grad(y.square().sum(), [x, m.akp, m.weight, m.bias])
    torch.testing.assert_close(y_c, y, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_c, grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_torch_compile_with_dynamic_shapes_keeps_the_channel_count_static(backend):
    """torch.compile(dynamic=True) makes graph inputs' sizes symbols, the layout's index tensors'
    too: C_out then became one, and Inductor failed to lower the backward of a dilated convolution
    of a channels_last input (ValueRangeError, reference backend; nn.Conv2d, whose parameters keep
    static sizes, compiled). The layout's tensors are marked static: in the traced graph the output
    has C_out channels, a number, beside symbolic batch and map sizes. (aot_eager: the graph is what
    Inductor would lower; the Inductor run itself, minutes of C++ compile here, was checked by hand.)"""
    if backend == "native" and native.EXTENSION_ERROR is not None:
        skip_or_fail_unavailable("native", native.EXTENSION_ERROR)
    torch._dynamo.reset()
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.backends.debugging.aot_eager(gm, example_inputs)
    m = layer(4, 8, 2, dilation=2, bias=False, backend=backend)
    x = torch.randn(4, 4, 7, 14).contiguous(memory_format=torch.channels_last).requires_grad_()
    y = torch.compile(m, backend=capture, dynamic=True, fullgraph=True)(x)
    y.sum().backward()
    (out,) = [n for n in graphs[0].graph.nodes if n.op == "output"]
    shape = out.args[0][0].meta["example_value"].shape
    assert type(shape[1]) is int and shape[1] == 8, shape
    assert not all(isinstance(d, int) for d in shape), shape   # dynamic=True did make sizes symbols
    torch.testing.assert_close(y, m(x), rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


#: One SGD step of a layer (backend argv[2]) bare and under DistributedDataParallel (gloo, world
#: size 1, file store argv[1]); run in a process of its own with tests/ as its working directory.
DDP_STEP = r"""
import copy, os, sys
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from test_module import ALL_FAMILIES, layer, perturbed

torch.manual_seed(11)
bare = perturbed(layer(3, 9, 3, layout=ALL_FAMILIES, padding=1, backend=sys.argv[2]))
wrapped_module = copy.deepcopy(bare)
x, target = torch.randn(4, 3, 6, 6), torch.randn(4, 9, 6, 6)
dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
ddp = DistributedDataParallel(wrapped_module)
results = []
for model, params in ((bare, list(bare.parameters())), (ddp, list(wrapped_module.parameters()))):
    opt = torch.optim.SGD(params, lr=0.1)
    F.mse_loss(model(x), target).backward()
    results.append([p.grad.clone() for p in params])
    opt.step()
for a, b in zip(*results):
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
for a, b in zip(bare.parameters(), wrapped_module.parameters()):
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
assert wrapped_module.layout == bare.layout
print("same gradients and parameters", flush=True)
os._exit(0)  # no gloo teardown: its destructor can deadlock on the GIL (pytorch/pytorch#75097)
"""


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_ddp_single_process_matches_plain_training(tmp_path, backend):
    """DistributedDataParallel (gloo, world size 1): one SGD step gives the same gradients and
    parameters as the bare module. In a process of its own: a process group is process-wide
    state, and tearing a gloo one down hung this suite once (in ProcessGroupGloo's destructor)."""
    done = subprocess.run([sys.executable, "-c", DDP_STEP, str(tmp_path / "store"), backend], cwd=Path(__file__).parent,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "same gradients and parameters" in done.stdout, done.stdout + done.stderr


def test_readme_usage_runs():
    """The README's usage example runs as printed (the API it shows exists and takes those arguments)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    usage = readme.split("## Usage", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(compile(usage, "README.md usage", "exec"), namespace)
    assert type(namespace["deployed"]) is nn.Conv2d
    assert {k: v.shape[1:] for k, v in namespace["per_sample"].items()} == {
        k: p.shape for k, p in namespace["layer"].named_parameters()} and namespace["per_sample"]["akp"].shape[0] == 8
