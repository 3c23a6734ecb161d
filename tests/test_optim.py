"""--optimizer muon: which parameters Muon steps, its update against a float64 reference, and the engine's
runs with it (resume, two ranks, bf16, refusals), as users run them."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from launch_helpers import common, losses, records, run, tiny_config, two_ranks

from minimind_fast.config import get_preset
from minimind_fast.model import MiniMindForCausalLM
from minimind_fast.training.ds_config import read_user_file
from minimind_fast.training.optim import MuonWithAdamW, check_muon_zero_stage, muon_parameters, split_muon_groups
from minimind_fast.training.stages import decay_groups

LR, MUON_LR, WD, MUON_WD, MOMENTUM, BETAS = 3e-3, 0.02, 0.1, 0.03, 0.95, (0.9, 0.95)


def tiny(preset: str) -> MiniMindForCausalLM:
    if preset == "tiny":
        return MiniMindForCausalLM(tiny_config().replace(kernels="reference"))
    return MiniMindForCausalLM(get_preset("tiny-moe", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, vocab_size=256, max_position_embeddings=64,
                                          intermediate_size=96, kernels="reference"))


def muon_names(model: torch.nn.Module) -> set[str]:
    ids = muon_parameters(model)
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_muon_takes_the_hidden_matrices_of_the_dense_model():
    model = tiny("tiny")
    expected = {f"model.layers.{i}.{m}.weight" for i in range(2)
                for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                          "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    assert muon_names(model) == expected  # not the (tied) embedding, the norms


def test_muon_takes_expert_stacks_and_shared_experts_but_not_the_router():
    model = tiny("tiny-moe")
    names = muon_names(model)
    for i in range(2):
        assert {f"model.layers.{i}.mlp.experts.{m}" for m in ("gate_proj", "up_proj", "down_proj")} <= names
        assert {f"model.layers.{i}.mlp.shared_experts.0.{m}.weight"
                for m in ("gate_proj", "up_proj", "down_proj")} <= names
        assert f"model.layers.{i}.mlp.gate.weight" not in names
    assert "model.embed_tokens.weight" not in names
    assert all(dict(model.named_parameters())[n].dim() in (2, 3) for n in names)


def reference_orthogonalise(m: torch.Tensor) -> torch.Tensor:
    """The quintic Newton-Schulz iteration on one matrix in float64, in its wide orientation."""
    x = m.double()
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    x = x / (torch.linalg.matrix_norm(x) + 1e-7)
    for _ in range(5):
        a = x @ x.T
        x = 3.4445 * x + (-4.7750 * a + 2.0315 * a @ a) @ x
    return x.T if tall else x


def reference_muon_delta(p: torch.Tensor, grad: torch.Tensor, buf: torch.Tensor, lr: float) -> torch.Tensor:
    """p's change from one Muon step (buf, float64, is updated in place): momentum, Nesterov, the
    iteration per matrix (per expert for a stack), the sqrt(max(1, rows/cols)) scale, decoupled decay
    at Muon's own rate (AdamW's WD stays with the AdamW half)."""
    buf.mul_(MOMENTUM).add_(grad.double(), alpha=1 - MOMENTUM)
    direction = (1 - MOMENTUM) * grad.double() + MOMENTUM * buf
    mats = direction.reshape(-1, *direction.shape[-2:])
    update = torch.stack([reference_orthogonalise(m) for m in mats]).reshape(direction.shape)
    rows, cols = p.shape[-2:]
    update = update * max(1.0, rows / cols) ** 0.5
    return -lr * MUON_WD * p.double() - lr * update


def batch(step: int) -> torch.Tensor:
    return torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(step))


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_muon_step_matches_a_float64_reference_and_adam_params_match_torch_adamw(preset):
    model = tiny(preset)
    twin = copy.deepcopy(model)  # its Adam params step under plain torch AdamW, with the same gradients
    ids = muon_parameters(model)
    params = list(model.parameters())
    groups = split_muon_groups(decay_groups(params, LR, WD), ids, MUON_LR, MUON_WD)
    opt = MuonWithAdamW(groups, lr=LR, momentum=MOMENTUM, betas=BETAS)
    twin_adam = [q for p, q in zip(params, twin.parameters()) if id(p) not in ids]
    adamw = torch.optim.AdamW(decay_groups(twin_adam, LR, WD), lr=LR, betas=BETAS)
    bufs = {id(p): torch.zeros_like(p, dtype=torch.float64) for p in params if id(p) in ids}
    for step in range(3):  # momentum and Adam's moments carry over
        ids_batch = batch(step)
        opt.zero_grad()
        model(input_ids=ids_batch, targets=ids_batch).loss.backward()
        before = {id(p): p.detach().double().clone() for p in params}
        expected = {id(p): reference_muon_delta(p.detach(), p.grad, bufs[id(p)], MUON_LR)
                    for p in params if id(p) in ids}
        for p, q in zip(params, twin.parameters()):
            q.grad = p.grad.clone() if id(p) not in ids else None
        opt.step()
        adamw.step()
        for name, p in model.named_parameters():
            if id(p) in ids:
                delta = p.detach().double() - before[id(p)]
                err = (delta - expected[id(p)]).abs().max().item()
                assert err <= 1e-4 * expected[id(p)].abs().max().item(), (step, name, err)
        for (name, p), q in zip(model.named_parameters(), twin.parameters()):
            if id(p) not in ids:
                assert torch.equal(p, q), (step, name)


def test_muon_state_round_trips_through_state_dict():
    """A resumed optimizer (load_state_dict replaces groups and state) steps as the uninterrupted one:
    AdamW's half must follow the new groups and state."""
    def make(model):
        groups = split_muon_groups(decay_groups(list(model.parameters()), LR, WD), muon_parameters(model), MUON_LR,
                                    MUON_WD)
        return MuonWithAdamW(groups, lr=LR, momentum=MOMENTUM, betas=BETAS)

    def train(model, opt, steps):
        for step in steps:
            opt.zero_grad()
            model(input_ids=batch(step), targets=batch(step)).loss.backward()
            opt.step()

    a = tiny("tiny")
    b = copy.deepcopy(a)
    opt_a = make(a)
    train(a, opt_a, range(2))
    b.load_state_dict(a.state_dict())
    opt_b = make(b)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))  # as from disk: torch keeps tensors it can
    train(a, opt_a, range(2, 4))
    train(b, opt_b, range(2, 4))
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_muon_refuses_zero_stages_that_partition_matrices(stage):
    with pytest.raises(ValueError, match=f"ZeRO stage 0 only \\(this run: {stage}"):
        check_muon_zero_stage(stage)
    check_muon_zero_stage(0)


