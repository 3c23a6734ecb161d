"""Record files -> `.bin` shards: streamed, parallel, atomic, skipped when already up to date.

The inputs are JSONL files, plain or compressed, or Parquet files (`sources`: a Parquet row is a
record as a JSONL line is, and is named by its row number). Records are read in chunks of
`CHUNK_LINES` records or `CHUNK_BYTES` bytes; each chunk is parsed, rendered and encoded with one
`encode_batch` call, in a pool of worker processes (`workers > 1`) or in this process with the
tokenizers library's own threads (`workers == 1`). At most `2 * workers` chunks are in flight, so
memory stays bounded whatever the input size; a text longer than `LONG_TEXT_CHARS` is encoded in
pieces cut at whitespace, so that its encoding does not grow with it either (a whole input record is
still read and parsed at once). Chunks are written in input order, which makes the shards identical
from run to run whatever the number of workers. Bad records are counted by reason and listed as
`file:line`; `strict=True` stops at the first one. Every `1 / val_fraction`-th record goes to the
held-out split. Shards and the manifest are written under temporary names and renamed, by one run at
a time: a run holds a lock on the output directory.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing as mp
import os
import re
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from minimind_fast.data import records, sources
from minimind_fast.data.shards import VERSION, ShardWriter, file_checksum, token_dtype
from minimind_fast.data.tokenizer import TOKENIZER_FILES, ChatTokenizer, load_tokenizer, whitespace_pieces
from minimind_fast.files import check_input_files, locked_directory

KINDS = ("pretrain", "sft", "reasoning", "dpo")
MANIFEST = "manifest.json"
LOCK_NAME = ".tokenize.lock"  # flock'ed by the run writing the directory, removed when it ends
CHUNK_LINES = 500  # small enough that even a few-MB file spreads over every worker
# A chunk also ends at this many bytes of input: encoding holds ~150 bytes per token (ids, offsets,
# token strings) until the chunk is done, so 500 long documents (books, a MB each) took GBs.
CHUNK_BYTES = 1 << 20
# A longer text is encoded in pieces of PIECE_CHARS or more, cut where that gives the ids of the whole
# (`whitespace_pieces`), about CHUNK_BYTES of them per encode call: whole, a 50 MB text took 7.8 GB.
LONG_TEXT_CHARS = CHUNK_BYTES
PIECE_CHARS = 1 << 16
MAX_PROBLEMS = 200  # file:line entries kept in the manifest (the counts are complete)
# Bump whenever this code would write other shards from the same inputs (rendering, masks, splits),
# or a manifest without a field the loaders rely on: it is part of the up-to-date signature, so a
# rerun after such a change rewrites the shards. 5: per-shard max_token_id; 6: per-shard checksum;
# 7: the held-out share never above --val-fraction (ceil, not round, of its inverse); 8: a DPO pair's prompt
# turns carry no loss, an assistant turn there included; 9: a record's text that spells a control token
# (<|im_end|>, ...) is encoded as plain text, not as that token; 10: the rest of such a record is cut where a whole
# encoding cuts it (a Metaspace or lstrip/rstrip tokenizer's ids differed; byte-level BPE's, as ours, did not).
PIPELINE_VERSION = 10
SHARD_NAME = re.compile(r"(train|val)-\d{5,}\.bin")  # as _SplitWriter names them
# What a killed run leaves (ShardWriter's temporary files, the manifest's): a shard's can be GBs.
LEFTOVER_NAME = re.compile(r"(train|val)-\d{5,}\.bin(\.mask)?\.tmp|manifest\.json\.tmp")
# What other commands' outputs hold: an --out holding one is a mistyped path, and shards there would be
# mixed into (and, rerun with another kind, replace) a tokenizer, a model or a training run.
OTHER_OUTPUTS = {"a training run's": ("config.json", "checkpoints", "final"),
                 "a model's": ("model.safetensors", "model_config.json"),
                 "a tokenizer's": TOKENIZER_FILES}


@dataclass
class TokenizeOptions:
    kind: str
    seq_len: int = 512
    overlong: str = "truncate"  # or "drop" (sft/reasoning/dpo samples longer than seq_len)
    val_fraction: float = 0.01
    strict: bool = False
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    max_shard_tokens: int = 1 << 28

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind={self.kind!r} must be one of {KINDS}")
        if self.overlong not in ("truncate", "drop"):
            raise ValueError(f"overlong={self.overlong!r} must be truncate or drop")
        if not 0 <= self.val_fraction < 0.5:
            raise ValueError(f"val_fraction={self.val_fraction} must be in [0, 0.5)")
        if self.seq_len < 2:  # a negative one would cut every sample's tail off instead
            raise ValueError(f"seq_len={self.seq_len} must be at least 2")
        if self.workers < 1:  # was quietly one process
            raise ValueError(f"workers={self.workers} must be at least 1")


Ids = list[int] | np.ndarray  # an Encoding's ids, or a long text's (`_Encoded`)


class InputError(ValueError):
    """A bad input line under --strict (the message names file:line)."""


# --- workers ---------------------------------------------------------------------------------
_TOKENIZER: ChatTokenizer | None = None


def _init_worker(tokenizer_dir: str, parallel: bool) -> None:
    """Load the tokenizer once per process; pool workers encode single-threaded (the pool is the parallelism)."""
    global _TOKENIZER
    if not parallel:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _TOKENIZER = load_tokenizer(tokenizer_dir)


@dataclass
class Chunk:
    """A chunk's good records, back to back: what workers send to the writer (few, large arrays)."""

    tokens: np.ndarray          # int32, every document's tokens
    lengths: np.ndarray         # int64, tokens per document
    mask: np.ndarray | None     # uint8 per token (not for pretrain)
    docs_per_record: int        # 1, or 2 for DPO (chosen, rejected)
    errors: list[tuple[int, str, str]]  # (line number, reason, message)


