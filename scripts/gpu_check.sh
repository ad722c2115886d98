#!/usr/bin/env bash
# The GPU checks in one call of a lent device machine (its image: PyTorch 2.11, Triton 3.6, nvcc,
# pytest-xdist, pytest-timeout, no network): build the CUDA extension, run the whole suite there,
# then the throughput sweeps and a profile of one step per implementation. Every log and report
# goes to $OUT (the folder that comes back: at most 8 files), so a step that fails or runs out of
# time still leaves what the others measured, and the log holds each test's result and each sweep
# row as it came.
#
#   OUT=... [BUDGET=seconds] bash scripts/gpu_check.sh [test] [bench] [wide]   (test bench when none is named)
#
# A task lent a device has 15 minutes of device time in all, the machine's start (a minute or
# more) included; one call may run 10, and a machine left idle for 30 s is given back (the next
# call starts a fresh one and builds again). So the plan is one call: the whole call ends within
# BUDGET seconds (default 540; give the device tool a timeout_s of 600), each step within its own
# limit; steps the budget no longer reaches are reported as not run.
# Triton compiles each kernel specialization once per machine (1-5 s each for sm_90 with Triton
# 3.6, plus a C launcher built with gcc per signature), which the quick sweep's Triton rows need
# about 70 of: one process would spend minutes compiling. So the sweeps come in two: nn.Conv2d
# with `native` and the reference first (no Triton: the auto backend's evidence), then the Triton
# backends, after one short process per case has compiled their kernels side by side on the
# machine's cores into Triton's disk cache. `wide` (ResNet-18's shapes at batch 32 and 128,
# nn.Conv2d, native and the reference) is for a later task's call of its own.
# Exit status: 0 when every step ran and passed. DEVICE=cpu runs the same steps on the CPU (a dry
# run of this script).
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder that comes back}"
DEVICE=${DEVICE:-cuda}
PY=${PYTHON:-$(command -v python3 || command -v python)}
BUDGET=${BUDGET:-540}
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
stages=${*:-test bench}
mkdir -p "$OUT"
log="$OUT/log.txt"
sweeps=$(mktemp -d "${TMPDIR:-/tmp}/acl_fused_sweeps.XXXXXX")
deadline=$((SECONDS + BUDGET))
failed=0

