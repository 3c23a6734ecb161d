"""The training engine, run as users run it: launch scripts in subprocesses (DeepSpeed on the CPU)."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from launch_helpers import ENV, ROOT, common, losses, records, run, two_ranks

from minimind_fast.checkpoint import load_model
from minimind_fast.data.loaders import build_loader
from minimind_fast.data.tokenizer import load_tokenizer
from minimind_fast.training.args import check_training_args, training_parser
from minimind_fast.training.engine import RUN_LOCK
from minimind_fast.training.schedule import lr_factor


def test_pretrain_learns_and_writes_the_run_directory(pretrain_run, builtin_data):
    curve = losses(pretrain_run)
    assert sorted(curve) == list(range(1, 13))
    assert curve[12] < curve[1] - 0.5, curve
    for name in ("config.json", "dataset_stats.json", "metrics.jsonl", "loss.png", "final/model.safetensors",
                 "final/tokenizer.json"):
        assert (pretrain_run / name).exists(), name
    records = [json.loads(x) for x in (pretrain_run / "metrics.jsonl").read_text().splitlines()]
    assert any("val_loss" in r and r["val_ppl"] > 1 for r in records)
    assert all(r["grad_norm"] > 0 and r["tokens_per_s"] > 0 for r in records if "loss" in r)
    ckpts = sorted((pretrain_run / "checkpoints").iterdir())
    assert [c.name for c in ckpts] == ["step_00000004", "step_00000008", "step_00000012"]
    assert all((c / "COMPLETE").exists() for c in ckpts)
    # safetensors writes 0600; a checkpoint and final/ are as readable as the umask allows
    umask = os.umask(0)
    os.umask(umask)
    for path in [ckpts[-1], *ckpts[-1].rglob("*"), *(pretrain_run / "final").rglob("*")]:
        wanted = (0o777 if path.is_dir() else 0o666) & ~umask
        assert path.stat().st_mode & 0o777 == wanted, (path, oct(path.stat().st_mode))
    model = load_model(pretrain_run)
    assert model.config.hidden_size == 64
    stats = json.loads((pretrain_run / "dataset_stats.json").read_text())
    assert stats["splits"]["train"]["tokens"] > 0


@pytest.mark.parametrize("warmup", [0, 1, 3])
def test_lr_schedule_peaks_once_and_ends_at_the_floor(warmup):
    total = 10
    factors = [lr_factor(s, total, warmup, 0.1) for s in range(total)]
    assert factors[warmup] == 1.0 and factors.count(1.0) == 1
    assert factors[:warmup] == pytest.approx([(s + 1) / (warmup + 1) for s in range(warmup)])
    assert factors[-1] == pytest.approx(0.1)
    assert all(a > b for a, b in zip(factors[warmup:], factors[warmup + 1:]))
    mid = warmup + (total - 1 - warmup) / 2  # the cosine's half-way point is half-way to the floor
    assert lr_factor(mid, total, warmup, 0.1) == pytest.approx(0.55)


@pytest.mark.parametrize("warmup", [0, 2])
def test_wsd_linear_and_constant_schedules(warmup):
    """wsd holds the peak until the last decay_fraction of the steps, then falls in a straight line to
    the floor at the last step; linear falls in a straight line from the warmup's end; constant stays."""
    total = 11  # steps 0-10: a decay_fraction of 0.3 of the 10 steps after step 0 is 3 steps
    wsd = [lr_factor(s, total, warmup, 0.1, "wsd", 0.3) for s in range(total)]
    assert wsd[warmup:8] == [1.0] * (8 - warmup)
    assert wsd[8:] == pytest.approx([1 - 0.9 / 3, 1 - 0.9 * 2 / 3, 0.1])
    linear = [lr_factor(s, total, warmup, 0.1, "linear") for s in range(total)]
    span = total - 1 - warmup
    assert linear[warmup:] == pytest.approx([1 - 0.9 * i / span for i in range(span + 1)])
    assert [lr_factor(s, total, warmup, 0.1, "constant") for s in range(warmup, total)] == [1.0] * (total - warmup)
    for schedule in ("wsd", "linear", "constant"):  # the same warmup as the cosine's
        assert [lr_factor(s, total, warmup, 0.1, schedule, 0.3) for s in range(warmup)] == pytest.approx(
            [(s + 1) / (warmup + 1) for s in range(warmup)])
    # a decay longer than what follows the warmup starts at the warmup's end, as linear does
    assert [lr_factor(s, total, warmup, 0.1, "wsd", 1.0) for s in range(total)] == pytest.approx(linear)
    with pytest.raises(ValueError, match="unknown learning-rate schedule 'step'"):
        lr_factor(5, total, warmup, 0.1, "step")


@pytest.mark.parametrize("total,fraction", [(2, 0.2), (10, 0.05), (400, 0.001)])
def test_a_wsd_decay_shorter_than_a_step_still_ends_at_the_floor(total, fraction):
    """A --decay-fraction of the steps that rounds to no step decays over the last one: the run was asked
    to decay, and ended at the peak (README: the floor at the last step)."""
    factors = [lr_factor(s, total, 0, 0.1, "wsd", fraction) for s in range(total)]
    assert factors[:-1] == [1.0] * (total - 1)
    assert factors[-1] == pytest.approx(0.1)


def test_lr_schedule_flag_reaches_the_optimizer(builtin_data, tiny_model_config, tmp_path):
    out = tmp_path / "wsd"
    run("pretrain.py", common(builtin_data["shards"]["pretrain"], out, 8, "--config", str(tiny_model_config),
                              "--lr-schedule", "wsd", "--decay-fraction", "0.5", "--warmup-steps", "1",
                              "--save-every", "1000", "--seq-len", "16", "--micro-batch-size", "1"))
    logged = losses(out, "lr")
    assert logged == pytest.approx({s: 3e-3 * lr_factor(s - 1, 8, 1, 0.1, "wsd", 0.5) for s in range(1, 9)},
                                   rel=1e-9)
    assert logged[2] == logged[4] == 3e-3 and logged[8] == pytest.approx(3e-4)  # held, then decayed