def _fit(ids: Ids, mask: np.ndarray, opts: TokenizeOptions) -> tuple[Ids, np.ndarray]:
    if len(ids) <= opts.seq_len:
        return ids, mask
    if opts.overlong == "drop":
        raise records.RecordError("overlong", f"{len(ids)} tokens > seq_len {opts.seq_len} (dropped)")
    ids, mask = ids[: opts.seq_len], mask[: opts.seq_len]
    if not mask.any():
        raise records.RecordError("overlong", "no assistant token left after truncation to seq_len")
    return ids, mask


@dataclass
class _Encoded:
    """A long text's encoding put together from its pieces': what `encode_lines` reads of an Encoding."""

    ids: np.ndarray               # int32
    offsets: np.ndarray | None    # int64 (n, 2), character offsets into the whole text; None for pretrain


def _piece_batches(text: str):
    """The text's `whitespace_pieces` as (start, piece), grouped into about CHUNK_BYTES per batch."""
    batch, size = [], 0
    for start, piece in whitespace_pieces(text, PIECE_CHARS):
        batch.append((start, piece))
        size += len(piece)
        if size >= CHUNK_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _encode_long(encoder: Tokenizer, text: str, offsets: bool) -> _Encoded:
    """One long text encoded a batch of pieces at a time; each Encoding (~150 bytes a token: ids, offsets,
    token strings) is dropped once its ids, and offsets where masks need them, are copied out."""
    ids, offs = [], []
    for batch in _piece_batches(text):
        encodings = encoder.encode_batch([piece for _, piece in batch], add_special_tokens=False)
        for (start, _), e in zip(batch, encodings):
            ids.append(np.asarray(e.ids, dtype=np.int32))
            if offsets:
                offs.append(np.asarray(e.offsets, dtype=np.int64).reshape(-1, 2) + start)
    return _Encoded(np.concatenate(ids), np.concatenate(offs) if offsets else None)


def _encode_texts(tok: ChatTokenizer, encoder: Tokenizer, texts: list[str], offsets: bool) -> list:
    """Encodings of `texts` by `encoder` (`tok`'s tokenizer or its `plain` copy) in order: the short ones in
    one batch, each long one in pieces (where the tokenizer gives the same ids that way; else whole)."""
    pieced = {i for i, t in enumerate(texts) if len(t) > LONG_TEXT_CHARS}
    if pieced and not tok.encodes_whitespace_pieces_exactly:
        pieced = set()  # encoded whole: exact, in memory that grows with the text
    short = iter(encoder.encode_batch([t for i, t in enumerate(texts) if i not in pieced], add_special_tokens=False))
    return [_encode_long(encoder, t, offsets) if i in pieced else next(short) for i, t in enumerate(texts)]


