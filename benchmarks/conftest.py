"""pytest-benchmark suites: ``pytest benchmarks/ --benchmark-only``.

The suites are the files ``bench_*.py`` in this folder, collected by the hook below only when pytest
looks here, so ``pytest tests/`` never picks them up. Without ``--benchmark-only`` (or
``--benchmark-enable``) every benchmark runs its callable once, untimed: a quick smoke run.
Every case runs the quick sweep of shapes.SWEEPS on each available device; benchmark groups are
``device shape batch dtype format pass`` so nn.Conv2d, the reference path and every fused backend
sit side by side. A summary of median ratios per group closes the run.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pytest

from .cases import CONV2D, REFERENCE
from .timing import keep_freed_memory

HERE = Path(__file__).resolve().parent


def pytest_collect_file(file_path, parent):
    # pytest itself collects a file named on the command line
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.pluginmanager.hasplugin("benchmark"):
        return
    skip = pytest.mark.skip(reason="pytest-benchmark is not installed (or disabled with -p no:benchmark)")
    for item in items:
        if HERE in item.path.parents and "benchmark" in getattr(item, "fixturenames", ()):
            item.add_marker(skip)


def _timing_requested(config: pytest.Config) -> bool:
    return bool(config.getoption("benchmark_only", False) or config.getoption("benchmark_enable", False))


def pytest_configure(config: pytest.Config) -> None:
    if _timing_requested(config):
        keep_freed_memory()   # as the throughput script does on CPU (timing.py)


@pytest.fixture
def benchmark(benchmark, request):
    """pytest-benchmark's fixture, disabled (one untimed call) unless timing was asked for."""
    if not _timing_requested(request.config):
        benchmark.disabled = True
    return benchmark


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    groups: dict[str, dict[str, float]] = defaultdict(dict)
    for bench in session.benchmarks:
        if not bench.has_error and bench.stats is not None:
            groups[bench.group][bench.extra_info.get("impl", bench.name)] = bench.stats.median
    terminalreporter.section("median time ratios per group (vs nn.Conv2d; vs reference)")
    for group, medians in groups.items():
        conv, ref = medians.get(CONV2D), medians.get(REFERENCE)
        cells = []
        for impl, t in sorted(medians.items(), key=lambda kv: kv[1]):
            base = conv or medians.get(f"{REFERENCE}/{impl.split('/')[-1]}") or ref
            cells.append(f"{impl} {t * 1e3:.3f} ms ({t / base:.2f}x)" if base else f"{impl} {t * 1e3:.3f} ms")
        basis = CONV2D if conv else REFERENCE
        terminalreporter.write_line(f"{group} [x {basis}]: " + "; ".join(cells))
