"""Shared test fixtures.

GPU tests are marked `gpu` and skip, saying why, when no CUDA device is present. Kernel tests run on
CPU through Triton's interpreter (`TRITON_INTERPRET=1`, set by `make test`).
"""

from __future__ import annotations

import os
from pathlib import Path

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


@pytest.fixture(scope="session")
def random_init(builtin_data, tmp_path_factory) -> Path:
    """An untrained tiny model with the built-in tokenizer: enough for GRPO's and PPO's mechanics (resume,
    errors)."""
    from minimind_fast.checkpoint import save_model_dir
    from minimind_fast.config import get_preset
    from minimind_fast.model import MiniMindForCausalLM

    torch.manual_seed(0)
    config = get_preset("tiny", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        vocab_size=1024, max_position_embeddings=256)
    out = tmp_path_factory.mktemp("grpo_init") / "model"
    save_model_dir(MiniMindForCausalLM(config), out, tokenizer_dir=builtin_data["tokenizer"])
    return out


@pytest.fixture(scope="session")
def letter_reward(tmp_path_factory) -> str:
    """A user reward (file.py:function) that an untrained model's babble earns too, so advantages are
    not all zero and the policy actually moves."""
    path = tmp_path_factory.mktemp("rewards") / "letters.py"
    path.write_text("def letter_e(completion, sample):\n    return completion.count('e') / 4\n")
    return f"{path}:letter_e"


@pytest.fixture(scope="session")
def sft_run(random_init, builtin_data, tmp_path_factory) -> Path:
    """The tiny model SFT'd on the built-in reasoning data, where GRPO's and PPO's runs start: it learns the
    <think>/<answer> layout on the training questions (a + b - c) and carries it partly over to the GRPO
    prompts (a + b)."""
    from launch_helpers import run

    out = tmp_path_factory.mktemp("grpo_sft") / "sft"
    run("sft.py", ["--init", str(random_init), "--data", str(builtin_data["shards"]["reasoning"]), "--out", str(out),
                   "--seq-len", "128", "--micro-batch-size", "8", "--steps", "300", "--lr", "3e-3",
                   "--warmup-steps", "10", "--eval-every", "0", "--save-every", "1000", "--log-every", "50"])
    return out
