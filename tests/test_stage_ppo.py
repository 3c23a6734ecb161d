"""PPO: per-token rewards, GAE, whitening and the loss against float64 hand computations, the value
head's gradient and its place in checkpoints, and runs of `launch/ppo.py` as users run them
(subprocesses, DeepSpeed on the CPU)."""

from __future__ import annotations

import math
import re
import statistics
from pathlib import Path

import pytest
import torch
from launch_helpers import records, run, two_ranks
from safetensors import safe_open

from minimind_fast.chat import load_chat_model
from minimind_fast.checkpoint import load_model, read_safetensors, state_dict_for_saving
from minimind_fast.training.ppo import (
    VALUE_HEAD_FILE,
    clipped_value_loss,
    gae,
    ppo_loss,
    token_rewards,
    whiten,
)

# ------------------------------------------------------------------------------- the maths by hand

# Completion tokens of three rows in a K = 7 window: after a longer prompt and before padding, the
# whole window, and a short one.
MASK = torch.tensor([[0, 0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1], [0, 1, 1, 0, 0, 0, 0]], dtype=torch.bool)


def _hand_gae(rewards, logp, ref, values, kl_coef, gamma, lam, mask=MASK):
    """Per row, over its completion tokens only: the rewards, then GAE backwards from a terminal 0."""
    token_r, adv = torch.zeros_like(values), torch.zeros_like(values)
    for i in range(mask.shape[0]):
        idx = [t for t in range(mask.shape[1]) if mask[i, t]]
        r = [-kl_coef * (logp[i, t].item() - ref[i, t].item()) for t in idx]
        r[-1] += rewards[i].item()
        running = next_value = 0.0
        for j in reversed(range(len(idx))):
            t = idx[j]
            delta = r[j] + gamma * next_value - values[i, t].item()
            running = delta + gamma * lam * running
            next_value = values[i, t].item()
            token_r[i, t], adv[i, t] = r[j], running
    return token_r, adv


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 0.7)])
def test_token_rewards_gae_and_whitening_equal_a_float64_loop(gamma, lam):
    g = torch.Generator().manual_seed(3)
    shape = MASK.shape
    logp = -3 * torch.rand(shape, generator=g, dtype=torch.float64)
    ref = logp + 0.5 * torch.randn(shape, generator=g, dtype=torch.float64)
    values = torch.randn(shape, generator=g, dtype=torch.float64)
    rewards = torch.tensor([1.0, 0.0, 0.6], dtype=torch.float64)
    expected_r, expected_adv = _hand_gae(rewards, logp, ref, values, 0.1, gamma, lam)

    got_r = token_rewards(rewards, logp, ref, MASK, 0.1)
    assert torch.allclose(got_r, expected_r, atol=1e-12, rtol=0)
    got_adv = gae(got_r, values, MASK, gamma, lam)
    assert torch.allclose(got_adv, expected_adv, atol=1e-12, rtol=0)

    flat = [expected_adv[i, t].item() for i in range(shape[0]) for t in range(shape[1]) if MASK[i, t]]
    mean = sum(flat) / len(flat)
    std = math.sqrt(sum((a - mean) ** 2 for a in flat) / len(flat) + 1e-8)
    white = whiten(got_adv, MASK)
    expected_white = torch.where(MASK, (expected_adv - mean) / std, 0.0)
    assert torch.allclose(white, expected_white, atol=1e-12, rtol=0)
    # Without a reference the rewards are the completions' own, at their last token only.
    plain = token_rewards(rewards + 1, logp, None, MASK, 0.1)
    assert plain.nonzero().tolist() == [[0, 5], [1, 6], [2, 2]] and plain[[0, 1, 2], [5, 6, 2]].tolist() == [2, 1, 1.6]


def test_gae_runs_across_the_tool_results_between_turns():
    """A multi-turn rollout's sampled tokens have tool results between them (outside the mask): the
    estimates are those of the sampled tokens side by side, the final reward reaching the first turn."""
    mask = torch.tensor([[0, 1, 1, 0, 0, 1, 1, 0], [1, 0, 1, 0, 1, 1, 0, 0]], dtype=torch.bool)
    g = torch.Generator().manual_seed(5)
    logp = -3 * torch.rand(mask.shape, generator=g, dtype=torch.float64)
    ref = logp + 0.5 * torch.randn(mask.shape, generator=g, dtype=torch.float64)
    values = torch.randn(mask.shape, generator=g, dtype=torch.float64)
    rewards = torch.tensor([1.0, -0.5], dtype=torch.float64)
    expected_r, expected_adv = _hand_gae(rewards, logp, ref, values, 0.1, 0.9, 0.8, mask)
    got_r = token_rewards(rewards, logp, ref, mask, 0.1)
    assert torch.allclose(got_r, expected_r, atol=1e-12, rtol=0)
    assert torch.allclose(gae(got_r, values, mask, 0.9, 0.8), expected_adv, atol=1e-12, rtol=0)


