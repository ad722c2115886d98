"""Test-wide setup. Without a CUDA device, Triton kernels run on the CPU through Triton's
interpreter; it must be switched on before any module defining @triton.jit kernels is imported.

``ACL_FUSED_REQUIRE_BACKENDS`` (comma-separated names; `make test` sets it) turns "backend cannot
run here" from a skip into a failure, so CI cannot go green by silently skipping a backend.
"""
import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# SPEC §6 holds float32 to 1e-5 with IEEE arithmetic; TF32 (cuDNN's default for convolutions) has
# its own 5e-3 bound. Tests run IEEE unless they opt into TF32 with the ``tf32`` fixture.
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False


@pytest.fixture
def tf32():
    """TF32 allowed for convolutions and matmuls (CUDA only), as PyTorch's defaults allow it."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved

REQUIRED_BACKENDS = {b for b in os.environ.get("ACL_FUSED_REQUIRE_BACKENDS", "").split(",") if b}


def skip_or_fail_unavailable(backend: str, reason: str) -> None:
    """Skip a test whose backend cannot run here, or fail it when CI requires that backend."""
    if backend in REQUIRED_BACKENDS:
        pytest.fail(f"backend {backend!r} is required (ACL_FUSED_REQUIRE_BACKENDS) but cannot run: {reason}")
    pytest.skip(f"backend {backend!r} cannot run here: {reason}")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64, SPEC §6's measure (the plain norm of the error when ref
    is zero, so two empty or zero tensors agree)."""
    out, ref = out.double(), ref.double()
    denom = ref.norm().item()
    return (out - ref).norm().item() / (denom if denom > 0 else 1.0)


def compile_for_sm90(*args: str) -> str:
    """stdout of ``tests/compile_for_sm90.py *args``, run in a process with the interpreter off
    (the kernels compile for an H100 there, no GPU needed); fails the test when it fails."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    script = os.path.join(os.path.dirname(__file__), "compile_for_sm90.py")
    done = subprocess.run([sys.executable, script, *args], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout
