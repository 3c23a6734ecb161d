"""The training engine: one loop on DeepSpeed for every stage.

`train(stage, args)` sets up distributed state (DeepSpeed's launcher, torchrun or a plain single
process, on CUDA or the CPU), checks every input before the first step, builds the model through the
stage, wraps it with `deepspeed.initialize`, resumes from the newest complete checkpoint, and runs
optimizer steps with metrics, evaluation, periodic checkpoints and a clean stop on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import gc
import json
import math
import os
import random
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from minimind_fast.checkpoint import CONFIG, RUNTIME_FIELDS
from minimind_fast.config import SHAPE_FIELDS, ModelConfig
from minimind_fast.data.mixture import DataSource, MixtureLoader, data_argument, data_label
from minimind_fast.evaluation import perplexity
from minimind_fast.files import DirectoryBusy, locked_directory, write_text_whole
from minimind_fast.ops import check_kernels
from minimind_fast.training import checkpointing
from minimind_fast.training.ds_config import build_ds_config, describe_layout, optimizer_layout, precision
from minimind_fast.training.flops import peak_flops
from minimind_fast.training.metrics import MetricsLogger, memory_mb
from minimind_fast.training.optim import MuonWithAdamW, check_muon_zero_stage, muon_parameters, split_muon_groups
from minimind_fast.training.profiling import WARMUP_STEPS, StepProfiler
from minimind_fast.training.schedule import lr_factor
from minimind_fast.training.stages import Stage, to_device

STOP_CHECK_EVERY = 5  # steps between the ranks' agreement on a stop or a timed save (multi-rank runs)
RUN_LOCK = ".train.lock"  # flock'ed in --out by rank 0 of the run writing there, removed when it ends


class TrainingError(RuntimeError):
    """A problem found before or during training, with a message meant for the user."""


def seed_everything(seed: int) -> None:
    """Seed torch (every device) and the global generators of Python and NumPy: a user's reward function
    drawing from `random` or `np.random` then repeats with the run's --seed (a resume restores all three
    from the checkpoint)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SHM_OP = "deepspeed_shm_comm"  # the op DeepSpeed builds on its first CPU start (about a minute)
STALE_BUILD_LOCK_S = 900


def clear_stale_build_lock(name: str = SHM_OP, max_age_s: float = STALE_BUILD_LOCK_S) -> bool:
    """torch builds an extension under a lock file and every other start waits until it goes; a build
    killed midway (Ctrl-C on a first run, a timeout) leaves it, and every later start hangs without a
    word. A lock older than any build is removed, saying so. True if one was."""
    from torch.utils.cpp_extension import _get_build_directory

    lock = Path(_get_build_directory(name, False)) / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return False
    if age < max_age_s:
        return False
    print(f"removing {lock}: left {age / 60:.0f} min ago by a build of DeepSpeed's {name} op that did not "
          f"finish; every start would wait on it", file=sys.stderr, flush=True)
    lock.unlink(missing_ok=True)
    return True


def setup_distributed() -> tuple[int, int, torch.device]:
    """Initialise torch.distributed through DeepSpeed (a world of one when no launcher set it up)."""
    import deepspeed

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        _share_cpu_threads()
        clear_stale_build_lock()
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def _share_cpu_threads() -> None:
    """Give each local rank its share of the cores: torch's default (all cores per process) oversubscribes
    the CPU as soon as the launcher starts several ranks on one machine. OMP_NUM_THREADS still wins."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    local_ranks = int(os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or 1)
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local_ranks))


def check_out_apart_from_data(run_dir: Path, data: Path | list[DataSource], val_data: str | None) -> None:
    """Refuse a run directory that is, or is inside, a shard directory it reads: its checkpoints, final/
    and metrics would sit among the shards, a later tokenize.py or copy of the data carrying them along
    (a prompts file, GRPO's and PPO's --data, is no directory and cannot hold one)."""
    out = run_dir.resolve()
    sources = [("--data", d if isinstance(d, Path) else d.path) for d in (data if isinstance(data, list) else [data])]
    if val_data:
        sources.append(("--val-data", Path(val_data)))
    for flag, directory in sources:
        where = directory.resolve()
        if not where.is_dir():
            continue
        if out == where:
            raise TrainingError(f"--out {run_dir} is {flag}'s shard directory: choose a run directory apart "
                                f"from the data")
        if where in out.parents:
            raise TrainingError(f"--out {run_dir} is inside {flag}'s shard directory {directory}: choose a run "
                                f"directory apart from the data")


def check_output_dir(run_dir: Path) -> Path | None:
    """Make `run_dir` and check that it takes a file. Returns the outermost directory this made (None when
    `run_dir` was there), for `remove_made_dirs` to take away again if the start is refused."""
    if run_dir.exists() and not run_dir.is_dir():  # mkdir's own word for it is "File exists"
        raise TrainingError(f"--out {run_dir}: exists and is not a directory")
    made = next((d for d in reversed([run_dir, *run_dir.parents]) if not d.exists()), None)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise TrainingError(f"output directory {run_dir} is not writable: {e}") from None
    return made


def remove_made_dirs(run_dir: Path, made: Path | None) -> None:
    """Undo `check_output_dir` after a refused start: `run_dir` and its parents up to `made`, each only while
    empty (rmdir removes nothing else), so a start that wrote nothing leaves no directory behind."""
    if made is None:
        return
    for directory in [run_dir, *run_dir.parents]:
        try:
            directory.rmdir()
        except OSError:  # not empty (another rank, or anything written), or gone already
            return
        if directory == made:
            return


def resolve_dtype(args: argparse.Namespace, device: torch.device) -> str:
    if args.dtype != "auto":
        if args.dtype == "fp16" and device.type == "cpu":
            raise TrainingError("--dtype fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
        return args.dtype
    return "bf16" if device.type == "cuda" else "fp32"


def all_true(flag: bool, device: torch.device) -> bool:
    if dist.get_world_size() == 1:
        return flag
    t = torch.tensor([0.0 if flag else 1.0], device=device)
    dist.all_reduce(t)
    return t.item() == 0


class StopRequest:
    """SIGTERM/SIGINT set a flag; the loop checkpoints at the next step boundary and exits."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = True


