"""The benchmarks run (CI times nothing, but `make run` and `pytest benchmarks/` must not rot).

make run's smoke check (`python -m acl_fused`); one tiny sweep of the throughput script (every
section, every backend that runs on CPU without Triton's interpreter), checked for what it writes;
the gradient-penalty script; and the pytest-benchmark suites in their untimed smoke mode.
"""
from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from acl_fused.backends import native
from benchmarks.throughput import git_commit
from benchmarks.timing import peak_memory
from conftest import skip_or_fail_unavailable

ROOT = Path(__file__).resolve().parents[1]


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return done


def test_smoke_check_of_make_run_passes():
    """`python -m acl_fused`, make run's first part: gradcheck and gradgradcheck of every backend
    that runs here (interpreted Triton excluded), exit status 0."""
    out = run("-m", "acl_fused").stdout
    assert "  reference     gradcheck PASS, gradgradcheck PASS" in out
    if native.EXTENSION_ERROR is None:
        assert "  native        gradcheck PASS, gradgradcheck PASS" in out


def test_gradient_penalty_script_times_every_step():
    if native.EXTENSION_ERROR is not None:
        skip_or_fail_unavailable("native", native.EXTENSION_ERROR)
    out = run("-m", "benchmarks.gradient_penalty", "--device", "cpu", "--channels", "4", "--size", "6",
              "--min-run-time", "0.01", "--rounds", "1").stdout
    assert "command: python -m benchmarks.gradient_penalty --device cpu" in out
    rows = {line.split(" | ")[0].strip("| "): line for line in out.splitlines() if line.startswith("| ")}
    assert rows["step"] == "| step | nn.Conv2d | native | reference |"
    for step in ("train", "R1", "R1+params"):
        assert rows[step].count("x)") == 3, rows[step]


def test_func_transforms_script_times_every_transform():
    if native.EXTENSION_ERROR is not None:
        skip_or_fail_unavailable("native", native.EXTENSION_ERROR)
    out = run("-m", "benchmarks.func_transforms", "--device", "cpu", "--channels", "4", "--size", "6",
              "--batch", "2", "--min-run-time", "0.01", "--rounds", "1").stdout
    assert "command: python -m benchmarks.func_transforms --device cpu" in out
    rows = {line.split(" | ")[0].strip("| "): line for line in out.splitlines() if line.startswith("| ")}
    assert rows["transform"] == "| transform | nn.Conv2d | native | reference |"
    for transform in ("per-sample grads", "grad", "ensemble", "jvp"):
        assert rows[transform].count("x)") == 3, rows[transform]


def test_one_layer_scripts_leave_out_an_implementation_whose_call_fails():
    """gradient_penalty and func_transforms time only implementations all of whose calls run; the
    others are named with their error (the first case that failed) under the table."""
    from benchmarks.one_layer import running

    def fails():
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore")
    layers = {"nn.Conv2d": torch.nn.Identity(), "triton": torch.nn.Identity()}
    fns = {("nn.Conv2d", "grad"): lambda: None, ("nn.Conv2d", "jvp"): lambda: None,
           ("triton", "grad"): lambda: None, ("triton", "jvp"): fails}
    fns, layers, not_timed = running(fns, layers, ["reference: not timed: why"], torch.device("cpu"))
    assert list(fns) == [("nn.Conv2d", "grad"), ("nn.Conv2d", "jvp")] and list(layers) == ["nn.Conv2d"]
    assert not_timed == ["reference: not timed: why",
                         "triton: not timed: jvp: RuntimeError: CUDA error: an illegal memory access was encountered"]


