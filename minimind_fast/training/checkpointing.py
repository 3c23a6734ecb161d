"""Checkpoints: DeepSpeed's sharded state, consolidated weights, loader positions and RNG states.

Layout of one checkpoint, `RUN/checkpoints/step_NNNNNNNN/`:
    deepspeed/          DeepSpeed's own (model, optimizer, scheduler, loss scale; sharded under ZeRO);
                        loads weights_only (minimind_fast.training.weights_only)
    model/              a model directory (safetensors + model_config.json + tokenizer): what later
                        stages, chat and export load; with LoRA, the frozen base weights (unmerged)
                        and the adapter in model/adapter/ (see minimind_fast.lora); a stage's own
                        modules (PPO's value head, the reward head) in their own file there, never in
                        the model's
    rank_R.pt           rank R's loader position and RNG states (tensors only: loads weights_only)
    trainer_state.json  step, tokens seen, bad-step count
    COMPLETE            written last: only checkpoints holding it are resumed from
Every rank writes into `step_NNNNNNNN.tmp/`; once all have finished, rank 0 renames it and writes
COMPLETE, so a crash mid-save leaves the previous checkpoint as the newest complete one.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

from minimind_fast.checkpoint import MARKER, complete_checkpoints, save_model_dir, state_dict_for_saving
from minimind_fast.files import apply_umask

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

    from minimind_fast.model import MiniMindForCausalLM
    from minimind_fast.training.stages import Stage



def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}"


def checkpoint_step(ckpt: Path) -> int:
    return int(ckpt.name.removeprefix("step_"))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
             "numpy_rest": json.dumps([int(np_state[2]), int(np_state[3]), float(np_state[4])]),
             "python": json.dumps(random.getstate())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    pos, has_gauss, cached = json.loads(state["numpy_rest"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    py = json.loads(state["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))


def consolidated_state_dict(engine: DeepSpeedEngine) -> dict[str, torch.Tensor] | None:
    """Full weights on rank 0 (gathered from the ZeRO-3 partitions when needed), None elsewhere.

    LoRA adapters are included (under their `.lora_` keys): `save_checkpoint` splits them off."""
    if engine.zero_optimization_stage() == 3:
        state = engine._zero3_consolidated_16bit_state_dict()
        return {k: v.detach().cpu() for k, v in state.items()} if state is not None else None
    return None if dist.get_rank() else state_dict_for_saving(engine.module)


def save_model_and_adapter(module: MiniMindForCausalLM, out: Path, state: dict[str, torch.Tensor],
                           tokenizer_dir: Path | None) -> None:
    """The model directory; under LoRA the frozen base weights there and the adapter in out/adapter/."""
    from minimind_fast.lora import ADAPTER_DIR, save_lora, split_adapters

    base, adapters = split_adapters(state)
    save_model_dir(module, out, tokenizer_dir=tokenizer_dir, state_dict=base)
    if adapters:
        save_lora(module, out / ADAPTER_DIR, state=adapters)


def has_frozen(engine: DeepSpeedEngine) -> bool:
    return any(not p.requires_grad for p in engine.module.parameters())


def save_checkpoint(engine: DeepSpeedEngine, stage: Stage, run_dir: Path, step: int, loader_state: dict,
                    trainer_state: dict, tokenizer_dir: Path | None, keep_last: int) -> Path:
    """Write checkpoint `step` atomically (collective: every rank must call it)."""
    rank = dist.get_rank()
    final = step_dir(run_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    # Frozen weights (a LoRA base) are the --init model's, rebuilt on resume: DeepSpeed's state keeps
    # only what trains, so a LoRA checkpoint costs the adapters and their optimizer state.
    engine.save_checkpoint(str(tmp / "deepspeed"), tag="state", exclude_frozen_parameters=has_frozen(engine))
    torch.save({"loader": json.dumps(loader_state), "rng": rng_state()}, tmp / f"rank_{rank}.pt")
    state = consolidated_state_dict(engine)
    if rank == 0:
        state, own = stage.split_weights(state)
        save_model_and_adapter(engine.module, tmp / "model", state, tokenizer_dir)
        if own:
            stage.save_own_weights(own, tmp / "model")
        stage.save_extra(engine.module, tmp)
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **trainer_state}, indent=2))
    dist.barrier()
    if rank == 0:
        apply_umask(tmp)  # safetensors writes 0600: keep the checkpoint readable as the umask allows
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        (final / MARKER).write_text(f"step {step}\n")
        prune_checkpoints(run_dir, keep_last)
    dist.barrier()
    return final


def prune_checkpoints(run_dir: Path, keep_last: int) -> None:
    """Remove all but the newest `keep_last` complete checkpoints (0: keep all). The marker goes first:
    a kill midway leaves an incomplete checkpoint, which nothing resumes from or loads, and which goes
    with the other incomplete ones (a killed save's) older than the newest complete checkpoint."""
    complete = complete_checkpoints(run_dir)
    for old in complete[:-keep_last] if keep_last > 0 else []:
        (old / MARKER).unlink(missing_ok=True)
        shutil.rmtree(old, ignore_errors=True)
    if not complete:
        return
    newest = checkpoint_step(complete[-1])
    for left in (run_dir / "checkpoints").iterdir():
        found = re.fullmatch(r"step_(\d+)(\.tmp)?", left.name)
        if found and int(found[1]) < newest and not (left / MARKER).exists():
            shutil.rmtree(left, ignore_errors=True)


def read_rank_state(ckpt: Path, rank: int) -> dict:
    """This rank's part of a checkpoint: {"loader": its position, "rng": its RNG states}."""
    rank_file = ckpt / f"rank_{rank}.pt"
    if not rank_file.exists():
        raise FileNotFoundError(f"{rank_file}: missing (was the checkpoint written with another world size?)")
    saved = torch.load(rank_file, weights_only=True)
    return {"loader": json.loads(saved["loader"]), "rng": saved["rng"]}


def load_checkpoint(engine: DeepSpeedEngine, ckpt: Path, rank_state: dict) -> list[str]:
    """Restore DeepSpeed's state and this rank's RNG states (`read_rank_state`); returns the optimizer settings
    this run changes (`keep_hyperparameters`). The trainer state (trainer_state.json) the caller has read."""
    from minimind_fast.training.weights_only import use_weights_only

    use_weights_only(engine)  # DeepSpeed's own load would unpickle its files in full, running any code in them
    scheduler = engine.lr_scheduler
    ours = [{k: v for k, v in g.items() if k != "params"} for g in scheduler.optimizer.param_groups]
    load_path, _ = engine.load_checkpoint(str(ckpt / "deepspeed"), tag="state",
                                          load_module_strict=not has_frozen(engine))
    if load_path is None:
        raise RuntimeError(f"{ckpt}: DeepSpeed could not load its state")
    set_rng_state(rank_state["rng"])
    changed = keep_hyperparameters(scheduler, ours) + keep_grad_clip(engine)
    return changed


def keep_hyperparameters(scheduler: torch.optim.lr_scheduler.LambdaLR, ours: list[dict]) -> list[str]:
    """Put this run's optimizer settings (peak lr, betas, weight decay, momentum: `ours`, each group's before
    the load) back over the checkpoint's, keeping its state (moments, step counts, schedule position).

    Loading restores the checkpoint's groups and the schedule's base rates, so without this a resume with
    another --lr would silently train at the old one while config.json recorded the new. The flags win, as
    --steps and --lr-schedule already do; returns what changed ("lr 0.003 -> 0.001"), empty for a plain resume."""
    groups = scheduler.optimizer.param_groups
    if len(groups) != len(ours):
        raise RuntimeError(f"the checkpoint's optimizer has {len(groups)} parameter groups and this run "
                           f"{len(ours)}")
    changed: dict[str, list[tuple[int, object, object]]] = {}
    for i, (group, mine) in enumerate(zip(groups, ours)):
        for key, value in mine.items():
            if key == "lr":  # this step's rate, set below from the peak ("initial_lr") and the schedule
                continue
            # A key the checkpoint lacks is torch's newer default (written by another release), not a change.
            if key in group and group[key] != value:
                changed.setdefault("lr" if key == "initial_lr" else key, []).append((i, group.get(key), value))
            group[key] = value
    # Rates of the step about to run, from this run's peak rates and schedule.
    scheduler.base_lrs = [g["initial_lr"] for g in groups]
    for group, base, factor in zip(groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(scheduler.last_epoch)
    return [_describe_change(name, changes) for name, changes in sorted(changed.items(), key=lambda c: c[0] != "lr")]


def keep_grad_clip(engine: DeepSpeedEngine) -> list[str]:
    """Put this run's clipping threshold (--grad-clip, or its --deepspeed-config's gradient_clipping) back
    on the optimizer that clips; returns what changed, as `keep_hyperparameters` does.

    DeepSpeed's BF16_Optimizer (bf16's default ZeRO 1) and its ZeRO 1/2 optimizer save their threshold and
    restore it on load, so a resume with another --grad-clip clipped at the old one; the engine itself (ZeRO
    0 in fp32) and its other wrappers read the config's."""
    clipping = engine.optimizer
    ours = engine.gradient_clipping()
    if not hasattr(clipping, "clip_grad") or clipping.clip_grad == ours:
        return []
    old, clipping.clip_grad = clipping.clip_grad, ours
    return [f"grad_clip {old} -> {ours}"]


def _describe_change(name: str, changes: list[tuple[int, object, object]]) -> str:
    if len({(old, new) for _, old, new in changes}) == 1:
        return f"{name} {changes[0][1]} -> {changes[0][2]}"
    return ", ".join(f"{name} {old} -> {new} (group {i})" for i, old, new in changes)
