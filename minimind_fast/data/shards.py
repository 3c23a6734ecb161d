"""The `.bin` shard format (version 1): a token stream with document offsets and a loss mask.

Layout, little-endian, every section starting on an 8-byte boundary:

    header   64 bytes  magic b"MMFSHARD" | version u32 | token_bytes u32 (2: uint16, 4: uint32)
                       | kind u32 | has_mask u32 | n_tokens u64 | n_docs u64 | vocab_size u64 | 16 zero bytes
    tokens   n_tokens x uint16/uint32         every document's tokens, back to back
    offsets  (n_docs + 1) x uint64            document d is tokens[offsets[d]:offsets[d+1]]
    mask     n_tokens x uint8 (if has_mask)   0: no loss on this token as a target, 1: loss,
                                              2: loss with the special-token weight (reasoning tags)

Kinds: 0 pretrain (no mask), 1 sft, 2 reasoning, 3 dpo (documents come in pairs: 2i chosen,
2i+1 rejected). Tokens use uint16 when the vocabulary fits, else uint32. `ShardWriter` writes to a
temporary name and renames on `close()`, and notes the largest token id and the checksum of what it
wrote (`file_checksum`), which the manifest records; `Shard` maps a file read-only with numpy and
validates it.
"""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

import numpy as np

MAGIC = b"MMFSHARD"
VERSION = 1
HEADER = struct.Struct("<8sIIIIQQQ16x")
KINDS = {"pretrain": 0, "sft": 1, "reasoning": 2, "dpo": 3}
KIND_NAMES = {v: k for k, v in KINDS.items()}
assert HEADER.size == 64
BLOCK = 1 << 24  # bytes per read when copying or hashing a file


class ShardError(ValueError):
    """A shard file that is not a valid version-1 shard (names the file)."""


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


def _align8(n: int) -> int:
    return (n + 7) // 8 * 8


class ShardWriter:
    """Appends documents to a shard written under a temporary name and renamed on `close()`.

    Tokens go straight to the file and the loss mask to a spool file appended at the end, so memory
    holds only the document offsets (8 bytes per document) whatever the shard's size. Each byte is
    hashed as it goes to the file, so `checksum` costs no read back; `max_token_id` is -1 for no tokens.
    """

    def __init__(self, path: str | os.PathLike, kind: str, vocab_size: int):
        self.path = Path(path)
        self.kind = kind
        self.vocab_size = vocab_size
        self.dtype = token_dtype(vocab_size)
        self.has_mask = kind != "pretrain"
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.mask_tmp = self.path.with_name(self.path.name + ".mask.tmp")
        self.f = open(self.tmp, "wb")
        self.f.write(b"\0" * HEADER.size)
        self.mask_f = open(self.mask_tmp, "wb") if self.has_mask else None
        self.lengths: list[np.ndarray] = []
        self.n_tokens = 0
        self.n_docs = 0
        self.max_token_id = -1
        self._hash = hashlib.sha256()  # the bytes after the header in file order, then the header
        self.checksum: str | None = None  # set by close()

    def _write(self, data: bytes) -> None:
        self._hash.update(data)
        self.f.write(data)

    def add(self, tokens: np.ndarray, mask: np.ndarray | None = None) -> None:
        """Append one document."""
        tokens = np.asarray(tokens)
        self.add_many(tokens, np.asarray([len(tokens)]), mask)

    def add_many(self, tokens: np.ndarray, lengths: np.ndarray, mask: np.ndarray | None = None) -> None:
        """Append documents given back to back in `tokens`, document d being `lengths[d]` tokens long."""
        tokens = np.asarray(tokens)
        lengths = np.asarray(lengths, dtype=np.int64)
        if int(lengths.sum()) != len(tokens):
            raise ValueError(f"{self.path}: document lengths sum to {int(lengths.sum())}, not {len(tokens)}")
        top = int(tokens.max()) if tokens.size else -1
        if top >= self.vocab_size or (tokens.size and int(tokens.min()) < 0):
            raise ShardError(f"{self.path}: token id {top} >= vocab_size {self.vocab_size}")
        if self.has_mask:
            if mask is None or len(mask) != len(tokens):
                raise ValueError(f"{self.kind} documents need a mask as long as their tokens")
            self.mask_f.write(np.asarray(mask, dtype=np.uint8).tobytes())
        self._write(tokens.astype(self.dtype, copy=False).tobytes())
        self.lengths.append(lengths)
        self.n_tokens += len(tokens)
        self.n_docs += len(lengths)
        self.max_token_id = max(self.max_token_id, top)

    def close(self) -> Path:
        body = self.n_tokens * self.dtype.itemsize
        self._write(b"\0" * (_align8(HEADER.size + body) - HEADER.size - body))
        offsets = np.zeros(self.n_docs + 1, dtype=np.uint64)
        if self.n_docs:
            np.cumsum(np.concatenate(self.lengths), out=offsets[1:])
        self._write(offsets.tobytes())
        if self.mask_f is not None:
            self.mask_f.close()
            with open(self.mask_tmp, "rb") as m:
                for block in iter(lambda: m.read(BLOCK), b""):
                    self._write(block)
            self.mask_tmp.unlink()
        header = HEADER.pack(MAGIC, VERSION, self.dtype.itemsize, KINDS[self.kind], int(self.has_mask),
                             self.n_tokens, self.n_docs, self.vocab_size)
        self._hash.update(header)
        self.checksum = self._hash.hexdigest()
        self.f.seek(0)
        self.f.write(header)
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        """Drop the partial shard (its temporary files); the final name is never written."""
        self.f.close()
        if self.mask_f is not None:
            self.mask_f.close()
        self.tmp.unlink(missing_ok=True)
        self.mask_tmp.unlink(missing_ok=True)


