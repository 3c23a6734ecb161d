"""Byte-level BPE tokenizer: training (streamed from JSONL), loading, and the ChatML chat template.

Saved in Hugging Face's layout (`tokenizer.json` + `tokenizer_config.json` with the chat template),
so `transformers.AutoTokenizer.from_pretrained(dir)` loads it; an existing MiniMind tokenizer
directory loads as is. Special tokens sit at MiniMind's ids: 0 `<|endoftext|>` (pad), 1
`<|im_start|>` (bos), 2 `<|im_end|>` (eos).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from minimind_fast.data.sources import iter_records
from minimind_fast.files import check_input_files, swap_into_place, temporary_sibling_dir

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
PAD, BOS, EOS = SPECIAL_TOKENS
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Half of a UTF-16 pair, as a broken JSON escape ("\\ud83d") leaves: it has no UTF-8 form, and the
# tokenizers library rejects any text holding one.
LONE_SURROGATE = re.compile("[\\ud800-\\udfff]")
# A Unicode noncharacter (never in interchanged text, and refused in a record's strings): stands for each
# control token's text in a record's strings while the template renders them (`records.marked_doc`), and
# spells the stand-ins that take the template's control tokens' place in encoding (`ChatTokenizer.stand_ins`).
MARK = "\ufdd0"


def unmarked(text: str) -> str:
    """`text` the model wrote (a reply, a tool's result) with each `MARK` as U+FFFD, as a decoder shows a
    character it cannot show: a message may not hold one, and the next turn would be refused for it."""
    return text.replace(MARK, "\ufffd")


# Where a long text can be cut so that its pieces, encoded apart, give the ids of the whole: just before an
# ASCII whitespace character that follows a non-whitespace one. Byte-level pre-tokenization (GPT-2's
# regex) never puts a non-space and the space after it in one pre-token, and each pre-token is encoded on
# its own. Inside a run of spaces a cut changes the pre-tokens: "a   x" is "a", "  ", " x", but "a " and
# "  x" are "a", " ", " ", " x". Not before \x1c-\x1f: whitespace to Python, not to the regex ("!\x1c" is
# one pre-token).
WHITESPACE_CUT = re.compile(r"(?<=\S)[ \t\n\r\f\v]")
# What a tokenizer directory may hold (ours or Hugging Face's); `--out` is replaced only if it holds no more.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "vocab.json", "merges.txt")


def _byte_of_char() -> dict[str, int]:
    """GPT-2's byte-to-character table, inverted: byte-level BPE writes each byte as a printable character,
    printable Latin-1 bytes as themselves and the others as U+0100 onwards, in byte order."""
    kept = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    moved = [b for b in range(256) if b not in kept]
    return {**{chr(b): b for b in kept}, **{chr(0x100 + i): b for i, b in enumerate(moved)}}


BYTE_OF_CHAR = _byte_of_char()
# A byte-fallback piece (SentencePiece's): one byte of a character the vocabulary has no piece for.
BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def iter_texts(files: Iterable[str | os.PathLike], skipped: Counter | None = None,
               problems: list[str] | None = None) -> Iterator[str]:
    """Texts of pretrain (`text`) and conversation (`conversations`/`messages`/`prompt`/`chosen`/`rejected`)
    records of JSONL or Parquet files (`sources`).

    Streams record by record. Lines that give no text are skipped here (the shard writer reports them in
    full); `skipped` counts them by reason and `problems` gets the first `file:line` of each reason.
    """
    skipped = Counter() if skipped is None else skipped
    problems = [] if problems is None else problems
    for path in files:
        for lineno, line in iter_records(Path(path)):
            if not line.strip():
                continue
            texts, reason = _line_texts(line)
            if reason:
                if not skipped[reason]:
                    problems.append(f"{path}:{lineno}: {reason}")
                skipped[reason] += 1
            yield from texts


def _line_texts(line: bytes) -> tuple[list[str], str | None]:
    """The usable texts of one JSONL line, and why it has none (None when it has some)."""
    try:
        record = json.loads(line)  # bytes: UTF-8 with or without a byte-order mark
    except UnicodeDecodeError:
        return [], "not UTF-8"
    except (ValueError, RecursionError):  # RecursionError: nested too deeply
        return [], "not JSON"
    if not isinstance(record, dict):
        return [], "not a JSON object"
    texts = [record.get("text")]
    for key in ("conversations", "messages", "prompt", "chosen", "rejected"):
        msgs = record.get(key)
        if isinstance(msgs, str) and key not in ("conversations", "messages"):  # DPO's prompt/chosen/rejected strings
            msgs = [{"content": msgs}]
        if not isinstance(msgs, list):
            continue
        texts += [m.get("content") for m in msgs if isinstance(m, dict)]
    texts = [t for t in texts if isinstance(t, str) and t]
    good = [t for t in texts if not LONE_SURROGATE.search(t)]
    if good:
        return good, None
    return [], "unpaired surrogate escape" if texts else "no text"


def train_tokenizer(files: list[str | os.PathLike], vocab_size: int, out_dir: str | os.PathLike) -> Path:
    """Train a byte-level BPE tokenizer on the JSONL `files` and save it (atomically) to `out_dir`."""
    check_input_files(files)
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size={vocab_size} is below the 256 byte tokens + special tokens")
    check_replaceable(Path(out_dir))  # before the training, not after it
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=True,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    skipped, problems, texts = Counter(), [], Counter()
    tok.train_from_iterator(_counted(iter_texts(files, skipped, problems), texts), trainer=trainer)
    if not texts["texts"]:  # the tokenizer would hold bytes only, every word split into them
        raise ValueError(f"no text to train on in {', '.join(map(str, files))} (JSONL lines with a string "
                         f"'text', or messages with a 'content' in 'conversations'/'prompt'/'chosen'/"
                         f"'rejected'; skipped: {dict(skipped) or 'none, no lines'})"
                         + (f"; first: {problems[0]}" if problems else ""))
    if skipped:
        print(f"train_tokenizer: skipped lines without text: {dict(skipped)}; first: "
              f"{'; '.join(problems)}", file=sys.stderr)
    if tok.get_vocab_size() < vocab_size:
        print(f"train_tokenizer: the data gives only {tok.get_vocab_size()} tokens (no pair left to merge), "
              f"fewer than --vocab-size {vocab_size}", file=sys.stderr)
    for i, name in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(name) == i, f"special token {name} landed at id {tok.token_to_id(name)}"
    return save_tokenizer(tok, out_dir)


def whitespace_pieces(text: str, min_chars: int) -> Iterator[tuple[int, str]]:
    """`text` cut at `WHITESPACE_CUT` into (start, piece), each piece at least `min_chars` long but the
    last; a stretch with no place to cut stays in one piece, however long."""
    start = 0
    while len(text) - start > min_chars:
        cut = WHITESPACE_CUT.search(text, start + min_chars)
        if cut is None:
            break
        yield start, text[start:cut.start()]
        start = cut.start()
    yield start, text[start:]


def _counted(texts: Iterator[str], counts: Counter) -> Iterator[str]:
    for text in texts:
        counts["texts"] += 1
        yield text


def check_replaceable(out: Path) -> None:
    """Raise ValueError unless `out` is absent, empty or a tokenizer directory: saving replaces it
    whole, and a data or run directory named by mistake must not be deleted."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ValueError(f"{out}: exists and is not a directory")
    others = sorted(p.name for p in out.iterdir() if p.name not in TOKENIZER_FILES)
    if others:
        raise ValueError(f"{out}: exists and holds files other than a tokenizer's ({', '.join(others[:5])}); "
                         f"not replacing it (choose a new directory)")


def save_tokenizer(tok: Tokenizer, out_dir: str | os.PathLike) -> Path:
    out = Path(out_dir)
    check_replaceable(out)
    real = out.resolve()  # `.` has no name to put a temporary sibling beside
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": PAD,
        "model_max_length": 32768, "clean_up_tokenization_spaces": False,
        "add_bos_token": False, "add_eos_token": False,
        "chat_template": CHATML_TEMPLATE,
    }
    tmp = temporary_sibling_dir(real)
    try:
        tok.save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
        (tmp / "special_tokens_map.json").write_text(
            json.dumps({"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": PAD}, indent=2))
        swap_into_place(tmp, real)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


