"""acl_fused build: the Python package plus the native extension ``acl_fused._C`` (csrc/).

The C++ CPU kernels are always built; the CUDA kernels too when a CUDA toolkit and a CUDA build
of torch are present. Environment switches:

    ACL_FUSED_NO_EXT=1      pure-Python install (the ``native`` backend reports itself unavailable)
    ACL_FUSED_CUDA=0 / 1    force the CUDA sources off / on (1 fails if CUDA cannot be built)
    TORCH_CUDA_ARCH_LIST    CUDA architectures (default "9.0": H100)
    MAX_JOBS                parallel compile jobs (ninja)

Build without network against the installed torch: ``pip install --no-build-isolation -e .``
"""
import os
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"


def _sources(pattern: str) -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in CSRC.glob(pattern))


def _want_cuda(cpp_extension) -> bool:
    import torch

    available = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    forced = os.environ.get("ACL_FUSED_CUDA")
    if forced is None:
        return available
    if forced not in ("0", "1"):
        raise RuntimeError(f"ACL_FUSED_CUDA must be 0 or 1, got {forced!r}")
    if forced == "1" and not available:
        raise RuntimeError(
            "ACL_FUSED_CUDA=1 but CUDA cannot be built here: needs a CUDA build of torch "
            f"(torch.version.cuda = {torch.version.cuda}) and a CUDA toolkit (CUDA_HOME = {cpp_extension.CUDA_HOME})")
    return forced == "1"


def _build_command(cpp_extension):
    class BuildExtension(cpp_extension.BuildExtension):
        """Compiles into build/native/, kept between builds so ninja recompiles only what changed
        (pip's editable install would otherwise hand it a fresh temporary directory each time)."""

        def build_extensions(self):
            self.build_temp = str(ROOT / "build" / "native")
            super().build_extensions()

    return BuildExtension


def _extension_build():
    """(ext_modules, cmdclass) for acl_fused._C, or nothing when ACL_FUSED_NO_EXT=1."""
    if os.environ.get("ACL_FUSED_NO_EXT") == "1":
        return [], {}
    import torch
    from torch.utils import cpp_extension

    sources = _sources("*.cpp") + _sources("cpu/*.cpp")
    cxx_flags, link_flags = ["-O3"], []
    if torch.backends.openmp.is_available() and sys.platform.startswith("linux"):
        # at::parallel_for is inline OpenMP code: without -fopenmp the CPU kernels run on one
        # thread. libgomp resolves to the copy torch already loaded (same soname, one pool).
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    if _want_cuda(cpp_extension):
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        extension = cpp_extension.CUDAExtension(
            "acl_fused._C", sources + _sources("cuda/*.cu"), include_dirs=[str(CSRC)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]}, extra_link_args=link_flags)
    else:
        extension = cpp_extension.CppExtension(
            "acl_fused._C", sources, include_dirs=[str(CSRC)], extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags)
    return [extension], {"build_ext": _build_command(cpp_extension)}


ext_modules, cmdclass = _extension_build()

setup(
    name="acl_fused",
    version="0.1.0",
    description="Analytic Convolutional Layer with fused kernel synthesis (Triton, C++/CUDA)",
    packages=find_packages(include=["acl_fused", "acl_fused.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4"],
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
