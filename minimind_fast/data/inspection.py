"""What a shard directory holds, read back as text: the figures of each split, and documents decoded with
the tokens that carry loss marked, so a user sees what training will learn before spending a run on it.

In a document, text whose tokens carry loss (mask 1: an assistant's reply) stands between `⟦` and `⟧`,
and the reasoning tags that carry extra weight (mask 2) between `⟪` and `⟫`; the rest (prompts, the
template's framing) is context only. Pretraining documents carry loss on every token and are shown
plain. A DPO record is two documents, its chosen then its rejected conversation.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from minimind_fast.data.loaders import open_split, read_manifest
from minimind_fast.data.shards import Shard
from minimind_fast.data.tokenizer import ChatTokenizer, load_tokenizer

MARKS = {1: ("⟦", "⟧"), 2: ("⟪", "⟫")}
PERCENTILES = (50, 90, 99)
PROBLEMS_SHOWN = 5


class SplitView:
    """One split's shards as one sequence of documents."""

    def __init__(self, shard_dir: Path, split: str):
        self.manifest, self.shards = open_split(shard_dir, split, None)
        self.split = split
        self.starts = np.cumsum([0] + [s.n_docs for s in self.shards])

    @property
    def n_docs(self) -> int:
        return int(self.starts[-1])

    def doc(self, index: int) -> tuple[np.ndarray, np.ndarray | None, Shard, int]:
        """Document `index` of the split: tokens, mask, and the shard and position it is read from."""
        if not 0 <= index < self.n_docs:
            raise IndexError(f"document {index} is not in the {self.split} split ({self.n_docs} documents)")
        k = int(np.searchsorted(self.starts, index, side="right")) - 1
        tokens, mask = self.shards[k].doc(index - int(self.starts[k]))
        return tokens, mask, self.shards[k], index - int(self.starts[k])

    def lengths(self) -> np.ndarray:
        return np.concatenate([np.diff(s.offsets.astype(np.int64)) for s in self.shards])

    def trained_tokens(self) -> int | None:
        if self.shards[0].mask is None:
            return None
        return sum(int(np.count_nonzero(s.mask)) for s in self.shards)


def split_figures(view: SplitView) -> str:
    """Documents, tokens, document lengths (percentiles) and the share of tokens that carry loss."""
    lengths = view.lengths()
    tokens = int(lengths.sum())
    pairs = f" ({view.n_docs // 2:,} pairs)" if view.manifest["kind"] == "dpo" else ""
    line = f"{view.split}: {view.n_docs:,} documents{pairs}, {tokens:,} tokens in {len(view.shards)} shard(s)"
    if view.n_docs:
        cuts = np.percentile(lengths, PERCENTILES).round().astype(int)
        line += "; length " + ", ".join(f"p{p} {c:,}" for p, c in zip(PERCENTILES, cuts))
        line += f", max {int(lengths.max()):,}"
    trained = view.trained_tokens()
    if trained is not None and tokens:
        line += f"; {trained:,} tokens carry loss ({trained / tokens:.1%})"
    return line


def summary(shard_dir: str | os.PathLike) -> str:
    """The manifest's provenance and skips, and each split's figures."""
    shard_dir = Path(shard_dir)
    m = read_manifest(shard_dir)
    lines = [f"{shard_dir}: {m['kind']} shards, vocabulary {m['vocab_size']:,}, tokenizer "
             f"{m.get('tokenizer_fingerprint', '?')} ({m.get('tokenizer_dir', '?')}), seq_len {m.get('seq_len', '?')}"]
    for src in m.get("sources", []):
        lines.append(f"  source {src.get('path')}: {src.get('records', '?'):,} records, skipped "
                     f"{src.get('skipped') or 'none'}")
    for split, entry in m["splits"].items():
        if isinstance(entry, dict) and entry.get("shards") == []:  # --val-fraction 0: none held out
            lines.append(f"  {split}: no documents")
        else:
            lines.append("  " + split_figures(SplitView(shard_dir, split)))
    for problem in m.get("problems", [])[:PROBLEMS_SHOWN]:
        lines.append(f"  problem: {problem}")
    more = len(m.get("problems", [])) - PROBLEMS_SHOWN
    if more > 0:
        lines.append(f"  ... {more} more problem(s) in manifest.json")
    return "\n".join(lines)


def marked_text(tokens: np.ndarray, mask: np.ndarray | None, tokenizer: ChatTokenizer) -> str:
    """The document decoded with its special tokens, each run of loss-carrying tokens between its marks.

    Runs are decoded apart: a character whose bytes a run boundary splits (rare: boundaries fall at
    the template's tokens) shows as U+FFFD."""
    ids = tokens.tolist()
    if mask is None:
        return tokenizer.decode(ids, skip_special_tokens=False)
    values = mask.tolist()
    pieces, start = [], 0
    for end in range(1, len(ids) + 1):
        if end == len(ids) or values[end] != values[start]:
            text = tokenizer.decode(ids[start:end], skip_special_tokens=False)
            opening, closing = MARKS.get(values[start], ("", ""))
            pieces.append(opening + text + closing)
            start = end
    return "".join(pieces)


def show_doc(view: SplitView, index: int, tokenizer: ChatTokenizer) -> str:
    """A heading (where the document is, its length and trained tokens) and the marked text; a DPO
    record's two documents under one heading."""
    if view.manifest["kind"] == "dpo":
        if not 0 <= index < view.n_docs // 2:
            raise IndexError(f"pair {index} is not in the {view.split} split ({view.n_docs // 2} pairs)")
        chosen, rejected = (view.doc(2 * index + side) for side in (0, 1))
        return "\n".join([f"--- pair {index} of {view.split}", "chosen:", marked_text(*chosen[:2], tokenizer),
                          "rejected:", marked_text(*rejected[:2], tokenizer)])
    tokens, mask, shard, position = view.doc(index)
    trained = len(tokens) if mask is None else int(np.count_nonzero(mask))
    head = (f"document {index} of {view.split} ({shard.path.name} #{position}): {len(tokens)} tokens, "
            f"{trained} carry loss")
    return f"--- {head}\n{marked_text(tokens, mask, tokenizer)}"


def n_items(view: SplitView) -> int:
    """What `show_doc` indexes: documents, or a DPO split's pairs."""
    return view.n_docs // 2 if view.manifest["kind"] == "dpo" else view.n_docs


def shard_tokenizer(shard_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike | None) -> ChatTokenizer:
    """The tokenizer that wrote the shards: `tokenizer_dir` if given, else the manifest's; refused when
    its fingerprint is not the manifest's (the ids would decode to another text)."""
    m = read_manifest(shard_dir)
    source = tokenizer_dir or m.get("tokenizer_dir")
    if not source:
        raise ValueError(f"{shard_dir}: manifest.json names no tokenizer; pass --tokenizer DIR")
    try:
        tokenizer = load_tokenizer(source)
    except (OSError, ValueError) as e:
        hint = "" if tokenizer_dir else " (the manifest's tokenizer_dir; pass --tokenizer DIR if it moved)"
        raise ValueError(f"{source}: cannot load the tokenizer{hint}: {e}") from None
    expected = m.get("tokenizer_fingerprint")
    if expected and tokenizer.fingerprint != expected:
        raise ValueError(f"--tokenizer {source} is not the tokenizer of {shard_dir} (fingerprint "
                         f"{tokenizer.fingerprint}, the shards' {expected})")
    return tokenizer