def _encode_docs(tok: ChatTokenizer, docs: list[records.Doc], offsets: bool) -> list:
    """Encodings of `docs` in order. A rendering whose every control token is the template's (`Doc.whole`:
    the usual record) is encoded whole, as the tokenizer splits a text at its special tokens first. A text
    without control tokens (a pretraining text) is encoded as plain text (`ChatTokenizer.plain`), and a
    conversation quoting a control token's text with its template's control tokens (`Doc.controls`) as their
    stand-ins (`ChatTokenizer.stand_ins`): its quotes as plain text, cut where a whole encoding cuts it."""
    whole = iter(_encode_texts(tok, tok.tokenizer, [d.text for d in docs if d.whole], offsets))
    plain = [d.text for d in docs if not d.whole and not d.controls]  # one piece, even empty (a prompt to continue)
    marked = [_with_stand_ins(d, tok) for d in docs if not d.whole and d.controls]
    # each encoder is built on first use
    plain = iter(_encode_texts(tok, tok.plain, plain, offsets) if plain else [])
    marked = iter(_encode_texts(tok, tok.stand_ins.encoder, marked, offsets) if marked else [])
    return [next(whole) if d.whole else _restored(d, next(marked), tok, offsets) if d.controls else next(plain)
            for d in docs]


def _with_stand_ins(doc: records.Doc, tok: ChatTokenizer) -> str:
    """`doc.text` with each of its control tokens replaced by the token's stand-in."""
    parts, pos = [], 0
    for a, b in doc.controls:
        parts += [doc.text[pos:a], tok.stand_ins.texts[doc.text[a:b]]]
        pos = b
    parts.append(doc.text[pos:])
    return "".join(parts)


def _restored(doc: records.Doc, e, tok: ChatTokenizer, with_offsets: bool) -> _Encoded:
    """`e`, the encoding of `_with_stand_ins(doc)`, as that of `doc.text`: each stand-in's id its control token's,
    and the offsets after each stand-in moved by how much longer its control token is."""
    ids = [tok.stand_ins.control_ids.get(i, i) for i in e.ids]
    if not with_offsets:
        return _Encoded(np.asarray(ids, dtype=np.int32), None)
    starts = np.asarray([a for a, _ in doc.controls], dtype=np.int64)
    lengths = np.asarray([b - a for a, b in doc.controls], dtype=np.int64)
    stand_in = np.asarray([len(tok.stand_ins.texts[doc.text[a:b]]) for a, b in doc.controls], dtype=np.int64)
    growth = np.concatenate([[0], np.cumsum(lengths - stand_in)])  # growth[j]: the move after j stand-ins
    ends = starts - growth[:-1] + stand_in  # each stand-in's end in the encoded text
    offsets = np.asarray(e.offsets, dtype=np.int64).reshape(-1, 2)
    return _Encoded(np.asarray(ids, dtype=np.int32), offsets + growth[np.searchsorted(ends, offsets, side="right")])


def doc_ids(tok: ChatTokenizer, docs: list[records.Doc]) -> list[list[int]]:
    """The ids of `docs` exactly as the shards hold them (`_encode_docs`, without bos/eos framing): how chat,
    serving, GRPO/PPO (prompts, tool results) and the reward model encode a rendering at run time, so that a
    message quoting a control token is text there as it was in training, never a turn of its own."""
    return [np.asarray(e.ids).tolist() for e in _encode_docs(tok, docs, offsets=False)]


def prompt_ids(tok: ChatTokenizer, msgs: list[dict]) -> list[int]:
    """The ids of checked messages (`records.check_messages`) rendered with the generation prompt: what the
    SFT shards hold before the reply that would follow them. RecordError (a ValueError) when the template
    refuses them or a string holds U+FDD0 (`records.MARK`)."""
    return doc_ids(tok, [records.prompt_doc(msgs, tok)])[0]


