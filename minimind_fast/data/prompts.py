"""Prompt datasets for on-policy training (GRPO): a JSONL of prompts and a rank-aware, resumable loader.

Each line is `{"prompt": "...", "answer": ...}` (any further fields are kept and handed to the reward
functions), or `{"conversations": [...]}` (or `"messages"`, or TRL's conversational `"prompt": [...]`), whose messages
up to and including the last user turn are
the prompt (later turns, such as a reference reply, are dropped). The messages take every shape SFT
records take (`records.check_messages`): tool definitions in a system message's `tools`/`functions`,
`tool_calls`, a reply that only calls tools with `"content": null`, lists or JSON strings. Prompts are
rendered with the tokenizer's chat template, the tool definitions as `tools=`, and a generation
prompt, and encoded into exactly the ids the SFT data puts before an assistant reply (`records.prompt_doc`,
`pipeline.doc_ids`: text quoting a control token is text), so the policy continues the way it was trained to.
Problems raise ValueError naming the file, the line and the field.

Unlike the shard loaders, prompts are few and small, so they are read and encoded into memory once.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from minimind_fast.data.loaders import check_resume_state, fingerprint
from minimind_fast.data.pipeline import doc_ids
from minimind_fast.data.records import RecordError, check_messages, conversation_field, prompt_doc, refuse_record_tools
from minimind_fast.data.sources import iter_records
from minimind_fast.data.tokenizer import ChatTokenizer


@dataclass
class PromptRecord:
    messages: list[dict]
    sample: dict  # the JSONL record as read: what reward functions see
    line: int


def _messages(record: dict) -> list[dict]:
    """The prompt's chat messages; raises ValueError with the field at fault (the caller adds file:line)."""
    refuse_record_tools(record)
    if "prompt" in record and not isinstance(record["prompt"], list):
        if not isinstance(record["prompt"], str) or not record["prompt"].strip():
            raise ValueError("field 'prompt' must be a non-empty string or a list of messages")
        return [{"role": "user", "content": record["prompt"]}]
    # TRL's conversational form puts the messages in 'prompt'.
    key = "prompt" if "prompt" in record else conversation_field(record)  # RecordError is a ValueError
    if key is None:
        raise ValueError("needs a field 'prompt' (string or list of messages) or 'conversations' or 'messages' "
                         "(list of messages)")
    msgs = check_messages(record[key], key)
    users = [i for i, m in enumerate(msgs) if m["role"] == "user"]
    if not users:
        raise ValueError(f"field '{key}' has no user message to answer")
    return msgs[:users[-1] + 1]