@dataclass
class StandIns:
    """`ChatTokenizer.stand_ins`: the encoder, each control token's stand-in text, and the control id of each
    stand-in's id."""

    encoder: Tokenizer
    texts: dict[str, str]
    control_ids: dict[int, int]


class ChatTokenizer:
    """A `tokenizers.Tokenizer` plus the chat template and MiniMind's special ids."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        tok_file = self.path / "tokenizer.json" if self.path.is_dir() else self.path
        if not tok_file.is_file():
            raise FileNotFoundError(f"{self.path}: no tokenizer.json")
        try:
            self.tokenizer = Tokenizer.from_file(str(tok_file))
        except Exception as e:  # the tokenizers library raises a bare Exception that names no file
            raise ValueError(f"{tok_file}: not a readable tokenizer ({e})") from None
        self.dir = tok_file.parent
        config_file = self.dir / "tokenizer_config.json"
        try:
            config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.exists() else {}
        except ValueError as e:
            raise ValueError(f"{config_file}: unreadable ({e})") from None
        if not isinstance(config, dict):
            raise ValueError(f"{config_file}: not a JSON object")
        self.chat_template = _chat_template(self.dir, config)
        self.bos_token_id = self._id(config.get("bos_token"), BOS)
        self.eos_token_id = self._id(config.get("eos_token"), EOS)
        if not config.get("pad_token") and self.tokenizer.token_to_id(PAD) is None:
            # Llama's tokenizers name no pad token and have no <|endoftext|>: pad (always masked) with eos,
            # as transformers' generate does
            self.pad_token_id = self.eos_token_id
        else:
            self.pad_token_id = self._id(config.get("pad_token"), PAD)
        # What the template writes for {{ bos_token }} and {{ eos_token }}: this tokenizer's, as transformers does
        self.bos_token = self.tokenizer.id_to_token(self.bos_token_id)
        self.eos_token = self.tokenizer.id_to_token(self.eos_token_id)
        self.fingerprint = hashlib.sha256(tok_file.read_bytes()).hexdigest()[:16]

    def _id(self, token, default: str) -> int:
        if isinstance(token, dict):  # {"content": "<|im_end|>", ...} as some configs store it
            token = token.get("content")
        tid = self.tokenizer.token_to_id(token or default)
        if tid is None:
            raise ValueError(f"{self.dir}: special token {token or default!r} is not in the vocabulary")
        return tid

    @cached_property
    def encodes_whitespace_pieces_exactly(self) -> bool:
        """Whether encoding a text's `whitespace_pieces` apart gives the ids (and offsets, shifted) of the
        whole text: no normalizer, byte-level pre-tokenization by its regex, and added tokens that neither
        hold whitespace (a cut could split one) nor absorb the whitespace beside them. Ours and MiniMind's."""
        spec = json.loads(self.tokenizer.to_str())
        pre = spec.get("pre_tokenizer") or {}
        plain_added = all(not any(c.isspace() for c in t["content"])
                          and not (t.get("lstrip") or t.get("rstrip") or t.get("single_word"))
                          for t in spec.get("added_tokens") or [])
        return (spec.get("normalizer") is None and pre.get("type") == "ByteLevel"
                and pre.get("use_regex", True) and not pre.get("add_prefix_space") and plain_added)

    @cached_property
    def control_tokens(self) -> dict[str, int]:
        """The texts and ids of the special added tokens (<|im_start|>, <|im_end|>, <|endoftext|>, ...): what
        a chat template builds its structure from. Added tokens not marked special (MiniMind's <think>,
        <tool_call>) are words a reply may say, and stay tokens wherever they appear."""
        return {t.content: i for i, t in self.tokenizer.get_added_tokens_decoder().items() if t.special}

    @cached_property
    def control_regex(self) -> re.Pattern:
        """Any control token's text, the longest first (a pattern that never matches when there is none)."""
        texts = sorted(self.control_tokens, key=len, reverse=True)
        return re.compile("|".join(map(re.escape, texts)) or "(?!)")

    @cached_property
    def plain(self) -> Tokenizer:
        """This tokenizer encoding a control token's text as the characters it is made of: for the text a
        record holds, so that a message quoting "<|im_end|>" neither ends its turn nor starts one."""
        return self._plain_copy()

    def _plain_copy(self) -> Tokenizer:
        plain = Tokenizer.from_str(self.tokenizer.to_str())
        plain.encode_special_tokens = True
        return plain

    @cached_property
    def stand_ins(self) -> StandIns:
        """`plain` with a stand-in for each control token: an added token that is not special, so it stays a token
        there, spelt with `MARK` (which a record's strings may not hold) and with the control token's flags. Put
        where the template's control tokens stand in a text that also quotes some, it cuts the text as they do
        in a whole encoding; encoding the stretches between them apart does not where a text's start is
        encoded otherwise (a Metaspace pre-tokenizer's "▁" before the first word only: "▁user" for "user")."""
        encoder = self._plain_copy()
        added = self.tokenizer.get_added_tokens_decoder()
        texts = {text: f"{MARK}{i}{MARK}" for text, i in self.control_tokens.items()}
        encoder.add_tokens([AddedToken(texts[t.content], single_word=t.single_word, lstrip=t.lstrip, rstrip=t.rstrip,
                                       normalized=t.normalized, special=False)
                            for t in (added[i] for i in self.control_tokens.values())])  # one call: one rebuild
        ids = {encoder.token_to_id(texts[text]): i for text, i in self.control_tokens.items()}
        return StandIns(encoder, texts, ids)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self.tokenizer.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def decode_batch(self, seqs: list[list[int]], skip_special_tokens: bool = True) -> list[str]:
        return self.tokenizer.decode_batch([list(s) for s in seqs], skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes of one token. A byte-level piece may hold part of a UTF-8 character, which its
        decoded text can only show as U+FFFD; an added token (<|im_end|>, ...) is its text; an id past the
        tokenizer's vocabulary (a model's padded rows) is no bytes."""
        if token_id in self._added_texts:
            return self._added_texts[token_id].encode()
        piece = self.tokenizer.id_to_token(token_id)
        if piece is None:
            return b""
        if self._byte_level and all(c in BYTE_OF_CHAR for c in piece):
            return bytes(BYTE_OF_CHAR[c] for c in piece)
        if self._sentencepiece_spaces is not None:
            # Decoding the token alone would show a byte-fallback piece as U+FFFD and strip its leading "▁",
            # which the decoder drops only at the start of the whole text
            if self._byte_fallback and (byte := BYTE_PIECE.fullmatch(piece)):
                return bytes([int(byte.group(1), 16)])
            for mark, text in self._sentencepiece_spaces:
                piece = piece.replace(mark, text)
            return piece.encode()
        return self.tokenizer.decode([token_id], skip_special_tokens=False).encode()

    @cached_property
    def _added_texts(self) -> dict[int, str]:
        return {i: t.content for i, t in self.tokenizer.get_added_tokens_decoder().items()}

    @cached_property
    def _byte_level(self) -> bool:
        """Whether pieces are bytes written through GPT-2's table (a ByteLevel decoder, alone or in a sequence)."""
        return any(d.get("type") == "ByteLevel" for d in self._decoders)

    @cached_property
    def _decoders(self) -> list[dict]:
        decoder = json.loads(self.tokenizer.to_str()).get("decoder") or {}
        return decoder.get("decoders", [decoder])

    @cached_property
    def _sentencepiece_spaces(self) -> list[tuple[str, str]] | None:
        """For a SentencePiece-style decoder (Metaspace or Replace, ByteFallback, Fuse, Strip), the (mark, text)
        replacements that turn a piece into its text, "▁" into a space; None for any other decoder."""
        spaces = []
        for d in self._decoders:
            if d.get("type") == "Metaspace":
                spaces.append((d.get("replacement", "▁"), " "))
            elif d.get("type") == "Replace" and isinstance((d.get("pattern") or {}).get("String"), str):
                spaces.append((d["pattern"]["String"], d.get("content", "")))
            elif d.get("type") not in ("ByteFallback", "Fuse", "Strip"):
                return None
        return spaces or None

    @cached_property
    def _byte_fallback(self) -> bool:
        return any(d.get("type") == "ByteFallback" for d in self._decoders)

    @cached_property
    def _template(self):
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        # transformers' tojson, which templates render tools with: jinja's own sorts the keys and
        # escapes non-ASCII and <>&', so training text would differ from what inference renders.
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception  # as transformers provides: the template's own message
        return env.from_string(self.chat_template)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False,
                            **kwargs: Any) -> str:
        """Render `messages` with the tokenizer's chat template (ChatML for ours), as transformers does."""
        if self.chat_template == CHATML_TEMPLATE and not kwargs:
            # Our own template, rendered without jinja: the same string, several times faster, which
            # matters when the shard pipeline renders millions of conversations.
            text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
            return text + "<|im_start|>assistant\n" if add_generation_prompt else text
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     bos_token=self.bos_token, eos_token=self.eos_token, **kwargs)

    def save(self, out_dir: str | os.PathLike) -> None:
        """Copy the tokenizer's files into `out_dir` (what checkpoints carry)."""
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
            if (self.dir / name).exists():
                shutil.copy2(self.dir / name, Path(out_dir) / name)


