"""Several --data sources mixed by weight: the schedule's shares, the batches each source gives, exact
resume, per-source held-out losses, and the refusals (bad weight, repeated or missing directory, another
kind or tokenizer, another mixture on resume)."""

from __future__ import annotations

import json
import math
import shutil
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from launch_helpers import common, records, run

from minimind_fast.checkpoint import load_model
from minimind_fast.data.loaders import build_loader
from minimind_fast.data.mixture import MixtureLoader, MixtureSchedule, parse_sources
from minimind_fast.data.pipeline import TokenizeOptions, tokenize_to_shards
from minimind_fast.data.shards import ShardError
from minimind_fast.training.args import check_training_args
from minimind_fast.training.dpo import DPOStage
from minimind_fast.training.engine import stage_parser
from minimind_fast.training.grpo import GRPOStage
from minimind_fast.training.stages import PretrainStage, ReasoningStage, SFTStage

SEQ, BATCH, SEED = 64, 4, 7


@pytest.fixture(scope="module")
def sources(builtin_data, tmp_path_factory):
    """Two pretrain shard directories of disjoint documents (the built-in texts split 2:1), same tokenizer."""
    root = tmp_path_factory.mktemp("mixture")
    lines = builtin_data["files"]["pretrain"].read_text().splitlines(keepends=True)
    dirs = {}
    for name, part in (("web", lines[:200]), ("code", lines[200:])):
        jsonl = root / f"{name}.jsonl"
        jsonl.write_text("".join(part))
        opts = TokenizeOptions(kind="pretrain", seq_len=128, workers=1, val_fraction=0.05)
        tokenize_to_shards([jsonl], builtin_data["tokenizer"], root / name, opts)
        dirs[name] = root / name
    return dirs


def mixture(specs: list[str], split: str = "train", rank: int = 0, world_size: int = 1, seed: int = SEED):
    parsed = parse_sources(specs)
    loaders = [build_loader("pretrain", s.path, seq_len=SEQ, micro_batch_size=BATCH, seed=seed, rank=rank,
                            world_size=world_size, split=split, vocab_size=1024) for s in parsed]
    return MixtureLoader(parsed, loaders, seed=seed, rank=rank, world_size=world_size)


def stage(cls, *argv: str):
    return cls(stage_parser(cls).parse_args(["--out", "unused", "--steps", "1", *argv]))


# --- the schedule ------------------------------------------------------------------------------------

def test_schedule_shares_match_the_weights_over_any_stretch_and_differ_per_seed():
    weights = [s.weight for s in parse_sources(["a:5", "b:3", "c"])]
    assert weights == pytest.approx([5 / 9, 3 / 9, 1 / 9])
    picks = {seed: [MixtureSchedule(weights, seed).source_at(k) for k in range(20_000)] for seed in (0, 1)}
    for seq in picks.values():
        for start, n in ((0, 20_000), (0, 90), (12_345, 900), (7_000, 9)):
            counts = Counter(seq[start:start + n])
            # a low-discrepancy sequence: within a few batches of n x weight, however short the stretch
            assert all(abs(counts[i] - n * w) <= 3 for i, w in enumerate(weights)), (start, n, counts)
    assert picks[0] != picks[1]


def test_ranks_take_turns_in_the_runs_schedule_and_each_keeps_the_shares(sources):
    """Rank r's k-th micro-batch is the run's (k x ranks + r)-th: every step's global batch mixes the sources,
    and each rank on its own still draws them at the weights."""
    specs = [f"{sources['web']}:0.7", f"{sources['code']}:0.3"]
    ranks = [mixture(specs, rank=r, world_size=4) for r in range(4)]
    run_wide = [MixtureSchedule([0.7, 0.3], SEED).source_at(k) for k in range(4_000)]
    assert [ranks[r].source_at(k) for k in range(1_000) for r in range(4)] == run_wide
    for r in range(4):
        assert abs([ranks[r].source_at(k) for k in range(1_000)].count(1) - 300) <= 5


