"""The benchmark suite's bookkeeping on synthetic results: ratios, report rendering, regression check."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

# The suite's tools are scripts in benchmarks/ (not a package) that import their `common.py`.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import common  # noqa: E402
import compare  # noqa: E402
import report  # noqa: E402


def case(group, impl, median, p20=None, p80=None, mem=None, suite="kernels", **extra):
    return {"suite": suite, "group": group, "name": f"{group} [{impl}]", "impl": impl,
            "median_ms": median, "p20_ms": median * 0.95 if p20 is None else p20,
            "p80_ms": median * 1.05 if p80 is None else p80, "peak_mem_MB": mem, **extra}


def run(device, date, cases, **meta):
    return {"schema": 1, "device": device, "date": date, "torch": "2.x", "triton": "3.x", "cuda": None,
            "commit": "abc123", "hardware": {"copy_GBps": 100.0, "bf16_tflops": 10.0}, "cases": cases, **meta}


def write(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


# --- ratios ----------------------------------------------------------------------------------------

def test_ratios_are_speedups_within_each_group():
    cases = [case("rms T=8", "eager", 3.0, 2.0, 4.0, mem=300.0), case("rms T=8", "ours", 1.0, 0.5, 1.5, mem=100.0),
             case("rms T=16", "eager", 10.0), case("rms T=16", "compile", 20.0)]
    common.compute_ratios(cases)
    ours = cases[1]
    assert ours["ratio_vs_eager"] == pytest.approx(3.0)
    assert ours["ratio_vs_eager_lo"] == pytest.approx(2.0 / 1.5)  # baseline p20 / ours p80
    assert ours["ratio_vs_eager_hi"] == pytest.approx(4.0 / 0.5)
    assert ours["mem_ratio_vs_eager"] == pytest.approx(3.0)
    assert cases[0]["ratio_vs_eager"] == pytest.approx(1.0)
    assert cases[3]["ratio_vs_eager"] == pytest.approx(0.5)  # another group's eager is not used
    assert cases[3]["mem_ratio_vs_eager"] is None


def test_ratios_against_every_baseline_present_and_recomputed():
    cases = [case("moe", "minimind", 9.0), case("moe", "dense", 2.0), case("moe", "ours", 3.0)]
    common.compute_ratios(cases)
    assert cases[2]["ratio_vs_minimind"] == pytest.approx(3.0)
    assert cases[2]["ratio_vs_dense"] == pytest.approx(2.0 / 3.0)
    assert "ratio_vs_eager" not in cases[2]
    cases[0]["median_ms"] = 6.0
    common.compute_ratios(cases)
    assert cases[2]["ratio_vs_minimind"] == pytest.approx(2.0)


def test_timing_percentiles():
    t = common.timing_from_samples([5.0, 1.0, 2.0, 3.0, 4.0])
    assert (t.median_ms, t.rounds) == (3.0, 5)
    assert t.p20_ms == pytest.approx(1.8) and t.p80_ms == pytest.approx(4.2)
    assert common.timing_from_samples([7.0]).p80_ms == 7.0
    with pytest.raises(ValueError):
        common.timing_from_samples([])


class FakeBenchmark:
    """pytest-benchmark's fixture, reduced to what `common.measure` uses."""

    enabled = True

    def pedantic(self, fn, rounds=1, iterations=1, warmup_rounds=0):
        import time
        from types import SimpleNamespace

        data = []
        for _ in range(rounds):
            start = time.perf_counter()
            fn()
            data.append(time.perf_counter() - start)
        self.stats = SimpleNamespace(stats=SimpleNamespace(data=data))


@pytest.mark.parametrize("cuda", [False, True])
def test_measure_wall_clock_calls_the_function_once_per_round(monkeypatch, cuda):
    import torch

    calls, syncs = [], []
    monkeypatch.setattr(common, "is_cuda_run", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: syncs.append(1))
    timing = common.measure(FakeBenchmark(), lambda: calls.append(1), target_s=0.0, wall=True, first_s=0.5)
    assert timing.rounds == 3 and len(calls) == 3
    assert len(syncs) == (3 if cuda else 0)
    assert 0 <= timing.p20_ms <= timing.median_ms <= timing.p80_ms