def test_val_loss_is_the_held_out_token_mean_of_the_final_weights(pretrain_run, builtin_data):
    """The last evaluation (step 12, after its update) against the saved final model's cross-entropy over
    every target token of the val split (one pass, fewer batches than --eval-batches), in float64."""
    model = load_model(pretrain_run).double().eval()
    val = build_loader("pretrain", builtin_data["shards"]["pretrain"], seq_len=64, micro_batch_size=4, seed=7,
                       split="val", vocab_size=model.config.vocab_size)
    total, count = 0.0, 0
    for batch, epoch, _ in val._batches():
        if epoch > 0:
            break
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"]).logits
        total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(),
                                                   ignore_index=-100, reduction="sum").item()
        count += int((batch["targets"] != -100).sum())
    logged = [r for r in records(pretrain_run) if "val_loss" in r]
    assert [r["step"] for r in logged] == [6, 12] and count > 0
    assert logged[-1]["val_loss"] == pytest.approx(total / count, rel=1e-5)
    assert logged[-1]["val_ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)


def test_logged_lr_is_the_one_each_step_used(pretrain_run):
    """The schedule's factor of 0-based step s - 1 at logged step s (12 steps, 2 of warmup, lr 3e-3)."""
    logged = losses(pretrain_run, "lr")
    assert logged == pytest.approx({s: 3e-3 * lr_factor(s - 1, 12, 2, 0.1) for s in range(1, 13)}, rel=1e-9)


def test_profile_steps_writes_op_tables(pretrain_run):
    text = (pretrain_run / "profile.txt").read_text()
    assert text.startswith("torch.profiler over 2 optimizer steps (from step 6)")
    host = text[text.index("By host time:"):]
    assert "aten::mm" in host or "aten::addmm" in host, host[:2000]


def test_exact_resume_matches_an_uninterrupted_run(pretrain_run, builtin_data, tiny_model_config, tmp_path):
    out = tmp_path / "resumed"
    args = common(builtin_data["shards"]["pretrain"], out, 12, "--config", str(tiny_model_config), "--eval-every", "6")
    run("pretrain.py", args + ["--stop-at-step", "5"])
    first = losses(out)
    assert max(first) == 5 and (out / "checkpoints" / "step_00000005" / "COMPLETE").exists()
    run("pretrain.py", args)
    full, resumed = losses(pretrain_run), losses(out)
    # Bitwise on CPU in fp32: the same batches, optimizer state, schedule and RNG.
    assert [resumed[s] for s in range(6, 13)] == [full[s] for s in range(6, 13)]


class _TouchOnLoad:
    """Creates `marker` when unpickled: what a crafted checkpoint file could do in its place."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


@pytest.mark.parametrize("zero_stage, name", [("0", "mp_rank_00_model_states.pt"),
                                              ("2", "zero_pp_rank_0_mp_rank_00_optim_states.pt")])
def test_a_deepspeed_file_that_would_run_code_is_refused_on_resume(builtin_data, tiny_model_config, tmp_path,
                                                                   zero_stage, name):
    """DeepSpeed unpickles its checkpoint files with weights_only=False: a crafted one in a run directory
    ran its code on --resume. Resume loads every one weights-only (the model's, and the optimizer's under
    ZeRO): such a file is refused, naming it, before anything in it runs."""
    out = tmp_path / "run"
    args = common(builtin_data["shards"]["pretrain"], out, 4, "--config", str(tiny_model_config),
                  "--save-every", "2", "--zero-stage", zero_stage)
    run("pretrain.py", args + ["--stop-at-step", "2"])
    crafted = out / "checkpoints" / "step_00000002" / "deepspeed" / "state" / name
    state = torch.load(crafted, weights_only=False)  # the file this test's run just wrote
    marker = tmp_path / "code_ran"
    state["payload"] = _TouchOnLoad(marker)
    torch.save(state, crafted)
    refused = run("pretrain.py", args, check=False)
    assert not marker.exists()
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert f"error: {crafted}: refused: a weights-only load" in refused.stderr, refused.stderr[-2000:]


@pytest.mark.parametrize("ranks", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_zero3_resume_is_exact(builtin_data, tiny_model_config, tmp_path, ranks):
    """ZeRO 3 partitions the weights and the optimizer state, a file of each per rank: a stop and resume
    reproduces the uninterrupted run bitwise."""
    def args(out):
        a = common(builtin_data["shards"]["pretrain"], out, 6, "--config", str(tiny_model_config),
                   "--zero-stage", "3", "--save-every", "3")
        a[a.index("--micro-batch-size") + 1] = str(4 // ranks)
        return a
    launcher = two_ranks(29650) if ranks == 2 else None
    run("pretrain.py", args(tmp_path / "full"), launcher=launcher)
    run("pretrain.py", args(tmp_path / "resumed") + ["--stop-at-step", "3"], launcher=launcher)
    shards = list((tmp_path / "resumed" / "checkpoints" / "step_00000003" / "deepspeed" / "state").glob("*.pt"))
    assert len(shards) == 2 * ranks, shards
    result = run("pretrain.py", args(tmp_path / "resumed"), launcher=launcher)
    assert "resumed from" in result.stdout, result.stdout[-2000:]
    full, resumed = losses(tmp_path / "full"), losses(tmp_path / "resumed")
    assert [resumed[s] for s in range(4, 7)] == [full[s] for s in range(4, 7)]


def test_tokens_seen_counts_every_step_across_a_resume(builtin_data, tiny_model_config, tmp_path):
    """A checkpoint between two logged steps carries the tokens of every step before it."""
    out = tmp_path / "run"
    args = common(builtin_data["shards"]["pretrain"], out, 8, "--config", str(tiny_model_config), "--log-every", "4")
    run("pretrain.py", args + ["--stop-at-step", "3"])
    run("pretrain.py", args)
    per_step = 4 * 64  # micro-batch x seq-len, one rank
    assert losses(out, "tokens") == {4: 4 * per_step, 8: 8 * per_step}


def test_tokens_are_summed_over_ranks_whose_batches_differ(builtin_data, tiny_model_config, tmp_path):
    """A stage whose micro-batches hold a different number of tokens on each rank (GRPO's and PPO's
    completions): `tokens` and `tokens_per_s` count every rank's, not rank 0's times the ranks, and a
    checkpoint between two logged steps carries them."""
    uneven = tmp_path / "pretrain_uneven.py"
    uneven.write_text(
        "import torch.distributed as dist\n"
        "from minimind_fast.training.engine import train\n"
        "from minimind_fast.training.stages import PretrainStage\n"
        "class Uneven(PretrainStage):\n"
        "    def tokens_in_batch(self, batch):\n"
        "        return 1000 * (dist.get_rank() + 1)\n"
        "train(Uneven)\n")
    out = tmp_path / "run"
    args = common(builtin_data["shards"]["pretrain"], out, 4, "--config", str(tiny_model_config),
                  "--log-every", "2", "--save-every", "100", "--micro-batch-size", "2")
    for extra in (["--stop-at-step", "3"], []):
        subprocess.run([*two_ranks(29793), str(uneven), *args, *extra], cwd=ROOT, env=ENV, check=True,
                       timeout=300, capture_output=True)
    assert losses(out, "tokens") == {2: 2 * 3000, 4: 4 * 3000}  # 1000 + 2000 a step


def test_a_deepspeed_config_files_batch_shape_is_the_one_trained(builtin_data, tiny_model_config, tmp_path):
    """The file's micro-batch and accumulation win over the flags for DeepSpeed and the loader alike."""
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 3,
                              "gradient_clipping": 0.5}))
    out = tmp_path / "run"
    result = run("pretrain.py", common(builtin_data["shards"]["pretrain"], out, 2, "--config", str(tiny_model_config),
                                       "--deepspeed-config", str(ds)))
    assert losses(out, "tokens") == {1: 2 * 3 * 64, 2: 2 * 2 * 3 * 64}
    # the start-up banner gives the effective global batch, its make-up and its tokens
    assert "global batch 6 sequences = 384 tokens/step (micro-batch 2 x 3 accumulation x 1 rank(s))" in result.stdout, \
        result.stdout[-2000:]
    args = json.loads((out / "config.json").read_text())["args"]
    assert (args["micro_batch_size"], args["grad_accum"], args["grad_clip"]) == (2, 3, 0.5)


def test_bf16_default_tracks_fp32_and_resumes_exactly(pretrain_run, builtin_data, tiny_model_config, tmp_path):
    """`--dtype bf16` without a ZeRO stage runs DeepSpeed's BF16_Optimizer (ZeRO 1, fp32 master weights
    and gradient accumulation): its losses stay within bf16 noise of the fp32 run, and a stop and
    resume reproduces the uninterrupted bf16 run bitwise (the fp32 master weights are checkpointed)."""
    args = lambda out: common(builtin_data["shards"]["pretrain"], out, 12, "--config", str(tiny_model_config),
                              "--eval-every", "6", "--dtype", "bf16")
    run("pretrain.py", args(tmp_path / "full"))
    config = json.loads((tmp_path / "full" / "config.json").read_text())["deepspeed_config"]
    assert config["zero_optimization"]["stage"] == 1 and config["data_types"]["grad_accum_dtype"] == "fp32"
    fp32, bf16 = losses(pretrain_run), losses(tmp_path / "full")
    for step in range(1, 13):
        assert bf16[step] == pytest.approx(fp32[step], rel=5e-3), (step, fp32, bf16)
    run("pretrain.py", args(tmp_path / "resumed") + ["--stop-at-step", "5"])
    run("pretrain.py", args(tmp_path / "resumed"))
    resumed = losses(tmp_path / "resumed")
    assert [resumed[s] for s in range(6, 13)] == [bf16[s] for s in range(6, 13)]


