"""pytest wiring of the benchmark suite: sizes, device, hardware limits and the one results file per run.

`pytest benchmarks/` collects every `bench_*.py` here. Sizes are small by default (a CPU run takes a
few minutes); `--gpu-sizes` or `BENCH_FULL=1` selects the full sizes (hidden 512-4096, 8k-64k tokens,
every preset's training step). The device's copy bandwidth and matmul rate are measured before the
first benchmark. Each case a benchmark records (through the `bench` fixture) lands in
`benchmarks/results/<device>-<YYYYmmdd-HHMMSS>.json`, rewritten atomically after every case, so a
run cut short by a timeout still leaves a valid file. Tests that only use pytest-benchmark's
`benchmark` fixture (without `bench.record`) are recorded too, from pytest-benchmark's statistics
and `extra_info` (keys `group`, `impl`, `tokens_per_s`, ... are taken from it when present).
"""

from __future__ import annotations

import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import torch
from common import (
    RESULTS_DIR,
    SCHEMA,
    SuiteClock,
    Timing,
    compute_ratios,
    device_slug,
    file_priority,
    git_commit,
    is_cuda_run,
    timing_from_samples,
    write_json_atomic,
)
from hardware import measure_hardware


def pytest_addoption(parser):
    group = parser.getgroup("minimind_fast benchmarks")
    group.addoption("--gpu-sizes", action="store_true", default=False,
                    help="full benchmark sizes (also BENCH_FULL=1); default: small CPU sizes")
    group.addoption("--bench-results-dir", default=os.environ.get("BENCH_RESULTS_DIR", str(RESULTS_DIR)),
                    help="where the run's results JSON goes (default benchmarks/results)")
    group.addoption("--bench-deadline", type=float, default=None,
                    help="seconds after which tests not yet started are left out and listed in the results "
                         "(default 480 with --gpu-sizes on CUDA, so that `make bench-gpu`, the test running at "
                         "the deadline and the report end within 10 "
                         "minutes; none otherwise; env BENCH_DEADLINE_S, 0 = none)")
    group.addoption("--bench-compile-budget", type=float, default=None,
                    help="seconds of torch.compile warm-up allowed per run before compile cases are "
                         "skipped (default 240 on CUDA, 90 on CPU; 0: none; env BENCH_COMPILE_BUDGET_S)")


def pytest_collect_file(file_path: Path, parent):
    # A file named on the command line is collected by pytest itself; don't collect it twice.
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and not parent.session.isinitpath(file_path)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"CPU {line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    except OSError:
        pass
    return f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()}"


