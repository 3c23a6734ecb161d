"""DPO stage: the loss is the formula (checked in float64 by hand), training raises the reward margin,
precomputed reference log-probs equal the live reference's, resume is exact, bad input is refused."""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from launch_helpers import common, run, tiny_config, two_ranks
from launch_helpers import losses as metric
from safetensors.torch import load_file

from minimind_fast.checkpoint import load_model, save_model_dir
from minimind_fast.config import get_preset
from minimind_fast.data.loaders import build_loader
from minimind_fast.data.pipeline import TokenizeOptions, tokenize_to_shards
from minimind_fast.data.tokenizer import train_tokenizer
from minimind_fast.model import MiniMindForCausalLM
from minimind_fast.training.args import training_parser
from minimind_fast.training.dpo import REFERENCE_FILE, DPOStage, _data_identity, dpo_loss

STEPS = 16


# --- the loss, in process -----------------------------------------------------------------
def stage_for(*flags: str) -> DPOStage:
    parser = training_parser("dpo", "dpo")
    DPOStage.add_arguments(parser)
    return DPOStage(parser.parse_args(["--data", "unused", "--out", "unused", *flags]))


def tiny_model(seed: int) -> MiniMindForCausalLM:
    torch.manual_seed(seed)
    return MiniMindForCausalLM(get_preset("tiny", num_hidden_layers=2, vocab_size=128, hidden_size=64,
                                          kernels="reference"))


def hand_built_batch() -> dict:
    """Two pairs; chosen and rejected of different widths, prompts and padding masked."""
    g = torch.Generator().manual_seed(3)
    batch = {"pair_index": torch.tensor([5, 2])}
    for side, width, prompt, lengths in (("chosen", 9, 3, (9, 6)), ("rejected", 7, 3, (5, 7))):
        ids = torch.randint(3, 128, (2, width), generator=g)
        targets = torch.full((2, width), -100)
        for r, n in enumerate(lengths):
            ids[r, n:] = 0
            targets[r, prompt:n - 1] = ids[r, prompt + 1:n]
        batch.update({f"{side}_input_ids": ids, f"{side}_targets": targets,
                      f"{side}_position_ids": torch.arange(width).expand(2, width).clone()})
    return batch


def logps_by_hand(model: MiniMindForCausalLM, batch: dict, side: str) -> torch.Tensor:
    """Sum of log p(target) over the side's target tokens, in float64, one side at a time."""
    m = copy.deepcopy(model).double().eval()
    ids, targets = batch[f"{side}_input_ids"], batch[f"{side}_targets"]
    with torch.no_grad():
        logp = torch.log_softmax(m(ids, position_ids=batch[f"{side}_position_ids"]).logits, dim=-1)
    out = torch.zeros(ids.shape[0], dtype=torch.float64)
    for r in range(ids.shape[0]):
        for t in range(ids.shape[1]):
            if targets[r, t] != -100:
                out[r] += logp[r, t, targets[r, t]]
    return out


