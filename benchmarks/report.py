"""Render the README's performance table and a chart of the speedups from the benchmark results.

    python benchmarks/report.py [--results-dir benchmarks/results] [--readme README.md] [--png PATH]

Takes the newest results file per device (by its `date`; comparisons it lacks come from that device's
older files, each named in the table's header), prints the markdown, replaces the block
between `<!-- bench:start -->` and `<!-- bench:end -->` in the README when both markers are there
(the README is left untouched otherwise), and writes a PNG bar chart of every implementation's
speedup over its group's baseline (default `<results-dir>/ratios.png`).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BASELINES, RESULTS_DIR, ResultsError, load_results, sort_impls  # noqa: E402

START, END = "<!-- bench:start -->", "<!-- bench:end -->"
SUITE_TITLES = {"kernels": "Kernels, forward + backward", "moe": "MoE layer, forward + backward",
                "model": "Training step", "decode": "Decode", "data": "Data pipeline",
                "minimind2": "Training step against MiniMind2's own model and step "
                             "(CPU: reference ops; CUDA: its bf16 autocast loop)"}


def tflops(rate: float) -> str:
    """A rate with three significant figures, so that a CPU's 0.0008 TFLOP/s does not print as 0.0."""
    return f"{rate:.1f}" if rate >= 100 else f"{rate:.3g}"


def newest_per_device(results_dir: Path) -> dict[str, dict[str, Any]]:
    """device name -> its newest run, completed by older runs of the same device for the comparisons
    (groups) the newest did not measure (a GPU session may run only some suites); each group comes
    whole from the newest run that has it, and `_sources` names the files used. Unreadable files are
    reported on stderr and left out."""
    runs: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(results_dir.glob("*.json")):
        try:
            run = load_results(path)
        except ResultsError as exc:
            print(f"report: skipping {exc}", file=sys.stderr)
            continue
        run["_file"] = path.name
        runs.setdefault(run["device"], []).append(run)
    return {device: merge_runs(found) for device, found in runs.items()}


