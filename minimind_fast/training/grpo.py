"""GRPO: group-relative policy optimisation on prompts with rule-based (or user) rewards.

Per micro-batch of P prompts the stage samples G completions of each from the current policy (the
KV-cache decoder, all P*G rows in one batch), scores them with the `--reward` functions (and a learnt
reward model's score with `--reward-model`, see reward_model.py), and turns the rewards into
group-normalised advantages A = (r - mean_group) / (std_group + eps) (population std).
The loss is token-level (DAPO-style): the sum over every completion token of the micro-batch of

    -min(ratio * A, clip(ratio, 1 - clip_eps, 1 + clip_eps) * A) + kl_beta * k3,
    ratio = exp(logp - logp_old),  k3 = exp(logp_ref - logp) - (logp_ref - logp) - 1,

divided by the number of completion tokens, so every token weighs the same whatever the length of its
completion (per-sequence means would favour short wrong answers and long right ones less evenly).
Log-probabilities are taken at the sampling temperature, for the policy and the reference alike.

`logp_old` are the policy's log-probabilities when the rollout was sampled. They are taken from the
first update's own forward pass (detached), where the weights are still those that sampled, so the
ratio starts at exactly 1 and no extra forward is spent; the decoder's log-probabilities are not used,
as they may differ from the training forward by kernel rounding. `--updates-per-rollout` mu > 1
reuses each rollout for mu optimizer steps (the loader repeats the step's micro-batches), which is
where clipping acts. The rollout buffer is not checkpointed: a run resumed part-way through a
rollout's passes samples a fresh rollout for the remaining ones. Since `logp_old` comes from a training
forward, mu > 1 needs the model without dropout (another mask per update would move the ratio). A
checkpoint records the objective (reference weights, rewards, sampling and clipping settings) and a
resume with other ones is refused.

With `--tools` a rollout is multi-turn (tools.py): the model's tool calls are run (at most
`--max-tool-calls` a turn), their results appended as the chat template renders them, and sampling goes
on, up to `--max-turns` turns. The sequence trained on is the prompt, each turn and the template's tokens
between turns; only the sampled tokens are in the mask, so the loss, `logp_old`, the reference's
log-probabilities and the KL are over them alone. The rewards score the last turn's text as the
completion, and find the whole conversation in the sample (`rewards.TRAJECTORY`).

Under ZeRO-3 the parameters are partitioned, so before sampling every rank gathers them
(`deepspeed.zero.GatheredParameters`, collective) into a private full copy and generates with that;
this costs one more copy of the model per rank, fine for MiniMind sizes.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from minimind_fast.checkpoint import weights_fingerprint
from minimind_fast.config import ModelConfig
from minimind_fast.data.loaders import ShardLoader
from minimind_fast.data.prompts import PromptLoader, encode_prompts, read_prompt_file
from minimind_fast.data.records import conversation_tools
from minimind_fast.generation import GenerationConfig, generate
from minimind_fast.model import MiniMindForCausalLM
from minimind_fast.training.flops import forward_flops_per_token, head_matmul_params, model_flops_per_token
from minimind_fast.training.reward_model import load_model_reward
from minimind_fast.training.rewards import REWARDS, TRAJECTORY, TRAJECTORY_START, RewardSet, reward_identity
from minimind_fast.training.stages import FineTuneStage, check_resumed_objective, freeze, save_objective
from minimind_fast.training.tools import (
    DEFAULT_MAX_CALLS,
    Episode,
    Toolbox,
    check_template,
    check_timeout_support,
    decode_groups,
    definition_name,
    run_episodes,
)

ADV_EPS = 1e-4
DEFAULT_REWARDS = ["answer", "format"]  # when neither --reward nor --reward-model is given
MODEL_REWARD = "model"  # --reward-model's name among the rewards: logged as reward_model
TOTALS_METRICS = ("mean", "std")  # logged as reward_mean, reward_std: of the totals, not of one reward
DEFAULT_MAX_TURNS, DEFAULT_TOOL_TIMEOUT = 3, 10.0  # --max-turns, --tool-timeout (with --tools only)
# What a resume must keep (objective.json): each setting as the user gives it
OBJECTIVE_FLAGS = {"reference": "the reference's weights (--init, when --kl-beta > 0)", "reward": "--reward",
                   "reward_model": "--reward-model (its weights or weight)",
                   "kl_beta": "--kl-beta", "clip_eps": "--clip-eps", "group_size": "--group-size",
                   "temperature": "--temperature", "top_p": "--top-p", "top_k": "--top-k",
                   "max_new_tokens": "--max-new-tokens", "updates_per_rollout": "--updates-per-rollout",
                   "missing_eos_penalty": "--missing-eos-penalty", "tools": "--tools (its source)",
                   "max_turns": "--max-turns", "max_tool_calls": "--max-tool-calls",
                   "reward_sources": "the source of --reward"}
# Recorded since checkpoints were first written: one without them resumes, noted as unchecked
RECORDED_SINCE = ("reward_sources", "max_tool_calls")


# ------------------------------------------------------------------------------------- the maths

def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = ADV_EPS) -> torch.Tensor:
    """(r - mean of its group) / (population std of its group + eps); rows are grouped consecutively.

    A group whose completions all scored the same gets zero advantage: it carries no preference.
    """
    groups = rewards.view(-1, group_size)
    mean = groups.mean(-1, keepdim=True)
    std = groups.std(-1, unbiased=False, keepdim=True)
    return ((groups - mean) / (std + eps)).view(-1)


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(policy || reference) per token: unbiased and never negative."""
    d = ref_logprobs - logprobs
    return torch.exp(d) - d - 1


