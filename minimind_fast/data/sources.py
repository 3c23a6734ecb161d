"""Input files of records: JSONL, plain or compressed, and Parquet, each read as numbered JSON objects.

A reader yields `(number, raw)`, `raw` being one record's JSON: a JSONL line as it stands in the file,
or a Parquet row written out as JSON. So every record goes through the same parsing and checks
(`records.parse_line`) whatever file it came from, and every problem is named `file:number`: the line
of a JSONL file or the row of a Parquet file, both counted from 1. Hugging Face datasets ship as
Parquet and large JSONL corpora are often kept compressed; neither has to be converted first.
Compressed JSONL (`.gz`, `.bz2`, `.xz`, `.zst`) is decompressed as it is read, and Parquet is read
one batch of rows at a time, so memory does not grow with the file.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import json
import lzma
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

PARQUET = ".parquet"
PARQUET_BATCH_ROWS = 1024
HASH_BLOCK = 1 << 22
# Compressed bytes decompressed at once: what they expand to is held whole (text: ~10x).
ZSTD_READ = 1 << 16


class _ZstdFile(io.RawIOBase):
    """A `.zst` file's decompressed bytes, frame after frame (`zstd -T` and `pzstd` write several).
    zstandard's own stream reader ends quietly where a truncated file does; this raises EOFError."""

    def __init__(self, path: Path):
        try:
            import zstandard
        except ImportError:
            raise _missing("zstandard", path) from None
        self._new_frame = zstandard.ZstdDecompressor().decompressobj
        self._file = open(path, "rb")
        self._frame = self._new_frame()
        self._in_frame = False  # some of the current frame read, not its end
        self._out, self._pos = b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self._pos == len(self._out):
            data = self._file.read(ZSTD_READ)
            if not data:
                if self._in_frame:
                    raise EOFError("the file ends inside a zstd frame")
                return 0
            self._out, self._pos = self._decompress(data), 0
        n = min(len(buffer), len(self._out) - self._pos)
        buffer[:n] = self._out[self._pos:self._pos + n]
        self._pos += n
        return n

    def _decompress(self, data: bytes) -> bytes:
        out = []
        while data:
            self._in_frame = True
            out.append(self._frame.decompress(data))
            if not self._frame.eof:
                break
            data, self._frame, self._in_frame = self._frame.unused_data, self._new_frame(), False
        return b"".join(out)

    def close(self) -> None:
        self._file.close()
        super().close()


def _open_zstd(path: Path) -> BinaryIO:
    return io.BufferedReader(_ZstdFile(path), buffer_size=HASH_BLOCK)


DECOMPRESSORS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open, ".zst": _open_zstd}


def _missing(module: str, path: Path) -> ValueError:
    """The error for an optional dependency that reading `path` needs: what to install."""
    return ValueError(f"{path}: reading a {path.suffix} file needs the {module} package "
                      f"(pip install {module}, or pip install 'minimind_fast[data]')")


def is_parquet(path: Path) -> bool:
    return path.suffix.lower() == PARQUET


def open_jsonl(path: Path) -> BinaryIO:
    """The bytes of a JSONL file, decompressed when its name ends in `.gz`, `.bz2`, `.xz` or `.zst`."""
    opener = DECOMPRESSORS.get(path.suffix.lower())
    return open(path, "rb") if opener is None else opener(path)


def _read_errors() -> tuple[type[BaseException], ...]:
    """What a damaged file raises while it is decompressed or decoded (EOFError: a truncated one;
    zlib.error, not an OSError: a .gz file whose deflate data does not decode)."""
    errors: list[type[BaseException]] = [OSError, EOFError, lzma.LZMAError, zlib.error]
    for module, name in (("zstandard", "ZstdError"), ("pyarrow", "ArrowException")):
        try:
            errors.append(getattr(__import__(module), name))
        except ImportError:
            pass
    return tuple(errors)


def iter_records(path: Path) -> Iterator[tuple[int, bytes]]:
    """(number, raw JSON) for every line of a JSONL file (blank ones included) or row of a Parquet file.

    A file that cannot be read to its end (truncated or corrupt) raises ValueError naming it and the
    last record read whole.
    """
    number = 0
    try:
        for number, raw in _parquet_rows(path) if is_parquet(path) else _jsonl_lines(path):
            yield number, raw
    except _read_errors() as e:
        raise ValueError(f"{path}: cannot be read past record {number} (truncated or corrupt?): {e}") from None


def _jsonl_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    with open_jsonl(path) as f:
        yield from enumerate(f, start=1)


def _parquet_rows(path: Path) -> Iterator[tuple[int, bytes]]:
    parquet = _parquet_file(path)
    number = 0
    for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS):
        for row in batch.to_pylist():
            number += 1
            # Every row has every column: a null one is a field the record does not have (a prompt file
            # mixing {"prompt"} and {"messages"} rows). default=str: a column JSON has no type for (a
            # timestamp, a decimal) reaches the record as text; the fields read are strings and lists.
            fields = {key: value for key, value in row.items() if value is not None}
            yield number, json.dumps(fields, ensure_ascii=False, default=str).encode()


def _parquet_file(path: Path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise _missing("pyarrow", path) from None

    try:
        return pq.ParquetFile(path)
    except _read_errors() as e:
        raise ValueError(f"{path}: not a readable Parquet file: {e}") from None


def digest(path: Path) -> tuple[str, int]:
    """sha256 of the file as stored, and its number of records (a last line without its newline counts)."""
    h, lines, last = hashlib.sha256(), 0, b"\n"
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(HASH_BLOCK), b""):
            h.update(block)
            lines += block.count(b"\n")
            last = block[-1:]
    if is_parquet(path):
        return h.hexdigest(), _parquet_file(path).metadata.num_rows
    if path.suffix.lower() in DECOMPRESSORS:
        return h.hexdigest(), count_lines(path)
    return h.hexdigest(), lines + (last != b"\n")


def count_lines(path: Path) -> int:
    """Lines of a (decompressed) JSONL file, a last one without its newline included."""
    lines, last = 0, b"\n"
    try:
        with open_jsonl(path) as f:
            for block in iter(lambda: f.read(HASH_BLOCK), b""):
                lines += block.count(b"\n")
                last = block[-1:]
    except _read_errors() as e:
        raise ValueError(f"{path}: cannot be decompressed to its end (truncated or corrupt?): {e}") from None
    return lines + (last != b"\n")


def head(path: Path, size: int = 4096) -> bytes:
    """The first `size` bytes of a JSONL file's text (b"" for Parquet or an unreadable file)."""
    if is_parquet(path):
        return b""
    try:
        with open_jsonl(path) as f:
            return f.read(size)
    except _read_errors():
        return b""