def _framed(ids: Ids, tok: ChatTokenizer) -> np.ndarray:
    """bos + ids + eos, as MiniMind frames a pretraining text."""
    out = np.empty(len(ids) + 2, dtype=np.int32)
    out[0], out[1:-1], out[-1] = tok.bos_token_id, ids, tok.eos_token_id
    return out


def encode_lines(lines: list[tuple[int, bytes]], opts: TokenizeOptions, tok: ChatTokenizer) -> Chunk:
    """Parse and render every line, encode the texts (in one batch, but the long ones), then build masks
    and fit to seq_len."""
    errors: list[tuple[int, str, str]] = []
    parsed: list[tuple[int, list[records.Doc]]] = []
    for lineno, line in lines:
        if not line.strip():
            continue
        try:
            parsed.append((lineno, records.record_docs(records.parse_line(line), opts.kind, tok)))
        except records.RecordError as e:
            errors.append((lineno, e.reason, str(e)))
    encodings = _encode_docs(tok, [d for _, docs in parsed for d in docs], offsets=opts.kind != "pretrain")
    tokens, lengths, masks = [], [], []
    k = 0
    for lineno, docs in parsed:
        encs, k = encodings[k:k + len(docs)], k + len(docs)
        try:
            if opts.kind == "pretrain":
                out = [(_framed(encs[0].ids, tok), None)]
            else:
                out = [_fit(e.ids, records.mask_from_offsets(e.offsets, d), opts) for e, d in zip(encs, docs)]
        except records.RecordError as e:
            errors.append((lineno, e.reason, str(e)))
            continue
        for ids, mask in out:
            tokens.append(np.asarray(ids, dtype=np.int32))
            lengths.append(len(ids))
            if mask is not None:
                masks.append(mask)
    errors.sort()
    return Chunk(np.concatenate(tokens) if tokens else np.zeros(0, np.int32), np.asarray(lengths, dtype=np.int64),
                 np.concatenate(masks) if masks else (None if opts.kind == "pretrain" else np.zeros(0, np.uint8)),
                 2 if opts.kind == "dpo" else 1, errors)


def _encode_chunk(args) -> Chunk:
    lines, opts = args
    return encode_lines(lines, opts, _TOKENIZER)


# --- driver ----------------------------------------------------------------------------------
def val_every(opts: TokenizeOptions, n_lines: int) -> int:
    """Hold out every n-th record, n = ceil(1 / val_fraction): never a larger share than asked for,
    except that an input of fewer than n lines still holds out one (its last), unless it has one line."""
    if opts.val_fraction <= 0:
        return 0
    # round() gave 3 for 0.3 (a third held out) and 2 for 0.4 (half); the epsilon keeps 1/0.01 at 100.
    return max(2, min(math.ceil(1 / opts.val_fraction - 1e-9), n_lines))


def _chunks(path: Path):
    """Raw records with their numbers, in chunks of CHUNK_LINES records or CHUNK_BYTES bytes,
    whichever comes first (a longer line is a chunk of its own); `records.parse_line` decodes them."""
    chunk, size = [], 0
    for lineno, raw in sources.iter_records(path):
        chunk.append((lineno, raw))
        size += len(raw)
        if len(chunk) >= CHUNK_LINES or size >= CHUNK_BYTES:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