def test_loop_moe_baseline_matches_reference():
    import torch
    from minimind_fast.kernels import reference

    torch.manual_seed(0)
    n, h, inter, e, k = 37, 16, 24, 5, 2
    x = torch.randn(n, h, dtype=torch.float64)
    w = [torch.randn(e, inter, h, dtype=torch.float64), torch.randn(e, inter, h, dtype=torch.float64),
         torch.randn(e, h, inter, dtype=torch.float64)]
    logits = torch.randn(n, e, dtype=torch.float64)
    logits[:, 4] = -1e9  # expert 4 receives no token: the loop must skip it
    _, weight, idx = reference.moe_route(logits, k, True)
    expected = reference.moe_experts(x, idx, weight, *w)
    torch.testing.assert_close(common.loop_moe_experts(x, idx, weight, *w), expected)


def shrunk(shape: dict, cap: int) -> dict:
    """A kernel benchmark case at CPU-test size: token, hidden and vocabulary sizes capped, batch 1."""
    small = {k: min(v, cap) if k in ("T", "N", "H", "I", "V") else v for k, v in shape.items()}
    return {**small, "B": 1} if "B" in small else small


@pytest.mark.parametrize("full", [False, True], ids=["cpu-sizes", "gpu-sizes"])
def test_every_kernel_case_times_a_backward_into_every_input(full):
    """A fused loss computes its gradients in forward: a case whose backward did nothing would time the
    reference's forward alone against it (as the first H100 run did for linear_cross_entropy)."""
    import bench_kernels
    import torch

    for op, shape in bench_kernels.kernel_shapes(full):
        inputs, grads, _, _ = bench_kernels.make_inputs(op, shrunk(shape, 64), "cpu", torch.float32)
        common.forward_backward(bench_kernels.reference_fn(op), inputs, grads)()
        for i, t in enumerate(inputs):
            if isinstance(t, torch.Tensor) and t.requires_grad:
                assert t.grad is not None and t.grad.abs().sum() > 0, (op, shape, i)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="Liger's Triton kernels run on a CPU only through the interpreter (`make test` sets it)")
def test_liger_cases_backpropagate_their_outputs_gradients_into_every_input():
    """Liger's kernels take other layouts (RoPE: heads before time); a gradient in ours fails backward,
    and the benchmark then skips Liger (as it did for RoPE in the first H100 run). Its RoPE and fused
    cross-entropy run under the interpreter; its RMSNorm and SwiGLU do not (a float `.to` in their
    kernels), and take our gradients unchanged."""
    import bench_kernels
    import torch

    ran = set()
    for op, shape in bench_kernels.kernel_shapes(False):
        if op not in ("apply_rotary", "linear_cross_entropy"):
            continue
        inputs, grads, _, _ = bench_kernels.make_inputs(op, shrunk(shape, 32), "cpu", torch.float32)
        fn, inputs, grads = bench_kernels.liger_impl(op, inputs, grads)
        common.forward_backward(fn, inputs, grads)()
        for i, t in enumerate(inputs):
            if isinstance(t, torch.Tensor) and t.requires_grad:
                assert t.grad is not None and t.grad.abs().sum() > 0, (op, shape, i)
        ran.add(op)
    assert ran == {"apply_rotary", "linear_cross_entropy"}, ran


def test_forward_backward_refuses_a_step_without_backward():
    import torch

    x = torch.ones(3, requires_grad=True)
    with pytest.raises(ValueError, match="nothing would be backpropagated"):
        common.forward_backward(lambda x: x.sum(), [x], [None])()


def test_peak_memory_of_a_step_counts_the_input_gradients_it_writes(monkeypatch):
    """A step drops the previous call's input gradients before writing new ones, so measured after a
    warm-up call with those still held, its peak came out one set of gradients short (an H100 RMSNorm
    added 9 MB: its 8 MB output and partials, not the 8 MB dx it writes), inflating the memory ratios.
    The allocator here holds exactly the leaves' gradients, the only memory a step keeps between calls."""
    import torch

    x = torch.randn(64, 32, requires_grad=True)
    w = torch.randn(32, requires_grad=True)
    step = common.forward_backward(lambda x, w: x * w, [x, w], [torch.ones(64, 32)])
    step()  # the warm-up and timed calls leave their gradients behind

    def held() -> int:
        return sum(t.grad.numel() * t.grad.element_size() for t in (x, w) if t.grad is not None)

    peak = [0]
    monkeypatch.setattr(common, "is_cuda_run", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: peak.__setitem__(0, max(peak[0], held())))
    monkeypatch.setattr(torch.cuda, "memory_allocated", held)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: peak.__setitem__(0, held()))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: peak[0])
    grads_mb = (x.numel() + w.numel()) * 4 / 2**20
    assert common.peak_memory_mb(step) == pytest.approx(grads_mb)
    assert common.peak_memory_mb(step, absolute=True) == pytest.approx(grads_mb)