def expected_loss(policy, reference, batch, beta: float, eps: float) -> tuple[float, list[float]]:
    pc, pr = logps_by_hand(policy, batch, "chosen"), logps_by_hand(policy, batch, "rejected")
    rc, rr = logps_by_hand(reference, batch, "chosen"), logps_by_hand(reference, batch, "rejected")
    margins = [beta * ((pc[i] - rc[i]) - (pr[i] - rr[i])).item() for i in range(2)]
    log_sig = lambda z: -math.log1p(math.exp(-z))  # noqa: E731
    loss = sum(-(1 - eps) * log_sig(d) - eps * log_sig(-d) for d in margins) / 2
    return loss, margins


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_loss_equals_the_formula_with_live_and_precomputed_reference(eps):
    reference = tiny_model(0)
    policy = copy.deepcopy(reference)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    batch = hand_built_batch()
    beta = 0.3
    want, margins = expected_loss(policy, reference, batch, beta, eps)
    assert abs(margins[0]) > 1e-3 and abs(margins[1]) > 1e-3

    live = stage_for("--beta", str(beta), "--label-smoothing", str(eps))
    live.setup(reference)  # the --init model becomes the (copied, frozen) reference
    loss, metrics = live.compute_loss(policy, batch)
    assert abs(loss.item() - want) < 1e-5, (loss.item(), want)
    assert abs(metrics["reward_margin"] - sum(margins) / 2) < 1e-5
    assert metrics["reward_accuracy"] == sum(m > 0 for m in margins) / 2
    loss.backward()
    assert all(p.grad is None for p in live.reference.parameters())
    assert all(p.grad is not None for p in policy.parameters())

    pre = stage_for("--beta", str(beta), "--label-smoothing", str(eps))
    table = torch.randn(8, 2)  # rows of other pairs must not be read
    rows = batch["pair_index"]
    table[rows, 0] = logps_by_hand(reference, batch, "chosen").float()
    table[rows, 1] = logps_by_hand(reference, batch, "rejected").float()
    pre.tables, pre.reference = {"train": table, "val": table}, None
    assert abs(pre.compute_loss(policy, batch)[0].item() - want) < 1e-5
    assert abs(pre.eval_loss(policy, batch).item() - want) < 1e-5


