"""Reasoning distillation (`launch/distill.py`, `ReasoningStage`): the loss it computes, checked against a
float64 hand computation; an end-to-end run with a teacher, with resume; and its bad-input errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from launch_helpers import common, losses, run, tiny_config, two_ranks

from minimind_fast.checkpoint import load_model, save_model_dir
from minimind_fast.data.loaders import build_loader
from minimind_fast.data.records import REASONING_TAGS
from minimind_fast.data.tokenizer import load_tokenizer, train_tokenizer
from minimind_fast.model import MiniMindForCausalLM
from minimind_fast.training.args import training_parser
from minimind_fast.training.stages import ReasoningStage

SEQ = 128  # the reasoning samples are ~75 tokens: whole <think>...</answer> replies fit


# --- helpers (as in test_engine.py) ----------------------------------------------------------------

def stage_with(*flags: str) -> ReasoningStage:
    parser = training_parser("distill", "distill")
    ReasoningStage.add_arguments(parser)
    return ReasoningStage(parser.parse_args(["--data", "unused", "--out", "unused", *flags]))


def tiny_model(seed: int, vocab_size: int = 1024) -> MiniMindForCausalLM:
    torch.manual_seed(seed)
    return MiniMindForCausalLM(tiny_config(vocab_size).replace(kernels="reference"))


def weighted_runs(targets: torch.Tensor, weight: torch.Tensor, value: float) -> list[list[int]]:
    """Target tokens carrying `value`, grouped into runs of consecutive positions."""
    runs, current = [], []
    for t, w in zip(targets.tolist(), weight.tolist()):
        if t != -100 and w == value:
            current.append(t)
        elif current:
            runs, current = runs + [current], []
    return runs + ([current] if current else [])


# --- (a) the loss ------------------------------------------------------------------------------------

def test_loader_weights_exactly_the_reasoning_tags(builtin_data):
    tok = load_tokenizer(builtin_data["tokenizer"])
    loader = build_loader("reasoning", builtin_data["shards"]["reasoning"], seq_len=SEQ, micro_batch_size=4,
                          special_token_weight=7.0)
    batch = next(iter(loader))
    targets, weight = batch["targets"], batch["loss_weight"]
    assert set(weight[targets != -100].unique().tolist()) == {1.0, 7.0}
    for row in range(targets.shape[0]):
        runs = [tok.decode(r, skip_special_tokens=False) for r in weighted_runs(targets[row], weight[row], 7.0)]
        assert runs == list(REASONING_TAGS), runs
        plain = [t for t, w in zip(targets[row].tolist(), weight[row].tolist()) if t != -100 and w == 1.0]
        text = tok.decode(plain, skip_special_tokens=False)
        assert "First," in text and not any(tag in text for tag in REASONING_TAGS), text


def hand_loss(student_logits, teacher_logits, targets, weight, t: float, alpha: float):
    """The stage's objective written out in float64: tag-weighted CE mixed with T^2 * KL(teacher || student)."""
    s, te = student_logits.double(), teacher_logits.double()
    valid = targets != -100
    log_p = s - s.logsumexp(-1, keepdim=True)
    nll = -log_p.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    w = weight.double() * valid
    ce = (nll * w).sum() / w.sum()
    log_ps = s / t - (s / t).logsumexp(-1, keepdim=True)
    log_pt = te / t - (te / t).logsumexp(-1, keepdim=True)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    kd = (kl * valid).sum() / valid.sum() * t * t
    return (1 - alpha) * ce + alpha * kd, ce, kd


