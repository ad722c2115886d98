# Quick start: `make run` (main job) and `make test` (test suite). Both set everything up first.
PYTHON ?= python3
export PYTHON

.PHONY: setup run test bench cuda-objects

setup:
	bash scripts/setup.sh

# Correctness smoke check, parameter savings, then the throughput benchmark on this device.
run: setup
	$(PYTHON) -m acl_fused
	$(PYTHON) -m benchmarks.throughput --quick

# Every backend must run here (Triton through its interpreter on CPU): a backend that cannot run
# fails its tests instead of skipping them.
test: setup cuda-objects
	ACL_FUSED_REQUIRE_BACKENDS=native,triton,triton_fused $(PYTHON) -m pytest tests/ -q -ra

# CUDA sources must keep compiling even where they cannot run (no GPU here).
cuda-objects:
	@if command -v nvcc >/dev/null 2>&1; then bash scripts/compile_cuda_objects.sh; \
	else echo "nvcc not found: CUDA object compile check skipped"; fi

bench: setup
	$(PYTHON) -m benchmarks.throughput
	$(PYTHON) -m pytest benchmarks/ --benchmark-only -q