def test_tokens_counted_are_the_positions_the_forwards_run_on(monkeypatch):
    """Chosen and rejected rows go through one forward, padded to the wider side: tokens/s counts those
    positions (36 here, not each side's own width, 2 x 9 + 2 x 7 = 32), so that MFU, tokens/s x FLOPs per
    token, is what torch's FLOP counter finds the step (the policy's forward and backward, the live
    reference's forward) multiplying."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    monkeypatch.setenv("MINIMIND_ATTENTION", "sdpa")
    batch = hand_built_batch()
    stage = stage_for("--seq-len", "9")  # the batch's width: the formula counts attention at --seq-len
    stage.setup(tiny_model(0))
    policy = tiny_model(1)
    assert stage.tokens_in_batch(batch) == 2 * 2 * 9
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        stage.compute_loss(policy, batch)[0].backward()
    assert stage.flops_per_token(policy) * stage.tokens_in_batch(batch) == counter.get_total_flops()

@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_loss_of_far_apart_sequence_logps_is_finite_and_equals_the_formula(eps):
    """Sequence log-probs are sums over hundreds of tokens, so margins of hundreds of nats occur: the loss
    and its gradient must stay finite (log(sigmoid(m)) is -inf there, a NaN after the backward) and equal
    the float64 softplus form of the formula."""
    pc = torch.tensor([-50.0, -900.0, -10.0, -400.0], requires_grad=True)
    pr = torch.tensor([-900.0, -50.0, -10.0, -400.5], requires_grad=True)
    rc, rr = torch.tensor([-60.0, -60.0, -10.0, -400.0]), torch.tensor([-60.0, -60.0, -10.0, -400.0])
    beta = 0.5
    loss, _ = dpo_loss(pc, pr, rc, rr, beta, eps)
    loss.backward()
    m = beta * ((pc.detach().double() - rc) - (pr.detach().double() - rr))
    want = ((1 - eps) * F.softplus(-m) + eps * F.softplus(m)).mean()
    assert torch.isfinite(loss) and abs(loss.item() - want.item()) < 1e-4 * max(1.0, want.item()), (loss, want)
    # d loss / d pi_chosen = beta * (-(1 - eps) * sigmoid(-m) + eps * sigmoid(m)) / n, and minus that for rejected
    g = beta * (-(1 - eps) * torch.sigmoid(-m) + eps * torch.sigmoid(m)) / len(m)
    torch.testing.assert_close(pc.grad.double(), g, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(pr.grad.double(), -g, rtol=1e-5, atol=1e-9)


def test_equal_policy_and_reference_give_log_2():
    model = tiny_model(1)
    stage = stage_for()
    stage.setup(model)
    loss, metrics = stage.compute_loss(model, hand_built_batch())
    assert abs(loss.item() - math.log(2)) < 1e-6 and metrics["reward_margin"] == 0


def test_only_the_replies_after_the_shared_turns_carry_log_probs(builtin_data):
    """An earlier assistant turn both sides share is prompt, as in TRL (its `prompt`, or the common
    leading messages of chosen and rejected): in the sums it would add the same terms to both sides,
    leaving the margin but not reward_chosen and reward_rejected as TRL defines them. Two identical
    conversations keep their last message as the reply."""
    from minimind_fast.data.records import RecordError, record_docs
    from minimind_fast.data.tokenizer import load_tokenizer

    tok = load_tokenizer(builtin_data["tokenizer"])
    user, earlier, again = ({"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"},
                            {"role": "user", "content": "Say yes"})
    yes, no = {"role": "assistant", "content": "yes"}, {"role": "assistant", "content": "no"}
    records = [{"prompt": [user, earlier, again], "chosen": [yes], "rejected": [no]},
               {"chosen": [user, earlier, again, yes], "rejected": [user, earlier, again, no]}]
    for record in records:
        replies = [[d.text[a:b] for a, b in d.spans] for d in record_docs(record, "dpo", tok)]
        assert replies == [["yes<|im_end|>"], ["no<|im_end|>"]], record
    # replies that differ from their first turn on keep all their turns
    other = {"role": "assistant", "content": "Hey"}
    docs = record_docs({"chosen": [user, earlier, again, yes], "rejected": [user, other, again, no]}, "dpo", tok)
    assert [[d.text[a:b] for a, b in d.spans] for d in docs] == [
        ["Hello there<|im_end|>", "yes<|im_end|>"], ["Hey<|im_end|>", "no<|im_end|>"]]
    same = record_docs({"chosen": [user, earlier, again, yes], "rejected": [user, earlier, again, yes]}, "dpo", tok)
    assert [[d.text[a:b] for a, b in d.spans] for d in same] == [["yes<|im_end|>"]] * 2
    # a given `prompt` is the prompt, all of it and only it (TRL): replies that start alike keep that start
    docs = record_docs({"prompt": [user], "chosen": [earlier, again, yes], "rejected": [earlier, again, no]},
                       "dpo", tok)
    assert [[d.text[a:b] for a, b in d.spans] for d in docs] == [
        ["Hello there<|im_end|>", "yes<|im_end|>"], ["Hello there<|im_end|>", "no<|im_end|>"]]
    with pytest.raises(RecordError, match="'chosen' is empty"):
        record_docs({"prompt": [user, earlier, again], "chosen": [], "rejected": [no]}, "dpo", tok)
    with pytest.raises(RecordError, match="'rejected' has no non-empty assistant message after the prompt's 3"):
        record_docs({"prompt": [user, earlier, again], "chosen": [yes], "rejected": [{**no, "content": ""}]},
                    "dpo", tok)


def test_loader_pair_index_names_each_rows_pair(builtin_data):
    loader = build_loader("dpo", builtin_data["shards"]["dpo"], seq_len=128, micro_batch_size=3, seed=5)
    batch = next(iter(loader))
    for r, pair in enumerate(batch["pair_index"].tolist()):
        alone = loader.pairs_batch(np.array([pair]))
        for side in ("chosen", "rejected"):
            width = alone[f"{side}_input_ids"].shape[1]
            assert torch.equal(batch[f"{side}_input_ids"][r, :width], alone[f"{side}_input_ids"][0])
            assert torch.equal(batch[f"{side}_targets"][r, :width], alone[f"{side}_targets"][0])


# --- launch/dpo.py ------------------------------------------------------------------------
def dpo_args(data: Path, out: Path, init: Path, *extra: str) -> list[str]:
    return common(data, out, STEPS, "--init", str(init), "--eval-every", "8", *extra)


@pytest.fixture(scope="module")
def dpo_run(pretrain_run, builtin_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dpo_runs") / "live"
    run("dpo.py", dpo_args(builtin_data["shards"]["dpo"], out, pretrain_run))
    return out


def test_dpo_raises_the_reward_margin(dpo_run):
    margin, accuracy = metric(dpo_run, "reward_margin"), metric(dpo_run, "reward_accuracy")
    assert sorted(margin) == list(range(1, STEPS + 1))
    assert margin[1] == 0  # the policy starts as the reference
    late = [margin[s] for s in range(STEPS - 3, STEPS + 1)]
    assert sum(late) / 4 > 0.3, margin
    assert sum(accuracy[s] for s in range(STEPS - 3, STEPS + 1)) / 4 > 0.6, accuracy
    for key in ("dpo_loss", "reward_chosen", "reward_rejected"):
        assert len(metric(dpo_run, key)) == STEPS
    val = metric(dpo_run, "val_loss")
    assert sorted(val) == [8, STEPS] and val[STEPS] < math.log(2) - 0.05, val
    assert metric(dpo_run, "val_ppl") == {}  # exp of a pair loss is no perplexity
    assert (dpo_run / "final" / "model.safetensors").exists()


def test_dpo_resume_is_exact(dpo_run, pretrain_run, builtin_data, tmp_path):
    out = tmp_path / "resumed"
    args = dpo_args(builtin_data["shards"]["dpo"], out, pretrain_run)
    run("dpo.py", args + ["--stop-at-step", "6"])
    assert max(metric(out)) == 6
    assert "resumed from" in run("dpo.py", args).stdout
    full, resumed = metric(dpo_run), metric(out)
    assert [resumed[s] for s in range(7, STEPS + 1)] == [full[s] for s in range(7, STEPS + 1)]


def test_precomputed_reference_matches_live_and_is_reused_on_resume(dpo_run, pretrain_run, builtin_data,
                                                                   tmp_path):
    out = tmp_path / "precomputed"
    args = dpo_args(builtin_data["shards"]["dpo"], out, pretrain_run, "--precompute-reference")
    first = run("dpo.py", args + ["--stop-at-step", "6"])
    stored = out / "reference_logps.safetensors"
    assert "scoring" in first.stdout and stored.exists()
    mtime = stored.stat().st_mtime_ns
    second = run("dpo.py", args)
    assert "reused" in second.stdout and "scoring" not in second.stdout and stored.stat().st_mtime_ns == mtime
    live, pre = metric(dpo_run), metric(out)
    assert abs(pre[1] - live[1]) < 1e-6
    assert all(abs(pre[s] - live[s]) < 1e-4 for s in live), (pre, live)
    val_pre, val_live = metric(out, "val_loss"), metric(dpo_run, "val_loss")
    assert val_pre.keys() == val_live.keys() and all(abs(val_pre[s] - val_live[s]) < 1e-4 for s in val_live)
    # Resumed on the stored scores, the run repeats an uninterrupted precomputing run bitwise.
    whole = tmp_path / "uninterrupted"
    run("dpo.py", dpo_args(builtin_data["shards"]["dpo"], whole, pretrain_run, "--precompute-reference"))
    for key in ("loss", "reward_margin", "val_loss"):
        assert metric(out, key) == metric(whole, key), key


def reference_scores_by_hand(init: Path, data: Path) -> dict[str, torch.Tensor]:
    """{split: (pairs, 2)} summed log-probs of each pair's chosen and rejected replies under the model at
    `init`, in process, one pair at a time (what a stored table must hold for these pairs and weights)."""
    from minimind_fast.training.dpo import concat_pairs, sequence_logps

    model = load_model(init).eval()
    tables = {}
    for split in ("train", "val"):
        loader = build_loader("dpo", data, seq_len=64, micro_batch_size=4, split=split)
        table = torch.zeros(loader.n_items, 2)
        for pair in range(loader.n_items):
            ids, targets, positions = concat_pairs(loader.pairs_batch(np.array([pair])))
            with torch.no_grad():
                table[pair] = sequence_logps(model, ids, targets, positions)[0]
        tables[split] = table
    return tables


def split_counts(data: Path) -> dict:
    manifest = json.loads((data / "manifest.json").read_text())
    return {name: (split["tokens"], split["docs"]) for name, split in manifest["splits"].items()}


def test_precomputed_reference_is_scored_again_for_other_pairs_or_weights(pretrain_run, builtin_data, tmp_path):
    """Stored reference scores are reused only for what they measured: pairs tokenized again into the same
    directory with the same token and pair counts (chosen and rejected swapped), or other weights at the
    same --init path, are scored again, and each table holds the scores of its run's pairs and weights."""
    init = tmp_path / "init"
    shutil.copytree(pretrain_run / "final", init)
    source = builtin_data["files"]["dpo"]
    swapped = tmp_path / "swapped.jsonl"
    records = [json.loads(x) for x in Path(source).read_text(encoding="utf-8").splitlines() if x.strip()]
    swapped.write_text("".join(json.dumps({**r, "chosen": r["rejected"], "rejected": r["chosen"]}) + "\n"
                               for r in records), encoding="utf-8")
    data, opts = tmp_path / "dpo", TokenizeOptions(kind="dpo", seq_len=128, workers=1, val_fraction=0.05)
    tokenize_to_shards([source], builtin_data["tokenizer"], data, opts)
    out = tmp_path / "run"
    args = dpo_args(data, out, init, "--precompute-reference")
    stored = out / REFERENCE_FILE

    assert "scoring" in run("dpo.py", args + ["--stop-at-step", "1"]).stdout
    first, counts = load_file(str(stored)), split_counts(data)
    tokenize_to_shards([swapped], builtin_data["tokenizer"], data, opts)
    assert split_counts(data) == counts  # only the pairs' contents tell the two apart
    # A resume over other data is refused (its loader position means nothing there), before any scoring:
    refused = run("dpo.py", args + ["--stop-at-step", "2"], check=False)
    assert refused.returncode == 2 and "changed since the checkpoint" in refused.stderr, refused.stderr[-2000:]
    assert "scoring" not in refused.stdout and "reused" not in refused.stdout, refused.stdout[-2000:]
    # a new run in the same directory finds the stored table
    shutil.rmtree(out / "checkpoints")
    proc = run("dpo.py", args + ["--stop-at-step", "2"])
    assert "scoring" in proc.stdout and "reused" not in proc.stdout, proc.stdout[-2000:]
    second, by_hand = load_file(str(stored)), reference_scores_by_hand(init, data)
    assert second.keys() == first.keys() == by_hand.keys() == {"train", "val"}
    for split in second:
        torch.testing.assert_close(second[split], by_hand[split], rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(second[split], first[split].flip(1), rtol=1e-5, atol=1e-4)

    step4 = sorted((pretrain_run / "checkpoints").glob("step_*"))[0] / "model" / "model.safetensors"
    shutil.copy(step4, init / "model.safetensors")  # other weights, same path
    # a resume against another reference is refused (objective.json), before any scoring
    refused = run("dpo.py", args + ["--stop-at-step", "3"], check=False)
    assert refused.returncode == 2 and "another DPO objective" in refused.stderr, refused.stderr[-2000:]
    assert "scoring" not in refused.stdout
    shutil.rmtree(out / "checkpoints")
    proc = run("dpo.py", args + ["--stop-at-step", "3"])
    assert "scoring" in proc.stdout and "reused" not in proc.stdout, proc.stdout[-2000:]
    third, by_hand = load_file(str(stored)), reference_scores_by_hand(init, data)
    for split in third:
        torch.testing.assert_close(third[split], by_hand[split], rtol=1e-5, atol=1e-4)
        assert not torch.allclose(third[split], second[split], atol=1e-2)


def test_reference_scores_key_on_shard_contents_without_manifest_checksums(builtin_data, tmp_path, capsys):
    """A manifest from before tokenize.py recorded checksums: the shard files are hashed instead (the
    same sha256, so the key is unchanged), with a note, and a shard changed in place changes the key."""
    data = tmp_path / "dpo"
    shutil.copytree(builtin_data["shards"]["dpo"], data)

    def identity() -> list:
        return _data_identity(build_loader("dpo", data, seq_len=64, micro_batch_size=4, split="train"))

    recorded = identity()
    manifest = json.loads((data / "manifest.json").read_text())
    for split in manifest["splits"].values():
        for entry in split["shards"]:
            del entry["checksum"]
    (data / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert identity() == recorded
    assert "no checksum recorded for the train shards" in capsys.readouterr().out
    # Two different tokens swapped: same size, header and counts, which the loader checks; other pairs.
    entry = manifest["splits"]["train"]["shards"][0]
    shard, raw = data / entry["file"], bytearray((data / entry["file"]).read_bytes())
    tokens = np.frombuffer(bytes(raw), dtype=np.uint16, offset=64, count=entry["tokens"])  # after the header
    at = 64 + 2 * int(np.flatnonzero(tokens[:-1] != tokens[1:])[0])
    raw[at:at + 4] = raw[at + 2:at + 4] + raw[at:at + 2]
    shard.write_bytes(bytes(raw))
    assert identity() != recorded


def test_val_loss_is_the_mean_dpo_loss_over_the_held_out_pairs(pretrain_run, builtin_data, tmp_path):
    """The engine weighted each evaluation batch's DPO loss by its chosen replies' tokens, so val_loss
    was not the mean over the held-out pairs. Checked against float64 over every val pair, one by one."""
    shards, out, beta = builtin_data["shards"]["dpo"], tmp_path / "run", 0.5
    run("dpo.py", dpo_args(shards, out, pretrain_run, "--steps", "3", "--micro-batch-size", "1", "--lr", "1e-2",
                           "--beta", str(beta), "--eval-every", "3", "--eval-batches", "100"))
    policy = load_model(out / "checkpoints" / "step_00000003").eval()
    reference = load_model(pretrain_run).eval()
    loader = build_loader("dpo", shards, seq_len=64, micro_batch_size=1, split="val")
    assert loader.n_items > 1
    pair_losses, margins = [], []
    for pair in range(loader.n_items):
        batch = loader.pairs_batch(np.array([pair]))
        margin = beta * sum(sign * (logps_by_hand(policy, batch, side) - logps_by_hand(reference, batch, side))
                            for side, sign in (("chosen", 1), ("rejected", -1)))
        pair_losses.append(math.log1p(math.exp(-margin.item())))
        margins.append(margin.item())
    assert max(pair_losses) - min(pair_losses) > 0.01  # unequal losses: the weighting matters
    assert metric(out, "val_loss")[3] == pytest.approx(sum(pair_losses) / len(pair_losses), abs=1e-5)
    # The held-out implicit rewards, over the same pairs.
    assert metric(out, "val_reward_margin")[3] == pytest.approx(sum(margins) / len(margins), abs=1e-5)
    assert metric(out, "val_reward_accuracy")[3] == pytest.approx(sum(m > 0 for m in margins) / len(margins))


def test_precomputed_reference_scores_take_the_deepspeed_configs_precision(pretrain_run, builtin_data, tmp_path):
    """The reference is scored in the precision the run trains in; a --deepspeed-config file's bf16 section
    wins over --dtype (auto: fp32 on the CPU), as the engine's own precision does."""
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"bf16": {"enabled": True}}))
    out = tmp_path / "run"
    run("dpo.py", dpo_args(builtin_data["shards"]["dpo"], out, pretrain_run, "--precompute-reference",
                           "--deepspeed-config", str(ds), "--stop-at-step", "1"))
    from safetensors import safe_open

    with safe_open(str(out / REFERENCE_FILE), "pt") as f:
        assert json.loads(f.metadata()["meta"])["dtype"] == "torch.bfloat16"
    assert json.loads((out / "config.json").read_text())["deepspeed_config"]["bf16"]["enabled"]


