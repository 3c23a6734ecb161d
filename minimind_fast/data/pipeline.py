"""JSONL -> `.bin` shards: streamed, parallel, atomic, resumable by skipping when up to date.

Lines are read in chunks and encoded by a pool of worker processes (each holding the tokenizer),
at most `2 * workers` chunks in flight, so memory stays bounded whatever the input size. Results come
back in input order, which makes the shards identical from run to run. Bad lines are counted by
reason and listed as `file:line`; `strict=True` stops at the first one. Every `val_every`-th document
goes to the held-out split. Shards and the manifest are written under temporary names and renamed.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from minimind_fast.data import records
from minimind_fast.data.shards import VERSION, ShardWriter
from minimind_fast.data.tokenizer import ChatTokenizer, load_tokenizer

KINDS = ("pretrain", "sft", "reasoning", "dpo")
MANIFEST = "manifest.json"
CHUNK_LINES = 2000


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
            raise ValueError("val_fraction must be in [0, 0.5)")


class InputError(ValueError):
    """A bad input line under --strict (the message names file:line)."""


# --- workers ---------------------------------------------------------------------------------
_TOKENIZER: ChatTokenizer | None = None


def _init_worker(tokenizer_dir: str) -> None:
    global _TOKENIZER
    _TOKENIZER = load_tokenizer(tokenizer_dir)


def _fit(ids: np.ndarray, mask: np.ndarray, opts: TokenizeOptions) -> tuple[np.ndarray, np.ndarray]:
    if len(ids) <= opts.seq_len:
        return ids, mask
    if opts.overlong == "drop":
        raise records.RecordError("overlong", f"{len(ids)} tokens > seq_len {opts.seq_len} (dropped)")
    ids, mask = ids[: opts.seq_len], mask[: opts.seq_len]
    if not mask.any():
        raise records.RecordError("overlong", "no assistant token left after truncation to seq_len")
    return ids, mask


def encode_record(line: str, opts: TokenizeOptions, tok: ChatTokenizer) -> list[tuple[np.ndarray, np.ndarray]]:
    """The documents (1, or 2 for a DPO pair) of one line, as (tokens, mask) pairs."""
    record = records.parse_line(line)
    if opts.kind == "pretrain":
        return [records.encode_pretrain(record, tok)]
    if opts.kind in ("sft", "reasoning"):
        return [_fit(*records.encode_sft(record, tok, tags=opts.kind == "reasoning"), opts)]
    chosen, rejected = records.dpo_conversations(record)
    return [_fit(*records.encode_conversation(msgs, tok, tags=False), opts) for msgs in (chosen, rejected)]


def _encode_chunk(args):
    lines, opts = args
    out = []
    for lineno, line in lines:
        if not line.strip():
            continue
        try:
            out.append((lineno, encode_record(line, opts, _TOKENIZER), None))
        except records.RecordError as e:
            out.append((lineno, None, (e.reason, str(e))))
    return out


# --- driver ----------------------------------------------------------------------------------
def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _chunks(path: Path, progress: tqdm):
    with open(path, encoding="utf-8", errors="replace") as f:
        chunk, size = [], 0
        for lineno, line in enumerate(f, start=1):
            chunk.append((lineno, line))
            size += len(line.encode("utf-8", errors="replace"))
            if len(chunk) >= CHUNK_LINES:
                yield chunk, size
                chunk, size = [], 0
        if chunk:
            yield chunk, size


class _SplitWriter:
    """Rolls a split's shards over at `max_shard_tokens`."""

    def __init__(self, out: Path, split: str, kind: str, vocab_size: int, max_tokens: int):
        self.out, self.split, self.kind, self.vocab = out, split, kind, vocab_size
        self.max_tokens = max_tokens
        self.writer: ShardWriter | None = None
        self.shards: list[dict] = []

    def add(self, docs: list[tuple[np.ndarray, np.ndarray | None]]) -> None:
        if self.writer is None or self.writer.n_tokens >= self.max_tokens:
            self._close()
            name = f"{self.split}-{len(self.shards):05d}.bin"
            self.writer = ShardWriter(self.out / name, self.kind, self.vocab)
            self.shards.append({"file": name})
        for ids, mask in docs:
            self.writer.add(ids, mask)

    def _close(self) -> None:
        if self.writer is not None:
            w = self.writer
            w.close()
            self.shards[-1].update(tokens=w.n_tokens, docs=len(w.offsets) - 1,
                                   bytes=w.path.stat().st_size)
            self.writer = None

    def finish(self) -> dict:
        self._close()
        return {"shards": self.shards, "tokens": sum(s["tokens"] for s in self.shards),
                "docs": sum(s["docs"] for s in self.shards)}

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()


