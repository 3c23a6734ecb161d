"""The built-in corpus: deterministic, in MiniMind's JSONL formats, and internally consistent."""

from __future__ import annotations

import errno
import json
import re

import pytest

import minimind_fast.data.corpus as corpus_module
from minimind_fast.data.corpus import ANIMALS, CITIES, write_builtin_corpus


def _read(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_builtin_corpus(tmp_path_factory.mktemp("corpus"), seed=0, size="test")


def test_deterministic_per_seed(corpus, tmp_path):
    again = write_builtin_corpus(tmp_path / "a", seed=0, size="test")
    other = write_builtin_corpus(tmp_path / "b", seed=1, size="test")
    assert set(corpus) == {"pretrain", "sft", "dpo", "reasoning", "grpo_prompts", "lora"}
    for name in corpus:
        assert again[name].read_bytes() == corpus[name].read_bytes()
    assert other["pretrain"].read_bytes() != corpus["pretrain"].read_bytes()
    assert not list(tmp_path.glob("*/*.tmp*"))  # no temporary left behind


def test_a_full_disk_midway_leaves_the_old_corpus_whole(tmp_path, monkeypatch):
    """The disk fills while the third file is written: no file of the directory is of the new corpus (a
    mix of two seeds would look complete to train_tokenizer and tokenize), and no temporary is left."""
    old = {name: path.read_bytes() for name, path in write_builtin_corpus(tmp_path, seed=0, size="test").items()}
    opened = []

    def open_filling_the_disk(path, mode="r", **kwargs):
        f = open(path, mode, **kwargs)
        opened.append(path)
        if len(opened) == 3:
            write_some = f.write

            def write(text):
                write_some(text[: len(text) // 2])
                raise OSError(errno.ENOSPC, "No space left on device")
            f.write = write
        return f

    monkeypatch.setattr(corpus_module, "open", open_filling_the_disk, raising=False)
    with pytest.raises(OSError, match="No space"):
        write_builtin_corpus(tmp_path, seed=1, size="test")
    assert len(opened) == 3
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == {f"{n}.jsonl": b for n, b in old.items()}


def test_formats(corpus):
    assert all(isinstance(r["text"], str) and r["text"] for r in _read(corpus["pretrain"]))
    for name in ("sft", "reasoning", "lora"):
        for r in _read(corpus[name]):
            roles = [m["role"] for m in r["conversations"]]
            assert roles[-1] == "assistant" and set(roles) <= {"system", "user", "assistant"}
            assert all(m["content"] for m in r["conversations"])
    for r in _read(corpus["dpo"]):
        assert r["chosen"][:-1] == r["rejected"][:-1]  # same prompt
        assert r["chosen"][-1]["content"] != r["rejected"][-1]["content"]


def test_facts_are_consistent(corpus):
    """Pretrain text, SFT answers and DPO chosen replies state the same facts; rejected ones do not."""
    facts = {f"The {a} is {v['colour']}." for a, v in ANIMALS.items()}
    facts |= {f"{c} is the capital of {v['country']}." for c, v in CITIES.items()}
    text = " ".join(r["text"] for r in _read(corpus["pretrain"]))
    assert all(f in text for f in facts)
    colour_claims = re.findall(r"The (\w+) is ([a-z ]+?)\.", text)
    assert all(ANIMALS[a]["colour"] == c for a, c in colour_claims if a in ANIMALS)
    for r in _read(corpus["sft"]):
        for m in r["conversations"]:
            for a, c in re.findall(r"The (\w+) is ([a-z ]+?)\.", m["content"]):
                assert a not in ANIMALS or ANIMALS[a]["colour"] == c
    n_wrong = 0
    for r in _read(corpus["dpo"]):
        for a, c in re.findall(r"The (\w+) is ([a-z ]+?)\.", r["rejected"][-1]["content"]):
            n_wrong += a in ANIMALS and ANIMALS[a]["colour"] != c
    assert n_wrong > 0


def test_reasoning_and_grpo_answers_are_right(corpus):
    for r in _read(corpus["reasoning"]):
        q = r["conversations"][0]["content"]
        a, b, c = map(int, re.fullmatch(r"What is (\d+) \+ (\d+) - (\d+)\?", q).groups())
        reply = r["conversations"][-1]["content"]
        m = re.fullmatch(r"<think>\n(.+)\n</think>\n<answer>\n(-?\d+)\n</answer>", reply, re.S)
        assert m and int(m.group(2)) == a + b - c
    for r in _read(corpus["grpo_prompts"]):
        a, b = map(int, re.fullmatch(r"What is (\d+) \+ (\d+)\?", r["prompt"]).groups())
        assert r["answer"] == str(a + b)


def test_sizes(tmp_path):
    with pytest.raises(ValueError, match="size"):
        write_builtin_corpus(tmp_path, size="huge")
