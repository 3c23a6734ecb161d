"""GRPO: the loss against the formula by hand, the reward functions, the prompt loader, and runs of
`launch/grpo.py` as users run it (subprocesses, DeepSpeed on the CPU)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from control_text import INJECTION, control_count, shard_prompt_ids
from launch_helpers import run, two_ranks
from tool_templates import TOOLS_TEMPLATE

from minimind_fast.checkpoint import load_model, save_model_dir
from minimind_fast.data.prompts import PromptLoader, encode_prompts, read_prompt_file
from minimind_fast.data.tokenizer import load_tokenizer
from minimind_fast.model import MiniMindForCausalLM
from minimind_fast.training.grpo import group_advantages, grpo_loss, k3_kl, pack_sequences, rollout_seed, token_logprobs
from minimind_fast.training.rewards import (
    RewardSet,
    answer_reward,
    extract_answer,
    format_reward,
    parse_reward,
    repetition_reward,
)

# ------------------------------------------------------------------------------- the loss by hand

def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5, 2.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    adv = group_advantages(rewards, 4, eps=1e-4)
    for g in range(2):
        r = rewards[4 * g:4 * g + 4].tolist()
        mean = sum(r) / 4
        std = math.sqrt(sum((x - mean) ** 2 for x in r) / 4)
        for i in range(4):
            assert adv[4 * g + i].item() == pytest.approx((r[i] - mean) / (std + 1e-4), abs=1e-12)
    same = group_advantages(torch.tensor([0.3, 0.3, 0.3]), 3)
    assert torch.equal(same, torch.zeros(3))  # no preference inside the group, no push


def test_grpo_loss_and_gradient_equal_the_formula_in_float64():
    g = torch.Generator().manual_seed(0)
    n, t, clip, beta = 4, 6, 0.2, 0.1
    logp = (-3 * torch.rand(n, t, generator=g, dtype=torch.float64)).requires_grad_(True)
    old = logp.detach() + 0.3 * torch.randn(n, t, generator=g, dtype=torch.float64)  # ratios beyond the clip
    ref = logp.detach() + 0.5 * torch.randn(n, t, generator=g, dtype=torch.float64)
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.2, 0.9], dtype=torch.float64), 2)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0]],
                        dtype=torch.bool)
    loss, stats = grpo_loss(logp, old, ref, adv, mask, clip, beta)
    loss.backward()

    total = kl_sum = clipped = 0.0
    grad = [[0.0] * t for _ in range(n)]
    count = int(mask.sum())
    for i in range(n):
        a = adv[i].item()
        for j in range(t):
            if not mask[i, j]:
                continue
            lp, lo, lr = logp[i, j].item(), old[i, j].item(), ref[i, j].item()
            r = math.exp(lp - lo)
            r_clip = min(max(r, 1 - clip), 1 + clip)
            surrogate = min(r * a, r_clip * a)
            kl = math.exp(lr - lp) - (lr - lp) - 1
            total += -surrogate + beta * kl
            kl_sum += kl
            is_clipped = (r > 1 + clip and a > 0) or (r < 1 - clip and a < 0)
            clipped += is_clipped
            # d/dlogp: the unclipped term gives -r*a (dr/dlogp = r), a clipped one nothing; k3 gives 1 - e^(ref-lp).
            grad[i][j] = ((0.0 if is_clipped else -r * a) + beta * (1 - math.exp(lr - lp))) / count
    assert loss.item() == pytest.approx(total / count, abs=1e-12)
    assert stats["kl"] == pytest.approx(kl_sum / count, abs=1e-12)
    assert stats["clip_fraction"] == pytest.approx(clipped / count, abs=1e-12)
    assert 0 < stats["clip_fraction"] < 1  # the case exercises both branches
    assert torch.allclose(logp.grad, torch.tensor(grad, dtype=torch.float64), atol=1e-12, rtol=0)


def test_grpo_loss_without_reference_and_k3_properties():
    logp = torch.tensor([[-1.0, -2.0]], dtype=torch.float64)
    loss, stats = grpo_loss(logp, logp, None, torch.tensor([0.5], dtype=torch.float64),
                            torch.ones(1, 2, dtype=torch.bool), 0.2, 0.0)
    assert loss.item() == pytest.approx(-0.5) and stats["kl"] == 0.0 and stats["ratio_mean"] == 1.0
    d = torch.linspace(-3, 3, 13, dtype=torch.float64)
    assert (k3_kl(torch.zeros_like(d), d) >= 0).all() and k3_kl(d, d).abs().max() == 0


def test_token_logprobs_and_packing():
    logits = torch.randn(2, 3, 7, dtype=torch.float64)
    targets = torch.tensor([[1, 2, 3], [4, 5, 6]])
    expected = torch.log_softmax(logits / 0.7, -1).gather(-1, targets[..., None]).squeeze(-1)
    assert torch.allclose(token_logprobs(logits, targets, 0.7), expected, atol=1e-12)

    inputs, targets, mask = pack_sequences([[1, 2, 3], [1, 2]], [[7, 8], [9, 10, 11]], pad_id=0)
    assert inputs.tolist() == [[1, 2, 3, 7], [1, 2, 9, 10]]  # the last token is never an input
    # Kept positions start at the shortest prompt's last token (index 1): they predict tokens 2..4.
    assert targets.tolist() == [[3, 7, 8], [9, 10, 11]]
    assert mask.tolist() == [[False, True, True], [True, True, True]]
    assert rollout_seed(1, 0, 5) == rollout_seed(1, 0, 5) != rollout_seed(1, 1, 5)


# ------------------------------------------------------------------------------------- rewards

GOOD = "<think>\n4 + 21 = 25\n</think>\n<answer>\n25\n</answer>"


@pytest.mark.parametrize("text, answer, expected", [
    (GOOD, "25", 1.0),
    ("<think>x</think><answer> 25.0 </answer>", 25, 1.0),
    ("<answer>24</answer> but really 25", "25", 0.0),  # the tagged answer wins over later numbers
    ("The sum is 25.", "25", 1.0),  # no tags: the last number
    ("25, no wait, 26", "25", 0.0),
    ("no number here", "25", 0.0),
    ("<answer>1,000</answer>", "1000", 1.0),
    ("<answer> Paris </answer>", "Paris", 1.0),
    ("<answer>-3</answer>", "-3", 1.0),
    # Thousands separators: one number, in the untagged fallback too ("000" was taken, and matched 0).
    ("The total is 1,000.", "1000", 1.0),
    ("The total is 1,000.", "0", 0.0),
    ("<answer>12,345.5</answer>", "12345.5", 1.0),
    # Commas elsewhere and underscores do not make a number (float() read them as 12).
    ("<answer>1,2</answer>", "12", 0.0),
    ("<answer>1_2</answer>", "12", 0.0),
    # Untagged, a minus after a digit is a subtraction, not a sign: "10-4" ends in 4, not -4.
    ("10-4", "-4", 0.0),
    ("10-4", "4", 1.0),
    ("(2+3)-1 so the answer is -1", "-1", 1.0),
    ("It is -7.", "-7", 1.0),
])
def test_answer_reward(text, answer, expected):
    assert answer_reward(text, {"answer": answer}) == expected


def test_extract_answer_takes_the_last_tagged_answer():
    assert extract_answer("<answer>1</answer><answer>2</answer>") == "2"
    assert extract_answer("nothing") is None


@pytest.mark.parametrize("text, expected", [
    (GOOD, 1.0),
    ("  <think>a</think>\n\n<answer>b</answer>\n", 1.0),
    ("<think>a</think> 25", 0.4),  # two tags once each: partial credit
    ("hi <think>a</think><answer>1</answer>", 0.8),  # text outside the structure: never the full 1
    ("<answer>1</answer><think>a</think>", 0.8),  # wrong order
    ("<think>a</think><think>b</think><answer>1</answer>", 0.4),  # a repeated tag earns nothing
    ("<think></think><answer></answer>", 0.8),  # empty sections
    ("", 0.0),
])
def test_format_reward(text, expected):
    assert format_reward(text, {}) == pytest.approx(expected)


@pytest.mark.parametrize("text, expected", [
    ("The cat is grey.", 0.0),  # 5 words, 3 distinct 3-grams
    ("a b c a b c", -1 / 4),  # 3-grams abc bca cab abc: one of four repeats
    ("go go go go go", -2 / 3),  # three 3-grams, all "go go go"
    ("Go, go, GO, go", -3 / 5),  # case folded, commas are words: "go , go" 3 times and ", go ," twice
    ("你好你好你好", -2 / 4),  # CJK characters are words: 你好你 and 好你好 each twice
    ("two words", 0.0),  # no 3-gram at all
    ("", 0.0),
])
def test_repetition_reward(text, expected):
    assert repetition_reward(text, {}) == pytest.approx(expected)
    assert parse_reward("repetition:0.5").weight == 0.5


def test_reward_specs_weights_and_user_functions(tmp_path):
    assert (parse_reward("answer").name, parse_reward("answer").weight) == ("answer", 1.0)
    assert parse_reward("format:0.5").weight == 0.5
    mine = tmp_path / "my_rewards.py"
    mine.write_text("def short(completion, sample):\n    return -len(completion) / 100\n")
    user = parse_reward(f"{mine}:short:2")
    assert (user.name, user.weight, user.fn("abcd", {})) == ("short", 2.0, -0.04)
    assert parse_reward("minimind_fast.training.rewards:answer_reward").fn is answer_reward
    rewards = RewardSet(["answer:2", "format:0.5"])
    assert rewards.fields == ("answer",)
    totals, parts = rewards.score([GOOD, "26"], [{"answer": "25"}] * 2)
    assert totals == [2.5, 0.0] and parts == {"answer": [1.0, 0.0], "format": [1.0, 0.0]}


@pytest.mark.parametrize("spec, message", [
    ("nope", "unknown reward 'nope'"),
    ("missing_file.py:fn", "no such file"),
    ("minimind_fast.training.rewards:missing", "has no function 'missing'"),
    ("no_such_module_xyz:fn", "no module 'no_such_module_xyz'"),
    ("some/dir/notes.txt:fn", "some/dir/notes.txt is not a .py file"),  # was "No module named 'some/dir/notes'"
])
def test_reward_spec_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_reward(spec)


def test_reward_set_rejects_duplicates_and_bad_values(tmp_path):
    with pytest.raises(ValueError, match="same reward name"):
        RewardSet(["answer", "answer:2"])
    bad = tmp_path / "bad.py"
    bad.write_text("def nan(completion, sample):\n    return float('nan')\n")
    with pytest.raises(ValueError, match="needs a finite float"):
        RewardSet([f"{bad}:nan"]).score(["x"], [{}])


def test_user_rewards_may_return_numpy_scalars_and_their_errors_name_the_reward(tmp_path):
    """A NumPy float32 was refused as not a float; an exception in a user function on a completion it
    did not expect was a traceback that named neither the reward nor the completion."""
    mine = tmp_path / "mine.py"
    mine.write_text("import numpy as np\n"
                    "def half(completion, sample):\n    return np.float32(0.5)\n"
                    "def first_word(completion, sample):\n    return float(len(completion.split()[0]))\n")
    assert RewardSet([f"{mine}:half:2"]).score(["x"], [{}]) == ([1.0], {"half": [0.5]})
    rewards = RewardSet([f"{mine}:first_word"])
    assert rewards.score(["abc d"], [{}])[0] == [3.0]
    with pytest.raises(ValueError, match=rf"reward first_word raised IndexError: .* \(at {mine}:5\) on the "
                                         r"completion '   '"):
        rewards.score(["   "], [{}])


# --------------------------------------------------------------------------------- prompt loader

def _loader(n: int, **kw) -> PromptLoader:
    prompts = [[i, i] for i in range(n)]
    return PromptLoader(prompts, [{"i": i} for i in range(n)], **kw)


def test_prompt_loader_gives_ranks_disjoint_prompts_reshuffled_per_epoch():
    epochs = {}
    for rank in range(2):
        it = iter(_loader(11, micro_batch_size=2, seed=3, rank=rank, world_size=2))
        batches = [next(it) for _ in range(4)]  # 5 prompts per rank -> 2 batches per epoch
        assert [b["epoch"] for b in batches] == [0, 0, 1, 1]
        for e in (0, 1):
            epochs[rank, e] = [i for b in batches if b["epoch"] == e for i in b["prompt_index"]]
        assert all(b["samples"] == [{"i": i} for i in b["prompt_index"]] for b in batches)
    for e in (0, 1):
        assert not set(epochs[0, e]) & set(epochs[1, e])
        assert len(set(epochs[0, e] + epochs[1, e])) == 8
    assert epochs[0, 0] != epochs[0, 1]


def test_prompt_loader_resumes_exactly_and_checks_the_state():
    loader = _loader(9, micro_batch_size=2, seed=1, grad_accum=2, repeats=3)
    it = iter(loader)
    seen = [next(it) for _ in range(7)]
    state = json.loads(json.dumps(loader.state_dict()))  # as the checkpoint stores it
    expected = [next(it) for _ in range(9)]
    resumed = _loader(9, micro_batch_size=2, seed=1, grad_accum=2, repeats=3)
    resumed.load_state_dict(state)
    rit = iter(resumed)
    assert [next(rit) for _ in range(9)] == expected
    # One optimizer step's micro-batches (grad_accum=2) come `repeats` times in a row.
    order = [(b["rollout_id"], b["rollout_pass"]) for b in seen + expected]
    assert order[:8] == [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2), (2, 0), (3, 0)]
    by_id = {}
    for b in seen + expected:
        assert by_id.setdefault(b["rollout_id"], b["prompt_index"]) == b["prompt_index"]
    with pytest.raises(ValueError, match="micro_batch_size=2"):
        _loader(9, micro_batch_size=3, seed=1, grad_accum=2, repeats=3).load_state_dict(state)
    with pytest.raises(ValueError, match="cannot fill one micro-batch"):
        _loader(3, micro_batch_size=2, world_size=2)


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("bad_line, message", [
    ('{"prompt": "What is 1 + 2?", "answer": "3"', "malformed JSON"),
    ('["a list"]', "a line must hold a JSON object"),
    ('{"question": "What is 1 + 2?", "answer": "3"}', "needs a field 'prompt'"),
    ('{"prompt": "", "answer": "3"}', "field 'prompt' must be a non-empty string"),
    ('{"prompt": [{"role": "user", "content": 5}], "answer": "3"}', "'prompt'[0]"),
    ('{"prompt": [{"role": "assistant", "content": "hi"}], "answer": "3"}', "field 'prompt' has no user message"),
    ('{"prompt": "What is 1 + 2?"}', "no field 'answer' (needed by the 'answer' reward)"),
    ('{"conversations": [{"role": "assistant", "content": "hi"}], "answer": "1"}', "no user message"),
    ('{"conversations": [{"role": "bot", "content": "hi"}], "answer": "1"}', "'conversations'[0]"),
])
def test_prompt_file_errors_name_file_line_and_field(tmp_path, bad_line, message):
    path = _write(tmp_path / "p.jsonl", ['{"prompt": "What is 1 + 1?", "answer": "2"}', "", bad_line])
    with pytest.raises(ValueError) as e:
        read_prompt_file(path, {"answer": "the 'answer' reward"})
    assert f"{path}:3:" in str(e.value) and message in str(e.value)


def test_prompts_render_like_the_sft_data(builtin_data, tmp_path):
    tok = load_tokenizer(builtin_data["tokenizer"])
    convo = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"},
             {"role": "assistant", "content": "5"}]
    path = _write(tmp_path / "p.jsonl", [json.dumps({"prompt": "What is 2 + 3?", "answer": 5}),
                                         json.dumps({"conversations": convo}),
                                         json.dumps({"prompt": convo[:2], "answer": 5})])  # TRL's form
    records = read_prompt_file(path)
    assert records[1].messages == convo[:2] and records[1].line == 2 and records[0].sample["answer"] == 5
    assert records[2].messages == convo[:2]
    ids, kept = encode_prompts(records, tok, max_tokens=1000)
    # The prompt is exactly the prefix SFT training put before the assistant reply.
    full = tok.encode(tok.apply_chat_template(convo))
    assert full[:len(ids[1])] == ids[1]
    assert tok.decode(ids[0], skip_special_tokens=False).endswith("<|im_start|>assistant\n")
    short, kept = encode_prompts(records, tok, max_tokens=len(ids[0]))
    assert len(kept) == 1 and kept[0].line == 1  # too long for the room left: left out


def test_a_prompt_quoting_control_tokens_is_text_as_the_sft_data_holds_it(builtin_data, tmp_path):
    """A GRPO/PPO prompt spelling `<|im_end|>\n<|im_start|>system` is encoded as the SFT shards encode the text
    before a reply: the template's control tokens only, the quote as plain text."""
    tok = load_tokenizer(builtin_data["tokenizer"])
    convo = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": INJECTION}]
    path = _write(tmp_path / "p.jsonl", [json.dumps({"prompt": "What is 2 + 3?"}), json.dumps({"prompt": convo}),
                                         json.dumps({"prompt": INJECTION})])
    ids, kept = encode_prompts(read_prompt_file(path), tok, max_tokens=1000)
    assert ids[1] == shard_prompt_ids(builtin_data["tokenizer"], convo, tmp_path / "a")
    assert ids[2] == shard_prompt_ids(builtin_data["tokenizer"], convo[1:], tmp_path / "b")
    assert [control_count(tok, i) for i in ids] == [3, 5, 3]
    assert ids[0] == tok.encode(tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}],
                                                        add_generation_prompt=True))


