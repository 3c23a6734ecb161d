"""Training stages: what differs between pretraining, SFT and the post-training methods.

A stage names its dataset kind, builds (or loads) the model, says which parameters train, and
computes the loss of one micro-batch. Everything else (DeepSpeed, schedule, checkpoints, resume,
metrics, faults) is the one engine in `engine.py`, so a new method is a new `Stage`, never a new loop.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from minimind_fast.checkpoint import weights_fingerprint
from minimind_fast.config import ModelConfig, get_preset
from minimind_fast.data.loaders import ShardLoader, build_loader, read_manifest
from minimind_fast.data.mixture import DataSource, MixtureLoader, data_label, describe_mixture, mixture_manifest
from minimind_fast.model import MiniMindForCausalLM
from minimind_fast.training.flops import forward_flops_per_token, lora_flops_per_token, model_flops_per_token

if TYPE_CHECKING:
    from minimind_fast.data.prompts import PromptLoader

OBJECTIVE_FILE = "objective.json"  # in a checkpoint: what the stage's loss depended on beyond the model
SPECIAL_TOKEN_WEIGHT = 10.0  # the distill stage's default weight of the reasoning tags' tokens


def freeze(model: MiniMindForCausalLM) -> MiniMindForCausalLM:
    """A model that only scores (reference, teacher): eval mode, no gradients, no checkpointing."""
    model.gradient_checkpointing = False
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def load_start_model(path: str, flag: str, kernels: str) -> MiniMindForCausalLM:
    """The model `flag` (--init, --reference, --teacher) names. A LoRA run there means its fine-tuned
    weights, as in chat: its adapter is merged into the base it keeps (loading the base alone would
    silently start from, or compare with, the model before the LoRA run)."""
    from minimind_fast.lora import load_tuned_model

    model, adapter = load_tuned_model(path, kernels=kernels)
    if adapter is not None and (not dist.is_initialized() or dist.get_rank() == 0):
        print(f"{flag} {path}: a LoRA run; its adapter {adapter} is merged into the base weights", flush=True)
    return model


def check_context(model: MiniMindForCausalLM, flag: str, path: str, seq_len: int) -> None:
    """A model that scores the policy's rows (reference, teacher) must hold --seq-len positions: a
    shorter context fails only at the first step, with an index error where positions are given."""
    context = model.config.max_position_embeddings
    if context < seq_len:
        raise ValueError(f"{flag} {path}: its context length {context} (max_position_embeddings) is below "
                         f"--seq-len {seq_len}")


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def save_objective(checkpoint: Path, record: dict) -> None:
    (checkpoint / OBJECTIVE_FILE).write_text(json.dumps(record))


def check_resumed_objective(resume_from: Path | None, what: str, mine: dict, flags: dict[str, str],
                            recorded_since: tuple[str, ...] = (),
                            compared_as: dict[str, Callable[[Any], Any]] | None = None) -> None:
    """A resume continues the same objective: refuse one whose settings (a reference's or teacher's weight
    fingerprint, beta, ...) differ from those the checkpoint recorded (`save_objective`); a checkpoint
    from before the record cannot tell. `flags` names each setting as the user gives it. A key absent from
    the checkpoint counts as None, except those of `recorded_since` (recorded only by later versions, and
    not None in a run that has the setting): a checkpoint without one is noted as not checked for it.
    `compared_as` maps a setting recorded as typed to what it means (GRPO's --reward specs, parsed), which
    both sides are compared by."""
    path = resume_from / OBJECTIVE_FILE if resume_from is not None else None
    if path is None or not path.exists():
        return
    saved = json.loads(path.read_text())
    unrecorded = [k for k in recorded_since if k not in saved and mine.get(k) is not None]
    meaning = compared_as or {}

    def differ(key: str) -> bool:
        same_as = meaning.get(key, lambda value: value)
        return same_as(saved.get(key)) != same_as(mine.get(key))

    changed = [_difference(flags.get(k, k), saved.get(k), mine.get(k)) for k in sorted(set(saved) | set(mine))
               if k not in unrecorded and differ(k)]
    if changed:
        raise ValueError(f"{resume_from} trained with another {what} ({'; '.join(changed)} differ): resume with "
                         f"the run's settings, or start anew with --init {resume_from}")
    if unrecorded and (not dist.is_initialized() or dist.get_rank() == 0):
        print(f"{resume_from} does not record {'; '.join(flags.get(k, k) for k in unrecorded)} (written before it "
              f"was recorded): not checked", flush=True)


def _difference(setting: str, saved, mine) -> str:
    """`setting`, and for a record by name (a fingerprint per reward function) the names that differ."""
    if isinstance(saved, dict) and isinstance(mine, dict):
        return f"{setting} {', '.join(sorted(k for k in saved | mine if saved.get(k) != mine.get(k)))}"
    return setting


def decay_groups(params: list[torch.nn.Parameter], lr: float, weight_decay: float) -> list[dict]:
    """Matrices with weight decay, vectors (norms, biases) without, at `lr`. An empty group is left out:
    DeepSpeed drops it, which would leave the scheduler with more lambdas than groups (LoRA trains
    matrices only)."""
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay, "lr": lr},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, "lr": lr}]
    return [g for g in groups if g["params"]]


class Stage:
    name = "stage"
    # val_loss is a mean next-token loss, so exp(val_loss) is a perplexity (not for DPO's pair loss)
    eval_is_token_loss = True
    data_kind = "pretrain"
    data_help = "shard directory written by launch/tokenize.py"  # --data in the stage's --help
    mixes_sources = True  # --data may name several shard directories (a prompt file stage: False)
    zero_stage = 0  # the run's resolved ZeRO stage, set by the engine before build_model and setup
    precision = "fp32"  # the run's resolved precision (fp32|bf16|fp16, from flags or --deepspeed-config), likewise
    resume_from: Path | None = None  # the checkpoint this run resumes from, set by the engine likewise

    def __init__(self, args: argparse.Namespace):
        self.args = args

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Hook: the stage's own flags (LoRA rank, DPO beta, GRPO group size...)."""

    # --- data --------------------------------------------------------------------------
    def open_data(self, data: Path | list[DataSource]) -> dict:
        """The manifest of `--data`, checked against the stage's data kind (raises ValueError); for several
        sources, each one's checked and `mixture_manifest` of them."""
        if isinstance(data, list):
            return self._open_mixture(data)
        if not (data / "manifest.json").exists():
            raise ValueError(f"--data {data}: no manifest.json there (write shards with launch/tokenize.py)")
        manifest = read_manifest(data)
        accepted = {"sft": ("sft", "reasoning")}.get(self.data_kind, (self.data_kind,))
        if manifest["kind"] not in accepted:
            raise ValueError(f"--data {data} holds {manifest['kind']} shards; "
                             f"the {self.name} stage needs {self.data_kind} shards")
        return manifest

    def _open_mixture(self, sources: list[DataSource]) -> dict:
        """Sft and reasoning shards may mix where the stage reads both (SFT, LoRA): each micro-batch comes
        from one source, and the SFT loader gives both the same batch (plain assistant-token loss)."""
        for source in sources:
            if not source.path.is_dir():
                raise ValueError(f"--data {source.path}: no such directory")
        manifest = mixture_manifest(sources, [self.open_data(source.path) for source in sources])
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(describe_mixture(manifest), flush=True)
        return manifest

    def build_loader(self, data: Path | list[DataSource], *, split: str, rank: int, world_size: int,
                     vocab_size: int, pin_memory: bool = False) -> ShardLoader | MixtureLoader | PromptLoader:
        """The loader of one split: `__iter__` a generator (the engine closes it), `state_dict`,
        `load_state_dict`, `n_items`; for several sources a `MixtureLoader` over one loader each."""
        a = self.args

        def one(path: Path) -> ShardLoader:
            return build_loader(self.data_kind, path, seq_len=a.seq_len, micro_batch_size=a.micro_batch_size,
                                seed=a.seed, rank=rank, world_size=world_size, split=split, vocab_size=vocab_size,
                                pin_memory=pin_memory, **self.loader_options())

        if isinstance(data, list):
            return MixtureLoader(data, [one(s.path) for s in data], seed=a.seed, rank=rank, world_size=world_size)
        return one(data)

    def loader_options(self) -> dict:
        """Hook: extra keyword arguments for `data.loaders.build_loader` (e.g. special_token_weight)."""
        return {}

    def items_tokens(self, loader: ShardLoader | PromptLoader) -> float:
        """Tokens per loader item, for turning --epochs into steps (packed SFT: mean document length)."""
        if loader.kind == "pretrain":
            return self.args.seq_len
        split = loader.manifest["splits"]["train"]
        return split["tokens"] / max(split["docs"], 1)

    # --- model -------------------------------------------------------------------------
    def model_config_overrides(self) -> dict:
        a = self.args
        overrides = {"kernels": a.kernels, "gradient_checkpointing": a.gradient_checkpointing}
        if getattr(a, "dropout", None) is not None:
            overrides["dropout"] = a.dropout
        return overrides

    def build_model(self, manifest: dict) -> MiniMindForCausalLM:
        raise NotImplementedError

    def tokenizer_dir(self, manifest: dict) -> Path | None:
        """The tokenizer the checkpoints carry: the one the shards were made with. Refused when it changed
        in place since (retrained or replaced): checkpoints would carry a tokenizer whose ids do not mean
        what the shards' ids mean."""
        from minimind_fast.data.tokenizer import load_tokenizer

        path = manifest.get("tokenizer_dir")
        if not path or not (Path(path) / "tokenizer.json").exists():
            return None
        now, then = load_tokenizer(path).fingerprint, manifest.get("tokenizer_fingerprint")
        if then is not None and now != then:
            raise ValueError(f"the tokenizer at {path} changed since the shards were written (fingerprint {then} "
                             f"then, {now} now): tokenize the data again with it, or restore the one it was "
                             "made with")
        return Path(path)

    def setup(self, model: MiniMindForCausalLM) -> None:
        """Hook run after the model exists and before DeepSpeed wraps it (LoRA, reference models)."""

    def prepare_training(self, loader: ShardLoader | PromptLoader, vocab_size: int) -> None:
        """Hook run once the train loader exists and a resumed position in it is checked (DPO scores its
        reference here)."""

    def trainable_parameters(self, model: torch.nn.Module) -> list[torch.nn.Parameter]:
        return [p for p in model.parameters() if p.requires_grad]

    def parameter_groups(self, model: torch.nn.Module, lr: float, weight_decay: float) -> list[dict]:
        """The optimizer's parameter groups, each with its peak learning rate (the schedule scales all
        alike); the first group's is the one logged."""
        return decay_groups(self.trainable_parameters(model), lr, weight_decay)

    # --- loss --------------------------------------------------------------------------
    def lm_inputs(self, batch: dict) -> dict:
        """Model keyword arguments for a packed LM batch (document-local attention if asked)."""
        inputs = {"input_ids": batch["input_ids"]}
        if self.args.doc_attention:
            inputs.update(position_ids=batch["position_ids"], cu_seqlens=batch["cu_seqlens"],
                          max_seqlen=batch["max_seqlen"])
        return inputs

    def compute_loss(self, model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float | torch.Tensor]]:
        """Loss of one micro-batch (already on the device) and scalar metrics to log (floats or 0-dim
        tensors: tensors are read only when a step is logged)."""
        out = model(**self.lm_inputs(batch), targets=batch["targets"])
        aux = out.aux_loss if out.aux_loss is not None else torch.zeros((), device=out.loss.device)
        metrics = {"lm_loss": out.loss.detach().float()}
        if self.uses_moe(model):
            metrics["aux_loss"] = aux.detach().float()
        return out.loss + aux, metrics

    def eval_loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        """Mean next-token loss on a held-out batch (no auxiliary terms)."""
        return model(**self.lm_inputs(batch), targets=batch["targets"]).loss

    def eval_metrics(self, model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`eval_loss` and further held-out metrics (0-dim tensors, means over the batch's `eval_weight`),
        logged as val_<name>: a pair stage's accuracy."""
        return self.eval_loss(model, batch), {}

    def eval_weight(self, batch: dict) -> torch.Tensor:
        """What `eval_loss` is a mean over in this batch, so that val_loss is the mean over the held-out
        split: its target tokens (a per-pair loss, as DPO's, counts pairs)."""
        return (batch["targets"] != -100).sum()

    def describe_batch(self, items: int, tokens: int) -> str:
        """The global batch in the start-up banner: `items` loader items, at most `tokens` tokens."""
        return f"{items} sequences = {tokens:,} tokens/step"

    def tokens_in_batch(self, batch: dict) -> int:
        return int(batch["input_ids"].numel())

    def flops_per_token(self, model: MiniMindForCausalLM) -> float:
        """Hook: the model FLOPs per token of `tokens_in_batch`, for MFU, once `setup` has run: the trained
        model's forward and backward (with LoRA adapters, `lora.apply_lora`, the frozen base takes no weight
        gradient); a stage adds the other forwards it runs (reference, teacher)."""
        if hasattr(model, "lora_config"):
            return lora_flops_per_token(model, self.args.seq_len)
        return model_flops_per_token(model.config, self.args.seq_len)

    def flops_in_batch(self, batch: dict, per_token: float) -> float:
        """Hook: the model FLOPs of the micro-batch just trained on, for MFU: `per_token` (`flops_per_token`)
        for each of its `tokens_in_batch`; a stage whose tokens do not all cost the same (GRPO's: the output
        head runs at completion tokens only) counts its own."""
        return per_token * self.tokens_in_batch(batch)

    @staticmethod
    def uses_moe(model: torch.nn.Module) -> bool:
        module = getattr(model, "module", model)
        return bool(getattr(getattr(module, "config", None), "use_moe", False))

    def save_extra(self, model: MiniMindForCausalLM, out_dir: Path) -> None:
        """Hook to save stage-specific artefacts (LoRA adapters) beside the consolidated model."""

    def split_weights(self, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Hook: the consolidated weights split into the model's and those of modules the stage trains
        along with it (PPO's value head, the reward model's head: heads.py), which stay out of
        model.safetensors (what chat and later stages load) and go to `save_own_weights`."""
        return state, {}

    def save_own_weights(self, weights: dict[str, torch.Tensor], model_dir: Path) -> None:
        """Hook: write the stage's own weights (`split_weights`) into the checkpoint's model directory."""


class PretrainStage(Stage):
    """Pretraining from scratch: next-token loss on every token of packed `.bin` shards."""

    name = "pretrain"
    data_kind = "pretrain"

    def build_model(self, manifest: dict) -> MiniMindForCausalLM:
        a = self.args
        config = ModelConfig.load(a.config) if a.config else get_preset(a.preset)
        overrides = self.model_config_overrides()
        if a.vocab_size:
            overrides["vocab_size"] = a.vocab_size
        config = config.replace(**overrides)
        config.validate()
        if manifest["vocab_size"] > config.vocab_size:
            raise ValueError(f"the shards' tokenizer has {manifest['vocab_size']} tokens but the model's "
                             f"vocab_size is {config.vocab_size}: pass --vocab-size or retokenize")
        return MiniMindForCausalLM(config)


class FineTuneStage(Stage):
    """A stage that starts from trained weights (`--init`)."""

    def build_model(self, manifest: dict) -> MiniMindForCausalLM:
        a = self.args
        if not a.init:
            raise ValueError(f"{self.name} needs --init RUN_DIR_OR_CHECKPOINT (the model to start from)")
        model = load_start_model(a.init, "--init", a.kernels)
        model.config.gradient_checkpointing = a.gradient_checkpointing
        model.gradient_checkpointing = a.gradient_checkpointing
        if a.dropout is not None:
            model.set_dropout(a.dropout)
        if manifest["vocab_size"] > model.config.vocab_size:
            raise ValueError(f"{data_label(a.data)}: shards use {manifest['vocab_size']} tokens, more than the model's "
                             f"vocab_size {model.config.vocab_size} ({a.init})")
        self.manifest = manifest  # `setup` checks a second model's tokenizer (teacher, reference) against it
        self._check_tokenizer(manifest)
        return model

    def _check_tokenizer(self, manifest: dict, source: str | None = None) -> None:
        """The tokenizer a model directory carries (`source`, default --init) must be the shards' one."""
        from minimind_fast.checkpoint import resolve_model_dir
        from minimind_fast.data.tokenizer import load_tokenizer

        init = Path(source or self.args.init)
        if init.suffix == ".pth":
            return
        model_dir = resolve_model_dir(init) if not (init / "config.json").exists() else init
        if not (model_dir / "tokenizer.json").exists():
            return
        mine = load_tokenizer(model_dir).fingerprint
        if manifest.get("tokenizer_fingerprint") not in (None, mine):
            raise ValueError(f"tokenizer mismatch: {data_label(self.args.data)} was tokenized with tokenizer "
                             f"{manifest['tokenizer_fingerprint']} but {model_dir} carries {mine}")


class SFTStage(FineTuneStage):
    """Full supervised fine-tuning: loss on assistant tokens only (the loader masks the rest)."""

    name = "sft"
    data_kind = "sft"


class ReasoningStage(FineTuneStage):
    """Reasoning distillation: SFT on <think>/<answer> data with extra weight on the tag tokens,
    plus (with --teacher) a KL term towards a teacher's softened distribution."""

    name = "distill"
    data_kind = "reasoning"
    DEFAULT_KD_TEMPERATURE = 2.0
    DEFAULT_KD_ALPHA = 0.5

    def __init__(self, args: argparse.Namespace):
        super().__init__(args)
        self.teacher: MiniMindForCausalLM | None = None
        self._teacher_placed = False
        self._teacher_id: str | None = None

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("distillation")
        g.add_argument("--special-token-weight", type=float, default=SPECIAL_TOKEN_WEIGHT,
                       help="loss weight of the <think>, </think>, <answer>, </answer> tag tokens in the "
                            "assistant replies (MiniMind: 10); other assistant tokens weigh 1")
        g.add_argument("--teacher", help="run dir, checkpoint, model dir, MiniMind .pth or HF dir of a teacher "
                                         "with the student's vocabulary: adds a KL term towards its logits")
        g.add_argument("--kd-temperature", type=float,
                       help=f"softmax temperature T of the KL term, scaled by T^2 "
                            f"(default {cls.DEFAULT_KD_TEMPERATURE}; needs --teacher)")
        g.add_argument("--kd-alpha", type=float,
                       help=f"weight of the KL term: loss = (1 - alpha) * weighted CE + alpha * KD "
                            f"(default {cls.DEFAULT_KD_ALPHA}; needs --teacher)")

    def check_arguments(self) -> None:
        """Refuse flag values that make no sense, before any model is loaded (ValueError)."""
        a = self.args
        if not 0 <= a.special_token_weight < math.inf:  # NaN or inf weights make every loss NaN
            raise ValueError(f"--special-token-weight {a.special_token_weight}: must be >= 0 and finite")
        if not a.teacher:
            given = [flag for flag, v in (("--kd-temperature", a.kd_temperature), ("--kd-alpha", a.kd_alpha))
                     if v is not None]
            if given:
                raise ValueError(f"{' and '.join(given)} set the distillation term, which needs --teacher")
            return
        if a.kd_temperature is None:
            a.kd_temperature = self.DEFAULT_KD_TEMPERATURE
        if a.kd_alpha is None:
            a.kd_alpha = self.DEFAULT_KD_ALPHA
        if not 0 < a.kd_temperature < math.inf:  # at inf every logit / T is 0 and T^2 * KL is NaN
            raise ValueError(f"--kd-temperature {a.kd_temperature}: must be > 0 and finite")
        if not 0 <= a.kd_alpha <= 1:
            raise ValueError(f"--kd-alpha {a.kd_alpha}: must be between 0 and 1")

    def build_model(self, manifest: dict) -> MiniMindForCausalLM:
        self.check_arguments()
        return super().build_model(manifest)

    def loader_options(self) -> dict:
        """--special-token-weight on the tag tokens' targets."""
        return {"special_token_weight": self.args.special_token_weight}

    def setup(self, model: MiniMindForCausalLM) -> None:
        """Load the frozen teacher. It lives on the stage, not in the model, so it is never given to the
        optimizer, wrapped or partitioned by DeepSpeed, or written into checkpoints (only its
        fingerprint is, so that a resume can check it)."""
        if not self.args.teacher:
            self._check_resumed_teacher()
            return
        teacher = load_start_model(self.args.teacher, "--teacher", self.args.kernels)
        if teacher.config.vocab_size != model.config.vocab_size:
            raise ValueError(f"--teacher {self.args.teacher} has a vocabulary of {teacher.config.vocab_size} "
                             f"tokens but the student (--init {self.args.init}) has {model.config.vocab_size}: "
                             "distillation compares logits token by token, so both need the same tokenizer")
        self._check_tokenizer(self.manifest, source=self.args.teacher)
        check_context(teacher, "--teacher", self.args.teacher, self.args.seq_len)
        self.teacher = freeze(teacher)
        self._check_resumed_teacher()

    def _teacher_record(self) -> dict:
        """What the loss depends on beyond the student: the tag tokens' weight, the teacher's weights and the
        KL term's settings."""
        # None at the default: a checkpoint from before the weight was recorded resumes as a default run
        weight = self.args.special_token_weight
        record = {"special_token_weight": None if weight == SPECIAL_TOKEN_WEIGHT else weight}
        if self.teacher is None:
            return {**record, "teacher": None}
        if self._teacher_id is None:  # hashed once, not at every checkpoint
            self._teacher_id = weights_fingerprint(self.teacher)
        return {**record, "teacher": self._teacher_id, "kd_temperature": self.args.kd_temperature,
                "kd_alpha": self.args.kd_alpha}

    def flops_per_token(self, model: MiniMindForCausalLM) -> float:
        """The student's training and the teacher's forward over the same tokens."""
        teacher = forward_flops_per_token(self.teacher.config, self.args.seq_len) if self.teacher is not None else 0
        return super().flops_per_token(model) + teacher

    def _check_resumed_teacher(self) -> None:
        check_resumed_objective(self.resume_from, "distillation term", self._teacher_record(),
                                {"teacher": "the --teacher weights (or --teacher given or not)",
                                 "kd_temperature": "--kd-temperature", "kd_alpha": "--kd-alpha",
                                 "special_token_weight": "--special-token-weight"})

    def save_extra(self, model: MiniMindForCausalLM, out_dir: Path) -> None:
        save_objective(out_dir, self._teacher_record())

    def _place_teacher(self, model, device: torch.device) -> None:
        """Move the teacher once to the student's device and floating dtype (bf16/fp16 under DeepSpeed's
        mixed precision, fp32 otherwise): the engine settles both only when DeepSpeed wraps the
        student, after `setup`."""
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        self.teacher.to(device=device, dtype=dtype)
        self._teacher_placed = True

    def compute_loss(self, model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = model(**self.lm_inputs(batch), targets=None)  # logits: the weighted loss needs them per token
        logits = out.logits.float()
        targets = batch["targets"]
        valid = targets != -100
        weight = batch["loss_weight"] * valid
        ce = F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1), ignore_index=-100,
                             reduction="none").view_as(targets)
        # A weighted mean whatever the weights sum to (below 1 with --special-token-weight < 1); none: 0
        total = weight.sum()
        loss = (ce * weight).sum() / torch.where(total > 0, total, torch.ones_like(total))
        metrics = {"lm_loss": loss.detach()}
        if self.teacher is not None:
            kd = self.kd_loss(logits, self.teacher_logits(model, batch), valid)
            metrics["kd_loss"] = kd.detach()
            loss = (1 - self.args.kd_alpha) * loss + self.args.kd_alpha * kd
        if out.aux_loss is not None and self.uses_moe(model):
            loss = loss + out.aux_loss
        return loss, metrics

    @torch.no_grad()
    def teacher_logits(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        if not self._teacher_placed:
            self._place_teacher(model, batch["input_ids"].device)
        return self.teacher(**self.lm_inputs(batch)).logits.float()

    def kd_loss(self, logits: torch.Tensor, teacher_logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """T^2 * KL(teacher_T || student_T) per predicted token, averaged over the tokens with a target
        (T^2 keeps the gradient's scale independent of the temperature, as in Hinton et al.)."""
        t = self.args.kd_temperature
        kl = F.kl_div(F.log_softmax(logits / t, -1), F.log_softmax(teacher_logits / t, -1),
                      log_target=True, reduction="none").sum(-1)
        return (kl * valid).sum() / valid.sum().clamp(min=1) * t * t


STAGES = {"pretrain": PretrainStage, "sft": SFTStage, "distill": ReasoningStage}
