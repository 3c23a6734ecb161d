"""LoRA fine-tuning: SFT loss through low-rank adapters on a frozen base model.

Only the adapters train, so only they reach the optimizer (and its state, and DeepSpeed's fp32 master
copies): fine-tuning memory is the frozen weights plus a few MB. The checkpointer writes the base
weights unchanged to each model directory and the adapter into its `adapter/` subdirectory, so a run
ends with `RUN/final/` (base) and `RUN/final/adapter/` (adapter.safetensors + adapter_config.json).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from torch import nn

from minimind_fast.checkpoint import WEIGHTS, state_dict_for_saving
from minimind_fast.lora import (
    ADAPTER_CONFIG,
    ADAPTER_DIR,
    ADAPTER_WEIGHTS,
    DEFAULT_TARGETS,
    EXPERT_PROJECTIONS,
    LoraConfig,
    LoraExpertBank,
    LoraLinear,
    apply_lora,
    is_expert_adapter_key,
)
from minimind_fast.model import ExpertBank, MiniMindForCausalLM
from minimind_fast.training.stages import SFTStage

# The output head is read directly by the fused linear+cross-entropy (`lm_head.weight`), which would
# skip an adapter there; with tied embeddings it is also the input embedding.
UNADAPTABLE = ("lm_head",)


DEFAULT_ALPHA, DEFAULT_DROPOUT = 16.0, 0.0


def add_lora_arguments(parser: argparse.ArgumentParser, rank: int | None = 8) -> None:
    """The adapter flags; with `rank=None`, LoRA is off unless --lora-rank is given (DPO), and the other
    flags are refused without it (see `check_lora_flags`)."""
    g = parser.add_argument_group("LoRA")
    g.add_argument("--lora-rank", type=int, default=rank,
                   help="adapter rank r" + ("" if rank else " (given: train adapters, not the whole model)"))
    g.add_argument("--lora-alpha", type=float, help=f"scale: the update is (alpha / r) * B @ A "
                                                    f"(default {DEFAULT_ALPHA:g})")
    g.add_argument("--lora-dropout", type=float, help=f"dropout on the adapter's input (default {DEFAULT_DROPOUT:g}); "
                                                      "not on MoE routed experts, whose kernels take whole weights")
    g.add_argument("--lora-targets", nargs="+", metavar="NAME",
                   help=f"projection names to adapt (default: those of {' '.join(DEFAULT_TARGETS)} the model "
                        "has; gate_proj up_proj down_proj adapt the MoE routed experts too, each expert its own)")


def check_lora_flags(a: argparse.Namespace) -> None:
    """Refuse adapter settings without --lora-rank (they would be ignored) or out of range, before any
    model is loaded; fill in the defaults."""
    if a.lora_rank is None:
        given = [flag for flag, v in (("--lora-alpha", a.lora_alpha), ("--lora-dropout", a.lora_dropout),
                                      ("--lora-targets", a.lora_targets)) if v is not None]
        if given:
            raise ValueError(f"{' and '.join(given)} set LoRA adapters, which need --lora-rank")
        return
    a.lora_alpha = DEFAULT_ALPHA if a.lora_alpha is None else a.lora_alpha
    a.lora_dropout = DEFAULT_DROPOUT if a.lora_dropout is None else a.lora_dropout
    if a.lora_rank <= 0:
        raise ValueError(f"--lora-rank {a.lora_rank}: must be positive")
    if not 0 <= a.lora_dropout < 1:
        raise ValueError(f"--lora-dropout {a.lora_dropout}: must be in [0, 1)")
    if not 0 < a.lora_alpha < math.inf:  # written so that NaN fails too
        raise ValueError(f"--lora-alpha {a.lora_alpha}: must be positive and finite")


def lora_config(a: argparse.Namespace, model: nn.Module) -> LoraConfig:
    """The adapter settings from the flags, checked against the model's projections."""
    check_lora_flags(a)
    if a.lora_targets:
        check_targets(model, a.lora_targets)
        targets = list(a.lora_targets)
    else:
        targets = [t for t in DEFAULT_TARGETS if t in linear_names(model)]
    return LoraConfig(rank=a.lora_rank, alpha=a.lora_alpha, dropout=a.lora_dropout, target_modules=targets)


def add_adapters(a: argparse.Namespace, model: MiniMindForCausalLM, resume_from: Path | None = None) -> None:
    """Wrap the targeted projections (before DeepSpeed wraps the model) and say what trains; a resumed
    run must build the adapters its checkpoint holds."""
    config = lora_config(a, model)
    check_resumed_adapter(config, resume_from)
    check_resumed_experts(model, config, resume_from)
    check_resumed_base(model, resume_from, a.init)
    apply_lora(model, config)
    n_adapter = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"LoRA r={config.rank} alpha={config.alpha:g} on {adapted_projections(model)} "
              f"({', '.join(config.target_modules)}): {n_adapter:,} trainable parameters, "
              f"{model.num_parameters() - n_adapter:,} frozen", flush=True)


def adapted_projections(model: nn.Module) -> str:
    """How many projections carry adapters: each routed expert's count, as each has its own A and B."""
    dense = sum(isinstance(m, LoraLinear) for m in model.modules())
    banks = [m for m in model.modules() if isinstance(m, LoraExpertBank)]
    text = f"{dense} projections"
    if banks:
        per_expert = sum(a.shape[0] for b in banks for a in b.lora_A.values())
        text += f" and {per_expert} routed-expert projections ({len(banks)} layers' experts)"
    return text


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapters only: the frozen base must never enter the optimizer (nor its state)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    stray = [n for n in names if ".lora_" not in n]
    if stray:
        raise RuntimeError(f"LoRA: non-adapter parameters would train: {stray[:5]}")
    return [p for p in model.parameters() if p.requires_grad]


