"""Memory-mapped loaders: batch contents against the shards, masks, resume, rank disjointness, checks."""

from __future__ import annotations

import itertools
import json
import shutil
from collections import Counter

import numpy as np
import pytest
import torch

from minimind_fast.data.loaders import build_loader
from minimind_fast.data.prompts import PromptLoader
from minimind_fast.data.shards import Shard, ShardError, file_checksum


def _stream(shard_dir, split="train"):
    manifest = json.loads((shard_dir / "manifest.json").read_text())
    return [Shard(shard_dir / e["file"]) for e in manifest["splits"][split]["shards"]]


def _check_segments(batch, seq_len):
    """cu_seqlens, position_ids and max_seqlen describe the same segments."""
    cu = batch["cu_seqlens"].tolist()
    pos = batch["position_ids"].flatten()
    bsz = batch["input_ids"].shape[0]
    assert cu[0] == 0 and cu[-1] == bsz * seq_len and all(b > a for a, b in zip(cu, cu[1:]))
    assert set(range(0, bsz * seq_len, seq_len)) <= set(cu)  # no segment crosses a row
    for a, b in zip(cu, cu[1:]):
        assert pos[a:b].tolist() == list(range(b - a))
    assert batch["max_seqlen"] == max(b - a for a, b in zip(cu, cu[1:]))
    assert batch["cu_seqlens"].dtype == torch.int32


def test_pretrain_windows_and_targets(builtin_data):
    seq = 64
    loader = build_loader("pretrain", builtin_data["shards"]["pretrain"], seq_len=seq, micro_batch_size=4, seed=3)
    [shard] = _stream(builtin_data["shards"]["pretrain"])
    tokens = np.asarray(shard.tokens, dtype=np.int64)
    starts = set(np.asarray(shard.offsets[:-1]).tolist())
    windows = {tuple(tokens[s:s + seq].tolist()): s for s in range(0, len(tokens) - seq, seq)}
    seen = set()
    for batch in itertools.islice(loader, 5):
        assert batch["input_ids"].shape == batch["targets"].shape == (4, seq)
        assert batch["input_ids"].dtype == batch["targets"].dtype == batch["position_ids"].dtype == torch.int64
        _check_segments(batch, seq)
        cu = set(batch["cu_seqlens"].tolist())
        for r, (row, tgt) in enumerate(zip(batch["input_ids"].numpy(), batch["targets"].numpy())):
            w = windows[tuple(row.tolist())]  # every row is one of the shard's windows
            seen.add(w)
            nxt = tokens[w + 1:w + seq + 1]
            for t in range(seq):
                # the next token, unless it opens a new document; a document start opens a segment
                assert tgt[t] == (-100 if (w + t + 1) in starts else nxt[t])
                assert ((w + t) in starts and t > 0) == (t > 0 and r * seq + t in cu)
    assert len(seen) == 20  # distinct windows


def test_pretrain_segments_follow_documents(builtin_data):
    seq = 64
    loader = build_loader("pretrain", builtin_data["shards"]["pretrain"], seq_len=seq, micro_batch_size=2)
    batch = next(iter(loader))
    ids = batch["input_ids"].flatten()
    for a in batch["cu_seqlens"].tolist()[:-1]:
        if a % seq:  # a segment starting inside a row starts a document: <|im_start|>
            assert ids[a] == 1 and ids[a - 1] == 2


def test_sft_targets_are_next_assistant_tokens(builtin_data):
    shard_dir = builtin_data["shards"]["sft"]
    [shard] = _stream(shard_dir)
    docs = {tuple(np.asarray(shard.doc(i)[0]).tolist()): np.asarray(shard.doc(i)[1]) for i in range(shard.n_docs)}
    loader = build_loader("sft", shard_dir, seq_len=128, micro_batch_size=4)
    batch = next(iter(loader))
    assert set(batch) == {"input_ids", "targets", "position_ids", "cu_seqlens", "max_seqlen"}
    _check_segments(batch, 128)
    ids, tgt = batch["input_ids"].flatten().numpy(), batch["targets"].flatten().numpy()
    n_docs = 0
    cu = batch["cu_seqlens"].tolist()
    for a, b in zip(cu, cu[1:]):
        key = tuple(ids[a:b].tolist())
        if key not in docs:  # the padding tail of a row
            assert (ids[a:b] == 0).all() and (tgt[a:b] == -100).all()
            continue
        n_docs += 1
        mask = docs[key]
        expected = np.where(mask[1:] > 0, ids[a + 1:b], -100)
        np.testing.assert_array_equal(tgt[a:b - 1], expected)
        assert tgt[b - 1] == -100  # nothing to predict after a sample's last token
    assert n_docs > 4  # packed: several samples per row


