"""launch/evaluate.py: a model's held-out loss and perplexity over a shard split, against the engine's own
evaluation and against float64 computations straight from the shard files."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from launch_helpers import common, records, run, two_ranks

from minimind_fast.checkpoint import load_model
from minimind_fast.data.loaders import open_split, read_manifest
from minimind_fast.evaluation import EvalResult, evaluate, model_tokenizer_fingerprint, report, write_result


def float64_loss(model, rows: list[tuple[np.ndarray, np.ndarray]]) -> tuple[float, int]:
    """Summed cross-entropy and target count over (input ids, targets) rows, each scored alone in float64."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, targets in rows:
            logits = model(input_ids=torch.as_tensor(ids, dtype=torch.long)[None]).logits[0]
            t = torch.as_tensor(targets, dtype=torch.long)
            total += F.cross_entropy(logits, t, ignore_index=-100, reduction="sum").item()
            count += int((t != -100).sum())
    return total, count


def pretrain_windows(shard_dir, split: str, seq_len: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Every window of seq_len + 1 tokens of each shard; a target that opens a document is not scored."""
    rows = []
    for shard in open_split(shard_dir, split, None)[1]:
        tokens = np.asarray(shard.tokens, dtype=np.int64)
        starts = set(np.asarray(shard.offsets, dtype=np.int64).tolist())
        for w in range((len(tokens) - 1) // seq_len):
            lo = w * seq_len
            targets = tokens[lo + 1:lo + seq_len + 1].copy()
            targets[[i for i in range(seq_len) if lo + 1 + i in starts]] = -100
            rows.append((tokens[lo:lo + seq_len], targets))
    return rows


def sft_documents(shard_dir, split: str, seq_len: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each conversation (cut at seq_len) with targets on the tokens its assistant mask marks."""
    rows = []
    for shard in open_split(shard_dir, split, None)[1]:
        for d in range(shard.n_docs):
            ids, mask = (np.asarray(x[:seq_len], dtype=np.int64) for x in shard.doc(d))
            targets = np.where(mask[1:] > 0, ids[1:], -100)
            rows.append((ids[:-1], targets))
    return rows


def test_cli_matches_the_engines_last_evaluation(pretrain_run, builtin_data, tmp_path):
    """The run's last val_loss (step 12, the final weights, seed 7, micro-batch 4, the whole val split)."""
    out = tmp_path / "eval.json"
    proc = run("evaluate.py", ["--model", str(pretrain_run), "--data", str(builtin_data["shards"]["pretrain"]),
                               "--seq-len", "64", "--micro-batch-size", "4", "--seed", "7", "--output", str(out)])
    logged = [r for r in records(pretrain_run) if "val_loss" in r][-1]
    result = json.loads(out.read_text())
    assert logged["step"] == 12 and result["split"] == "val" and result["tokens"] > 0
    assert result["loss"] == pytest.approx(logged["val_loss"], rel=1e-6)
    assert result["perplexity"] == pytest.approx(logged["val_ppl"], rel=1e-6)
    assert f"perplexity {result['perplexity']:.2f}" in proc.stdout
    assert [p.name for p in tmp_path.iterdir()] == ["eval.json"]  # no temporary file left beside it


@pytest.mark.parametrize("micro_batch_size", [1, 3])
def test_pretrain_split_against_float64_windows(pretrain_run, builtin_data, micro_batch_size):
    """Every window of the split is scored, the last short batch too (3 does not divide the count)."""
    shards = builtin_data["shards"]["pretrain"]
    model = load_model(pretrain_run).double().eval()
    result = evaluate(model, shards, seq_len=64, micro_batch_size=micro_batch_size, seed=0)
    every = pretrain_windows(shards, "val", 64)
    assert len(every) % 3
    total, count = float64_loss(model, every)
    assert result.tokens == count and result.batches == -(-len(every) // micro_batch_size)
    assert result.loss == pytest.approx(total / count, rel=1e-9)
    assert result.perplexity == pytest.approx(math.exp(total / count), rel=1e-9)


def test_sft_scores_only_assistant_tokens_with_document_attention(pretrain_run, builtin_data):
    """Packed conversations with attention kept inside each: the mean over their assistant tokens, as
    if each were scored alone."""
    shards = builtin_data["shards"]["sft"]
    model = load_model(pretrain_run).double().eval()
    total, count = float64_loss(model, sft_documents(shards, "val", 128))
    result = evaluate(model, shards, seq_len=128, micro_batch_size=2, doc_attention=True)
    assert 0 < result.tokens == count
    assert result.loss == pytest.approx(total / count, rel=1e-9)


def test_max_batches_takes_the_first_batches_of_the_seeded_order(pretrain_run, builtin_data):
    model = load_model(pretrain_run).eval()
    shards = builtin_data["shards"]["pretrain"]
    one = evaluate(model, shards, split="train", seq_len=64, micro_batch_size=2, max_batches=1, seed=3)
    again = evaluate(model, shards, split="train", seq_len=64, micro_batch_size=2, max_batches=1, seed=3)
    other = evaluate(model, shards, split="train", seq_len=64, micro_batch_size=2, max_batches=1, seed=4)
    assert one.batches == 1 and one.tokens <= 2 * 64
    assert one.loss == again.loss and one.loss != other.loss


def test_bad_inputs_are_refused_naming_what(pretrain_run, builtin_data, tmp_path):
    model = load_model(pretrain_run).eval()
    shards = builtin_data["shards"]
    with pytest.raises(ValueError, match="holds dpo shards; perplexity needs pretrain, sft, reasoning"):
        evaluate(model, shards["dpo"])
    with pytest.raises(ValueError, match="another tokenizer .fingerprint"):
        evaluate(model, shards["pretrain"], seq_len=64, tokenizer_fingerprint="0" * 16)
    with pytest.raises(ValueError, match="--seq-len 4096 exceeds the model's context length 256"):
        evaluate(model, shards["pretrain"], seq_len=4096)
    # SFT rows cut after 4 tokens keep no assistant token; with --max-batches only those batches are known empty
    with pytest.raises(ValueError, match="the val split has no target tokens to score at --seq-len 4"):
        evaluate(model, shards["sft"], seq_len=4)
    with pytest.raises(ValueError, match="the first 1 batch.es. of the val split has no target tokens"):
        evaluate(model, shards["sft"], seq_len=4, micro_batch_size=1, max_batches=1)
    with pytest.raises(ValueError, match="no manifest.json"):
        evaluate(model, tmp_path)
    with pytest.raises(FileNotFoundError, match="no such shard directory"):
        evaluate(model, tmp_path / "missing")
    small = load_model(pretrain_run).eval()
    small.config.vocab_size = 100  # as a model with a smaller vocabulary than the shards' would be
    with pytest.raises(ValueError, match="more than the model's vocab_size 100"):
        evaluate(small, shards["pretrain"], seq_len=64)
    proc = run("evaluate.py", ["--model", str(tmp_path / "nothing"), "--data", str(shards["pretrain"])],
               check=False)
    assert proc.returncode == 1 and "error:" in proc.stderr and "nothing" in proc.stderr
    proc = run("evaluate.py", ["--model", str(pretrain_run), "--data", str(shards["pretrain"]), "--seq-len", "64",
                               "--seed", "-1"], check=False)  # was numpy's "expected non-negative integer"
    assert proc.returncode == 1 and "error: --seed -1: must be >= 0" in proc.stderr, proc.stderr


@pytest.fixture(scope="module")
def other_tokenizer(builtin_data, tmp_path_factory):
    """A tokenizer trained on the same text with a smaller vocabulary: not the one the models here carry."""
    from minimind_fast.data.tokenizer import load_tokenizer, train_tokenizer

    return load_tokenizer(train_tokenizer([builtin_data["files"]["sft"]], 300, tmp_path_factory.mktemp("other")))


def test_a_tokenizer_other_than_the_models_own_is_refused(pretrain_run, builtin_data, other_tokenizer):
    """Checked against --tokenizer alone, shards of a tokenizer the model was never trained with would be
    scored: refused naming both, before the weights are loaded. The model's own tokenizer is accepted."""
    shards = builtin_data["shards"]["pretrain"]
    proc = run("evaluate.py", ["--model", str(pretrain_run), "--tokenizer", str(other_tokenizer.dir),
                               "--data", str(shards)], check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert (f"error: --tokenizer {other_tokenizer.dir} is not the tokenizer of the model {pretrain_run} (beside "
            f"its weights: ") in proc.stderr
    own = read_manifest(shards)["tokenizer_fingerprint"]
    assert model_tokenizer_fingerprint(pretrain_run, builtin_data["tokenizer"]) == own
    assert model_tokenizer_fingerprint(pretrain_run, None) == own


def test_a_model_without_a_tokenizer_beside_it_is_checked_against_the_given_one(builtin_data, other_tokenizer,
                                                                                 tmp_path):
    """A MiniMind .pth in a folder with no tokenizer: whichever --tokenizer is given is what the shards are
    checked against, and without one nothing is checked."""
    pth = tmp_path / "full_sft_64.pth"
    pth.write_bytes(b"")  # only its folder is looked in for a tokenizer, never the file
    assert model_tokenizer_fingerprint(pth, None) is None
    assert model_tokenizer_fingerprint(pth, other_tokenizer.dir) == other_tokenizer.fingerprint
    own = read_manifest(builtin_data["shards"]["pretrain"])["tokenizer_fingerprint"]
    assert model_tokenizer_fingerprint(pth, builtin_data["tokenizer"]) == own != other_tokenizer.fingerprint


def test_an_unwritable_output_is_an_error_naming_it(pretrain_run, builtin_data, tmp_path):
    """A directory given as --output: the result is still printed, then an error naming the flag (no traceback,
    no temporary file left)."""
    proc = run("evaluate.py", ["--model", str(pretrain_run), "--data", str(builtin_data["shards"]["pretrain"]),
                               "--seq-len", "64", "--max-batches", "1", "--output", str(tmp_path)], check=False)
    assert proc.returncode == 1 and "perplexity" in proc.stdout
    assert f"error: --output {tmp_path}: cannot write it (Is a directory)" in proc.stderr
    assert "Traceback" not in proc.stderr and not list(tmp_path.iterdir())


def test_perplexity_past_the_float_range_is_inf_and_null_in_json(pretrain_run, builtin_data, tmp_path):
    """A model far off the data (its final norm scaled up: a loss in the thousands): the loss as float64 gives
    it, a perplexity of inf rather than a finite clamp, written to strict JSON as null."""
    shards = builtin_data["shards"]["pretrain"]
    model = load_model(pretrain_run).double().eval()
    with torch.no_grad():
        model.model.norm.weight.mul_(3000.0)
    total, count = float64_loss(model, pretrain_windows(shards, "val", 64))
    result = evaluate(model, shards, seq_len=64, micro_batch_size=4)
    assert total / count > 710 and result.loss == pytest.approx(total / count, rel=1e-9)
    assert result.perplexity == math.inf
    write_result(result, tmp_path / "eval.json", "scaled")

    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    written = json.loads((tmp_path / "eval.json").read_text(), parse_constant=refuse)
    assert written["loss"] == result.loss and written["perplexity"] is None


@pytest.mark.parametrize("loss, shown", [(5.6627, "perplexity 287.92 "), (244.3171, "perplexity 1.275e+106 "),
                                         (2443.1, "perplexity inf ")])
def test_report_keeps_a_huge_perplexity_short(loss, shown):
    """Fixed point up to a million, then three significant digits and an exponent (not 106 digits)."""
    line = report(EvalResult("shards", "val", 64, 931, 4, loss, math.exp(loss) if loss < 700 else math.inf))
    assert shown in line and len(line) < 120


def test_an_empty_split_is_named_as_empty(pretrain_run, builtin_data, tmp_path):
    """Shards tokenized with --val-fraction 0 list a val split with no shards: said so, not 'no val split'."""
    from minimind_fast.data.pipeline import TokenizeOptions, tokenize_to_shards

    out = tmp_path / "sft"
    tokenize_to_shards([builtin_data["files"]["sft"]], builtin_data["tokenizer"], out,
                       TokenizeOptions(kind="sft", seq_len=128, workers=1, val_fraction=0))
    model = load_model(pretrain_run).eval()
    with pytest.raises(ValueError, match=f"--data {out}: its val split is empty .no documents were held out"):
        evaluate(model, out, seq_len=128)
    assert evaluate(model, out, split="train", seq_len=128, max_batches=1).tokens > 0


def test_ranks_reproduce_a_two_rank_runs_val_loss(pretrain_run, builtin_data, tmp_path):
    """SFT on two ranks: each packs its own share of the val order into rows, so no single-process batching
    (any --max-batches) gives the logged val_loss; --ranks 2 deals the split out as the run did."""
    shards = builtin_data["shards"]["sft"]
    out = tmp_path / "sft"
    run("sft.py", common(shards, out, 1, "--init", str(pretrain_run), "--seq-len", "128", "--micro-batch-size",
                         "2", "--eval-every", "1", "--eval-batches", "1"), launcher=two_ranks(29660))
    logged = [r for r in records(out) if "val_loss" in r][-1]["val_loss"]
    result = tmp_path / "eval.json"
    run("evaluate.py", ["--model", str(out), "--data", str(shards), "--seq-len", "128", "--micro-batch-size", "2",
                        "--seed", "7", "--max-batches", "1", "--ranks", "2", "--output", str(result)])
    assert json.loads(result.read_text())["loss"] == pytest.approx(logged, rel=1e-6)
    model = load_model(out).eval()
    alone = [evaluate(model, shards, seq_len=128, micro_batch_size=2, seed=7, max_batches=n).loss for n in (1, 2, 3)]
    assert all(loss != pytest.approx(logged, rel=1e-4) for loss in alone)
