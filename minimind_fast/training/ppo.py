"""PPO: GRPO's rollouts (prompts, KV-cache sampling, rewards, a frozen reference, reuse over
`--updates-per-rollout`) scored by a learnt critic instead of a group.

The critic is a scalar value head, `nn.Linear(hidden_size, 1)`, on the policy's final hidden states
(a shared trunk), trained jointly with the policy. It starts at zero output (weight and bias zero), so
the first rollouts' advantages are the rewards' own and its gradient reaches the trunk only once it
has learnt something. Per completion token t (the position predicting it gives V_t):

    r_t = -kl_coef * (logp_old_t - logp_ref_t)  (+ the completion's reward at its last token)
    delta_t = r_t + gamma * V_{t+1} - V_t,  V after the last token = 0
    A_t = delta_t + gamma * lam * A_{t+1}  (GAE),  returns R_t = A_t + V_t

With --tools (multi-turn rollouts, see grpo.py) t runs over the sampled tokens only: the tool results
between turns are skipped, neither steps nor discounted. A is then whitened over the micro-batch's
completion tokens. The loss averages over those tokens

    -min(ratio * A, clip(ratio, 1 - clip_eps, 1 + clip_eps) * A)
    + vf_coef * 0.5 * max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2),  c = cliprange_value.

`logp_old` and `V_old` come from the first update's forward (as GRPO's `logp_old`, see grpo.py), which
is also where the advantages are computed; the KL to the reference is in the reward, not in the loss.

The value head lives in the module DeepSpeed trains but is no part of the policy (see heads.py): each
checkpoint's `model/` keeps it apart in `value_head.safetensors`, and `model.safetensors` stays a plain
policy that chat, convert and later stages load.
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import nn

from minimind_fast.config import ModelConfig
from minimind_fast.model import MiniMindForCausalLM
from minimind_fast.training.grpo import (
    OBJECTIVE_FLAGS,
    GRPOStage,
    Rollout,
    add_rollout_arguments,
    grpo_loss,
    token_logprobs,
)
from minimind_fast.training.heads import OwnHead, attach_scalar_head
from minimind_fast.training.stages import decay_groups

VALUE_HEAD = "value_head"  # the attribute on the policy, and its keys' prefix in the state dict
VALUE_HEAD_FILE = "value_head.safetensors"  # in a checkpoint's model/ (keys `weight`, `bias`)
WHITEN_EPS = 1e-8
VALUE_LR_RATIO = 10.0  # --value-lr's default, over --lr
PPO_OBJECTIVE_FLAGS = {**{k: v for k, v in OBJECTIVE_FLAGS.items() if k != "kl_beta"},
                       "reference": "the reference's weights (--init, when --kl-coef > 0)", "kl_coef": "--kl-coef",
                       "vf_coef": "--vf-coef", "cliprange_value": "--cliprange-value", "gamma": "--gamma",
                       "lam": "--lam", "value_lr": "--value-lr"}


# ------------------------------------------------------------------------------------- the maths

def token_rewards(rewards: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor | None,
                  mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token rewards (N, K): -kl_coef * (logp - logp_ref) on the completion tokens, and each
    completion's reward (N,) added at its last token. Zero outside `mask`."""
    per_token = torch.zeros_like(logprobs)
    if ref_logprobs is not None and kl_coef:
        per_token = -kl_coef * (logprobs - ref_logprobs)
    # The last sampled token is where the running count reaches the total (tool results between turns or not).
    last = mask & (mask.cumsum(-1) == mask.sum(-1, keepdim=True))
    return (per_token + last * rewards[:, None].to(per_token.dtype)) * mask


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> torch.Tensor:
    """Generalised advantage estimates (N, K) over each row's completion tokens (`mask`), as if they were
    consecutive: tokens outside the mask between them (a multi-turn rollout's tool results) are no steps
    of the policy, so the estimate runs across them undiscounted. The value after a completion's last
    token is 0 (the episode ends there). Zero outside `mask`."""
    advantages = torch.zeros_like(values)
    running = next_value = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        # Outside the mask both carry over: from 0 in the padding after the completion, across the gaps
        running = torch.where(m, delta + gamma * lam * running, running)
        next_value = torch.where(m, values[:, t], next_value)
        advantages[:, t] = torch.where(m, running, 0.0)
    return advantages


