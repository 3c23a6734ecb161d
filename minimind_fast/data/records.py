"""Turning JSONL records into text plus character spans, and encoded tokens into loss masks.

Pretrain: `{"text": ...}` -> `<|im_start|>` text `<|im_end|>` (MiniMind's bos/eos around each document).
SFT / reasoning: `{"conversations": [{"role", "content"}, ...]}` (or `"messages"`) rendered with the tokenizer's chat
template; the loss mask covers each assistant turn from after its `<|im_start|>assistant\n` through
its `<|im_end|>` (what the template renders there included, such as minimind-3's `<think>` block).
Reasoning also marks the `<think>`/`</think>`/`<answer>`/`</answer>` tags (mask value 2) for the
extra loss weight. DPO: `{"chosen": [msgs], "rejected": [msgs]}` (with TRL's list `prompt`, the
messages before both) or prompt/chosen/rejected strings.

Parsing and rendering (`record_texts`) is split from encoding (`mask_from_offsets`) so that the
pipeline can encode a whole chunk of texts in one `encode_batch` call. Problems raise `RecordError`
with a short reason; the caller adds file and line.
"""

from __future__ import annotations

import bisect
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from minimind_fast.data.tokenizer import LONE_SURROGATE, MARK, ChatTokenizer

REASONING_TAGS = ("<think>", "</think>", "<answer>", "</answer>")
ROLES = ("system", "user", "assistant", "tool")
END = "<|im_end|>"
ASSISTANT_HEADER = "<|im_start|>assistant\n"
TOOL_FIELDS = ("tools", "functions")  # a system message's tool definitions: minimind-3's name, MiniMind2's
# A record's messages: MiniMind's field name, then the one OpenAI and most Hugging Face chat datasets use.
CONVERSATION_FIELDS = ("conversations", "messages")


class RecordError(ValueError):
    """A JSONL record that cannot be used; `.reason` is a short category for the counts."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass
class Doc:
    """One document to encode: its text, the character spans that carry loss (mask 1) or weight (2), and
    those of the template's control tokens (encoded as their ids; the rest of the text, control-token
    text a record quotes included, as plain text: `pipeline._encode_docs`)."""

    text: str
    spans: list[tuple[int, int]] = field(default_factory=list)
    tag_spans: list[tuple[int, int]] = field(default_factory=list)
    controls: list[tuple[int, int]] = field(default_factory=list)
    whole: bool = False  # its every control token is the template's: encoded whole, as the tokenizer does


def parse_line(line: bytes | str) -> dict:
    """One JSONL line, as read from the file: UTF-8 (a leading byte-order mark is allowed), one object."""
    try:
        record = json.loads(line)  # bytes: decoded strictly, so other encodings are reported, not mangled
    except UnicodeDecodeError as e:
        raise RecordError("bad_unicode", f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise RecordError("malformed_json", str(e)) from None
    except RecursionError:  # what json raises past ~1000 levels of [ or {
        raise RecordError("malformed_json", "nested too deeply") from None
    if not isinstance(record, dict):
        raise RecordError("malformed_json", "a line must hold a JSON object")
    return record


def _object_list(m: dict, key: str, where: str) -> list[dict] | None:
    """A message's list of objects (`tool_calls`, `tools`), also as the JSON string minimind-3 stores."""
    value = m.get(key)
    if isinstance(value, str) and value.strip():
        try:
            value = json.loads(value)
        except ValueError:
            raise RecordError("bad_message", f"{where}.{key} is a string but not JSON") from None
    if not value:
        return None
    if not (isinstance(value, list) and all(isinstance(v, dict) for v in value)):
        raise RecordError("bad_message", f"{where}.{key} must be a list of objects")
    return value


def check_messages(msgs: object, field: str) -> list[dict]:
    """The messages, checked; copies with `tool_calls` and tool definitions decoded, and an OpenAI-style
    reply that only calls tools (`"content": null`) given an empty content. GRPO prompts use this too."""
    if not isinstance(msgs, list):
        raise RecordError("missing_field", f"'{field}' must be a list of messages")
    if not msgs:
        raise RecordError("empty_conversation", f"'{field}' is empty")
    out = []
    for i, m in enumerate(msgs):
        where = f"'{field}'[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise RecordError("bad_message", f"{where} needs a role in {ROLES} and a string content")
        m = dict(m)
        if calls := _object_list(m, "tool_calls", where):
            m["tool_calls"] = calls
            if m["role"] == "assistant" and m.get("content") is None:
                m["content"] = ""
        if not isinstance(m.get("content"), str):
            raise RecordError("bad_message", f"{where} needs a role in {ROLES} and a string content")
        if MARK in m["content"]:  # what `conversation_doc` escapes control-token text with
            raise RecordError("bad_unicode", f"{where} holds U+FDD0, a Unicode noncharacter")
        for key in TOOL_FIELDS:
            if m["role"] == "system" and key in m:
                m[key] = _object_list(m, key, where)
        out.append(m)
    return out


