"""FLOPs per token and device peaks, for MFU.

Training FLOPs per token = 6 * N_active (forward 2N, backward 4N over the matmul weights, embedding
lookup excluded, tied output head included) + attention 12 * L * T * d (QK^T and AV, forward and
backward, with T the sequence length and d = num_attention_heads * head_dim; the causal mask halves
the work a kernel must do, but we count the full product as PaLM's appendix B does).
"""

from __future__ import annotations

import torch

from minimind_fast.config import ModelConfig

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
    return config.num_hidden_layers * (attn + ffn) + config.vocab_size * h


def model_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training (forward + backward) FLOPs per token."""
    attention = 12 * config.num_hidden_layers * seq_len * config.num_attention_heads * config.head_dim
    return 6 * active_matmul_params(config) + attention


def peak_flops(device: torch.device | str | None = None) -> float | None:
    """The device's dense bf16 peak in FLOP/s, or None where unknown (CPU)."""
    if not torch.cuda.is_available() or (device is not None and torch.device(device).type != "cuda"):
        return None
    return datasheet_peak(torch.cuda.get_device_name(device))


def datasheet_peak(name: str) -> float | None:
    """The dense bf16 peak (FLOP/s) of the GPU called `name`, or None where unknown."""
    return next((value for key, value in PEAK_BF16.items() if key in name), None)
