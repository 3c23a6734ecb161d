"""Reward functions for GRPO: the shipped rule-based ones, a registry, and loading user functions.

A reward function takes the decoded completion (special tokens stripped) and the prompt's JSONL record
(`prompt`, `answer` and any other fields the user put there) and returns a float:

    def my_reward(completion: str, sample: dict) -> float: ...

With `--tools` (multi-turn rollouts, tools.py) the completion is the last turn's text, and the sample also
holds the whole conversation under `TRAJECTORY` ("_trajectory": the prompt's messages, then each turn as an
assistant message with its well-formed calls in `tool_calls`, each answered by a `tool` message, its
content the result or `{"error": ...}`), the rollout's own messages from index `sample[TRAJECTORY_START]`
on. A function that reads them sets `needs_trajectory = True`, so that a run without --tools refuses it.

`--reward` names one per flag: a shipped name (`answer`, `format`, `repetition`, `tool_format`),
`package.module:function`, or `path/to/file.py:function`, each optionally followed by `:WEIGHT` (default 1).
The total reward of a completion is the weighted sum. A function may list the record fields it needs in a
`fields` attribute (tuple of names) so that missing fields fail at start-up with the file and line, not
mid-run. A user function's module file is fingerprinted (`RewardSet.sources`) so that a resume with edited
code is refused; code it imports from other files is not.
"""

from __future__ import annotations

import hashlib
import math
import numbers
import re
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import torch

from minimind_fast.data.records import conversation_tools
from minimind_fast.training.tools import definition_name, import_user_module, parse_tool_calls

RewardFn = Callable[[str, dict], float]

# A number in free text, thousands separators included ("1,000" is one number, not "1" and "000").
# A minus right after a digit is a subtraction ("10-4"), not the sign of the next number.
NUMBER = re.compile(r"(?:(?<![\d)])-)?\d+(?:,\d{3}(?!\d))*(?:\.\d+)?")
THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
STRUCTURE = re.compile(r"\s*<think>.+?</think>\s*<answer>.+?</answer>\s*", re.DOTALL)
WEIGHT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
TAGS = ("<think>", "</think>", "<answer>", "</answer>")
# Words for the repetition reward: a CJK character or kana/hangul syllable is a word of its own (CJK text
# has no spaces, so a whole sentence would otherwise be one word), else a run of word characters, else
# one punctuation mark.
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
WORD = re.compile(f"[{_CJK}]|[^\\W{_CJK}]+|[^\\w\\s]")
REPEAT_N = 3
SCORE_BATCH = 16  # rows per forward of a reward model
TRAJECTORY, TRAJECTORY_START = "_trajectory", "_trajectory_start"  # a --tools rollout's conversation in `sample`


def _as_number(text: str) -> float | None:
    """The value of a number written as such; commas only as thousands separators (so "1,2" is no
    number, not 12), and no underscores (Python's float takes "1_2" as 12)."""
    text = text.strip()
    if "_" in text or ("," in text and not THOUSANDS.fullmatch(text)):
        return None
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def _same(given: str, expected: str) -> bool:
    """Numbers compare by value (`25`, `25.0`, `1,000` and `1000` agree); anything else as stripped text."""
    a, b = _as_number(given), _as_number(expected)
    if a is not None and b is not None:
        return math.isclose(a, b, rel_tol=0, abs_tol=1e-9)
    return given.strip() == expected.strip()


def extract_answer(completion: str) -> str | None:
    """The text inside the last `<answer>...</answer>`, else the last number in the text, else None.

    The fallback lets a model that answers correctly without the tags still earn the answer reward;
    the format reward is what asks for the tags.
    """
    tagged = ANSWER.findall(completion)
    if tagged:
        return tagged[-1].strip()
    numbers = NUMBER.findall(completion)
    return numbers[-1] if numbers else None


def answer_reward(completion: str, sample: dict) -> float:
    """1 when the completion's answer equals the record's `answer` (by value for numbers), else 0."""
    given = extract_answer(completion)
    return float(given is not None and _same(given, str(sample["answer"])))


answer_reward.fields = ("answer",)