def check_conversation(msgs: object, field: str) -> list[dict]:
    """`check_messages`, for training text: at least one assistant reply to learn."""
    return _with_reply(check_messages(msgs, field), field)


def _has_reply(msgs: list[dict]) -> bool:
    """Whether an assistant message says or calls something: what a training record must hold."""
    return any(m["role"] == "assistant" and (m["content"] or m.get("tool_calls")) for m in msgs)


def _with_reply(msgs: list[dict], field: str) -> list[dict]:
    if not _has_reply(msgs):
        raise RecordError("empty_conversation", f"'{field}' has no non-empty assistant message")
    return msgs


def conversation_field(record: dict) -> str | None:
    """The field that holds a record's messages ('conversations' or 'messages'), None when it has neither."""
    present = [key for key in CONVERSATION_FIELDS if key in record]
    if len(present) > 1:  # which one to train on would be a guess
        raise RecordError("ambiguous_field", "both 'conversations' and 'messages': keep one")
    return present[0] if present else None


def refuse_record_tools(record: dict) -> None:
    """Tool definitions belong on the system message (MiniMind's layout); at the record's top level
    (OpenAI's request layout) they would be silently left out of the rendered text, so say so."""
    for key in TOOL_FIELDS:
        if record.get(key):
            raise RecordError("bad_message", f"top-level '{key}': put the tool definitions in the system "
                                             f"message's '{key}' field, where the chat template gets them")


def conversation_tools(msgs: list[dict]) -> list[dict] | None:
    """The tool definitions of a system message, which MiniMind hands its chat template as `tools=`."""
    for m in msgs:
        if m["role"] == "system":
            for key in TOOL_FIELDS:
                if m.get(key):
                    return m[key]
    return None


def _names(items: list[dict]) -> list[str]:
    """The function names of tool definitions or calls (OpenAI nests them under "function")."""
    names = []
    for item in items:
        fn = item.get("function") if isinstance(item.get("function"), dict) else item
        if isinstance(fn.get("name"), str) and fn["name"]:
            names.append(fn["name"])
    return names


def pretrain_doc(record: dict, tok: ChatTokenizer) -> Doc:
    text = record.get("text")
    if not isinstance(text, str):
        raise RecordError("missing_field", "no string field 'text'")
    if not text.strip():
        raise RecordError("empty_text", "'text' is empty")
    return Doc(text)


def _render(tok: ChatTokenizer, msgs: list[dict], add_generation_prompt: bool, tools: list[dict] | None) -> str:
    kwargs = {"tools": tools} if tools else {}  # none: our ChatML keeps its jinja-free fast path
    try:
        return tok.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt, **kwargs)
    except Exception as e:  # a template error is a property of this record (e.g. no system message)
        raise RecordError("template", f"the chat template failed: {e}") from None


def _check_tools_rendered(text: str, tools: list[dict] | None) -> None:
    # A template that drops the tools would teach (or prompt) replies to an unseen request.
    if tools and not all(name in text for name in _names(tools)):
        raise RecordError("template", "the chat template does not render the tool definitions (tools=)")


def prompt_text(msgs: list[dict], tok: ChatTokenizer) -> str:
    """Checked messages (`check_messages`) rendered with the generation prompt: the exact text
    `conversation_doc` puts before an assistant reply that would follow them, tools included."""
    tools = conversation_tools(msgs)
    text = _render(tok, msgs, True, tools)
    _check_unicode(text)
    _check_tools_rendered(text, tools)
    for i, m in enumerate(msgs):
        if not all(name in text for name in _names(m.get("tool_calls") or [])):
            raise RecordError("template", f"the chat template does not render message {i}'s tool_calls")
    return text


def conversation_doc(msgs: list[dict], tok: ChatTokenizer, tags: bool, first_reply: int = 0) -> Doc:
    """`_rendered_doc` with the template's control tokens marked (`Doc.controls`: `marked_doc`)."""
    return marked_doc(msgs, tok, lambda m: _rendered_doc(m, tok, tags, first_reply),
                      lambda m: _render(tok, m, False, conversation_tools(m)))


def prompt_doc(msgs: list[dict], tok: ChatTokenizer) -> Doc:
    """`prompt_text` with the template's control tokens marked (`marked_doc`): encoded by `pipeline.doc_ids`,
    the ids `conversation_doc`'s shards hold before a reply that would follow these messages."""
    return marked_doc(msgs, tok, lambda m: Doc(prompt_text(m, tok)),
                      lambda m: _render(tok, m, True, conversation_tools(m)))


