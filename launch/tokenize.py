"""Tokenize MiniMind-format JSONL files once into memory-mappable `.bin` shards plus a manifest."""

import os
import sys

# This file is named like the standard library's `tokenize`, which other modules import: keep its
# folder off the import path so that they get the real one.
_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]

import argparse  # noqa: E402

from minimind_fast.data.pipeline import KINDS, InputError, TokenizeOptions, tokenize_to_shards  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--kind", choices=KINDS, required=True)
    p.add_argument("--data", nargs="+", required=True, help="JSONL input files")
    p.add_argument("--tokenizer", required=True, help="tokenizer directory (ours or MiniMind's)")
    p.add_argument("--out", required=True, help="output directory for shards and manifest.json")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--seq-len", type=int, default=512, help="longest SFT/DPO/reasoning sample kept")
    p.add_argument("--overlong", choices=("truncate", "drop"), default="truncate")
    p.add_argument("--val-fraction", type=float, default=0.01, help="share of documents held out")
    p.add_argument("--strict", action="store_true", help="fail on the first bad line")
    p.add_argument("--force", action="store_true", help="rewrite even if the shards are up to date")
    args = p.parse_args()
    opts = TokenizeOptions(kind=args.kind, seq_len=args.seq_len, overlong=args.overlong,
                           val_fraction=args.val_fraction, strict=args.strict, workers=args.workers)
    try:
        m = tokenize_to_shards(args.data, args.tokenizer, args.out, opts, force=args.force)
    except InputError as e:
        sys.exit(f"error: {e}")
    train, val = m["splits"]["train"], m["splits"]["val"]
    print(f"{args.out}: train {train['tokens']:,} tokens / {train['docs']:,} docs, "
          f"val {val['tokens']:,} tokens / {val['docs']:,} docs; skipped {m['skipped'] or 'none'}")
    for line in m["problems"][:10]:
        print(f"  skipped {line}")


if __name__ == "__main__":
    main()
