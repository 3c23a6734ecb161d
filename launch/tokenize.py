"""Tokenize MiniMind-format records once into memory-mappable `.bin` shards plus a manifest.

Inputs are JSONL files, compressed JSONL (.jsonl.gz, .bz2, .xz, .zst) or Parquet files.

    python launch/tokenize.py --kind {pretrain,sft,reasoning,dpo} --data F.jsonl... --tokenizer DIR --out DIR
"""

import os
import sys

if __name__ != "__main__":
    # Every script in launch/ has this folder on sys.path, where this file shadows the standard
    # library's `tokenize` (imported by linecache, inspect, ...). Imported under that name, hand the
    # importer the real module.
    import importlib.util
    import sysconfig

    _spec = importlib.util.spec_from_file_location(
        "tokenize", os.path.join(sysconfig.get_paths()["stdlib"], "tokenize.py"))
    _real = importlib.util.module_from_spec(_spec)
    sys.modules[__name__] = _real
    _spec.loader.exec_module(_real)
else:
    import argparse

    from minimind_fast.data.pipeline import KINDS, TokenizeOptions, tokenize_to_shards

    def main() -> None:
        p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--kind", choices=KINDS, required=True)
        p.add_argument("--data", nargs="+", required=True,
                       help="JSONL files (also .jsonl.gz/.bz2/.xz/.zst) or Parquet files")
        p.add_argument("--tokenizer", required=True, help="tokenizer directory (ours or MiniMind's)")
        p.add_argument("--out", required=True,
                       help="output directory for shards and manifest.json (not a tokenizer, model or run directory)")
        p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
        p.add_argument("--seq-len", type=int, default=512, help="longest SFT/DPO/reasoning sample kept")
        p.add_argument("--overlong", choices=("truncate", "drop"), default="truncate")
        p.add_argument("--val-fraction", type=float, default=0.01, help="share of documents held out")
        p.add_argument("--strict", action="store_true", help="fail on the first bad line")
        p.add_argument("--force", action="store_true",
                       help="rewrite even if the shards are up to date, or of another --kind")
        args = p.parse_args()
        try:
            opts = TokenizeOptions(kind=args.kind, seq_len=args.seq_len, overlong=args.overlong,
                                   val_fraction=args.val_fraction, strict=args.strict, workers=args.workers)
            m = tokenize_to_shards(args.data, args.tokenizer, args.out, opts, force=args.force)
        except (OSError, ValueError) as e:  # bad options, inputs or tokenizer (InputError too), an unwritable --out
            sys.exit(f"error: {e}")
        train, val = m["splits"]["train"], m["splits"]["val"]
        print(f"{args.out}: train {train['tokens']:,} tokens / {train['docs']:,} docs, "
              f"val {val['tokens']:,} tokens / {val['docs']:,} docs; skipped {m['skipped'] or 'none'}")
        for line in m["problems"][:10]:
            print(f"  skipped {line}")

    main()