class LoraStage(SFTStage):
    """LoRA fine-tuning on SFT shards: rank-r adapters on chosen projections, base weights frozen."""

    name = "lora"
    data_kind = "sft"

    def __init__(self, args: argparse.Namespace):
        super().__init__(args)
        check_lora_flags(args)  # before the model is loaded

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        add_lora_arguments(parser)

    def setup(self, model: MiniMindForCausalLM) -> None:
        add_adapters(self.args, model, self.resume_from)

    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return adapter_parameters(model)


def linear_names(model: nn.Module) -> list[str]:
    """The distinct names of the model's projections: its nn.Linear modules (q_proj, gate_proj, lm_head...)
    and, in an MoE model, the routed experts' stacked gate_proj, up_proj and down_proj."""
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    if any(isinstance(m, ExpertBank) for m in model.modules()):
        names.update(EXPERT_PROJECTIONS)
    return sorted(names)


def check_targets(model: nn.Module, targets: list[str]) -> None:
    """Every target must name at least one nn.Linear of the model (a typo would silently adapt less)."""
    linear = linear_names(model)
    bad = [t for t in targets if t in UNADAPTABLE]
    if bad:
        raise ValueError(f"--lora-targets {' '.join(bad)}: the output head cannot take an adapter "
                         f"(the fused loss reads its weight directly)")
    unknown = [t for t in targets if t not in linear]
    if unknown:
        choices = [n for n in linear if n not in UNADAPTABLE]
        raise ValueError(f"--lora-targets {' '.join(unknown)}: no such projection in the model; "
                         f"choose from {' '.join(choices)}")


# adapter_config.json field -> the flag that sets it
LORA_FLAGS = {"rank": "--lora-rank", "alpha": "--lora-alpha", "dropout": "--lora-dropout",
              "target_modules": "--lora-targets"}


def saved_adapter_config(ckpt: Path) -> dict | None:
    """The adapter settings a checkpoint was trained with (None: it trained without LoRA)."""
    path = ckpt / "model" / ADAPTER_DIR / ADAPTER_CONFIG
    return json.loads(path.read_text()) if path.exists() else None


def check_resumed_adapter(config: LoraConfig, ckpt: Path | None) -> None:
    """Another rank or target set than the checkpoint's cannot load its adapters (DeepSpeed fails with
    a traceback), and another alpha or dropout would silently rescale what it learnt: refused."""
    if ckpt is None:
        return
    saved = saved_adapter_config(ckpt)
    if saved is None:
        raise ValueError(f"{ckpt} was trained without LoRA: resume it without --lora-rank, or start anew "
                         "with --resume none (or another --out)")
    mine = {"rank": config.rank, "alpha": config.alpha, "dropout": config.dropout,
            "target_modules": sorted(config.target_modules)}
    theirs = {**saved, "target_modules": sorted(saved.get("target_modules", []))}
    changed = [f"{LORA_FLAGS[k]} {_flag_value(v)} (the checkpoint's: {_flag_value(theirs.get(k))})"
               for k, v in mine.items() if v != theirs.get(k)]
    if changed:
        raise ValueError(f"{ckpt} holds adapters trained with other settings: {'; '.join(changed)}. Resume "
                         "with the checkpoint's LoRA flags, or start anew with --resume none (or another --out)")


def check_resumed_experts(model: nn.Module, config: LoraConfig, ckpt: Path | None) -> None:
    """A checkpoint from before the routed experts took LoRA holds no expert adapters, so its DeepSpeed
    state cannot fill the ones this run would build: refused with its way out, not DeepSpeed's traceback."""
    if ckpt is None or not any(t in EXPERT_PROJECTIONS for t in config.target_modules):
        return
    if not any(isinstance(m, ExpertBank) for m in model.modules()):
        return
    with safe_open(str(ckpt / "model" / ADAPTER_DIR / ADAPTER_WEIGHTS), "pt") as saved:
        if any(is_expert_adapter_key(k) for k in saved.keys()):
            return
    raise ValueError(f"{ckpt} holds no adapters on the MoE routed experts (trained before they took LoRA): "
                     "start anew with --resume none (or another --out)")


def check_resumed_base(model: nn.Module, ckpt: Path | None, init: str) -> None:
    """DeepSpeed's state leaves the frozen base out, so a resume rebuilds it from --init: that must still
    be the base the checkpoint trained on (a run directory whose newest checkpoint moved on, or a model
    trained again since, would silently put the adapters on other weights). The checkpoint's model
    directory holds that base, in the training precision."""
    if ckpt is None:
        return
    mine = state_dict_for_saving(model)
    with safe_open(str(ckpt / "model" / WEIGHTS), "pt") as saved:
        same = set(saved.keys()) == set(mine) and all(_equal_in_saved_dtype(v, saved.get_tensor(k))
                                                     for k, v in mine.items())
    if not same:
        raise ValueError(f"--init {init} is not the base model {ckpt} trained its adapters on (its frozen "
                         "weights differ): resume with the --init the run started from, or start anew with "
                         "--resume none (or another --out)")


def _equal_in_saved_dtype(mine: torch.Tensor, saved: torch.Tensor) -> bool:
    return mine.shape == saved.shape and torch.equal(mine.to(saved.dtype), saved)


def _flag_value(value) -> str:
    """A setting as it is typed on the command line (targets space-separated, 16.0 as 16)."""
    if isinstance(value, list):
        return " ".join(map(str, value))
    return f"{value:g}" if isinstance(value, float) else str(value)