def grpo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, clip_eps: float,
              kl_beta: float) -> tuple[torch.Tensor, dict[str, float]]:
    """The clipped surrogate plus the KL penalty, averaged over the completion tokens (`mask`).

    logprobs/old_logprobs/ref_logprobs/mask are (N, T); advantages (N,), one per completion, or (N, T),
    one per token (PPO's).
    Returns the loss and {kl, clip_fraction, ratio_mean} over the masked tokens.
    """
    mask = mask.to(logprobs.dtype)
    n = mask.sum().clamp(min=1)
    ratio = torch.exp(logprobs - old_logprobs)
    adv = (advantages if advantages.dim() == 2 else advantages[:, None]).to(logprobs.dtype)
    clipped_ratio = ratio.clamp(1 - clip_eps, 1 + clip_eps)
    per_token = -torch.minimum(ratio * adv, clipped_ratio * adv)
    kl = k3_kl(logprobs, ref_logprobs) if ref_logprobs is not None else torch.zeros_like(logprobs)
    if kl_beta:
        per_token = per_token + kl_beta * kl
    loss = (per_token * mask).sum() / n
    with torch.no_grad():
        clipped = ((ratio < 1 - clip_eps) & (adv < 0)) | ((ratio > 1 + clip_eps) & (adv > 0))
        stats = {"kl": ((kl * mask).sum() / n).item(), "clip_fraction": ((clipped * mask).sum() / n).item(),
                 "ratio_mean": ((ratio * mask).sum() / n).item()}
    return loss, stats


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(logits / temperature) at `targets`, in fp32 at least: (N, T, V), (N, T) -> (N, T)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


# ----------------------------------------------------------------------------------- rollouts

@dataclass
class Rollout:
    """Sampled completions, packed for the training forward, and what the loss needs besides."""

    input_ids: torch.Tensor  # (N, L) prompt + completion, right-padded
    targets: torch.Tensor  # (N, K) the token each of the last K positions predicts
    mask: torch.Tensor  # (N, K) True where that token is a completion token
    rewards: torch.Tensor  # (N,) the reward of each completion
    advantages: torch.Tensor | None  # GRPO: (N,), from the group; PPO: (N, K), set by the first update
    ref_logprobs: torch.Tensor | None  # (N, K)
    old_logprobs: torch.Tensor | None  # (N, K), set by the first update
    metrics: dict[str, float]
    tokens: int  # prompt + completion tokens (for tokens/s)
    sampled_tokens: int  # the completion tokens the policy sampled: where logits are taken (for MFU)
    old_values: torch.Tensor | None = None  # PPO: (N, K) the critic's values, set by the first update
    returns: torch.Tensor | None = None  # PPO: (N, K) the critic's targets, likewise