def test_parse_sources_normalises_weights_and_names_each_source(tmp_path):
    (tmp_path / "a" / "web").mkdir(parents=True)
    (tmp_path / "b" / "web").mkdir(parents=True)
    (tmp_path / "odd:2").mkdir()  # an existing path is a path, even with a number after a ':'
    parsed = parse_sources([f"{tmp_path}/a/web:3", f"{tmp_path}/b/web", f"{tmp_path}/odd:2"])
    assert [s.weight for s in parsed] == pytest.approx([0.6, 0.2, 0.2])
    assert [s.name for s in parsed] == ["web", "web_2", "odd:2"]
    assert parsed[2].path == tmp_path / "odd:2"


@pytest.mark.parametrize("specs, message", [
    (["{a}:0", "{b}"], "{a}:0: the weight '0' of {a} is not a positive finite number"),
    (["{a}:-1", "{b}"], "the weight '-1' of {a} is not a positive finite number"),
    (["{a}:nan", "{b}"], "the weight 'nan' of {a} is not a positive finite number"),
    (["{a}:inf", "{b}"], "the weight 'inf' of {a} is not a positive finite number"),
    (["{a}:2", "{a}/../{a_name}"], "the directory {a} is given twice (also as {a}:2)"),
])
def test_bad_weights_and_repeated_directories_are_refused_by_the_parser(specs, message, sources, capsys):
    fill = {"a": sources["web"], "b": sources["code"], "a_name": "web"}
    with pytest.raises(SystemExit):
        stage(PretrainStage, "--data", *[s.format(**fill) for s in specs])
    err = capsys.readouterr().err
    assert "error: argument --data: " in err and message.format(**fill) in err, err


def test_one_source_stays_a_plain_path_and_several_need_steps(sources, capsys):
    parser = stage_parser(PretrainStage)
    args = parser.parse_args(["--data", f"{sources['web']}:3", "--out", "o"])
    assert args.data == str(sources["web"])  # as before mixtures: config.json and messages unchanged
    args = parser.parse_args(["--data", str(sources["web"]), str(sources["code"]), "--out", "o"])
    with pytest.raises(ValueError, match="--data with 2 sources needs --steps: --epochs has no meaning over a mixture"):
        check_training_args(args)
    with pytest.raises(SystemExit):  # GRPO and PPO read one prompts file
        stage(GRPOStage, "--data", "a.jsonl", "b.jsonl")
    assert "argument --data: this stage reads one prompts file, got 2 (a.jsonl b.jsonl)" in capsys.readouterr().err


# --- the batches ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("rank, world_size", [(0, 1), (1, 2)])
def test_each_batch_is_the_scheduled_sources_next_in_its_own_order(sources, rank, world_size):
    """60 batches at 0.7/0.3: the small source wraps into its second epoch; each batch is, bitwise, the next
    batch of a loader over the scheduled source alone (so its own order and epochs)."""
    mixed = mixture([f"{sources['web']}:0.7", f"{sources['code']}:0.3"], rank=rank, world_size=world_size)
    alone = [iter(build_loader("pretrain", sources[name], seq_len=SEQ, micro_batch_size=BATCH, seed=SEED, rank=rank,
                               world_size=world_size, vocab_size=1024)) for name in ("web", "code")]
    picks = []
    for position, batch in zip(range(60), mixed):
        i = MixtureSchedule([0.7, 0.3], SEED).source_at(position * world_size + rank)
        expected = next(alone[i])
        assert all(torch.equal(batch[k], expected[k]) for k in ("input_ids", "targets", "cu_seqlens")), position
        picks.append(i)
    assert mixed.loaders[1].epoch >= 1 and abs(picks.count(1) - 18) <= 3
    assert len(set(picks[:10])) == 2  # interleaved from the start, not in blocks


def test_loader_resume_continues_with_the_same_batches_and_refuses_another_mixture(sources):
    specs = [f"{sources['web']}:0.7", f"{sources['code']}:0.3"]
    first = mixture(specs)
    it = iter(first)
    for _ in range(23):
        next(it)
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint stores it
    expected = [next(it) for _ in range(10)]
    resumed = mixture(specs)
    resumed.load_state_dict(state)
    again = [b for _, b in zip(range(10), resumed)]
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(expected, again))
    for other in ([f"{sources['web']}:0.5", f"{sources['code']}:0.5"], specs[::-1]):
        with pytest.raises(ValueError, match="the checkpoint trained on the --data mixture .* and this run asks for "
                                             ".*: resuming would not draw the batches the checkpoint left off at"):
            mixture(other).load_state_dict(state)
    single = build_loader("pretrain", sources["web"], seq_len=SEQ, micro_batch_size=BATCH, seed=SEED)
    with pytest.raises(ValueError, match="the checkpoint trained on a mixture of 2 --data sources .* and this run "
                                         "reads one directory"):
        single.load_state_dict(state)
    with pytest.raises(ValueError, match="the checkpoint trained on one --data directory and this run mixes 2"):
        mixture(specs).load_state_dict(single.state_dict())


