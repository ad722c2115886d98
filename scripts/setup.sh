#!/usr/bin/env bash
# Installs what acl_fused needs into the current Python and builds the package in place.
# Keeps a torch / triton that is already there (e.g. a GPU image); otherwise installs
# torch==2.13.0 (on this project's machines: the local CPU wheel, never a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip_install() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }

"$PY" -c "import torch" 2>/dev/null || pip_install "torch==2.13.0"
"$PY" -c "import triton" 2>/dev/null || pip_install "triton>=3.6"
missing=$("$PY" - <<'PYEOF'
import importlib.util
want = {"pytest": "pytest", "pytest_benchmark": "pytest-benchmark", "hypothesis": "hypothesis",
        "numpy": "numpy", "matplotlib": "matplotlib", "ninja": "ninja", "setuptools": "setuptools"}
print(" ".join(pkg for mod, pkg in want.items() if importlib.util.find_spec(mod) is None))
PYEOF
)
# Optional tools: an offline machine (e.g. a GPU image without network) goes on without them.
for pkg in $missing; do pip_install "$pkg" || echo "setup: could not install $pkg (offline?); continuing" >&2; done
# --no-build-isolation: build against the torch installed above, without network.
MAX_JOBS=${MAX_JOBS:-2} pip_install --no-build-isolation --no-deps -e .
"$PY" -c "import torch, acl_fused; print(f'acl_fused {acl_fused.__version__} ready: torch {torch.__version__}')"