def test_ppo_loss_and_gradients_equal_the_formula_in_float64():
    """Policy and value terms over a hand-built batch where both clips act on some tokens, not all."""
    g = torch.Generator().manual_seed(0)
    shape, clip, clip_v, vf_coef = MASK.shape, 0.2, 0.2, 0.5
    logp = (-3 * torch.rand(shape, generator=g, dtype=torch.float64)).requires_grad_(True)
    old = logp.detach() + 0.3 * torch.randn(shape, generator=g, dtype=torch.float64)
    values = torch.randn(shape, generator=g, dtype=torch.float64).requires_grad_(True)
    old_values = values.detach() + 0.4 * torch.randn(shape, generator=g, dtype=torch.float64)
    returns = torch.randn(shape, generator=g, dtype=torch.float64)
    adv = torch.randn(shape, generator=g, dtype=torch.float64)
    loss, stats = ppo_loss(logp, old, adv, values, old_values, returns, MASK, clip, clip_v, vf_coef)
    loss.backward()

    count = int(MASK.sum())
    policy = value = clipped = value_clipped = 0.0
    grad_logp, grad_v = torch.zeros(shape, dtype=torch.float64), torch.zeros(shape, dtype=torch.float64)
    for i, t in MASK.nonzero().tolist():
        a, v, vo, ret = adv[i, t].item(), values[i, t].item(), old_values[i, t].item(), returns[i, t].item()
        r = math.exp(logp[i, t].item() - old[i, t].item())
        policy -= min(r * a, min(max(r, 1 - clip), 1 + clip) * a)
        is_clipped = (r > 1 + clip and a > 0) or (r < 1 - clip and a < 0)
        clipped += is_clipped
        grad_logp[i, t] = (0.0 if is_clipped else -r * a) / count
        v_clip = vo + min(max(v - vo, -clip_v), clip_v)
        free, held = (v - ret) ** 2, (v_clip - ret) ** 2
        value += 0.5 * max(free, held)
        value_clipped += held > free
        # d/dV: the unclipped term gives (V - R); the clipped one (V_clip - R) while V is inside the range, else 0.
        inside = abs(v - vo) < clip_v
        grad_v[i, t] = vf_coef * ((v_clip - ret) * inside if held > free else v - ret) / count
    assert stats["policy_loss"] == pytest.approx(policy / count, abs=1e-12)
    assert stats["value_loss"] == pytest.approx(value / count, abs=1e-12)
    assert loss.item() == pytest.approx((policy + vf_coef * value) / count, abs=1e-12)
    assert stats["clip_fraction"] == pytest.approx(clipped / count, abs=1e-12)
    assert stats["value_clip_fraction"] == pytest.approx(value_clipped / count, abs=1e-12)
    assert 0 < stats["clip_fraction"] < 1 and 0 < stats["value_clip_fraction"] < 1  # both branches of both
    assert torch.allclose(logp.grad, grad_logp, atol=1e-12, rtol=0)
    assert torch.allclose(values.grad, grad_v, atol=1e-12, rtol=0)
    same, frac = clipped_value_loss(values.detach(), values.detach(), returns, MASK, clip_v)
    assert frac == 0 and same.item() == pytest.approx(
        0.5 * ((values.detach() - returns) ** 2)[MASK].mean().item(), abs=1e-12)


# ------------------------------------------------------------------------------------ the stage

def _ppo_stage(init: Path, data: Path, *flags: str):
    """A PPO stage set up as the engine does before DeepSpeed (data, model, setup), and its model."""
    from minimind_fast.training.args import training_parser
    from minimind_fast.training.ppo import PPOStage

    parser = training_parser("ppo", "ppo")
    PPOStage.add_arguments(parser)
    stage = PPOStage(parser.parse_args(["--init", str(init), "--data", str(data), "--out", "unused",
                                        "--kernels", "reference", "--seq-len", "128", "--max-new-tokens", "16",
                                        *flags]))
    model = stage.build_model(stage.open_data(data))
    stage.setup(model)
    return stage, model