def test_sft_unpacked_pads(builtin_data):
    loader = build_loader("sft", builtin_data["shards"]["sft"], seq_len=128, micro_batch_size=4, packing=False)
    batch = next(iter(loader))
    assert len(batch["cu_seqlens"]) <= 4 * 2 + 1
    for row, tgt in zip(batch["input_ids"], batch["targets"]):
        n = int((row != 0).sum())
        assert (row[n:] == 0).all() and (tgt[n - 1:] == -100).all() and (tgt[:n] != -100).any()
    assert loader.num_batches_per_epoch == loader.n_items // 4


def test_reasoning_loss_weight(builtin_data):
    from minimind_fast.data.tokenizer import load_tokenizer

    tok = load_tokenizer(builtin_data["tokenizer"])
    loader = build_loader("reasoning", builtin_data["shards"]["reasoning"], seq_len=128, micro_batch_size=2,
                          special_token_weight=7.0)
    batch = next(iter(loader))
    w, tgt = batch["loss_weight"], batch["targets"]
    assert w.dtype == torch.float32 and set(w.unique().tolist()) == {1.0, 7.0}
    heavy = tgt[w == 7.0].tolist()
    assert -100 not in heavy
    text = "".join(tok.decode([t]) for t in heavy)
    for tag in ("<think>", "</think>", "<answer>", "</answer>"):
        assert tag in text
    assert "".join(sorted(text)) == "".join(sorted("<think></think><answer></answer>" * text.count("<think>")))


def test_dpo_pairs(builtin_data):
    shard_dir = builtin_data["shards"]["dpo"]
    [shard] = _stream(shard_dir)
    loader = build_loader("dpo", shard_dir, seq_len=128, micro_batch_size=3)
    batch = next(iter(loader))
    assert loader.tokens_per_batch == 2 * 3 * 128
    for r, pair in enumerate(batch["pair_index"].tolist()):
        chosen = batch["chosen_input_ids"][r]
        chosen = chosen[: int(torch.nonzero(chosen).max()) + 1].tolist()
        assert chosen == np.asarray(shard.doc(2 * pair)[0]).tolist()
        assert batch["chosen_lengths"][r] == len(chosen)
        # the row's rejected side is the same record's (the corpus repeats some chosen replies)
        rej_ids, rej_mask = (np.asarray(a) for a in shard.doc(2 * pair + 1))
        rej_ids = rej_ids.astype(np.int64)
        n = len(rej_ids)
        assert batch["rejected_input_ids"][r, :n].tolist() == rej_ids.tolist()
        assert batch["rejected_lengths"][r] == n
        assert (batch["rejected_input_ids"][r, n:] == 0).all()
        expected = np.where(rej_mask[1:] > 0, rej_ids[1:], -100)
        assert batch["rejected_targets"][r, : n - 1].tolist() == expected.tolist()
        assert (batch["rejected_targets"][r, n - 1:] == -100).all()
        assert batch["chosen_position_ids"][r].tolist() == list(range(batch["chosen_input_ids"].shape[1]))


@pytest.mark.parametrize("kind", ["pretrain", "sft", "dpo"])
def test_resume_sees_exactly_the_remaining_batches(builtin_data, kind):
    make = lambda: build_loader(kind, builtin_data["shards"][kind], seq_len=32 if kind == "pretrain" else 128,  # noqa: E731
                                micro_batch_size=4, seed=11)
    loader = make()
    n_epoch = loader.num_batches_per_epoch
    steps = n_epoch + 3  # cross an epoch boundary
    it = iter(loader)
    head = [next(it) for _ in range(steps)]
    state = json.loads(json.dumps(loader.state_dict()))
    tail = [next(it) for _ in range(4)]
    assert state["epoch"] == 1
    resumed = make()
    resumed.load_state_dict(state)
    again = list(itertools.islice(resumed, 4))
    for a, b in zip(tail, again):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k]
    # epoch 1 is a different order than epoch 0, and the same seed gives the same epoch 0
    first = next(iter(make()))
    key = "input_ids" if kind != "dpo" else "chosen_input_ids"
    assert torch.equal(first[key], head[0][key])
    assert not torch.equal(head[n_epoch][key], head[0][key])