def test_throughput_script_writes_every_report(tmp_path):
    if native.EXTENSION_ERROR is not None:
        skip_or_fail_unavailable("native", native.EXTENSION_ERROR)
    run("-m", "benchmarks.throughput", "--device", "cpu", "--shapes", "64-64k3s1", "--image-size", "32",
        "--batches", "1", "--passes", "forward+backward", "--backends", "native,reference,triton",
        "--min-run-time", "0.01", "--rounds", "1", "--train-image-size", "32", "--train-batch", "2",
        "--out", str(tmp_path))

    layers = read_rows(tmp_path / "layers_cpu.csv")
    timed = {r["impl"] for r in layers if r["status"] == "ok"}
    assert timed == {"nn.Conv2d", "native/default", "native/analytic", "reference/default", "reference/analytic"}
    for r in layers:
        if r["status"] == "ok" and r["impl"] != "nn.Conv2d":
            assert float(r["median_ms"]) > 0 and float(r["vs_conv"]) > 0
            assert float(r["rel_err"]) < 1e-5, r          # SPEC §6, float32 IEEE
        if r["status"] == "ok":
            assert float(r["peak_mib"]) > 0, r             # the CPU's peak, from the profiler's record
    assert {r["impl"] for r in layers if r["status"] == "not timed"} == {"triton/default", "triton/analytic"}
    synthesis = {r["impl"]: r for r in read_rows(tmp_path / "synthesis_cpu.csv")}
    assert synthesis["native"]["status"] == synthesis["reference"]["status"] == "ok"
    training = {r["impl"]: r for r in read_rows(tmp_path / "training_cpu.csv")}
    assert float(training["native"]["images_per_s"]) > 0 and float(training["native"]["peak_mib"]) > 0
    report = (tmp_path / "throughput_cpu.md").read_text()
    assert "## Summary" in report and "## Training step" in report and "## Memory: peak MiB" in report
    assert "- heap: " in report   # the CPU heap setting the timings ran with (timing.keep_freed_memory)


def test_throughput_script_stopped_by_an_error_still_writes_its_report(tmp_path, monkeypatch):
    """An error outside a row's own checks (a CUDA kernel's fault, raised where the sweep next
    synchronises) ends the sweep, not the report: what was measured is written, the report says
    where it stopped, and the exit status is 1."""
    from benchmarks import throughput

    def faulting_training(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    monkeypatch.setattr(throughput, "measure_training", faulting_training)
    status = throughput.main(["--device", "cpu", "--sections", "synthesis,training", "--backends", "reference",
                              "--min-run-time", "0.01", "--rounds", "1", "--out", str(tmp_path)])
    assert status == 1
    assert {r["impl"] for r in read_rows(tmp_path / "synthesis_cpu.csv")} == {"reference"}
    report = (tmp_path / "throughput_cpu.md").read_text()
    assert "- stopped: RuntimeError: CUDA error: an illegal memory access was encountered: the sweep is incomplete" \
        in report


def test_throughput_sweep_stops_once_on_a_repeated_sigterm():
    """timeout(1) signals the sweep and then its process group: the second SIGTERM, arriving while
    the first one's SweepStopped unwinds, must not raise again (that one would escape main() and
    lose the report)."""
    import os
    import signal

    from benchmarks.throughput import SweepStopped, stop_sweep
    previous = signal.signal(signal.SIGTERM, stop_sweep)
    try:
        with pytest.raises(SweepStopped, match="stopped by SIGTERM"):
            os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)   # ignored: nothing raised, the process lives on
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_step_profile_reports_where_each_step_goes(tmp_path):
    """python -m benchmarks.step_profile: per implementation a row of wall and host ms a step, and
    the operators that took the most (here, on the CPU, by self time): native's own ops (its
    synthesis), the reference's elementwise ops, nn.Conv2d's convolution and no acl_fused op."""
    if native.EXTENSION_ERROR is not None:
        skip_or_fail_unavailable("native", native.EXTENSION_ERROR)
    run("-m", "benchmarks.step_profile", "--device", "cpu", "--shapes", "64-64k3s1", "--image-size", "32",
        "--batch", "1", "--steps", "2", "--backends", "native,reference,triton", "--out", str(tmp_path))
    report = (tmp_path / "step_profile_cpu.md").read_text()
    assert "- command: `python -m benchmarks.step_profile --device cpu" in report
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in report.splitlines() if line.startswith("| ")}
    for impl in ("nn.Conv2d", "native/default", "reference/default"):
        assert float(rows[impl][1]) > 0 and float(rows[impl][3]) > 0, rows[impl]   # wall and host ms
    assert "interpreted Triton on CPU is a test tool" in rows["triton/default"][-1]

    def top_operators(impl: str) -> str:  # the list under impl's heading
        return report.split(f"\n{impl}, operators by self CPU time")[1].split("\n\n")[1]

    assert "`acl_fused::" in top_operators("native/default")
    assert "acl_fused" not in top_operators("nn.Conv2d") and "conv" in top_operators("nn.Conv2d")
    reference_ops = [line.split("`")[1] for line in top_operators("reference/default").splitlines()]
    assert any("conv" not in op for op in reference_ops), reference_ops  # its synthesis, elementwise ops


