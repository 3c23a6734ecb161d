"""Direct preference optimisation: raise the chosen reply's log-probability over the rejected one's,
measured against a frozen reference model.

    loss = -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))

where pi_* and ref_* are the policy's and the reference's log-probabilities of a whole reply: the sum
over its assistant tokens (targets != -100). With `--label-smoothing eps` (conservative DPO, for noisy
labels) the loss is `(1 - eps) * that + eps * (the same with chosen and rejected swapped)`.

The reference is the `--init` model unless `--reference` names another. It either runs beside the
policy at every step, or (`--precompute-reference`) scores every train and val pair once before
training, in the training precision, into `RUN/reference_logps.safetensors` (keyed by pair number,
reused on resume), and is freed: no second model in memory and one forward per step instead of two.
The stored scores are reused only for the same reference weights (a fingerprint of the tensors, not
the path) and the same shard contents (the manifest's per-shard checksums).

With `--lora-rank R` only LoRA adapters train (the base stays frozen and out of the optimizer), saved as
in the LoRA stage: `RUN/final/` holds the base, `RUN/final/adapter/` the adapter.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from minimind_fast.checkpoint import weights_fingerprint
from minimind_fast.data.loaders import ShardLoader, build_loader, fingerprint
from minimind_fast.data.shards import file_checksum
from minimind_fast.files import apply_umask, write_file_whole
from minimind_fast.model import MiniMindForCausalLM
from minimind_fast.training.flops import forward_flops_per_token
from minimind_fast.training.lora_stage import (
    adapter_parameters,
    add_adapters,
    add_lora_arguments,
    check_lora_flags,
    saved_adapter_config,
)
from minimind_fast.training.stages import (
    FineTuneStage,
    check_context,
    check_resumed_objective,
    freeze,
    load_start_model,
    save_objective,
)

if TYPE_CHECKING:
    from minimind_fast.data.prompts import PromptLoader

IGNORE = -100
REFERENCE_FILE = "reference_logps.safetensors"


def concat_pairs(batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chosen rows then rejected rows, padded to one width, so one forward scores both sides."""
    width = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])

    def pad(t: torch.Tensor, value: int) -> torch.Tensor:
        return F.pad(t, (0, width - t.shape[1]), value=value)

    ids = torch.cat([pad(batch[f"{s}_input_ids"], 0) for s in ("chosen", "rejected")])
    targets = torch.cat([pad(batch[f"{s}_targets"], IGNORE) for s in ("chosen", "rejected")])
    positions = torch.arange(width, device=ids.device).expand_as(ids)
    return ids, targets, positions


def sequence_logps(model: torch.nn.Module, input_ids: torch.Tensor, targets: torch.Tensor,
                   position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(sum of log p(target) over each row's target tokens in fp32, the model's MoE aux loss).

    Only the rows' target positions are upcast and normalised: prompt and padding logits are never
    copied to fp32.
    """
    out = model(input_ids=input_ids, position_ids=position_ids)
    valid = targets != IGNORE
    rows = valid.nonzero(as_tuple=True)[0]
    token_logps = -F.cross_entropy(out.logits[valid].float(), targets[valid], reduction="none")
    logps = torch.zeros(input_ids.shape[0], device=token_logps.device, dtype=torch.float32)
    return logps.index_add(0, rows, token_logps), out.aux_loss


def dpo_loss(pi_chosen: torch.Tensor, pi_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, label_smoothing: float = 0.0
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean (conservative) DPO loss over the pairs, with the implicit rewards as metrics (0-dim tensors)."""
    reward_chosen = beta * (pi_chosen - ref_chosen)
    reward_rejected = beta * (pi_rejected - ref_rejected)
    margin = reward_chosen - reward_rejected
    losses = -(1 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)
    loss = losses.mean()
    # Device scalars, read only when a step is logged: an .item() each would stall every step's launches.
    metrics = {"dpo_loss": loss, "reward_chosen": reward_chosen.mean(), "reward_rejected": reward_rejected.mean(),
               "reward_margin": margin.mean(), "reward_accuracy": (margin > 0).float().mean()}
    return loss, {k: v.detach() for k, v in metrics.items()}


TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class PairStage(FineTuneStage):
    """A stage on preference pairs (DPO shards, `DPOLoader` batches) with a loss per pair: DPO, the reward
    model."""

    eval_is_token_loss = False
    data_kind = "dpo"

    def items_tokens(self, loader: ShardLoader | PromptLoader) -> float:
        """A pair takes one batch row: counting it as seq_len tokens makes --epochs count pairs."""
        return self.args.seq_len

    def describe_batch(self, items: int, tokens: int) -> str:
        return f"{items} pairs = {2 * items} sequences of at most {self.args.seq_len} tokens"

    def tokens_in_batch(self, batch: dict) -> int:
        """The positions the forward runs on: both sides' rows, padded to the wider side (`concat_pairs`), so
        that tokens/s and MFU count the work done, padding included, as SFT's padded rows are."""
        width = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])
        return 2 * batch["chosen_input_ids"].shape[0] * width

    def eval_weight(self, batch: dict) -> torch.Tensor:
        """The loss is a mean over pairs: val_loss weighs batches by their pairs, not their tokens."""
        return torch.tensor(batch["chosen_input_ids"].shape[0], device=batch["chosen_input_ids"].device)