@pytest.mark.parametrize("kind", ["pretrain", "sft"])
def test_resume_refuses_data_tokenized_again_with_the_same_counts(builtin_data, tmp_path, kind):
    """A loader position means nothing in other data of the same size (a rerun of tokenize.py on edited
    inputs): resume is refused by the manifest's checksums, not carried on silently."""
    d = tmp_path / "s"
    shutil.copytree(builtin_data["shards"][kind], d)
    make = lambda: build_loader(kind, d, seq_len=32 if kind == "pretrain" else 128, micro_batch_size=4, seed=11)  # noqa: E731
    loader = make()
    next(iter(loader))
    state = json.loads(json.dumps(loader.state_dict()))
    make().load_state_dict(state)  # the same data resumes
    data = _corrupt_token(d / "train-00000.bin", 5)  # another in-vocabulary token: counts and sizes unchanged
    assert int.from_bytes(data[64 + 20:64 + 22], "little") == 5
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0]["checksum"] = file_checksum(d / "train-00000.bin")  # as tokenize writes
    (d / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="samples changed since the checkpoint was written"):
        make().load_state_dict(state)
    # a checkpoint from before the fingerprint existed, or a manifest without checksums: nothing to compare
    make().load_state_dict({k: v for k, v in state.items() if k != "data"})
    for entry in manifest["splits"]["train"]["shards"]:
        del entry["checksum"]
    (d / "manifest.json").write_text(json.dumps(manifest))
    make().load_state_dict(state)


def test_prompt_loader_resume_refuses_other_prompts():
    make = lambda prompts: PromptLoader(prompts, [{"answer": str(i)} for i in range(4)], micro_batch_size=2)  # noqa: E731
    loader = make([[1, 2], [3], [4, 5], [6]])
    next(iter(loader))
    state = loader.state_dict()
    make([[1, 2], [3], [4, 5], [6]]).load_state_dict(state)
    with pytest.raises(ValueError, match="prompts changed since the checkpoint was written"):
        make([[1, 2], [3], [4, 5], [7]]).load_state_dict(state)


def test_num_batches_per_epoch_is_exact(builtin_data):
    loader = build_loader("sft", builtin_data["shards"]["sft"], seq_len=128, micro_batch_size=3)
    n = loader.num_batches_per_epoch
    epochs = [e for _, e, _ in itertools.islice(loader._batches(), n + 1)]
    assert epochs == [0] * n + [1]


@pytest.mark.parametrize("kind", ["pretrain", "sft"])
def test_ranks_read_disjoint_parts(builtin_data, kind):
    """Over one epoch, the ranks together read no sample more often than the shards hold it."""
    world, seq = 3, 32 if kind == "pretrain" else 128
    [shard] = _stream(builtin_data["shards"][kind])
    tokens = np.asarray(shard.tokens).tolist()
    if kind == "pretrain":
        available = Counter(tuple(tokens[s:s + seq]) for s in range(0, len(tokens) - seq, seq))
    else:
        available = Counter(tuple(np.asarray(shard.doc(i)[0]).tolist()) for i in range(shard.n_docs))
    read, per_rank = Counter(), []
    for rank in range(world):
        loader = build_loader(kind, builtin_data["shards"][kind], seq_len=seq, micro_batch_size=2, seed=5,
                              rank=rank, world_size=world)
        n = 0
        for batch, epoch, _ in loader._batches():
            if epoch:
                break
            ids = batch["input_ids"].flatten().tolist()
            if kind == "pretrain":
                samples = [tuple(row) for row in batch["input_ids"].tolist()]
            else:
                cu = batch["cu_seqlens"].tolist()
                samples = [tuple(ids[a:b]) for a, b in zip(cu, cu[1:]) if ids[a] != 0]  # not the padding
            read.update(samples)
            n += len(samples)
        per_rank.append(n)
    assert not read - available  # nothing read twice across ranks, nothing invented
    assert min(per_rank) >= sum(available.values()) // world - 2 * 3  # each rank read about its third
    assert sum(per_rank) > 0.9 * sum(available.values())