class _SplitWriter:
    """One split's shards, rolled over to a new file at `max_tokens`."""

    def __init__(self, out: Path, split: str, kind: str, vocab_size: int, max_tokens: int):
        self.out, self.split, self.kind, self.vocab = out, split, kind, vocab_size
        self.max_tokens = max_tokens
        self.writer: ShardWriter | None = None
        self.shards: list[dict] = []

    def add(self, tokens: np.ndarray, lengths: np.ndarray, mask: np.ndarray | None) -> None:
        """Append whole records, starting a new shard where the current one would pass `max_tokens`."""
        per_record = 2 if self.kind == "dpo" else 1  # a chosen/rejected pair never straddles two shards
        ends = np.cumsum(lengths)
        d0 = t0 = 0
        while d0 < len(lengths):
            if self.writer is None:
                name = f"{self.split}-{len(self.shards):05d}.bin"
                self.writer = ShardWriter(self.out / name, self.kind, self.vocab)
                self.shards.append({"file": name})
            room = self.max_tokens - self.writer.n_tokens
            d1 = int(np.searchsorted(ends, t0 + room, side="right"))
            d1 -= (d1 - d0) % per_record
            if d1 == d0 and self.writer.n_tokens == 0:
                d1 = d0 + per_record  # a record longer than a whole shard gets a shard of its own
            if d1 > d0:
                t1 = int(ends[d1 - 1])
                self.writer.add_many(tokens[t0:t1], lengths[d0:d1], mask[t0:t1] if mask is not None else None)
                d0, t0 = d1, t1
            if d0 < len(lengths):
                self._close()

    def _close(self) -> None:
        if self.writer is not None:
            w = self.writer
            w.close()
            self.shards[-1].update(tokens=w.n_tokens, docs=w.n_docs, bytes=w.path.stat().st_size,
                                   max_token_id=w.max_token_id, checksum=w.checksum)
            self.writer = None

    def finish(self) -> dict:
        self._close()
        return {"shards": self.shards, "tokens": sum(s["tokens"] for s in self.shards),
                "docs": sum(s["docs"] for s in self.shards)}

    def abort(self) -> None:
        """Drop the shard being written and those this run completed: a failed run leaves no file under
        a final name."""
        if self.writer is not None:
            self.writer.abort()
            self.writer = None
        for shard in self.shards:
            (self.out / shard["file"]).unlink(missing_ok=True)


def _signature(files: list[Path], tok: ChatTokenizer, opts: TokenizeOptions) -> dict:
    opts_d = {k: v for k, v in asdict(opts).items() if k != "workers"}
    inputs = []
    for f in files:
        digest, lines = sources.digest(f)
        inputs.append({"path": str(f.resolve()), "bytes": f.stat().st_size, "lines": lines, "sha256": digest})
    # The fingerprint covers tokenizer.json only; the chat template and bos/eos of tokenizer_config.json
    # shape the shards too.
    config = {"chat_template": hashlib.sha256(tok.chat_template.encode()).hexdigest()[:16],
              "bos_eos": [tok.bos_token_id, tok.eos_token_id]}
    return {"format_version": VERSION, "pipeline_version": PIPELINE_VERSION,
            "tokenizer_fingerprint": tok.fingerprint, "tokenizer_config": config, "options": opts_d,
            "sources": inputs}


def up_to_date(out: Path, signature: dict) -> bool:
    """True when `out` holds a manifest for exactly these inputs, tokenizer and options, and its shards."""
    try:
        manifest = json.loads((out / MANIFEST).read_text())
        if manifest.get("signature") != signature:
            return False
        shards = [s for split in manifest["splits"].values() for s in split["shards"]]
        return all(_shard_unchanged(out / s["file"], s) for s in shards)
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
        return False


def _shard_unchanged(path: Path, entry: dict) -> bool:
    """The shard file is the one its manifest entry describes: same size, then same checksum.

    A shard copied in from another tokenization can have the same size and header; only its content
    tells. Hashing reads every shard on every rerun, which is cheap next to what it saves: sha256 runs
    at about 0.7-2 GB/s, the shards are no larger than the JSONL inputs that `_signature` already
    hashes in full on every rerun, and re-tokenizing runs at tens of MB/s of text. (A cache keyed on
    mtime would skip the read but trusts a timestamp that `cp -p` or rsync preserve.)
    """
    if not path.is_file() or path.stat().st_size != entry["bytes"]:
        return False
    if file_checksum(path) != entry["checksum"]:
        print(f"{path}: its content differs from what manifest.json lists (checksum); tokenizing again", flush=True)
        return False
    return True