class DPOStage(PairStage):
    """DPO on preference pairs (DPO shards) against a frozen reference model."""

    name = "dpo"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("DPO")
        g.add_argument("--beta", type=float, default=0.1, help="strength of the pull to the reference")
        g.add_argument("--reference", help="reference model (default: the --init model)")
        g.add_argument("--precompute-reference", action="store_true",
                       help="score every pair with the reference once, store it in the run dir, free the model")
        g.add_argument("--label-smoothing", type=float, default=0.0,
                       help="conservative DPO: the share of pairs assumed mislabelled (0 <= eps < 0.5)")
        add_lora_arguments(parser, rank=None)

    def __init__(self, args: argparse.Namespace):
        super().__init__(args)
        self.check_arguments()

    def check_arguments(self) -> None:
        """Refuse flag values no run can use, before any model is loaded (ValueError naming the flag)."""
        a = self.args
        if not 0 < a.beta < math.inf:  # written so that NaN fails too
            raise ValueError(f"--beta {a.beta}: must be positive")
        if not 0 <= a.label_smoothing < 0.5:
            raise ValueError(f"--label-smoothing {a.label_smoothing}: must be in [0, 0.5)")
        if a.precompute_reference and isinstance(a.data, list):  # several sources (DataSources keeps one a str)
            raise ValueError("--precompute-reference keys the reference's scores by pair number in one shard "
                             f"directory, and --data names {len(a.data)}: drop it (the reference then scores "
                             "each batch live)")
        check_lora_flags(a)

    # --- reference -------------------------------------------------------------------------
    def setup(self, model: MiniMindForCausalLM) -> None:
        a = self.args
        if a.reference and not Path(a.reference).exists():
            raise FileNotFoundError(f"--reference {a.reference}: no such file or directory")
        if a.reference:  # same vocabulary size is not enough: the pairs' token ids must mean the same
            self._check_tokenizer(self.manifest, source=a.reference)
        self.tables: dict[str, torch.Tensor] | None = None
        self.reference = self._init_model = self._loaded_reference = None
        if a.precompute_reference:
            # Scoring copies the --init model only if the run dir holds no usable scores (on resume it
            # does); until then the policy, untouched before DeepSpeed wraps it, stands for those weights.
            # Stored scores are reused only for the very same weights, fingerprinted now: a path alone
            # does not tell (a run dir's newest checkpoint moves on, a model dir can be written over).
            self._init_model = model
            self._loaded_reference = self._load_reference(model) if a.reference else None
            self._reference_id = weights_fingerprint(self._loaded_reference if a.reference else model)
        else:
            self.reference = self._load_reference(model)
            self._reference_id = weights_fingerprint(self.reference)
        check_resumed_objective(self.resume_from, "DPO objective", self._objective(),
                                {"reference": "the reference's weights (--reference, or --init)",
                                 "beta": "--beta", "label_smoothing": "--label-smoothing"})
        if a.lora_rank is not None:
            # After the reference is copied: adapters start at zero (B = 0), so a copy made later (when
            # precomputing) scores exactly as the --init weights do.
            add_adapters(a, model, self.resume_from)
        elif self.resume_from is not None and (saved := saved_adapter_config(self.resume_from)) is not None:
            raise ValueError(f"{self.resume_from} trained LoRA adapters (rank {saved.get('rank')}): resume with "
                             "its --lora-* flags, or start anew with --resume none (or another --out)")

    def _objective(self) -> dict:
        """What the loss depends on beyond the policy: the reference's weights, beta, label smoothing."""
        return {"reference": self._reference_id, "beta": self.args.beta, "label_smoothing": self.args.label_smoothing}

    def save_extra(self, model: MiniMindForCausalLM, out_dir: Path) -> None:
        save_objective(out_dir, self._objective())

    def trainable_parameters(self, model: torch.nn.Module) -> list[torch.nn.Parameter]:
        return adapter_parameters(model) if self.args.lora_rank is not None else super().trainable_parameters(model)

    def flops_per_token(self, model: MiniMindForCausalLM) -> float:
        """The policy's training (its adapters' with --lora-rank) and, unless precomputed before training,
        the reference's forward over the same rows."""
        a = self.args
        live = not a.precompute_reference
        return super().flops_per_token(model) + (forward_flops_per_token(self.reference.config, a.seq_len) if live
                                                 else 0)

    def _load_reference(self, model: MiniMindForCausalLM) -> MiniMindForCausalLM:
        a = self.args
        if a.reference:
            reference = load_start_model(a.reference, "--reference", a.kernels)
            if reference.config.vocab_size != model.config.vocab_size:
                raise ValueError(f"--reference {a.reference}: vocab_size {reference.config.vocab_size} differs "
                                 f"from the policy's {model.config.vocab_size} ({a.init})")
            check_context(reference, "--reference", a.reference, a.seq_len)
        else:
            reference = copy.deepcopy(model)
        return freeze(reference)

    def prepare_training(self, loader: ShardLoader | PromptLoader, vocab_size: int) -> None:
        """With --precompute-reference, score every pair (or find the scores stored in the run dir)."""
        if self.args.precompute_reference:
            self.tables = self._reference_tables(loader, vocab_size)
            self.reference = self._init_model = self._loaded_reference = None  # the scores replace it
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def _reference_tables(self, train_loader, vocab_size: int) -> dict[str, torch.Tensor]:
        """{split: (pairs, 2) reference log-probs}: from the run dir when it matches, else computed now."""
        a = self.args
        loaders = {"train": train_loader}
        if a.eval_every > 0:
            try:
                loaders["val"] = build_loader("dpo", Path(a.val_data or a.data), seq_len=a.seq_len,
                                              micro_batch_size=a.micro_batch_size, split="val",
                                              vocab_size=vocab_size)
            except ValueError:
                pass  # no val split: the engine says so when it builds its own
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        dtype = TORCH_DTYPES[self.precision]  # the engine's, --deepspeed-config included: scores match a live reference
        meta = {"reference": str(Path(a.reference or a.init).resolve()), "reference_weights": self._reference_id,
                "dtype": str(dtype), "seq_len": a.seq_len,
                **{f"{split}_data": _data_identity(loader) for split, loader in loaders.items()}}
        path = Path(a.out) / REFERENCE_FILE
        tables = _read_tables(path, meta)
        if all_ranks_agree(tables is not None, device):
            _note(f"reference log-probs reused from {path}")
            return tables
        _note(f"scoring {sum(x.n_items for x in loaders.values())} pairs with the reference -> {path}")
        reference = self._loaded_reference if a.reference else self._load_reference(self._init_model)
        self.reference = reference.to(device=device, dtype=dtype)
        tables = {split: self._score_split(loader, device) for split, loader in loaders.items()}
        if dist.get_rank() == 0:
            _write_tables(path, tables, meta)
        dist.barrier()
        return tables

    @torch.no_grad()
    def _score_split(self, loader, device: torch.device) -> torch.Tensor:
        """(pairs, 2) reference log-probs of a split: each rank scores every world_size-th batch, summed."""
        rank, world = dist.get_rank(), dist.get_world_size()
        table = torch.zeros(loader.n_items, 2, dtype=torch.float64, device=device)
        order = np.arange(loader.n_items)
        chunks = [order[i:i + loader.batch_size] for i in range(0, len(order), loader.batch_size)]
        for chunk in chunks[rank::world]:
            batch = {k: v.to(device) for k, v in loader.pairs_batch(chunk).items()}
            table[batch["pair_index"]] = self._live_reference(batch).double()
        dist.all_reduce(table)
        return table.float().cpu()

    def _live_reference(self, batch: dict) -> torch.Tensor:
        """(pairs, 2) log-probs of the chosen and rejected replies under the reference model."""
        ids, targets, positions = concat_pairs(batch)
        with torch.no_grad():
            logps, _ = sequence_logps(self.reference, ids, targets, positions)
        n = batch["chosen_input_ids"].shape[0]
        return torch.stack([logps[:n], logps[n:]], dim=1)

    def reference_logps(self, batch: dict, split: str, policy: torch.nn.Module) -> torch.Tensor:
        """(pairs, 2) reference log-probs of the batch: looked up by pair number, or computed live."""
        if self.tables is not None:
            if split not in self.tables:
                raise RuntimeError(f"no precomputed reference log-probs for the {split} split")
            return self.tables[split][batch["pair_index"].cpu()].to(batch["chosen_input_ids"].device)
        weight = getattr(policy, "module", policy).model.embed_tokens.weight
        self.reference.to(device=batch["chosen_input_ids"].device, dtype=weight.dtype)
        return self._live_reference(batch)

    # --- loss ------------------------------------------------------------------------------
    def _loss(self, model, batch: dict, split: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ids, targets, positions = concat_pairs(batch)
        logps, aux = sequence_logps(model, ids, targets, positions)
        n = batch["chosen_input_ids"].shape[0]
        ref = self.reference_logps(batch, split, model)
        loss, metrics = dpo_loss(logps[:n], logps[n:], ref[:, 0], ref[:, 1], self.args.beta,
                                 self.args.label_smoothing)
        if aux is not None and self.uses_moe(model) and model.training:
            loss = loss + aux
            metrics["aux_loss"] = aux.detach().float()
        return loss, metrics

    def compute_loss(self, model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self._loss(model, batch, "train")

    def eval_loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        """The DPO loss of held-out pairs (the engine logs it as val_loss)."""
        return self.eval_metrics(model, batch)[0]

    def eval_metrics(self, model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The DPO loss of held-out pairs, and their implicit rewards' accuracy and margin."""
        loss, metrics = self._loss(model, batch, "val")
        return loss, {k: metrics[k] for k in ("reward_accuracy", "reward_margin")}


def all_ranks_agree(flag: bool, device: torch.device) -> bool:
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def _data_identity(loader) -> list:
    """What the scores of a split depend on besides the reference: its shards' contents, tokenizer and
    size. The same counts do not make the same pairs (data tokenized again, chosen and rejected
    swapped): the contents are the loader's fingerprint of the manifest's per-shard checksums."""
    split = loader.manifest["splits"][loader.split]
    return [str(loader.shards[0].path.parent.resolve()), loader.manifest.get("tokenizer_fingerprint"),
            split["tokens"], loader.n_items, loader.data_id or _hash_shards(loader)]


def _hash_shards(loader) -> str:
    """For a manifest from before tokenize.py recorded checksums: the shard files hashed (the same sha256,
    one read of each), so that old shards are still keyed safely, with the same fingerprint."""
    _note(f"{loader.shards[0].path.parent / 'manifest.json'}: no checksum recorded for the {loader.split} "
          f"shards (written by an older tokenize.py); hashing the shard files to key the reference scores "
          f"(run launch/tokenize.py again on the same inputs to record them)")
    return fingerprint([file_checksum(shard.path) for shard in loader.shards])


def _note(text: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(text, flush=True)


def _read_tables(path: Path, meta: dict) -> dict[str, torch.Tensor] | None:
    """The stored reference log-probs if they were made for this reference, data and precision."""
    if not path.exists():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            stored = f.metadata() or {}
        tables = load_file(str(path))
    except Exception as e:  # a corrupt file is recomputed, not fatal
        _note(f"{path}: unreadable ({e}); recomputing")
        return None
    if json.loads(stored.get("meta", "{}")) != meta:
        _note(f"{path}: made for another reference, data or precision; recomputing")
        return None
    return tables


def _write_tables(path: Path, tables: dict[str, torch.Tensor], meta: dict) -> None:
    def write(tmp: Path) -> None:
        save_file({k: v.contiguous() for k, v in tables.items()}, str(tmp), metadata={"meta": json.dumps(meta)})
        apply_umask(tmp)

    write_file_whole(path, write)