def test_val_split_and_errors(builtin_data, tmp_path):
    val = build_loader("sft", builtin_data["shards"]["sft"], seq_len=128, micro_batch_size=64, split="val")
    batch = next(iter(val))  # evaluation keeps the short last batch
    assert batch["input_ids"].shape[0] >= 1 and val.num_batches_per_epoch == 1
    with pytest.raises(ShardError, match="cannot fill one batch"):
        build_loader("sft", builtin_data["shards"]["sft"], seq_len=128, micro_batch_size=10**6)
    with pytest.raises(ShardError, match="kind 'sft'"):
        build_loader("pretrain", builtin_data["shards"]["sft"], seq_len=32, micro_batch_size=2)
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        build_loader("sft", tmp_path, seq_len=32, micro_batch_size=2)
    # no val split
    d = tmp_path / "noval"
    shutil.copytree(builtin_data["shards"]["sft"], d)
    m = json.loads((d / "manifest.json").read_text())
    m["splits"]["val"]["shards"] = []
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ShardError, match="its 'val' split is empty .no documents were held out"):
        build_loader("sft", d, seq_len=128, micro_batch_size=2, split="val")
    del m["splits"]["val"]
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ShardError, match="no 'val' split in manifest.json"):
        build_loader("sft", d, seq_len=128, micro_batch_size=2, split="val")
    loader = build_loader("sft", d, seq_len=128, micro_batch_size=2)
    with pytest.raises(ValueError, match="seed"):
        build_loader("sft", d, seq_len=128, micro_batch_size=2, seed=1).load_state_dict(loader.state_dict())


@pytest.mark.parametrize("damage", ["cut", "no_kind", "not_object"])
def test_a_damaged_manifest_is_named_by_loaders_and_stages(builtin_data, tmp_path, damage):
    import argparse

    from minimind_fast.training.stages import SFTStage

    d = tmp_path / "s"
    shutil.copytree(builtin_data["shards"]["sft"], d)
    text = (d / "manifest.json").read_text()
    m = json.loads(text)
    del m["kind"]
    (d / "manifest.json").write_text({"cut": text[:100], "no_kind": json.dumps(m), "not_object": "[]"}[damage])
    message = rf"{d / 'manifest.json'}: (unreadable|not a shard) manifest"
    with pytest.raises(ShardError, match=message):
        build_loader("sft", d, seq_len=128, micro_batch_size=2)
    with pytest.raises(ShardError, match=message):
        SFTStage(argparse.Namespace()).open_data(d)


def _corrupt_token(shard, token: int) -> bytearray:
    """Write `token` over the shard's 11th token (in its first document, within any seq_len here)."""
    data = bytearray(shard.read_bytes())
    data[64 + 20:64 + 22] = token.to_bytes(2, "little")
    shard.write_bytes(bytes(data))
    return data


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_a_token_out_of_the_vocabulary_is_named_by_the_batch_that_reads_it(builtin_data, tmp_path, kind):
    d = tmp_path / "s"
    shutil.copytree(builtin_data["shards"][kind], d)
    vocab = json.loads((d / "manifest.json").read_text())["vocab_size"]
    _corrupt_token(d / "train-00000.bin", vocab + 7)
    loader = build_loader(kind, d, seq_len=128, micro_batch_size=2, vocab_size=vocab)
    with pytest.raises(ShardError, match=rf"train-00000\.bin: token id {vocab + 7} is out of range"):
        list(itertools.islice(loader, loader.num_batches_per_epoch))


