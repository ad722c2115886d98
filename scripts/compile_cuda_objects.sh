#!/usr/bin/env bash
# Compiles every CUDA source under csrc/ with this machine's nvcc against the installed torch's
# headers, into object files only (in a temporary directory; nothing is linked or installed).
# This keeps the CUDA kernels compiling where no GPU (or only a CPU build of torch) exists.
# Fails on the first compile error. Flags follow torch.utils.cpp_extension's CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
NVCC=${NVCC:-nvcc}
ARCH=${CUDA_OBJECTS_ARCH:-90}   # H100 (sm_90), as setup.py's default TORCH_CUDA_ARCH_LIST

build=$(mktemp -d "${TMPDIR:-/tmp}/acl_fused_cuda_objects.XXXXXX")
trap 'rm -rf "$build"' EXIT

eval "$("$PY" - <<'PYEOF'
import inspect, os, shlex, sysconfig
import torch
from torch.utils import cpp_extension
root = os.path.join(os.path.dirname(torch.__file__), "include")
print("TORCH_INCLUDE=" + shlex.quote(root))
print("TORCH_API_INCLUDE=" + shlex.quote(os.path.join(root, "torch", "csrc", "api", "include")))
print("PY_INCLUDE=" + shlex.quote(sysconfig.get_paths()["include"]))
print("COMMON_NVCC_FLAGS=" + shlex.quote(" ".join(cpp_extension.COMMON_NVCC_FLAGS)))
print("CXX11_ABI=" + str(int(torch._C._GLIBCXX_USE_CXX11_ABI)))
# The C++ standard torch's own extension builds use (C++17 in older releases, C++20 in newer ones).
print("CXX_STD=" + ("c++20" if "-std=c++20" in inspect.getsource(cpp_extension) else "c++17"))
PYEOF
)"

# A CPU build of torch lacks this CMake-generated header; CUDA builds ship it with this content.
shim="$build/include"
if [ ! -f "$TORCH_INCLUDE/c10/cuda/impl/cuda_cmake_macros.h" ]; then
    mkdir -p "$shim/c10/cuda/impl"
    printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$shim/c10/cuda/impl/cuda_cmake_macros.h"
fi

mapfile -t sources < <(find csrc -name '*.cu' | sort)
if [ "${#sources[@]}" -eq 0 ]; then
    echo "compile_cuda_objects: no .cu sources under csrc/" >&2
    exit 1
fi
for src in "${sources[@]}"; do
    obj="$build/obj/${src%.cu}.o"
    mkdir -p "$(dirname "$obj")"
    echo "nvcc (sm_$ARCH, $CXX_STD) $src"
    # shellcheck disable=SC2086  # COMMON_NVCC_FLAGS is a list of flags
    "$NVCC" -c "$src" -o "$obj" -std="$CXX_STD" -O3 \
        -gencode "arch=compute_$ARCH,code=sm_$ARCH" $COMMON_NVCC_FLAGS \
        -Xcompiler -fPIC -D_GLIBCXX_USE_CXX11_ABI="$CXX11_ABI" -DTORCH_EXTENSION_NAME=_C \
        -I csrc -I "$shim" -I "$TORCH_INCLUDE" -I "$TORCH_API_INCLUDE" -I "$PY_INCLUDE"
done
echo "compile_cuda_objects: ${#sources[@]} CUDA source(s) compiled to objects"
