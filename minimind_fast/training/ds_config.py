"""The DeepSpeed JSON config: built from command-line flags, or read from the user's file.

A user's file is the one source of truth for what it sets (batch sizes, ZeRO, precision, clipping);
flags fill in only what it leaves out, and the resolved values are written back to the run's config.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def build_ds_config(*, micro_batch_size: int, grad_accum: int, grad_clip: float, zero_stage: int,
                    dtype: str, user_file: str | None = None) -> dict[str, Any]:
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"--zero-stage must be 0, 1, 2 or 3, got {zero_stage}")
    cfg: dict[str, Any] = {}
    if user_file:
        path = Path(user_file)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: DeepSpeed config file not found")
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    cfg.setdefault("train_micro_batch_size_per_gpu", micro_batch_size)
    cfg.setdefault("gradient_accumulation_steps", grad_accum)
    cfg.setdefault("gradient_clipping", grad_clip)
    zero = cfg.setdefault("zero_optimization", {})
    zero.setdefault("stage", zero_stage)
    if zero["stage"] == 3:
        zero.setdefault("stage3_gather_16bit_weights_on_model_save", True)
    if "bf16" not in cfg and "fp16" not in cfg:
        cfg["bf16"] = {"enabled": dtype == "bf16"}
        cfg["fp16"] = {"enabled": dtype == "fp16", "loss_scale": 0, "initial_scale_power": 16}
    cfg.pop("train_batch_size", None)  # derived by DeepSpeed from micro batch x accumulation x ranks
    cfg.setdefault("zero_allow_untested_optimizer", True)
    cfg.setdefault("steps_per_print", 10**9)
    cfg.setdefault("wall_clock_breakdown", False)
    return cfg


def precision(cfg: dict[str, Any]) -> str:
    if cfg.get("bf16", {}).get("enabled"):
        return "bf16"
    if cfg.get("fp16", {}).get("enabled"):
        return "fp16"
    return "fp32"