def pack_sequences(prompts: list[list[int]], completions: list[list[int]], pad_id: int,
                   sampled: list[list[bool]] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded inputs (N, L) and, for the last K = L - min_prompt + 1 positions only (the only
    ones that can predict a completion token), targets and the completion mask (N, K). `sampled` marks
    which completion tokens the policy sampled (a multi-turn rollout's tool results are not): the mask's
    True entries; all of them when None."""
    seqs = [p + c for p, c in zip(prompts, completions)]
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.bool)  # mask[:, t]: token t is a sampled token
    for i, (p, s) in enumerate(zip(prompts, seqs)):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, len(p):len(s)] = True if sampled is None else torch.tensor(sampled[i], dtype=torch.bool)
    start = min(len(p) for p in prompts)  # first completion token's position
    # Position t predicts token t+1: inputs are ids[:, :-1], and the kept positions are start-1 .. L-2.
    return ids[:, :-1], ids[:, start:], mask[:, start:]


def rollout_seed(seed: int, rank: int, rollout_id: int, turn: int = 0) -> int:
    """A sampling seed per (run seed, rank, rollout, turn): reproducible, and unrelated across rollouts and
    turns (a row of turn t draws from seed + its place in the turn's batch, as `generate` seeds rows)."""
    key = f"{seed}:{rank}:{rollout_id}" + (f":{turn}" if turn else "")  # turn 0: the seed of single-turn runs
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:6], "little")


# -------------------------------------------------------------------------------------- the stage

def add_rollout_arguments(parser: argparse.ArgumentParser, title: str, group_size: int) -> argparse._ArgumentGroup:
    """The flags of sampling, rewarding and reusing rollouts (GRPO's and PPO's); returns the group for the
    stage's own."""
    g = parser.add_argument_group(title)
    g.add_argument("--group-size", type=int, default=group_size, help="completions sampled per prompt (G)")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (> 0)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--reward", action="append", metavar="SPEC",
                   help=f"repeatable: {'|'.join(REWARDS)}|module:function|file.py:function, each "
                        f"optionally :WEIGHT (default: answer and format, unless --reward-model is given)")
    g.add_argument("--reward-model", metavar="PATH[:WEIGHT]",
                   help="a reward model (run, checkpoint or model dir of launch/reward_model.py, trained with the "
                        "policy's tokenizer; or a Hugging Face *ForSequenceClassification directory with its own "
                        "tokenizer and chat template): its score of prompt + completion is one more reward term")
    g.add_argument("--missing-eos-penalty", type=float, default=0.0, metavar="P",
                   help="subtracted from the total reward of a completion cut at --max-new-tokens before its "
                        "stop token (the rewards, a reward model's included, score it as if it were finished)")
    g.add_argument("--tools", metavar="FILE.py|pkg.module",
                   help="multi-turn rollouts with tools: the module's public functions, called by name with a "
                        "tool call's JSON arguments as keyword arguments (see tools.py)")
    g.add_argument("--max-turns", type=int,
                   help=f"with --tools: sampled turns per rollout at most (a turn that calls tools is answered "
                        f"and followed by another; default {DEFAULT_MAX_TURNS})")
    g.add_argument("--tool-timeout", type=float, metavar="S",
                   help=f"with --tools: a call running longer is interrupted and answered with an error (0: no "
                        f"limit; default {DEFAULT_TOOL_TIMEOUT:g})")
    g.add_argument("--max-tool-calls", type=int, metavar="N",
                   help=f"with --tools: calls run per turn at most; later ones in the turn are answered with an "
                        f"error, not run (default {DEFAULT_MAX_CALLS})")
    g.add_argument("--clip-eps", type=float, default=0.2)
    g.add_argument("--updates-per-rollout", type=int, default=1, help="optimizer steps per rollout (mu)")
    g.add_argument("--tokenizer", help="tokenizer directory, for an --init with none stored (one other than "
                                       "the stored tokenizer is refused)")
    parser.set_defaults(seq_len=512, micro_batch_size=4, lr=1e-6, eval_every=0, log_every=1)
    return g