def marked_doc(msgs: list[dict], tok: ChatTokenizer, doc_of: Callable[[list[dict]], Doc],
               render: Callable[[list[dict]], str]) -> Doc:
    """`doc_of(msgs)`, a rendering of the messages (`render` gives its text alone), with the template's control
    tokens marked in `Doc.controls`. The messages are rendered with each control token's text in
    their strings replaced by `MARK`, so that every control token of that rendering is the template's, then
    moved onto the real rendering. RecordError when a string holds `MARK` itself."""
    regex = tok.control_regex
    if not _quotes(msgs, regex):  # the usual case: every control token of the rendering is the template's
        doc = doc_of(msgs)
        doc.controls = [m.span() for m in regex.finditer(doc.text)]
        doc.whole = True
        return doc
    doc = doc_of(_escaped(msgs, regex))
    doc.controls = [m.span() for m in regex.finditer(doc.text)]
    return _unescaped(doc, render(msgs), regex)


def _quotes(value, regex: re.Pattern) -> bool:
    """Whether a string of `value` (messages, their fields) holds a control token's text or `MARK`: what
    `_escaped` would change or refuse, found without building its copy."""
    if isinstance(value, str):
        return MARK in value or regex.search(value) is not None
    if isinstance(value, list):
        return any(_quotes(v, regex) for v in value)
    if isinstance(value, dict):
        return any(_quotes(k, regex) or _quotes(v, regex) for k, v in value.items())
    return False


def _escaped(value, regex: re.Pattern):
    """`value` (messages, their fields) with each control token's text in a string replaced by `MARK`."""
    def escape(text: str) -> str:
        if MARK in text:
            raise RecordError("bad_unicode", "a message field holds U+FDD0, a Unicode noncharacter")
        return regex.sub(MARK, text)

    return map_strings(value, escape)


def map_strings(value, fn: Callable[[str], str]):
    """`value` (messages, their fields: JSON-like lists and dicts) with `fn` applied to each string, keys too."""
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, list):
        return [map_strings(v, fn) for v in value]
    if isinstance(value, dict):
        return {map_strings(k, fn): map_strings(v, fn) for k, v in value.items()}
    return value


def _unescaped(doc: Doc, text: str, regex: re.Pattern) -> Doc:
    """`doc`, rendered from escaped messages, moved onto `text`, the real messages' rendering: each `MARK`
    there is a control token's text here, and every position after it moves by that text's length - 1."""
    marks = [m.start() for m in re.finditer(MARK, doc.text)]
    differs = RecordError("template", "the chat template renders a message quoting a control token differently "
                                      "from the same message without it")
    growth, pos = [0], 0  # growth[j]: how far a position after j marks moves
    pieces = doc.text.split(MARK)
    for k, piece in enumerate(pieces):
        if not text.startswith(piece, pos):
            raise differs
        pos += len(piece)
        if k + 1 < len(pieces):
            quoted = regex.match(text, pos)
            if quoted is None:
                raise differs
            growth.append(growth[-1] + len(quoted.group()) - 1)
            pos = quoted.end()
    if pos != len(text):
        raise differs

    def moved(p: int) -> int:
        return p + growth[bisect.bisect_left(marks, p)]

    def spans(pairs: list[tuple[int, int]]) -> list[tuple[int, int]]:
        return [(moved(a), moved(b)) for a, b in pairs]

    return Doc(text, spans(doc.spans), spans(doc.tag_spans), spans(doc.controls))


def _rendered_doc(msgs: list[dict], tok: ChatTokenizer, tags: bool, first_reply: int = 0) -> Doc:
    """The rendered conversation and the spans of its assistant replies (each through its `<|im_end|>`),
    those from message `first_reply` on (a DPO pair's earlier turns are its prompt).

    A reply's turn starts where the rendering of the messages before it stops. Its span starts after
    the turn's ChatML header `<|im_start|>assistant\n`, so that whatever the template renders into
    the reply (an empty `<think>` block, reasoning it reformats, `tool_calls`) is learned, as MiniMind
    masks it; a template without that header gets the span from where its generation prompt stops.
    The span ends at the first `<|im_end|>` of the turn.
    """
    tools = conversation_tools(msgs)
    text = _render(tok, msgs, False, tools)
    _check_tools_rendered(text, tools)
    doc = Doc(text)
    for i, m in enumerate(msgs):
        if m["role"] != "assistant" or i < first_reply:
            continue
        before = _render(tok, msgs[:i], False, tools)
        stop = len(_render(tok, msgs[:i + 1], False, tools)) if i + 1 < len(msgs) else len(text)
        if text.startswith(ASSISTANT_HEADER, len(before)):
            start = len(before) + len(ASSISTANT_HEADER)
        else:
            start = len(_render(tok, msgs[:i], True, tools))
        close = text.find(END, start, stop)
        end = close + len(END) if close != -1 else start + len(m["content"])
        if (not text.startswith(before) or not len(before) <= start <= end <= stop
                or (close == -1 and text[start:end] != m["content"])):
            raise RecordError("template", "the chat template does not render a reply after its prompt")
        if not all(name in text[start:end] for name in _names(m.get("tool_calls") or [])):
            raise RecordError("template", f"the chat template does not render message {i}'s tool_calls")
        doc.spans.append((start, end))
        if tags:
            for tag in REASONING_TAGS:
                pos = text.find(tag, start, end)
                while pos != -1:
                    doc.tag_spans.append((pos, pos + len(tag)))
                    pos = text.find(tag, pos + 1, end)
    return doc