def _signature(files: list[Path], tok: ChatTokenizer, opts: TokenizeOptions) -> dict:
    opts_d = {k: v for k, v in asdict(opts).items() if k != "workers"}
    return {"format_version": VERSION, "tokenizer_fingerprint": tok.fingerprint, "options": opts_d,
            "sources": [{"path": str(f.resolve()), "bytes": f.stat().st_size, "sha256": file_digest(f)}
                        for f in files]}


def up_to_date(out: Path, signature: dict) -> bool:
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if manifest.get("signature") != signature:
        return False
    shards = [s for split in manifest["splits"].values() for s in split["shards"]]
    return all((out / s["file"]).exists() and (out / s["file"]).stat().st_size == s["bytes"] for s in shards)


def tokenize_to_shards(files: list[str | os.PathLike], tokenizer_dir: str | os.PathLike,
                       out_dir: str | os.PathLike, opts: TokenizeOptions, force: bool = False) -> dict:
    """Tokenize JSONL `files` into shards under `out_dir`; returns the manifest."""
    paths = [Path(f) for f in files]
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no such input file")
    tok = load_tokenizer(tokenizer_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    signature = _signature(paths, tok, opts)
    if not force and up_to_date(out, signature):
        print(f"{out}: shards are up to date with their inputs; nothing to do")
        return json.loads((out / MANIFEST).read_text())

    val_every = round(1 / opts.val_fraction) if opts.val_fraction > 0 else 0
    splits = {s: _SplitWriter(out, s, opts.kind, tok.vocab_size, opts.max_shard_tokens)
              for s in ("train", "val")}
    counts: Counter = Counter()
    problems: list[str] = []
    sources = []
    pool = (mp.get_context("spawn").Pool(opts.workers, _init_worker, (str(tok.dir),))
            if opts.workers > 1 else None)
    if pool is None:
        _init_worker(str(tok.dir))
    started = time.time()
    n_docs = 0
    try:
        total = sum(p.stat().st_size for p in paths)
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"tokenize {opts.kind}",
                  disable=None) as progress:
            for path, src in zip(paths, signature["sources"]):
                file_counts: Counter = Counter()
                pending: deque = deque()

                def drain(pending: deque, path: Path, file_counts: Counter, block: bool) -> None:
                    nonlocal n_docs
                    while pending and (block or pool is None or pending[0][0].ready()):
                        result, size = pending.popleft()
                        for lineno, docs, err in result.get() if pool else result:
                            if err is not None:
                                where = f"{path}:{lineno}: {err[1]}"
                                if opts.strict:
                                    raise InputError(where)
                                file_counts[err[0]] += 1
                                if len(problems) < 200:
                                    problems.append(where)
                                continue
                            file_counts["lines"] += 1
                            is_val = val_every and n_docs % val_every == val_every - 1
                            splits["val" if is_val else "train"].add(docs)
                            n_docs += 1
                        progress.update(size)

                for chunk, size in _chunks(path, progress):
                    task = (chunk, opts)
                    pending.append((pool.apply_async(_encode_chunk, (task,)) if pool else _encode_chunk(task),
                                    size))
                    drain(pending, path, file_counts, block=len(pending) >= 2 * opts.workers)
                drain(pending, path, file_counts, block=True)
                counts.update({k: v for k, v in file_counts.items() if k != "lines"})
                sources.append({**src, "records": file_counts["lines"],
                                "skipped": {k: v for k, v in file_counts.items() if k != "lines"}})
        manifest = {
            "format_version": VERSION, "kind": opts.kind, "vocab_size": tok.vocab_size,
            "tokenizer_fingerprint": tok.fingerprint, "tokenizer_dir": str(tok.dir.resolve()),
            "seq_len": opts.seq_len, "sources": sources,
            "splits": {name: w.finish() for name, w in splits.items()},
            "skipped": dict(counts), "problems": problems, "signature": signature,
            "seconds": round(time.time() - started, 3),
        }
    except BaseException:
        for w in splits.values():
            w.abort()
        raise
    finally:
        if pool is not None:
            pool.terminate()
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, out / MANIFEST)
    return manifest