def merge_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One device's runs as one: each comparison (group) whole from the newest run that measured our
    implementation in it, else from the newest run that has it (a run cut short by its time limit can
    hold a group without `ours`, which must not hide an older complete one). Implementations are never
    mixed across runs: ratios only hold within the run that measured them side by side."""
    ordered = sorted(runs, key=lambda r: (r["date"], r["_file"]), reverse=True)
    chosen: dict[tuple[str, str], dict[str, Any]] = {}
    for run in ordered:
        groups: dict[tuple[str, str], list[str]] = {}
        for c in run["cases"]:
            groups.setdefault((c.get("suite", "other"), c["group"]), []).append(c["impl"])
        for key, impls in groups.items():
            held = chosen.get(key)
            if held is None or ("ours" in impls and not held["has_ours"]):
                chosen[key] = {"run": run, "has_ours": "ours" in impls}
    cases, sources = [], []
    for run in ordered:
        mine = [c for c in run["cases"] if chosen[(c.get("suite", "other"), c["group"])]["run"] is run]
        if mine:
            cases += mine
            sources.append(run)
    # The header (commit, date, run time) is the newest run that gave the table cases: a newer one that
    # measured nothing would put its commit, or its "killed while running", over older figures.
    return dict(sources[0] if sources else ordered[0], cases=cases, _sources=sources)


# The baseline a suite's targets are stated against (MoE: >= 3x MiniMind's loop; minimind2: not slower
# than MiniMind2's own step); others: eager first.
SUITE_BASELINE = {"moe": "minimind", "minimind2": "minimind"}


def baseline_of(cases: list[dict[str, Any]]) -> dict[str, Any] | None:
    preferred = SUITE_BASELINE.get(cases[0].get("suite", "")) if cases else None
    for impl in ([preferred] if preferred else []) + list(BASELINES):
        for case in cases:
            if case["impl"] == impl and case.get("median_ms"):
                return case
    return None


def _num(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "—"
    if abs(value) >= 1e6:
        return f"{value / 1e6:.2f}M"
    if abs(value) >= 1e4:
        return f"{value / 1e3:.1f}k"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.{digits}g}"


def _pct(value: float | None) -> str | None:
    return None if value is None else f"{100 * value:.0f}%"


def speedup_cell(case: dict[str, Any] | None, base: dict[str, Any]) -> str:
    if case is None or not case.get("median_ms"):
        return "—"
    key = f"ratio_vs_{base['impl']}"
    ratio, lo, hi = case.get(key), case.get(f"{key}_lo"), case.get(f"{key}_hi")
    if ratio is None:
        ratio = base["median_ms"] / case["median_ms"]
    spread = f" ({lo:.2f}–{hi:.2f})" if lo is not None and hi is not None else ""
    return f"{ratio:.2f}×{spread}"


def hardware_cell(case: dict[str, Any] | None) -> str:
    """How close one case is to the device: bandwidth, matmul rate or MFU, and throughput."""
    if case is None:
        return "—"
    parts = []
    if case.get("frac_of_copy") is not None:
        parts.append(f"{_pct(case['frac_of_copy'])} of copy BW ({case['gbps']:.0f} GB/s)")
    if case.get("mfu") is not None:
        parts.append(f"MFU {_pct(case['mfu'])}")
    if case.get("mfu_measured") is not None:
        parts.append(f"{_pct(case['mfu_measured'])} of measured matmul")
    elif case.get("frac_of_matmul") is not None:
        parts.append(f"{_pct(case['frac_of_matmul'])} of matmul ({tflops(case['tflops'])} TFLOP/s)")
    if case.get("tokens_per_s") is not None:
        parts.append(f"{_num(case['tokens_per_s'])} tok/s")
    return ", ".join(parts) or "—"


def memory_cell(case: dict[str, Any] | None, base: dict[str, Any]) -> str:
    if case is None or case.get("peak_mem_MB") is None or base.get("peak_mem_MB") is None:
        return "—"
    cell = f"{_num(base['peak_mem_MB'])} → {_num(case['peak_mem_MB'])}"
    ratio = case.get(f"mem_ratio_vs_{base['impl']}")
    if not ratio:
        return cell
    return cell + (f" ({ratio:.2f}× less)" if ratio >= 1 else f" ({1 / ratio:.2f}× more)")


def render_suite(cases: list[dict[str, Any]]) -> list[str]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for case in cases:
        groups.setdefault(case["group"], []).append(case)
    baselines = {g: baseline_of(members) for g, members in groups.items()}
    impls = [i for i in sort_impls(c["impl"] for c in cases)
             if any(b is None or i != b["impl"] for b in baselines.values())]
    header = ["Case", "Baseline: median ms"] + [f"{i} ×" for i in impls] + ["Peak MB (base → ours)",
                                                                          "Hardware use (ours, else the compared path)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for group, members in groups.items():
        by_impl = {c["impl"]: c for c in members}
        base = baselines[group]
        ours = by_impl.get("ours")
        if base is None:  # e.g. a data-pipeline case with a single implementation
            only = members[0]
            row = [group, f"{only['impl']}: {_num(only['median_ms'])}"] + ["—"] * len(impls)
            row += ["—", hardware_cell(only)]
        else:
            row = [group, f"{base['impl']}: {_num(base['median_ms'])}"]
            row += ["(base)" if i == base["impl"] else speedup_cell(by_impl.get(i), base) for i in impls]
            shown = ours or next((c for c in members if c is not base), base)  # e.g. eager vs MiniMind2
            row += [memory_cell(shown, base), hardware_cell(shown)]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def run_time_lines(timing: dict[str, Any] | None) -> list[str]:
    """The newest run's own cost: its wall time, and what its deadline left out."""
    if not timing or timing.get("suite_s") is None:
        return []
    text = f"Run time: {timing['suite_s'] / 60:.1f} min"
    if timing.get("deadline_s"):
        text += f" (deadline {timing['deadline_s']:.0f} s"
        left = len(timing.get("not_run") or [])
        text += f"; {left} tests left out)" if left else "; nothing left out)"
    if timing.get("running"):
        text += f"; killed while running `{timing['running']}`, so its case and any later ones are missing"
    return [text]