def read_prompt_file(path: str | Path, required: dict[str, str] | None = None) -> list[PromptRecord]:
    """Every prompt of a JSONL or Parquet file (`sources`; blank lines skipped). `required` maps a field
    every record must have to the reason given when one lacks it (e.g. {"answer": "the 'answer' reward"})."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: not a file (expected a JSONL of prompts)")
    records = []
    for lineno, line in iter_records(path):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except UnicodeDecodeError as e:
            raise ValueError(f"{where}: not UTF-8 ({e.reason} at byte {e.start})") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
        except RecursionError:  # what json raises past ~1000 levels of [ or {
            raise ValueError(f"{where}: malformed JSON (nested too deeply)") from None
        if not isinstance(record, dict):
            raise ValueError(f"{where}: a line must hold a JSON object")
        try:
            messages = _messages(record)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        for field, needed_by in (required or {}).items():
            if record.get(field) is None:
                raise ValueError(f"{where}: no field '{field}' (needed by {needed_by})")
        records.append(PromptRecord(messages, record, lineno))
    if not records:
        raise ValueError(f"{path}: no prompts in the file")
    return records


def encode_prompts(records: list[PromptRecord], tokenizer: ChatTokenizer, max_tokens: int,
                   source: str = "") -> tuple[list[list[int]], list[PromptRecord]]:
    """Token ids of each prompt under the chat template (with the generation prompt), as the SFT shards hold
    the text before a reply (`pipeline.doc_ids`: a prompt quoting `<|im_end|>` is text), leaving out those
    longer than `max_tokens` (no room left to answer); returns (ids, the records kept)."""
    docs = []
    for r in records:
        try:
            docs.append(prompt_doc(r.messages, tokenizer))
        except RecordError as e:  # a user template may reject a record (e.g. it wants a system message)
            raise ValueError(f"{source}:{r.line}: {e}") from None
    ids, kept = [], []
    for r, enc in zip(records, doc_ids(tokenizer, docs)):
        if len(enc) <= max_tokens:
            ids.append(enc)
            kept.append(r)
    return ids, kept


class PromptLoader:
    """Micro-batches of prompts, forever: each epoch a seeded permutation split disjointly over ranks.

    For on-policy reuse, every `grad_accum` consecutive micro-batches (one optimizer step's worth)
    are handed out `repeats` times in a row; each batch says which rollout it is (`rollout_id`, a
    count of distinct batches on this rank) and which pass over it (`rollout_pass`). The position is
    one counter, so `state_dict()` after a batch resumes exactly at the next one.
    """

    kind = "prompts"

    def __init__(self, prompts: list[list[int]], samples: list[dict], *, micro_batch_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, grad_accum: int = 1, repeats: int = 1, source: str = "prompts"):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        if micro_batch_size < 1 or grad_accum < 1 or repeats < 1:
            raise ValueError("micro_batch_size, grad_accum and repeats must be positive")
        if len(prompts) != len(samples):
            raise ValueError("one sample record per prompt")
        self.prompts, self.samples = prompts, samples
        self.batch_size, self.seed, self.rank, self.world_size = micro_batch_size, seed, rank, world_size
        self.grad_accum, self.repeats = grad_accum, repeats
        self.n_items = len(prompts)
        self.data_id = fingerprint([json.dumps(prompts), json.dumps(samples, sort_keys=True, default=str)])
        self.batches_per_epoch = self.n_items // world_size // micro_batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(f"{source}: {self.n_items} prompts cannot fill one micro-batch of {micro_batch_size} "
                             f"on each of {world_size} rank(s); lower --micro-batch-size or add prompts")
        self.position = 0  # batches handed out so far, repeats included
        self._order: tuple[int, np.ndarray] | None = None

    def _rank_order(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            perm = np.random.default_rng((self.seed, epoch)).permutation(self.n_items)
            per_rank = self.n_items // self.world_size
            self._order = (epoch, perm[self.rank::self.world_size][:per_rank])
        return self._order[1]

    def batch_at(self, position: int) -> dict:
        """The batch handed out at `position` (a pure function of it: what makes resume exact)."""
        cycle, within = divmod(position, self.grad_accum * self.repeats)
        rollout_pass, micro = divmod(within, self.grad_accum)
        rollout_id = cycle * self.grad_accum + micro
        epoch, b = divmod(rollout_id, self.batches_per_epoch)
        picked = self._rank_order(epoch)[b * self.batch_size:(b + 1) * self.batch_size].tolist()
        return {"prompt_ids": [self.prompts[i] for i in picked], "samples": [self.samples[i] for i in picked],
                "prompt_index": picked, "rollout_id": rollout_id, "rollout_pass": rollout_pass, "epoch": epoch}

    def __iter__(self) -> Iterator[dict]:
        while True:
            batch = self.batch_at(self.position)
            self.position += 1
            yield batch

    def state_dict(self) -> dict:
        return {"kind": self.kind, "position": self.position, "seed": self.seed, "rank": self.rank,
                "world_size": self.world_size, "micro_batch_size": self.batch_size, "grad_accum": self.grad_accum,
                "repeats": self.repeats, "n_items": self.n_items, "data": self.data_id}

    def load_state_dict(self, state: dict) -> None:
        check_resume_state(state, self.state_dict(), ("kind", "seed", "rank", "world_size", "micro_batch_size",
                                                      "grad_accum", "repeats", "n_items"), "prompts")
        self.position = int(state["position"])