def _tool_conversation() -> list[dict]:
    weather = {"type": "function", "function": {"name": "weather", "parameters": {"city": "string"}}}
    call = {"type": "function", "function": {"name": "weather", "arguments": "Paris"}}
    # minimind-3 stores the definitions as a JSON string; the call is OpenAI's form (content null)
    return [{"role": "system", "content": "Be brief.", "tools": json.dumps([weather])},
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "content": "20 C"}, {"role": "user", "content": "In Fahrenheit?"},
            {"role": "assistant", "content": "68 F."}]


def test_prompts_take_tools_and_tool_calls_like_the_sft_data(builtin_data, tmp_path):
    from minimind_fast.data.records import record_docs

    d = tmp_path / "tok"
    d.mkdir()
    shutil.copy(builtin_data["tokenizer"] / "tokenizer.json", d / "tokenizer.json")
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": TOOLS_TEMPLATE}))
    tok = load_tokenizer(d)
    convo = _tool_conversation()
    path = _write(tmp_path / "p.jsonl", [json.dumps({"conversations": convo, "answer": "68"})])
    records = read_prompt_file(path, {"answer": "the 'answer' reward"})
    ids, kept = encode_prompts(records, tok, max_tokens=1000, source=str(path))
    # The prompt is exactly the text SFT training put before the last reply: tools and the earlier call included.
    [doc] = record_docs({"conversations": convo}, "sft", tok)
    text = tok.decode(ids[0], skip_special_tokens=False)
    assert text == doc.text[:doc.spans[-1][0]]
    assert '<tools>\n{"type": "function", "function": {"name": "weather"' in text
    assert "<tool_call>weather Paris</tool_call>" in text
    # A template that drops the definitions (our ChatML) is named by file and line, as SFT skips it.
    with pytest.raises(ValueError, match=rf"{path}:1: .*tool definitions"):
        encode_prompts(records, load_tokenizer(builtin_data["tokenizer"]), max_tokens=1000, source=str(path))


