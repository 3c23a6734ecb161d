"""The `.bin` shard format: round trip, dtype choice, and clear errors on corrupt files."""

from __future__ import annotations

import hashlib
import struct

import numpy as np
import pytest

from minimind_fast.data.shards import HEADER, MAGIC, Shard, ShardError, ShardWriter, file_checksum


def _docs(rng, n, vocab):
    return [rng.integers(0, vocab, size=int(rng.integers(1, 40))) for _ in range(n)]


@pytest.mark.parametrize("vocab", [6400, 70000])
@pytest.mark.parametrize("kind", ["pretrain", "sft"])
def test_round_trip(tmp_path, vocab, kind):
    rng = np.random.default_rng(0)
    docs = _docs(rng, 50, vocab)
    masks = [rng.integers(0, 3, size=len(d)).astype(np.uint8) for d in docs]
    w = ShardWriter(tmp_path / "a.bin", kind, vocab)
    w.add(docs[0], masks[0] if kind == "sft" else None)
    w.add_many(np.concatenate(docs[1:]), [len(d) for d in docs[1:]],
               np.concatenate(masks[1:]) if kind == "sft" else None)
    assert not (tmp_path / "a.bin").exists()  # only the temporary name until close()
    w.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]
    s = Shard(tmp_path / "a.bin")
    assert s.tokens.dtype == (np.uint16 if vocab <= 65536 else np.uint32)
    assert (s.kind, s.vocab_size, s.n_docs, s.n_tokens) == (kind, vocab, 50, sum(map(len, docs)))
    assert isinstance(s.tokens, np.memmap)
    assert w.max_token_id == max(int(d.max()) for d in docs)  # what the manifest records
    for i, d in enumerate(docs):
        ids, mask = s.doc(i)
        np.testing.assert_array_equal(ids, d)
        if kind == "sft":
            np.testing.assert_array_equal(mask, masks[i])
        else:
            assert mask is None


@pytest.mark.parametrize("kind", ["pretrain", "sft"])
def test_checksum_while_writing_equals_the_files(tmp_path, kind):
    rng = np.random.default_rng(1)
    docs = _docs(rng, 30, 6400)
    w = ShardWriter(tmp_path / "a.bin", kind, 6400)
    for d in docs:
        w.add(d, rng.integers(0, 3, size=len(d)).astype(np.uint8) if kind == "sft" else None)
    path = w.close()
    data = path.read_bytes()
    assert w.checksum == file_checksum(path) == hashlib.sha256(data[64:] + data[:64]).hexdigest()
    for at in (40, 64, len(data) - 1):  # a header field, the first token, the last byte
        changed = bytearray(data)
        changed[at] ^= 1
        path.write_bytes(bytes(changed))
        assert file_checksum(path) != w.checksum


def test_empty_shard(tmp_path):
    w = ShardWriter(tmp_path / "e.bin", "sft", 100)
    w.close()
    s = Shard(tmp_path / "e.bin")
    assert (s.n_docs, s.n_tokens, w.max_token_id) == (0, 0, -1)


def test_writer_rejects_out_of_vocab_and_abort_leaves_nothing(tmp_path):
    w = ShardWriter(tmp_path / "a.bin", "pretrain", 100)
    with pytest.raises(ShardError, match=r"a\.bin.*token id 100"):
        w.add(np.array([5, 100]))
    with pytest.raises(ValueError, match="need a mask"):
        ShardWriter(tmp_path / "b.bin", "sft", 100).add(np.array([1, 2]))
    w.abort()
    assert not (tmp_path / "a.bin").exists() and not (tmp_path / "a.bin.tmp").exists()


@pytest.fixture
def shard_file(tmp_path):
    w = ShardWriter(tmp_path / "s.bin", "sft", 1000)
    w.add(np.arange(10), np.ones(10, np.uint8))
    w.add(np.arange(500, 507), np.zeros(7, np.uint8))
    return w.close()


def test_bad_magic(shard_file):
    data = bytearray(shard_file.read_bytes())
    data[:8] = b"NOTASHRD"
    shard_file.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"s\.bin.*magic"):
        Shard(shard_file)


def test_bad_version(shard_file):
    data = bytearray(shard_file.read_bytes())
    data[8:12] = struct.pack("<I", 99)
    shard_file.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"s\.bin.*version 99"):
        Shard(shard_file)


@pytest.mark.parametrize("keep", [10, HEADER.size + 3, -1])
def test_truncated(shard_file, keep):
    data = shard_file.read_bytes()
    shard_file.write_bytes(data[:keep])
    with pytest.raises(ShardError, match=r"s\.bin.*truncated"):
        Shard(shard_file)


def test_vocab_check_names_the_shard(shard_file):
    s = Shard(shard_file)
    s.check_vocab(1000)
    with pytest.raises(ShardError, match=r"s\.bin.*token id 506.*vocab_size 400"):
        s.check_vocab(400)


def test_header_layout(shard_file):
    magic, version, tbytes, kind, has_mask, n_tokens, n_docs, vocab = HEADER.unpack(shard_file.read_bytes()[:64])
    assert (magic, version, tbytes, kind, has_mask, n_tokens, n_docs, vocab) == (MAGIC, 1, 2, 1, 1, 17, 2, 1000)


@pytest.mark.parametrize(("doc", "value"), [(0, 1), (0, 11), (1, 18)])
def test_offsets_that_do_not_run_forward_are_refused(shard_file, doc, value):
    """A corrupt offsets table keeps the file's size: without this check the loaders cut documents at
    the wrong places (empty or overlapping ones) and count another number of batches than they give."""
    data = bytearray(shard_file.read_bytes())
    at = 64 + 17 * 2 + 6 + 8 * doc  # the offsets start on the 8-byte boundary after the 17 uint16 tokens
    assert struct.unpack("<Q", data[at:at + 8])[0] == (0, 10)[doc]
    data[at:at + 8] = struct.pack("<Q", value)
    shard_file.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"s\.bin: corrupt document offsets"):
        Shard(shard_file)
