"""The built-in corpus: a small, deterministic world of facts in MiniMind's JSONL formats.

`make demo` and the tests need data with no download. This module generates (from a seed) a
pretraining corpus about a fixed set of animals, cities, colours and numbers, SFT dialogues asking
about the same facts, DPO preference pairs (the true fact against a false one), reasoning samples in
MiniMind's `<think>...</think><answer>...</answer>` format, GRPO arithmetic prompts and a small
identity set for LoRA. The facts repeat with varied wording, so a tiny model learns them in minutes.
"""

from __future__ import annotations

import functools
import json
import os
import random
from pathlib import Path

from minimind_fast.files import write_files_whole

ANIMALS = {
    "cat": dict(colour="grey", home="house", food="fish", sound="meows", legs=4),
    "dog": dict(colour="brown", home="kennel", food="meat", sound="barks", legs=4),
    "cow": dict(colour="black and white", home="farm", food="grass", sound="moos", legs=4),
    "duck": dict(colour="yellow", home="pond", food="bread", sound="quacks", legs=2),
    "horse": dict(colour="chestnut", home="stable", food="hay", sound="neighs", legs=4),
    "owl": dict(colour="white", home="barn", food="mice", sound="hoots", legs=2),
    "frog": dict(colour="green", home="lake", food="flies", sound="croaks", legs=4),
    "bee": dict(colour="yellow and black", home="hive", food="nectar", sound="buzzes", legs=6),
    "lion": dict(colour="golden", home="savanna", food="zebras", sound="roars", legs=4),
    "penguin": dict(colour="black and white", home="ice", food="fish", sound="squawks", legs=2),
}
CITIES = {
    "Paris": dict(country="France", river="Seine", landmark="the Eiffel Tower", food="bread"),
    "London": dict(country="England", river="Thames", landmark="Big Ben", food="tea"),
    "Rome": dict(country="Italy", river="Tiber", landmark="the Colosseum", food="pasta"),
    "Cairo": dict(country="Egypt", river="Nile", landmark="the pyramids", food="beans"),
    "Tokyo": dict(country="Japan", river="Sumida", landmark="the Skytree", food="sushi"),
    "Beijing": dict(country="China", river="Liangma", landmark="the Forbidden City", food="duck"),
    "Berlin": dict(country="Germany", river="Spree", landmark="the Brandenburg Gate", food="pretzels"),
    "Madrid": dict(country="Spain", river="Manzanares", landmark="the Prado", food="paella"),
}
IDENTITY = ("I am MiniMind, a small language model trained with minimind_fast. "
            "I can answer simple questions about animals, cities and numbers.")
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve"]

SIZES = {"demo": dict(pretrain_docs=12000, sft=3000, dpo=600, reasoning=600, grpo=300, lora=300),
         "test": dict(pretrain_docs=300, sft=150, dpo=60, reasoning=60, grpo=40, lora=40)}


def animal_sentences(name: str, a: dict) -> list[str]:
    return [
        f"The {name} is {a['colour']}.",
        f"A {name} lives in a {a['home']}.",
        f"The {name} eats {a['food']}.",
        f"The {name} {a['sound']}.",
        f"A {name} has {NUMBER_WORDS[a['legs']]} legs.",
        f"If you visit a {a['home']}, you may see a {name}.",
        f"Every {name} likes {a['food']} very much.",
    ]


def city_sentences(name: str, c: dict) -> list[str]:
    return [
        f"{name} is the capital of {c['country']}.",
        f"The river {c['river']} flows through {name}.",
        f"In {name} you can visit {c['landmark']}.",
        f"People in {name} like to eat {c['food']}.",
        f"{c['landmark'][0].upper() + c['landmark'][1:]} is in {name}.",
    ]


def arithmetic_sentence(rng: random.Random) -> str:
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    if rng.random() < 0.5:
        return f"{a} plus {b} is {a + b}."
    hi, lo = max(a, b), min(a, b)
    return f"{hi} minus {lo} is {hi - lo}."