class BenchSession:
    """What every benchmark needs: device, dtype, sizes, hardware limits, and the results file."""

    def __init__(self, config):
        self.cuda = is_cuda_run()
        self.device = torch.device("cuda" if self.cuda else "cpu")
        # bf16 is what training runs on a GPU; CPU bf16 matmuls are slow paths not worth timing.
        self.dtype = torch.bfloat16 if self.cuda else torch.float32
        self.full = bool(config.getoption("--gpu-sizes")) or os.environ.get("BENCH_FULL") == "1"
        budget = config.getoption("--bench-compile-budget")
        if budget is None:
            budget = os.environ.get("BENCH_COMPILE_BUDGET_S") or (240.0 if self.cuda else 90.0)
        self.compile_budget_s = float(budget)  # 0: no compile case at all
        self.compile_spent_s = 0.0
        deadline = config.getoption("--bench-deadline")
        if deadline is None:
            deadline = os.environ.get("BENCH_DEADLINE_S", 480.0 if (self.cuda and self.full) else 0.0)
        self.clock = SuiteClock(float(deadline) or None)
        self.name = torch.cuda.get_device_name(self.device) if self.cuda else cpu_name()
        stamp = datetime.now(timezone.utc)
        self.path = Path(config.getoption("--bench-results-dir")) / (
            f"{device_slug(self.name)}-{stamp.strftime('%Y%m%d-%H%M%S')}.json")
        self.meta: dict[str, Any] = {
            "schema": SCHEMA,
            "device": self.name,
            "torch": torch.__version__,
            "triton": _version("triton"),
            "cuda": torch.version.cuda,
            "date": stamp.isoformat(timespec="seconds"),
            "commit": git_commit(),
            "full_sizes": self.full,
            "hardware": {},
        }
        self.cases: list[dict[str, Any]] = []
        self.recorded_nodeids: set[str] = set()

    # --- hardware fractions --------------------------------------------------------------------
    @property
    def hardware(self) -> dict[str, Any]:
        return self.meta["hardware"]

    def matmul_tflops(self, dtype: str) -> float | None:
        return self.hardware.get("bf16_tflops" if dtype == "bfloat16" else "fp32_tflops")

    # --- compile budget ------------------------------------------------------------------------
    def require_compile_budget(self) -> None:
        if not self.compile_budget_left():
            pytest.skip(f"torch.compile budget spent ({self.compile_spent_s:.0f}s > "
                        f"{self.compile_budget_s:.0f}s); raise --bench-compile-budget to include it")

    def compile_budget_left(self) -> bool:
        return self.compile_budget_s > 0 and self.compile_spent_s <= self.compile_budget_s

    def warm_up(self, fn, impl: str) -> float:
        """One untimed call, returning its seconds; for compiled functions that time (mostly
        compilation) counts to the compile budget."""
        start = time.perf_counter()
        fn()
        if self.cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        if impl == "compile":
            self.compile_spent_s += elapsed
        return elapsed

    # --- recording -----------------------------------------------------------------------------
    def record(self, benchmark, *, suite: str, group: str, impl: str, timing: Timing, shape: dict,
               dtype: str, peak_mem_MB: float | None = None, bytes_moved: float | None = None,
               flops: float | None = None, tokens: int | None = None, model_flops: float | None = None,
               **extra: Any) -> dict[str, Any]:
        """Add one measured case: derives bandwidth, FLOP rate, tokens/s and MFU from its raw counts."""
        seconds = timing.median_ms * 1e-3
        case: dict[str, Any] = {"suite": suite, "group": group, "name": f"{group} [{impl}]", "impl": impl,
                                "shape": shape, "dtype": dtype, **timing.as_dict(), "peak_mem_MB": peak_mem_MB}
        copy = self.hardware.get("copy_GBps")
        if bytes_moved:
            case["gbps"] = bytes_moved / seconds / 1e9
            case["frac_of_copy"] = case["gbps"] / copy if copy else None
        matmul = self.matmul_tflops(dtype)
        if flops:
            case["tflops"] = flops / seconds / 1e12
            case["frac_of_matmul"] = case["tflops"] / matmul if matmul else None
        if tokens:
            case["tokens_per_s"] = tokens / seconds
        if model_flops:
            achieved = model_flops / seconds / 1e12
            case["tflops"] = achieved
            peak = self.hardware.get("peak_bf16_tflops") if dtype == "bfloat16" else None
            case["mfu"] = achieved / peak if peak else None
            case["mfu_measured"] = achieved / matmul if matmul else None
        case.update(extra)
        benchmark.extra_info.update({k: v for k, v in case.items() if not isinstance(v, dict)})
        self._add(case, getattr(benchmark, "_bench_nodeid", None))
        return case

    def record_from_pytest_benchmark(self, nodeid: str, fixture) -> None:
        """A test that timed with pytest-benchmark alone: take its rounds and extra_info as one case."""
        stats = getattr(fixture, "stats", None)
        data = getattr(getattr(stats, "stats", None), "data", None)
        if not data:
            return
        info = dict(fixture.extra_info)
        timing = timing_from_samples([s * 1e3 for s in data])
        group = info.pop("group", None) or fixture.group or fixture.name.split("[")[0]
        impl = info.pop("impl", None) or (fixture.param or "default")
        suite = info.pop("suite", None) or Path(nodeid.split("::")[0]).stem.removeprefix("bench_")
        case = {"suite": suite, "group": group, "name": fixture.name, "impl": impl,
                "shape": info.pop("shape", {}), "dtype": info.pop("dtype", ""), **timing.as_dict(),
                "peak_mem_MB": info.pop("peak_mem_MB", None), **info}
        if "tokens" in info and "tokens_per_s" not in case:
            case["tokens_per_s"] = info["tokens"] / (timing.median_ms * 1e-3)
        self._add(case, nodeid)

    def _add(self, case: dict[str, Any], nodeid: str | None) -> None:
        if nodeid:
            self.recorded_nodeids.add(nodeid)
        self.cases.append(case)
        compute_ratios(self.cases)
        self.write()

    def write(self) -> None:
        write_json_atomic(self.path, {**self.meta, "cases": self.cases, "timing": self.clock.as_dict()})


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