def test_vocab_check_reads_the_manifest_not_the_tokens(builtin_data, tmp_path, monkeypatch, capsys):
    d = tmp_path / "s"
    shutil.copytree(builtin_data["shards"]["sft"], d)
    manifest = json.loads((d / "manifest.json").read_text())
    vocab = manifest["vocab_size"]
    train = manifest["splits"]["train"]["shards"]
    for e in (e for split in manifest["splits"].values() for e in split["shards"]):
        assert e["max_token_id"] == int(np.asarray(Shard(d / e["file"]).tokens).max())  # what the writer noted
    full_reads, check_vocab = [], Shard.check_vocab

    def counted(self, vocab_size, ids=None):
        if ids is None:  # the whole shard
            full_reads.append(self.path.name)
        return check_vocab(self, vocab_size, ids)

    monkeypatch.setattr(Shard, "check_vocab", counted)
    build_loader("sft", d, seq_len=128, micro_batch_size=2, vocab_size=vocab)
    assert full_reads == []
    # the manifest's id is what start-up compares
    train[0]["max_token_id"] = vocab + 3
    (d / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match=rf"train-00000\.bin: token id {vocab + 3} is out of range for vocab_size "
                                         rf"{vocab}"):
        build_loader("sft", d, seq_len=128, micro_batch_size=2, vocab_size=vocab)
    train[0]["max_token_id"] = "12"
    (d / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match=r"manifest\.json: max_token_id of train-00000\.bin is '12', not an integer"):
        build_loader("sft", d, seq_len=128, micro_batch_size=2, vocab_size=vocab)
    # a manifest from before the field: every shard is read, and stderr says how to avoid it
    for e in train:
        del e["max_token_id"]
    (d / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    build_loader("sft", d, seq_len=128, micro_batch_size=2, vocab_size=vocab)
    assert full_reads == [e["file"] for e in train]
    assert f"reading its {len(train)} 'train' shard(s)" in (err := capsys.readouterr().err)
    assert "run launch/tokenize.py again on the same inputs" in err
    _corrupt_token(d / "train-00000.bin", vocab + 5)
    with pytest.raises(ShardError, match=rf"train-00000\.bin: token id {vocab + 5} is out of range"):
        build_loader("sft", d, seq_len=128, micro_batch_size=2, vocab_size=vocab)


def test_vocab_and_corruption_checks_name_the_shard(builtin_data, tmp_path):
    d = tmp_path / "s"
    shutil.copytree(builtin_data["shards"]["pretrain"], d)
    vocab = json.loads((d / "manifest.json").read_text())["vocab_size"]
    build_loader("pretrain", d, seq_len=32, micro_batch_size=2, vocab_size=vocab)
    with pytest.raises(ShardError, match=f"vocabulary of {vocab}"):
        build_loader("pretrain", d, seq_len=32, micro_batch_size=2, vocab_size=vocab - 1)
    # a token out of range inside the shard itself: start-up trusts the manifest's max_token_id, and
    # the batch that reads the token names it
    shard = d / "train-00000.bin"
    data = _corrupt_token(shard, vocab + 5)
    loader = build_loader("pretrain", d, seq_len=32, micro_batch_size=2, vocab_size=vocab)
    with pytest.raises(ShardError, match=rf"train-00000\.bin: token id {vocab + 5} is out of range for "
                                         rf"vocab_size {vocab}"):
        list(itertools.islice(loader, loader.num_batches_per_epoch))
    shard.write_bytes(bytes(data[:-5]))
    with pytest.raises(ShardError, match=r"train-00000\.bin.*truncated"):
        build_loader("pretrain", d, seq_len=32, micro_batch_size=2)
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=r"train-00000\.bin"):
        build_loader("pretrain", d, seq_len=32, micro_batch_size=2)


def test_shards_that_disagree_with_the_manifest_are_named(builtin_data, tmp_path):
    d = tmp_path / "s"
    shutil.copytree(builtin_data["shards"]["sft"], d)
    manifest = json.loads((d / "manifest.json").read_text())
    train, val = d / "train-00000.bin", d / "val-00000.bin"
    good = train.read_bytes()
    # a shard of another tokenization: valid on its own, same size, another vocabulary in its header
    data = bytearray(good)
    data[40:48] = (manifest["vocab_size"] - 24).to_bytes(8, "little")
    train.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=rf"train-00000\.bin: vocab_size is {manifest['vocab_size'] - 24}, "
                                         rf"manifest.json lists {manifest['vocab_size']}"):
        build_loader("sft", d, seq_len=128, micro_batch_size=2, vocab_size=manifest["vocab_size"])
    # another run's shard copied over this one (a self-consistent file of another size)
    train.write_bytes(val.read_bytes())
    with pytest.raises(ShardError, match=rf"train-00000\.bin: bytes is {val.stat().st_size}, manifest.json lists "
                                         rf"{len(good)}"):
        build_loader("sft", d, seq_len=128, micro_batch_size=2)
    train.write_bytes(good)
    entry = manifest["splits"]["train"]["shards"][0]
    for field in ("tokens", "docs"):
        m = json.loads(json.dumps(manifest))
        m["splits"]["train"]["shards"][0][field] += 1
        (d / "manifest.json").write_text(json.dumps(m))
        with pytest.raises(ShardError, match=rf"train-00000\.bin: {field} is {entry[field]}, "
                                             rf"manifest.json lists {entry[field] + 1}"):
            build_loader("sft", d, seq_len=128, micro_batch_size=2)


def test_prefetch_thread_gives_the_same_batches(builtin_data):
    plain = build_loader("sft", builtin_data["shards"]["sft"], seq_len=128, micro_batch_size=2, seed=2)
    ahead = build_loader("sft", builtin_data["shards"]["sft"], seq_len=128, micro_batch_size=2, seed=2, prefetch=3)
    for a, b in zip(itertools.islice(plain, 6), itertools.islice(ahead, 6)):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["targets"], b["targets"])
    assert ahead.state_dict() == plain.state_dict()


def test_loader_does_not_copy_the_corpus(builtin_data):
    loader = build_loader("pretrain", builtin_data["shards"]["pretrain"], seq_len=32, micro_batch_size=2)
    assert all(isinstance(s.tokens, np.memmap) for s in loader.shards)
    assert loader.cum.nbytes < 64  # the index is a few numbers per shard, not per window