class GRPOStage(FineTuneStage):
    """GRPO: sample groups of completions per prompt, reward them, and push up the better ones."""

    name = "grpo"
    data_kind = "prompts"
    data_help = ('prompts JSONL (or compressed JSONL, or Parquet), a {"prompt": ..., "answer": ...} or '
                 '{"conversations"/"messages": [...]} record a line')
    mixes_sources = False  # one prompt file
    objective_name = "GRPO objective"
    objective_flags = OBJECTIVE_FLAGS

    def describe_batch(self, items: int, tokens: int) -> str:
        return (f"{items} prompts x {self.args.group_size} completions = {items * self.args.group_size} "
                f"sequences of at most {self.args.seq_len} tokens")

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        g = add_rollout_arguments(parser, "grpo", group_size=4)
        g.add_argument("--kl-beta", type=float, default=0.04, help="weight of the KL penalty (0: no reference)")

    def __init__(self, args: argparse.Namespace):
        super().__init__(args)
        self.buffer: dict[int, Rollout] = {}
        self.reference: MiniMindForCausalLM | None = None
        self.rollout_copy: MiniMindForCausalLM | None = None
        self.toolbox: Toolbox | None = None
        self._trained: Rollout | None = None  # the micro-batch just trained on (compute_loss): its counts
        self._head_flops = 0.0  # per sampled token (`head_flops_per_token`), set by `setup`

    # --- data ----------------------------------------------------------------------------
    def _check_flags(self) -> None:
        a = self.args
        problems = self._objective_flag_problems() + self._tool_flag_defaults()
        # Written so that NaN fails too (it passed `x < 0` tests, and poisoned the loss or the sampling).
        if not 0 < a.temperature < math.inf:
            problems.append(f"--temperature must be > 0 (greedy groups are identical) and finite, got {a.temperature}")
        if not 0 < a.top_p <= 1:
            problems.append(f"--top-p must be in (0, 1], got {a.top_p}")
        if a.top_k < 0:
            problems.append(f"--top-k must be >= 0 (0: off), got {a.top_k}")
        if not 0 <= a.clip_eps < 1:
            problems.append(f"--clip-eps must be in [0, 1), got {a.clip_eps}")
        if not 0 <= a.missing_eos_penalty < math.inf:
            problems.append(f"--missing-eos-penalty must be >= 0 and finite, got {a.missing_eos_penalty}")
        if a.updates_per_rollout < 1:
            problems.append(f"--updates-per-rollout must be >= 1, got {a.updates_per_rollout}")
        if a.max_turns < 1:
            problems.append(f"--max-turns must be >= 1, got {a.max_turns}")
        if a.max_tool_calls < 1:
            problems.append(f"--max-tool-calls must be >= 1, got {a.max_tool_calls}")
        if not 0 <= a.tool_timeout < math.inf:
            problems.append(f"--tool-timeout must be >= 0 (0: no limit) and finite, got {a.tool_timeout}")
        if a.max_new_tokens < 1 or a.max_new_tokens >= a.seq_len:
            problems.append(f"--max-new-tokens ({a.max_new_tokens}) must be >= 1 and below --seq-len "
                            f"({a.seq_len}), which bounds prompt + completion")
        if problems:
            raise ValueError("; ".join(problems))

    def _tool_flag_defaults(self) -> list[str]:
        """Fill in --max-turns', --tool-timeout's and --max-tool-calls' defaults; a problem when one is given
        without --tools, which would ignore it."""
        a = self.args
        given = [flag for flag, value in (("--max-turns", a.max_turns), ("--tool-timeout", a.tool_timeout),
                                          ("--max-tool-calls", a.max_tool_calls)) if value is not None]
        a.max_turns = DEFAULT_MAX_TURNS if a.max_turns is None else a.max_turns
        a.tool_timeout = DEFAULT_TOOL_TIMEOUT if a.tool_timeout is None else a.tool_timeout
        a.max_tool_calls = DEFAULT_MAX_CALLS if a.max_tool_calls is None else a.max_tool_calls
        return [f"{' and '.join(given)} set tool use, which needs --tools"] if given and not a.tools else []

    def _objective_flag_problems(self) -> list[str]:
        """The stage's own flags out of range (PPO has others)."""
        a, problems = self.args, []
        if a.group_size < 2:
            problems.append(f"--group-size must be >= 2 (advantages compare completions), got {a.group_size}")
        if not 0 <= a.kl_beta < math.inf:
            problems.append(f"--kl-beta must be >= 0 and finite, got {a.kl_beta}")
        return problems

    @property
    def kl_weight(self) -> float:
        """The weight of the KL to the reference (0: no reference is kept)."""
        return self.args.kl_beta

    def reward_specs(self) -> list[str]:
        """The --reward functions; the shipped answer and format ones when no reward at all is given."""
        return self.args.reward or ([] if self.args.reward_model else DEFAULT_REWARDS)

    def open_data(self, data: Path) -> dict:
        """Read and encode the prompt JSONL (every problem named by file:line), and the rewards."""
        from minimind_fast.chat import find_tokenizer

        a = self.args
        self._check_flags()
        if not a.init:
            raise ValueError(f"{self.name} needs --init RUN_DIR_OR_CHECKPOINT (an SFT model to start from)")
        self.rewards = RewardSet(self.reward_specs(), allow_empty=bool(a.reward_model))
        names = [r.name for r in self.rewards.rewards]
        if a.reward_model and MODEL_REWARD in names:
            raise ValueError(f"--reward: a reward named '{MODEL_REWARD}' would be logged as --reward-model's "
                             "reward_model: rename the function")
        for name in TOTALS_METRICS:  # each reward's raw mean is logged as reward_<name>, beside these
            if name in names:
                raise ValueError(f"--reward: a reward named '{name}' would be logged as reward_{name}, the "
                                 f"statistic of the total rewards: rename the function")
        self._check_tool_flags()
        self.tokenizer = find_tokenizer(a.init, a.tokenizer)
        required = {f: f"the '{r.name}' reward" for r in self.rewards.rewards for f in r.fields}
        records = read_prompt_file(data, required)
        if self.toolbox is not None:
            self.toolbox.check_declared(records, str(data))
        self.prompts, kept = encode_prompts(records, self.tokenizer, a.seq_len - a.max_new_tokens, str(data))
        if not kept:
            raise ValueError(f"{data}: every prompt is longer than --seq-len {a.seq_len} - --max-new-tokens "
                             f"{a.max_new_tokens} tokens")
        if self.toolbox is not None:
            self._check_tool_template(kept, str(data))
        self.samples = [r.sample for r in kept]
        self.messages = [r.messages for r in kept]  # what a reward model reads before each completion
        self.model_reward = (load_model_reward(a.reward_model, self.tokenizer, a.seq_len, a.kernels,
                                               self.messages) if a.reward_model else None)
        skipped = len(records) - len(kept)
        if skipped and (not dist.is_initialized() or dist.get_rank() == 0):
            print(f"{data}: left out {skipped} prompt(s) longer than {a.seq_len - a.max_new_tokens} tokens",
                  flush=True)
        tok = self.tokenizer
        return {"kind": "prompts", "vocab_size": tok.vocab_size, "tokenizer_fingerprint": tok.fingerprint,
                "tokenizer_dir": str(tok.dir), "seq_len": a.seq_len, "sources": [str(data)],
                "skipped": {"too_long": skipped},
                "splits": {"train": {"tokens": sum(map(len, self.prompts)), "docs": len(kept), "shards": []}}}

    def _check_tool_flags(self) -> None:
        """Load --tools, and refuse what needs it or does not go with it."""
        a = self.args
        trajectory_rewards = [r.name for r in self.rewards.rewards if getattr(r.fn, "needs_trajectory", False)]
        if not a.tools:
            if trajectory_rewards:
                raise ValueError(f"--reward {trajectory_rewards[0]} reads the rollout's tool calls: it needs --tools")
            return
        if a.reward_model:
            raise ValueError("--reward-model with --tools: a reward model scores one reply to the prompt, not a "
                             "conversation with tool results; score multi-turn rollouts with --reward functions")
        check_timeout_support(a.tool_timeout)
        self.toolbox = Toolbox(a.tools, a.tool_timeout, a.max_tool_calls)

    def _check_tool_template(self, records: list, source: str) -> None:
        """The chat template must answer a call by appending the result (tools.check_template), tried on every
        prompt of the run (a template may render one prompt's tool results and fail on another's, which would
        stop the run at that prompt's first call; a fraction of a millisecond each) with a tool it declares (or
        any of the module's)."""
        for r in records:
            declared = [definition_name(d) for d in conversation_tools(r.messages) or []]
            try:
                check_template(self.tokenizer, r.messages, (declared or sorted(self.toolbox.functions))[0])
            except ValueError as e:
                raise ValueError(f"{source}:{r.line}: {e}") from None

    def build_loader(self, data: Path, *, split: str, rank: int, world_size: int, vocab_size: int,
                     pin_memory: bool = False) -> PromptLoader:
        if split != "train":
            raise ValueError("GRPO has no held-out loss to evaluate (rewards are logged every step)")
        a = self.args
        return PromptLoader(self.prompts, self.samples, micro_batch_size=a.micro_batch_size, seed=a.seed,
                            rank=rank, world_size=world_size, grad_accum=a.grad_accum,
                            repeats=a.updates_per_rollout, source=str(data))

    def items_tokens(self, loader: ShardLoader | PromptLoader) -> float:
        """Makes --epochs count prompts: the engine divides by micro-batch x seq_len tokens per item
        slot, and every prompt is seen `updates_per_rollout` times."""
        return self.args.seq_len * self.args.updates_per_rollout

    # --- model -----------------------------------------------------------------------------
    def setup(self, model: MiniMindForCausalLM) -> None:
        """Freeze a copy of the starting policy as the KL reference (and, under ZeRO-3, keep a full
        copy to sample with), before DeepSpeed wraps and possibly partitions the policy."""
        a = self.args
        if a.seq_len > model.config.max_position_embeddings:
            raise ValueError(f"--seq-len {a.seq_len} exceeds the model's context length "
                             f"{model.config.max_position_embeddings}")
        if a.updates_per_rollout > 1 and model.config.dropout > 0:
            # logp_old comes from the first update's forward: under dropout every later update draws
            # another mask, so the ratio moves (and clips) with no change of the weights
            raise ValueError(f"--updates-per-rollout {a.updates_per_rollout} compares the policy with itself "
                             f"across updates, which dropout {model.config.dropout:g} (the model's, or --dropout) "
                             f"turns into noise: pass --dropout 0")
        if self.kl_weight > 0:
            self.reference = freeze(copy.deepcopy(model))
        if self.zero_stage == 3:
            self.rollout_copy = freeze(copy.deepcopy(model))
        self._head_flops = self.head_flops_per_token(model.config)
        self.objective = self._objective_record(model)
        check_resumed_objective(self.resume_from, self.objective_name, self.objective, self.objective_flags,
                                RECORDED_SINCE, compared_as={"reward": reward_identity})

    def _objective_record(self, model: MiniMindForCausalLM) -> dict:
        """What the loss depends on beyond the policy: the reference (the --init weights, when the KL term
        is on), the rewards, and how rollouts are sampled and reused."""
        a = self.args
        record = {key: getattr(a, key) for key in self.objective_flags
                  if key not in ("reference", "reward", "reward_model", "reward_sources")}
        record["reward"] = sorted(self.reward_specs())
        # the user functions' code, not only their names: an edited file is another reward
        record["reward_sources"] = self.rewards.sources()
        # none without --tools: a checkpoint from before the flag recorded none
        record["tools"] = self.toolbox.fingerprint if self.toolbox else None
        record["max_turns"] = a.max_turns if self.toolbox else None
        record["max_tool_calls"] = a.max_tool_calls if self.toolbox else None
        # none when off: a checkpoint from before the flag recorded none, and resumes as an unpenalised run
        record["missing_eos_penalty"] = a.missing_eos_penalty or None
        m = self.model_reward
        record["reward_model"] = {"weights": m.scorer.fingerprint(), "weight": m.weight} if m else None
        record["reference"] = weights_fingerprint(model) if self.reference is not None else None
        return record

    def save_extra(self, model: MiniMindForCausalLM, out_dir: Path) -> None:
        save_objective(out_dir, self.objective)

    def _rollout_forwards(self) -> float:
        """Forwards per update besides the training one: to sample (the prompt's prefill, then a decoding step
        per sampled token) and the reference's (with the KL term), once per rollout, which
        --updates-per-rollout trains on that many times."""
        return (2 if self.kl_weight > 0 else 1) / self.args.updates_per_rollout

    def flops_per_token(self, model: MiniMindForCausalLM) -> float:
        """Per position a rollout row is read at (each token but its last, which no forward reads), the output
        head left out: the policy's training and the rollout's forwards. The head runs only where logits are
        taken, at the sampled tokens: `flops_in_batch` adds it there."""
        a, head = self.args, head_matmul_params(model.config)
        train = model_flops_per_token(model.config, a.seq_len) - 6 * head
        forward = forward_flops_per_token(model.config, a.seq_len) - 2 * head
        return train + forward * self._rollout_forwards()

    def head_flops_per_token(self, config: ModelConfig) -> float:
        """Per sampled token, the output head's: trained (6 per weight), and run by the rollout's forwards (the
        sampler takes one token's logits per decoding step, the reference the completion's; 2 per weight)."""
        return head_matmul_params(config) * (6 + 2 * self._rollout_forwards())

    def flops_in_batch(self, batch: dict, per_token: float) -> float:
        """The micro-batch's rollout: `per_token` over its rows' read positions (prompt + completion tokens, less
        one a row), the head over its sampled tokens; padding is not counted (nor are its tokens)."""
        r = self._trained
        return per_token * (r.tokens - r.input_ids.shape[0]) + self._head_flops * r.sampled_tokens

    # --- rollouts --------------------------------------------------------------------------
    @contextlib.contextmanager
    def _sampling_model(self, engine) -> Iterator[MiniMindForCausalLM]:
        """The policy's weights as a plain module to decode with (see the module docstring on ZeRO-3)."""
        module = getattr(engine, "module", engine)  # a plain model too (tests)
        if self.zero_stage != 3:
            yield module
            return
        import deepspeed

        # zip stops at the copy's last parameter: modules a stage adds after the copy (PPO's value head)
        # come last in the policy's parameters, and are not needed to sample
        params = list(module.parameters())
        copy_params = list(self.rollout_copy.parameters())
        with deepspeed.zero.GatheredParameters(params):
            ref = params[0]
            self.rollout_copy.to(device=ref.device, dtype=ref.dtype)
            with torch.no_grad():
                for mine, theirs in zip(copy_params, params):
                    mine.copy_(theirs.data)
        yield self.rollout_copy

    def _sample(self, engine, batch: dict) -> Rollout:
        a, tok = self.args, self.tokenizer
        g = a.group_size
        prompts = [p for p in batch["prompt_ids"] for _ in range(g)]
        module = getattr(engine, "module", engine)
        was_training = module.training
        with self._sampling_model(engine) as model:
            episodes = self._episodes(model, batch, prompts)
        module.train(was_training)
        samples = self._reward_samples(batch, episodes)
        totals, parts = self.rewards.score([e.final_text for e in episodes], samples)
        param = next(module.parameters())
        device = param.device
        if self.model_reward is not None:  # single-turn only (refused with --tools): final is the completion
            messages = [self.messages[i] for i in batch["prompt_index"] for _ in range(g)]
            totals = self._add_model_reward(totals, parts, messages, [e.final for e in episodes], param)
        cut = [not e.final or e.final[-1] != tok.eos_token_id for e in episodes]
        totals = [t - a.missing_eos_penalty * c for t, c in zip(totals, cut)]
        rewards = torch.tensor(totals, dtype=torch.float32)
        packed = pack_sequences(prompts, [e.tail for e in episodes], tok.pad_token_id, [e.sampled for e in episodes])
        input_ids, targets, mask = (t.to(device) for t in packed)
        advantages, own_metrics = self._sampled_advantages(rewards)
        metrics = {"reward_mean": rewards.mean().item(), "reward_std": rewards.std(unbiased=False).item(),
                   **{f"reward_{k}": sum(v) / len(v) for k, v in parts.items()},
                   "completion_len": sum(sum(e.sampled) for e in episodes) / len(episodes),
                   "truncated": sum(cut) / len(cut), **self._tool_metrics(episodes), **own_metrics}
        return Rollout(input_ids, targets, mask, rewards.to(device),
                       advantages.to(device) if advantages is not None else None,
                       self._reference_logprobs(input_ids, targets, param.dtype), None, metrics,
                       sum(len(e.ids) for e in episodes), sum(sum(e.sampled) for e in episodes))

    def _episodes(self, model: MiniMindForCausalLM, batch: dict, prompts: list[list[int]]) -> list[Episode]:
        """Each row's rollout: one turn, or with --tools as many as the calls ask for (tools.run_episodes)."""
        a = self.args
        rank = dist.get_rank() if dist.is_initialized() else 0
        messages = ([self.messages[i] for i in batch["prompt_index"] for _ in range(a.group_size)]
                    if self.toolbox else None)

        def sample_turn(ids: list[list[int]], budgets: list[int], turn: int) -> list[list[int]]:
            return self._sample_turn(model, ids, budgets, rollout_seed(a.seed, rank, batch["rollout_id"], turn))

        return run_episodes(prompts, messages, sample_turn, self.tokenizer, self.toolbox, a.max_turns, a.seq_len,
                            a.max_new_tokens)

    def _sample_turn(self, model: MiniMindForCausalLM, prompts: list[list[int]], budgets: list[int],
                     seed: int) -> list[list[int]]:
        """One turn of every row, at most `budgets[i]` new tokens each (the stop token kept, as it is scored),
        in as few decoder batches as the model's context allows."""
        a, tok = self.args, self.tokenizer
        out: list[list[int]] = [[] for _ in prompts]
        done = 0  # rows already seeded: every row gets its own seed (generate gives row j seed + j)
        for rows in decode_groups([len(p) for p in prompts], budgets, model.config.max_position_embeddings):
            config = GenerationConfig(max_new_tokens=max(budgets[i] for i in rows), temperature=a.temperature,
                                      top_k=a.top_k, top_p=a.top_p, stop_token_ids=[tok.eos_token_id],
                                      seed=seed + done)
            completions = generate(model, [prompts[i] for i in rows], config, pad_id=tok.pad_token_id,
                                   keep_stop_token=True)
            for i, c in zip(rows, completions):
                out[i] = c[:budgets[i]]
            done += len(rows)
        return out

    def _reward_samples(self, batch: dict, episodes: list[Episode]) -> list[dict]:
        """What the rewards get as `sample`: the prompt's record, and with --tools each row's conversation and
        where the rollout's own messages start in it (a copy per row: the G rows of a prompt share a record)."""
        g = self.args.group_size
        samples = [s for s in batch["samples"] for _ in range(g)]
        if self.toolbox is None:
            return samples
        starts = [len(self.messages[i]) for i in batch["prompt_index"] for _ in range(g)]
        return [{**s, TRAJECTORY: e.messages, TRAJECTORY_START: start}
                for s, e, start in zip(samples, episodes, starts)]

    def _tool_metrics(self, episodes: list[Episode]) -> dict[str, float]:
        """Tool calls answered per rollout, the share of them answered with an error, turns per rollout."""
        if self.toolbox is None:
            return {}
        calls = sum(e.calls for e in episodes)
        return {"tool_calls": calls / len(episodes), "tool_errors": sum(e.errors for e in episodes) / max(calls, 1),
                "turns": sum(e.turns for e in episodes) / len(episodes)}

    def _add_model_reward(self, totals: list[float], parts: dict[str, list[float]], messages: list[list[dict]],
                          completions: list[list[int]], like: torch.Tensor) -> list[float]:
        """The totals with --reward-model's weighted scores added (its raw scores into `parts`). It scores on
        the policy's device and in its precision: each rank with its own full copy (it is frozen and small)."""
        m = self.model_reward
        scores = m.scorer.to(like.device, like.dtype).score(messages, completions)
        parts[MODEL_REWARD] = scores
        return [t + m.weight * s for t, s in zip(totals, scores)]

    def _sampled_advantages(self, rewards: torch.Tensor) -> tuple[torch.Tensor | None, dict[str, float]]:
        """Advantages known when the rollout is scored (GRPO's, from the groups; PPO's need the critic's
        values and wait for the first update), and the stage's metrics of them."""
        groups = rewards.view(-1, self.args.group_size)
        return (group_advantages(rewards, self.args.group_size),
                {"no_signal_groups": (groups.std(-1) == 0).float().mean().item()})

    @torch.no_grad()
    def _reference_logprobs(self, input_ids: torch.Tensor, targets: torch.Tensor,
                            dtype: torch.dtype) -> torch.Tensor | None:
        """The frozen reference's log-probabilities, in the policy's device and precision."""
        if self.reference is None:
            return None
        self.reference.to(device=input_ids.device, dtype=dtype)
        logits = self.reference(input_ids, logits_to_keep=targets.shape[1]).logits
        return token_logprobs(logits, targets, self.args.temperature)

    def _rollout(self, engine, batch: dict) -> Rollout:
        """This micro-batch's rollout: sampled on its first pass, replayed from the buffer after."""
        rid, last_pass = batch["rollout_id"], batch["rollout_pass"] == self.args.updates_per_rollout - 1
        rollout = self.buffer.get(rid) if batch["rollout_pass"] > 0 else None
        if rollout is None:  # a first pass, or a resume part-way through this rollout's passes
            rollout = self._sample(engine, batch)
        if last_pass:
            self.buffer.pop(rid, None)
        else:
            self.buffer[rid] = rollout
        return rollout

    # --- loss ------------------------------------------------------------------------------
    def compute_loss(self, model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        a = self.args
        r = self._trained = self._rollout(model, batch)
        out = model(r.input_ids, logits_to_keep=r.targets.shape[1])
        logprobs = token_logprobs(out.logits, r.targets, a.temperature)
        if r.old_logprobs is None:
            r.old_logprobs = logprobs.detach()
        loss, stats = grpo_loss(logprobs, r.old_logprobs, r.ref_logprobs, r.advantages, r.mask,
                                a.clip_eps, a.kl_beta)
        if self.uses_moe(model) and out.aux_loss is not None:
            loss = loss + out.aux_loss
        return loss, {**r.metrics, **stats}  # the engine averages them over ranks

    def eval_loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        raise NotImplementedError("GRPO has no held-out loss")

    def tokens_in_batch(self, batch: dict) -> int:
        """Prompt + completion tokens of the micro-batch just trained on (known only after sampling)."""
        return self._trained.tokens

