"""LoRA stage: launch/lora.py trains adapters only, keeps the base, saves a small adapter that chat and
the convert CLI use, resumes exactly, and works under ZeRO 0/2/3 (and with the Triton kernels)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from launch_helpers import common, losses, run, two_ranks
from safetensors.torch import load_file

from minimind_fast.checkpoint import load_model
from minimind_fast.config import get_preset
from minimind_fast.lora import LoraConfig, LoraLinear, apply_lora, load_lora, merge_lora
from minimind_fast.model import MiniMindForCausalLM
from minimind_fast.training.args import training_parser
from minimind_fast.training.dpo import DPOStage
from minimind_fast.training.stages import ReasoningStage, SFTStage

STEPS = 16


@pytest.fixture(scope="module")
def lora_data(builtin_data, tmp_path_factory) -> Path:
    """The built-in identity conversations (`lora.jsonl`), tokenized as SFT shards."""
    from minimind_fast.data.pipeline import TokenizeOptions, tokenize_to_shards

    out = tmp_path_factory.mktemp("lora_data") / "shards"
    opts = TokenizeOptions(kind="sft", seq_len=128, workers=1, val_fraction=0.1)
    tokenize_to_shards([builtin_data["files"]["lora"]], builtin_data["tokenizer"], out, opts)
    return out


def lora_args(data: Path, out: Path, base: Path, *extra: str) -> list[str]:
    return common(data, out, STEPS, "--init", str(base), "--lr", "1e-2", *extra)


@pytest.fixture(scope="module")
def lora_run(pretrain_run, lora_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lora_runs") / "lora"
    run("lora.py", lora_args(lora_data, out, pretrain_run, "--eval-every", "8"))
    return out


def adapter_numel(run_dir: Path) -> int:
    return sum(t.numel() for t in load_file(str(run_dir / "final" / "adapter" / "adapter.safetensors")).values())


def test_lora_trains_only_adapters_and_keeps_the_base(lora_run, pretrain_run):
    curve = losses(lora_run)
    assert sorted(curve) == list(range(1, STEPS + 1))
    assert curve[STEPS] < curve[1] - 0.4, curve
    assert "val_loss" in json.loads((lora_run / "metrics.jsonl").read_text().splitlines()[-1])
    # The model directory holds the base exactly as loaded; the adapter lives apart, small.
    base = load_file(str(pretrain_run / "final" / "model.safetensors"))
    saved = load_file(str(lora_run / "final" / "model.safetensors"))
    assert saved.keys() == base.keys() and all(torch.equal(saved[k], base[k]) for k in base)
    # DeepSpeed's own state leaves the frozen base out (resume rebuilds it from --init): a fraction of
    # a full run's, which holds every weight with its two Adam moments.
    ds_state = "checkpoints/step_{:08d}/deepspeed/state/mp_rank_00_model_states.pt"
    lora_bytes = (lora_run / ds_state.format(STEPS)).stat().st_size
    full_bytes = (pretrain_run / ds_state.format(12)).stat().st_size
    assert lora_bytes < 0.4 * full_bytes, (lora_bytes, full_bytes)
    adapter_dir = lora_run / "final" / "adapter"
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["rank"] == 8 and config["alpha"] == 16 and "down_proj" in config["target_modules"]
    adapter = load_file(str(adapter_dir / "adapter.safetensors"))
    assert len(adapter) == 2 * 7 * 2 and all(".lora_" in k for k in adapter)
    assert any(k.endswith("lora_B") and t.abs().sum() > 0 for k, t in adapter.items())
    size = (adapter_dir / "adapter.safetensors").stat().st_size
    assert size < 100_000 and size * 5 < (lora_run / "final" / "model.safetensors").stat().st_size
    ckpt = sorted((lora_run / "checkpoints").iterdir())[-1]
    assert (ckpt / "model" / "adapter" / "adapter.safetensors").exists()
    # The optimizer holds the adapters and nothing else.
    state = torch.load(ckpt / "deepspeed" / "state" / "mp_rank_00_model_states.pt", weights_only=False)
    optim = state["optimizer"]
    assert sum(len(g["params"]) for g in optim["param_groups"]) == len(adapter)
    assert sum(s["exp_avg"].numel() for s in optim["state"].values()) == adapter_numel(lora_run)


def test_chat_and_merge_apply_the_adapter(lora_run, pretrain_run, tmp_path):
    x = torch.randint(0, 700, (2, 20))
    with torch.no_grad():
        plain = load_model(pretrain_run).eval()(x).logits
        adapted = load_lora(load_model(pretrain_run), lora_run).eval()(x).logits  # a run dir resolves
        assert (adapted - plain).abs().max() > 1e-3
        run("convert.py", ["merge-lora", str(lora_run), "--lora", str(lora_run), "--out", str(tmp_path / "merged")])
        merged = load_model(tmp_path / "merged").eval()
        assert not any(isinstance(m, LoraLinear) for m in merged.modules())
        torch.testing.assert_close(merged(x).logits, adapted, rtol=1e-5, atol=1e-5)
    chat = ["--prompt", "Who are you?", "--temperature", "0", "--max-new-tokens", "8"]
    with_adapter = run("chat.py", ["--model", str(lora_run), "--lora", str(lora_run), *chat])
    from_merged = run("chat.py", ["--model", str(tmp_path / "merged"), *chat])
    assert with_adapter.stdout == from_merged.stdout and with_adapter.stdout.strip()
    # The LoRA run as --model means the fine-tuned model: its adapter is applied, and said so.
    own = run("chat.py", ["--model", str(lora_run), *chat])
    assert own.stdout == from_merged.stdout and "applying the LoRA adapter" in own.stderr
    base = run("chat.py", ["--model", str(lora_run), "--lora", "none", *chat])
    assert base.stdout == run("chat.py", ["--model", str(pretrain_run), *chat]).stdout
    ckpt = sorted((lora_run / "checkpoints").iterdir())[-1]
    assert run("chat.py", ["--model", str(pretrain_run), "--lora", str(ckpt), *chat]).stdout == from_merged.stdout


def stage_of(cls, *flags: str):
    parser = training_parser(cls.name, cls.name)
    cls.add_arguments(parser)
    return cls(parser.parse_args(["--data", "unused", "--out", "unused", "--seq-len", "64", *flags]))


def test_a_lora_run_named_as_a_model_means_its_fine_tuned_weights(lora_run, pretrain_run, lora_data,
                                                                  builtin_data, tmp_path):
    """--init, --reference, --teacher and `convert.py to-hf` given a LoRA run take the model chat
    answers with (the base with the run's adapter merged), not the base alone that final/ keeps."""
    x = torch.randint(0, 700, (2, 20))
    with torch.no_grad():
        tuned = merge_lora(load_lora(load_model(pretrain_run), lora_run)).eval()(x).logits
        assert (tuned - load_model(pretrain_run).eval()(x).logits).abs().max() > 1e-3

        sft = stage_of(SFTStage, "--init", str(lora_run))
        init = sft.build_model(sft.open_data(lora_data))
        torch.testing.assert_close(init.eval()(x).logits, tuned, rtol=1e-5, atol=1e-5)

        distill = stage_of(ReasoningStage, "--init", str(pretrain_run), "--teacher", str(lora_run))
        distill.setup(distill.build_model(distill.open_data(builtin_data["shards"]["reasoning"])))
        torch.testing.assert_close(distill.teacher(x).logits, tuned, rtol=1e-5, atol=1e-5)

        dpo = stage_of(DPOStage, "--init", str(pretrain_run), "--reference", str(lora_run))
        dpo.setup(dpo.build_model(dpo.open_data(builtin_data["shards"]["dpo"])))
        torch.testing.assert_close(dpo.reference(x).logits, tuned, rtol=1e-5, atol=1e-5)

        run("convert.py", ["to-hf", str(lora_run), "--out", str(tmp_path / "hf")])
        exported = load_model(tmp_path / "hf").eval()(x).logits
        torch.testing.assert_close(exported, tuned, rtol=1e-5, atol=1e-5)


def test_lora_resume_is_exact(lora_run, pretrain_run, lora_data, tmp_path):
    out = tmp_path / "resumed"
    args = lora_args(lora_data, out, pretrain_run, "--eval-every", "8")
    run("lora.py", args + ["--stop-at-step", "6"])
    assert max(losses(out)) == 6 and (out / "checkpoints" / "step_00000006" / "model" / "adapter").is_dir()
    assert "resumed from" in run("lora.py", args).stdout
    full, resumed = losses(lora_run), losses(out)
    assert [resumed[s] for s in range(7, STEPS + 1)] == [full[s] for s in range(7, STEPS + 1)]
    a = load_file(str(lora_run / "final" / "adapter" / "adapter.safetensors"))
    b = load_file(str(out / "final" / "adapter" / "adapter.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_other_lora_settings_is_refused(pretrain_run, lora_data, builtin_data, tmp_path):
    """Another rank cannot load the checkpoint's adapters (it was a DeepSpeed traceback); another alpha
    silently rescaled what they had learnt; a DPO run resumed without its --lora-rank could not load."""
    out = tmp_path / "run"
    args = lora_args(lora_data, out, pretrain_run, "--steps", "4")
    run("lora.py", args + ["--stop-at-step", "2"])
    for flags, message in ((["--lora-rank", "4"], "--lora-rank 4 (the checkpoint's: 8)"),
                           (["--lora-alpha", "32"], "--lora-alpha 32 (the checkpoint's: 16)")):
        proc = run("lora.py", args + flags, check=False)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr and not (out / "final").exists()
    dpo = common(builtin_data["shards"]["dpo"], tmp_path / "dpo", 4, "--init", str(pretrain_run))
    run("dpo.py", dpo + ["--lora-rank", "4", "--stop-at-step", "2"])
    proc = run("dpo.py", dpo, check=False)
    assert proc.returncode == 2 and "trained LoRA adapters (rank 4)" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_resume_on_another_base_is_refused(pretrain_run, lora_data, tmp_path):
    """The frozen base is rebuilt from --init on resume: an --init that is no longer the base the adapters
    trained on (here the run's step-8 checkpoint, then its final step 12) is refused, not trained on.
    The same base in bf16 (stored in the checkpoint rounded) is accepted."""
    early = pretrain_run / "checkpoints" / "step_00000008"
    out = tmp_path / "run"
    run("lora.py", lora_args(lora_data, out, early, "--steps", "4", "--stop-at-step", "2"))
    proc = run("lora.py", lora_args(lora_data, out, pretrain_run, "--steps", "4"), check=False)
    assert proc.returncode == 2 and "is not the base model" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not (out / "final").exists()
    bf16 = tmp_path / "bf16"
    run("lora.py", lora_args(lora_data, bf16, early, "--steps", "3", "--stop-at-step", "2", "--dtype", "bf16"))
    assert "resumed from" in run("lora.py", lora_args(lora_data, bf16, early, "--steps", "3", "--dtype", "bf16")).stdout


@pytest.mark.parametrize("stage", [2, 3])
def test_lora_under_zero_stages_matches_zero0(stage, lora_run, pretrain_run, lora_data, tmp_path):
    out = tmp_path / f"zero{stage}"
    run("lora.py", lora_args(lora_data, out, pretrain_run, "--zero-stage", str(stage), "--save-every", "100"))
    full, this = losses(lora_run), losses(out)
    assert all(abs(this[s] - full[s]) < 1e-4 for s in full), (this, full)
    base = load_file(str(pretrain_run / "final" / "model.safetensors"))
    saved = load_file(str(out / "final" / "model.safetensors"))
    assert saved.keys() == base.keys() and all(torch.equal(saved[k], base[k]) for k in base)
    a = load_file(str(lora_run / "final" / "adapter" / "adapter.safetensors"))
    b = load_file(str(out / "final" / "adapter" / "adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)


@pytest.mark.slow
def test_lora_two_ranks_zero3(lora_run, pretrain_run, lora_data, tmp_path):
    out = tmp_path / "two_ranks"
    args = lora_args(lora_data, out, pretrain_run, "--zero-stage", "3", "--save-every", "100")
    args[args.index("--micro-batch-size") + 1] = "2"  # 2 ranks x 2 = the single process's 4
    launcher = two_ranks(29641)
    run("lora.py", args, launcher=launcher, timeout=300)
    full, this = losses(lora_run), losses(out)
    assert all(abs(this[s] - full[s]) < 2e-4 * max(1.0, abs(full[s])) for s in full), (this, full)
    a = load_file(str(lora_run / "final" / "adapter" / "adapter.safetensors"))
    b = load_file(str(out / "final" / "adapter" / "adapter.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-3) for k in a)


@pytest.mark.parametrize("bad, message", [
    ("kind", "needs sft shards"),
    ("target", "--lora-targets qq_proj: no such projection"),
    ("head", "output head cannot take an adapter"),
    ("rank", "--lora-rank 0: must be positive"),
    ("init", "needs --init"),
])
def test_lora_bad_inputs_give_clear_errors(bad, message, pretrain_run, lora_data, builtin_data, tmp_path):
    data, extra = lora_data, []
    if bad == "kind":
        data = builtin_data["shards"]["pretrain"]
    elif bad == "target":
        extra = ["--lora-targets", "q_proj", "qq_proj"]
    elif bad == "head":
        extra = ["--lora-targets", "lm_head"]
    elif bad == "rank":
        extra = ["--lora-rank", "0"]
    args = lora_args(data, tmp_path / "run", pretrain_run, *extra)
    if bad == "init":
        i = args.index("--init")
        del args[i:i + 2]
    proc = run("lora.py", args, check=False)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_chat_reports_a_run_without_adapter(pretrain_run):
    proc = run("chat.py", ["--model", str(pretrain_run), "--lora", str(pretrain_run), "--prompt", "Hi"], check=False)
    assert proc.returncode != 0 and "no LoRA adapter" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.skipif(not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
                    reason="Triton kernels need a CUDA GPU, or TRITON_INTERPRET=1 on CPU (`make test` sets it)")
@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_adapters_train_the_same_through_the_triton_kernels(preset, monkeypatch):
    from minimind_fast import ops

    monkeypatch.delenv(ops.ENV_VAR, raising=False)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    small = dict(num_hidden_layers=2, vocab_size=256, hidden_size=64)
    reference = MiniMindForCausalLM(get_preset(preset, kernels="reference", **small))
    triton = MiniMindForCausalLM(get_preset(preset, kernels="triton", **small))
    triton.load_state_dict(reference.state_dict())
    assert triton.ops.name == "triton"
    models = {"reference": reference, "triton": triton}
    for model in models.values():
        apply_lora(model, LoraConfig(rank=4, alpha=8))
        with torch.no_grad():  # the same A, and a non-zero B so that A gets gradients too
            for name, p in model.named_parameters():
                if ".lora_" in name:
                    p.copy_(torch.linspace(-0.05, 0.05, p.numel()).view_as(p))
        model.to(device)
    x = torch.randint(0, 256, (2, 24), device=device)
    targets = torch.roll(x, -1, 1)
    targets[:, :4] = -100
    out = {k: m(x, targets=targets).loss for k, m in models.items()}
    for loss in out.values():
        loss.backward()
    torch.testing.assert_close(out["triton"], out["reference"], rtol=1e-4, atol=1e-4)
    grads = {k: {n: p.grad for n, p in m.named_parameters() if p.requires_grad} for k, m in models.items()}
    assert grads["triton"].keys() == grads["reference"].keys() and all(".lora_" in n for n in grads["triton"])
    for name, g in grads["reference"].items():
        torch.testing.assert_close(grads["triton"][name], g, rtol=1e-3, atol=1e-5, msg=name)
    assert all(p.grad is None for n, p in models["triton"].named_parameters() if ".lora_" not in n)


@pytest.fixture(scope="module")
def moe_init(builtin_data, tmp_path_factory) -> Path:
    """An untrained tiny MoE model (4 routed experts, top-2, one shared) with the built-in tokenizer."""
    from minimind_fast.checkpoint import save_model_dir

    torch.manual_seed(0)
    config = get_preset("tiny-moe", hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                        vocab_size=1024, max_position_embeddings=256)
    out = tmp_path_factory.mktemp("moe_init") / "model"
    save_model_dir(MiniMindForCausalLM(config), out, tokenizer_dir=builtin_data["tokenizer"])
    return out


@pytest.fixture(scope="module")
def moe_lora_run(moe_init, lora_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("moe_lora_runs") / "lora"
    run("lora.py", lora_args(lora_data, out, moe_init, "--save-every", "100"))
    return out


def test_lora_on_moe_trains_the_routed_experts_adapters_and_keeps_the_base(moe_lora_run, moe_init, tmp_path):
    curve = losses(moe_lora_run)
    assert curve[STEPS] < curve[1] - 0.4, curve
    base = load_file(str(moe_init / "model.safetensors"))
    saved = load_file(str(moe_lora_run / "final" / "model.safetensors"))
    assert saved.keys() == base.keys() and all(torch.equal(saved[k], base[k]) for k in base)
    adapter = load_file(str(moe_lora_run / "final" / "adapter" / "adapter.safetensors"))
    experts = {k: t for k, t in adapter.items() if ".mlp.experts.lora_" in k}
    # 2 layers x (A, B) x (gate, up, down), each a stack over the 4 experts
    assert len(experts) == 2 * 2 * 3 and all(t.shape[0] == 4 for t in experts.values())
    for key, t in experts.items():
        if ".lora_B." in key:  # zero at init: every expert's update trained (top-2 of 4 reaches them all)
            assert all(t[e].abs().sum() > 0 for e in range(4)), key
    # the fine-tuned model, merged, differs from the base in its routed experts too
    x = torch.randint(0, 1024, (2, 20))
    with torch.no_grad():
        adapted = load_lora(load_model(moe_init), moe_lora_run).eval()(x).logits
        run("convert.py", ["merge-lora", str(moe_init), "--lora", str(moe_lora_run), "--out", str(tmp_path / "m")])
        merged = load_model(tmp_path / "m").eval()
        torch.testing.assert_close(merged(x).logits, adapted, rtol=1e-5, atol=1e-5)
    merged_w = load_file(str(tmp_path / "m" / "model.safetensors"))
    assert merged_w.keys() == base.keys()
    key = "model.layers.0.mlp.experts.down_proj"
    assert not torch.equal(merged_w[key], base[key])


def test_lora_on_moe_under_zero3_matches_zero0(moe_lora_run, moe_init, lora_data, tmp_path):
    out = tmp_path / "zero3"
    run("lora.py", lora_args(lora_data, out, moe_init, "--zero-stage", "3", "--save-every", "100"))
    full, this = losses(moe_lora_run), losses(out)
    assert all(abs(this[s] - full[s]) < 1e-4 for s in full), (this, full)
    a = load_file(str(moe_lora_run / "final" / "adapter" / "adapter.safetensors"))
    b = load_file(str(out / "final" / "adapter" / "adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)


def test_resuming_a_checkpoint_without_expert_adapters_is_refused_clearly(tmp_path):
    """A checkpoint trained before the routed experts took LoRA holds dense adapters only."""
    from minimind_fast.lora import save_lora
    from minimind_fast.training.lora_stage import check_resumed_experts

    torch.manual_seed(0)
    config = LoraConfig(rank=2)
    old = MiniMindForCausalLM(get_preset("tiny-moe", hidden_size=64, vocab_size=64, kernels="reference"))
    apply_lora(old, config, experts=False)
    ckpt = tmp_path / "step_00000004"
    save_lora(old, ckpt / "model" / "adapter")
    model = MiniMindForCausalLM(get_preset("tiny-moe", hidden_size=64, vocab_size=64, kernels="reference"))
    with pytest.raises(ValueError, match="no adapters on the MoE routed experts.*--resume none"):
        check_resumed_experts(model, config, ckpt)
    check_resumed_experts(model, LoraConfig(rank=2, target_modules=["q_proj"]), ckpt)  # experts not targeted
    new = MiniMindForCausalLM(get_preset("tiny-moe", hidden_size=64, vocab_size=64, kernels="reference"))
    apply_lora(new, config)
    save_lora(new, ckpt / "model" / "adapter")
    check_resumed_experts(model, config, ckpt)


@pytest.mark.slow
def test_lora_on_moe_two_ranks_zero3(moe_lora_run, moe_init, lora_data, tmp_path):
    """Partitioned over two ranks, the expert stacks and their adapters are gathered where the MoE layer
    reads them."""
    out = tmp_path / "two_ranks"
    args = lora_args(lora_data, out, moe_init, "--zero-stage", "3", "--save-every", "100")
    args[args.index("--micro-batch-size") + 1] = "2"
    run("lora.py", args, launcher=two_ranks(29643), timeout=300)
    full, this = losses(moe_lora_run), losses(out)
    assert all(abs(this[s] - full[s]) < 2e-4 * max(1.0, abs(full[s])) for s in full), (this, full)
    a = load_file(str(moe_lora_run / "final" / "adapter" / "adapter.safetensors"))
    b = load_file(str(out / "final" / "adapter" / "adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-3) for k in a)
