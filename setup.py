"""acl_fused build. Pure-Python package; the native C++/CUDA extension is added by csrc/ (see README)."""
from setuptools import find_packages, setup

setup(
    name="acl_fused",
    version="0.1.0",
    description="Analytic Convolutional Layer with fused kernel synthesis (Triton, C++/CUDA)",
    packages=find_packages(include=["acl_fused", "acl_fused.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4"],
)
