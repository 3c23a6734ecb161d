"""Regression check between two benchmark runs: what got slower by more than the run-to-run spread.

    python benchmarks/compare.py OLD.json NEW.json [--min-rel 0.0] [--allow-device-mismatch]

Cases are matched by (group, impl). A case regressed when its new median exceeds the old one by
more than the spread, taken as the wider of the two runs' p80 - p20 (and, with --min-rel, also by
more than that fraction of the old median). Exit status: 0 none slower, 1 some slower, 2 the files
cannot be compared (unreadable, or from different devices without --allow-device-mismatch).
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
    spread_ms: float

    @property
    def rel(self) -> float:
        return self.new_ms / self.old_ms - 1.0


def spread_ms(case: dict[str, Any]) -> float:
    p20, p80 = case.get("p20_ms"), case.get("p80_ms")
    return max(0.0, p80 - p20) if p20 is not None and p80 is not None else 0.0


def compare_runs(old: dict[str, Any], new: dict[str, Any], min_rel: float = 0.0) -> dict[str, list]:
    """{'slower': [Change], 'faster': [Change], 'missing': [key], 'added': [key]} of NEW against OLD."""
    old_cases = {case_key(c): c for c in old["cases"] if c.get("median_ms")}
    new_cases = {case_key(c): c for c in new["cases"] if c.get("median_ms")}
    slower, faster = [], []
    for key in old_cases.keys() & new_cases.keys():
        a, b = old_cases[key], new_cases[key]
        change = Change(key[0], key[1], a["median_ms"], b["median_ms"], max(spread_ms(a), spread_ms(b)))
        delta = change.new_ms - change.old_ms
        if delta > change.spread_ms and change.rel > min_rel:
            slower.append(change)
        elif -delta > change.spread_ms and -change.rel > min_rel:
            faster.append(change)
    slower.sort(key=lambda c: -c.rel)
    faster.sort(key=lambda c: c.rel)
    return {"slower": slower, "faster": faster,
            "missing": sorted(old_cases.keys() - new_cases.keys()),
            "added": sorted(new_cases.keys() - old_cases.keys())}


def _line(change: Change) -> str:
    return (f"  {change.rel:+7.1%}  {change.old_ms:10.4g} -> {change.new_ms:10.4g} ms "
            f"(spread {change.spread_ms:.3g} ms)  {change.group} [{change.impl}]")


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
    for label in ("missing", "added"):
        if result[label]:
            print(f"{label} in new: " + ", ".join(f"{g} [{i}]" for g, i in result[label]))
    return 1 if result["slower"] else 0


if __name__ == "__main__":
    sys.exit(main())