class Trainer:
    def __init__(self, stage: Stage, args: argparse.Namespace):
        self.stage, self.args = stage, args
        self.run_dir = Path(args.out)
        self.rank, self.world, self.device = setup_distributed()
        self.is_main = self.rank == 0
        seed_everything(args.seed + self.rank)
        self._made_dir: Path | None = None
        self._run_lock = contextlib.ExitStack()
        try:
            self._prepare()
        except BaseException:
            self.release_run_dir()
            remove_made_dirs(self.run_dir, self._made_dir)
            raise

    # --- set-up: every check happens here, before the first step ----------------------------
    def _prepare(self) -> None:
        a = self.args
        data = data_argument(a.data)  # a Path, or several sources to mix
        check_out_apart_from_data(self.run_dir, data, a.val_data)
        self._made_dir = check_output_dir(self.run_dir)
        self._lock_run_dir()
        check_kernels(a.kernels, self.device.type)
        self.manifest = self.stage.open_data(data)
        self.tokenizer_dir = self.stage.tokenizer_dir(self.manifest)  # what checkpoints carry; checked now
        self.resume_from = self._checkpoint_to_resume()
        # Read once: the stage check and the optimizer layout need the run's record; the start step, the layout
        # and the resume the checkpoint's trainer state.
        self.resume_record = read_run_record(self.resume_from) if self.resume_from else {}
        self.resume_state = read_json_object(self.resume_from / "trainer_state.json") if self.resume_from else {}
        self._refuse_other_stage()
        self.start_step = self._start_step()
        self._refuse_later_checkpoints()
        self.ds_config = self._deepspeed_config()
        # The loaders read the flags, and a --deepspeed-config file's batch shape wins over them; so does its
        # clipping, which config.json's args then record as trained.
        a.micro_batch_size = self.ds_config["train_micro_batch_size_per_gpu"]
        a.grad_accum = self.ds_config["gradient_accumulation_steps"]
        a.grad_clip = self.ds_config["gradient_clipping"]
        self.dtype = precision(self.ds_config)
        if self.dtype == "fp16" and self.device.type == "cpu":  # else DeepSpeed fails, naming no file
            raise TrainingError(f"{a.deepspeed_config}: fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
        self.stage.zero_stage = self.ds_config["zero_optimization"]["stage"]
        self.stage.precision = self.dtype
        self.stage.resume_from = self.resume_from
        model = self.stage.build_model(self.manifest)
        self._check_resumed_model(model.config)
        self.stage.setup(model)
        self.config = model.config
        self.flops_per_token = self.stage.flops_per_token(model)  # for MFU: the stage's adapters, reference...
        self.device_peak = peak_flops(self.device)  # dense bf16 FLOP/s, None where unknown (a CPU)
        if a.seq_len > self.config.max_position_embeddings:
            raise TrainingError(f"--seq-len {a.seq_len} exceeds the model's context length "
                                f"{self.config.max_position_embeddings} (max_position_embeddings)")
        self.loader = self.stage.build_loader(data, split="train", rank=self.rank, world_size=self.world,
                                              vocab_size=self.config.vocab_size,
                                              pin_memory=self.device.type == "cuda")
        if self.resume_from is not None:
            # A position over other data or settings is refused here, before a stage's own set-up work
            # (DPO's reference scoring) is spent on a run that cannot resume.
            self.rank_state = checkpointing.read_rank_state(self.resume_from, self.rank)
            self.loader.load_state_dict(self.rank_state["loader"])
        self.stage.prepare_training(self.loader, self.config.vocab_size)
        self.val_loader = None
        self._warned_empty_eval: set[str] = set()
        if a.eval_every > 0:
            try:
                self.val_loader = self.stage.build_loader(Path(a.val_data) if a.val_data else data, split="val",
                                                          rank=self.rank, world_size=self.world,
                                                          vocab_size=self.config.vocab_size)
            except ValueError as e:
                if a.val_data:
                    raise
                self._note(f"no evaluation: {e}")
        self.grad_accum = self.ds_config["gradient_accumulation_steps"]
        self.micro_batch = self.ds_config["train_micro_batch_size_per_gpu"]
        self.tokens_per_step = self.micro_batch * a.seq_len * self.grad_accum * self.world
        self.total_steps = a.steps or max(1, math.ceil(
            a.epochs * self.loader.n_items * self.stage.items_tokens(self.loader)
            / self.tokens_per_step))
        self._check_steps()
        self._old_final = self._final_to_drop()
        self.engine = self._wrap(model)

    def _lock_run_dir(self) -> None:
        """Refuse an --out another training is writing (a command run again while the first still trains, two
        scheduler jobs): both would write checkpoints, metrics.jsonl and final/ there. Rank 0 holds the lock
        for the whole run and tells every rank whether it got it, so that the ranks of one run, starting at
        different moments, never refuse each other, and all of a refused run stop. The kernel drops the lock
        of a killed run: --resume auto after a crash finds the directory free."""
        def lock() -> str:
            try:
                self._run_lock.enter_context(locked_directory(self.run_dir, RUN_LOCK, "--out"))
            except DirectoryBusy as e:
                return f"{e}. A training stopped with SIGTERM or Ctrl-C saves a checkpoint that --resume auto continues"
            except ValueError as e:  # no lock file could be made there
                return str(e)
            return ""

        if refusal := self._decided_on_main(lock):
            raise TrainingError(refusal)

    def _decided_on_main(self, decide: Callable[[], str]) -> str:
        """`decide()` run on rank 0 alone (it takes a lock, or reads files every rank would read alike), its
        answer (a refusal, "" for none) told to every rank, so that all of them go on or stop together."""
        said = [decide() if self.is_main else ""]
        if self.world > 1:
            dist.broadcast_object_list(said, src=0)
        return said[0]

    def release_run_dir(self) -> None:
        """Give up the lock on --out (rank 0; a no-op elsewhere or when done already)."""
        self._run_lock.close()

    def _deepspeed_config(self) -> dict:
        """From flags or the user's file; a resumed run keeps its checkpoint's optimizer layout."""
        a = self.args
        saved = self._saved_layout()
        zero_stage = a.zero_stage
        if zero_stage is None and not a.deepspeed_config and saved:
            zero_stage = saved["zero_stage"]
        if zero_stage is None and a.optimizer == "muon":  # a --deepspeed-config's own stage still wins
            zero_stage = 0
        dtype = resolve_dtype(a, self.device)
        kept = saved.get("precision") if saved else None
        if a.dtype == "auto" and not a.deepspeed_config and kept and not (kept == "fp16" and self.device.type == "cpu"):
            dtype = kept  # as the ZeRO stage: a run moved between a CPU (auto: fp32) and a GPU (auto: bf16)
        cfg = build_ds_config(micro_batch_size=a.micro_batch_size, grad_accum=a.grad_accum, grad_clip=a.grad_clip,
                              zero_stage=zero_stage, dtype=dtype, user_file=a.deepspeed_config, world_size=self.world)
        layout = optimizer_layout(cfg, a.optimizer)
        was = saved.get("optimizer", "adamw") if saved else a.optimizer
        if was != a.optimizer:
            raise TrainingError(f"{self.resume_from} was trained with --optimizer {was} and this run asks for "
                                f"--optimizer {a.optimizer}: their states differ (Adam's moments, Muon's momentum); "
                                f"resume with --optimizer {was}, or start anew with --resume none")
        if a.optimizer == "muon":
            check_muon_zero_stage(cfg["zero_optimization"]["stage"])
        if saved and "precision" not in saved:  # unknown for a checkpoint that predates its record
            layout = {k: v for k, v in layout.items() if k != "precision"}
        if saved and saved != layout:
            other_precision = saved.get("precision") != layout.get("precision")
            raise TrainingError(f"{self.resume_from} was written under {describe_layout(saved, other_precision)} "
                                f"and this run asks for {describe_layout(layout, other_precision)}: resume with the "
                                f"same --zero-stage / --dtype / --deepspeed-config, or start anew with --resume none")
        return cfg

    def _wrap(self, model):
        import deepspeed

        from minimind_fast.training.weights_only import use_weights_only

        a = self.args
        groups = self.stage.parameter_groups(model, a.lr, a.weight_decay)
        if not groups:
            raise TrainingError(f"the {self.stage.name} stage has no trainable parameters")
        optimizer = self._optimizer(model, groups)
        total, warmup, floor = self.total_steps, a.warmup_steps, a.min_lr_ratio
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, total, warmup, floor, a.lr_schedule, a.decay_fraction))
        if self.ds_config["zero_optimization"]["stage"] == 3:
            # The fused loss reads the tied output weight outside the module that owns it.
            deepspeed.zero.register_external_parameter(model, model.lm_head.weight)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                               config=self.ds_config)
        # Here, not only on resume: a config whose checkpoints could not be resumed safely fails before training.
        use_weights_only(engine)
        if a.compile:
            # reduce-overhead replays forward and backward as CUDA graphs: a small model's step is
            # otherwise bound by the host's kernel launches, not by the GPU.
            engine.compile(compile_kwargs={} if a.compile_mode == "default" else {"mode": a.compile_mode})
        return engine

    def _optimizer(self, model, groups: list[dict]) -> torch.optim.Optimizer:
        """AdamW over the stage's groups, or Muon for the hidden matrices (optim.py) and AdamW for the rest."""
        a = self.args
        # One kernel over all parameters: on the CPU too (2.8x faster than the per-op path for small-26m).
        fused = self.device.type in ("cuda", "cpu")
        if a.optimizer == "adamw":
            return torch.optim.AdamW(groups, lr=a.lr, betas=tuple(a.betas), fused=fused)
        adapters = [n for n, p in model.named_parameters() if p.requires_grad and ".lora_" in n]
        if adapters:
            raise TrainingError(f"--optimizer muon does not train LoRA adapters ({adapters[0]}, ...): a rank-r "
                                "factor is no hidden matrix to orthogonalise; use --optimizer adamw")
        muon_ids = muon_parameters(model)
        if not muon_ids:
            raise TrainingError(f"--optimizer muon: the {self.stage.name} stage trains no hidden matrix")
        groups = split_muon_groups(groups, muon_ids, a.muon_lr, a.muon_weight_decay)
        return MuonWithAdamW(groups, lr=a.lr, momentum=a.muon_momentum, betas=tuple(a.betas), fused=fused)

    def _note(self, text: str) -> None:
        if self.is_main:
            print(text, flush=True)

    def _write_run_files(self) -> None:
        if not self.is_main:
            return
        run = {"stage": self.stage.name, "args": vars(self.args), "model_config": self.config.to_dict(),
               "deepspeed_config": self.ds_config, "world_size": self.world, "device": str(self.device),
               "precision": self.dtype, "tokens_per_step": self.tokens_per_step, "total_steps": self.total_steps,
               "versions": {"torch": torch.__version__, "python": sys.version.split()[0]},
               "argv": sys.argv}
        _write_json(self.run_dir / "config.json", run)
        m = self.manifest
        stats = {k: m.get(k) for k in ("kind", "vocab_size", "tokenizer_fingerprint", "seq_len", "sources",
                                        "skipped")}
        stats["splits"] = {s: {"tokens": v["tokens"], "docs": v["docs"], "shards": len(v["shards"])}
                           for s, v in m["splits"].items()}
        if "mixture" in m:  # several --data sources: each with its weight and counts
            stats["mixture"] = m["mixture"]
        _write_json(self.run_dir / "dataset_stats.json", stats)

    # --- resume ---------------------------------------------------------------------------
    def _checkpoint_to_resume(self) -> Path | None:
        a = self.args
        if a.resume == "none":
            return None
        ckpt = checkpointing.latest_checkpoint(self.run_dir) if a.resume == "auto" else Path(a.resume)
        if ckpt is not None and not ckpt.exists():
            raise TrainingError(f"--resume {ckpt}: no such file or directory (auto, none, a run directory or "
                                "one of its checkpoints/step_* directories)")
        if ckpt is not None and (ckpt / "checkpoints").is_dir():  # a run directory: its newest checkpoint
            newest = checkpointing.latest_checkpoint(ckpt)
            if newest is None:
                raise TrainingError(f"--resume {ckpt}: the run directory holds no complete checkpoint")
            ckpt = newest
        if ckpt is not None and not (ckpt / checkpointing.MARKER).exists():
            raise TrainingError(f"--resume {ckpt}: not a complete checkpoint (no {checkpointing.MARKER} marker)")
        return ckpt

    def _refuse_other_stage(self) -> None:
        """A checkpoint another stage wrote (named in its run's config.json) is not this run's to resume:
        its weights start a new run through --init. Later checks would refuse it too, but by a loader
        or objective mismatch that names neither the checkpoint nor what to do. A checkpoint copied out
        of its run has no record: the loader's and objective's checks still apply."""
        ckpt, stage = self.resume_from, self.resume_record.get("stage")
        if stage and stage != self.stage.name:
            flag = "--resume auto: " if self.args.resume == "auto" else "--resume "
            raise TrainingError(f"{flag}{ckpt}: a checkpoint of a {stage} run, and this {self.stage.name} run cannot "
                                f"resume it: start from its weights with --init, in another --out")

    def _start_step(self) -> int:
        return self.resume_state["step"] if self.resume_from is not None else 0

    def _check_steps(self) -> None:
        """A resumed run must have steps left to train (a smaller --steps would otherwise do nothing,
        silently, and write no final/), --stop-at-step must come after its start, and --profile-steps
        must have a step to profile after the warm-up."""
        a, start = self.args, self.start_step
        if start > self.total_steps:
            raise TrainingError(f"{self.resume_from} is at step {start}, past this run's {self.total_steps} steps: "
                                "raise --steps, or start anew in another --out")
        if a.stop_at_step is not None and a.stop_at_step <= start:
            raise TrainingError(f"--stop-at-step {a.stop_at_step} is not after the step this run resumes from "
                                f"({start})")
        end = min(self.total_steps, a.stop_at_step or self.total_steps)
        if a.profile_steps and start + WARMUP_STEPS >= end:  # else the run ends with no profile.txt, silently
            raise TrainingError(f"--profile-steps {a.profile_steps}: profiling starts after {WARMUP_STEPS} warm-up "
                                f"steps (at step {start + WARMUP_STEPS + 1}) and this run ends at step {end}: "
                                "raise --steps, or drop --profile-steps")

    def _refuse_later_checkpoints(self) -> None:
        """Complete checkpoints in --out past this run's start belong to another run: kept, they would
        become this run's final/, outlive its own under --keep-last, and be what --resume auto picks."""
        start = self.start_step
        later = [c.name for c in checkpointing.complete_checkpoints(self.run_dir)
                 if checkpointing.checkpoint_step(c) > start]
        if later:
            raise TrainingError(f"{self.run_dir / 'checkpoints'} holds {', '.join(later)}, past this run's start "
                                f"(step {start}): use another --out, resume from the newest with --resume auto, "
                                "or remove them")

    def _final_to_drop(self) -> Path | None:
        """final/ of an earlier end of this run, when this one trains on past it. Kept, a stop before the new
        end would leave it beside newer checkpoints as what the run directory loads (chat, --init, convert
        and evaluate take final/ over any checkpoint); `run` removes it before the first step. A final/ that
        no checkpoint holds (this run directory's, or the one resumed from) would be lost: refused."""
        final = self.run_dir / "final"
        if not final.exists() or self.start_step >= self.total_steps:
            return None
        def held() -> str:  # rank 0 alone reads the weights: a model's worth per checkpoint compared
            holders = dict.fromkeys([*([self.resume_from] if self.resume_from else []),
                                     *reversed(checkpointing.complete_checkpoints(self.run_dir))])
            if any(_same_files(final, ckpt / "model") for ckpt in holders):
                return ""
            return (f"{final} holds weights that no checkpoint holds (in {self.run_dir / 'checkpoints'}, or the "
                    f"one this run resumes from), and this run, training on from step {self.start_step}, would "
                    "replace it: move it elsewhere to keep it, or use another --out")

        if refusal := self._decided_on_main(held):
            raise TrainingError(refusal)
        return final

    def _check_resumed_model(self, config: ModelConfig) -> None:
        """The model this run builds must be the one its checkpoint holds: another --preset, --config,
        --vocab-size or --init fails inside DeepSpeed's load (a size mismatch per tensor, after its
        set-up), or, for a field no tensor shows (rope_theta), trains another model on these weights."""
        saved_config = None if self.resume_from is None else self.resume_from / "model" / CONFIG
        if saved_config is None or not saved_config.exists():
            return
        saved, mine = ModelConfig.load(saved_config, SHAPE_FIELDS).to_dict(), config.to_dict()
        differ = [f"{k} {saved.get(k)!r} -> {mine.get(k)!r}" for k in sorted(saved.keys() | mine.keys())
                  if k not in (*RUNTIME_FIELDS, "extra") and saved.get(k) != mine.get(k)]
        if differ:
            raise TrainingError(f"{self.resume_from} holds another model: {', '.join(differ)} (the checkpoint's "
                                "-> this run's); resume with the flags that built it (--preset, --config, "
                                "--vocab-size, --init), or start anew with --resume none in another --out")

    def _saved_layout(self) -> dict | None:
        """The optimizer layout the checkpoint resumed from was written with: recorded in it, or (older
        checkpoints) in the config.json of the run that wrote it."""
        if self.resume_from is None:
            return None
        recorded = self.resume_record
        layout = self.resume_state.get("optimizer_layout")
        if layout is None:
            return optimizer_layout(recorded["deepspeed_config"]) if "deepspeed_config" in recorded else None
        if "precision" not in layout and "precision" in recorded:  # recorded in checkpoints since
            layout = {**layout, "precision": recorded["precision"]}
        return layout

    def _resume(self) -> dict:
        ckpt = self.resume_from
        if ckpt is None:
            return {"step": 0, "tokens": 0, "bad_steps": 0}
        changed = checkpointing.load_checkpoint(self.engine, ckpt, self.rank_state)
        self._note(f"resumed from {ckpt} at step {self.resume_state['step']}")
        if changed:
            self._note(f"optimizer settings from this run's flags, not the checkpoint's: {'; '.join(changed)}")
        return self.resume_state

    # --- the loop -------------------------------------------------------------------------
    def run(self) -> dict:
        state = self._resume()
        step = state["step"]
        if self._old_final is not None and self.is_main:
            _remove_dir(self._old_final)
            self._note(f"removed {self._old_final} (its weights are kept in a checkpoint): this run trains on to "
                       f"step {self.total_steps}, and until it writes final/ again the run directory loads as its "
                       "newest checkpoint")
        self._write_run_files()
        self._note_start()
        a = self.args
        logger = MetricsLogger(self.run_dir, self.total_steps, step, self.is_main, a.tensorboard, a.wandb,
                               {"args": vars(a)})
        stop = StopRequest()
        profiler = StepProfiler(a.profile_steps, step, self.run_dir / "profile.txt", self.is_main)
        batches = iter(self.loader)
        tally = _Tally(tokens_seen=state["tokens"], bad_steps=state["bad_steps"])
        self._last_save = time.monotonic()
        self.engine.train()
        try:
            while step < self.total_steps:
                profiler.before_step(step)
                done = self._train_step(batches, step, logger, tally)
                step += 1
                profiler.after_step(step)
                logger.advance()
                if self._logs(step):
                    self._log_step(step, done, tally, logger)
                if self._between_steps(step, tally, logger, stop):
                    logger.message(f"stopped at step {step} (checkpoint saved); resume with --resume auto")
                    break
            if step == self.total_steps and self.is_main:
                self._write_final(step)
        finally:
            batches.close()  # ends the loader's prefetch thread (CUDA) before the interpreter does
            profiler.close()
            logger.close()
        dist.barrier()
        return {"step": step, "bad_steps": tally.bad_steps}

    def _note_start(self) -> None:
        batch = self.micro_batch * self.grad_accum * self.world
        self._note(f"{self.stage.name}: {self.world} rank(s) on {self.device.type}, {self.dtype}, ZeRO "
                   f"{self.ds_config['zero_optimization']['stage']}; global batch "
                   f"{self.stage.describe_batch(batch, self.tokens_per_step)}"
                   f" (micro-batch {self.micro_batch} x {self.grad_accum} accumulation x {self.world} rank(s))"
                   f"; {self.total_steps} steps; {self.config.num_parameters() / 1e6:.1f}M parameters")

    def _train_step(self, batches: Iterator[dict], step: int, logger: MetricsLogger, tally: _Tally) -> _Step:
        """One optimizer step over --grad-accum micro-batches; a batch whose loss is not finite on some rank
        is skipped and counted, and too many stop the run."""
        a = self.args
        done = _Step(lrs=self.engine.get_lr())  # this step's: engine.step() moves the schedule on to the next
        while len(done.losses) < self.grad_accum:
            batch = to_device(next(batches), self.device)
            if a.compile and a.compile_mode != "default":
                torch.compiler.cudagraph_mark_step_begin()  # last step's graph outputs are read
            loss, metrics = self.stage.compute_loss(self.engine, batch)
            if not all_true(bool(torch.isfinite(loss.detach()).item()), self.device):
                tally.bad_steps += 1
                logger.message(f"step {step + 1}: non-finite loss, batch skipped ({tally.bad_steps} so far)")
                if tally.bad_steps > a.max_bad_steps:
                    raise TrainingError(f"stopping: {tally.bad_steps} non-finite losses (limit --max-bad-steps "
                                        f"{a.max_bad_steps}); lower --lr or check the data")
                continue
            self.engine.backward(loss)
            # Only a logged step needs the norm: reading it syncs with the host.
            norm_wanted = self.engine.is_gradient_accumulation_boundary() and self._logs(step + 1)
            own_norm = _local_grad_norm(self.engine) if norm_wanted else None
            self.engine.step()
            if norm_wanted:
                done.grad_norm = _reported_grad_norm(self.engine, own_norm)
            done.losses.append(loss.detach().float())
            for k, v in metrics.items():
                done.metrics[k] = done.metrics.get(k, 0.0) + v / self.grad_accum
            tally.tokens_here += self.stage.tokens_in_batch(batch)
            tally.flops_here += self.stage.flops_in_batch(batch, self.flops_per_token)
        return done

    def _log_step(self, step: int, done: _Step, tally: _Tally, logger: MetricsLogger) -> None:
        """The step's line of metrics.jsonl: its loss and the stage's metrics averaged over ranks, and the
        throughput since the last log (training time only: evaluation and checkpoints are left out)."""
        self._count_over_ranks(tally)
        loss = torch.stack(done.losses).mean()
        dist.all_reduce(loss)
        elapsed = max(time.time() - tally.t_last - tally.paused, 1e-9)
        record = {"step": step, "loss": loss.item() / self.world, "lr": done.lrs[0], "grad_norm": done.grad_norm,
                  "tokens_per_s": tally.tokens_last / elapsed, "tokens": tally.tokens_seen,
                  "memory_mb": memory_mb(self.device), "bad_steps": tally.bad_steps,
                  **self._mean_over_ranks(done.metrics)}
        if self.args.optimizer == "muon":  # its groups come last (split_muon_groups)
            record["muon_lr"] = done.lrs[-1]
        if self.dtype == "fp16":  # steps DeepSpeed skipped on a loss-scale overflow
            record["overflow_steps"] = int(getattr(self.engine, "skipped_steps", 0))
        if self.device_peak:
            record["mfu"] = tally.flops_last / elapsed / (self.device_peak * self.world)
        logger.log(record)
        tally.t_last, tally.tokens_last, tally.flops_last, tally.paused = time.time(), 0, 0.0, 0.0

    def _between_steps(self, step: int, tally: _Tally, logger: MetricsLogger, stop: StopRequest) -> bool:
        """Evaluate and checkpoint where due (their time is not training time); True when the run stops here
        (a signal every rank agreed on, or --stop-at-step), its checkpoint saved."""
        a, started = self.args, time.time()
        if self.val_loader is not None and (step % a.eval_every == 0 or step == self.total_steps):
            if means := self.evaluate():
                logger.log({"step": step, **means})
        stop_requested, save_due = self._agreed(step, stop.requested, self._save_due())
        stopping = stop_requested or step == a.stop_at_step
        if step % a.save_every == 0 or step == self.total_steps or stopping or save_due:
            self._count_over_ranks(tally)  # every step's tokens, not only the logged ones'
            self.save(step, {"tokens": tally.tokens_seen, "bad_steps": tally.bad_steps})
        tally.paused += time.time() - started
        return stopping

    def _write_final(self, step: int) -> None:
        """final/: a copy of the last checkpoint's model (rank 0)."""
        final = checkpointing.step_dir(self.run_dir, step)
        if not final.exists():  # resumed at its last step from another run's checkpoint
            final = self.resume_from
        _replace_dir_copy(final / "model", self.run_dir / "final")

    def _count_over_ranks(self, tally: _Tally) -> None:
        """Move the ranks' counts since the last call (`tokens_here`, `flops_here`) into the totals."""
        tokens, flops = self._sum_over_ranks(tally.tokens_here, tally.flops_here)
        tally.tokens_seen, tally.tokens_last, tally.flops_last = (tally.tokens_seen + tokens,
                                                                  tally.tokens_last + tokens, tally.flops_last + flops)
        tally.tokens_here, tally.flops_here = 0, 0.0

    def close(self) -> None:
        """Let DeepSpeed take its hooks off the model and drop the engine (see `train`)."""
        self.engine.destroy()
        self.engine = self.loader = self.val_loader = None

    def _logs(self, step: int) -> bool:
        return step % self.args.log_every == 0 or step == self.total_steps

    def _agreed(self, step: int, *flags: bool) -> list[bool]:
        """Each flag (a SIGTERM/SIGINT seen, a timed save due) as true on every rank when it is on any.
        One rank decides alone at every step; several agree every few steps, in one all-reduce (a host
        sync, which stalls a step's queued launches)."""
        if self.world == 1:
            return list(flags)
        if step % STOP_CHECK_EVERY and step != self.total_steps:
            return [False] * len(flags)
        t = torch.tensor([float(f) for f in flags], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [bool(v) for v in t.tolist()]

    def _save_due(self) -> bool:
        """--save-every-minutes: whether that long has passed since the last checkpoint (or the start)."""
        minutes = self.args.save_every_minutes
        return minutes is not None and time.monotonic() - self._last_save >= 60 * minutes

    def _sum_over_ranks(self, count: int, flops: float) -> tuple[int, float]:
        """(tokens, FLOPs) summed over ranks, in one collective (float64 holds a token count exactly)."""
        if self.world == 1:
            return count, flops
        t = torch.tensor([count, flops], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return int(t[0].item()), t[1].item()

    def _mean_over_ranks(self, metrics: dict[str, float | torch.Tensor]) -> dict[str, float]:
        """A stage's metrics (floats or device scalars, read only here so that the steps between logs
        never wait on the host) averaged over ranks, so a logged value describes the whole global
        batch, not rank 0's share of it."""
        if not metrics:
            return {}
        keys = sorted(metrics)
        values = torch.stack([torch.as_tensor(metrics[k], dtype=torch.float64, device=self.device).reshape(())
                              for k in keys])
        if self.world > 1:
            dist.all_reduce(values)
        return {k: v / self.world for k, v in zip(keys, values.tolist())}

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean loss over the held-out split (one pass, at most --eval-batches batches per rank); for
        several --data sources, over each one's split and their mean weighted by the mixing weights.
        A split that gave nothing to average is left out, with a warning naming it (`{}` when none gave)."""
        if not isinstance(self.val_loader, MixtureLoader):
            means = self._evaluate(self.val_loader)
            if not means:
                self._warn_nothing_to_evaluate(self.args.val_data or data_label(self.args.data))
            return means
        per_source = [self._evaluate(loader) for loader in self.val_loader.loaders]
        for source, source_means in zip(self.val_loader.sources, per_source):
            if not source_means:
                self._warn_nothing_to_evaluate(str(source.path))
        means = self.val_loader.combine(per_source)
        if means and self.stage.eval_is_token_loss:
            means["val_ppl"] = perplexity(means["val_loss"])
        return means

    def _warn_nothing_to_evaluate(self, source: str) -> None:
        """Once per source: its held-out batches weighed nothing, and a mean over nothing is no loss (it was
        logged as val_loss 0, a perfect model)."""
        if source in self._warned_empty_eval or not self.is_main:
            return
        self._warned_empty_eval.add(source)
        tqdm.write(f"warning: no val_loss: the held-out split of {source} gave nothing to average at --seq-len "
                   f"{self.args.seq_len} (no target token in the batches evaluated: an SFT conversation whose "
                   f"assistant turn starts past --seq-len has none); its val metrics are left out of metrics.jsonl",
                   file=sys.stderr)

    def _evaluate(self, val_loader) -> dict:
        """The held-out means over one shard directory's split."""
        batches = []
        for batch in val_loader.one_pass():
            if len(batches) >= self.args.eval_batches:
                break
            batches.append(batch)
        # Every rank must run the same number of forwards (ZeRO-3 gathers weights collectively).
        count = torch.tensor([len(batches)], device=self.device)
        dist.all_reduce(count, op=dist.ReduceOp.MIN)
        self.engine.eval()
        sums = {"val_loss": torch.zeros((), device=self.device)}  # each metric x its batch's weight
        weight = torch.zeros((), device=self.device)
        for batch in batches[: int(count.item())]:
            batch = to_device(batch, self.device)
            loss, extras = self.stage.eval_metrics(self.engine, batch)
            n = self.stage.eval_weight(batch).float()
            for name, value in {"val_loss": loss, **{f"val_{k}": v for k, v in extras.items()}}.items():
                sums[name] = sums.get(name, 0) + value.float() * n
            weight += n
        names = sorted(sums)  # the same on every rank: each ran the same stage on as many batches
        totals = torch.stack([sums[k] for k in names] + [weight])
        dist.all_reduce(totals)
        self.engine.train()
        total_weight = totals[-1].item()
        if total_weight == 0:  # no target token (or no batch) on any rank: nothing to average
            return {}
        means = {k: v / total_weight for k, v in zip(names, totals[:-1].tolist())}
        if self.stage.eval_is_token_loss:
            means["val_ppl"] = perplexity(means["val_loss"])
        return means

    def save(self, step: int, trainer_state: dict) -> None:
        trainer_state = {**trainer_state, "optimizer_layout": optimizer_layout(self.ds_config, self.args.optimizer)}
        checkpointing.save_checkpoint(self.engine, self.stage, self.run_dir, step, self.loader.state_dict(),
                                      trainer_state, self.tokenizer_dir, self.args.keep_last)
        self._last_save = time.monotonic()



@dataclass
class _Tally:
    """What the training loop counts across steps. Tokens and their FLOPs (for MFU) are counted per rank
    (`*_here`: a stage's batches may differ in size between ranks, GRPO's completions) and summed over ranks
    at each log and checkpoint into the run's total and the totals since the last log (`*_last`); `paused`
    is the time since the last log spent on evaluation and checkpoints."""

    tokens_seen: int
    bad_steps: int
    tokens_here: int = 0
    flops_here: float = 0.0
    tokens_last: int = 0
    flops_last: float = 0.0
    t_last: float = field(default_factory=time.time)
    paused: float = 0.0


@dataclass
class _Step:
    """One optimizer step's results: its learning rates, its micro-batches' losses, the stage's metrics
    averaged over them, and the gradient norm (read only on a logged step)."""

    lrs: list[float]
    losses: list[torch.Tensor] = field(default_factory=list)
    metrics: dict[str, float | torch.Tensor] = field(default_factory=dict)
    grad_norm: float | None = None

def _local_grad_norm(engine) -> float | None:
    """Gradient norm before clipping from the parameters' own .grad (plain fp32 without ZeRO; None when
    DeepSpeed keeps gradients elsewhere: ZeRO partitions or the bf16 optimizer's fp32 buffers)."""
    if engine.zero_optimization_stage() != 0:
        return None
    grads = [p.grad.detach().float().norm() for p in engine.module.parameters() if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else None


def _reported_grad_norm(engine, own_norm: float | None) -> float:
    """After `engine.step()`: DeepSpeed's global norm of this step where its optimizer computed one."""
    norm = engine.get_global_grad_norm()
    if norm is not None:
        return float(norm)
    return own_norm if own_norm is not None else float("nan")


def read_json_object(path: Path) -> dict:
    """A JSON object file this package wrote; damaged, it is an error naming it (the parser's own
    message names no file)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError: also a file that is not UTF-8
        raise TrainingError(f"{path}: cannot be read as JSON ({e})") from None
    if not isinstance(data, dict):
        raise TrainingError(f"{path}: expected a JSON object, found a {type(data).__name__}")
    return data


def read_run_record(ckpt: Path) -> dict:
    """The config.json of the run that wrote `ckpt` (its stage; for older checkpoints the optimizer
    layout), or {} for a checkpoint copied out of its run."""
    path = ckpt.parent.parent / "config.json"
    return read_json_object(path) if path.exists() else {}


def _write_json(path: Path, data: dict) -> None:
    write_text_whole(path, json.dumps(data, indent=2, default=str))


def _same_files(a: Path, b: Path) -> bool:
    """Whether directories `a` and `b` hold the same files, byte for byte."""
    import filecmp

    names = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    if not b.is_dir() or names != sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file()):
        return False
    return all(filecmp.cmp(a / name, b / name, shallow=False) for name in names)


def _remove_dir(path: Path) -> None:
    """Remove `path` through a rename, as `_replace_dir_copy` replaces one: a kill midway leaves it whole
    or gone (its `.old` leftover cleared by the next replace), never half deleted."""
    import shutil

    old = path.with_name(path.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    path.rename(old)
    shutil.rmtree(old)


def _replace_dir_copy(src: Path, dst: Path) -> None:
    """`dst` becomes a copy of `src` through renames: a kill at any point leaves the old `dst` or the new
    one whole (between the two renames, the old one as `.old`), never one half deleted; the next call
    clears the leftovers."""
    import shutil

    tmp, old = dst.with_name(dst.name + ".tmp"), dst.with_name(dst.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    shutil.rmtree(old, ignore_errors=True)
    if dst.exists():
        dst.rename(old)
    tmp.rename(dst)
    shutil.rmtree(old, ignore_errors=True)


def stage_parser(stage_cls: type[Stage]) -> argparse.ArgumentParser:
    """A stage's command line: the shared flags, described for the stage, then its own."""
    from minimind_fast.training.args import training_parser

    parser = training_parser(stage_cls.__doc__ or stage_cls.name, stage_cls.name, data_help=stage_cls.data_help,
                             mixes_sources=stage_cls.mixes_sources)
    stage_cls.add_arguments(parser)
    return parser


def train(stage_cls: type[Stage], argv: list[str] | None = None,
          parser: argparse.ArgumentParser | None = None) -> dict:
    """Parse flags, train, and turn `TrainingError`s into a clean one-line exit."""
    from minimind_fast.training.args import check_training_args

    args = (parser or stage_parser(stage_cls)).parse_args(argv)
    # A rank killed by a native abort or fault then prints every thread's Python stack, not just a
    # launcher line with its exit code.
    faulthandler.enable()
    try:
        check_training_args(args)
        trainer = Trainer(stage_cls(args), args)
        try:
            result = trainer.run()
        finally:  # after a clean end every rank has written its last (run() ends at a barrier)
            trainer.release_run_dir()
    except (TrainingError, OSError, ValueError) as e:  # OSError: also a --config that is a directory, ...
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    # Only after a clean run (every rank is here), in reverse order of construction, while the process
    # group and the interpreter are whole. Left to the interpreter's shutdown, DeepSpeed's engine (kept
    # alive by reference cycles through its hooks) is freed after the process group; ZeRO-3 gloo ranks
    # have aborted at exit now and then ("terminate called without an active exception"), and this
    # order is the suspected cure (not reproduced here in 30 runs either way).
    trainer.close()
    del trainer
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
    _unlink_deepspeed_shm()
    return result


def _unlink_deepspeed_shm() -> None:
    """Remove this rank's shared-memory all-reduce buffer, which DeepSpeed's CPU backend creates under
    its launcher and never unlinks: 69 MB of RAM per rank per master port, held until reboot. (The
    name follows DeepSpeed's `shm_initialize`; a mapping still open elsewhere stays valid.)"""
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{os.environ.get('RANK', '0')}")
    Path("/dev/shm", name).unlink(missing_ok=True)