def test_dpo_with_lora_trains_adapters_only(dpo_run, pretrain_run, builtin_data, tmp_path):
    """--lora-rank: the live reference is the untouched --init model; only adapters move, the saved base
    is the --init weights bit for bit, and the held-out pairs' loss falls below log 2 (the policy comes to
    prefer their chosen replies; the training batches' margins, 4 pairs each, are too noisy to show it).
    With precomputed reference scores (taken after the adapters exist, at B = 0) the first loss is the
    live one's."""
    out = tmp_path / "lora"
    run("dpo.py", dpo_args(builtin_data["shards"]["dpo"], out, pretrain_run, "--lora-rank", "8",
                           "--lora-alpha", "32", "--lr", "1e-2"))
    assert metric(out, "reward_margin")[1] == 0
    val = metric(out, "val_loss")
    assert val[STEPS] < val[8] < math.log(2) and val[STEPS] < math.log(2) - 0.02, val
    base = load_file(str(pretrain_run / "final" / "model.safetensors"))
    saved = load_file(str(out / "final" / "model.safetensors"))
    assert saved.keys() == base.keys() and all(torch.equal(saved[k], base[k]) for k in base)
    adapter = load_file(str(out / "final" / "adapter" / "adapter.safetensors"))
    assert adapter and any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)
    pre = tmp_path / "lora_pre"
    run("dpo.py", dpo_args(builtin_data["shards"]["dpo"], pre, pretrain_run, "--lora-rank", "8",
                           "--lora-alpha", "32", "--lr", "1e-2", "--precompute-reference", "--steps", "2"))
    assert abs(metric(pre)[1] - metric(out)[1]) < 1e-6 and metric(pre)[1] == pytest.approx(math.log(2))