def test_resume_keeps_the_checkpoints_zero_stage_and_refuses_another(builtin_data, tiny_model_config, tmp_path):
    """DeepSpeed's optimizer state is laid out by ZeRO stage: a resumed run without --zero-stage takes the
    checkpoint's (so a run started under an older default still resumes), and a conflicting one is
    refused before any step, naming both."""
    out = tmp_path / "run"
    args = common(builtin_data["shards"]["pretrain"], out, 6, "--config", str(tiny_model_config))
    run("pretrain.py", args + ["--zero-stage", "2", "--stop-at-step", "4"])
    state = json.loads((out / "checkpoints" / "step_00000004" / "trainer_state.json").read_text())
    assert state["optimizer_layout"] == {"zero_stage": 2, "grad_accum_dtype": None, "precision": "fp32"}
    refused = run("pretrain.py", args + ["--zero-stage", "0"], check=False)
    assert refused.returncode == 2 and "written under ZeRO 2 and this run asks for ZeRO 0" in refused.stderr, \
        refused.stderr[-2000:]
    resumed = run("pretrain.py", args)
    assert "resumed from" in resumed.stdout and "ZeRO 2" in resumed.stdout, resumed.stdout[-2000:]
    assert max(losses(out)) == 6


def test_resume_keeps_the_checkpoints_precision_and_refuses_another(builtin_data, tiny_model_config, tmp_path):
    """DeepSpeed's optimizer state is laid out by precision too: a resume in another failed inside its load
    (a KeyError at ZeRO 0, a missing file at 1-3). --dtype auto takes the checkpoint's (a run moved between
    a CPU, whose auto is fp32, and a GPU, whose auto is bf16), and another is refused before any step,
    naming both; for a checkpoint that predates the record, from its run's config.json."""
    out = tmp_path / "run"
    args = common(builtin_data["shards"]["pretrain"], out, 6, "--config", str(tiny_model_config), "--zero-stage", "0")
    run("pretrain.py", args + ["--dtype", "bf16", "--stop-at-step", "2"])
    state_file = out / "checkpoints" / "step_00000002" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state["optimizer_layout"]["precision"] == "bf16"
    for older in (False, True):
        if older:
            del state["optimizer_layout"]["precision"]
            state_file.write_text(json.dumps(state))
        refused = run("pretrain.py", args + ["--dtype", "fp32"], check=False)
        assert refused.returncode == 2, refused.stderr[-2000:]
        assert "written under ZeRO 0 in bf16 and this run asks for ZeRO 0 in fp32" in refused.stderr, \
            refused.stderr[-2000:]
    resumed = run("pretrain.py", args)
    assert "resumed from" in resumed.stdout and "on cpu, bf16, ZeRO 0" in resumed.stdout, resumed.stdout[-2000:]
    assert max(losses(out)) == 6


@pytest.mark.parametrize("flags", [[], ["--dtype", "bf16"], ["--optimizer", "muon", "--muon-lr", "1e-12"]],
                         ids=["fp32-zero0", "bf16-zero1", "muon"])
def test_a_resume_trains_with_its_own_optimizer_flags(builtin_data, tiny_model_config, tmp_path, flags):
    """Loading a checkpoint restores its optimizer groups and peak rates; the resumed run's flags must win
    over them, as config.json records. Resumed at a rate of 1e-12 (3e-3 before), the weights barely move:
    the new rate is the one the optimizer steps with (ZeRO 0, DeepSpeed's BF16_Optimizer, Muon), not just
    the one logged."""
    out = tmp_path / "run"
    args = common(builtin_data["shards"]["pretrain"], out, 8, "--config", str(tiny_model_config),
                  "--lr-schedule", "constant", *flags)
    run("pretrain.py", args + ["--stop-at-step", "4"])
    resumed = run("pretrain.py", args + ["--lr", "1e-12", "--weight-decay", "0.05", "--betas", "0.8", "0.9"])
    assert "lr 0.003 -> 1e-12" in resumed.stdout and "weight_decay 0.1 -> 0.05" in resumed.stdout, \
        resumed.stdout[-2000:]
    assert "betas (0.9, 0.95) -> (0.8, 0.9)" in resumed.stdout, resumed.stdout[-2000:]
    logged = {r["step"]: r["lr"] for r in records(out) if "loss" in r}
    assert [logged[s] for s in range(5, 9)] == [1e-12] * 4 and logged[4] == 3e-3
    at_stop = load_model(out / "checkpoints" / "step_00000004" / "model")
    final = load_model(out / "final")
    moved = max((a.float() - b.float()).abs().max().item()
                for a, b in zip(at_stop.state_dict().values(), final.state_dict().values()))
    assert moved < 1e-6, moved  # four steps at 3e-3 move Adam's weights by ~1e-2


@pytest.mark.parametrize("flags", [[], ["--dtype", "bf16"], ["--zero-stage", "2"]],
                         ids=["fp32-zero0", "bf16-zero1", "fp32-zero2"])
def test_a_resume_clips_at_its_own_grad_clip(builtin_data, tiny_model_config, tmp_path, flags):
    """DeepSpeed's BF16_Optimizer and ZeRO 1/2 optimizer save their clipping threshold and restore it on
    load; the resumed run's --grad-clip must win, as config.json records. With Adam's beta1 at 0, a step's
    update is the clipped gradient over the root of the second moment the first four steps built: clipped to
    1e-9 the weights barely move, clipped at the checkpoint's 1.0 they move by about the rate."""
    out = tmp_path / "run"
    args = common(builtin_data["shards"]["pretrain"], out, 8, "--config", str(tiny_model_config),
                  "--lr-schedule", "constant", "--weight-decay", "0", "--betas", "0", "0.999", *flags)
    run("pretrain.py", args + ["--stop-at-step", "4"])
    resumed = run("pretrain.py", args + ["--grad-clip", "1e-9"])
    if flags:  # the optimizers that saved a threshold; ZeRO 0 in fp32 clips in the engine, from the config
        assert "grad_clip 1.0 -> 1e-09" in resumed.stdout, resumed.stdout[-2000:]
    assert json.loads((out / "config.json").read_text())["args"]["grad_clip"] == 1e-9
    at_stop = load_model(out / "checkpoints" / "step_00000004" / "model")
    final = load_model(out / "final")
    moved = max((a.float() - b.float()).abs().max().item()
                for a, b in zip(at_stop.state_dict().values(), final.state_dict().values()))
    assert moved < 1e-5, moved  # four steps clipped at 1.0 move the weights by ~1e-2


def test_a_resume_that_builds_another_model_is_refused_naming_the_fields(builtin_data, tiny_model_config,
                                                                         tmp_path):
    """A resume whose --config (--preset, --vocab-size) builds another model than the checkpoint holds: a
    clear error naming the fields, before DeepSpeed is set up, not a size mismatch per tensor from inside
    its load; nor, for a field no tensor shows (rope_theta), a run that trains another model silently."""
    from launch_helpers import tiny_config

    out = tmp_path / "run"
    args = common(builtin_data["shards"]["pretrain"], out, 4, "--config", str(tiny_model_config))
    run("pretrain.py", args + ["--stop-at-step", "2"])
    for change, shown in (({"hidden_size": 32}, "hidden_size 64 -> 32"), ({"rope_theta": 1e4}, "rope_theta")):
        other = tmp_path / "other.json"
        tiny_config().replace(**change).save(other)
        refused = run("pretrain.py", args + ["--config", str(other)], check=False)
        assert refused.returncode == 2, refused.stderr[-2000:]
        assert f"{out / 'checkpoints' / 'step_00000002'} holds another model: {shown}" in refused.stderr, \
            refused.stderr[-2000:]
        assert "Traceback" not in refused.stderr
    run("pretrain.py", args + ["--dropout", "0.1"])  # how it trains, not what it computes: resumes