def dpo_conversations(record: dict) -> tuple[list[dict], list[dict]]:
    if isinstance(record.get("prompt"), str):
        for key in ("chosen", "rejected"):
            if not isinstance(record.get(key), str) or not record[key]:
                raise RecordError("missing_field", f"prompt/chosen/rejected form needs a non-empty string '{key}'")
        user = {"role": "user", "content": record["prompt"]}
        return ([user, {"role": "assistant", "content": record["chosen"]}],
                [user, {"role": "assistant", "content": record["rejected"]}])
    # A list `prompt` is the conversation before the replies (TRL's form): it belongs to both sides.
    prompt = record.get("prompt") or []
    if not isinstance(prompt, list):
        raise RecordError("missing_field", "'prompt' must be a string or a list of messages")
    prompt = check_messages(prompt, "prompt") if prompt else []  # checked apart: problems name its own field
    sides = []
    for key in ("chosen", "rejected"):
        if key not in record:
            raise RecordError("missing_field", f"no field '{key}'")
        if not isinstance(record[key], list):
            raise RecordError("missing_field", f"'{key}' must be a list of messages (or a string with a 'prompt')")
        sides.append(_with_reply(prompt + check_messages(record[key], key), key))
    return sides[0], sides[1]


def record_docs(record: dict, kind: str, tok: ChatTokenizer) -> list[Doc]:
    """The documents of one record: one, or for DPO the chosen then the rejected conversation."""
    docs = _docs(record, kind, tok)
    for d in docs:
        _check_unicode(d.text)
    return docs


def _check_unicode(text: str) -> None:
    # The tokenizers library rejects such text with a TypeError that names nothing.
    if m := LONE_SURROGATE.search(text):
        raise RecordError("bad_unicode", f"unpaired surrogate \\u{ord(m.group()):04x} (half of a \\u escape pair)")


def _docs(record: dict, kind: str, tok: ChatTokenizer) -> list[Doc]:
    if kind == "pretrain":
        return [pretrain_doc(record, tok)]
    refuse_record_tools(record)
    if kind in ("sft", "reasoning"):
        key = conversation_field(record)
        if key is None:
            raise RecordError("missing_field", "no field 'conversations' (or 'messages')")
        msgs = check_conversation(record[key], key)
        return [conversation_doc(msgs, tok, tags=kind == "reasoning")]
    chosen, rejected = dpo_conversations(record)
    shared = prompt_turns(record, chosen, rejected)
    return [conversation_doc(msgs, tok, tags=False, first_reply=shared) for msgs in (chosen, rejected)]


def prompt_turns(record: dict, chosen: list[dict], rejected: list[dict]) -> int:
    """How many leading messages of a pair are its prompt, as TRL takes it: the record's `prompt` (a string
    is one user message), else the messages chosen and rejected start with alike (each keeps at least its
    last). Their assistant turns are no part of either reply. Refused when a side has no reply after them."""
    prompt = record.get("prompt")
    if isinstance(prompt, str) or prompt:
        shared = 1 if isinstance(prompt, str) else len(prompt)
    else:
        shared = 0
        while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
            shared += 1
    for key, msgs in (("chosen", chosen), ("rejected", rejected)):
        if not _has_reply(msgs[shared:]):
            raise RecordError("empty_conversation", f"'{key}' has no non-empty assistant message after the "
                                                    f"prompt's {shared} message(s)")
    return shared


def mask_from_offsets(offsets: list[tuple[int, int]] | np.ndarray, doc: Doc) -> np.ndarray:
    """Per-token mask: 1 for tokens overlapping a loss span, 2 for those overlapping a reasoning tag."""
    mask = np.zeros(len(offsets), dtype=np.uint8)
    if len(offsets) == 0:
        return mask
    off = np.asarray(offsets, dtype=np.int64)
    a, b = off[:, 0], off[:, 1]
    for s, e in doc.spans:
        mask[(a < e) & (b > s)] = 1
    for s, e in doc.tag_spans:
        mask[(a < e) & (b > s) & (mask > 0)] = 2
    return mask
