"""Show what a shard directory holds before training on it: each split's figures, and documents decoded
with the text that carries loss between ⟦ ⟧ (the reasoning tags weighted extra between ⟪ ⟫).

    python launch/inspect_shards.py --data data/shards/sft                    figures, then document 0
    python launch/inspect_shards.py --data data/shards/sft --index 5 17 --split val
    python launch/inspect_shards.py --data data/shards/dpo --random 3 --seed 1
"""

import argparse
import sys

import numpy as np

from minimind_fast.data.inspection import SplitView, n_items, shard_tokenizer, show_doc, summary


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="shard directory written by launch/tokenize.py")
    p.add_argument("--split", default="train", choices=("train", "val"))
    which = p.add_mutually_exclusive_group()
    which.add_argument("--show", type=int, default=1, help="the first N documents (DPO: pairs); 0: figures only")
    which.add_argument("--index", type=int, nargs="+", help="these documents (DPO: pairs)")
    which.add_argument("--random", type=int, metavar="N", help="N documents drawn at random (--seed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", help="tokenizer dir (default: the one manifest.json names)")
    return p.parse_args()


def main() -> None:
    a = parse_args()
    for flag, value in (("--show", a.show), ("--random", a.random), ("--seed", a.seed)):
        if value is not None and value < 0:
            sys.exit(f"error: {flag} {value}: must be >= 0")
    try:
        print(summary(a.data))
        if a.index is None and a.random is None and a.show == 0:
            return  # figures only: an empty split is no error
        view = SplitView(a.data, a.split)
        count = n_items(view)
        if a.index is not None:
            picks = a.index
        elif a.random is not None:
            picks = sorted(np.random.default_rng(a.seed).choice(count, min(a.random, count), replace=False).tolist())
        else:
            picks = range(min(max(a.show, 0), count))
        if picks:
            tokenizer = shard_tokenizer(a.data, a.tokenizer)
            for index in picks:
                print(show_doc(view, index, tokenizer))
    except (OSError, ValueError, IndexError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