_SESSION: BenchSession | None = None


@pytest.fixture(scope="session")
def bench_session(pytestconfig) -> BenchSession:
    global _SESSION
    session = BenchSession(pytestconfig)
    # Measured first, so that every later case can be put against the device's limits.
    session.meta["hardware"] = measure_hardware(session.device)
    _SESSION = session
    return session


@pytest.fixture(autouse=True)
def _hardware_first(bench_session, request):
    """Every benchmark (ours or another helper's) pulls in the session, so the limits come first; past
    the run's deadline a test is left out (and listed as not run)."""
    if bench_session.clock.past_deadline(request.node.nodeid):
        pytest.skip(f"suite deadline of {bench_session.clock.deadline_s:.0f}s passed "
                    "(--bench-deadline / BENCH_DEADLINE_S)")
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(items):
    """The issues' figures first (`common.FILE_PRIORITY`), so a run cut short has measured those."""
    items.sort(key=lambda item: file_priority(item.path))  # stable: a file's tests keep their order


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    start = time.perf_counter()
    if _SESSION is not None:
        _SESSION.clock.running = item.nodeid
        _SESSION.write()  # a kill (timeout) during this test leaves it named in the file
    yield
    if _SESSION is not None:
        _SESSION.clock.add(item.nodeid, time.perf_counter() - start)


@pytest.fixture
def bench(bench_session, benchmark, request) -> BenchSession:
    """The session object, with this test's benchmark fixture tagged so its case is not recorded twice."""
    benchmark._bench_nodeid = request.node.nodeid
    return bench_session


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    yield
    if call.when != "call" or call.excinfo is not None or _SESSION is None:
        return
    fixture = item.funcargs.get("benchmark") if hasattr(item, "funcargs") else None
    if fixture is not None and item.nodeid not in _SESSION.recorded_nodeids:
        _SESSION.record_from_pytest_benchmark(item.nodeid, fixture)


def pytest_runtest_logreport(report):
    """Print a failure at once: a run cut short by `timeout` never reaches pytest's summary."""
    if report.failed:
        text = report.longreprtext
        print(f"\nFAILED {report.nodeid} ({report.when}):\n{text[-3000:]}", file=sys.stderr, flush=True)


def pytest_sessionfinish(session):
    if _SESSION is None:
        return
    if _SESSION.cases or _SESSION.clock.not_run:
        _SESSION.write()  # the last test's seconds and the tests left out
    else:  # nothing measured (every test skipped): the file written before each test is no result
        _SESSION.path.unlink(missing_ok=True)


def pytest_terminal_summary(terminalreporter):
    if _SESSION is not None and _SESSION.clock.not_run:
        terminalreporter.write_line(f"left out after the {_SESSION.clock.deadline_s:.0f}s deadline: "
                                    f"{len(_SESSION.clock.not_run)} tests (listed in the results file)")
    if _SESSION is not None and _SESSION.cases:
        terminalreporter.write_line(f"benchmark results ({len(_SESSION.cases)} cases): {_SESSION.path}")
        if _SESSION.compile_spent_s:
            terminalreporter.write_line(f"torch.compile warm-up time: {_SESSION.compile_spent_s:.0f}s")
