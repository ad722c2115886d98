#!/usr/bin/env bash
# The GPU checks in one call of a lent device machine (its image: PyTorch 2.11, Triton 3.6, nvcc, no
# network): build the CUDA extension, run the whole suite there, then the throughput sweeps. Every
# log and report goes to $OUT (the folder that comes back: at most 8 files), so a step that fails
# or runs out of time still leaves what the others measured.
#
#   OUT=... bash scripts/gpu_check.sh [test] [bench]      (both when none is named)
#
# Each stage stays inside the 10 minutes of one device call (build 4 + tests 5, or build + sweeps
# 3 + 4 at most, the build being ninja's no-op the second time on a warm machine): `test` in one
# call, `bench` in the next.
# Exit status: 0 when every step passed. DEVICE=cpu runs the same steps on the CPU (a dry run).
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder that comes back}"
DEVICE=${DEVICE:-cuda}
PY=${PYTHON:-python}
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
stages=${*:-test bench}
log="$OUT/log.txt"
sweeps=$(mktemp -d "${TMPDIR:-/tmp}/acl_fused_sweeps.XXXXXX")
failed=0

# step NAME SECONDS COMMAND...: runs COMMAND with a time limit, its output appended to the log.
step() {
    local name=$1 limit=$2 status
    shift 2
    echo "== $name (limit ${limit}s, $(date -u +%H:%M:%S) UTC): $*" | tee -a "$log"
    timeout "$limit" "$@" >>"$log" 2>&1
    status=$?
    if [ "$status" -ne 0 ]; then
        echo "!! $name failed with exit status $status" | tee -a "$log"
        failed=1
    fi
}

# sweep NAME SECONDS ARGS...: a throughput sweep; its Markdown report and layer CSV come back.
sweep() {
    local name=$1 limit=$2
    shift 2
    step "sweep $name" "$limit" "$PY" -m benchmarks.throughput --device "$DEVICE" --out "$sweeps/$name" "$@"
    for f in "$sweeps/$name"/throughput_*.md "$sweeps/$name"/layers_*.csv; do
        [ -f "$f" ] && cp "$f" "$OUT/${name}_$(basename "$f")"
    done
}

{
    command -v nvidia-smi >/dev/null && nvidia-smi
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', \
triton.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"
} >>"$log" 2>&1
cuda_build=$([ "$DEVICE" = cuda ] && echo 1 || echo 0)
step build 240 env ACL_FUSED_CUDA="$cuda_build" "$PY" -m pip install -q --no-build-isolation --no-deps -e .
case " $stages " in *" test "*)
    required=native,triton,triton_fused
    [ "$DEVICE" = cuda ] || required=native
    step tests 300 env ACL_FUSED_REQUIRE_BACKENDS="$required" "$PY" -m pytest tests/ -q -ra -p no:cacheprovider
esac
case " $stages " in *" bench "*)
    sweep quick 180 --quick
    sweep b32 240 --batches 32 --dtypes tf32,bf16 --sections layers
esac
rm -rf "$sweeps"
echo "== done: $([ "$failed" -eq 0 ] && echo 'every step passed' || echo 'some step failed (see above)')" | tee -a "$log"
exit "$failed"