# step NAME SECONDS COMMAND...: runs COMMAND for at most SECONDS (and not past the budget), its
# output appended to the log.
step() {
    local name=$1 limit=$2 left=$((deadline - SECONDS)) status
    shift 2
    if [ "$left" -lt 20 ]; then
        echo "!! $name not run: the ${BUDGET}s budget is spent" | tee -a "$log"
        failed=1
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name (limit ${limit}s, $(date -u +%H:%M:%S) UTC): $*" | tee -a "$log"
    timeout -k 10 "$limit" "$@" >>"$log" 2>&1
    status=$?
    if [ "$status" -ne 0 ]; then
        echo "!! $name failed with exit status $status$([ "$status" -eq 124 ] && echo ' (time limit)')" | tee -a "$log"
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

# compile_triton SECONDS: the Triton kernels of the quick sweep's cases and of the profile's, each
# (shape, dtype, format) in a process of its own, all at once, timed for one call each; what
# they compile stays in Triton's disk cache for the sweep and the profile (same shapes, batch and
# ACL_FUSED_AUTOTUNE, hence the same specializations). Their output goes to the log only on failure.
compile_triton() {
    local cases
    cases=$("$PY" - <<'PYEOF'
from benchmarks.shapes import SWEEPS
from benchmarks.step_profile import DEFAULTS
quick, profile = SWEEPS[("cuda", True)], DEFAULTS["cuda"]
assert (quick.batches, quick.image_size) == ((profile["batch"],), profile["image_size"])
cases = {(s, d, f) for s in quick.shapes for d in quick.dtypes for f in quick.memory_formats}
cases |= {(s, profile["dtype"], "nchw") for s in profile["shapes"]}
print("\n".join(" ".join(c) for c in sorted(cases)))
PYEOF
    ) || { echo "!! compile_triton: could not list the cases" | tee -a "$log"; failed=1; return; }
    # The shell stays until its processes end (timeout signals their group; its -k kill reaches
    # them only while the shell it started runs), and fails when one of them failed.
    step "compile Triton kernels ($(echo "$cases" | wc -l) processes)" "$1" bash -c '
        trap "wait; exit 124" TERM
        cases=() pids=()
        while read -r shape dtype format; do
            cases+=("$shape $dtype $format")
            "$0" -m benchmarks.throughput --device cuda --quick --sections layers --shapes "$shape" \
                --dtypes "$dtype" --memory-formats "$format" --passes forward+backward --backends triton,triton_fused \
                --rounds 1 --rep-ms 1 --warmup-ms 0 --out "$1/compile_${#pids[@]}" >"$1/compile_${#pids[@]}.log" 2>&1 &
            pids+=($!)
        done
        status=0
        for i in "${!pids[@]}"; do
            wait "${pids[$i]}" || { echo "!! compiling for ${cases[$i]} failed:"; tail -20 "$1/compile_$i.log"; status=1; }
        done
        exit $status' "$PY" "$sweeps" <<<"$cases"
}

# pytest options for the optional plugins the image has: workers over the cores (xdist; then each
# test's result on its own line, so a suite stopped by its limit still shows what ran) and a
# per-test limit, so one hung test cannot take the whole step.
test_options() {
    "$PY" - <<'PYEOF'
import importlib.util, os
options = ["-n", str(min(12, os.cpu_count() or 1)), "-v"] if importlib.util.find_spec("xdist") else ["-q"]
if importlib.util.find_spec("pytest_timeout"):
    options += ["--timeout", "120"]
print(" ".join(options))
PYEOF
}

{
    command -v nvidia-smi >/dev/null && nvidia-smi
    echo "ninja: $(command -v ninja || echo 'not found: the build compiles one file at a time')"
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', \
triton.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"
} >>"$log" 2>&1
cuda_build=$([ "$DEVICE" = cuda ] && echo 1 || echo 0)
step build 130 env ACL_FUSED_CUDA="$cuda_build" "$PY" -m pip install -q --no-build-isolation --no-deps -e .
case " $stages " in *" test "*)
    required=native,triton,triton_fused
    [ "$DEVICE" = cuda ] || required=native
    # shellcheck disable=SC2046  # the options are words
    # Triton's autotuning off for the tests (acl_fused/backends/triton_conv.py AUTOTUNE): each new
    # test shape would time and compile every candidate; the sweeps below turn it off too.
    step tests 190 env ACL_FUSED_REQUIRE_BACKENDS="$required" ACL_FUSED_AUTOTUNE=0 "$PY" -m pytest tests/ -ra -p no:cacheprovider \
        --durations=15 $(test_options)
esac
# triton_fused's autotuning off in the sweeps: it would compile and time 15 kernel candidates per
# kernel size, layout, dtype and format (1-9 s a compile, measured for sm_90 on the 2-core
# development machine) before the first row; each kernel's first candidate is spill-free in TF32
# and bf16 (tests/compile_for_sm90.py). A sweep stopped by its limit still writes its report.
export ACL_FUSED_AUTOTUNE=0
case " $stages " in *" bench "*)
    # The targets' evidence first: synthesis alone, then the 7x7 stem, 64-64k3s1 and 256-256k3s1 at
    # batch 32 (TF32 and bf16, both formats) and a ResNet-18 step, without Triton; then the Triton
    # backends' rows; then where each step's time goes (host, synthesis, convolution kernels), for
    # the report on any target missed.
    sweep quick 70 --quick --backends native,reference
    [ "$DEVICE" = cuda ] && compile_triton 55
    sweep quick-triton 45 --quick --sections synthesis,layers --backends triton,triton_fused
    step profile 45 "$PY" -m benchmarks.step_profile --device "$DEVICE" --out "$OUT"
esac
case " $stages " in *" wide "*)
    # Every ResNet-18 shape at batch 32 and 128 in cuDNN's default TF32, without Triton (its
    # compiles alone would take the call).
    sweep b32 150 --batches 32 --dtypes tf32 --sections layers --backends native,reference
    sweep b128 150 --batches 128 --dtypes tf32 --sections layers --backends native,reference
esac
rm -rf "$sweeps"
echo "== done after $((SECONDS))s: $([ "$failed" -eq 0 ] && echo 'every step passed' || echo 'some step failed or did not run (see above)')" | tee -a "$log"
exit "$failed"
