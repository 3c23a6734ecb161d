"""Shared test fixtures.

GPU tests are marked `gpu` and skip, saying why, when no CUDA device is present. Kernel tests run on
CPU through Triton's interpreter (`TRITON_INTERPRET=1`, set by `make test`).
"""

from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run `make test-gpu` on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def device() -> torch.device:
    """CUDA when present, else CPU (kernel tests then rely on the Triton interpreter)."""
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def builtin_data(tmp_path_factory):
    """The built-in corpus (test size), a tokenizer trained on it and shards of each kind."""
    from minimind_fast.data.corpus import write_builtin_corpus
    from minimind_fast.data.pipeline import TokenizeOptions, tokenize_to_shards
    from minimind_fast.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("builtin")
    files = write_builtin_corpus(root / "jsonl", size="test")
    tok_dir = train_tokenizer([files["pretrain"], files["sft"]], 1024, root / "tokenizer")
    shards = {}
    for kind, name in (("pretrain", "pretrain"), ("sft", "sft"), ("reasoning", "reasoning"), ("dpo", "dpo")):
        opts = TokenizeOptions(kind=kind, seq_len=128, workers=1, val_fraction=0.05)
        tokenize_to_shards([files[name]], tok_dir, root / "shards" / kind, opts)
        shards[kind] = root / "shards" / kind
    return {"root": root, "files": files, "tokenizer": tok_dir, "shards": shards}


@pytest.fixture(scope="session")
def tiny_model_config(tmp_path_factory):
    """A 2-layer, hidden-64 `tiny` config with the built-in tokenizer's vocabulary size, as a JSON file."""
    from launch_helpers import tiny_config

    path = tmp_path_factory.mktemp("cfg") / "model.json"
    tiny_config().save(path)
    return path


@pytest.fixture(scope="session")
def pretrain_run(builtin_data, tiny_model_config, tmp_path_factory):
    """12 pretraining steps of the tiny model (checkpoints at 4, 8, 12; eval at 6 and 12; profiled over
    steps 6-7): the start of every fine-tuning stage's tests. Read it, never write into it."""
    from launch_helpers import common, run

    out = tmp_path_factory.mktemp("runs") / "pretrain"
    run("pretrain.py", common(builtin_data["shards"]["pretrain"], out, 12, "--config", str(tiny_model_config),
                              "--eval-every", "6", "--profile-steps", "2"))
    return out
