"""Write the built-in corpus (pretrain, SFT, DPO, reasoning, GRPO prompts, LoRA) as MiniMind JSONL."""

import argparse

from minimind_fast.data.corpus import SIZES, write_builtin_corpus


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", choices=sorted(SIZES), default="demo")
    args = p.parse_args()
    for name, path in write_builtin_corpus(args.out, seed=args.seed, size=args.size).items():
        print(f"{name:13s} {path}")


if __name__ == "__main__":
    main()
