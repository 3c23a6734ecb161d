"""Command-line flags shared by the inference scripts (`launch/chat.py`, `serve.py`, `generate.py`)."""

from __future__ import annotations

import argparse

from minimind_fast.generation import GenerationConfig


def add_model_arguments(p: argparse.ArgumentParser, *, model_required: bool = True) -> None:
    """Which weights to load and where: --model, --tokenizer, --lora, --device, --dtype, --no-cuda-graph."""
    if model_required:
        p.add_argument("--model", required=True, help="model dir, run dir, Hugging Face export or MiniMind .pth")
    p.add_argument("--tokenizer", help="tokenizer dir, for weights with none beside them (one other than the "
                                       "tokenizer beside the weights is refused)")
    p.add_argument("--lora", help="LoRA adapter: an adapter dir, or a LoRA run/checkpoint dir (newest adapter); "
                                  "a LoRA run given as --model gets its own adapter unless --lora none")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    p.add_argument("--no-cuda-graph", action="store_true", help="decode eagerly on CUDA")


def add_sampling_arguments(p: argparse.ArgumentParser, *, max_new_tokens: int = 512, temperature: float = 0.85,
                           top_p: float = 0.85, seed: int | None = None) -> None:
    """Sampling flags; the defaults differ per script (chat samples, a smoke test decodes greedily)."""
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=top_p)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=seed)


def generation_config(a: argparse.Namespace, stop_token_ids: list[int],
                      stop_strings: list[str] | None = None) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k,
                            top_p=a.top_p, repetition_penalty=a.repetition_penalty,
                            stop_token_ids=stop_token_ids, stop_strings=stop_strings or [], seed=a.seed)
