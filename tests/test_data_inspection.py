"""launch/inspect_shards.py: split figures against the shard files, documents decoded with exactly the
loss-carrying tokens marked, DPO pairs, and its errors."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest

from minimind_fast.data.inspection import SplitView, marked_text, shard_tokenizer, show_doc, split_figures, summary
from minimind_fast.data.pipeline import TokenizeOptions, tokenize_to_shards
from minimind_fast.data.records import check_conversation, conversation_doc
from minimind_fast.data.shards import Shard
from minimind_fast.data.tokenizer import load_tokenizer, train_tokenizer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok(builtin_data):
    return load_tokenizer(builtin_data["tokenizer"])


def test_marks_surround_exactly_the_runs_that_carry_loss(tok):
    pieces = [("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", 0), ("<think>", 2), ("\nsome thought\n", 1),
              ("</think>", 2), ("the cat is grey<|im_end|>", 1), ("\n", 0)]
    ids = [tok.encode(text) for text, _ in pieces]
    tokens = np.array([i for part in ids for i in part])
    mask = np.array([value for part, (_, value) in zip(ids, pieces) for _ in part], dtype=np.uint8)
    expected = "".join({0: t, 1: f"⟦{t}⟧", 2: f"⟪{t}⟫"}[v] for t, v in pieces)
    assert marked_text(tokens, mask, tok) == expected
    assert marked_text(tokens, None, tok) == "".join(t for t, _ in pieces)


def test_split_figures_are_the_shards_own(builtin_data, tmp_path):
    """Several shards per split (a small --max-shard-tokens): documents are numbered across them in order,
    and the figures are those of the files."""
    out = tmp_path / "sft"
    tokenize_to_shards([builtin_data["files"]["sft"]], builtin_data["tokenizer"], out,
                       TokenizeOptions(kind="sft", seq_len=128, workers=1, val_fraction=0.05, max_shard_tokens=2000))
    manifest = json.loads((out / "manifest.json").read_text())
    files = [out / e["file"] for e in manifest["splits"]["train"]["shards"]]
    assert len(files) > 2
    shards = [Shard(f) for f in files]
    docs = [s.doc(i) for s in shards for i in range(s.n_docs)]
    lengths = np.array([len(t) for t, _ in docs])
    view = SplitView(out, "train")
    assert view.n_docs == len(docs)
    for index in (0, len(docs) // 2, len(docs) - 1):
        tokens, mask, _, _ = view.doc(index)
        assert np.array_equal(tokens, docs[index][0]) and np.array_equal(mask, docs[index][1])
    trained = sum(int((m > 0).sum()) for _, m in docs)
    p50, p90, p99 = np.percentile(lengths, (50, 90, 99)).round().astype(int)
    assert split_figures(view) == (
        f"train: {len(docs):,} documents, {lengths.sum():,} tokens in {len(files)} shard(s); length p50 {p50:,}, "
        f"p90 {p90:,}, p99 {p99:,}, max {lengths.max():,}; {trained:,} tokens carry loss "
        f"({trained / lengths.sum():.1%})")
    with pytest.raises(IndexError, match=f"document {len(docs)} is not in the train split"):
        view.doc(len(docs))


def test_an_sft_document_shows_the_replies_of_its_record_marked(builtin_data, tok):
    shard_dir = builtin_data["shards"]["sft"]
    record = json.loads(Path(builtin_data["files"]["sft"]).read_text().splitlines()[0])
    shown = show_doc(SplitView(shard_dir, "train"), 0, shard_tokenizer(shard_dir, None))
    head, text = shown.split("\n", 1)
    assert head.startswith("--- document 0 of train (train-00000.bin #0): ")
    replies = [m["content"] for m in record["conversations"] if m["role"] == "assistant"]
    assert [part.split("⟧")[0] for part in text.split("⟦")[1:]] == [r + "<|im_end|>" for r in replies]
    rendered = conversation_doc(check_conversation(record["conversations"], "conversations"), tok, tags=False).text
    assert text.replace("⟦", "").replace("⟧", "") == rendered  # the whole text the record was tokenized as


def test_a_dpo_pair_shows_its_chosen_then_its_rejected_reply(builtin_data):
    shard_dir = builtin_data["shards"]["dpo"]
    record = json.loads(Path(builtin_data["files"]["dpo"]).read_text().splitlines()[0])
    shown = show_doc(SplitView(shard_dir, "train"), 0, shard_tokenizer(shard_dir, None))
    chosen, rejected = shown.split("\nrejected:\n")
    assert chosen.startswith("--- pair 0 of train\nchosen:\n")
    for side, text in (("chosen", chosen), ("rejected", rejected)):
        reply = record[side][-1]["content"] if isinstance(record[side], list) else record[side]
        assert f"⟦{reply}<|im_end|>⟧" in text, side
    assert "pairs)" in summary(shard_dir)


def _launch(monkeypatch, *args) -> None:
    monkeypatch.setattr(sys, "argv", ["inspect_shards.py", *map(str, args)])
    runpy.run_path(str(REPO / "launch" / "inspect_shards.py"), run_name="__main__")


def test_cli_shows_figures_and_documents_and_names_its_errors(builtin_data, monkeypatch, capsys, tmp_path):
    shard_dir = builtin_data["shards"]["reasoning"]
    _launch(monkeypatch, "--data", shard_dir, "--index", 1, 2, "--split", "val")
    out = capsys.readouterr().out
    assert out.startswith(f"{shard_dir}: reasoning shards") and "--- document 1 of val" in out
    assert "--- document 2 of val" in out and "⟪<think>⟫" in out
    _launch(monkeypatch, "--data", shard_dir, "--show", 0)
    assert "--- document" not in capsys.readouterr().out
    with pytest.raises(SystemExit, match="error: document 10000 is not in the train split"):
        _launch(monkeypatch, "--data", shard_dir, "--index", 10000)
    other = train_tokenizer([builtin_data["files"]["sft"]], 300, tmp_path / "other")
    with pytest.raises(SystemExit, match=f"error: --tokenizer {other} is not the tokenizer of {shard_dir}"):
        _launch(monkeypatch, "--data", shard_dir, "--tokenizer", other)
    with pytest.raises(SystemExit, match=f"error: {tmp_path}: no manifest.json"):
        _launch(monkeypatch, "--data", tmp_path)
    for flag in ("--random", "--show"):  # --random -1 was numpy's "negative dimensions", --show -1 quietly 0
        with pytest.raises(SystemExit, match=f"error: {flag} -1: must be >= 0"):
            _launch(monkeypatch, "--data", shard_dir, flag, -1)
    with pytest.raises(SystemExit, match="error: --seed -1: must be >= 0"):  # was numpy's "expected non-negative
        _launch(monkeypatch, "--data", shard_dir, "--random", 2, "--seed", -1)  # integer", naming no flag


def test_a_directory_without_held_out_records_is_summed_up(builtin_data, monkeypatch, capsys, tmp_path):
    """--val-fraction 0 (or an input too small to hold one out) writes an empty val split: the figures
    say so, and the train split is shown as for any directory."""
    out = tmp_path / "sft"
    tokenize_to_shards([builtin_data["files"]["sft"]], builtin_data["tokenizer"], out,
                       TokenizeOptions(kind="sft", seq_len=128, workers=1, val_fraction=0))
    _launch(monkeypatch, "--data", out)
    shown = capsys.readouterr().out
    assert f"  {split_figures(SplitView(out, 'train'))}\n  val: no documents\n" in shown
    assert "--- document 0 of train" in shown


def test_an_empty_val_split_asked_for_is_said_to_be_empty(builtin_data, monkeypatch, capsys, tmp_path):
    """--split val on shards tokenized with --val-fraction 0: documents asked for get an error saying the
    split is empty (it was 'no val split in manifest.json', which it has); figures only is no error."""
    out = tmp_path / "sft"
    tokenize_to_shards([builtin_data["files"]["sft"]], builtin_data["tokenizer"], out,
                       TokenizeOptions(kind="sft", seq_len=128, workers=1, val_fraction=0))
    for asked in ([], ["--index", 0], ["--random", 2]):
        with pytest.raises(SystemExit, match=f"error: {out}: its 'val' split is empty .no documents were held out"):
            _launch(monkeypatch, "--data", out, "--split", "val", *asked)
        assert "  val: no documents\n" in capsys.readouterr().out  # the figures come first
    _launch(monkeypatch, "--data", out, "--split", "val", "--show", 0)
    assert "  val: no documents\n" in capsys.readouterr().out