# --- what a stage accepts -------------------------------------------------------------------------------

def test_sources_of_another_kind_tokenizer_or_vocabulary_are_named(sources, builtin_data, tmp_path):
    web, sft = sources["web"], builtin_data["shards"]["sft"]
    with pytest.raises(ValueError, match=f"--data {sft} holds sft shards; the pretrain stage needs pretrain shards"):
        stage(PretrainStage, "--data", str(web), str(sft)).open_data(parse_sources([str(web), str(sft)]))
    other = tmp_path / "other"
    shutil.copytree(sources["code"], other)
    manifest = json.loads((other / "manifest.json").read_text())
    (other / "manifest.json").write_text(json.dumps({**manifest, "tokenizer_fingerprint": "0123456789abcdef"}))
    with pytest.raises(ValueError, match=f"--data {other} was tokenized with tokenizer 0123456789abcdef and --data "
                                         f"{web} with {manifest['tokenizer_fingerprint']}: a mixture needs one"):
        stage(PretrainStage, "--data", str(web), str(other)).open_data(parse_sources([str(web), str(other)]))
    with pytest.raises(ValueError, match=f"--data {tmp_path / 'nowhere'}: no such directory"):
        stage(PretrainStage, "--data", str(web), "x").open_data(parse_sources([str(web), str(tmp_path / "nowhere")]))
    pre = stage(PretrainStage, "--data", str(web), str(sources["code"]))
    with pytest.raises(ShardError, match=f"{web}: shards were tokenized with a vocabulary of 800 tokens, more than "
                                         "the model's vocab_size 500"):
        pre.build_loader(parse_sources([str(web), str(sources["code"])]), split="train", rank=0, world_size=1,
                         vocab_size=500)
    dpo = builtin_data["shards"]["dpo"]
    with pytest.raises(ValueError, match="--precompute-reference keys the reference's scores by pair number in one"):
        stage(DPOStage, "--data", str(dpo), str(tmp_path), "--precompute-reference")


def test_sft_mixes_sft_and_reasoning_shards_and_distillation_refuses_sft(builtin_data):
    """The SFT loader gives both kinds the same batch (assistant tokens, no tag weight), and each batch comes
    from one source: sound. Distillation weighs reasoning tags, which sft shards do not mark."""
    sft, reasoning = builtin_data["shards"]["sft"], builtin_data["shards"]["reasoning"]
    specs = [str(sft), str(reasoning)]
    sft_stage = stage(SFTStage, "--data", *specs, "--seq-len", "128", "--micro-batch-size", "2")
    assert sft_stage.open_data(parse_sources(specs))["kind"] == "sft+reasoning"
    loader = sft_stage.build_loader(parse_sources(specs), split="train", rank=0, world_size=1, vocab_size=1024)
    batches = [b for _, b in zip(range(6), loader)]
    assert {loader.source_at(k) for k in range(6)} == {0, 1}
    assert all(set(b) == set(batches[0]) and "loss_weight" not in b for b in batches)
    with pytest.raises(ValueError, match=f"--data {sft} holds sft shards; the distill stage needs reasoning shards"):
        stage(ReasoningStage, "--data", *specs).open_data(parse_sources(specs))


