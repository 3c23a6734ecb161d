"""Held-out loss and perplexity of a model over a split of pre-tokenized shards.

    python launch/evaluate.py --model runs/pre --data data/shards/pretrain            the val split
    python launch/evaluate.py --model runs/sft --data data/shards/sft --split train --output eval.json

Pretrain shards score every next token; SFT and reasoning shards the assistant's tokens. Use the
--seq-len (and --doc-attention) the model was trained with: the loss depends on the context it sees.
A run's logged val_loss also takes its --micro-batch-size, --seed, --eval-batches (as --max-batches)
and, for a run on several processes, --ranks.
"""

import argparse
import sys

from minimind_fast.chat import load_chat_model
from minimind_fast.evaluation import evaluate, model_tokenizer_fingerprint, report, write_result


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model dir, run dir, Hugging Face export or MiniMind .pth")
    p.add_argument("--tokenizer", help="tokenizer dir to check the shards against, for a model with none "
                                       "beside its weights (a MiniMind .pth); where the model has one, it must "
                                       "be that one (default: the one beside the weights)")
    p.add_argument("--lora", help="LoRA adapter dir or run (a LoRA run given as --model gets its own)")
    p.add_argument("--data", required=True, help="shard directory written by launch/tokenize.py")
    p.add_argument("--split", default="val", choices=("val", "train"))
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--max-batches", type=int, help="score only this many batches, per rank with --ranks "
                                                   "(default: the whole split; a run's val_loss: its --eval-batches)")
    p.add_argument("--seed", type=int, default=1337, help="the order of batches (matters with --max-batches; "
                                                          "training evaluates with its --seed)")
    p.add_argument("--ranks", type=int, default=1, help="deal the split out as a run on this many processes "
                                                        "does (to reproduce its val_loss)")
    p.add_argument("--doc-attention", action="store_true", help="keep attention inside packed documents")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    p.add_argument("--output", help="also write the result as JSON here")
    return p.parse_args()


def main() -> None:
    a = parse_args()
    if min(a.seq_len, a.micro_batch_size, a.ranks, 1 if a.max_batches is None else a.max_batches) < 1:
        sys.exit("error: --seq-len, --micro-batch-size, --ranks and --max-batches must be >= 1")
    if a.seed < 0:  # numpy's generator refuses it, naming no flag
        sys.exit(f"error: --seed {a.seed}: must be >= 0")
    try:
        fingerprint = model_tokenizer_fingerprint(a.model, a.tokenizer)
        if fingerprint is None:
            print(f"note: no tokenizer beside {a.model}: the shards' tokenizer is not checked", file=sys.stderr)
        model = load_chat_model(a.model, a.device, a.dtype, a.lora)
        result = evaluate(model, a.data, split=a.split, seq_len=a.seq_len, micro_batch_size=a.micro_batch_size,
                          max_batches=a.max_batches, seed=a.seed, doc_attention=a.doc_attention,
                          tokenizer_fingerprint=fingerprint, ranks=a.ranks)
        print(report(result))
        if a.output:
            write_result(result, a.output, a.model)
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
