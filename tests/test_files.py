"""Outputs get the permissions of any file the user writes (umask), not the private ones of the
temporary files they are built in (mkdtemp 0700) or of the safetensors library (0600)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models

from minimind_fast.checkpoint import save_model_dir
from minimind_fast.config import get_preset
from minimind_fast.data.tokenizer import save_tokenizer
from minimind_fast.lora import LoraConfig, apply_lora, save_lora
from minimind_fast.model import MiniMindForCausalLM


@pytest.fixture
def umask_027():
    before = os.umask(0o027)
    yield
    os.umask(before)


def modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root.parent)): p.stat().st_mode & 0o777 for p in [root, *root.rglob("*")]}


def assert_umask_modes(root: Path) -> None:
    found = modes(root)
    assert len(found) > 1, found
    for name, mode in found.items():
        wanted = 0o750 if (root.parent / name).is_dir() else 0o640
        assert mode == wanted, f"{name}: {oct(mode)} (wanted {oct(wanted)})"


def test_model_tokenizer_and_adapter_outputs_follow_the_umask(tmp_path, umask_027):
    torch.manual_seed(0)
    model = MiniMindForCausalLM(get_preset("tiny", vocab_size=64))
    save_model_dir(model, tmp_path / "model")
    assert_umask_modes(tmp_path / "model")
    save_tokenizer(Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>")), tmp_path / "tok")
    assert_umask_modes(tmp_path / "tok")
    apply_lora(model, LoraConfig(rank=2, alpha=4))
    save_lora(model, tmp_path / "adapter")
    assert_umask_modes(tmp_path / "adapter")
