"""Write the built-in corpus (pretrain, SFT, DPO, reasoning, GRPO prompts, LoRA) as MiniMind JSONL."""

import argparse
import sys

from minimind_fast.data.corpus import SIZES, write_builtin_corpus


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", choices=sorted(SIZES), default="demo")
    args = p.parse_args()
    try:
        paths = write_builtin_corpus(args.out, seed=args.seed, size=args.size)
    except OSError as e:  # an --out under a file, no permission, a full disk
        sys.exit(f"error: --out {args.out}: cannot write the corpus there ({e.strerror or e})")
    for name, path in paths.items():
        print(f"{name:13s} {path}")


if __name__ == "__main__":
    main()
