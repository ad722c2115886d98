"""Test-wide setup. Without a CUDA device, Triton kernels run on the CPU through Triton's
interpreter; it must be switched on before any module defining @triton.jit kernels is imported."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