@pytest.mark.slow
def test_dpo_two_ranks_zero2_precomputed_matches_single_process(dpo_run, pretrain_run, builtin_data, tmp_path):
    out = tmp_path / "two_ranks"
    args = dpo_args(builtin_data["shards"]["dpo"], out, pretrain_run, "--precompute-reference", "--zero-stage", "2")
    args[args.index("--micro-batch-size") + 1] = "2"  # 2 ranks x 2 pairs = the single process's 4
    launcher = two_ranks(29651)
    run("dpo.py", args, launcher=launcher, timeout=300)
    live, multi = metric(dpo_run), metric(out)
    assert all(abs(multi[s] - live[s]) < 2e-4 for s in live), (multi, live)


@pytest.mark.parametrize("bad, message", [
    ("kind", "the dpo stage needs dpo shards"),
    ("beta", "--beta 0.0: must be positive"),
    ("smoothing", "--label-smoothing 0.5: must be in [0, 0.5)"),
    ("reference", "nowhere: no such file or directory"),
])
def test_dpo_bad_inputs_give_clear_errors(bad, message, pretrain_run, builtin_data, tmp_path):
    data, extra = builtin_data["shards"]["dpo"], []
    if bad == "kind":
        data = builtin_data["shards"]["sft"]
    elif bad == "beta":
        extra = ["--beta", "0"]
    elif bad == "smoothing":
        extra = ["--label-smoothing", "0.5"]
    elif bad == "reference":
        extra = ["--reference", str(tmp_path / "nowhere")]
    proc = run("dpo.py", dpo_args(data, tmp_path / "run", pretrain_run, *extra), check=False)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_sequence_logps_match_a_plain_log_softmax():
    from minimind_fast.training.dpo import concat_pairs, sequence_logps

    model = tiny_model(2).eval()
    batch = hand_built_batch()
    ids, targets, positions = concat_pairs(batch)
    assert ids.shape == (4, 9) and (targets[2:, 7:] == -100).all()
    with torch.no_grad():
        got, _ = sequence_logps(model, ids, targets, positions)
        logp = F.log_softmax(model(ids, position_ids=positions).logits.float(), -1)
    safe = targets.clamp(min=0)
    want = (logp.gather(-1, safe[..., None])[..., 0] * (targets != -100)).sum(-1)
    torch.testing.assert_close(got, want)


