"""Chat with a model: interactively, one prompt, or a JSONL file of prompts.

    python launch/chat.py --model RUN_DIR_OR_HF_DIR_OR_PTH [--lora DIR]           interactive (/reset, /exit)
    python launch/chat.py --model DIR --prompt "What colour is the cat?"          one answer, then exit
    python launch/chat.py --model DIR --batch in.jsonl --output out.jsonl         a file of prompts
    python launch/chat.py --model DIR --mode pretrain --prompt "The cat"          continue raw text

--batch lines are {"prompt": "..."} or {"conversations": [{"role": ..., "content": ...}, ...]}, messages as in
SFT data (a system message's tool definitions, tool_calls, content null); each output line is the input
record plus "response". A .pth file needs --tokenizer (MiniMind's tokenizer dir).
"""

import argparse
import sys

import torch

from minimind_fast.chat import (
    ChatSession,
    answer_file,
    check_chat_flags,
    check_utf8,
    check_vocab,
    find_tokenizer,
    interactive,
    load_chat_model,
    print_continuation,
    print_reply,
)
from minimind_fast.inference_args import add_model_arguments, add_sampling_arguments, generation_config


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--prompt", help="answer this once and exit")
    p.add_argument("--batch", help="JSONL (or compressed JSONL, or Parquet) file of prompts to answer")
    p.add_argument("--output", help="JSONL answers for --batch")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--mode", choices=("chat", "pretrain"), default="chat",
                   help="pretrain: continue raw text, without the chat template")
    p.add_argument("--system", help="system prompt")
    add_sampling_arguments(p)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    return p.parse_args()


def main() -> None:
    a = parse_args()
    if a.batch and not a.output:
        sys.exit("error: --batch needs --output")
    if a.seed is not None:
        torch.manual_seed(a.seed)
    if a.batch_size < 1:
        sys.exit(f"error: --batch-size must be >= 1, got {a.batch_size}")
    try:
        check_chat_flags(a.batch, a.output, a.system, a.mode)
        check_utf8(a.prompt, "--prompt")
        check_utf8(a.system, "--system")
        tokenizer = find_tokenizer(a.model, a.tokenizer)
        model = load_chat_model(a.model, a.device, a.dtype, a.lora)
        check_vocab(tokenizer, model)
        config = generation_config(a, [tokenizer.eos_token_id], a.stop)
        run(a, model, tokenizer, config)
    except (OSError, ValueError) as e:  # bad paths, files or flags (e.g. more new tokens than the context)
        sys.exit(f"error: {e}")


def run(a: argparse.Namespace, model, tokenizer, config) -> None:
    graph = not a.no_cuda_graph
    if a.batch:
        n = answer_file(model, tokenizer, config, a.batch, a.output, a.batch_size, a.mode, cuda_graph=graph)
        print(f"answered {n} prompts -> {a.output}")
    elif a.mode == "pretrain":
        print_continuation(model, tokenizer, config, a.prompt or "", cuda_graph=graph)
    elif a.prompt is not None:
        print_reply(ChatSession(model, tokenizer, config, system=a.system, cuda_graph=graph), a.prompt)
    else:
        interactive(ChatSession(model, tokenizer, config, system=a.system, cuda_graph=graph))


if __name__ == "__main__":
    main()