def test_a_deepspeed_config_with_its_own_optimizer_is_refused(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"optimizer": {"type": "Muon", "params": {"lr": 0.02}}}))
    with pytest.raises(ValueError, match="'optimizer' would not be used.*--optimizer"):
        read_user_file(path)


def muon_args(builtin_data, tiny_model_config, out, steps, *extra):
    return common(builtin_data["shards"]["pretrain"], out, steps, "--config", str(tiny_model_config),
                  "--optimizer", "muon", *extra)


def test_muon_runs_resume_exactly_and_refuse_another_optimizer(builtin_data, tiny_model_config,
                                                                           tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    run("pretrain.py", muon_args(builtin_data, tiny_model_config, full, 8))
    run("pretrain.py", muon_args(builtin_data, tiny_model_config, resumed, 8, "--stop-at-step", "4"))
    state = json.loads((resumed / "checkpoints" / "step_00000004" / "trainer_state.json").read_text())
    assert state["optimizer_layout"] == {"zero_stage": 0, "grad_accum_dtype": None, "precision": "fp32",
                                       "optimizer": "muon"}
    refused = run("pretrain.py", common(builtin_data["shards"]["pretrain"], resumed, 8, "--config",
                                        str(tiny_model_config)), check=False)
    assert refused.returncode == 2 and "trained with --optimizer muon and this run asks for --optimizer adamw" \
        in refused.stderr, refused.stderr[-2000:]
    run("pretrain.py", muon_args(builtin_data, tiny_model_config, resumed, 8))
    curve = losses(full)
    assert losses(resumed) == curve  # bitwise: the momentum buffers are checkpointed
    assert curve[8] < curve[1] - 0.3, curve
    logged = {r["step"]: (r["lr"], r["muon_lr"]) for r in records(full) if "loss" in r}
    for lr, muon_lr in logged.values():  # one schedule scales both
        assert muon_lr == pytest.approx(lr * MUON_LR / LR)
    # bf16 (DeepSpeed's per-parameter fp32 master copies at ZeRO 0): within bf16's noise of fp32, which for
    # AdamW at ZeRO 0 is about 1% by step 4.
    bf16 = tmp_path / "bf16"
    run("pretrain.py", muon_args(builtin_data, tiny_model_config, bf16, 4, "--dtype", "bf16"))
    assert json.loads((bf16 / "config.json").read_text())["deepspeed_config"]["zero_optimization"]["stage"] == 0
    for step, loss in losses(bf16).items():
        assert loss == pytest.approx(curve[step], rel=2e-2), (step, losses(bf16), curve)


@pytest.mark.slow
def test_muon_on_two_ranks_matches_one_process(builtin_data, tiny_model_config, tmp_path):
    """Two ranks of micro-batch 2 see the same 4 sequences per step as one rank of 4: the all-reduced
    gradient, hence Muon's momentum and step, agree."""
    run("pretrain.py", muon_args(builtin_data, tiny_model_config, tmp_path / "single", 4))
    args = muon_args(builtin_data, tiny_model_config, tmp_path / "multi", 4)
    args[args.index("--micro-batch-size") + 1] = "2"
    run("pretrain.py", args, launcher=two_ranks(29640), timeout=300)
    single, multi = losses(tmp_path / "single"), losses(tmp_path / "multi")
    for step in range(1, 5):
        assert abs(multi[step] - single[step]) < 2e-4 * max(1, abs(single[step])), (multi, single)


def test_muon_refuses_lora(random_init, builtin_data, tmp_path):
    args = ["--init", str(random_init), "--data", str(builtin_data["shards"]["sft"]), "--out", str(tmp_path / "lora"),
            "--seq-len", "64", "--micro-batch-size", "2", "--steps", "2", "--optimizer", "muon"]
    refused = run("lora.py", args, check=False)
    assert refused.returncode == 2 and "--optimizer muon does not train LoRA adapters" in refused.stderr, \
        refused.stderr[-2000:]


@pytest.mark.slow
def test_muon_learns_faster_than_adamw_on_the_tiny_model(builtin_data, tiny_model_config, tmp_path):
    """48 steps each on the built-in corpus. AdamW at --lr 1e-2, the best of 1e-3, 3e-3, 6e-3, 1e-2 and
    2e-2 here (val_loss 4.94, 3.37, 2.47, 2.40, 3.28); Muon at its default --muon-lr 0.02 with the same
    --lr for its Adam half: val_loss 1.71 (1.72 when its matrices decayed at --weight-decay's 0.1; --muon-lr 0.04:
    1.58, 0.08: 1.54)."""
    val = {}
    for optimizer in ("adamw", "muon"):
        out = tmp_path / optimizer
        run("pretrain.py", common(builtin_data["shards"]["pretrain"], out, 48, "--config", str(tiny_model_config),
                                  "--lr", "1e-2", "--optimizer", optimizer, "--eval-every", "48",
                                  "--save-every", "100"))
        val[optimizer] = losses(out, "val_loss")[48]
    assert val["muon"] < val["adamw"] - 0.3, val
