"""The DeepSpeed JSON config: built from command-line flags, or read from the user's file.

A user's file is the one source of truth for what it sets (batch sizes, ZeRO, precision, clipping);
flags fill in only what it leaves out, and the resolved values are written back to the run's config.

The default for bf16 is ZeRO stage 1 with fp32 gradient accumulation, which DeepSpeed runs with its
`BF16_Optimizer`: fp32 master weights and gradients in flat buffers, so the optimizer step is a few
launches over whole buffers. At stage 0, DeepSpeed wraps a bf16 model's optimizer in
`FP16_UnfusedOptimizer`, which works parameter by parameter and reads an overflow flag back to the host
for each one (small-26m: about 2,000 ops and 227 host syncs per step against about 350 and 6; counted
by `tests/test_ds_config.py`). For a small model, whose step is bound by the host's launches, that
is most of the step.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any


def default_zero_stage(dtype: str) -> int:
    """ZeRO stage when neither the flag nor the user's file names one (see the module's docstring)."""
    return 1 if dtype == "bf16" else 0


def build_ds_config(*, micro_batch_size: int, grad_accum: int, grad_clip: float, zero_stage: int | None,
                    dtype: str, user_file: str | None = None, world_size: int = 1) -> dict[str, Any]:
    if zero_stage is not None and zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"--zero-stage must be 0, 1, 2 or 3, got {zero_stage}")
    cfg = read_user_file(Path(user_file)) if user_file else {}
    cfg.setdefault("train_micro_batch_size_per_gpu", micro_batch_size)
    cfg.setdefault("gradient_accumulation_steps", grad_accum)
    cfg.setdefault("gradient_clipping", grad_clip)
    fill_precision(cfg, dtype)
    zero = cfg.setdefault("zero_optimization", {})
    zero.setdefault("stage", default_zero_stage(precision(cfg)) if zero_stage is None else zero_stage)
    if zero["stage"] not in (0, 1, 2, 3):
        raise ValueError(f"{user_file}: zero_optimization.stage must be 0, 1, 2 or 3, got {zero['stage']!r}")
    if zero["stage"] == 3:
        zero.setdefault("stage3_gather_16bit_weights_on_model_save", True)
    if precision(cfg) == "bf16" and zero["stage"] == 1:
        cfg.setdefault("data_types", {}).setdefault("grad_accum_dtype", "fp32")
    # Derived by DeepSpeed from micro batch x accumulation x ranks: a file's own value must agree.
    total = cfg.pop("train_batch_size", "auto")
    derived = cfg["train_micro_batch_size_per_gpu"] * cfg["gradient_accumulation_steps"] * world_size
    if total not in ("auto", derived):
        raise ValueError(f"{user_file}: train_batch_size {total!r} is not train_micro_batch_size_per_gpu x "
                         f"gradient_accumulation_steps x {world_size} rank(s) = {derived}: set those two instead")
    cfg.setdefault("zero_allow_untested_optimizer", True)
    cfg.setdefault("steps_per_print", 10**9)
    cfg.setdefault("wall_clock_breakdown", False)
    if user_file:
        check_with_deepspeed(cfg, user_file)
    return cfg


def fill_precision(cfg: dict[str, Any], dtype: str) -> None:
    """--dtype where the file enables no precision: a section it has without `enabled` (or with it
    false for the other precision, as templates write `"fp16": {"enabled": false}`) leaves that to the
    flag, as every other setting it leaves out; one it enables, or this one disabled, wins."""
    chosen_by_file = precision(cfg) != "fp32"
    for key in ("bf16", "fp16"):
        cfg.setdefault(key, {}).setdefault("enabled", not chosen_by_file and dtype == key)
    if precision(cfg) == "fp16":
        cfg["fp16"].setdefault("loss_scale", 0)  # dynamic loss scaling
        cfg["fp16"].setdefault("initial_scale_power", 16)


# DeepSpeed's pydantic models -> the section of the JSON they read, to name the field in the user's terms.
SECTIONS = {"DeepSpeedZeroConfig": "zero_optimization", "DeepSpeedBF16Config": "bf16",
            "DeepSpeedFP16Config": "fp16", "CompileConfig": "compile", "HybridEngineConfig": "hybrid_engine"}


def check_with_deepspeed(cfg: dict[str, Any], user_file: str) -> None:
    """Parse the resolved config as `deepspeed.initialize` will, so that a value it refuses is a
    ValueError naming the file and field before the model is built, not a traceback from inside
    DeepSpeed (an assertion, or pydantic's report naming neither the file nor the section)."""
    from deepspeed.runtime.config import DeepSpeedConfig
    from pydantic import ValidationError

    try:
        DeepSpeedConfig(copy.deepcopy(cfg))
    except ValidationError as e:
        section = SECTIONS.get(e.title, e.title)
        fields = "; ".join(f"{'.'.join([section, *map(str, err['loc'])])}: {err['msg']} "
                           f"(got {err.get('input')!r})" for err in e.errors())
        raise ValueError(f"{user_file}: {fields}") from None
    except (AssertionError, ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{user_file}: DeepSpeed refuses it: {e}") from None


def read_user_file(path: Path) -> dict[str, Any]:
    """The user's DeepSpeed JSON, with the shape of what the engine reads from it checked (ValueError
    naming the file), so a malformed file fails here and not as a traceback inside DeepSpeed."""
    if path.is_dir():
        raise ValueError(f"{path}: a directory, not a DeepSpeed config file (JSON)")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: DeepSpeed config file not found")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: a DeepSpeed config is a JSON object, got {type(cfg).__name__}")
    for key in ("optimizer", "scheduler"):
        if key in cfg:
            raise ValueError(f"{path}: '{key}' would not be used: the engine builds the optimizer (--optimizer) "
                             "and its learning-rate schedule from --lr, --muon-lr, --muon-momentum, --betas, "
                             "--weight-decay, --warmup-steps, --lr-schedule, --decay-fraction and --min-lr-ratio")
    for key in ("zero_optimization", "bf16", "fp16", "data_types", "checkpoint"):
        if key in cfg and not isinstance(cfg[key], dict):
            raise ValueError(f"{path}: '{key}' must be a JSON object, got {cfg[key]!r}")
    check_checkpoint_loading(cfg, path)
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        value = cfg.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{path}: '{key}' must be a positive integer, got {value!r}")
    # DeepSpeed reads it unchecked: a string fails at the first optimizer step, a negative one
    # silently turns clipping off.
    clip = cfg.get("gradient_clipping", 0.0)
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not 0 <= clip < float("inf"):
        raise ValueError(f"{path}: 'gradient_clipping' must be a number >= 0 (0: no clipping), got {clip!r}")
    return cfg


def check_checkpoint_loading(cfg: dict[str, Any], path: Path) -> None:
    """Resume loads DeepSpeed's files weights-only through its default checkpoint engine
    (training/weights_only.py). These settings swap that engine (and, for the writer, fail inside DeepSpeed
    on a single machine) or read universal checkpoints with a full unpickle, which can run code."""
    unsafe = [f"checkpoint.{key}" for key in ("writer", "load_universal") if cfg.get("checkpoint", {}).get(key)]
    if cfg.get("datastates_ckpt", False) is not False:  # DeepSpeed's own test: any value but false enables it
        unsafe.append("datastates_ckpt")
    if unsafe:
        raise ValueError(f"{path}: '{unsafe[0]}' is not supported: minimind_fast resumes through DeepSpeed's "
                         "default checkpoint engine, whose loads it makes weights-only; leave it out")


def precision(cfg: dict[str, Any]) -> str:
    if cfg.get("bf16", {}).get("enabled"):
        return "bf16"
    if cfg.get("fp16", {}).get("enabled"):
        return "fp16"
    return "fp32"


def optimizer_layout(cfg: dict[str, Any], optimizer: str = "adamw") -> dict[str, Any]:
    """What a DeepSpeed checkpoint's optimizer state depends on: resuming under another layout fails
    inside DeepSpeed with a missing-file error (or a KeyError: another precision at ZeRO 0), so
    checkpoints record it and resume compares. The optimizer is recorded when it is not AdamW (whose
    state holds no momentum buffers Muon could read, and the reverse), so that checkpoints from before
    the record, all AdamW, still compare equal."""
    layout = {"zero_stage": cfg["zero_optimization"]["stage"],
              "grad_accum_dtype": cfg.get("data_types", {}).get("grad_accum_dtype"), "precision": precision(cfg)}
    if optimizer != "adamw":
        layout["optimizer"] = optimizer
    return layout


def describe_layout(layout: dict[str, Any], with_precision: bool = False) -> str:
    accum = layout.get("grad_accum_dtype")
    return (f"ZeRO {layout['zero_stage']}" + (f" with {accum} gradient accumulation" if accum else "")
            + (f" in {layout.get('precision')}" if with_precision else ""))