def file_checksum(path: str | os.PathLike) -> str:
    """sha256 of a shard's bytes after its 64-byte header, then of the header: what `ShardWriter`
    computes while writing (the header is known last). One streamed read of the file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        header = f.read(HEADER.size)
        for block in iter(lambda: f.read(BLOCK), b""):
            h.update(block)
    h.update(header)
    return h.hexdigest()


class Shard:
    """A read-only memory map of one shard: `.tokens`, `.offsets`, `.mask` (or None), `.doc(i)`."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        size = self.path.stat().st_size
        if size < HEADER.size:
            raise ShardError(f"{self.path}: truncated shard ({size} bytes, smaller than its header)")
        with open(self.path, "rb") as f:
            magic, version, tbytes, kind, has_mask, n_tokens, n_docs, vocab = HEADER.unpack(f.read(64))
        if magic != MAGIC:
            raise ShardError(f"{self.path}: not a minimind_fast shard (bad magic {magic!r})")
        if version != VERSION:
            raise ShardError(f"{self.path}: shard format version {version}, this code reads {VERSION}")
        if tbytes not in (2, 4) or kind not in KIND_NAMES:
            raise ShardError(f"{self.path}: corrupt header (token bytes {tbytes}, kind {kind})")
        self.kind, self.vocab_size = KIND_NAMES[kind], vocab
        dtype = np.uint16 if tbytes == 2 else np.uint32
        off_start = _align8(HEADER.size + n_tokens * tbytes)
        expected = off_start + (n_docs + 1) * 8 + (n_tokens if has_mask else 0)
        if size != expected:
            raise ShardError(f"{self.path}: truncated or corrupt shard ({size} bytes, header says {expected})")
        self.tokens = np.memmap(self.path, dtype=dtype, mode="r", offset=HEADER.size, shape=(n_tokens,))
        self.offsets = np.memmap(self.path, dtype=np.uint64, mode="r", offset=off_start, shape=(n_docs + 1,))
        self.mask = (np.memmap(self.path, dtype=np.uint8, mode="r", offset=off_start + (n_docs + 1) * 8,
                               shape=(n_tokens,)) if has_mask else None)
        if n_docs and int(self.offsets[-1]) != n_tokens:
            raise ShardError(f"{self.path}: document offsets end at {int(self.offsets[-1])}, not {n_tokens}")
        # A corrupt table keeps the file's size; read whole (8 bytes a document, about 1% of a shard).
        if int(self.offsets[0]) != 0 or bool((np.diff(self.offsets.astype(np.int64)) < 0).any()):
            raise ShardError(f"{self.path}: corrupt document offsets (they must run from 0 to n_tokens "
                             f"{n_tokens} without going back)")

    @property
    def n_docs(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    def doc(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.tokens[a:b], (self.mask[a:b] if self.mask is not None else None)

    def check_vocab(self, vocab_size: int, ids: np.ndarray | None = None) -> None:
        """Fail, naming the shard, if a token id of `ids` (a slice of it; by default all of it, which
        reads the whole file) is outside [0, vocab_size)."""
        ids = self.tokens if ids is None else ids
        self.check_max_token_id(int(ids.max()) if len(ids) else -1, vocab_size)

    def check_max_token_id(self, top: int, vocab_size: int) -> None:
        """Fail, naming the shard, if its largest token id `top` is outside [0, vocab_size)."""
        if top >= vocab_size:
            raise ShardError(f"{self.path}: token id {top} is out of range for vocab_size {vocab_size} "
                             f"(shard written for vocab_size {self.vocab_size})")