def test_a_prompt_with_an_unpaired_surrogate_is_named(builtin_data, tmp_path):
    path = _write(tmp_path / "p.jsonl", ['{"prompt": "What is 1 + 1?"}', '{"prompt": "Smile \\ud83d please"}'])
    with pytest.raises(ValueError, match=rf"{path}:2: bad_unicode: unpaired surrogate \\ud83d"):
        encode_prompts(read_prompt_file(path), load_tokenizer(builtin_data["tokenizer"]), 100, str(path))


# ------------------------------------------------------------------------------ runs end to end

def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def grpo_args(init: Path, data: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return ["--init", str(init), "--data", str(data), "--out", str(out), "--steps", str(steps),
            "--seq-len", "128", "--micro-batch-size", "4", "--group-size", "4", "--max-new-tokens", "16",
            "--temperature", "0.8", "--lr", "1e-3", "--save-every", "1000", "--seed", "5", *extra]


def test_resume_continues_exactly(random_init, letter_reward, builtin_data, tmp_path):
    """Rollouts are seeded per (seed, rank, rollout) and the loader resumes at its exact position,
    so a run stopped at a rollout boundary and resumed repeats the uninterrupted run bitwise."""
    data = builtin_data["files"]["grpo_prompts"]
    extra = ("--updates-per-rollout", "2", "--reward", letter_reward)
    run("grpo.py", grpo_args(random_init, data, tmp_path / "full", 6, *extra))
    out = tmp_path / "resumed"
    args = grpo_args(random_init, data, out, 6, *extra)
    run("grpo.py", [*args, "--stop-at-step", "4"])
    assert (out / "checkpoints" / "step_00000004" / "COMPLETE").exists()
    proc = run("grpo.py", args)
    assert "resumed from" in proc.stdout
    full, resumed = metrics(tmp_path / "full"), metrics(out)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "reward_mean", "kl", "clip_fraction", "completion_len"):
        assert [r[key] for r in resumed] == [r[key] for r in full], key
    first = full[0]
    assert first["kl"] == 0.0 and first["ratio_mean"] == 1.0 and first["tokens"] > 0
    assert any(r["clip_fraction"] > 0 for r in full[1::2])  # second passes over a rollout clip
    stats = json.loads((out / "dataset_stats.json").read_text())
    assert stats["kind"] == "prompts" and stats["splits"]["train"]["docs"] == 40
    assert (out / "final" / "model.safetensors").exists() and (out / "final" / "tokenizer.json").exists()