def test_combine_weighs_the_sources_that_have_held_out_values_and_leaves_out_one_without():
    """A source whose held-out split gave no value (no target token within --seq-len) is left out of the
    mean, the other weights renormalised: a KeyError before, or a 0 standing for a perfect loss."""
    specs = ["a:0.5", "b:0.3", "c:0.2"]
    loaders = [SimpleNamespace(kind="pretrain", split="val", n_items=1) for _ in specs]
    loader = MixtureLoader(parse_sources(specs), loaders, seed=SEED)
    means = [{"val_loss": 2.0, "val_ppl": math.exp(2.0)}, {}, {"val_loss": 4.0, "val_ppl": math.exp(4.0)}]
    combined = loader.combine(means)
    assert combined == pytest.approx({"val_loss_a": 2.0, "val_ppl_a": math.exp(2.0), "val_loss_c": 4.0,
                                      "val_ppl_c": math.exp(4.0), "val_loss": (0.5 * 2.0 + 0.2 * 4.0) / 0.7},
                                     rel=1e-12)
    assert loader.combine([{}, {}, {}]) == {}


# --- a run ----------------------------------------------------------------------------------------------

def test_mixture_run_resumes_exactly_evaluates_each_source_and_refuses_other_weights(sources, tiny_model_config,
                                                                                     tmp_path):
    web, code = sources["web"], sources["code"]
    specs = [f"{web}:0.7", f"{code}:0.3"]

    def args(out, *extra):
        return common(web, out, 8, "--config", str(tiny_model_config), "--data", *specs, "--eval-every", "8", *extra)

    full = run("pretrain.py", args(tmp_path / "full"))
    assert (f"--data mixes 2 sources, weights as shares of micro-batches:\n  web: weight 0.7, pretrain shards in "
            f"{web}: train 6,207 tokens") in full.stdout, full.stdout[-2000:]
    run("pretrain.py", args(tmp_path / "resumed", "--stop-at-step", "3"))
    run("pretrain.py", args(tmp_path / "resumed"))
    # Bitwise on CPU in fp32, held-out losses included.
    assert timeless(tmp_path / "resumed") == timeless(tmp_path / "full")

    # Each source's loader moved by the batches the schedule gave it.
    state = json.loads(torch.load(tmp_path / "full" / "checkpoints" / "step_00000008" / "rank_0.pt")["loader"])
    picks = Counter(MixtureSchedule([0.7, 0.3], 7).source_at(k) for k in range(8))
    assert state["position"] == 8 and [e["loader"]["cursor"] // BATCH for e in state["mixture"]] == [picks[0], picks[1]]

    stats = json.loads((tmp_path / "full" / "dataset_stats.json").read_text())
    assert [(s["name"], s["weight"], s["splits"]["train"]["tokens"]) for s in stats["mixture"]] == [
        ("web", 0.7, 6207), ("code", 0.3, 3163)]

    # Held-out: each source's val loss is its split's token mean under the final weights, in float64; val_loss
    # their mean weighted 0.7/0.3.
    model = load_model(tmp_path / "full").double().eval()
    reference = {name: held_out_loss(model, path) for name, path in (("web", web), ("code", code))}
    [logged] = [r for r in records(tmp_path / "full") if "val_loss" in r]
    assert logged["val_loss_web"] == pytest.approx(reference["web"], rel=1e-5)
    assert logged["val_loss_code"] == pytest.approx(reference["code"], rel=1e-5)
    assert logged["val_loss"] == pytest.approx(0.7 * reference["web"] + 0.3 * reference["code"], rel=1e-5)
    assert logged["val_ppl"] == pytest.approx(math.exp(logged["val_loss"]), rel=1e-12)

    refused = run("pretrain.py", args(tmp_path / "resumed", "--steps", "9", "--data", f"{web}:0.5", f"{code}:0.5"),
                  check=False)
    assert refused.returncode == 2 and "the checkpoint trained on the --data mixture" in refused.stderr, refused.stderr


def timeless(run_dir) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "memory_mb")} for r in records(run_dir)]


def held_out_loss(model, path) -> float:
    """Cross-entropy over every target token of one pass over the val split, as a lone --data evaluates it."""
    val = build_loader("pretrain", path, seq_len=SEQ, micro_batch_size=BATCH, seed=SEED, split="val",
                       vocab_size=model.config.vocab_size)
    total, count = 0.0, 0
    for batch in val.one_pass():
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"]).logits
        total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(),
                                                   ignore_index=-100, reduction="sum").item()
        count += int((batch["targets"] != -100).sum())
    assert count > 0
    return total / count