def test_a_restart_in_a_run_dir_with_later_checkpoints_is_refused(builtin_data, tiny_model_config, tmp_path):
    """--resume none (or an earlier checkpoint) in a directory holding a longer run's checkpoints: kept,
    the old step 8 would become this run's final/ and --keep-last would delete this run's own."""
    out = tmp_path / "run"
    args = common(builtin_data["shards"]["pretrain"], out, 8, "--config", str(tiny_model_config))
    run("pretrain.py", args)
    for resume in ("none", str(out / "checkpoints" / "step_00000004")):
        again = run("pretrain.py", args + ["--steps", "4", "--keep-last", "1", "--resume", resume], check=False)
        assert again.returncode == 2 and "step_00000008, past this run's start" in again.stderr, \
            again.stderr[-2000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000004", "step_00000008"]


def test_a_checkpoint_of_another_stage_is_refused_naming_it(pretrain_run, builtin_data, tmp_path):
    """A pretraining checkpoint resumed by SFT, as --resume or as the --out it starts from (--init = --out,
    --resume auto), failed on "loader state has kind='pretrain', this run has 'sft'", naming neither the
    checkpoint nor a flag."""
    newest = pretrain_run / "checkpoints" / "step_00000012"
    shutil.copytree(pretrain_run, tmp_path / "pre")
    for out, extra, message in (
            (tmp_path / "sft", ["--resume", str(pretrain_run)], f"--resume {newest}: a checkpoint of a pretrain run"),
            (tmp_path / "pre", [], f"--resume auto: {tmp_path / 'pre' / 'checkpoints' / 'step_00000012'}: a "
                                   f"checkpoint of a pretrain run")):
        proc = run("sft.py", common(builtin_data["shards"]["sft"], out, 16, "--init", str(tmp_path / "pre"), *extra),
                   check=False)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
        assert "this sft run cannot resume it" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("record", [b'{"stage": "pretrain", "deepspeed_config": {', b'["pretrain"]'],
                         ids=["truncated", "not-an-object"])
def test_a_resumed_checkpoints_unreadable_run_config_is_an_error_naming_it(pretrain_run, builtin_data,
                                                                           tiny_model_config, tmp_path, record):
    """The config.json of the run that wrote a checkpoint (its stage; an older checkpoint's optimizer layout) was
    read twice: once with any fault ignored, once failing on a truncated file with the JSON parser's bare message
    ("Expecting value: ...") and accepting a list. One read now, and a fault is an error naming the file."""
    out = tmp_path / "pre"
    shutil.copytree(pretrain_run, out)
    (out / "config.json").write_bytes(record)
    proc = run("pretrain.py", common(builtin_data["shards"]["pretrain"], out, 16, "--config", str(tiny_model_config)),
               check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"error: {out / 'config.json'}: " in proc.stderr, proc.stderr[-2000:]
    assert (out / "config.json").read_bytes() == record and sorted(losses(out)) == sorted(losses(pretrain_run))


def test_resume_takes_a_run_dir_and_refuses_what_would_train_nothing(builtin_data, tiny_model_config, tmp_path):
    """--resume RUN_DIR continues from that run's newest checkpoint (into another --out too); a resume
    past --steps, or a --stop-at-step not after the resumed step, is refused instead of exiting 0 with
    nothing trained and no final/."""
    out, other = tmp_path / "run", tmp_path / "longer"
    args = common(builtin_data["shards"]["pretrain"], out, 8, "--config", str(tiny_model_config))
    run("pretrain.py", args)
    longer = run("pretrain.py", common(builtin_data["shards"]["pretrain"], other, 10, "--config",
                                       str(tiny_model_config), "--resume", str(out)))
    assert "at step 8" in longer.stdout and sorted(losses(other)) == [9, 10]
    assert (other / "final" / "model.safetensors").exists()
    for extra, message in ((["--steps", "4"], "is at step 8, past this run's 4 steps"),
                           (["--steps", "10", "--stop-at-step", "6"], "--stop-at-step 6 is not after")):
        refused = run("pretrain.py", args + extra, check=False)
        assert refused.returncode == 2 and message in refused.stderr, refused.stderr[-2000:]
    empty = tmp_path / "empty"
    (empty / "checkpoints").mkdir(parents=True)
    refused = run("pretrain.py", args + ["--resume", str(empty)], check=False)
    assert refused.returncode == 2 and "holds no complete checkpoint" in refused.stderr, refused.stderr[-2000:]
    refused = run("pretrain.py", args + ["--resume", str(tmp_path / "typo")], check=False)
    assert refused.returncode == 2 and f"--resume {tmp_path / 'typo'}: no such file or directory" in refused.stderr


def test_a_finished_run_resumed_past_its_end_loads_as_its_newest_checkpoint(pretrain_run, builtin_data,
                                                                               tiny_model_config, tmp_path):
    """A finished run (final/ at 12) resumed with --steps 16 and stopped at 14: its old final/ stayed beside the
    newer checkpoint, and every loader of the run directory (chat, --init, convert, evaluate) took it. final/ now
    goes when training resumes past it (its weights are in the checkpoint resumed from) and comes back at the
    new end; a final/ that no checkpoint holds is refused rather than lost."""
    from minimind_fast.checkpoint import resolve_model_dir

    out = tmp_path / "run"
    shutil.copytree(pretrain_run, out)
    args = common(builtin_data["shards"]["pretrain"], out, 16, "--config", str(tiny_model_config),
                  "--eval-every", "6")
    run("pretrain.py", args + ["--stop-at-step", "14"])
    assert not (out / "final").exists()
    assert resolve_model_dir(out) == out / "checkpoints" / "step_00000014" / "model"
    run("pretrain.py", args)
    newest = out / "checkpoints" / "step_00000016" / "model" / "model.safetensors"
    assert (out / "final" / "model.safetensors").read_bytes() == newest.read_bytes()

    lost = tmp_path / "lost"  # final/ at 12 with its checkpoint removed: the resume starts at 8
    shutil.copytree(pretrain_run, lost)
    shutil.rmtree(lost / "checkpoints" / "step_00000012")
    refused = run("pretrain.py", args[:args.index("--out")] + ["--out", str(lost)] + args[args.index("--out") + 2:],
                  check=False)
    assert refused.returncode == 2 and f"{lost / 'final'} holds weights that no checkpoint" in refused.stderr, \
        refused.stderr[-2000:]
    assert (lost / "final" / "model.safetensors").exists()


def test_tokens_per_s_leaves_out_checkpoint_time(builtin_data, tiny_model_config, tmp_path):
    """Time spent saving must not show in the next interval's tokens/s. Each save is made to take an
    extra 0.5 s, some hundred steps of the tiny model: counted, it would cut the rate after a save a
    hundredfold; left out, the two kinds of interval differ only by this machine's noise (up to 4x seen
    in CI with the real, fast saves, which is why the delay is added rather than relied on)."""
    out = tmp_path / "run"
    slow_saves = tmp_path / "pretrain_slow_saves.py"
    slow_saves.write_text(
        "import time\n"
        "from minimind_fast.training.engine import Trainer, train\n"
        "from minimind_fast.training.stages import PretrainStage\n"
        "save = Trainer.save\n"
        "def slow_save(self, *args, **kwargs):\n"
        "    save(self, *args, **kwargs)\n"
        "    time.sleep(0.5)\n"
        "Trainer.save = slow_save\n"
        "train(PretrainStage)\n")
    args = common(builtin_data["shards"]["pretrain"], out, 12, "--config", str(tiny_model_config),
                  "--save-every", "2", "--keep-last", "1", "--seq-len", "16", "--micro-batch-size", "1")
    subprocess.run([sys.executable, str(slow_saves), *args], cwd=ROOT, env=ENV, check=True, timeout=300,
                   capture_output=True)
    rate = losses(out, "tokens_per_s")
    after_save = sorted(rate[s] for s in range(3, 13, 2))
    others = sorted(rate[s] for s in range(4, 13, 2))
    # medians: about 1 here, under 0.05 when the saves' time counted
    assert after_save[2] > 0.25 * others[2], (after_save, others)
    # --keep-last 1: each save removed the one before
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000012"]


def _pretrain_in_background(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "launch" / "pretrain.py"), *args], cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait_for_logged_lines(out: Path, lines: int, timeout: float = 120) -> None:
    """Until the run in `out` has written `lines` lines of metrics.jsonl (or `timeout` seconds pass)."""
    deadline = time.time() + timeout
    while time.time() < deadline and not ((out / "metrics.jsonl").exists()
                                          and len((out / "metrics.jsonl").read_text().splitlines()) >= lines):
        time.sleep(0.05)


def test_sigterm_saves_a_checkpoint_and_resume_continues(builtin_data, tiny_model_config, tmp_path):
    out = tmp_path / "killed"
    args = common(builtin_data["shards"]["pretrain"], out, 400, "--config", str(tiny_model_config),
                  "--save-every", "1000")
    proc = subprocess.Popen([sys.executable, str(ROOT / "launch" / "pretrain.py"), *args], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for_logged_lines(out, 3)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output[-2000:]
    assert not (out / RUN_LOCK).exists()  # released, and its file removed
    ckpts = [p.name for p in (out / "checkpoints").iterdir()]
    assert len(ckpts) == 1 and (out / "checkpoints" / ckpts[0] / "COMPLETE").exists(), ckpts
    stopped_at = int(ckpts[0].split("_")[1])
    assert 3 <= stopped_at < 400
    result = run("pretrain.py", [*args[:args.index("--steps") + 1], str(stopped_at + 2),
                                 *args[args.index("--steps") + 2:]], check=True)
    assert f"resumed from {out / 'checkpoints' / ckpts[0]}" in result.stdout
    assert max(losses(out)) == stopped_at + 2


def test_a_killed_run_resumes_from_its_last_complete_checkpoint(builtin_data, tiny_model_config, tmp_path):
    """SIGKILL (no chance to save): the resume starts at the newest checkpoint holding COMPLETE, past a
    half-written one (a `.tmp` directory, or a renamed one whose marker was never written), and the
    metrics file drops the killed run's records after that checkpoint and the line torn by the kill."""
    out = tmp_path / "sigkilled"
    args = common(builtin_data["shards"]["pretrain"], out, 400, "--config", str(tiny_model_config),
                  "--save-every", "3")
    proc = _pretrain_in_background(args)
    try:
        _wait_for_logged_lines(out, 8)
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.returncode
    complete = sorted(p.name for p in (out / "checkpoints").iterdir() if (p / "COMPLETE").exists())
    newest = int(complete[-1].split("_")[1])
    before = losses(out)
    assert newest >= 6 and max(before) >= newest, (complete, max(before))
    for half_written in ("step_00000997.tmp", "step_00000998"):
        (out / "checkpoints" / half_written / "deepspeed").mkdir(parents=True)
        (out / "checkpoints" / half_written / "trainer_state.json").write_text('{"step": 99')
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 999, "loss": 1.')
    steps = args.index("--steps") + 1
    result = run("pretrain.py", [*args[:steps], str(newest + 2), *args[steps + 1:]])
    assert f"resumed from {out / 'checkpoints' / complete[-1]}" in result.stdout, result.stdout[-2000:]
    after = [r["step"] for r in records(out) if "loss" in r]
    assert after == list(range(1, newest + 3)), after
    assert all(losses(out)[s] == before[s] for s in range(1, newest + 1))
    assert (out / "loss.png").exists()


def test_a_second_training_into_a_running_runs_out_is_refused_and_a_killed_runs_lock_blocks_nothing(
        builtin_data, tiny_model_config, tmp_path):
    """Two trainings writing one --out (a command run again while the first trains, two scheduler jobs)
    would interleave checkpoints, metrics and final/: the second, on two ranks here, is refused at start-up
    naming the directory and the first run's pid and host, every rank exits rather than waiting on rank 0,
    and it writes nothing (config.json is still the first run's). The lock goes with the first run when it
    is killed: --resume auto then resumes it, and removes the lock file as it ends."""
    out = tmp_path / "busy"
    args = common(builtin_data["shards"]["pretrain"], out, 100000, "--config", str(tiny_model_config),
                  "--save-every", "3")  # steps enough to still be training when the second one starts
    first = _pretrain_in_background(args)
    try:
        _wait_for_logged_lines(out, 4)
        second = run("pretrain.py", [*args, "--log-every", "2"], launcher=two_ranks(29631), check=False,
                     timeout=240)
        assert first.poll() is None, "the first run ended before the second was refused"
    finally:
        first.kill()
        first.wait(timeout=60)
    said = second.stdout + second.stderr
    assert second.returncode != 0, said[-3000:]
    assert f"error: --out {out}: another process (pid {first.pid} on {socket.gethostname()}) is writing there" \
        in said, said[-3000:]
    assert json.loads((out / "config.json").read_text())["args"]["log_every"] == 1
    complete = sorted(p.name for p in (out / "checkpoints").iterdir() if (p / "COMPLETE").exists())
    newest = int(complete[-1].split("_")[1])
    steps = args.index("--steps") + 1
    result = run("pretrain.py", [*args[:steps], str(newest + 1), *args[steps + 1:]])
    assert f"resumed from {out / 'checkpoints' / complete[-1]}" in result.stdout, result.stdout[-2000:]
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


def test_sigterm_to_every_rank_saves_one_agreed_checkpoint(builtin_data, tiny_model_config, tmp_path):
    """Two ranks, SIGTERM to both (as a scheduler sends it): they agree on a step to stop at (they
    compare notes every STOP_CHECK_EVERY steps, never mid-step), save one complete checkpoint there and
    exit cleanly; the run resumes from it."""
    import psutil

    from minimind_fast.training.engine import STOP_CHECK_EVERY

    out = tmp_path / "killed2"
    args = common(builtin_data["shards"]["pretrain"], out, 400, "--config", str(tiny_model_config),
                  "--save-every", "1000")
    launcher = two_ranks(29611)
    proc = subprocess.Popen([*launcher, str(ROOT / "launch" / "pretrain.py"), *args], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_logged_lines(out, 3, timeout=180)
        ranks = [c for c in psutil.Process(proc.pid).children(recursive=True)
                 if any(a.startswith("--local_rank=") for a in c.cmdline())
                 and "deepspeed.launcher.launch" not in c.cmdline()]
        assert len(ranks) == 2, [c.cmdline() for c in ranks]
        for rank in ranks:
            rank.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=180)
    finally:  # a failed assertion must not leave ranks running (they would hold the port for the next run)
        if proc.poll() is None:
            for child in psutil.Process(proc.pid).children(recursive=True):
                child.kill()
            proc.kill()
    assert proc.returncode == 0, output[-3000:]
    ckpts = [p.name for p in (out / "checkpoints").iterdir()]
    assert len(ckpts) == 1 and (out / "checkpoints" / ckpts[0] / "COMPLETE").exists(), ckpts
    stopped_at = int(ckpts[0].split("_")[1])
    assert 3 <= stopped_at < 400 and stopped_at % STOP_CHECK_EVERY == 0, stopped_at
    steps_arg = args.index("--steps") + 1
    result = run("pretrain.py", [*args[:steps_arg], str(stopped_at + 2), *args[steps_arg + 1:]],
                 launcher=launcher, timeout=300)
    assert f"resumed from {out / 'checkpoints' / ckpts[0]}" in result.stdout
    assert max(losses(out)) == stopped_at + 2


def test_save_every_minutes_checkpoints_by_the_clock_and_ranks_agree(builtin_data, tiny_model_config, tmp_path):
    """--save-every-minutes with a period shorter than a step: one process saves after every step; two
    ranks, whose clocks differ, save together at their agreement steps (every STOP_CHECK_EVERY), each
    checkpoint complete; --save-every alone would have saved only the last step."""
    from minimind_fast.training.engine import STOP_CHECK_EVERY

    for launcher, steps, expected in ((None, 4, [1, 2, 3, 4]), (two_ranks(29621), 7, [STOP_CHECK_EVERY, 7])):
        out = tmp_path / f"timed{steps}"
        run("pretrain.py", common(builtin_data["shards"]["pretrain"], out, steps, "--config", str(tiny_model_config),
                                  "--save-every", "1000", "--save-every-minutes", "1e-6", "--keep-last", "0"),
            launcher=launcher)
        ckpts = sorted((out / "checkpoints").iterdir())
        assert [int(c.name.split("_")[1]) for c in ckpts] == expected
        assert all((c / "COMPLETE").exists() for c in ckpts)


def test_sft_from_pretrain_checkpoint_trains_on_assistant_tokens_only(pretrain_run, builtin_data, tmp_path):
    loader = build_loader("sft", builtin_data["shards"]["sft"], seq_len=64, micro_batch_size=2)
    tok = load_tokenizer(builtin_data["tokenizer"])
    batch = next(iter(loader))
    inputs, targets = batch["input_ids"], batch["targets"]
    for row in range(inputs.shape[0]):
        kept = targets[row][targets[row] != -100].tolist()
        assert kept and tok.decode(kept, skip_special_tokens=False).count("<|im_end|>") >= 1
        text = tok.decode(inputs[row].tolist(), skip_special_tokens=False)
        # Every predicted token is the next input token, and no user or system text is predicted.
        valid = targets[row] != -100
        assert torch.equal(targets[row][:-1][valid[:-1]], inputs[row][1:][valid[:-1]])
        assert "user" in text and "user" not in tok.decode(kept, skip_special_tokens=False)
    out = tmp_path / "sft"
    run("sft.py", common(builtin_data["shards"]["sft"], out, 4, "--init", str(pretrain_run), "--dropout", "0.25"))
    assert all(math.isfinite(v) for v in losses(out).values()) and (out / "final" / "model.safetensors").exists()
    # --dropout applies to a loaded model too (it was ignored after --init), and the checkpoint says so
    assert json.loads((out / "final" / "model_config.json").read_text())["dropout"] == 0.25


def test_a_held_out_split_without_target_tokens_logs_no_val_loss(pretrain_run, builtin_data, tmp_path):
    """SFT held-out conversations whose assistant turns all start past --seq-len weigh nothing: their mean was
    logged as val_loss 0 (val_ppl 1), a perfect model; now no val metrics, and one warning naming the data."""
    from minimind_fast.data.pipeline import TokenizeOptions, tokenize_to_shards

    convs = [json.loads(x) for x in builtin_data["files"]["sft"].read_text().splitlines()]
    for conv in convs:  # a user turn some 80 tokens long
        conv["conversations"][0]["content"] = " ".join([conv["conversations"][0]["content"]] * 8)
    (tmp_path / "long.jsonl").write_text("".join(json.dumps(c) + "\n" for c in convs))
    long_val = tmp_path / "long"
    tokenize_to_shards([tmp_path / "long.jsonl"], builtin_data["tokenizer"], long_val,
                       TokenizeOptions(kind="sft", seq_len=256, workers=1, val_fraction=0.2))
    out = tmp_path / "sft"
    proc = run("sft.py", common(builtin_data["shards"]["sft"], out, 4, "--init", str(pretrain_run), "--seq-len", "32",
                                "--val-data", str(long_val), "--eval-every", "2"))
    logged = records(out)
    assert [r["step"] for r in logged] == [1, 2, 3, 4] and not any("val_loss" in r for r in logged), logged
    warning = f"no val_loss: the held-out split of {long_val} gave nothing to average at --seq-len 32"
    assert (proc.stdout + proc.stderr).count(warning) == 1, proc.stdout[-2000:] + proc.stderr[-2000:]


@pytest.mark.parametrize("bad, message", [
    ("vocab", "vocab_size"),
    ("missing", "no manifest.json"),
    ("shard", "train-00000.bin: shard listed in manifest.json is missing"),
    ("kernels", "--kernels triton: Triton kernels need a CUDA device"),
    ("unwritable", "not writable"),
    ("file-as-out", "exists and is not a directory"),  # was "is not writable: [Errno 17] File exists"
    ("nan", "non-finite losses"),
    ("kind", "needs pretrain shards"),
    ("context", "--seq-len 300 exceeds the model's context length 256"),
    ("steps", "--steps 0: must be at least 1; --save-every 0: must be at least 1"),
    ("fp16-file", "ds.json: fp16 needs a CUDA device"),
    ("profile", "--profile-steps 2: profiling starts after 5 warm-up steps (at step 6) and this run ends at step 5"),
    ("tokenizer", "changed since the shards were written"),
    ("config-dir", "Is a directory"),
    ("out-is-data", "is --data's shard directory"),
    ("out-in-data", "is inside --data's shard directory"),
    ("out-in-val-data", "is inside --val-data's shard directory"),
])
def test_faults_give_clear_errors_before_training(bad, message, builtin_data, tiny_model_config, tmp_path):
    data, out = builtin_data["shards"]["pretrain"], tmp_path / "runs" / "run"
    extra = ["--config", str(tiny_model_config)]
    if bad == "vocab":
        extra += ["--vocab-size", "300"]
    elif bad == "missing":
        data = tmp_path / "nowhere"
    elif bad == "shard":  # a manifest whose shard was lost (a partial copy)
        data = tmp_path / "shards"
        shutil.copytree(builtin_data["shards"]["pretrain"], data)
        (data / "train-00000.bin").unlink()
    elif bad == "kernels":  # on the CPU without Triton's interpreter: failed at the first forward
        extra += ["--kernels", "triton"]
    elif bad == "unwritable":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "run"
    elif bad == "file-as-out":
        out = tmp_path / "file"
        out.write_text("x")
    elif bad == "nan":
        extra += ["--lr", "1e30", "--max-bad-steps", "2", "--grad-clip", "0"]
    elif bad == "kind":
        data = builtin_data["shards"]["sft"]
    elif bad == "context":  # document-local positions would not trip the model's own check
        extra += ["--seq-len", "300", "--doc-attention"]
    elif bad == "steps":
        extra += ["--steps", "0", "--save-every", "0"]
    elif bad == "fp16-file":  # --dtype fp16 is refused on the CPU; the same asked for by a config file
        (tmp_path / "ds.json").write_text(json.dumps({"fp16": {"enabled": True}}))
        extra += ["--deepspeed-config", str(tmp_path / "ds.json")]
    elif bad == "profile":  # a run that ends within the profiler's warm-up would write no profile.txt
        extra += ["--steps", "5", "--profile-steps", "2"]
    elif bad == "tokenizer":  # retrained in place after tokenizing: checkpoints would carry the new one
        data, tokenizer = tmp_path / "shards", tmp_path / "tokenizer"
        shutil.copytree(builtin_data["shards"]["pretrain"], data)
        shutil.copytree(builtin_data["tokenizer"], tokenizer)
        manifest = json.loads((data / "manifest.json").read_text())
        (data / "manifest.json").write_text(json.dumps({**manifest, "tokenizer_dir": str(tokenizer)}))
        with open(tokenizer / "tokenizer.json", "a") as f:
            f.write("\n")
    elif bad == "config-dir":  # an OSError other than FileNotFoundError was a traceback
        extra += ["--config", str(tmp_path)]
    elif bad.startswith("out-"):  # a run written among the shards (a copy: the fixture's stay clean)
        data = tmp_path / "shards"
        shutil.copytree(builtin_data["shards"]["pretrain"], data)
        out = data if bad == "out-is-data" else data / "run"
        if bad == "out-in-val-data":
            data, extra = builtin_data["shards"]["pretrain"], extra + ["--val-data", str(tmp_path / "shards")]
    env = {k: v for k, v in ENV.items() if k not in ("TRITON_INTERPRET", "MINIMIND_KERNELS")}
    proc = run("pretrain.py", common(data, out, 8) + extra, check=False, env=env)
    if bad.startswith("out-"):  # nothing written there, not even an empty directory
        assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == sorted(
            p.name for p in builtin_data["shards"]["pretrain"].iterdir())
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert bad == "nan" or not (out / "metrics.jsonl").exists()  # the others: before any training step
    assert not (out / RUN_LOCK).exists()  # the lock released (its file removed) on an error, in training too
    if bad == "file-as-out":  # left as it was
        assert out.read_text() == "x"
    elif bad not in ("nan", "out-is-data"):  # a refused start leaves no directory it made, parents included
        assert not out.exists() and not (tmp_path / "runs").exists()
    assert message in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("flags, message", [
    (["--steps", "0"], "--steps 0: must be at least 1"),
    (["--epochs", "0"], "--epochs 0.0: must be > 0"),
    (["--lr", "0"], "--lr 0.0: must be > 0"),
    (["--grad-accum", "0"], "--grad-accum 0: must be at least 1"),
    (["--log-every", "0"], "--log-every 0: must be at least 1"),
    (["--eval-batches", "0"], "--eval-batches 0: must be at least 1"),
    (["--keep-last", "-1"], "--keep-last -1: must be >= 0 (0: keep all)"),
    (["--warmup-steps", "-5"], "--warmup-steps -5: must be >= 0"),
    (["--seed", "-1"], "--seed -1: must be >= 0"),  # was numpy's "expected non-negative integer", after set-up
    (["--min-lr-ratio", "2"], "--min-lr-ratio 2.0: must be in [0, 1]"),
    (["--decay-fraction", "0"], "--decay-fraction 0.0: must be in (0, 1]"),
    (["--save-every-minutes", "0"], "--save-every-minutes 0.0: must be > 0 and finite"),
    (["--save-every-minutes", "nan"], "--save-every-minutes nan: must be > 0 and finite"),
])
def test_flags_no_run_can_use_are_refused(flags, message):
    parser = training_parser("test", "pretrain")
    args = parser.parse_args(["--data", "d", "--out", "o", *flags])
    with pytest.raises(ValueError, match=re.escape(message)):
        check_training_args(args)
    check_training_args(parser.parse_args(["--data", "d", "--out", "o"]))  # the defaults pass


@pytest.mark.parametrize("stage", ["pretrain", "sft", "distill", "lora", "dpo", "grpo"])
def test_each_stage_help_describes_the_stage_and_its_data(stage):
    from minimind_fast.training.dpo import DPOStage
    from minimind_fast.training.engine import stage_parser
    from minimind_fast.training.grpo import GRPOStage
    from minimind_fast.training.lora_stage import LoraStage
    from minimind_fast.training.stages import STAGES

    stage_cls = {**STAGES, "lora": LoraStage, "dpo": DPOStage, "grpo": GRPOStage}[stage]
    parser = stage_parser(stage_cls)
    assert len(parser.description.split()) > 3, parser.description  # a sentence, not the bare stage name
    data_help = next(a.help for a in parser._actions if "--data" in a.option_strings)
    assert ("prompts JSONL" if stage == "grpo" else "written by launch/tokenize.py") in data_help


@pytest.mark.parametrize("flag, package", [("--tensorboard", "tensorboard"), ("--wandb", "wandb")])
def test_a_logging_flag_without_its_package_is_refused_up_front(flag, package, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else real(name, *a))
    parser = training_parser("test", "pretrain")
    args = parser.parse_args(["--data", "d", "--out", "o", flag, *(["proj"] if flag == "--wandb" else [])])
    with pytest.raises(ValueError, match=re.escape(f"{flag} needs the {package} package")):
        check_training_args(args)


@pytest.mark.slow
def test_deepspeed_two_ranks_zero_stages_agree_with_single_process(builtin_data, tiny_model_config, tmp_path):
    base = common(builtin_data["shards"]["pretrain"], tmp_path / "single", 4, "--config", str(tiny_model_config),
                  "--save-every", "100")
    run("pretrain.py", base)
    single = losses(tmp_path / "single")
    assert single[4] < single[1]
    for stage in (0, 2, 3):
        out = tmp_path / f"zero{stage}"
        args = common(builtin_data["shards"]["pretrain"], out, 4, "--config", str(tiny_model_config),
                      "--save-every", "100", "--zero-stage", str(stage))
        # Two ranks of micro-batch 2 see the same 4 sequences per step as one rank of 4.
        args[args.index("--micro-batch-size") + 1] = "2"
        run("pretrain.py", args, launcher=two_ranks(29600 + stage), timeout=300)
        multi = losses(out)
        for step in range(1, 5):
            assert abs(multi[step] - single[step]) < 2e-4 * max(1, abs(single[step])), (stage, multi, single)
        # The logged gradient norm is this step's global one (DeepSpeed's under ZeRO, ours without).
        norms, single_norms = losses(out, "grad_norm"), losses(tmp_path / "single", "grad_norm")
        for step in range(1, 5):
            assert abs(norms[step] - single_norms[step]) < 1e-3 * single_norms[step], (stage, norms, single_norms)
        assert load_model(out).num_parameters() == load_model(tmp_path / "single").num_parameters()


@pytest.mark.slow
def test_torchrun_two_ranks_agree_with_the_single_process_run(pretrain_run, builtin_data, tiny_model_config, tmp_path):
    """The same script under torchrun (its environment, not DeepSpeed's launcher): two ranks of micro-batch 2
    train the single-process run's first steps (both in the warmup, so the schedule's length is moot)."""
    out = tmp_path / "torchrun"
    args = common(builtin_data["shards"]["pretrain"], out, 2, "--config", str(tiny_model_config), "--zero-stage", "2")
    args[args.index("--micro-batch-size") + 1] = "2"
    torchrun = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", "2", "--master_port", "29610"]
    result = run("pretrain.py", args, launcher=torchrun, timeout=300)
    assert "2 rank(s) on cpu" in result.stdout, result.stdout[-2000:]
    single, multi = losses(pretrain_run), losses(out)
    assert sorted(multi) == [1, 2]
    for step in multi:
        assert multi[step] == pytest.approx(single[step], rel=2e-4), (single, multi)
    assert (out / "final" / "model.safetensors").exists()


@pytest.mark.slow
def test_two_ranks_bf16_default_agrees_with_one(builtin_data, tiny_model_config, tmp_path):
    """The bf16 default (ZeRO 1, DeepSpeed's BF16_Optimizer) partitions its fp32 master weights over two
    ranks: the same steps as one rank, within bf16 noise."""
    def args(out, micro_batch):
        a = common(builtin_data["shards"]["pretrain"], out, 6, "--config", str(tiny_model_config),
                   "--save-every", "100", "--dtype", "bf16")
        a[a.index("--micro-batch-size") + 1] = str(micro_batch)
        return a
    run("pretrain.py", args(tmp_path / "one", 4))
    launcher = two_ranks(29605)
    run("pretrain.py", args(tmp_path / "two", 2), launcher=launcher, timeout=300)
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    # DeepSpeed's CPU shared-memory buffers (69 MB per rank) do not outlive the run.
    assert not list(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*_29605_*"))
    assert sorted(two) == list(range(1, 7))
    for step in two:
        assert two[step] == pytest.approx(one[step], rel=1e-3), (one, two)
    assert load_model(tmp_path / "two").num_parameters() == load_model(tmp_path / "one").num_parameters()


@pytest.mark.slow  # ~50 s: inductor compiles the model on the CPU
def test_compile_flag_trains_like_eager(builtin_data, tiny_model_config, tmp_path):
    """`--compile` (DeepSpeed's engine.compile over torch.compile) runs the same steps as eager."""
    args = lambda out: common(builtin_data["shards"]["pretrain"], out, 4, "--config", str(tiny_model_config),
                              "--save-every", "1000")
    run("pretrain.py", args(tmp_path / "eager"))
    run("pretrain.py", args(tmp_path / "compiled") + ["--compile"])
    eager, compiled = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert sorted(compiled) == [1, 2, 3, 4]
    for step in eager:
        assert compiled[step] == pytest.approx(eager[step], rel=1e-4), (eager, compiled)


def test_a_stale_deepspeed_build_lock_is_removed_and_a_fresh_one_kept(tmp_path, monkeypatch, capsys):
    """A first CPU start killed while DeepSpeed built its op left torch's lock file, and every later start
    waited on it forever; a lock older than any build is now removed, with a message."""
    from minimind_fast.training.engine import STALE_BUILD_LOCK_S, clear_stale_build_lock

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert not clear_stale_build_lock("op")  # no lock: nothing to do
    lock = tmp_path / "op" / "lock"
    lock.parent.mkdir(exist_ok=True)
    lock.touch()
    assert not clear_stale_build_lock("op") and lock.exists()  # a build may be running
    old = time.time() - STALE_BUILD_LOCK_S - 60
    os.utime(lock, (old, old))
    assert clear_stale_build_lock("op") and not lock.exists()
    assert "did not finish" in capsys.readouterr().err


@pytest.mark.parametrize("moe", [False, True])
def test_model_flags_reach_the_model_and_the_moe_aux_loss_is_added_and_logged(moe, builtin_data, tmp_path):
    """--gradient-checkpointing and --kernels build the model the stage trains; a MoE model's
    load-balancing loss is part of the loss that is backpropagated and a logged metric of its own."""
    from launch_helpers import tiny_config

    from minimind_fast.training.engine import stage_parser
    from minimind_fast.training.stages import PretrainStage

    config = tiny_config().replace(**({"use_moe": True, "n_routed_experts": 4, "num_experts_per_tok": 2,
                                       "aux_loss_alpha": 0.1} if moe else {}))
    config.save(tmp_path / "model.json")
    args = stage_parser(PretrainStage).parse_args([
        "--data", str(builtin_data["shards"]["pretrain"]), "--out", str(tmp_path / "run"),
        "--config", str(tmp_path / "model.json"), "--gradient-checkpointing", "--kernels", "reference"])
    stage = PretrainStage(args)
    model = stage.build_model(stage.open_data(Path(args.data))).train()
    assert model.gradient_checkpointing and model.ops.name == "reference"
    ids = torch.randint(0, config.vocab_size, (2, 16))
    loss, metrics = stage.compute_loss(model, {"input_ids": ids, "targets": ids})
    out = model(input_ids=ids, targets=ids)
    assert metrics["lm_loss"] == out.loss.detach()
    if not moe:
        assert "aux_loss" not in metrics and loss == out.loss
        return
    assert metrics["aux_loss"] == out.aux_loss.detach() and metrics["aux_loss"] > 0
    assert loss == out.loss + out.aux_loss
    loss.backward()  # the router trains on the aux loss too
    router = next(p for n, p in model.named_parameters() if "gate" in n and p.shape[0] == 4)
    assert router.grad is not None and router.grad.abs().sum() > 0


def test_seed_everything_seeds_python_numpy_and_torch():
    """A run's --seed reached torch only: a user's reward function drawing from `random` or `np.random`
    sampled differently in every fresh run."""
    import random

    import numpy as np

    from minimind_fast.training.engine import seed_everything

    def draws(seed: int) -> tuple:
        seed_everything(seed)
        return random.random(), np.random.rand(), torch.rand(()).item()

    assert draws(7) == draws(7)
    assert all(a != b for a, b in zip(draws(7), draws(8)))
    assert draws(2**40 + 7) == draws(2**40 + 7)  # NumPy takes seeds below 2**32 only


def _killed_midway(real_rmtree):
    """shutil.rmtree that removes one file of a directory and then dies, as a SIGKILL mid-removal would."""
    def rmtree(path, *args, **kwargs):
        files = sorted(p for p in Path(path).rglob("*") if p.is_file()) if Path(path).is_dir() else []
        if not files:
            return real_rmtree(path, *args, **kwargs)
        files[-1].unlink()
        raise KeyboardInterrupt("killed")
    return rmtree


def _contents(d: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in d.iterdir()}


def test_final_is_never_left_half_replaced(tmp_path, monkeypatch):
    """A kill while a finished run's final/ replaces an older one leaves a whole final/ (the old or the
    new), never some of the old files without the rest; a later run clears what the kill left."""
    from minimind_fast.training.engine import _replace_dir_copy

    src, dst = tmp_path / "step" / "model", tmp_path / "final"
    for d, text in ((src, "new"), (dst, "old")):
        d.mkdir(parents=True)
        for name in ("model.safetensors", "model_config.json"):
            (d / name).write_text(text)
    real = shutil.rmtree
    monkeypatch.setattr(shutil, "rmtree", _killed_midway(real))
    with pytest.raises(KeyboardInterrupt):
        _replace_dir_copy(src, dst)
    assert _contents(dst) in ({"model.safetensors": "old", "model_config.json": "old"}, _contents(src))
    monkeypatch.setattr(shutil, "rmtree", real)
    _replace_dir_copy(src, dst)
    assert _contents(dst) == _contents(src) and sorted(p.name for p in tmp_path.iterdir()) == ["final", "step"]


def test_a_checkpoint_pruned_by_keep_last_is_never_left_half_deleted_but_complete(tmp_path, monkeypatch):
    """A kill while --keep-last removes an old checkpoint must not leave it marked COMPLETE with files
    missing: --resume with it, or a later stage's --init, would load half a checkpoint. The next save's
    pruning removes it, and a killed save's leftovers, once a newer checkpoint is complete."""
    from minimind_fast.training.checkpointing import MARKER, complete_checkpoints, prune_checkpoints, step_dir

    for step in (4, 8, 12):
        ckpt = step_dir(tmp_path, step)
        (ckpt / "model").mkdir(parents=True)
        (ckpt / "model" / "model.safetensors").write_text("w")
        (ckpt / "trainer_state.json").write_text("{}")
        (ckpt / MARKER).write_text(f"step {step}\n")
    (tmp_path / "checkpoints" / "step_00000002.tmp" / "deepspeed").mkdir(parents=True)  # a killed save's
    monkeypatch.setattr(shutil, "rmtree", _killed_midway(shutil.rmtree))
    with pytest.raises(KeyboardInterrupt):
        prune_checkpoints(tmp_path, keep_last=1)
    for ckpt in complete_checkpoints(tmp_path):
        assert sorted(p.name for p in ckpt.rglob("*")) == [MARKER, "model", "model.safetensors",
                                                            "trainer_state.json"], ckpt
    monkeypatch.undo()
    prune_checkpoints(tmp_path, keep_last=1)
    assert [c.name for c in (tmp_path / "checkpoints").iterdir()] == ["step_00000012"]
