"""Turning one JSONL record into token ids and a loss mask, for each dataset kind.

Pretrain: `{"text": ...}` -> `<|im_start|>` text `<|im_end|>` (MiniMind's bos/eos around each document).
SFT / reasoning: `{"conversations": [{"role", "content"}, ...]}` rendered with the chat template;
the loss mask covers each assistant reply from its first content token through its `<|im_end|>`.
Reasoning also marks the `<think>`/`</think>`/`<answer>`/`</answer>` tags (mask value 2) for the
extra loss weight. DPO: `{"chosen": [msgs], "rejected": [msgs]}` or prompt/chosen/rejected strings.
Problems raise `RecordError` with a short reason; the caller adds file and line.
"""

from __future__ import annotations

import json

import numpy as np

from minimind_fast.data.tokenizer import ChatTokenizer

REASONING_TAGS = ("<think>", "</think>", "<answer>", "</answer>")
ROLES = ("system", "user", "assistant", "tool")


class RecordError(ValueError):
    """A JSONL record that cannot be used; `.reason` is a short category for the counts."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def parse_line(line: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise RecordError("malformed_json", str(e)) from None
    if not isinstance(record, dict):
        raise RecordError("malformed_json", "a line must hold a JSON object")
    return record


def check_conversation(msgs, field: str) -> list[dict]:
    if not isinstance(msgs, list):
        raise RecordError("missing_field", f"'{field}' must be a list of messages")
    if not msgs:
        raise RecordError("empty_conversation", f"'{field}' is empty")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
            raise RecordError("bad_message", f"'{field}'[{i}] needs a role in {ROLES} and a string content")
    if not any(m["role"] == "assistant" and m["content"] for m in msgs):
        raise RecordError("empty_conversation", f"'{field}' has no non-empty assistant message")
    return msgs


def encode_pretrain(record: dict, tok: ChatTokenizer) -> tuple[np.ndarray, None]:
    text = record.get("text")
    if not isinstance(text, str):
        raise RecordError("missing_field", "no string field 'text'")
    if not text.strip():
        raise RecordError("empty_text", "'text' is empty")
    ids = [tok.bos_token_id] + tok.encode(text) + [tok.eos_token_id]
    return np.asarray(ids, dtype=np.int64), None


def encode_conversation(msgs: list[dict], tok: ChatTokenizer, tags: bool) -> tuple[np.ndarray, np.ndarray]:
    """Tokens of the rendered conversation and a mask over the assistant replies (2 on reasoning tags)."""
    text = tok.apply_chat_template(msgs)
    spans = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        start = len(tok.apply_chat_template(msgs[:i], add_generation_prompt=True))
        if text[start:start + len(m["content"])] != m["content"]:
            raise RecordError("template", "the chat template does not render replies as a suffix of the prompt")
        end = start + len(m["content"])
        close = text.find("<|im_end|>", end)
        spans.append((start, close + len("<|im_end|>") if close == end else end))
    tag_spans = []
    if tags:
        for start, end in spans:
            for tag in REASONING_TAGS:
                pos = text.find(tag, start, end)
                while pos != -1:
                    tag_spans.append((pos, pos + len(tag)))
                    pos = text.find(tag, pos + 1, end)
    ids, offsets = tok.encode_with_offsets(text)
    mask = np.zeros(len(ids), dtype=np.uint8)
    for j, (a, b) in enumerate(offsets):
        if any(s <= a and b <= e for s, e in spans):
            mask[j] = 1
            if any(a < te and ts < b for ts, te in tag_spans):
                mask[j] = 2
    return np.asarray(ids, dtype=np.int64), mask


def encode_sft(record: dict, tok: ChatTokenizer, tags: bool = False) -> tuple[np.ndarray, np.ndarray]:
    if "conversations" not in record:
        raise RecordError("missing_field", "no field 'conversations'")
    return encode_conversation(check_conversation(record["conversations"], "conversations"), tok, tags)


def dpo_conversations(record: dict) -> tuple[list[dict], list[dict]]:
    if isinstance(record.get("prompt"), str):
        for key in ("chosen", "rejected"):
            if not isinstance(record.get(key), str):
                raise RecordError("missing_field", f"prompt/chosen/rejected form needs a string '{key}'")
        user = {"role": "user", "content": record["prompt"]}
        return ([user, {"role": "assistant", "content": record["chosen"]}],
                [user, {"role": "assistant", "content": record["rejected"]}])
    for key in ("chosen", "rejected"):
        if key not in record:
            raise RecordError("missing_field", f"no field '{key}'")
    return check_conversation(record["chosen"], "chosen"), check_conversation(record["rejected"], "rejected")
