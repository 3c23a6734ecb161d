"""Command-line flags shared by every training stage."""

from __future__ import annotations

import argparse
import importlib.util
import math

from minimind_fast.config import PRESETS
from minimind_fast.data.mixture import parse_source, parse_sources
from minimind_fast.training.optim import OPTIMIZERS
from minimind_fast.training.schedule import SCHEDULES


class DataSources(argparse.Action):
    """`--data DIR[:WEIGHT] [DIR[:WEIGHT] ...]`: one directory is kept as the plain path it always was
    (config.json and every message unchanged), several as the list of specs, checked here so that a
    bad weight or a repeated directory stops the run before any work. A stage without mixtures
    (`several=False`: GRPO's and PPO's prompt file) refuses more than one."""

    def __init__(self, *args, several: bool = True, **kwargs):
        self.several = several
        super().__init__(*args, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        if len(values) > 1 and not self.several:
            raise argparse.ArgumentError(self, f"this stage reads one prompts file, got {len(values)} "
                                               f"({' '.join(values)}); several sources mix shard directories "
                                               f"(pretrain, SFT, LoRA, distill, DPO, reward model)")
        if self.several:
            try:
                parse_sources(values)  # for its errors: the engine parses the specs kept here again
            except ValueError as e:
                raise argparse.ArgumentError(self, str(e)) from None
            if len(values) == 1:  # a lone directory's weight changes nothing
                values = [parse_source(values[0])[0]]
        setattr(namespace, self.dest, values[0] if len(values) == 1 else list(values))


def training_parser(description: str, stage: str, data_help: str = "shard directory written by launch/tokenize.py",
                    mixes_sources: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    g = p.add_argument_group("model")
    if stage == "pretrain":
        g.add_argument("--preset", default="small-26m", choices=sorted(PRESETS))
        g.add_argument("--config", help="model config JSON (instead of --preset)")
        g.add_argument("--vocab-size", type=int, help="override the preset's vocab_size")
    else:
        g.add_argument("--init", help="run dir, checkpoint, model dir, MiniMind .pth or HF dir to start from")
    g.add_argument("--kernels", choices=("auto", "triton", "reference"), default="auto")
    g.add_argument("--gradient-checkpointing", action="store_true")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--compile-mode", choices=("default", "reduce-overhead", "max-autotune"), default="default",
                   help="torch.compile mode with --compile (reduce-overhead: CUDA graphs, for small models "
                        "whose step is bound by kernel launches)")
    g.add_argument("--dropout", type=float)
    g.add_argument("--doc-attention", action="store_true",
                   help="keep attention inside packed documents (flash-attn varlen or a block mask)")

    g = p.add_argument_group("data")
    if mixes_sources:
        data_help += ("; several DIR[:WEIGHT] (weight default 1) train on a mixture: each micro-batch from one "
                      "directory, in proportion to the weights (needs --steps)")
    g.add_argument("--data", required=True, nargs="+", action=DataSources, several=mixes_sources, help=data_help,
                   metavar="DIR[:WEIGHT]" if mixes_sources else "FILE")
    g.add_argument("--val-data", help="shard directory for evaluation (default: --data's val split; with several "
                                      "sources, each one's)")
    g.add_argument("--seq-len", type=int, default=512)
    g.add_argument("--micro-batch-size", type=int, default=16)
    g.add_argument("--grad-accum", type=int, default=1)

    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, help="optimizer steps (default: --epochs over the data)")
    g.add_argument("--epochs", type=float, default=1.0, help="passes over --data when --steps is not given")
    g.add_argument("--lr", type=float, default=5e-4)
    g.add_argument("--min-lr-ratio", type=float, default=0.1)
    g.add_argument("--warmup-steps", type=int, default=0)
    g.add_argument("--lr-schedule", choices=SCHEDULES, default="cosine",
                   help="after the warmup: cosine or linear decay to the floor, wsd (the peak held, then a linear "
                        "decay over the last --decay-fraction of the steps), or constant")
    g.add_argument("--decay-fraction", type=float, default=0.2, help="the share of the steps wsd decays over")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw",
                   help="muon: Muon (momentum, orthogonalised by Newton-Schulz) for the hidden matrices of the "
                        "transformer layers at --muon-lr, AdamW at --lr for embeddings, norms, biases, the MoE "
                        "router and heads; ZeRO stage 0 only")
    g.add_argument("--muon-lr", type=float, default=0.02, help="peak learning rate of Muon's matrices")
    g.add_argument("--muon-momentum", type=float, default=0.95, help="Muon's momentum (Nesterov)")
    g.add_argument("--muon-weight-decay", type=float, default=0.01,
                   help="Muon's decoupled weight decay (p *= 1 - muon_lr * wd: 2e-4 a step at the defaults, as the "
                        "Muon reference's example; --weight-decay's 0.1 at --muon-lr would be 10x that)")
    g.add_argument("--weight-decay", type=float, default=0.1,
                   help="AdamW's decoupled weight decay on matrices (with muon: on the AdamW half's)")
    g.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.95))
    g.add_argument("--grad-clip", type=float, default=1.0)
    g.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3),
                   help="default: 1 with bf16 (DeepSpeed's flat-buffer BF16_Optimizer), else 0")
    g.add_argument("--dtype", choices=("auto", "bf16", "fp16", "fp32"), default="auto",
                   help="auto: bf16 on CUDA, fp32 on CPU")
    g.add_argument("--deepspeed-config", help="a DeepSpeed JSON config (its settings win over flags)")
    g.add_argument("--seed", type=int, default=1337)

    g = p.add_argument_group("run")
    g.add_argument("--out", required=True, help="run directory")
    g.add_argument("--resume", default="auto", help="auto (the newest complete checkpoint in --out), none, "
                   "a checkpoint, or a run directory (its newest)")
    g.add_argument("--save-every", type=int, default=1000)
    g.add_argument("--save-every-minutes", type=float, metavar="M",
                   help="also checkpoint once M minutes have passed since the last save (preemptible jobs: a kill "
                        "loses at most M minutes, however long a step takes)")
    g.add_argument("--keep-last", type=int, default=3, help="complete checkpoints to keep (0: all)")
    g.add_argument("--eval-every", type=int, default=500)
    g.add_argument("--eval-batches", type=int, default=20)
    g.add_argument("--log-every", type=int, default=10)
    g.add_argument("--max-bad-steps", type=int, default=20, help="stop after this many NaN/Inf losses")
    g.add_argument("--stop-at-step", type=int, help="checkpoint and stop at this step (time-boxed jobs)")
    g.add_argument("--profile-steps", type=int, default=0, metavar="N",
                   help="torch.profiler over N steps after a warm-up; tables in RUN_DIR/profile.txt")
    g.add_argument("--tensorboard", action="store_true")
    g.add_argument("--wandb", metavar="PROJECT", help="log to wandb (set WANDB_MODE=offline to stay local)")
    g.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    return p