def pretrain_doc(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.45:
        name = rng.choice(list(ANIMALS))
        sents = animal_sentences(name, ANIMALS[name])
    elif kind < 0.85:
        name = rng.choice(list(CITIES))
        sents = city_sentences(name, CITIES[name])
    else:
        sents = [arithmetic_sentence(rng) for _ in range(6)]
    rng.shuffle(sents)
    return " ".join(sents[: rng.randint(3, len(sents))])


def qa_pairs() -> list[tuple[str, str]]:
    """Every (question, true answer) the SFT set can ask."""
    pairs = []
    for name, a in ANIMALS.items():
        pairs += [
            (f"What colour is the {name}?", f"The {name} is {a['colour']}."),
            (f"Where does a {name} live?", f"A {name} lives in a {a['home']}."),
            (f"What does the {name} eat?", f"The {name} eats {a['food']}."),
            (f"What sound does a {name} make?", f"The {name} {a['sound']}."),
            (f"How many legs does a {name} have?", f"A {name} has {NUMBER_WORDS[a['legs']]} legs."),
            (f"Tell me about the {name}.",
             f"The {name} is {a['colour']}. It lives in a {a['home']} and eats {a['food']}."),
        ]
    for name, c in CITIES.items():
        pairs += [
            (f"What is the capital of {c['country']}?", f"{name} is the capital of {c['country']}."),
            (f"Which river flows through {name}?", f"The river {c['river']} flows through {name}."),
            (f"What can I visit in {name}?", f"In {name} you can visit {c['landmark']}."),
            (f"Tell me about {name}.",
             f"{name} is the capital of {c['country']}. The river {c['river']} flows through it."),
        ]
    pairs += [("Who are you?", IDENTITY), ("What is your name?", "My name is MiniMind."),
              ("Hello!", "Hello! How can I help you today?")]
    return pairs


def wrong_answer(rng: random.Random, answer: str) -> str:
    """A fluent but false answer: one fact swapped for another of the same kind (colour for colour...)."""
    kinds = [sorted({a[k] for a in ANIMALS.values()}) for k in ("colour", "home", "food")]
    kinds += [sorted({c[k] for c in CITIES.values()}) for k in ("country", "river", "landmark")]
    for values in kinds:
        for v in sorted(values, key=len, reverse=True):
            if v in answer:
                return answer.replace(v, rng.choice([w for w in values if w != v]), 1)
    return "I don't know, and I don't care."


def sft_record(rng: random.Random, pairs: list[tuple[str, str]]) -> dict:
    turns = []
    if rng.random() < 0.15:
        turns.append({"role": "system", "content": "You are a helpful assistant."})
    for _ in range(1 if rng.random() < 0.8 else 2):
        q, a = rng.choice(pairs)
        turns += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return {"conversations": turns}


def reasoning_record(rng: random.Random) -> dict:
    a, b, c = rng.randint(1, 20), rng.randint(1, 20), rng.randint(1, 9)
    q = f"What is {a} + {b} - {c}?"
    think = f"First, {a} + {b} = {a + b}. Then {a + b} - {c} = {a + b - c}."
    answer = f"<think>\n{think}\n</think>\n<answer>\n{a + b - c}\n</answer>"
    return {"conversations": [{"role": "user", "content": q}, {"role": "assistant", "content": answer}]}


def write_jsonl_files(files: dict[Path, list[dict]]) -> None:
    """Each path's records as JSONL, all or none (`files.write_files_whole`): a failure midway leaves every old
    file as it was, never the files of two corpora side by side, which later commands would take for one."""
    write_files_whole({path: functools.partial(_write_jsonl, records=records) for path, records in files.items()})


def _write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def write_builtin_corpus(out_dir: str | os.PathLike, seed: int = 0, size: str = "demo") -> dict[str, Path]:
    """Write the built-in corpus (deterministic for a seed); returns {name: path}."""
    if size not in SIZES:
        raise ValueError(f"size={size!r} must be one of {sorted(SIZES)}")
    n = SIZES[size]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    pairs = qa_pairs()
    files = {
        "pretrain": [{"text": pretrain_doc(rng)} for _ in range(n["pretrain_docs"])],
        "sft": [sft_record(rng, pairs) for _ in range(n["sft"])],
        "dpo": [],
        "reasoning": [reasoning_record(rng) for _ in range(n["reasoning"])],
        "grpo_prompts": [],
        "lora": [],
    }
    for _ in range(n["dpo"]):
        q, a = rng.choice(pairs)
        user = {"role": "user", "content": q}
        files["dpo"].append({"chosen": [user, {"role": "assistant", "content": a}],
                             "rejected": [user, {"role": "assistant",
                                                 "content": wrong_answer(rng, a)}]})
    for _ in range(n["grpo"]):
        a, b = rng.randint(0, 30), rng.randint(0, 30)
        files["grpo_prompts"].append({"prompt": f"What is {a} + {b}?", "answer": str(a + b)})
    for _ in range(n["lora"]):
        q = rng.choice(["Who are you?", "What is your name?", "Who made you?", "Introduce yourself."])
        files["lora"].append({"conversations": [{"role": "user", "content": q},
                                                {"role": "assistant", "content": IDENTITY}]})
    paths = {name: out / f"{name}.jsonl" for name in files}
    write_jsonl_files({paths[name]: records for name, records in files.items()})
    return paths