def _chat_template(directory: Path, config: dict) -> str:
    """The tokenizer's chat template: chat_template.jinja (where transformers saves it, and which it prefers),
    else tokenizer_config.json's (a string, or a list of named ones: the one named "default"), else ChatML."""
    jinja = directory / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if not isinstance(named.get("default"), str):
            raise ValueError(f"{directory / 'tokenizer_config.json'}: chat_template lists templates "
                             f"{sorted(map(str, named))} but none named 'default'")
        template = named["default"]
    if template is not None and not isinstance(template, str):
        raise ValueError(f"{directory / 'tokenizer_config.json'}: chat_template is not a string")
    return template or CHATML_TEMPLATE


def _raise_exception(message: str) -> None:
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


def _tojson(value, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def load_tokenizer(path: str | os.PathLike) -> ChatTokenizer:
    return ChatTokenizer(path)


def check_same_tokenizer(given: ChatTokenizer, beside: ChatTokenizer | None, model: str | os.PathLike) -> None:
    """Refuse a tokenizer given for a model (`--tokenizer`) that is not the one beside its weights (another
    tokenizer.json): the model would read and write ids of a vocabulary it was not trained on. Given for
    weights with none beside them (a MiniMind .pth), or restating the model's own, it is fine."""
    if beside is not None and given.fingerprint != beside.fingerprint:
        raise ValueError(f"--tokenizer {given.dir} is not the tokenizer of the model {model} (beside its weights: "
                         f"{beside.dir}): fingerprints {given.fingerprint} and {beside.fingerprint}; drop "
                         f"--tokenizer to use the model's own")