def masked_mean_var(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and population variance of the masked entries."""
    m = mask.to(x.dtype)
    n = m.sum().clamp(min=1)
    mean = (x * m).sum() / n
    return mean, ((x - mean) ** 2 * m).sum() / n


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = WHITEN_EPS) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the masked entries (population variance); zero elsewhere."""
    mean, var = masked_mean_var(x, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask.to(x.dtype)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var(R - V) / Var(R) over the masked entries: 0 for a constant critic (the zero one it starts as),
    1 for a perfect one, below 0 for one worse than a constant."""
    return 1 - masked_mean_var(returns - values, mask)[1] / masked_mean_var(returns, mask)[1].clamp(min=1e-12)


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                       clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """0.5 * max((V - R)^2, (V_old + clip(V - V_old, -clip, clip) - R)^2) averaged over `mask`, and the
    fraction of tokens where the clipped term is the larger (detached)."""
    m = mask.to(values.dtype)
    n = m.sum().clamp(min=1)
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    free, held = (values - returns) ** 2, (clipped - returns) ** 2
    loss = (0.5 * torch.maximum(free, held) * m).sum() / n
    return loss, ((held > free) * m).sum().detach() / n


def ppo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, values: torch.Tensor,
             old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip_eps: float,
             cliprange_value: float, vf_coef: float) -> tuple[torch.Tensor, dict[str, float]]:
    """The clipped policy objective (GRPO's, per-token advantages, no KL term) + vf_coef x the clipped
    value loss, over the completion tokens. All (N, K)."""
    policy, stats = grpo_loss(logprobs, old_logprobs, None, advantages, mask, clip_eps, 0.0)
    value, value_clipped = clipped_value_loss(values, old_values, returns, mask, cliprange_value)
    stats.pop("kl")  # zero here: PPO's KL is in the rewards, logged with the rollout
    stats.update(policy_loss=policy.item(), value_loss=value.item(), value_clip_fraction=value_clipped.item())
    return policy + vf_coef * value, stats


# ------------------------------------------------------------------------------------ the critic

def attach_value_head(model: MiniMindForCausalLM) -> nn.Linear:
    """A zero-output scalar head on the final hidden states, registered on the policy (so that DeepSpeed
    trains it), on the policy's device and dtype."""
    return attach_scalar_head(model, VALUE_HEAD, std=0.0)


def token_values(model: torch.nn.Module, hidden_states: torch.Tensor, k: int) -> torch.Tensor:
    """V at the last k positions (those that predict the kept targets), in fp32 at least: (N, k)."""
    head = getattr(getattr(model, "module", model), VALUE_HEAD)
    values = head(hidden_states[:, -k:]).squeeze(-1)
    return values.to(torch.promote_types(values.dtype, torch.float32))


# -------------------------------------------------------------------------------------- the stage

class PPOStage(OwnHead, GRPOStage):
    """PPO: sample a completion per prompt, reward it, and train the policy with a learnt critic (GAE)."""

    name = "ppo"
    objective_name = "PPO objective"
    objective_flags = PPO_OBJECTIVE_FLAGS
    head_name, head_file = VALUE_HEAD, VALUE_HEAD_FILE

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        g = add_rollout_arguments(parser, "ppo", group_size=1)
        g.add_argument("--kl-coef", type=float, default=0.05,
                       help="weight of the per-token KL to the reference in the reward (0: no reference)")
        g.add_argument("--vf-coef", type=float, default=0.1, help="weight of the value loss")
        g.add_argument("--value-lr", type=float, help=f"peak learning rate of the value head (default: "
                       f"{VALUE_LR_RATIO:g} x --lr; it starts at zero, far from the returns)")
        g.add_argument("--cliprange-value", type=float, default=0.2,
                       help="how far a value may move from the rollout's before its loss is clipped")
        g.add_argument("--gamma", type=float, default=1.0, help="discount over completion tokens")
        g.add_argument("--lam", type=float, default=0.95, help="GAE lambda")

    def _objective_flag_problems(self) -> list[str]:
        a, problems = self.args, []
        if a.group_size < 1:
            problems.append(f"--group-size must be >= 1, got {a.group_size}")
        # Written so that NaN fails too.
        for flag, value in (("--kl-coef", a.kl_coef), ("--vf-coef", a.vf_coef)):
            if not 0 <= value < math.inf:
                problems.append(f"{flag} must be >= 0 and finite, got {value}")
        if not 0 < a.cliprange_value < math.inf:
            problems.append(f"--cliprange-value must be > 0 and finite, got {a.cliprange_value}")
        for flag, value in (("--gamma", a.gamma), ("--lam", a.lam)):
            if not 0 <= value <= 1:
                problems.append(f"{flag} must be in [0, 1], got {value}")
        if a.value_lr is not None and not 0 < a.value_lr < math.inf:
            problems.append(f"--value-lr must be > 0 and finite, got {a.value_lr}")
        return problems

    @property
    def kl_weight(self) -> float:
        return self.args.kl_coef

    def setup(self, model: MiniMindForCausalLM) -> None:
        """GRPO's set-up (reference, sampling copy, objective check) on the plain policy, then the critic."""
        super().setup(model)
        attach_value_head(model)

    def head_flops_per_token(self, config: ModelConfig) -> float:
        """GRPO's, and the value head's training (hidden_size weights, 6 FLOPs each), read at the same tokens."""
        return super().head_flops_per_token(config) + 6 * config.hidden_size

    def parameter_groups(self, model: torch.nn.Module, lr: float, weight_decay: float) -> list[dict]:
        """The policy's groups at --lr, then the head's at --value-lr. Under Adam a parameter's step is
        about its learning rate whatever the gradient's scale, so --vf-coef cannot speed the head up:
        at the policy's rate a zero head took over 40 steps to come halfway to the returns."""
        head = list(getattr(model, VALUE_HEAD).parameters())
        in_head = {id(p) for p in head}
        policy = [p for p in self.trainable_parameters(model) if id(p) not in in_head]
        value_lr = self.args.value_lr if self.args.value_lr is not None else VALUE_LR_RATIO * lr
        return decay_groups(policy, lr, weight_decay) + decay_groups(head, value_lr, weight_decay)

    def _sampled_advantages(self, rewards: torch.Tensor) -> tuple[None, dict[str, float]]:
        return None, {}  # they need the critic's values: see `_score`

    def _score(self, r: Rollout, logprobs: torch.Tensor, values: torch.Tensor) -> None:
        """At the rollout's first update, with the weights that sampled it: keep logp_old and V_old, and
        compute the advantages and returns from them."""
        a, mask = self.args, r.mask
        r.old_logprobs, r.old_values = logprobs, values
        advantages = gae(token_rewards(r.rewards, logprobs, r.ref_logprobs, mask, a.kl_coef), values, mask,
                         a.gamma, a.lam)
        r.returns = advantages + values
        r.advantages = whiten(advantages, mask)
        kl = masked_mean_var(logprobs - r.ref_logprobs, mask)[0] if r.ref_logprobs is not None else torch.zeros(())
        r.metrics.update(kl=kl.item(), value_mean=masked_mean_var(values, mask)[0].item(),
                         returns_mean=masked_mean_var(r.returns, mask)[0].item(),
                         explained_variance=explained_variance(values, r.returns, mask).item())

    def compute_loss(self, model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        a = self.args
        r = self._trained = self._rollout(model, batch)
        k = r.targets.shape[1]
        out = model(r.input_ids, logits_to_keep=k)
        logprobs = token_logprobs(out.logits, r.targets, a.temperature)
        values = token_values(model, out.hidden_states, k)
        if r.old_logprobs is None:
            self._score(r, logprobs.detach(), values.detach())
        loss, stats = ppo_loss(logprobs, r.old_logprobs, r.advantages, values, r.old_values, r.returns, r.mask,
                               a.clip_eps, a.cliprange_value, a.vf_coef)
        if self.uses_moe(model) and out.aux_loss is not None:
            loss = loss + out.aux_loss
        return loss, {**r.metrics, **stats}
