"""Held-out loss and perplexity of a trained model over a shard directory (`launch/evaluate.py`).

The same next-token loss that training logs as `val_loss`, over a whole split instead of the first
`--eval-batches`: pretrain shards count every target token, SFT and reasoning shards the assistant's
tokens (unweighted: the reasoning stage's extra weight on its tags is a training choice, not part of
the model's likelihood). DPO shards hold pairs, not a text to score, and are refused.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from minimind_fast.chat import find_tokenizer
from minimind_fast.data.loaders import build_loader, read_manifest
from minimind_fast.files import write_text_whole
from minimind_fast.model import MiniMindForCausalLM

TOKEN_KINDS = ("pretrain", "sft", "reasoning")


@dataclass
class EvalResult:
    data: str
    split: str
    seq_len: int
    tokens: int  # target tokens the loss is a mean over
    batches: int
    loss: float
    perplexity: float


def check_shards(data: Path, split: str) -> dict:
    """The manifest of `data`, refused when it holds no token-level text or has no such split."""
    if not data.is_dir():
        raise FileNotFoundError(f"--data {data}: no such shard directory")
    if not (data / "manifest.json").exists():
        raise ValueError(f"--data {data}: no manifest.json there (write shards with launch/tokenize.py)")
    manifest = read_manifest(data)
    if manifest["kind"] not in TOKEN_KINDS:
        raise ValueError(f"--data {data} holds {manifest['kind']} shards; perplexity needs "
                         f"{', '.join(TOKEN_KINDS)} shards")
    if split not in manifest["splits"]:
        raise ValueError(f"--data {data} has no {split!r} split (it has {', '.join(sorted(manifest['splits']))})")
    entry = manifest["splits"][split]
    if isinstance(entry, dict) and not entry.get("shards"):  # tokenize.py writes an empty val with --val-fraction 0
        raise ValueError(f"--data {data}: its {split} split is empty (no documents were held out when it was "
                         f"tokenized); score another split or shards with a {split} split")
    return manifest


def check_tokenizer(manifest: dict, data: Path, fingerprint: str | None) -> None:
    """Shards are ids of one tokenizer: scored by a model trained with another, their loss means nothing."""
    then = manifest.get("tokenizer_fingerprint")
    if fingerprint is not None and then is not None and fingerprint != then:
        raise ValueError(f"--data {data} was tokenized with another tokenizer (fingerprint {then}) than the "
                         f"model's ({fingerprint}): tokenize the data with the model's tokenizer")


def model_tokenizer_fingerprint(model: str | os.PathLike, tokenizer: str | os.PathLike | None) -> str | None:
    """The fingerprint of the model's tokenizer, which its shards must have been written with: the one
    beside the weights, or --tokenizer's (`find_tokenizer` refuses one other than the model's own); None
    when neither is known (a MiniMind .pth alone: the shards go unchecked)."""
    try:
        return find_tokenizer(model, tokenizer).fingerprint
    except FileNotFoundError:
        if tokenizer:
            raise
        return None


@torch.no_grad()
def evaluate(model: MiniMindForCausalLM, data: str | os.PathLike, *, split: str = "val", seq_len: int = 512,
             micro_batch_size: int = 8, max_batches: int | None = None, seed: int = 1337, doc_attention: bool = False,
             tokenizer_fingerprint: str | None = None, ranks: int = 1) -> EvalResult:
    """Mean next-token loss of `model` over `split` of the shards in `data` (all of it, or the first
    `max_batches` batches of the order `seed` draws, as training's evaluation does with its --seed), and its
    perplexity exp(loss). `ranks` deals the split out as a run on that many processes does (each its share
    of the order, `max_batches` each, as many as the rank with fewest), so that its val_loss is reproduced."""
    data = Path(data)
    manifest = check_shards(data, split)
    check_tokenizer(manifest, data, tokenizer_fingerprint)
    context = model.config.max_position_embeddings
    if seq_len > context:
        raise ValueError(f"--seq-len {seq_len} exceeds the model's context length {context}")
    loaders = [build_loader(manifest["kind"], data, seq_len=seq_len, micro_batch_size=micro_batch_size, seed=seed,
                            rank=rank, world_size=ranks, split=split, vocab_size=model.config.vocab_size,
                            drop_last=False) for rank in range(ranks)]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    # Sums kept on the device in float64: one read at the end, and no rounding drift over a long split.
    total = torch.zeros(2, dtype=torch.float64, device=device)
    batches = 0
    # zip stops at the rank that runs out first, as training's evaluation does (every rank the same count).
    for step, group in enumerate(zip(*(loader.one_pass() for loader in loaders))):
        if max_batches is not None and step >= max_batches:
            break
        for batch in group:
            total += batch_loss_sum(model, batch, device, doc_attention)
        batches += len(group)
    model.train(was_training)
    loss_sum, tokens = total.tolist()
    if tokens == 0:  # e.g. SFT rows cut at seq_len before any assistant reply
        scored = f"the {split} split" if max_batches is None else f"the first {batches} batch(es) of the {split} split"
        raise ValueError(f"--data {data}: {scored} has no target tokens to score at --seq-len {seq_len}")
    loss = loss_sum / tokens
    return EvalResult(str(data), split, seq_len, int(tokens), batches, loss, perplexity(loss))


def perplexity(loss: float) -> float:
    """exp(loss); inf past the float range (a model far off the data), not a clamped, finite-looking number."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def batch_loss_sum(model: MiniMindForCausalLM, batch: dict, device: torch.device, doc_attention: bool) -> torch.Tensor:
    """(sum of the batch's token losses, their count) as float64: the model's mean loss times its count."""
    targets = batch["targets"].to(device)
    inputs = {"input_ids": batch["input_ids"].to(device)}
    if doc_attention:
        inputs.update(position_ids=batch["position_ids"].to(device), cu_seqlens=batch["cu_seqlens"].to(device),
                      max_seqlen=batch["max_seqlen"])
    count = (targets != -100).sum()
    if not count.item():  # e.g. an SFT row whose assistant turns were all cut off: nothing to score
        return torch.zeros(2, dtype=torch.float64, device=device)
    loss = model(**inputs, targets=targets).loss
    return torch.stack([loss.double() * count, count.double()])


def report(result: EvalResult) -> str:
    # A far-off model's perplexity in fixed point would run to hundreds of digits.
    ppl = f"{result.perplexity:.2f}" if result.perplexity < 1e6 else f"{result.perplexity:.3e}"
    return (f"{result.data} ({result.split}): loss {result.loss:.4f}, perplexity {ppl} "
            f"over {result.tokens:,} tokens in {result.batches} batch{'es' * (result.batches != 1)} of seq_len "
            f"{result.seq_len}")


def write_result(result: EvalResult, path: str | os.PathLike, model: str) -> None:
    """The result as JSON at `path`, written whole (a temporary sibling, then renamed)."""
    path = Path(path)
    # Strict JSON has no inf or NaN: such a value is null.
    record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in asdict(result).items()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_whole(path, json.dumps({"model": model, **record}, indent=2, allow_nan=False) + "\n")
    except OSError as e:  # a directory, a read-only place: named as the flag, not the temporary
        raise OSError(f"--output {path}: cannot write it ({e.strerror or e})") from None