def test_git_commit_says_when_the_tree_is_edited(tmp_path, monkeypatch):
    """The reports' commit line: HEAD's hash alone for a clean tree (untracked files do not count),
    with "+ uncommitted changes" once a tracked file is edited."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # no repository above tmp_path
    assert git_commit(tmp_path) == "unknown"
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / "kernel.py").write_text("a = 1\n")
    subprocess.run([*git, "add", "kernel.py"], check=True)
    subprocess.run([*git, "commit", "-qm", "c"], check=True)
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    (tmp_path / "notes.txt").write_text("untracked")
    assert git_commit(tmp_path) == head
    (tmp_path / "kernel.py").write_text("a = 2\n")
    assert git_commit(tmp_path) == head + " + uncommitted changes"


def test_pytest_benchmark_suites_smoke(tmp_path):
    """`pytest benchmarks/` without --benchmark-only runs every CPU benchmark body once, untimed.
    Not the CUDA ones (~330 more, triton_fused compiling for each new shape: beyond the GPU run's
    per-test limit); they time the throughput sweep's cases (cases.LayerBench), which
    scripts/gpu_check.sh runs."""
    done = run("-m", "pytest", "benchmarks/", "-q", "-k", "cpu", "-p", "no:cacheprovider", f"--basetemp={tmp_path}")
    assert " passed" in done.stdout


def test_cpu_peak_memory_is_the_most_allocated_at_once():
    """peak_memory on the CPU (the profiler's allocation record): 1 MiB and 2 MiB held together, both
    freed, then 0.5 MiB held: the peak is 3 MiB, neither the largest block nor what is left."""
    mib = 2**20

    def allocate() -> torch.Tensor:
        a, b = torch.empty(mib // 4), torch.empty(mib // 2)
        del a, b
        return torch.empty(mib // 8)

    peak = peak_memory(allocate, torch.device("cpu"))
    assert peak is not None, "this torch's profiler keeps no allocation record"
    assert 3 * mib <= peak < 3 * mib + 64 * 1024, peak / mib


def test_cpu_peak_memory_counts_frees_of_memory_held_before_the_call():
    """A call that frees a 2 MiB block held since before it, then holds 1 MiB and a new 2 MiB
    block (as the CPU backend's W buffer can be replaced in a backward) peaks at 1 MiB beyond what
    was held before it, not 3: the profiler never sees a block allocated before it started freed."""
    mib = 2**20
    held = [torch.empty(mib // 2)]

    def replace_held() -> torch.Tensor:
        held[0] = torch.empty(0)
        work = torch.empty(mib // 4)
        held[0] = torch.empty(mib // 2)
        return work

    peak = peak_memory(replace_held, torch.device("cpu"))
    assert peak is not None, "this torch's profiler keeps no allocation record"
    assert mib <= peak < mib + 64 * 1024, peak / mib


def test_cpu_peak_memory_runs_reset_outside_the_measured_call():
    """A step that drops the previous step's 2 MiB "gradient" and makes a new one peaks at 2 MiB
    beyond the state reset() leaves (the previous gradient dropped, as by zero_grad), not at 0."""
    mib = 2**20
    held: list[torch.Tensor] = []

    def step() -> None:
        held.clear()
        held.append(torch.empty(mib // 2))

    peak = peak_memory(step, torch.device("cpu"), reset=held.clear)
    assert peak is not None, "this torch's profiler keeps no allocation record"
    assert 2 * mib <= peak < 2 * mib + 64 * 1024, peak / mib
