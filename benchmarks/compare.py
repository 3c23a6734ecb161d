"""Regression check between two benchmark runs: what got slower by more than the run-to-run spread.

    python benchmarks/compare.py OLD.json NEW.json [--min-rel 0.0] [--allow-device-mismatch]

Cases are matched by (group, impl). A case regressed when its new median exceeds the old one by
more than the spread, taken as the wider of the two runs' p80 - p20 (and, with --min-rel, also by
more than that fraction of the old median). A case whose spread neither run measured (no percentiles,
or p20 == p80: a single timed call) is listed apart and never flagged, since any change would exceed
a spread of zero. Exit status: 0 none slower, 1 some slower, 2 the files cannot be compared
(unreadable, or from different devices without --allow-device-mismatch).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ResultsError, case_key, load_results  # noqa: E402


@dataclass
class Change:
    group: str
    impl: str
    old_ms: float
    new_ms: float
    spread_ms: float | None  # None: neither run measured one

    @property
    def rel(self) -> float:
        return self.new_ms / self.old_ms - 1.0


def spread_ms(case: dict[str, Any]) -> float | None:
    """p80 - p20 of one case, or None when its run did not measure one: a single timed call (CUDA's
    do_bench on a step longer than its budget) gives p20 == p80, which says nothing about the noise."""
    p20, p80 = case.get("p20_ms"), case.get("p80_ms")
    if p20 is None or p80 is None or p80 <= p20:
        return None
    return p80 - p20


def compare_runs(old: dict[str, Any], new: dict[str, Any], min_rel: float = 0.0) -> dict[str, list]:
    """{'slower': [Change], 'faster': [Change], 'no_spread': [Change], 'missing': [key], 'added': [key]}
    of NEW against OLD; 'no_spread' holds the matched cases neither run measured a spread for."""
    old_cases = {case_key(c): c for c in old["cases"] if c.get("median_ms")}
    new_cases = {case_key(c): c for c in new["cases"] if c.get("median_ms")}
    slower, faster, no_spread = [], [], []
    for key in sorted(old_cases.keys() & new_cases.keys()):
        a, b = old_cases[key], new_cases[key]
        spreads = [s for s in (spread_ms(a), spread_ms(b)) if s is not None]
        change = Change(key[0], key[1], a["median_ms"], b["median_ms"], max(spreads, default=None))
        if not spreads:
            no_spread.append(change)
            continue
        delta = change.new_ms - change.old_ms
        if delta > change.spread_ms and change.rel > min_rel:
            slower.append(change)
        elif -delta > change.spread_ms and -change.rel > min_rel:
            faster.append(change)
    slower.sort(key=lambda c: -c.rel)
    faster.sort(key=lambda c: c.rel)
    return {"slower": slower, "faster": faster, "no_spread": no_spread,
            "missing": sorted(old_cases.keys() - new_cases.keys()),
            "added": sorted(new_cases.keys() - old_cases.keys())}


def _line(change: Change) -> str:
    spread = "no spread" if change.spread_ms is None else f"spread {change.spread_ms:.3g} ms"
    return (f"  {change.rel:+7.1%}  {change.old_ms:10.4g} -> {change.new_ms:10.4g} ms ({spread})  "
            f"{change.group} [{change.impl}]")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument("--min-rel", type=float, default=0.0,
                        help="also require this relative slowdown (0.05 = 5%%) before flagging a case")
    parser.add_argument("--allow-device-mismatch", action="store_true")
    args = parser.parse_args(argv)
    try:
        old, new = load_results(args.old), load_results(args.new)
    except ResultsError as exc:
        print(f"compare: {exc}", file=sys.stderr)
        return 2
    if old["device"] != new["device"] and not args.allow_device_mismatch:
        print(f"compare: runs are from different devices ({old['device']!r} vs {new['device']!r}); "
              "timings are not comparable (--allow-device-mismatch to compare anyway)", file=sys.stderr)
        return 2
    result = compare_runs(old, new, args.min_rel)
    print(f"old: {args.old} ({old.get('commit', '?')}, {old['date']})")
    print(f"new: {args.new} ({new.get('commit', '?')}, {new['date']})")
    print(f"slower beyond the spread: {len(result['slower'])}")
    for change in result["slower"]:
        print(_line(change))
    print(f"faster beyond the spread: {len(result['faster'])}")
    for change in result["faster"]:
        print(_line(change))
    if result["no_spread"]:
        print(f"no spread measured in either run (not flagged): {len(result['no_spread'])}")
        for change in result["no_spread"]:
            print(_line(change))
    for label in ("missing", "added"):
        if result[label]:
            print(f"{label} in new: " + ", ".join(f"{g} [{i}]" for g, i in result[label]))
    return 1 if result["slower"] else 0


if __name__ == "__main__":
    sys.exit(main())
