"""`python -m acl_fused`: correctness smoke check and parameter savings on this device.

1. float64 gradcheck and gradgradcheck (double backward) of every runnable backend (interpreted
   Triton excluded: the test suite covers it) against the SPEC, for a mosaic holding all seven
   families;
2. per-family parameter counts and savings against nn.Conv2d for 3x3, 5x5, 7x7 kernels;
3. the backend backend="auto" picks here.
Timings are the benchmarks' job (`python -m benchmarks.throughput`; `make run` runs both).
"""
from __future__ import annotations

import sys

import torch

from . import AnalyticConv2d, Family, acl_conv2d, backend_report, dispatch
from .layout import make_layout
from .module import ParameterReport
from .validation import make_problem

MOSAIC = [int(f) for f in (Family.TGD2, Family.PLAIN, Family.GABOR, Family.MEAN, Family.LOG,
                           Family.PLAIN, Family.LOT, Family.TGD1)]


def runnable_backends(device: torch.device, dtype: torch.dtype) -> dict[str, str | None]:
    layout = make_layout(MOSAIC, len(MOSAIC))
    problem = make_problem(torch.empty(0, device=device, dtype=dtype), layout, (3, 3))
    reasons = backend_report(problem)
    if device.type == "cpu":
        for name in ("triton", "triton_fused"):
            if reasons.get(name) is None:
                reasons[name] = "interpreted Triton on CPU is a test tool, not timed here"
    return reasons


def gradcheck_all(device: torch.device) -> bool:
    print(f"== float64 gradcheck and gradgradcheck vs SPEC on {device} (mosaic of all seven families) ==")
    torch.manual_seed(0)
    layer = AnalyticConv2d(3, len(MOSAIC), (3, 2), padding="same", layout=MOSAIC, dtype=torch.float64,
                           device=device)
    args = [t.detach().clone().requires_grad_() for t in
            (torch.randn(2, 3, 5, 4, dtype=torch.float64, device=device), layer.akp, layer.weight, layer.bias)]
    ok = True
    for name, reason in runnable_backends(device, torch.float64).items():
        if reason is not None:
            print(f"  {name:<13} skipped: {reason}")
            continue
        def fn(x, akp, weight, bias, name=name):
            return acl_conv2d(x, akp, weight, layer.layout, bias, padding="same", kernel_size=(3, 2), backend=name)
        first = torch.autograd.gradcheck(fn, args, raise_exception=False)
        second = torch.autograd.gradgradcheck(fn, args, raise_exception=False)
        ok &= first and second
        print(f"  {name:<13} gradcheck {'PASS' if first else 'FAIL'}, gradgradcheck {'PASS' if second else 'FAIL'}")
    return ok


def parameter_savings() -> None:
    print("\n== parameters per family vs nn.Conv2d (per output channel, per input channel) ==")
    for k in (3, 5, 7):
        one_each = make_layout({f: 1 for f in Family}, len(Family))
        report = ParameterReport.of(one_each, 1, (k, k), bias=False)
        row = "  ".join(f"{name} {acl}/{conv}" for name, _, acl, conv in report.rows if name != "PLAIN")
        print(f"  {k}x{k}: {row}")
    layer = AnalyticConv2d(64, 64, 3, padding=1)
    print("\n64->64 3x3 layer, default layout:\n" + str(layer.parameter_report()))


def main() -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"acl_fused on {device}, torch {torch.__version__}")
    ok = gradcheck_all(device)
    parameter_savings()
    print(f"\nauto picks: {dispatch.select('auto', make_problem(torch.empty(0, device=device), make_layout(None, 64), (3, 3))).__name__}")
    if not ok:
        print("gradcheck or gradgradcheck FAILED", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