@pytest.mark.parametrize("bad, message", [
    ("json", ":2: malformed JSON"),
    ("answer", ":2: no field 'answer' (needed by the 'answer' reward)"),
    ("reward", "unknown reward 'nope'"),
    ("init", "needs --init"),
    ("temperature", "--temperature must be > 0"),
])
def test_bad_inputs_fail_before_training(bad, message, random_init, tmp_path):
    lines = ['{"prompt": "What is 1 + 1?", "answer": "2"}', '{"prompt": "What is 2 + 2?", "answer": "4"}']
    extra = []
    if bad == "json":
        lines[1] = '{"prompt": "What is 2 + 2?" "answer": "4"}'
    elif bad == "answer":
        lines[1] = '{"prompt": "What is 2 + 2?"}'
    elif bad == "reward":
        extra = ["--reward", "nope"]
    elif bad == "temperature":
        extra = ["--temperature", "0"]
    data = _write(tmp_path / "prompts.jsonl", lines)
    args = grpo_args(random_init, data, tmp_path / "run", 2, "--micro-batch-size", "1", *extra)
    if bad == "init":
        args = args[2:]
    proc = run("grpo.py", args, check=False)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert message in proc.stderr, proc.stderr[-2000:]
    if bad in ("json", "answer"):
        assert f"{data}:2:" in proc.stderr


