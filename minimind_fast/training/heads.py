"""Scalar heads on the decoder's final hidden states: PPO's critic and the reward model's score.

A head is registered on the model DeepSpeed trains (so it is optimised, reduced, partitioned and held
in DeepSpeed's state like any weight, and a resume restores it exactly), but it is no part of the
language model: each checkpoint's `model/` keeps it apart in its own safetensors file (keys `weight`,
`bias`), and `model.safetensors` stays a plain model that chat, convert and later stages load.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from minimind_fast.model import MiniMindForCausalLM


def attach_scalar_head(model: MiniMindForCausalLM, name: str, std: float = 0.0, seed: int = 0) -> nn.Linear:
    """`nn.Linear(hidden_size, 1)` registered on the model as `name`, on its device and dtype; bias 0 and
    weights N(0, std) drawn from `seed` (every rank draws the same head: the engine seeds ranks apart)."""
    ref = next(model.parameters())
    head = nn.Linear(model.config.hidden_size, 1, device=ref.device, dtype=ref.dtype)
    nn.init.zeros_(head.bias)
    nn.init.zeros_(head.weight)
    if std:
        with torch.no_grad():
            head.weight.copy_(torch.randn(head.weight.shape, generator=torch.Generator().manual_seed(seed)) * std)
    setattr(model, name, head)
    return head


def split_head(state: dict[str, torch.Tensor], name: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The consolidated weights as (the model's, the head `name`'s with its prefix dropped)."""
    prefix = name + "."
    return ({k: v for k, v in state.items() if not k.startswith(prefix)},
            {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)})


def save_head(weights: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.contiguous() for k, v in weights.items()}, str(path), metadata={"format": "pt"})


class OwnHead:
    """A stage's hooks (`Stage.split_weights`, `save_own_weights`) for a head `head_name` saved as
    `head_file` in each checkpoint's model directory. Mixed in before the stage's base class."""

    head_name: str
    head_file: str

    def split_weights(self, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        return split_head(state, self.head_name)

    def save_own_weights(self, weights: dict[str, torch.Tensor], model_dir: Path) -> None:
        save_head(weights, model_dir / self.head_file)