def render_run(run: dict[str, Any]) -> list[str]:
    hw = run.get("hardware") or {}
    facts = [f"torch {run.get('torch')}", f"triton {run.get('triton')}"]
    if run.get("cuda"):
        facts.append(f"CUDA {run['cuda']}")
    facts += [f"commit `{str(run.get('commit', 'unknown'))[:12]}`", str(run["date"])]
    limits = []
    if hw.get("copy_GBps"):
        limits.append(f"copy {hw['copy_GBps']:.0f} GB/s")
    for dtype in ("bf16", "fp32"):  # the CPU cases run in fp32, whose rate a CPU's bf16 one says nothing of
        if hw.get(f"{dtype}_tflops"):
            limits.append(f"{dtype} matmul {tflops(hw[f'{dtype}_tflops'])} TFLOP/s")
    if hw.get("peak_bf16_tflops"):
        limits.append(f"datasheet bf16 {hw['peak_bf16_tflops']:.0f} TFLOP/s")
    lines = [f"### {run['device']}", "", " · ".join(facts) + "  ", "Measured: " + (", ".join(limits) or "—")]
    if len(run.get("_sources", [])) > 1:
        lines[-1] += "  "
        lines.append("Each comparison from the newest run that measured it: " + "; ".join(
            f"`{src['_file']}` (commit `{str(src.get('commit', 'unknown'))[:12]}`)" for src in run["_sources"]))
    if run_time_lines(run.get("timing")):
        lines[-1] += "  "
        lines += run_time_lines(run.get("timing"))
    suites: dict[str, list[dict[str, Any]]] = {}
    for case in run["cases"]:
        suites.setdefault(case.get("suite", "other"), []).append(case)
    for suite, cases in suites.items():
        lines += ["", f"**{SUITE_TITLES.get(suite, suite)}**", ""] + render_suite(cases)
    return lines


def render_markdown(runs: dict[str, dict[str, Any]]) -> str:
    if not runs:
        return "_No benchmark results yet: run `make bench` or `make bench-gpu`._\n"
    lines = ["Speedups are the baseline's median time over each implementation's (higher is faster), "
             "measured side by side in one run; the spread pairs 20th and 80th percentiles. "
             "Generated by `benchmarks/report.py`; method in `benchmarks/common.py`."]
    for device in sorted(runs):
        lines += [""] + render_run(runs[device])
    return "\n".join(lines) + "\n"


def replace_block(text: str, block: str) -> str | None:
    """`text` with the markers' content replaced by `block`, or None when the markers are missing."""
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        return None
    return text[: start + len(START)] + "\n" + block + text[end:]


def plot_ratios(runs: dict[str, dict[str, Any]], path: Path) -> Path | None:
    """Horizontal bars: each implementation's speedup over its group's baseline, one panel per device."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for device in sorted(runs):
        groups: dict[str, list[dict[str, Any]]] = {}
        for case in runs[device]["cases"]:
            groups.setdefault(case["group"], []).append(case)
        bars = []
        for group, members in groups.items():
            base = baseline_of(members)
            if base is None:
                continue
            for case in members:
                ratio = case.get(f"ratio_vs_{base['impl']}")
                if case is not base and ratio:
                    bars.append((group, case["impl"], ratio))
        if bars:
            panels.append((device, bars))
    if not panels:
        return None
    rows = sum(len({g for g, _, _ in bars}) for _, bars in panels)
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 1.5 + 0.32 * rows + 0.5 * len(panels)),
                             squeeze=False)
    for ax, (device, bars) in zip(axes[:, 0], panels):
        groups = list(dict.fromkeys(g for g, _, _ in bars))
        impls = sort_impls(i for _, i, _ in bars)
        height = 0.8 / len(impls)
        for j, impl in enumerate(impls):
            ys = [groups.index(g) + j * height for g, i, _ in bars if i == impl]
            xs = [r for _, i, r in bars if i == impl]
            ax.barh(ys, xs, height=height, label=impl)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_yticks([k + 0.4 - height / 2 for k in range(len(groups))], groups, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("speedup over the group's baseline (log scale)")
        ax.set_title(device, fontsize=10)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--readme", type=Path, default=Path(__file__).resolve().parent.parent / "README.md")
    parser.add_argument("--png", type=Path, default=None, help="default: <results-dir>/ratios.png")
    parser.add_argument("--no-png", action="store_true")
    args = parser.parse_args(argv)
    runs = newest_per_device(args.results_dir)
    markdown = render_markdown(runs)
    print(markdown)
    if args.readme.exists():
        text = args.readme.read_text(encoding="utf-8")
        updated = replace_block(text, markdown)
        if updated is None:
            print(f"report: {args.readme} has no {START} ... {END} block; left unchanged", file=sys.stderr)
        elif updated != text:
            tmp = args.readme.with_name(f".{args.readme.name}.tmp")
            tmp.write_text(updated, encoding="utf-8")
            os.replace(tmp, args.readme)
            print(f"report: updated the table in {args.readme}", file=sys.stderr)
    if not args.no_png:
        png = plot_ratios(runs, args.png or args.results_dir / "ratios.png")
        if png:
            print(f"report: wrote {png}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