def test_value_head_gets_the_value_loss_gradient_and_stays_out_of_the_model(random_init, letter_reward,
                                                                           builtin_data):
    """The zero-initialised head's first gradient is vf_coef * mean over completion tokens of
    (V - R) * [h, 1] with V = 0, by hand from the rollout's returns and hidden states; the policy's
    weights saved apart from it are the plain model's."""
    data = builtin_data["files"]["grpo_prompts"]
    stage, model = _ppo_stage(random_init, data, "--reward", letter_reward, "--micro-batch-size", "3",
                              "--vf-coef", "0.5", "--updates-per-rollout", "2")  # 2: the rollout stays buffered
    batch = next(iter(stage.build_loader(data, split="train", rank=0, world_size=1, vocab_size=1024)))
    loss, metrics = stage.compute_loss(model, batch)
    loss.backward()
    r = stage.buffer[batch["rollout_id"]]
    assert metrics["value_loss"] > 0 and metrics["ratio_mean"] == 1.0 and r.old_values.abs().max() == 0
    with torch.no_grad():
        h = model(r.input_ids, logits_to_keep=1).hidden_states[:, -r.targets.shape[1]:].double()
    m = r.mask.double()
    error = (0 - r.returns.double()) * m / m.sum()  # dL/dV per token, before vf_coef
    head = model.value_head
    assert torch.allclose(head.weight.grad.double(), 0.5 * (error[..., None] * h).sum((0, 1))[None],
                          atol=1e-6, rtol=1e-5)
    assert head.bias.grad.item() == pytest.approx(0.5 * error.sum().item(), abs=1e-6)
    assert head.weight.grad.abs().max() > 0
    # What a checkpoint writes: the plain model's keys in model.safetensors, the head's apart.
    policy, own = stage.split_weights(state_dict_for_saving(model))
    del model.value_head
    assert set(policy) == set(state_dict_for_saving(model)) and set(own) == {"weight", "bias"}