@pytest.mark.parametrize("flags, message", [
    (["--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
    (["--top-k", "-1"], "--top-k must be >= 0"),
    (["--kl-beta", "nan"], "--kl-beta must be >= 0 and finite, got nan"),
    (["--temperature", "nan"], "--temperature must be > 0"),
])
def test_sampling_and_kl_flags_are_checked_before_the_model_loads(flags, message):
    """--top-p 0 and --top-k -1 were refused only by the sampler at the first step (after the model and
    DeepSpeed were up); a NaN --kl-beta or --temperature passed and made every loss NaN."""
    from minimind_fast.training.args import training_parser
    from minimind_fast.training.grpo import GRPOStage

    parser = training_parser("grpo", "grpo")
    GRPOStage.add_arguments(parser)
    stage = GRPOStage(parser.parse_args(["--data", "unused", "--out", "unused", *flags]))
    with pytest.raises(ValueError) as error:
        stage._check_flags()
    assert message in str(error.value)


@pytest.mark.slow
def test_grpo_raises_the_mean_reward_on_the_builtin_prompts(sft_run, builtin_data, tmp_path):
    """Answer + format reward over 30 steps: the last third's mean reward beats the first third's.

    The tiny model cannot add yet, so the rise comes mostly from the format reward (its partial
    credit is what the policy climbs); with the advantage sign flipped the same run's reward falls
    to ~0, and with a zero learning rate it stays flat, so the check is not a given.
    """
    out = tmp_path / "grpo"
    args = grpo_args(sft_run, builtin_data["files"]["grpo_prompts"], out, 30, "--group-size", "8",
                     "--max-new-tokens", "48", "--updates-per-rollout", "2", "--seed", "1",
                     "--reward", "answer", "--reward", "format")
    run("grpo.py", args)
    records = metrics(out)
    rewards = [r["reward_mean"] for r in records]
    first, last = sum(rewards[:10]) / 10, sum(rewards[-10:]) / 10
    assert last > first + 0.1, rewards
    assert all({"reward_std", "reward_answer", "reward_format", "kl", "clip_fraction", "completion_len"} <= set(r)
               for r in records)
    assert max(r["kl"] for r in records) > 0  # the policy moved away from the reference


@pytest.mark.slow
def test_two_ranks_zero3_sample_and_train_like_zero0(random_init, letter_reward, builtin_data, tmp_path):
    """Under ZeRO-3 every rank gathers the partitioned weights to sample; the run must match ZeRO-0's."""
    runs = {}
    for stage in (0, 3):
        out = tmp_path / f"zero{stage}"
        args = grpo_args(random_init, builtin_data["files"]["grpo_prompts"], out, 3, "--zero-stage", str(stage),
                         "--micro-batch-size", "2", "--updates-per-rollout", "2", "--reward", letter_reward)
        run("grpo.py", args, launcher=two_ranks(29650 + stage))
        runs[stage] = metrics(out)
    for a, b in zip(runs[0], runs[3]):
        assert a["reward_mean"] == b["reward_mean"] and a["completion_len"] == b["completion_len"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6)


def _grpo_stage(init: Path, data: Path, *flags: str, resume: Path | None = None):
    """A GRPO stage set up as the engine does before DeepSpeed (data, model, setup), without training."""
    from minimind_fast.training.args import training_parser
    from minimind_fast.training.grpo import GRPOStage

    parser = training_parser("grpo", "grpo")
    GRPOStage.add_arguments(parser)
    stage = GRPOStage(parser.parse_args(["--init", str(init), "--data", str(data), "--out", "unused",
                                         "--kernels", "reference", "--seq-len", "128", "--max-new-tokens", "16",
                                         *flags]))
    stage.resume_from = resume
    manifest = stage.open_data(data)
    stage.setup(stage.build_model(manifest))
    return stage


def test_resume_refuses_another_objective(random_init, builtin_data, tmp_path):
    """A checkpoint records the reference's weights, the rewards and the sampling settings; a resume with
    other ones would continue another objective from the checkpoint's optimizer state and position."""
    data = builtin_data["files"]["grpo_prompts"]
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    _grpo_stage(random_init, data).save_extra(None, ckpt)
    _grpo_stage(random_init, data, "--reward", "format", "--reward", "answer", resume=ckpt)  # same, reordered
    other_init = tmp_path / "other"
    torch.manual_seed(1)
    save_model_dir(MiniMindForCausalLM(load_model(random_init).config), other_init,
                   tokenizer_dir=builtin_data["tokenizer"])
    for flags, what in [(("--kl-beta", "0.1"), "--kl-beta"), (("--reward", "answer"), "--reward"),
                        (("--temperature", "0.7"), "--temperature"), (("--group-size", "8"), "--group-size"),
                        (("--updates-per-rollout", "2"), "--updates-per-rollout"),
                        (("--missing-eos-penalty", "1"), "--missing-eos-penalty")]:
        with pytest.raises(ValueError, match=f"trained with another GRPO objective \\({what}"):
            _grpo_stage(random_init, data, *flags, resume=ckpt)
    with pytest.raises(ValueError, match="another GRPO objective \\(the reference's weights"):
        _grpo_stage(other_init, data, resume=ckpt)


def test_reused_rollouts_refuse_dropout(random_init, builtin_data):
    """logp_old is taken from the first update's forward: with dropout the later updates' ratio would
    move with each new mask, the weights unchanged."""
    data = builtin_data["files"]["grpo_prompts"]
    with pytest.raises(ValueError, match="--updates-per-rollout 2 compares .* dropout 0.1 .* pass --dropout 0"):
        _grpo_stage(random_init, data, "--dropout", "0.1", "--updates-per-rollout", "2")
    stage = _grpo_stage(random_init, data, "--dropout", "0.1")  # one update per rollout: the ratio is 1
    assert stage.reference.config.dropout == 0.1


def test_missing_eos_penalty_lowers_only_completions_cut_before_their_stop_token(random_init, letter_reward,
                                                                                 builtin_data, monkeypatch):
    """--missing-eos-penalty P: a completion that ran to --max-new-tokens without its stop token loses P
    from its total reward, a finished one keeps it, and `truncated` is the share cut. The decoder is
    replaced by fixed completions so that both kinds are there."""
    import minimind_fast.training.grpo as grpo

    data = builtin_data["files"]["grpo_prompts"]
    stages = {p: _grpo_stage(random_init, data, "--reward", letter_reward, "--micro-batch-size", "2",
                             "--missing-eos-penalty", p) for p in ("0", "1.5")}
    eos = stages["0"].tokenizer.eos_token_id
    letters = stages["0"].tokenizer.encode("eee")
    # group size 4 x 2 prompts; rows 1, 2, 6 are cut (no stop token at the end)
    fixed = [letters + [eos], letters, [7, 8, 9], [eos], letters + [eos], [9, eos], letters + [5], [eos]]
    monkeypatch.setattr(grpo, "generate", lambda model, prompts, config, **kw: [list(c) for c in fixed])
    batch = next(iter(stages["0"].build_loader(data, split="train", rank=0, world_size=1, vocab_size=1024)))
    rollouts = {p: stage._sample(stage.reference, batch) for p, stage in stages.items()}
    cut = torch.tensor([0, 1, 1, 0, 0, 0, 1, 0], dtype=torch.float32)
    plain = rollouts["0"].rewards
    assert plain.max() > 0  # the letter reward is not zero everywhere, so an offset would show
    torch.testing.assert_close(rollouts["1.5"].rewards, plain - 1.5 * cut, rtol=0, atol=1e-6)
    assert rollouts["0"].metrics["truncated"] == rollouts["1.5"].metrics["truncated"] == 3 / 8
    with pytest.raises(ValueError, match="--missing-eos-penalty must be >= 0 and finite, got -1.0"):
        _grpo_stage(random_init, data, "--missing-eos-penalty", "-1")


@pytest.mark.parametrize("name", ["mean", "std"])
def test_a_user_reward_may_not_take_the_name_of_the_totals_metrics(name, random_init, builtin_data, tmp_path):
    """Each reward's raw mean is logged as reward_<name>, beside the totals' reward_mean and reward_std: a
    function called `mean` or `std` overwrote them (reward_mean logged 5 where every total was 0)."""
    path = tmp_path / "clash.py"
    path.write_text(f"def {name}(completion, sample):\n    return 5.0\n")
    with pytest.raises(ValueError, match=f"a reward named '{name}' would be logged as reward_{name}, "):
        _grpo_stage(random_init, builtin_data["files"]["grpo_prompts"], "--reward", f"{path}:{name}:0")


def _user_reward_and_checkpoint_dir(tmp_path):
    """(a user reward file, its --reward spec, an empty directory to save a stage's objective in)."""
    reward = tmp_path / "mine.py"
    reward.write_text("def mine(completion, sample):\n    return 1.0\n")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    return reward, f"{reward}:mine", ckpt


def test_resume_refuses_an_edited_user_reward(random_init, builtin_data, tmp_path, capsys):
    """A user --reward's file is part of the objective: the same spec over edited code is another reward
    function, refused on resume naming it; a checkpoint from before the source was recorded resumes with a
    note, and one with only shipped rewards needs no record."""
    data = builtin_data["files"]["grpo_prompts"]
    reward, spec, ckpt = _user_reward_and_checkpoint_dir(tmp_path)
    _grpo_stage(random_init, data, "--reward", spec).save_extra(None, ckpt)
    _grpo_stage(random_init, data, "--reward", spec, resume=ckpt)  # unchanged
    reward.write_text("def mine(completion, sample):\n    return -10.0\n")
    with pytest.raises(ValueError, match=f"another GRPO objective \\(the source of --reward {spec} differ"):
        _grpo_stage(random_init, data, "--reward", spec, resume=ckpt)

    record = json.loads((ckpt / "objective.json").read_text())
    (ckpt / "objective.json").write_text(json.dumps({k: v for k, v in record.items() if k != "reward_sources"}))
    capsys.readouterr()
    _grpo_stage(random_init, data, "--reward", spec, resume=ckpt)  # written before the record: cannot tell
    assert f"{ckpt} does not record the source of --reward (written before" in capsys.readouterr().out
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    _grpo_stage(random_init, data).save_extra(None, shipped)
    record = json.loads((shipped / "objective.json").read_text())
    assert record["reward_sources"] is None
    (shipped / "objective.json").write_text(json.dumps({k: v for k, v in record.items() if k != "reward_sources"}))
    _grpo_stage(random_init, data, resume=shipped)
    assert "not checked" not in capsys.readouterr().out


def test_resume_compares_the_rewards_as_parsed_not_as_typed(random_init, builtin_data, tmp_path):
    """`--reward f.py:fn:1` is `--reward f.py:fn` (weight 1 is the default), and `answer:1.0` is `answer`: a
    resume that spells the same rewards another way continues the run; another weight is refused. A checkpoint
    records the specs as typed, so one written before the comparison parsed them resumes alike."""
    data = builtin_data["files"]["grpo_prompts"]
    reward, spec, ckpt = _user_reward_and_checkpoint_dir(tmp_path)
    _grpo_stage(random_init, data, "--reward", spec, "--reward", "answer").save_extra(None, ckpt)
    assert json.loads((ckpt / "objective.json").read_text())["reward"] == sorted([spec, "answer"])
    _grpo_stage(random_init, data, "--reward", f"{spec}:1", "--reward", "answer:1.0", resume=ckpt)
    _grpo_stage(random_init, data, "--reward", "answer:1e0", "--reward", f"{spec}:1.", resume=ckpt)
    for flags in (("--reward", f"{spec}:2", "--reward", "answer"), ("--reward", spec, "--reward", "answer:0.5"),
                  ("--reward", spec)):
        with pytest.raises(ValueError, match="trained with another GRPO objective \\(--reward differ"):
            _grpo_stage(random_init, data, *flags, resume=ckpt)
    defaults = tmp_path / "defaults"  # no --reward: the shipped answer and format, each of weight 1
    defaults.mkdir()
    _grpo_stage(random_init, data).save_extra(None, defaults)
    _grpo_stage(random_init, data, "--reward", "format:1", "--reward", "answer", resume=defaults)
