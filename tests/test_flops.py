"""The FLOPs per token behind MFU, against torch's FLOP counter over a real forward and backward."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from minimind_fast.config import get_preset
from minimind_fast.model import MiniMindForCausalLM
from minimind_fast.training.flops import datasheet_peak, model_flops_per_token, peak_flops


@pytest.mark.parametrize("variant", [{}, {"tie_word_embeddings": False},
                                     {"use_moe": True, "n_routed_experts": 4, "num_experts_per_tok": 2}])
def test_flops_per_token_is_what_a_training_step_multiplies(variant, monkeypatch):
    """6 x active matmul weights + 12 L T d for attention (the full QK^T and AV products, as counted when
    SDPA runs its plain-matmul path), per token of a forward and backward."""
    monkeypatch.setenv("MINIMIND_ATTENTION", "sdpa")
    config = get_preset("tiny", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        vocab_size=512, max_position_embeddings=64, kernels="reference", **variant)
    model = MiniMindForCausalLM(config)
    batch, seq = 2, 48
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        out = model(input_ids=ids, targets=ids)
        (out.loss + out.aux_loss).backward()
    assert model_flops_per_token(config, seq) == counter.get_total_flops() / (batch * seq)


def test_no_peak_and_so_no_mfu_on_the_cpu():
    assert peak_flops("cpu") is None


def test_each_h100_board_gets_its_own_datasheet_peak():
    """The PCIe and NVL boards' names contain "H100" too; the SXM board's 989 TFLOP/s would understate their MFU."""
    assert datasheet_peak("NVIDIA H100 80GB HBM3") == 989e12
    assert datasheet_peak("NVIDIA H100 PCIe") == 756e12 and datasheet_peak("NVIDIA H100 NVL") == 835e12
    assert datasheet_peak("NVIDIA H200") == 989e12 and datasheet_peak("NVIDIA GeForce GTX 1080") is None
