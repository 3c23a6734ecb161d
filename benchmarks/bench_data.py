"""Data-layer throughput: JSONL -> shards against the tokenizers library's own batch encode, and the loaders.

Groups (tokens/s and bytes/s of JSONL input in each case's extra_info):

- ``tokenize-pretrain`` / ``tokenize-sft``:
    ``tokenizers``  `Tokenizer.encode_batch` over the already-parsed texts, on all cores: the ceiling;
    ``minimind``    MiniMind's way: per sample, the chat template rendered (SFT) and the transformers
                    tokenizer called (what its datasets do, every epoch, inside the training loop);
    ``ours``        the whole pipeline (read, parse, render, encode, masks, write shards) on all cores;
                    target: within ~1.1x of ``tokenizers`` for pretrain.
- ``shard-write``: `ShardWriter` alone on already-encoded tokens (the writing's share of the cost;
  target < 10% of ``tokenizers``' time).
- ``loader-pretrain`` / ``loader-sft``: batches built from memory-mapped shards (tokens/s).

The corpus is the built-in one (`size="demo"`: 1.6 MB pretrain, ~0.5 MB SFT), repeated 4 times with
`BENCH_FULL=1` / `--gpu-sizes`.
"""

from __future__ import annotations

import itertools
import json
import os

import numpy as np
import pytest

from minimind_fast.data.corpus import write_builtin_corpus
from minimind_fast.data.loaders import build_loader
from minimind_fast.data.pipeline import TokenizeOptions, tokenize_to_shards
from minimind_fast.data.shards import ShardWriter
from minimind_fast.data.tokenizer import load_tokenizer, train_tokenizer

ROUNDS = 3


@pytest.fixture(scope="module")
def data(tmp_path_factory, pytestconfig):
    root = tmp_path_factory.mktemp("bench_data")
    files = write_builtin_corpus(root / "jsonl", size="demo")
    repeat = 4 if pytestconfig.getoption("--gpu-sizes", False) or os.environ.get("BENCH_FULL") == "1" else 1
    for name in ("pretrain", "sft"):
        text = files[name].read_text()
        files[name].write_text(text * repeat)
    tok_dir = train_tokenizer([files["pretrain"], files["sft"]], 6400, root / "tokenizer")
    return {"root": root, "files": files, "tokenizer": tok_dir}


def _texts(path, kind, tok):
    records = [json.loads(line) for line in path.read_text().splitlines()]
    if kind == "pretrain":
        return [r["text"] for r in records]
    return [tok.apply_chat_template(r["conversations"]) for r in records]


def _info(benchmark, group, impl, tokens, nbytes):
    benchmark.extra_info.update(group=group, impl=impl, tokens=tokens, bytes=nbytes, workers=os.cpu_count())


def _bytes_rate(benchmark, nbytes):
    benchmark.extra_info["bytes_per_s"] = nbytes / benchmark.stats.stats.median


@pytest.mark.parametrize("kind", ["pretrain", "sft"])
@pytest.mark.parametrize("impl", ["tokenizers", "minimind", "ours"])
def test_tokenize_throughput(benchmark, data, tmp_path, kind, impl):
    tok = load_tokenizer(data["tokenizer"])
    src = data["files"][kind]
    nbytes = src.stat().st_size
    texts = _texts(src, kind, tok)
    tokens = sum(len(e) for e in tok.encode_batch(texts))
    if impl == "tokenizers":
        def run():
            tok.tokenizer.encode_batch(texts, add_special_tokens=False)
    elif impl == "minimind":
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(data["tokenizer"]))
        records = [json.loads(line) for line in src.read_text().splitlines()]

        def run():
            # As MiniMind's datasets do per sample: parse, render the chat template (SFT), encode.
            for r in records:
                text = r["text"] if kind == "pretrain" else hf.apply_chat_template(r["conversations"], tokenize=False)
                hf(text, add_special_tokens=False)
    else:
        opts = TokenizeOptions(kind=kind, seq_len=512)
        out = tmp_path / "shards"

        def run():
            tokenize_to_shards([src], data["tokenizer"], out, opts, force=True)
    _info(benchmark, f"tokenize-{kind}", impl, tokens, nbytes)
    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=1 if impl == "ours" else 0)
    _bytes_rate(benchmark, nbytes)


def test_shard_write(benchmark, data, tmp_path):
    tok = load_tokenizer(data["tokenizer"])
    encoded = tok.encode_batch(_texts(data["files"]["pretrain"], "pretrain", tok))
    tokens = np.concatenate([np.asarray(e, dtype=np.int32) for e in encoded])
    lengths = np.asarray([len(e) for e in encoded])
    chunk = 2000

    def run():
        w = ShardWriter(tmp_path / "w.bin", "pretrain", tok.vocab_size)
        ends = np.concatenate([[0], np.cumsum(lengths)])
        for i in range(0, len(lengths), chunk):  # as the pipeline writes: a chunk of records at a time
            a, b = ends[i], ends[min(i + chunk, len(lengths))]
            w.add_many(tokens[a:b], lengths[i:i + chunk])
        w.close()

    _info(benchmark, "shard-write", "ours", len(tokens), data["files"]["pretrain"].stat().st_size)
    benchmark.pedantic(run, rounds=ROUNDS, iterations=1)


@pytest.fixture(scope="module")
def shards(data):
    out = {}
    for kind in ("pretrain", "sft"):
        out[kind] = data["root"] / "shards" / kind
        tokenize_to_shards([data["files"][kind]], data["tokenizer"], out[kind], TokenizeOptions(kind=kind))
    return out


@pytest.mark.parametrize("kind", ["pretrain", "sft"])
def test_loader_throughput(benchmark, shards, kind):
    seq_len, bsz, n = 512, 16, 50
    loader = build_loader(kind, shards[kind], seq_len=seq_len, micro_batch_size=bsz)
    it = iter(loader)

    def run():
        for batch in itertools.islice(it, n):
            assert batch["input_ids"].shape == (bsz, seq_len)

    benchmark.extra_info.update(group=f"loader-{kind}", impl="ours", tokens=n * bsz * seq_len)
    benchmark.pedantic(run, rounds=ROUNDS, iterations=1)