def format_reward(completion: str, sample: dict) -> float:
    """1 for exactly `<think>...</think>` then `<answer>...</answer>` (each tag once, nothing outside);
    otherwise 0.2 for each of the four tags that appears exactly once, so that a model with part of
    the structure still gets a signal to climb (at most 0.8: only the full structure earns 1)."""
    counts = [completion.count(t) for t in TAGS]
    if all(c == 1 for c in counts) and STRUCTURE.fullmatch(completion):
        return 1.0
    return 0.2 * sum(c == 1 for c in counts)


def repetition_reward(completion: str, sample: dict) -> float:
    """Minus the share of the completion's word 3-grams that repeat an earlier one: 0 for text that never
    repeats itself, towards -1 for a loop (small models under RL drift into repeating a phrase, which
    neither the answer nor the format reward sees). Text of fewer than three words scores 0."""
    words = WORD.findall(completion.lower())
    grams = [tuple(words[i:i + REPEAT_N]) for i in range(len(words) - REPEAT_N + 1)]
    return -(len(grams) - len(set(grams))) / len(grams) if grams else 0.0


def tool_format_reward(completion: str, sample: dict) -> float:
    """(good - bad) / calls over every tool call of the rollout: good is well-formed and names a tool the
    prompt declares, bad is anything else (not JSON, no name, an undeclared tool). 1 when every call is
    good, -1 when none is, 0 for a rollout without calls. Whether the tool was the right one, or its result
    used, is the task's own reward to judge."""
    messages = sample[TRAJECTORY]
    declared = {definition_name(d) for d in conversation_tools(messages) or []}
    good = bad = 0
    for m in messages[sample[TRAJECTORY_START]:]:
        if m["role"] != "assistant":
            continue
        for call in m.get("tool_calls") or []:
            if call["function"]["name"] in declared:
                good += 1
            else:
                bad += 1
        bad += len(parse_tool_calls(m["content"])[1])  # the malformed ones, left in the content
    return (good - bad) / (good + bad) if good + bad else 0.0


tool_format_reward.needs_trajectory = True

class ReplyScorer:
    """A learnt reward (`--reward-model`): one score per (prompt messages, reply). A subclass encodes a pair
    (`sequence_ids`), names its padding id (`pad_id`) and scores a right-padded batch (`score_padded`)."""

    pad_id: int

    def sequence_ids(self, messages: list[dict], completion: str | list[int], truncate: bool = True) -> list[int]:
        raise NotImplementedError

    def score_padded(self, ids: torch.Tensor, lengths: torch.Tensor) -> list[float]:
        """Scores of the rows of `ids` (CPU, right-padded with `pad_id`), each `lengths[i]` tokens long."""
        raise NotImplementedError

    def score(self, prompts: list[list[dict]], completions: list[str] | list[list[int]],
              batch_size: int = SCORE_BATCH) -> list[float]:
        """One score per (prompt messages, reply text or sampled ids)."""
        return self.score_ids([self.sequence_ids(m, c) for m, c in zip(prompts, completions)], batch_size)

    @torch.no_grad()
    def score_ids(self, sequences: list[list[int]], batch_size: int = SCORE_BATCH) -> list[float]:
        """One score per encoded sequence, `batch_size` right-padded rows per forward."""
        scores: list[float] = []
        for start in range(0, len(sequences), batch_size):
            rows = sequences[start:start + batch_size]
            lengths = torch.tensor([len(r) for r in rows])
            ids = torch.full((len(rows), int(lengths.max())), self.pad_id, dtype=torch.long)
            for i, r in enumerate(rows):
                ids[i, :len(r)] = torch.tensor(r)
            scores += self.score_padded(ids, lengths)
        return scores


REWARDS: dict[str, RewardFn] = {"answer": answer_reward, "format": format_reward, "repetition": repetition_reward,
                                "tool_format": tool_format_reward}


@dataclass
class Reward:
    name: str
    fn: RewardFn
    weight: float = 1.0
    origin: str | None = None  # a user function: `module:function` or `file.py:function`, as given
    fingerprint: str | None = None  # of its module's source file, for resume (None: shipped, or no file)

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(getattr(self.fn, "fields", ()))