class _Writer:
    """The main process's side: splits each chunk's records into train/val and counts problems."""

    def __init__(self, out: Path, opts: TokenizeOptions, vocab_size: int, n_lines: int):
        self.opts = opts
        self.val_every = val_every(opts, n_lines)
        self.splits = {s: _SplitWriter(out, s, opts.kind, vocab_size, opts.max_shard_tokens)
                       for s in ("train", "val")}
        self.n_records = 0
        self.problems: list[str] = []

    def write(self, chunk: Chunk, path: Path, counts: Counter) -> None:
        for lineno, reason, message in chunk.errors:
            where = f"{path}:{lineno}: {message}"
            if self.opts.strict:
                raise InputError(where)
            counts[reason] += 1
            if len(self.problems) < MAX_PROBLEMS:
                self.problems.append(where)
        n = len(chunk.lengths) // chunk.docs_per_record
        counts["records"] += n
        # Every val_every-th record (counted over all files) is held out: the same records whatever
        # the chunking or the number of workers.
        record_idx = self.n_records + np.arange(n)
        self.n_records += n
        is_val = (record_idx % self.val_every == self.val_every - 1) if self.val_every else np.zeros(n, bool)
        doc_val = np.repeat(is_val, chunk.docs_per_record)
        tok_val = np.repeat(doc_val, chunk.lengths)
        for name, docs, toks in (("train", ~doc_val, ~tok_val), ("val", doc_val, tok_val)):
            mask = chunk.mask[toks] if chunk.mask is not None else None
            self.splits[name].add(chunk.tokens[toks], chunk.lengths[docs], mask)

    def finish(self) -> dict:
        return {name: w.finish() for name, w in self.splits.items()}

    def abort(self) -> None:
        for w in self.splits.values():
            w.abort()


def _nothing_usable(paths: list[Path], skipped: Counter, problems: list[str]) -> str:
    """The error for inputs without one usable record (shards of nothing would only fail later)."""
    msg = f"no usable record in {', '.join(map(str, paths))} (skipped: {dict(skipped) or 'none, no lines'})"
    if problems:
        msg += f"; first: {problems[0]}"
    for p in paths:
        if sources.head(p).lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):
            msg += f"; {p} looks like a JSON array: the input must be JSONL, one object per line"
    return msg


def _make_pool(opts: TokenizeOptions, tok: ChatTokenizer):
    """Worker processes for --workers > 1 (fork where available: no re-import, the tokenizer is loaded in each)."""
    if opts.workers <= 1:
        _init_worker(str(tok.dir), parallel=True)  # one process: tokenizers' own threads use every core
        return None
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    return mp.get_context(method).Pool(opts.workers, _init_worker, (str(tok.dir), False))


def tokenize_to_shards(files: list[str | os.PathLike], tokenizer_dir: str | os.PathLike,
                       out_dir: str | os.PathLike, opts: TokenizeOptions, force: bool = False) -> dict:
    """Tokenize JSONL `files` into shards under `out_dir`; returns the manifest (also written there).

    Skips the work when `out_dir` already holds shards of the same inputs, tokenizer and options.
    """
    paths = check_input_files(files)
    repeated = sorted({str(p) for p in paths if sum(q.resolve() == p.resolve() for q in paths) > 1})
    if repeated:  # every record of it would be trained on twice as often as the others
        raise ValueError(f"{', '.join(repeated)}: given more than once")
    tok = load_tokenizer(tokenizer_dir)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a directory")
    _refuse_other_output(out)
    out.mkdir(parents=True, exist_ok=True)
    # Two runs writing here at once would interleave their shards, renames and manifest.
    with locked_directory(out, LOCK_NAME, "--out"):
        return _tokenize_into(paths, tok, out, opts, force)


