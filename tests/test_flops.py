"""The FLOPs per token behind MFU, against torch's FLOP counter over a real forward and backward."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from minimind_fast.config import get_preset
from minimind_fast.model import MiniMindForCausalLM
from minimind_fast.training.flops import datasheet_peak, model_flops_per_token, peak_flops


@pytest.mark.parametrize("variant", [{}, {"tie_word_embeddings": False},
                                     {"use_moe": True, "n_routed_experts": 4, "num_experts_per_tok": 2}])
def test_flops_per_token_is_what_a_training_step_multiplies(variant, monkeypatch):
    """6 x active matmul weights + 12 L T d for attention (the full QK^T and AV products, as counted when
    SDPA runs its plain-matmul path), per token of a forward and backward."""
    monkeypatch.setenv("MINIMIND_ATTENTION", "sdpa")
    config = get_preset("tiny", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        vocab_size=512, max_position_embeddings=64, kernels="reference", **variant)
    model = MiniMindForCausalLM(config)
    batch, seq = 2, 48
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        out = model(input_ids=ids, targets=ids)
        (out.loss + out.aux_loss).backward()
    assert model_flops_per_token(config, seq) == counter.get_total_flops() / (batch * seq)


def test_no_peak_and_so_no_mfu_on_the_cpu():
    assert peak_flops("cpu") is None


def test_each_h100_board_gets_its_own_datasheet_peak():
    """The PCIe and NVL boards' names contain "H100" too; the SXM board's 989 TFLOP/s would understate their MFU."""
    assert datasheet_peak("NVIDIA H100 80GB HBM3") == 989e12
    assert datasheet_peak("NVIDIA H100 PCIe") == 756e12 and datasheet_peak("NVIDIA H100 NVL") == 835e12
    assert datasheet_peak("NVIDIA H200") == 989e12 and datasheet_peak("NVIDIA GeForce GTX 1080") is None


# --------------------------------------------------------------------------- each stage's FLOPs per token

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
            max_position_embeddings=64, kernels="reference")
SEQ = 48
# By hand for TINY (hidden 64, 2 layers, 4 heads of 16, 2 KV heads, FFN 192, vocab 512, tied head), per token:
# weights N = 2 x (q 64*64 + k 64*32 + v 64*32 + o 64*64 + gate, up, down 3*64*192) + head 512*64 = 131072;
# attention QK^T and AV at seq 48: forward 2 x 2 x 2 layers x 48 x 64 = 24576, training 3 times that.
N, ATTN = 131_072, 24_576
HEAD = 512 * 64  # of N: the output head, which GRPO and PPO run at sampled tokens only
FORWARD, TRAIN = 2 * N + ATTN, 6 * N + 3 * ATTN
# LoRA rank 4 on every projection, r x (in + out) each: 2 layers x 4 x (q 128 + k 96 + v 96 + o 128 + 3 x 256)
ADAPTER = 2 * 4 * (128 + 96 + 96 + 128 + 3 * 256)
# frozen weights: forward and the input's gradient (4 per weight), no weight gradient; adapters 6 per weight
LORA = 4 * N + 3 * ATTN + 6 * ADAPTER
# A teacher (or another reference): hidden 128, 3 layers, 4 heads of 32, 2 KV heads, FFN 256, vocab 512:
# 3 x (128*128 + 2 * 128*64 + 128*128 + 3*128*256) + 512*128 weights, attention forward 2 x 2 x 3 x 48 x 128
BIG = dict(TINY, hidden_size=128, num_hidden_layers=3, intermediate_size=256)
TEACHER_FORWARD = 2 * (3 * (128 * 128 + 2 * 128 * 64 + 128 * 128 + 3 * 128 * 256) + 512 * 128) + 4 * 3 * 48 * 128


def _stage(name: str, *flags: str):
    """A stage as its launcher builds it from flags (nothing loaded: the tests set its models)."""
    from minimind_fast.training.args import training_parser
    from minimind_fast.training.dpo import DPOStage
    from minimind_fast.training.grpo import GRPOStage
    from minimind_fast.training.lora_stage import LoraStage
    from minimind_fast.training.ppo import PPOStage
    from minimind_fast.training.stages import STAGES

    stage_class = {**STAGES, "lora": LoraStage, "dpo": DPOStage, "grpo": GRPOStage, "ppo": PPOStage}[name]
    parser = training_parser(name, name)
    stage_class.add_arguments(parser)
    return stage_class(parser.parse_args(["--data", "unused", "--out", "unused", "--seq-len", str(SEQ), *flags]))


def _model(**config) -> MiniMindForCausalLM:
    torch.manual_seed(0)
    return MiniMindForCausalLM(get_preset("tiny", **{**TINY, **config}))


@pytest.mark.parametrize("name, flags, models, expected", [
    ("pretrain", (), {}, TRAIN),
    ("sft", (), {}, TRAIN),
    ("lora", ("--lora-rank", "4"), {}, LORA),
    ("distill", (), {}, TRAIN),
    ("distill", ("--teacher", "t"), {"teacher": BIG}, TRAIN + TEACHER_FORWARD),
    ("dpo", (), {"reference": TINY}, TRAIN + FORWARD),  # the live reference: one forward more
    ("dpo", ("--reference", "r"), {"reference": BIG}, TRAIN + TEACHER_FORWARD),
    ("dpo", ("--precompute-reference",), {}, TRAIN),  # scored before training, not in its time
    ("dpo", ("--lora-rank", "4"), {"reference": TINY}, LORA + FORWARD),
    # a rollout position: a forward to sample (prefill or decode) and one of the reference, once per rollout;
    # the output head apart (see test_rl_stages_count_the_head_at_sampled_tokens_only)
    ("grpo", (), {"reference": TINY}, TRAIN - 6 * HEAD + 2 * (FORWARD - 2 * HEAD)),
    ("grpo", ("--kl-beta", "0"), {}, TRAIN - 6 * HEAD + FORWARD - 2 * HEAD),
    ("grpo", ("--updates-per-rollout", "4"), {"reference": TINY}, TRAIN - 6 * HEAD + 2 * (FORWARD - 2 * HEAD) / 4),
    ("ppo", ("--updates-per-rollout", "2"), {"reference": TINY}, TRAIN - 6 * HEAD + 2 * (FORWARD - 2 * HEAD) / 2),
    ("ppo", ("--kl-coef", "0"), {}, TRAIN - 6 * HEAD + FORWARD - 2 * HEAD),
])
def test_each_stage_counts_what_it_runs_per_trained_token(name, flags, models, expected, monkeypatch):
    """MFU took 6N + attention for every stage: a LoRA run does no weight gradient of its frozen base, and DPO,
    distillation and GRPO/PPO run other forwards (reference, teacher, sampling) per token they train on."""
    monkeypatch.setattr("minimind_fast.training.lora_stage.dist.is_initialized", lambda: False)
    stage = _stage(name, *flags)
    model = _model()
    if "--lora-rank" in flags:
        from minimind_fast.training.lora_stage import add_adapters

        add_adapters(stage.args, model)
    for attribute, config in models.items():
        setattr(stage, attribute, _model(**config))
    assert stage.flops_per_token(model) == expected


def test_lora_flops_are_what_its_training_step_multiplies(monkeypatch):
    """Against torch's FLOP counter over a LoRA model's forward and backward: the formula's count, less the
    first layer's q/k/v input gradients, which autograd skips as that layer's input (the frozen embedding)
    needs none (within 3% of the formula's count here, less in a deeper model)."""
    monkeypatch.setenv("MINIMIND_ATTENTION", "sdpa")
    stage = _stage("lora", "--lora-rank", "4")
    model = _model()
    stage.setup(model)
    batch = 2
    ids = torch.randint(0, model.config.vocab_size, (batch, SEQ))
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(input_ids=ids, targets=ids).loss.backward()
    counted = counter.get_total_flops() / (batch * SEQ)
    skipped = 2 * (64 * 64 + 2 * 64 * 32) + 2 * 3 * 4 * 64  # the base's and A's input gradient, q, k and v
    assert stage.flops_per_token(model) == LORA
    assert counted == LORA - skipped
    assert abs(LORA - counted) / counted < 0.03


@pytest.mark.parametrize("name", ["pretrain", "sft"])
def test_a_full_training_stage_counts_what_its_step_multiplies(name, monkeypatch):
    monkeypatch.setenv("MINIMIND_ATTENTION", "sdpa")
    model = _model()
    ids = torch.randint(0, model.config.vocab_size, (2, SEQ))
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(input_ids=ids, targets=ids).loss.backward()
    assert _stage(name).flops_per_token(model) == counter.get_total_flops() / (2 * SEQ) == TRAIN


@pytest.mark.parametrize("name, flags, head", [
    ("grpo", (), (6 + 2 * 2) * HEAD),  # trained, sampled, the reference's
    ("grpo", ("--kl-beta", "0", "--updates-per-rollout", "2"), (6 + 2 / 2) * HEAD),
    ("ppo", ("--updates-per-rollout", "2"), (6 + 2 * 2 / 2) * HEAD + 6 * 64),  # + the value head, trained
])
def test_rl_stages_count_the_head_at_sampled_tokens_only(name, flags, head, monkeypatch):
    """GRPO and PPO count prompt + completion tokens, but take logits (and PPO's values) only where a completion
    token is predicted: a rollout's FLOPs are the body at each position a row is read at and the head at each
    sampled token, as torch's FLOP counter finds a training step (forward and backward) and a forward over the
    rollout multiplying. Counting the head at every token overstated them by a fifth or more here (prompts as long as
    completions)."""
    from minimind_fast.training.grpo import Rollout, pack_sequences
    from minimind_fast.training.ppo import attach_value_head

    monkeypatch.setenv("MINIMIND_ATTENTION", "sdpa")
    rows, prompt, completion = 4, 8, 8
    # --seq-len the rows' read positions: the formula counts attention at --seq-len, the counter at the width
    stage = _stage(name, *flags, "--seq-len", str(prompt + completion - 1), "--max-new-tokens", str(completion))
    model = _model()
    if name == "ppo":
        attach_value_head(model)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, 512, (rows, prompt), generator=g).tolist()
    completions = torch.randint(3, 512, (rows, completion), generator=g).tolist()
    ids, targets, mask = pack_sequences(prompts, completions, pad_id=0)
    rollout = Rollout(ids, targets, mask, torch.randn(rows), torch.randn(rows), None, None, {},
                      rows * (prompt + completion), rows * completion)
    stage._rollout = lambda engine, batch: rollout
    stage._head_flops = stage.head_flops_per_token(model.config)
    assert stage._head_flops == head
    with FlopCounterMode(display=False) as train, sdpa_kernel(SDPBackend.MATH):
        stage.compute_loss(model, {})[0].backward()
    # a rollout forward (the reference's, or the sampler's prefill and decoding steps) over the same positions
    with FlopCounterMode(display=False) as forward, sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        model(ids, logits_to_keep=targets.shape[1])
    per_update = (2 if stage.kl_weight > 0 else 1) / stage.args.updates_per_rollout  # sampler, reference
    expected = train.get_total_flops() + forward.get_total_flops() * per_update
    flops = stage.flops_in_batch({}, stage.flops_per_token(model))
    assert flops == expected
    counted_everywhere = (stage.flops_per_token(model) + stage._head_flops) * stage.tokens_in_batch({})
    assert counted_everywhere > 1.15 * flops