def test_loss_matches_a_float64_hand_computation(builtin_data, tmp_path):
    shards = builtin_data["shards"]["reasoning"]
    teacher_dir = save_model_dir(tiny_model(seed=1), tmp_path / "teacher", tokenizer_dir=builtin_data["tokenizer"])
    stage = stage_with("--teacher", str(teacher_dir), "--kd-temperature", "1.7", "--kd-alpha", "0.3",
                       "--special-token-weight", "5", "--seq-len", str(SEQ), "--micro-batch-size", "2")
    stage.check_arguments()
    stage.manifest = stage.open_data(shards)
    student = tiny_model(seed=2)
    stage.setup(student)
    loader = stage.build_loader(shards, split="train", rank=0, world_size=1, vocab_size=1024)
    batch = next(iter(loader))
    assert batch["loss_weight"].max() == 5.0

    loss, metrics = stage.compute_loss(student, batch)
    with torch.no_grad():
        expected, ce, kd = hand_loss(student(batch["input_ids"]).logits, stage.teacher(batch["input_ids"]).logits,
                                     batch["targets"], batch["loss_weight"], t=1.7, alpha=0.3)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert metrics["lm_loss"] == pytest.approx(ce.item(), rel=1e-5)
    assert metrics["kd_loss"] == pytest.approx(kd.item(), rel=1e-5) and kd.item() > 0

    loss.backward()  # the frozen teacher gets no gradient and is not a trainable parameter of the student
    assert all(p.grad is None and not p.requires_grad for p in stage.teacher.parameters())
    assert not {id(p) for p in stage.teacher.parameters()} & {id(p) for p in stage.trainable_parameters(student)}
    assert not stage.teacher.training


def test_without_teacher_the_loss_is_the_weighted_ce(builtin_data):
    shards = builtin_data["shards"]["reasoning"]
    stage = stage_with("--seq-len", str(SEQ), "--micro-batch-size", "2")
    stage.check_arguments()
    stage.manifest = stage.open_data(shards)
    student = tiny_model(seed=3)
    stage.setup(student)
    batch = next(iter(stage.build_loader(shards, split="train", rank=0, world_size=1, vocab_size=1024)))
    assert batch["loss_weight"].max() == 10.0  # MiniMind's weight by default
    loss, metrics = stage.compute_loss(student, batch)
    with torch.no_grad():
        logits = student(batch["input_ids"]).logits
        _, ce, _ = hand_loss(logits, logits, batch["targets"], batch["loss_weight"], t=1.0, alpha=0.0)
    assert loss.item() == pytest.approx(ce.item(), rel=1e-5) and "kd_loss" not in metrics


def test_weighted_ce_is_the_weighted_mean_when_the_weights_sum_below_one():
    """With --special-token-weight below 1, a micro-batch whose only targets are tag tokens has weights
    summing below 1: the loss is still their weighted mean (not scaled down), and an all-zero weight
    gives 0, not NaN."""
    stage = stage_with("--special-token-weight", "0.25")
    stage.check_arguments()
    student = tiny_model(seed=4)
    ids = torch.randint(0, 1024, (1, 12), generator=torch.Generator().manual_seed(0))
    targets = torch.full((1, 12), -100)
    targets[0, [3, 7]] = ids[0, [4, 8]]
    weight = torch.ones(1, 12)
    weight[0, [3, 7]] = 0.25
    loss, _ = stage.compute_loss(student, {"input_ids": ids, "targets": targets, "loss_weight": weight})
    with torch.no_grad():
        logits = student(ids).logits
    _, ce, _ = hand_loss(logits, logits, targets, weight, t=1.0, alpha=0.0)
    assert loss.item() == pytest.approx(ce.item(), rel=1e-5)
    zero, _ = stage.compute_loss(student, {"input_ids": ids, "targets": targets, "loss_weight": weight * 0})
    assert zero.item() == 0


def test_teacher_follows_the_students_dtype(builtin_data, tmp_path):
    shards = builtin_data["shards"]["reasoning"]
    teacher_dir = save_model_dir(tiny_model(seed=1), tmp_path / "teacher")
    stage = stage_with("--teacher", str(teacher_dir), "--seq-len", str(SEQ), "--micro-batch-size", "2")
    stage.check_arguments()
    stage.manifest = stage.open_data(shards)
    student = tiny_model(seed=2).to(torch.bfloat16)
    stage.setup(student)
    batch = next(iter(stage.build_loader(shards, split="train", rank=0, world_size=1, vocab_size=1024)))
    loss, metrics = stage.compute_loss(student, batch)
    assert torch.isfinite(loss) and metrics["kd_loss"] > 0
    assert {p.dtype for p in stage.teacher.parameters()} == {torch.bfloat16}
    assert (stage.args.kd_temperature, stage.args.kd_alpha) == (2.0, 0.5)  # the defaults with a teacher


