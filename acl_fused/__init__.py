"""acl_fused: the Analytic Convolutional Layer (arXiv 2407.06087) with fused synthesis.

Public API:
    Family                      family codes (SPEC §4)
    synthesize(...)             akp + weight + family -> W [C_out, C_in/g, kH, kW]
    acl_conv2d(...)             conv2d(x, synthesize(...), bias, stride, padding, dilation, groups)
    AnalyticConv2d(...)         nn.Conv2d drop-in module
    Layout, make_layout(...)    the mosaic of families over output channels
    backend_report(problem)     every backend and why it can or cannot run
"""
from .dispatch import BackendUnavailable
from .dispatch import report as backend_report
from .families import AKP_COUNT, AKP_NAMES, AKP_SLOTS, Family
from .functional import acl_conv2d, synthesize
from .layout import Layout, make_layout
from .module import AnalyticConv2d, ParameterReport

__all__ = [
    "AKP_COUNT", "AKP_NAMES", "AKP_SLOTS", "AnalyticConv2d", "BackendUnavailable", "Family", "Layout",
    "ParameterReport", "acl_conv2d", "backend_report", "make_layout", "synthesize",
]
__version__ = "0.1.0"