# flag -> (smallest allowed value, what it must be): checked before any model or data is touched.
LOWER_BOUNDS = {"steps": (1, "at least 1"), "seq_len": (1, "at least 1"), "micro_batch_size": (1, "at least 1"),
                "grad_accum": (1, "at least 1"), "warmup_steps": (0, ">= 0"), "weight_decay": (0, ">= 0"),
                "grad_clip": (0, ">= 0 (0: no clipping)"), "save_every": (1, "at least 1"),
                "keep_last": (0, ">= 0 (0: keep all)"), "eval_batches": (1, "at least 1"),
                "log_every": (1, "at least 1"), "max_bad_steps": (0, ">= 0"), "stop_at_step": (1, "at least 1"),
                "profile_steps": (0, ">= 0"), "seed": (0, ">= 0")}


def check_training_args(args: argparse.Namespace) -> None:
    """Refuse flag values no run can use (ValueError naming the flag), instead of a silent fallback
    (--steps 0 ran --epochs), a traceback mid-run (--save-every 0) or a wrong result (--eval-batches 0
    logged val_loss 0)."""
    problems = [f"--{name.replace('_', '-')} {value}: must be {rule}"
                for name, (low, rule) in LOWER_BOUNDS.items()
                if (value := getattr(args, name, None)) is not None and value < low]
    data = getattr(args, "data", None)
    if isinstance(data, list) and args.steps is None:  # DataSources keeps one directory a plain path
        problems.append(f"--data with {len(data)} sources needs --steps: --epochs has no meaning over a mixture "
                        f"(each source repeats at its own pace)")
    elif args.steps is None and not args.epochs > 0:
        problems.append(f"--epochs {args.epochs}: must be > 0")
    minutes = getattr(args, "save_every_minutes", None)
    if minutes is not None and not 0 < minutes < math.inf:
        problems.append(f"--save-every-minutes {minutes}: must be > 0 and finite")
    if not args.lr > 0:
        problems.append(f"--lr {args.lr}: must be > 0")
    if getattr(args, "optimizer", "adamw") == "muon":
        if not 0 < args.muon_lr < math.inf:
            problems.append(f"--muon-lr {args.muon_lr}: must be > 0 and finite")
        if not 0 <= args.muon_weight_decay < math.inf:
            problems.append(f"--muon-weight-decay {args.muon_weight_decay}: must be >= 0 and finite")
        if not 0 <= args.muon_momentum < 1:
            problems.append(f"--muon-momentum {args.muon_momentum}: must be in [0, 1)")
    if not 0 < args.decay_fraction <= 1:
        problems.append(f"--decay-fraction {args.decay_fraction}: must be in (0, 1]")
    if not 0 <= args.min_lr_ratio <= 1:
        problems.append(f"--min-lr-ratio {args.min_lr_ratio}: must be in [0, 1]")
    problems += missing_logging_packages(args)
    if problems:
        raise ValueError("; ".join(problems))


# flag -> the package it logs through; optional, so not in the install's requirements.
LOGGING_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def missing_logging_packages(args: argparse.Namespace) -> list[str]:
    """--tensorboard/--wandb without their package, found before any work: the metrics logger would only
    fail once the model is built and the run started, with a traceback."""
    return [f"--{flag} needs the {package} package (pip install {package})"
            for flag, package in LOGGING_PACKAGES.items()
            if getattr(args, flag, None) and importlib.util.find_spec(package) is None]