def _tokenize_into(paths: list[Path], tok: ChatTokenizer, out: Path, opts: TokenizeOptions,
                   force: bool) -> dict:
    """`tokenize_to_shards` once `out` exists and this process holds its lock."""
    if not force:
        _refuse_other_kind(out, opts.kind)
    signature = _signature(paths, tok, opts)
    if not force and up_to_date(out, signature):
        print(f"{out}: shards are up to date with their inputs; nothing to do")
        return _point_at_tokenizer(out, tok)
    (out / MANIFEST).unlink(missing_ok=True)  # the old shards no longer describe a valid state

    n_lines = sum(src["lines"] for src in signature["sources"])
    writer = _Writer(out, opts, tok.vocab_size, n_lines)
    done, totals = [], Counter()
    started = time.time()
    pool = _make_pool(opts, tok)
    try:
        with tqdm(total=n_lines, unit=" lines", unit_scale=True, desc=f"tokenize {opts.kind}",
                  disable=None) as progress:
            for path, src in zip(paths, signature["sources"]):
                counts: Counter = Counter()
                pending: deque = deque()  # chunks in flight, in input order
                for chunk in _chunks(path):
                    task = (chunk, opts)
                    pending.append((pool.apply_async(_encode_chunk, (task,)) if pool else _encode_chunk(task),
                                    len(chunk)))
                    while pending and (pool is None or len(pending) > 2 * opts.workers or pending[0][0].ready()):
                        result, lines = pending.popleft()
                        writer.write(result.get() if pool else result, path, counts)
                        progress.update(lines)
                while pending:
                    result, lines = pending.popleft()
                    writer.write(result.get() if pool else result, path, counts)
                    progress.update(lines)
                records_ok = counts.pop("records", 0)
                totals.update(counts)
                done.append({**src, "records": records_ok, "skipped": dict(counts)})
        if not writer.n_records:
            raise InputError(_nothing_usable(paths, totals, writer.problems))
        splits = writer.finish()
    except BaseException:
        writer.abort()
        raise
    finally:
        if pool is not None:
            pool.terminate()
    manifest = {
        "format_version": VERSION, "kind": opts.kind, "vocab_size": tok.vocab_size,
        "token_dtype": token_dtype(tok.vocab_size).name,
        "tokenizer_fingerprint": tok.fingerprint, "tokenizer_dir": str(tok.dir.resolve()),
        "seq_len": opts.seq_len, "sources": done, "splits": splits,
        "records": sum(s["records"] for s in done),
        "tokens": sum(s["tokens"] for s in splits.values()),
        "docs": sum(s["docs"] for s in splits.values()),
        "skipped": dict(totals), "problems": writer.problems, "signature": signature,
        "seconds": round(time.time() - started, 3),
    }
    _write_manifest(out, manifest)
    _remove_stale_shards(out, splits)
    return manifest


def _refuse_other_output(out: Path) -> None:
    """Refuse an --out holding a tokenizer, a model or a training run (`OTHER_OUTPUTS`), even with --force."""
    for what, names in OTHER_OUTPUTS.items():
        found = [name for name in names if (out / name).exists()]
        if found:
            raise ValueError(f"--out {out}: holds {what} files ({', '.join(found)}), not shards; choose a "
                             f"directory of their own for the shards")


def _refuse_other_kind(out: Path, kind: str) -> None:
    """Rewriting shards of another kind is a mistyped --out far more often than intended (a directory per
    kind is the convention): replacing them asks for --force. Same-kind shards are rewritten when their
    inputs or options change, as a build tool would."""
    try:
        old = json.loads((out / MANIFEST).read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        return  # no complete output there (a killed run leaves no manifest): nothing to keep
    if old in KINDS and old != kind:
        raise ValueError(f"--out {out} holds {old} shards (its manifest.json); tokenizing {kind} data there "
                         f"would replace them: choose another --out, or pass --force to replace them")


def _write_manifest(out: Path, manifest: dict) -> None:
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, out / MANIFEST)


def _point_at_tokenizer(out: Path, tok: ChatTokenizer) -> dict:
    """The up-to-date manifest, its `tokenizer_dir` set to this run's tokenizer (same fingerprint): the
    engine copies that directory into checkpoints, and the one tokenized with may since have been moved,
    deleted or retrained in place."""
    manifest = json.loads((out / MANIFEST).read_text())
    if manifest.get("tokenizer_dir") != str(tok.dir.resolve()):
        manifest["tokenizer_dir"] = str(tok.dir.resolve())
        _write_manifest(out, manifest)
    return manifest


def _remove_stale_shards(out: Path, splits: dict) -> None:
    """Delete shard files an earlier, larger run left behind (the new manifest does not list them),
    and the temporary files of a run killed before it finished."""
    listed = {s["file"] for split in splits.values() for s in split["shards"]}
    for path in out.iterdir():
        stale = SHARD_NAME.fullmatch(path.name) and path.name not in listed
        if (stale or LEFTOVER_NAME.fullmatch(path.name)) and path.is_file():
            path.unlink()