@pytest.mark.parametrize("value_lr, expected", [(None, 10 * 2e-4), ("5e-3", 5e-3)])
def test_the_value_head_has_its_own_learning_rate(random_init, letter_reward, builtin_data, value_lr, expected):
    """The policy's groups at --lr (matrices decayed, vectors not), the head's at --value-lr (default
    10 x --lr), every trainable parameter in exactly one group."""
    flags = ["--reward", letter_reward, "--lr", "2e-4", "--weight-decay", "0.1"]
    stage, model = _ppo_stage(random_init, builtin_data["files"]["grpo_prompts"], *flags,
                              *(["--value-lr", value_lr] if value_lr else []))
    groups = stage.parameter_groups(model, 2e-4, 0.1)
    head = {id(p) for p in model.value_head.parameters()}
    assert [(g["lr"], g["weight_decay"], all(id(p) in head for p in g["params"])) for g in groups] == [
        (2e-4, 0.1, False), (2e-4, 0.0, False), (expected, 0.1, True), (expected, 0.0, True)]
    assert not any(id(p) in head for g in groups[:2] for p in g["params"])
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("flag, value, message", [
    ("--value-lr", "0", "--value-lr must be > 0 and finite, got 0.0"),
    ("--value-lr", "nan", "--value-lr must be > 0 and finite, got nan"),
    ("--vf-coef", "-1", "--vf-coef must be >= 0 and finite, got -1.0"),
    ("--kl-coef", "inf", "--kl-coef must be >= 0 and finite, got inf"),
    ("--cliprange-value", "0", "--cliprange-value must be > 0 and finite, got 0.0"),
    ("--gamma", "1.5", "--gamma must be in [0, 1], got 1.5"),
    ("--lam", "-0.1", "--lam must be in [0, 1], got -0.1"),
])
def test_bad_ppo_flags_are_refused_naming_them(random_init, letter_reward, builtin_data, flag, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        _ppo_stage(random_init, builtin_data["files"]["grpo_prompts"], "--reward", letter_reward, flag, value)


# ------------------------------------------------------------------------------ runs end to end

def ppo_args(init: Path, data: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return ["--init", str(init), "--data", str(data), "--out", str(out), "--steps", str(steps),
            "--seq-len", "128", "--micro-batch-size", "8", "--max-new-tokens", "32", "--temperature", "0.8",
            "--updates-per-rollout", "2", "--lr", "1e-4", "--save-every", "1000", "--seed", "1", *extra]


@pytest.fixture(scope="module")
def ppo_run(sft_run, builtin_data, tmp_path_factory) -> Path:
    """40 PPO steps from the SFT'd tiny model on the built-in prompts (answer + format rewards, the
    default PPO settings), each rollout used for 2 updates, with a checkpoint at step 36."""
    out = tmp_path_factory.mktemp("ppo") / "run"
    run("ppo.py", ppo_args(sft_run, builtin_data["files"]["grpo_prompts"], out, 40, "--save-every", "36"))
    return out


def test_ppo_trains_the_critic_on_the_builtin_prompts(ppo_run):
    """The critic starts at zero and learns the returns: the last third's typical value loss is well below the
    zero critic's (first step), and over the last third its mean value is close to the returns' mean, which a
    critic stuck at zero would miss by all of it. Mean losses are not compared: a batch of outlier rewards
    (0.4 against a typical 0.2) puts a single step's loss 10x above the others; nor are per-step gaps, which
    that batch-to-batch spread of returns bounds from below. (Seeds 1-5 at the default --value-lr gave median
    ratios of 0.13-0.58; at the policy's own rate the head had not come halfway in 40 steps.) The tiny
    model's reward barely moves in 40 steps with one completion per prompt, so it is not what is checked."""
    logged = records(ppo_run)
    last = logged[-(len(logged) // 3):]
    returns = statistics.mean(r["returns_mean"] for r in last)
    values = statistics.mean(r["value_mean"] for r in last)

    assert statistics.median(r["value_loss"] for r in last) < 0.75 * logged[0]["value_loss"], [
        r["value_loss"] for r in logged]
    assert abs(returns - values) < 0.4 * abs(returns), (returns, values)
    assert logged[0]["value_mean"] == 0 and logged[0]["explained_variance"] == 0  # the zero critic
    assert logged[0]["ratio_mean"] == 1.0 and any(r["clip_fraction"] > 0 for r in logged[1::2])
    assert max(r["kl"] for r in logged) > 0  # the policy moved away from the reference


def test_final_model_is_the_plain_policy_and_the_value_head_is_apart(ppo_run, builtin_data):
    """final/ (a copy of the last checkpoint's model/) loads in chat as any model does, without the
    head; the head, trained away from its zero start, is in value_head.safetensors beside it."""
    final = ppo_run / "final"
    with safe_open(str(final / "model.safetensors"), "pt") as f:
        assert not any(k.startswith("value_head") for k in f.keys())
    model = load_chat_model(final, device="cpu", dtype="fp32")
    assert set(state_dict_for_saving(model)) == set(state_dict_for_saving(load_model(final)))
    head = read_safetensors(final / VALUE_HEAD_FILE)
    assert head["weight"].shape == (1, model.config.hidden_size) and head["bias"].shape == (1,)
    assert head["weight"].abs().max() > 0
    ckpt_head = read_safetensors(ppo_run / "checkpoints" / "step_00000040" / "model" / VALUE_HEAD_FILE)
    assert all(torch.equal(head[k], ckpt_head[k]) for k in head)


def test_resume_continues_exactly(ppo_run, sft_run, builtin_data, tmp_path):
    """Resumed from the run's step-36 checkpoint (a rollout boundary) into another directory, the last
    4 steps repeat the uninterrupted run's bitwise: DeepSpeed's state restores the value head with the
    policy, and the rollouts are seeded per (seed, rank, rollout)."""
    out = tmp_path / "resumed"
    ckpt = ppo_run / "checkpoints" / "step_00000036"
    proc = run("ppo.py", [*ppo_args(sft_run, builtin_data["files"]["grpo_prompts"], out, 40, "--save-every", "36"),
                          "--resume", str(ckpt)])
    assert f"resumed from {ckpt}" in proc.stdout
    full, resumed = records(ppo_run)[36:], records(out)
    assert [r["step"] for r in resumed] == [37, 38, 39, 40]
    for key in ("loss", "value_loss", "policy_loss", "reward_mean", "kl", "value_mean", "completion_len"):
        assert [r[key] for r in resumed] == [r[key] for r in full], key
    for name in ("model.safetensors", VALUE_HEAD_FILE):
        assert read_safetensors(out / "final" / name).keys() == read_safetensors(ppo_run / "final" / name).keys()
        assert all(torch.equal(v, read_safetensors(ppo_run / "final" / name)[k])
                   for k, v in read_safetensors(out / "final" / name).items()), name


def test_two_ranks_zero3_sample_and_train_like_zero0(random_init, letter_reward, builtin_data, tmp_path):
    """MiniMind's RL trainers stepped the unwrapped model, so ranks never averaged their gradients. Ours
    step through DeepSpeed's engine like every stage: two ranks under ZeRO 0 (gradients all-reduced
    after backward) and ZeRO 3 (reduce-scattered into partitions, the value head's too) must log the same
    run, step after step, as they diverge once either one leaves a rank's gradient un-averaged."""
    runs = {}
    for stage in (0, 3):
        out = tmp_path / f"zero{stage}"
        args = ppo_args(random_init, builtin_data["files"]["grpo_prompts"], out, 4, "--zero-stage", str(stage),
                        "--micro-batch-size", "2", "--max-new-tokens", "16", "--lr", "1e-3",
                        "--reward", letter_reward)
        run("ppo.py", args, launcher=two_ranks(29670 + stage))
        runs[stage] = records(out)
    assert len(runs[0]) == len(runs[3]) == 4
    for a, b in zip(runs[0], runs[3]):
        assert a["reward_mean"] == b["reward_mean"] and a["completion_len"] == b["completion_len"]
        for key in ("loss", "value_loss", "value_mean"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (key, a, b)

