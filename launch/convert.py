"""Convert between MiniMind2 checkpoints, our model directories and Hugging Face directories.

    python launch/convert.py from-minimind out/full_sft_512.pth --out models/sft512 --tokenizer TOKENIZER_DIR
    python launch/convert.py from-minimind full_sft_640_moe.pth --out models/moe --num-attention-heads 8
    python launch/convert.py to-hf RUN_OR_MODEL_DIR --out hf/minimind [--dtype bfloat16] [--tokenizer DIR]
    python launch/convert.py from-hf hf/minimind --out models/back
    python launch/convert.py merge-lora MODEL_DIR --lora ADAPTER_DIR --out models/merged
    python launch/convert.py merge-lora LORA_RUN --lora LORA_RUN --out models/merged   (a LoRA run keeps its base)

A `.pth` carries no config: sizes come from the tensor shapes; the head count (not visible in the
shapes) defaults to MiniMind2's 8. Any ModelConfig field can be set with --set NAME=VALUE.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from minimind_fast import interop
from minimind_fast.config import ModelConfig

# Overrides with their own flags (the ones a MiniMind2 user may need); --set covers every other field.
OVERRIDE_FLAGS = {
    "num_attention_heads": int, "num_key_value_heads": int, "hidden_size": int, "num_hidden_layers": int,
    "rope_theta": float, "rms_norm_eps": float, "max_position_embeddings": int, "num_experts_per_tok": int,
}

CONFIG_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)} - {"extra"}


def parse_set(items: list[str]) -> dict:
    """`NAME=VALUE` pairs; VALUE is read as JSON when it parses (numbers, true/false), else as a string."""
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected NAME=VALUE")
        if name not in CONFIG_FIELDS:
            raise ValueError(f"--set {item!r}: {name!r} is not a ModelConfig field "
                             f"(one of {', '.join(sorted(CONFIG_FIELDS))})")
        try:
            out[name] = json.loads(value)
        except json.JSONDecodeError:
            out[name] = value
    return out


def from_minimind(a: argparse.Namespace) -> Path:
    overrides = {name: getattr(a, name) for name in OVERRIDE_FLAGS if getattr(a, name) is not None}
    overrides.update(parse_set(a.set))
    if a.yarn:
        overrides["inference_rope_scaling"] = True
    return interop.convert_minimind_pth(a.pth, a.out, a.tokenizer, **overrides)


def to_hf(a: argparse.Namespace) -> Path:
    return interop.export_hf(a.model, a.out, tokenizer_dir=a.tokenizer, dtype=a.dtype)


def from_hf(a: argparse.Namespace) -> Path:
    return interop.convert_hf_dir(a.hf_dir, a.out, a.tokenizer)


def merge_lora(a: argparse.Namespace) -> Path:
    return interop.merge_lora_into_dir(a.model, a.lora, a.out, a.tokenizer)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("from-minimind", help="MiniMind2 .pth state dict -> our model directory")
    s.add_argument("pth", help="pretrain_512.pth, full_sft_512_moe.pth, ... (or a *_resume.pth)")
    s.add_argument("--out", required=True, help="model directory to write")
    s.add_argument("--tokenizer", help="tokenizer directory to copy in (MiniMind's model/ folder)")
    for name, kind in OVERRIDE_FLAGS.items():
        s.add_argument("--" + name.replace("_", "-"), dest=name, type=kind)
    s.add_argument("--yarn", action="store_true", help="turn on inference_rope_scaling (YaRN)")
    s.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="any other ModelConfig field (repeatable)")
    s.set_defaults(func=from_minimind)

    s = sub.add_parser("to-hf", help="model/run directory or .pth -> Hugging Face Llama/Qwen3 directory")
    s.add_argument("model", help="model directory, run directory (a LoRA run: its adapter merged), MiniMind .pth")
    s.add_argument("--out", required=True)
    s.add_argument("--tokenizer", help="tokenizer directory, for weights with none beside them (another than the "
                                       "one beside them is refused)")
    s.add_argument("--dtype", default="float32", choices=sorted(interop.HF_DTYPES))
    s.set_defaults(func=to_hf)

    s = sub.add_parser("from-hf", help="Hugging Face Llama/Qwen3 directory -> our model directory")
    s.add_argument("hf_dir")
    s.add_argument("--out", required=True)
    s.add_argument("--tokenizer", help="tokenizer directory, for an HF directory without one (another than its "
                                       "own is refused)")
    s.set_defaults(func=from_hf)

    s = sub.add_parser("merge-lora", help="fold a LoRA adapter into its base model -> model directory")
    s.add_argument("model", help="base model directory, run directory or .pth")
    s.add_argument("--lora", required=True, help="adapter directory (adapter.safetensors + adapter_config.json), "
                   "or a LoRA run/checkpoint directory (its newest adapter)")
    s.add_argument("--out", required=True)
    s.add_argument("--tokenizer", help="tokenizer directory, for a base with none beside it (another than the "
                                       "one beside it is refused)")
    s.set_defaults(func=merge_lora)
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        out = a.func(a)
    except (OSError, ValueError) as e:  # OSError: also a --out under a file, no permission, a full disk
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