def test_reference_with_a_shorter_context_or_another_tokenizer_is_refused(builtin_data, tmp_path):
    """Checked at set-up: a reference with a shorter context than --seq-len was an IndexError traceback
    at the first step, and one with another tokenizer of the same size scored other texts silently."""
    other = train_tokenizer([builtin_data["files"]["sft"]], 1024, tmp_path / "other_tokenizer")
    short = save_model_dir(MiniMindForCausalLM(tiny_config().replace(max_position_embeddings=32)),
                           tmp_path / "short", tokenizer_dir=builtin_data["tokenizer"])
    foreign = save_model_dir(MiniMindForCausalLM(tiny_config()), tmp_path / "foreign", tokenizer_dir=other)
    for reference, message in ((short, "--reference .*short: its context length 32 .* below --seq-len 64"),
                               (foreign, "tokenizer mismatch")):
        for precompute in ((), ("--precompute-reference",)):
            stage = stage_for("--reference", str(reference), "--seq-len", "64", *precompute)
            stage.manifest = stage.open_data(builtin_data["shards"]["dpo"])
            with pytest.raises(ValueError, match=message):
                stage.setup(MiniMindForCausalLM(tiny_config()))
                stage._load_reference(MiniMindForCausalLM(tiny_config()))  # where precomputing loads it