# --- (b) end to end ----------------------------------------------------------------------------------

def distill_args(builtin_data, pretrain_run: Path, out: Path) -> list[str]:
    args = common(builtin_data["shards"]["reasoning"], out, 8, "--init", str(pretrain_run),
                  "--teacher", str(pretrain_run / "checkpoints" / "step_00000008"))
    args[args.index("--seq-len") + 1] = str(SEQ)
    return args


def test_distill_learns_logs_kd_and_resumes_exactly(builtin_data, pretrain_run, tmp_path):
    full = tmp_path / "full"
    run("distill.py", distill_args(builtin_data, pretrain_run, full))
    curve, kd = losses(full), losses(full, "kd_loss")
    assert sorted(curve) == list(range(1, 9)) and all(v == v and abs(v) < 1e4 for v in curve.values())
    assert curve[8] < curve[1] - 0.3, curve
    assert all(v > 0 for v in kd.values()), kd
    assert json.loads((full / "config.json").read_text())["stage"] == "distill"
    # The checkpoint holds the student alone (load_state refuses unexpected keys, e.g. a teacher's).
    student = load_model(full)
    assert student.num_parameters() == load_model(pretrain_run).num_parameters()

    resumed = tmp_path / "resumed"
    args = distill_args(builtin_data, pretrain_run, resumed)
    run("distill.py", args + ["--stop-at-step", "4"])
    assert max(losses(resumed)) == 4
    assert (resumed / "checkpoints" / "step_00000004" / "objective.json").exists()
    result = run("distill.py", args)
    assert "resumed from" in result.stdout
    again = losses(resumed)
    # Bitwise on CPU in fp32: the same batches, optimizer state, schedule, RNG and teacher.
    assert [again[s] for s in range(5, 9)] == [curve[s] for s in range(5, 9)]
    assert [losses(resumed, "kd_loss")[s] for s in range(5, 9)] == [kd[s] for s in range(5, 9)]


# --- (c) bad input -----------------------------------------------------------------------------------

def test_resume_refuses_another_distillation_term(builtin_data, tmp_path):
    """A checkpoint records its teacher's fingerprint and KL settings; a resume with another teacher
    (same vocabulary and tokenizer, other weights), none, or other settings would train another
    objective from the checkpoint's state, so it is refused."""
    teachers = [save_model_dir(tiny_model(seed=s), tmp_path / f"teacher{s}", tokenizer_dir=builtin_data["tokenizer"])
                for s in (1, 2)]
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()

    def set_up(*flags: str, resume: Path | None = None) -> ReasoningStage:
        stage = stage_with(*flags, "--seq-len", str(SEQ))
        stage.check_arguments()
        stage.manifest = stage.open_data(builtin_data["shards"]["reasoning"])
        stage.resume_from = resume
        stage.setup(tiny_model(seed=3))
        return stage

    set_up("--teacher", str(teachers[0])).save_extra(None, ckpt)
    assert json.loads((ckpt / "objective.json").read_text())["teacher"]
    set_up("--teacher", str(teachers[0]), resume=ckpt)  # the same teacher resumes
    other_teacher = r"\(the --teacher weights \(or --teacher given or not\) differ"
    for flags, what in [(("--teacher", str(teachers[1])), other_teacher),
                        ((), r"\(--kd-alpha; --kd-temperature; the --teacher weights"),
                        (("--teacher", str(teachers[0]), "--kd-alpha", "0.25"), r"\(--kd-alpha differ"),
                        (("--teacher", str(teachers[0]), "--special-token-weight", "3"),
                         r"\(--special-token-weight differ")]:
        with pytest.raises(ValueError, match="trained with another distillation term " + what):
            set_up(*flags, resume=ckpt)
    (ckpt / "objective.json").unlink()  # a checkpoint from before the record: nothing to compare
    set_up("--teacher", str(teachers[1]), resume=ckpt)