# --- results files ---------------------------------------------------------------------------------

def test_load_results_names_the_file_and_field(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(common.ResultsError, match="bad.json.*not valid JSON"):
        common.load_results(bad)
    missing = write(tmp_path / "m.json", {"device": "x", "cases": []})
    with pytest.raises(common.ResultsError, match="m.json.*'date'"):
        common.load_results(missing)
    no_median = write(tmp_path / "c.json", run("x", "2025", [{"group": "g", "impl": "eager"}]))
    with pytest.raises(common.ResultsError, match=r"cases\[0\] lacks median_ms"):
        common.load_results(no_median)


def test_write_json_atomic_leaves_no_temp(tmp_path):
    path = tmp_path / "sub" / "r.json"
    common.write_json_atomic(path, {"a": 1})
    common.write_json_atomic(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]


def test_device_slug():
    assert common.device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert common.device_slug("  ") == "device"


# --- report ----------------------------------------------------------------------------------------

def _results_dir(tmp_path: Path) -> Path:
    d = tmp_path / "results"
    d.mkdir()
    old_cases = [case("rms_norm T=8", "eager", 9.0), case("rms_norm T=8", "ours", 9.0)]
    new_cases = common.compute_ratios([
        case("rms_norm T=8", "eager", 3.0, mem=300.0),
        case("rms_norm T=8", "ours", 1.0, mem=100.0, gbps=80.0, frac_of_copy=0.8),
        case("rms_norm T=8", "compile", 2.0, mem=150.0),
        case("train step tiny", "eager", 100.0, suite="model", tokens_per_s=2e4),
        case("train step tiny", "ours", 50.0, suite="model", tokens_per_s=4e4, mfu=0.42, mfu_measured=0.6),
    ])
    write(d / "gpu-20250101-000000.json", run("GPU X", "2025-01-01T00:00:00+00:00", common.compute_ratios(old_cases)))
    write(d / "gpu-20250201-000000.json", run("GPU X", "2025-02-01T00:00:00+00:00", new_cases))
    write(d / "cpu-20250105-000000.json", run("CPU Y", "2025-01-05T00:00:00+00:00",
                                              common.compute_ratios([case("swiglu T=4", "eager", 5.0),
                                                                     case("swiglu T=4", "compile", 4.0)])))
    (d / "broken.json").write_text("[1, 2")
    return d


def test_report_takes_newest_run_per_device(tmp_path, capsys):
    runs = report.newest_per_device(_results_dir(tmp_path))
    assert sorted(runs) == ["CPU Y", "GPU X"]
    assert runs["GPU X"]["date"].startswith("2025-02")
    assert "broken.json" in capsys.readouterr().err


def test_report_completes_a_partial_newest_run_from_older_ones(tmp_path):
    d = _results_dir(tmp_path)
    partial = common.compute_ratios([case("swiglu T=8", "eager", 4.0), case("swiglu T=8", "ours", 2.0)])
    write(d / "gpu-20250301-000000.json", run("GPU X", "2025-03-01T00:00:00+00:00", partial))
    merged = report.newest_per_device(d)["GPU X"]
    by_group = {}
    for c in merged["cases"]:
        by_group.setdefault(c["group"], []).append(c)
    assert merged["date"].startswith("2025-03")
    assert [c["median_ms"] for c in by_group["swiglu T=8"]] == [4.0, 2.0]
    # rms_norm comes whole from February's run (not January's, not a mix of both)
    assert sorted(c["median_ms"] for c in by_group["rms_norm T=8"]) == [1.0, 2.0, 3.0]
    assert [s["_file"] for s in merged["_sources"]] == ["gpu-20250301-000000.json", "gpu-20250201-000000.json"]
    # a newer run cut short inside a group (no `ours` yet) does not hide the older complete group
    cut = [case("rms_norm T=8", "eager", 5.0)]
    write(d / "gpu-20250401-000000.json", run("GPU X", "2025-04-01T00:00:00+00:00", common.compute_ratios(cut)))
    again = report.newest_per_device(d)["GPU X"]
    assert sorted(c["median_ms"] for c in again["cases"] if c["group"] == "rms_norm T=8") == [1.0, 2.0, 3.0]
    text = report.render_markdown({"GPU X": merged})
    assert "`gpu-20250301-000000.json`" in text and "`gpu-20250201-000000.json`" in text
    assert "gpu-20250101" not in text


def test_report_header_comes_from_a_run_that_gave_the_table_its_cases(tmp_path):
    """A newer run that measured nothing (every test skipped, or killed in its first test) supplied the
    device's header: its commit, date and "killed while running" stood over a table of older cases."""
    d = _results_dir(tmp_path)
    timing = {"suite_s": 1.0, "deadline_s": None, "test_seconds": {}, "not_run": [], "running": "t::x"}
    write(d / "gpu-20250301-000000.json", run("GPU X", "2025-03-01T00:00:00+00:00", [], commit="emptyrun",
                                              timing=timing))
    merged = report.newest_per_device(d)["GPU X"]
    assert merged["date"].startswith("2025-02") and merged["commit"] == "abc123"
    text = report.render_markdown({"GPU X": merged})
    assert "emptyrun" not in text and "killed while running" not in text
    only_empty = tmp_path / "only"
    only_empty.mkdir()
    write(only_empty / "gpu-20250301-000000.json", run("GPU X", "2025-03-01T00:00:00+00:00", []))
    assert report.newest_per_device(only_empty)["GPU X"]["cases"] == []


def test_report_table_shows_ratios_memory_and_hardware(tmp_path):
    text = report.render_markdown(report.newest_per_device(_results_dir(tmp_path)))
    lines = text.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("| rms_norm T=8 "))
    row = lines[at]
    cells = [c.strip() for c in row.strip("|").split("|")]
    header = next(line for line in reversed(lines[:at]) if line.startswith("| Case"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert columns[:2] == ["Case", "Baseline: median ms"]
    assert cells[1] == "eager: 3"
    assert cells[columns.index("ours ×")] == "3.00× (2.71–3.32)"
    assert cells[columns.index("compile ×")] == "1.50× (1.36–1.66)"
    assert "300 → 100 (3.00× less)" in cells
    assert "80% of copy BW (80 GB/s)" in cells[-1]
    step = next(line for line in text.splitlines() if line.startswith("| train step tiny"))
    assert "MFU 42%" in step and "60% of measured matmul" in step and "40.0k tok/s" in step
    assert "### CPU Y" in text and "### GPU X" in text
    assert "9" not in row.split("|")[2]  # the older GPU run is not shown


def test_report_memory_cell_says_more_when_the_compared_path_takes_more():
    """The H100 MoE row read "557 → 621 (0.90× less)": a path that takes more memory was called less."""
    cases = common.compute_ratios([case("moe", "minimind", 2.0, mem=500.0, suite="moe"),
                                   case("moe", "ours", 1.0, mem=625.0, suite="moe"),
                                   case("moe", "liger", 1.0, mem=250.0, suite="moe")])
    assert report.memory_cell(cases[1], cases[0]) == "500 → 625 (1.25× more)"
    assert report.memory_cell(cases[2], cases[0]) == "500 → 250 (2.00× less)"


def test_report_replaces_only_the_marked_block(tmp_path):
    d = _results_dir(tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text("# T\nintro\n<!-- bench:start -->\nold table\n<!-- bench:end -->\ntail\n")
    assert report.main(["--results-dir", str(d), "--readme", str(readme), "--png", str(tmp_path / "r.png")]) == 0
    text = readme.read_text()
    assert text.startswith("# T\nintro\n<!-- bench:start -->\n") and text.endswith("<!-- bench:end -->\ntail\n")
    assert "old table" not in text and "| rms_norm T=8 |" in text
    png = (tmp_path / "r.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1000


def test_report_leaves_readme_without_markers_alone(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    report.main(["--results-dir", str(_results_dir(tmp_path)), "--readme", str(readme), "--no-png"])
    assert readme.read_text() == "# no markers\n"
    assert report.replace_block("a <!-- bench:end --> b <!-- bench:start -->", "x") is None


def test_report_without_results(tmp_path):
    assert "No benchmark results yet" in report.render_markdown(report.newest_per_device(tmp_path))
    assert report.plot_ratios({}, tmp_path / "r.png") is None


# --- compare ---------------------------------------------------------------------------------------

def test_compare_flags_only_slowdowns_beyond_the_spread():
    old = run("GPU", "1", [case("a", "ours", 1.0, 0.9, 1.1), case("b", "ours", 1.0, 0.9, 1.1),
                           case("c", "ours", 1.0, 0.99, 1.01), case("gone", "ours", 1.0)])
    new = run("GPU", "2", [case("a", "ours", 1.15, 1.1, 1.2),   # +0.15 > spread 0.2? no
                           case("b", "ours", 1.5, 1.45, 1.55),  # +0.5 > 0.2: slower
                           case("c", "ours", 0.5, 0.49, 0.51),  # faster
                           case("new", "ours", 1.0)])
    result = compare.compare_runs(old, new)
    assert [(c.group, round(c.rel, 3)) for c in result["slower"]] == [("b", 0.5)]
    assert [c.group for c in result["faster"]] == ["c"]
    assert result["missing"] == [("gone", "ours")] and result["added"] == [("new", "ours")]
    assert compare.compare_runs(old, new, min_rel=0.6)["slower"] == []


def test_compare_never_flags_a_case_whose_spread_neither_run_measured(tmp_path, capsys):
    """A single timed call (do_bench on a step longer than its budget: p20 == p80, as in an H100 run) or a
    case without percentiles has no spread: a 0.1% change was flagged as slower than a spread of zero.
    Such cases are listed apart and do not fail the check; one measured spread on either side is enough."""
    old = run("GPU", "1", [case("single", "eager", 100.0, 100.0, 100.0), case("bare", "ours", 1.0),
                           case("one-sided", "ours", 1.0, 1.0, 1.0)])
    old["cases"][1].pop("p20_ms"), old["cases"][1].pop("p80_ms")
    new = run("GPU", "2", [case("single", "eager", 100.1, 100.1, 100.1), case("bare", "ours", 1.001),
                           case("one-sided", "ours", 1.2, 1.15, 1.25)])
    new["cases"][1].pop("p20_ms"), new["cases"][1].pop("p80_ms")
    result = compare.compare_runs(old, new)
    assert [c.group for c in result["slower"]] == ["one-sided"]  # +0.2 beyond the new run's 0.1
    assert sorted(c.group for c in result["no_spread"]) == ["bare", "single"]
    assert compare.main([str(write(tmp_path / "o.json", old)), str(write(tmp_path / "n.json", new))]) == 1
    out = capsys.readouterr().out
    assert "no spread measured in either run (not flagged): 2" in out and "(no spread)  single [eager]" in out
    del old["cases"][2], new["cases"][2]
    assert compare.main([str(write(tmp_path / "o.json", old)), str(write(tmp_path / "n.json", new))]) == 0


def test_compare_cli_exit_codes(tmp_path, capsys):
    old = write(tmp_path / "old.json", run("GPU", "1", [case("a", "ours", 1.0, 0.99, 1.01)]))
    same = write(tmp_path / "same.json", run("GPU", "2", [case("a", "ours", 1.005, 0.99, 1.02)]))
    slow = write(tmp_path / "slow.json", run("GPU", "2", [case("a", "ours", 2.0, 1.9, 2.1)]))
    other = write(tmp_path / "other.json", run("CPU", "2", [case("a", "ours", 2.0)]))
    assert compare.main([str(old), str(same)]) == 0
    assert compare.main([str(old), str(slow)]) == 1
    assert "+100.0%" in capsys.readouterr().out
    assert compare.main([str(old), str(other)]) == 2
    assert "different devices" in capsys.readouterr().err
    assert compare.main([str(old), str(other), "--allow-device-mismatch"]) == 1
    assert compare.main([str(old), str(tmp_path / "absent.json")]) == 2
    assert "absent.json" in capsys.readouterr().err


# --- the run's clock: deadline, per-test seconds, file order ----------------------------------------

def test_suite_clock_leaves_out_tests_after_its_deadline_and_names_them():
    now = [100.0]
    clock = common.SuiteClock(deadline_s=60.0, now=lambda: now[0])
    assert not clock.past_deadline("a")
    clock.add("a", 50.0)
    now[0] = 159.0
    assert not clock.past_deadline("b")
    clock.add("b", 9.0)
    clock.add("b", 1.0)  # a test timed in two parts adds up
    now[0] = 160.0
    assert clock.past_deadline("c") and clock.past_deadline("d")
    timing = clock.as_dict()
    assert timing["suite_s"] == 60.0 and timing["deadline_s"] == 60.0
    assert list(timing["test_seconds"].items()) == [("a", 50.0), ("b", 10.0)]  # slowest first
    assert timing["not_run"] == ["c", "d"]
    unlimited = common.SuiteClock(deadline_s=None, now=lambda: now[0])
    now[0] = 1e9
    assert not unlimited.past_deadline("e") and unlimited.as_dict()["not_run"] == []


def _bench_conftest():
    """benchmarks/conftest.py under its own name (tests/conftest.py holds the name `conftest`)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_conftest", REPO / "benchmarks" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class FakeConfig:
    def __init__(self, **options):
        self.options = {"--gpu-sizes": False, "--bench-compile-budget": None, "--bench-deadline": None,
                        "--bench-results-dir": "/nonexistent", **options}

    def getoption(self, name):
        return self.options[name]


def test_a_compile_budget_of_zero_skips_every_compile_case(monkeypatch):
    """`--bench-compile-budget 0` fell through to the 90/240 s default (`0 or ...`), and a budget of 0
    still let the first compile case in (spent 0 <= 0)."""
    monkeypatch.setenv("BENCH_DEVICE", "cpu")
    monkeypatch.delenv("BENCH_COMPILE_BUDGET_S", raising=False)
    conftest = _bench_conftest()
    session = conftest.BenchSession(FakeConfig(**{"--bench-compile-budget": 0.0}))
    assert session.compile_budget_s == 0.0 and not session.compile_budget_left()
    monkeypatch.setenv("BENCH_COMPILE_BUDGET_S", "0")
    assert not conftest.BenchSession(FakeConfig()).compile_budget_left()
    monkeypatch.delenv("BENCH_COMPILE_BUDGET_S")
    default = conftest.BenchSession(FakeConfig())
    assert default.compile_budget_s == 90.0 and default.compile_budget_left()
    default.compile_spent_s = 90.0
    assert default.compile_budget_left()  # the budget is spent once exceeded, as before
    default.compile_spent_s = 90.5
    assert not default.compile_budget_left()


def test_benchmark_files_run_in_priority_order():
    files = ["benchmarks/bench_data.py", "benchmarks/bench_decode.py", "benchmarks/bench_extra.py",
             "benchmarks/bench_kernels.py", "benchmarks/bench_minimind_baseline.py",
             "benchmarks/bench_model.py", "benchmarks/bench_moe.py"]
    ordered = [Path(f).stem for f in sorted(files, key=common.file_priority)]
    assert ordered == ["bench_kernels", "bench_moe", "bench_model", "bench_minimind_baseline",
                       "bench_decode", "bench_data", "bench_extra"]
    present = sorted(p.stem for p in Path(common.BENCH_DIR).glob("bench_*.py"))
    assert sorted(common.FILE_PRIORITY) == present  # a new benchmark file is given a place


def test_report_shows_the_run_time_and_what_the_deadline_left_out(tmp_path):
    cases = [case("rms T=8", "eager", 2.0), case("rms T=8", "ours", 1.0)]
    timing = {"suite_s": 570.0, "deadline_s": 480.0, "test_seconds": {"x": 1.0}, "not_run": ["y", "z"]}
    write(tmp_path / "gpu-20250101-000000.json", run("GPU", "2025-01-01T00:00:00", cases, timing=timing))
    text = report.render_markdown(report.newest_per_device(tmp_path))
    assert "Run time: 9.5 min (deadline 480 s; 2 tests left out)" in text
    write(tmp_path / "cpu-20250101-000000.json", run("CPU", "2025-01-01T00:00:00", cases))
    assert text.count("Run time") == report.render_markdown(report.newest_per_device(tmp_path)).count("Run time")


def test_rates_keep_three_significant_figures():
    """A CPU's bf16 matmul rate (0.0008 TFLOP/s) printed as 0.0, and its fp32 rate was not shown."""
    assert [report.tflops(r) for r in (0.000833, 0.117, 51.27, 730.44)] == ["0.000833", "0.117", "51.3", "730.4"]
    lines = report.render_run({"device": "CPU X", "date": "d", "cases": [],
                                  "hardware": {"copy_GBps": 17.4, "bf16_tflops": 0.000833, "fp32_tflops": 0.117}})
    assert "Measured: copy 17 GB/s, bf16 matmul 0.000833 TFLOP/s, fp32 matmul 0.117 TFLOP/s" in "\n".join(lines)


def test_suite_clock_names_the_test_under_way_until_it_is_timed(tmp_path):
    clock = common.SuiteClock(deadline_s=60.0)
    clock.running = "bench_moe.py::test_moe_layer[x]"
    assert clock.as_dict()["running"] == "bench_moe.py::test_moe_layer[x]"
    clock.add("bench_moe.py::test_moe_layer[x]", 1.0)
    assert clock.as_dict()["running"] is None
    timing = {"suite_s": 60.0, "deadline_s": 48.0, "test_seconds": {}, "not_run": [], "running": "t::x"}
    write(tmp_path / "gpu-20250101-000000.json", run("GPU", "2025-01-01T00:00:00", [], timing=timing))
    assert "killed while running `t::x`" in report.render_markdown(report.newest_per_device(tmp_path))


# --- the GPU session script and the benchmarks' own deadline, run on the CPU ------------------------

REPO = Path(__file__).resolve().parent.parent
SESSION = REPO / "benchmarks" / "gpu_session.sh"


def _bench_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MINIMIND_REPO", "BENCH_FULL", "BENCH_DEADLINE_S")}
    return {**env, "BENCH_DEVICE": "cpu", "TRITON_INTERPRET": "1", **extra}


def _results(folder: Path) -> dict:
    files = sorted(folder.glob("*.json"))
    assert len(files) == 1, files
    return common.load_results(files[0])


def test_benchmarks_past_their_deadline_still_write_a_results_file_naming_what_was_left_out(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks/bench_moe.py", "-q", "-p", "no:cacheprovider",
         "--bench-results-dir", str(tmp_path), "--bench-deadline", "0.001", "-k", "minimind or eager"],
        cwd=REPO, env=_bench_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    timing = _results(tmp_path)["timing"]
    assert len(timing["not_run"]) == 2 and all("test_moe_layer" in t for t in timing["not_run"])
    assert timing["running"] is None


def test_a_benchmark_run_that_measured_nothing_leaves_no_results_file(tmp_path):
    """Every test skipped in its body (Triton kernels on a CPU): the file written before each test was
    left behind with no case, naming a finished test as the one a kill interrupted."""
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks/bench_kernels.py", "-q", "-p", "no:cacheprovider",
         "--bench-results-dir", str(tmp_path), "-k", "rms_norm and ours"],
        cwd=REPO, env=_bench_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "2 skipped" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert list(tmp_path.iterdir()) == []


def test_a_benchmark_run_killed_mid_test_leaves_a_valid_file_naming_that_test(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", "benchmarks/bench_moe.py", "-q", "-p", "no:cacheprovider",
         "--bench-results-dir", str(tmp_path), "-k", "minimind or eager"],
        cwd=REPO, env=_bench_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            files = list(tmp_path.glob("*.json"))
            if files and common.load_results(files[0])["timing"]["running"]:
                proc.send_signal(signal.SIGKILL)  # as `timeout -k` ends a step that ignored its SIGTERM
                break
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    timing = _results(tmp_path)["timing"]
    assert timing["running"].startswith("benchmarks/bench_moe.py::test_moe_layer["), timing


def _session(tmp_path: Path, timeout: float, **knobs: str) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / "out"
    env = _bench_env(OUT=str(out), GPU_SESSION_DRY_RUN="1", PYTHON=sys.executable,
                     ENGINE_WORKDIR=str(tmp_path / "engine"), **knobs)
    for name in ("GPU_SESSION_LOGGED", "SESSION_STEPS", "TEST_FILES", "BENCH_FILES", "BENCH_ARGS", "PROFILE_PRESETS",
                 "ENGINE_RUNS", "SKIP_TESTS", "SKIP_BENCH", "SKIP_ENGINE"):
        if name not in knobs:
            env.pop(name, None)
    proc = subprocess.run(["bash", str(SESSION)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    return proc, out


def test_gpu_session_dry_run_runs_every_step_and_keeps_every_log_in_out(tmp_path):
    """The whole session script on the CPU with tiny settings (about a minute): every step runs to
    the end, its log lands in $OUT, and this call's results file (not an older one) is copied there."""
    proc, out = _session(tmp_path, 400, ENGINE_RUNS="reference", ENGINE_TIMEOUT="100", PROFILE_PRESETS="tiny-moe",
                         PROFILE_ARGS="--kernels reference", TEST_FILES="tests/test_kernels_utils.py",
                         BENCH_FILES="moe", BENCH_ARGS='-k "minimind or eager"', DEADLINE="300")
    log = proc.stdout
    assert proc.returncode == 0, log[-3000:] + proc.stderr[-3000:]
    assert (out / "session.log").read_text() == log  # the tail the device tool returns is not all there is
    assert "engine reference (timeout 100s): exit 0" in log
    metrics = [json.loads(line) for line in (out / "engine-reference.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [2] and metrics[0]["loss"] > 0
    assert "profile tiny-moe: exit 0" in log and "=== tiny-moe 2x32 kernels=reference" in log
    assert "tests exit status: 0" in log and " passed in " in (out / "gpu-tests.log").read_text()
    assert "benchmarks exit status: 0" in log
    results = _results(out / "bench-results")
    assert {c["impl"] for c in results["cases"]} == {"minimind", "eager"}
    copied = [p.name for p in out.glob("*.json")]
    assert copied == [next((out / "bench-results").glob("*.json")).name]
    assert "MoE layer" in (out / "report.md").read_text() and (out / "ratios.png").stat().st_size > 0
    assert (out / "env.txt").exists() and log.rstrip().splitlines()[-1].endswith("done")


def test_gpu_session_reports_the_exit_status_of_a_failed_corpus_step(tmp_path):
    """`if ! cmd; then echo $?` prints the status of `! cmd`, always 0: a corpus step that failed, or ran
    out of time (124), was reported as "(exit 0)"."""
    (tmp_path / "engine").write_text("a file where the engine's work folder should go")
    proc, out = _session(tmp_path, 120, SESSION_STEPS="engine")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "engine: preparing the corpus failed or ran out of time (exit 1), runs skipped" in proc.stdout


@pytest.mark.slow
def test_gpu_session_cuts_and_skips_steps_by_what_is_left_of_its_deadline(tmp_path):
    """A DEADLINE too short for the steps: each one is given what is left (less the copying margin)
    and skipped once too little is, and the call ends within DEADLINE."""
    start = time.monotonic()
    # Files that take minutes under the interpreter even on an idle machine (the MoE file alone took 31 s
    # there, inside its ~45 s cap), so that the cut below always happens.
    files = "tests/test_kernels_moe.py tests/test_kernels_elementwise.py tests/test_kernels_model.py"
    proc, out = _session(tmp_path, 200, SESSION_STEPS="tests bench", TEST_FILES=files, DEADLINE="60",
                         TEST_TIMEOUT="500")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert time.monotonic() - start < 60 + 10
    log = proc.stdout
    timeout = int(log.split("GPU tests (timeout ")[1].split("s)")[0])
    assert 20 <= timeout <= 60 - 15  # capped, not the 500 asked for
    assert "tests exit status: 124" in log  # cut: the interpreter runs these for minutes
    assert "PASSED" in (out / "gpu-tests.log").read_text()  # what ran before the cut is kept
    assert "benchmarks: skipped" in log and log.rstrip().splitlines()[-1].endswith("done")