def test_resume_refuses_another_reference_or_beta(builtin_data, tmp_path):
    """A checkpoint records the reference's weight fingerprint, beta and label smoothing; a resume with
    another --reference (same vocabulary and tokenizer), --beta or --label-smoothing would continue
    another objective from its state, so it is refused (with or without precomputed scores)."""
    refs = [save_model_dir(MiniMindForCausalLM(tiny_config().replace(kernels="reference")), tmp_path / f"ref{i}",
                           tokenizer_dir=builtin_data["tokenizer"]) for i in range(2)]
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()

    def set_up(*flags: str, resume: Path | None = None) -> DPOStage:
        stage = stage_for("--seq-len", "64", *flags)
        stage.check_arguments()
        stage.manifest = stage.open_data(builtin_data["shards"]["dpo"])
        stage.resume_from = resume
        torch.manual_seed(0)
        stage.setup(MiniMindForCausalLM(tiny_config().replace(kernels="reference")))
        return stage

    set_up("--reference", str(refs[0])).save_extra(None, ckpt)
    for precompute in ((), ("--precompute-reference",)):
        set_up("--reference", str(refs[0]), *precompute, resume=ckpt)  # the same objective resumes
        for flags, what in [(("--reference", str(refs[1])), "the reference's weights"),
                            (("--reference", str(refs[0]), "--beta", "0.5"), "--beta"),
                            (("--reference", str(refs[0]), "--label-smoothing", "0.1"), "--label-smoothing")]:
            with pytest.raises(ValueError, match=f"trained with another DPO objective \\({what}"):
                set_up(*flags, *precompute, resume=ckpt)


@pytest.mark.parametrize("flags, message", [
    (["--lora-alpha", "32"], "--lora-alpha set LoRA adapters, which need --lora-rank"),
    (["--lora-targets", "q_proj", "--lora-dropout", "0.1"],
     "--lora-dropout and --lora-targets set LoRA adapters, which need --lora-rank"),
    (["--beta", "nan"], "--beta nan: must be positive"),
    (["--lora-rank", "4", "--lora-alpha", "nan"], "--lora-alpha nan: must be positive and finite"),
    (["--lora-rank", "0"], "--lora-rank 0: must be positive"),
])
def test_flags_that_would_be_ignored_or_poison_the_loss_are_refused_before_loading(flags, message):
    """The LoRA flags without --lora-rank were silently ignored (a full fine-tune ran); a NaN beta or
    alpha passed the checks and turned every loss into NaN."""
    with pytest.raises(ValueError, match=message):
        stage_for(*flags)
    assert stage_for("--lora-rank", "4").args.lora_alpha == 16.0  # the default, filled in with a rank