def _import_function(target: str, func: str, spec: str) -> tuple[RewardFn, str | None]:
    """The function, and a fingerprint of the module's source file (None for a module without one): a
    resume must score with the same code, not only the same name."""
    module, source = import_user_module(target, f"--reward {spec}")
    fn = getattr(module, func, None)
    if not callable(fn):
        raise ValueError(f"--reward {spec}: {target} has no function {func!r}")
    fingerprint = hashlib.sha256(source.read_bytes()).hexdigest()[:16] if source and source.is_file() else None
    return fn, fingerprint


def split_weight(spec: str) -> tuple[str, float]:
    """`thing[:weight]` -> (thing, weight, default 1)."""
    head, _, tail = spec.rpartition(":")
    if head and WEIGHT.fullmatch(tail):  # a plain number only: a function may be called `nan` or `inf`
        return head, float(tail)
    return spec, 1.0


def reward_identity(specs: list[str] | None) -> list[list] | None:
    """The rewards of `--reward` specs as a resume compares them: sorted [function, weight] pairs, a shipped
    reward by its name, a user one as `module:function` or `file.py:function`. A checkpoint records the specs
    as typed, and `f.py:fn:1`, `f.py:fn:1.0` and `f.py:fn` are the same reward (weight 1 is the default)."""
    if specs is None:
        return None
    return sorted([name, weight] for name, weight in map(split_weight, specs))


def parse_reward(spec: str) -> Reward:
    """`name[:weight]`, `module:function[:weight]` or `file.py:function[:weight]` -> a `Reward`."""
    spec_name, weight = split_weight(spec)
    if spec_name in REWARDS:
        return Reward(spec_name, REWARDS[spec_name], weight)
    if ":" not in spec_name:
        raise ValueError(f"--reward {spec}: unknown reward {spec_name!r}; shipped: {', '.join(REWARDS)}; "
                         f"or give module:function or file.py:function")
    target, func = spec_name.rsplit(":", 1)
    fn, fingerprint = _import_function(target, func, spec)
    return Reward(func, fn, weight, spec_name, fingerprint)


class RewardSet:
    """The rewards of a run: scores completions and keeps each function's raw values for the metrics."""

    def __init__(self, specs: list[str], allow_empty: bool = False):
        if not specs and not allow_empty:  # empty: the run's only reward is another (--reward-model)
            raise ValueError("give at least one --reward")
        self.rewards = [parse_reward(s) for s in specs]
        names = [r.name for r in self.rewards]
        if len(set(names)) != len(names):
            raise ValueError(f"--reward: the same reward name twice ({', '.join(names)})")

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(f for r in self.rewards for f in r.fields))

    def sources(self) -> dict[str, str] | None:
        """{`file.py:function` as given: its source file's fingerprint} of the user functions; None without
        any (what a checkpoint from before the record holds, so that it resumes unchanged)."""
        return {r.origin: r.fingerprint for r in self.rewards if r.origin is not None} or None

    def score(self, completions: list[str], samples: list[dict]) -> tuple[list[float], dict[str, list[float]]]:
        """(weighted total per completion, {name: raw values}); a non-finite or non-number value is an error."""
        parts: dict[str, list[float]] = {}
        for r in self.rewards:
            values = []
            for text, sample in zip(completions, samples):
                value = _call(r, text, sample)
                # Any real number (bools count as 0/1, NumPy scalars as their value); not a tensor or a string.
                if not isinstance(value, numbers.Real) or not math.isfinite(value):
                    raise ValueError(f"reward {r.name} returned {value!r} (needs a finite float) for {_clip(text)}")
                values.append(float(value))
            parts[r.name] = values
        totals = [sum(r.weight * parts[r.name][i] for r in self.rewards) for i in range(len(completions))]
        return totals, parts


def _call(reward: Reward, completion: str, sample: dict):
    """The reward function's value; an exception it raises (a user function meeting a completion it did
    not expect) ends the run with the reward's name, where it raised and the completion, not a traceback."""
    try:
        return reward.fn(completion, sample)
    except Exception as e:
        frame = traceback.extract_tb(e.__traceback__)[-1]
        raise ValueError(f"reward {reward.name} raised {type(e).__name__}: {e} (at {frame.filename}:{frame.lineno}) "
                         f"on the completion {_clip(completion)}") from None


def _clip(text: str, limit: int = 300) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")
