"""FLOPs per token and device peaks, for MFU.

Training FLOPs per token = 6 * N_active (forward 2N, backward 4N over the matmul weights, embedding
lookup excluded, tied output head included) + attention 12 * L * T * d (QK^T and AV, forward and
backward, with T the sequence length and d = num_attention_heads * head_dim; the causal mask halves
the work a kernel must do, but we count the full product as PaLM's appendix B does). A forward alone is
a third of that. Each stage adds what else it runs per trained token (`Stage.flops_per_token`).
"""

from __future__ import annotations

import torch
from torch import nn

from minimind_fast.config import ModelConfig
from minimind_fast.lora import LoraExpertBank, LoraLinear

# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' datasheets (no sparsity), matched in this order
# against the device's name: the H100's PCIe and NVL boards before the SXM one ("NVIDIA H100 80GB HBM3").
PEAK_BF16 = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "A100": 312e12,
             "L40S": 362e12, "RTX 4090": 165e12, "RTX 3090": 71e12, "A10": 125e12}


def active_matmul_params(config: ModelConfig) -> int:
    """Weights every token multiplies through: attention, the FFN (k routed + shared experts), head."""
    h, inter = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * config.head_dim
    attn = 2 * h * h + 2 * h * kv
    ffn = 3 * h * inter
    if config.use_moe:
        ffn = ffn * (config.num_experts_per_tok + config.n_shared_experts) + h * config.n_routed_experts
    return config.num_hidden_layers * (attn + ffn) + head_matmul_params(config)


def head_matmul_params(config: ModelConfig) -> int:
    """The output head's weights (tied to the embedding or not): part of `active_matmul_params`."""
    return config.vocab_size * config.hidden_size


def forward_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """One forward's FLOPs per token (a reference's, a teacher's, sampling's)."""
    attention = 4 * config.num_hidden_layers * seq_len * config.num_attention_heads * config.head_dim
    return 2 * active_matmul_params(config) + attention


def model_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training (forward + backward) FLOPs per token: the backward takes each matmul's input gradient and
    its weight gradient, each costing as much as the forward."""
    return 3 * forward_flops_per_token(config, seq_len)


def lora_flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Training FLOPs per token of a model with LoRA adapters (`lora.apply_lora`) on its frozen base: a
    frozen weight costs its forward and its input's gradient (4 per weight) but no weight gradient; an
    adapter, r * (in + out) weights per projection, costs 6 per weight like any trained matmul. An adapted
    MoE expert stack is merged with its update before use, so its weight gradient is taken (6 per active
    weight); the per-step merge itself (B @ A, not per token) is left out."""
    config, rank = model.config, model.lora_config.rank  # the config's, not a parameter's shape (ZeRO-3)
    adapters = sum(rank * (m.base.in_features + m.base.out_features)
                   for m in model.modules() if isinstance(m, LoraLinear))
    per_projection = config.hidden_size * config.intermediate_size * config.num_experts_per_tok
    merged = sum(len(m.lora_A) * per_projection for m in model.modules() if isinstance(m, LoraExpertBank))
    frozen = active_matmul_params(config) - merged
    return model_flops_per_token(config, seq_len) - 2 * frozen + 6 * adapters


def peak_flops(device: torch.device | str | None = None) -> float | None:
    """The device's dense bf16 peak in FLOP/s, or None where unknown (CPU)."""
    if not torch.cuda.is_available() or (device is not None and torch.device(device).type != "cuda"):
        return None
    return datasheet_peak(torch.cuda.get_device_name(device))


def datasheet_peak(name: str) -> float | None:
    """The dense bf16 peak (FLOP/s) of the GPU called `name`, or None where unknown."""
    return next((value for key, value in PEAK_BF16.items() if key in name), None)
