"""Input files other than plain JSONL: compressed JSONL and Parquet give the same records, and so the
same shards, tokenizer and prompts, as the JSONL they hold; a damaged file is an error naming it."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import runpy
import sys
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from minimind_fast.chat import read_prompts
from minimind_fast.data.pipeline import InputError, TokenizeOptions, tokenize_to_shards
from minimind_fast.data.prompts import read_prompt_file
from minimind_fast.data.sources import digest, iter_records
from minimind_fast.data.tokenizer import load_tokenizer, train_tokenizer

REPO = Path(__file__).resolve().parents[1]
COMPRESS = {
    ".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress,
    ".zst": zstandard.ZstdCompressor().compress,
}


def _zstd_frames(data: bytes) -> bytes:
    """Two zstd frames back to back, as `zstd -T` or `pzstd` write a large file."""
    half = len(data) // 2
    return COMPRESS[".zst"](data[:half]) + COMPRESS[".zst"](data[half:])


def _lines(path: Path, n: int) -> bytes:
    return b"".join(path.read_bytes().splitlines(keepends=True)[:n])


def _parquet(path: Path, records: list[dict], row_group_size: int = 64) -> Path:
    columns = list(dict.fromkeys(key for r in records for key in r))  # from_pylist takes the first row's
    rows = [{key: r.get(key) for key in columns} for r in records]
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)
    return path


def _shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.bin"))}


def _tokenize(files: list[Path], tokenizer: Path, out: Path, kind: str, **kw) -> dict:
    opts = TokenizeOptions(**{"kind": kind, "seq_len": 128, "workers": 1, "val_fraction": 0.05, **kw})
    return tokenize_to_shards(files, tokenizer, out, opts)


@pytest.fixture(scope="module")
def plain(builtin_data, tmp_path_factory):
    """A few hundred records of each kind as plain JSONL, and their shards (the reference)."""
    root = tmp_path_factory.mktemp("sources")
    files, shards = {}, {}
    for kind in ("pretrain", "sft", "dpo"):
        files[kind] = root / f"{kind}.jsonl"
        files[kind].write_bytes(_lines(builtin_data["files"][kind], 300))
        _tokenize([files[kind]], builtin_data["tokenizer"], root / f"shards-{kind}", kind)
        shards[kind] = _shard_bytes(root / f"shards-{kind}")
    return {"root": root, "files": files, "shards": shards}


@pytest.mark.parametrize("kind", ["pretrain", "sft", "dpo"])
@pytest.mark.parametrize("suffix", [".gz", ".bz2", ".xz", ".zst", ".zst-frames", ".parquet"])
def test_each_format_gives_the_shards_of_its_jsonl(builtin_data, plain, tmp_path, kind, suffix):
    src = plain["files"][kind]
    if suffix == ".parquet":
        path = _parquet(tmp_path / f"{kind}.parquet", [json.loads(line) for line in src.read_bytes().splitlines()])
    else:
        path = tmp_path / f"{kind}.jsonl{suffix[:4]}"
        path.write_bytes((_zstd_frames if suffix == ".zst-frames" else COMPRESS[suffix])(src.read_bytes()))
    manifest = _tokenize([path], builtin_data["tokenizer"], tmp_path / "out", kind)
    assert _shard_bytes(tmp_path / "out") == plain["shards"][kind]
    assert manifest["sources"][0]["lines"] == manifest["records"] == len(src.read_bytes().splitlines())
    assert manifest["sources"][0]["bytes"] == path.stat().st_size  # the file as stored is what is hashed


def test_records_are_numbered_as_lines_or_rows(tmp_path):
    lines = [b'{"text": "a"}\n', b"\n", b'{"text": "b"}']  # a blank line and a last line without newline
    (tmp_path / "f.jsonl.xz").write_bytes(lzma.compress(b"".join(lines)))
    assert list(iter_records(tmp_path / "f.jsonl.xz")) == list(enumerate(lines, 1))
    assert digest(tmp_path / "f.jsonl.xz")[1] == 3
    rows = [{"text": "a", "n": 1}, {"text": None, "n": 2}, {"text": "ü\n", "n": 3}]
    path = _parquet(tmp_path / "f.parquet", rows, row_group_size=2)  # numbering runs across row groups
    expected = [{"text": "a", "n": 1}, {"n": 2}, {"text": "ü\n", "n": 3}]  # a null column is an absent field
    assert [(i, json.loads(raw)) for i, raw in iter_records(path)] == list(enumerate(expected, 1))
    assert digest(path)[1] == 3


def test_a_bad_parquet_row_is_named_by_file_and_row(builtin_data, tmp_path):
    rows = [{"text": f"document {i}"} for i in range(5)]
    rows[3]["text"] = None
    path = _parquet(tmp_path / "p.parquet", rows, row_group_size=2)
    manifest = _tokenize([path], builtin_data["tokenizer"], tmp_path / "out", "pretrain")
    assert manifest["records"] == 4
    assert len(manifest["problems"]) == 1 and manifest["problems"][0].startswith(f"{path}:4: ")
    with pytest.raises(InputError, match=f"{path}:4: "):
        _tokenize([path], builtin_data["tokenizer"], tmp_path / "strict", "pretrain", strict=True)


def test_messages_is_read_as_conversations(builtin_data, plain, tmp_path):
    records = [json.loads(line) for line in plain["files"]["sft"].read_bytes().splitlines()]
    path = tmp_path / "messages.jsonl"
    path.write_text("".join(json.dumps({"messages": r["conversations"]}) + "\n" for r in records))
    _tokenize([path], builtin_data["tokenizer"], tmp_path / "out", "sft")
    assert _shard_bytes(tmp_path / "out") == plain["shards"]["sft"]
    both = {"conversations": records[0]["conversations"], "messages": records[1]["conversations"]}
    path.write_text(json.dumps(both) + "\n" + json.dumps(records[2]) + "\n")
    manifest = _tokenize([path], builtin_data["tokenizer"], tmp_path / "both", "sft", val_fraction=0)
    assert manifest["skipped"] == {"ambiguous_field": 1}
    assert manifest["problems"] == [f"{path}:1: ambiguous_field: both 'conversations' and 'messages': keep one"]


def _damaged(tmp_path: Path, src: bytes) -> list[Path]:
    paths = []
    for suffix in (".gz", ".bz2", ".xz", ".zst"):
        data = COMPRESS[suffix](src)
        paths.append(tmp_path / f"cut.jsonl{suffix}")
        paths[-1].write_bytes(data[: len(data) // 2])
    paths.append(tmp_path / "fake.jsonl.gz")
    paths[-1].write_bytes(src[:200])  # named .gz, holds plain text
    garbled = bytearray(COMPRESS[".gz"](src))
    garbled[30:38] = b"\xff" * 8  # deflate data that does not decode (zlib.error, not an OSError)
    paths.append(tmp_path / "garbled.jsonl.gz")
    paths[-1].write_bytes(bytes(garbled))
    table = tmp_path / "whole.parquet"
    _parquet(table, [json.loads(line) for line in src.splitlines()])
    paths.append(tmp_path / "cut.parquet")
    paths[-1].write_bytes(table.read_bytes()[: table.stat().st_size // 2])
    return paths


def test_a_damaged_file_is_an_error_naming_it_and_writes_nothing(builtin_data, plain, tmp_path):
    for path in _damaged(tmp_path, plain["files"]["sft"].read_bytes()):
        out = tmp_path / f"out-{path.name}"
        with pytest.raises(ValueError, match=f"{path}: .*(truncated or corrupt|not a readable Parquet)"):
            _tokenize([path], builtin_data["tokenizer"], out, "sft")
        assert not list(out.glob("*.bin")) and not (out / "manifest.json").exists(), path
        with pytest.raises(ValueError, match=str(path)):  # read to its end without counting first
            list(iter_records(path))


@pytest.mark.parametrize("module, path", [("pyarrow", "d.parquet"), ("zstandard", "d.jsonl.zst")])
def test_a_missing_optional_reader_says_what_to_install(tmp_path, monkeypatch, module, path):
    (tmp_path / path).write_bytes(b"x")
    monkeypatch.setitem(sys.modules, module, None)  # import fails as when it is not installed
    with pytest.raises(ValueError, match=f"{tmp_path / path}: .*needs the {module} package .*pip install"):
        list(iter_records(tmp_path / path))


def test_the_tokenizer_trains_alike_on_every_format(plain, tmp_path):
    sft = plain["files"]["sft"]
    reference = train_tokenizer([plain["files"]["pretrain"], sft], 300, tmp_path / "jsonl")
    pretrain_gz = tmp_path / "pretrain.jsonl.gz"
    pretrain_gz.write_bytes(gzip.compress(plain["files"]["pretrain"].read_bytes()))
    sft_parquet = _parquet(tmp_path / "sft.parquet", [json.loads(line) for line in sft.read_bytes().splitlines()])
    other = train_tokenizer([pretrain_gz, sft_parquet], 300, tmp_path / "other")
    assert load_tokenizer(other).fingerprint == load_tokenizer(reference).fingerprint


def test_prompts_read_alike_from_every_format(tmp_path):
    records = [{"prompt": "What is 1 + 2?", "answer": "3"},
               {"messages": [{"role": "user", "content": "Hi"}], "answer": "4"}]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    zst = tmp_path / "p.jsonl.zst"
    zst.write_bytes(COMPRESS[".zst"](jsonl.read_bytes()))
    # Parquet gives every row every column, the ones a record lacks as null.
    parquet = _parquet(tmp_path / "p.parquet", records)
    expected = [(p.messages, p.line) for p in read_prompt_file(jsonl)]
    assert expected == [([{"role": "user", "content": "What is 1 + 2?"}], 1), ([{"role": "user", "content": "Hi"}], 2)]
    for path in (zst, parquet):
        assert [(p.messages, p.line) for p in read_prompt_file(path)] == expected, path
        assert [r["answer"] for _, r in read_prompts(path)] == ["3", "4"], path


def test_parquet_null_columns_do_not_break_a_record(builtin_data, tmp_path):
    """A Parquet file holds one schema for all rows: a message without `tool_calls` gets it as null."""
    conversation = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}]
    call = [{"type": "function", "function": {"name": "add", "arguments": "{}"}}]
    rows = [{"conversations": conversation},
            {"conversations": [conversation[0], {"role": "assistant", "content": "", "tool_calls": call}]}]
    path = _parquet(tmp_path / "t.parquet", rows)
    assert json.loads(dict(iter_records(path))[1])["conversations"][1]["tool_calls"] is None
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for src in (path, jsonl):  # the test tokenizer's template renders no tool calls: row 2 is skipped by both
        manifest = _tokenize([src], builtin_data["tokenizer"], tmp_path / f"out{src.suffix}", "sft", val_fraction=0)
        assert manifest["records"] == 1 and manifest["problems"] == [
            f"{src}:2: template: the chat template does not render message 1's tool_calls"]
    assert _shard_bytes(tmp_path / "out.parquet") == _shard_bytes(tmp_path / "out.jsonl")


def _launch(monkeypatch, script: str, *args) -> None:
    monkeypatch.setattr(sys, "argv", [script, *map(str, args)])
    runpy.run_path(str(REPO / "launch" / script), run_name="__main__")


def test_the_scripts_take_every_format_and_name_a_damaged_file(builtin_data, plain, tmp_path, monkeypatch):
    data = tmp_path / "sft.jsonl.xz"
    data.write_bytes(lzma.compress(plain["files"]["sft"].read_bytes()))
    _launch(monkeypatch, "tokenize.py", "--kind", "sft", "--data", data, "--tokenizer", builtin_data["tokenizer"],
            "--out", tmp_path / "s", "--workers", 1, "--seq-len", 128, "--val-fraction", 0.05)
    assert _shard_bytes(tmp_path / "s") == plain["shards"]["sft"]
    cut = tmp_path / "cut.jsonl.xz"
    cut.write_bytes(data.read_bytes()[:-100])
    with pytest.raises(SystemExit, match=f"error: {cut}: .*truncated or corrupt"):
        _launch(monkeypatch, "train_tokenizer.py", "--data", cut, "--vocab-size", 300, "--out", tmp_path / "tok")
    assert not (tmp_path / "tok").exists()


def test_a_line_nested_too_deeply_is_malformed_not_a_crash(builtin_data, tmp_path):
    """json.loads raises RecursionError, not a JSONDecodeError, past ~1000 levels of nesting: every
    reader of records names the line (or skips it) as it does any other line that is not a record."""
    from minimind_fast.data.tokenizer import iter_texts

    good = {"conversations": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    deep = '{"conversations": ' + "[" * 100_000 + "]" * 100_000 + "}"
    path = tmp_path / "deep.jsonl"
    path.write_text(json.dumps(good) + "\n" + deep + "\n" + json.dumps(good) + "\n")
    manifest = _tokenize([path], builtin_data["tokenizer"], tmp_path / "out", "sft", val_fraction=0)
    assert manifest["records"] == 2 and manifest["skipped"] == {"malformed_json": 1}
    assert manifest["problems"] == [f"{path}:2: malformed_json: nested too deeply"]
    skipped = Counter()
    assert list(iter_texts([path], skipped)) == ["Hi", "Hello.", "Hi", "Hello."] and skipped == {"not JSON": 1}
    prompts = tmp_path / "deep-prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Hi"}) + "\n" + deep + "\n")
    with pytest.raises(ValueError, match=f"{prompts}:2: malformed JSON .nested too deeply."):
        read_prompt_file(prompts)