def test_teacher_with_another_vocabulary_is_refused(builtin_data, pretrain_run, tmp_path):
    teacher = save_model_dir(tiny_model(seed=1, vocab_size=2048), tmp_path / "teacher")
    args = distill_args(builtin_data, pretrain_run, tmp_path / "run")
    args[args.index("--teacher") + 1] = str(teacher)
    proc = run("distill.py", args, check=False)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "vocabulary of 2048 tokens but the student" in proc.stderr and "same tokenizer" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_teacher_with_another_tokenizer_is_refused(builtin_data, tmp_path):
    other = train_tokenizer([builtin_data["files"]["sft"]], 1024, tmp_path / "other_tokenizer")
    teacher = save_model_dir(tiny_model(seed=1), tmp_path / "teacher", tokenizer_dir=other)
    stage = stage_with("--teacher", str(teacher))
    stage.manifest = stage.open_data(builtin_data["shards"]["reasoning"])
    with pytest.raises(ValueError, match="tokenizer mismatch"):
        stage.setup(tiny_model(seed=2))


def test_teacher_with_a_shorter_context_is_refused_at_setup(builtin_data, tmp_path):
    """It failed only at the first step (an index error under --doc-attention), not naming --teacher."""
    teacher = save_model_dir(MiniMindForCausalLM(tiny_config().replace(max_position_embeddings=32)),
                             tmp_path / "teacher", tokenizer_dir=builtin_data["tokenizer"])
    stage = stage_with("--teacher", str(teacher), "--seq-len", "64")
    stage.manifest = stage.open_data(builtin_data["shards"]["reasoning"])
    with pytest.raises(ValueError, match="--teacher .*: its context length 32 .* below --seq-len 64"):
        stage.setup(tiny_model(seed=2))


@pytest.mark.parametrize("flags, message", [
    (["--kd-alpha", "0.5"], "--kd-alpha set the distillation term, which needs --teacher"),
    (["--teacher", "t", "--kd-alpha", "1.5"], "must be between 0 and 1"),
    (["--teacher", "t", "--kd-temperature", "0"], "must be > 0"),
    (["--teacher", "t", "--kd-temperature", "inf"], "must be > 0 and finite"),  # logits / inf: a NaN loss
    (["--special-token-weight", "-1"], "must be >= 0"),
    (["--special-token-weight", "nan"], "must be >= 0 and finite"),
    (["--special-token-weight", "inf"], "must be >= 0 and finite"),
])
def test_bad_flags_are_refused_before_loading_anything(flags, message):
    with pytest.raises(ValueError, match=message):
        stage_with(*flags).check_arguments()


@pytest.mark.slow
def test_zero3_two_ranks_agree_with_one_process(builtin_data, pretrain_run, tmp_path):
    """Under ZeRO-3 the student's weights are partitioned; the teacher, outside DeepSpeed, is whole on
    every rank. Two ranks of micro-batch 2 see the same sequences as one rank of 4."""
    single = distill_args(builtin_data, pretrain_run, tmp_path / "single")
    run("distill.py", single[:single.index("--steps") + 1] + ["3"] + single[single.index("--steps") + 2:])
    args = distill_args(builtin_data, pretrain_run, tmp_path / "zero3") + ["--zero-stage", "3"]
    args[args.index("--steps") + 1] = "3"
    args[args.index("--micro-batch-size") + 1] = "2"
    run("distill.py", args, launcher=two_ranks(29633))
    # The loss and the stage's metrics are averaged over ranks. Each rank normalises by its own token
    # weights: close, not bitwise. The KL term is small (about 0.01 at the first step), so its difference
    # is bounded in absolute terms too (the two ranks' token counts differ by batch).
    for key in ("loss", "lm_loss", "kd_loss"):
        one, two = losses(tmp_path / "single", key), losses(tmp_path / "zero3", key)
        assert sorted(two) == [1, 2, 3] and all(v > 0 for v in two.values())
        for step in two:
            assert two[step] == pytest.approx(one[step], rel=2e-3, abs=2e-4), (key, one, two)
