"""Train a byte-level BPE tokenizer (MiniMind's special tokens and ChatML template) on JSONL files."""

import argparse
import sys

from minimind_fast.data.tokenizer import load_tokenizer, train_tokenizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", nargs="+", required=True,
                   help="JSONL (also .gz/.bz2/.xz/.zst) or Parquet files of texts or conversations")
    p.add_argument("--vocab-size", type=int, default=6400)
    p.add_argument("--out", required=True, help="output directory (Hugging Face tokenizer layout)")
    args = p.parse_args()
    try:
        out = train_tokenizer(args.data, args.vocab_size, args.out)
    except (OSError, ValueError) as e:  # OSError: also an --out under a file, no permission, a full disk
        sys.exit(f"error: {e}")
    tok = load_tokenizer(out)
    print(f"tokenizer: {out} ({tok.vocab_size} tokens, fingerprint {tok.fingerprint})")


if __name__ == "__main__":
    main()
