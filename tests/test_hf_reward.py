"""Hugging Face sequence-classification reward models as `--reward-model`: tiny Llama reward models built
here (no network) with a tokenizer and chat template of their own, another vocabulary than the policy's.
Their scores against the model's own forward on `apply_chat_template(tokenize=True)` one sequence at a
time in float64, the left cut of an over-long conversation, the refusals, and GRPO scored by them."""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from launch_helpers import records, run
from safetensors.torch import load_file, save_file
from test_stage_grpo import _grpo_stage

from minimind_fast.data.tokenizer import load_tokenizer
from minimind_fast.training.hf_reward import HFRewardScorer
from minimind_fast.training.reward_model import load_model_reward

RM_MAX_POSITIONS = 128
TEMPLATE = "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{{ eos_token }}{% endfor %}"
PROMPTS = [[{"role": "user", "content": "What is 4 + 21?"}],
           [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 7 + 5?"}],
           [{"role": "user", "content": "What is 3 + 3?"}, {"role": "assistant", "content": "6"},
            {"role": "user", "content": "And 3 + 4?"}]]
REPLIES = ["25", "<think>7 + 5 = 12</think>\n<answer>12</answer>", "It is 7, I think, but I would check that again."]


# ------------------------------------------------------------------------------------- the models

def rm_tokenizer(texts: list[str], template: str | None = TEMPLATE, pad: str | None = "<pad>"):
    """A byte-level BPE of ~300 ids (the policy's has 1024) whose post-processor adds <s>, as Llama's does,
    so a second BOS would show."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                pad_token=pad, chat_template=template)


def save_rm(out: Path, tokenizer, seed: int, **config) -> Path:
    """A 2-layer Llama reward model (one label) with `tokenizer`, saved as safetensors."""
    torch.manual_seed(seed)
    config = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "intermediate_size": 64, "vocab_size": len(tokenizer), "num_labels": 1, "initializer_range": 0.2,
              "max_position_embeddings": RM_MAX_POSITIONS, "pad_token_id": tokenizer.pad_token_id, **config}
    transformers.LlamaForSequenceClassification(transformers.LlamaConfig(**config)).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def corpus(builtin_data) -> list[str]:
    lines = Path(builtin_data["files"]["sft"]).read_text().splitlines()
    return [m["content"] for line in lines for m in json.loads(line)["conversations"]] + REPLIES


@pytest.fixture(scope="module")
def hf_rm(corpus, tmp_path_factory) -> Path:
    return save_rm(tmp_path_factory.mktemp("hf_rm") / "rm", rm_tokenizer(corpus), seed=0)


@pytest.fixture(scope="module")
def policy_tok(builtin_data):
    return load_tokenizer(builtin_data["tokenizer"])


def reference_scores(rm_dir: Path, prompts: list[list[dict]], replies: list[str], keep: int | None = None
                     ) -> list[float]:
    """Each conversation alone through the model's own float64 forward, encoded by transformers'
    apply_chat_template(tokenize=True) (its last `keep` ids)."""
    tok = transformers.AutoTokenizer.from_pretrained(rm_dir)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(rm_dir).double().eval()
    scores = []
    for messages, reply in zip(prompts, replies):
        ids = tok.apply_chat_template([*messages, {"role": "assistant", "content": reply}], tokenize=True,
                                      return_dict=True)["input_ids"]
        assert ids[0] == tok.bos_token_id != ids[1]  # the template's BOS, and no second one
        with torch.no_grad():
            scores.append(model(torch.tensor([ids[-keep:] if keep else ids])).logits[0, 0].item())
    return scores


def sampled(policy_tok, reply: str) -> list[int]:
    """The reply as GRPO hands it over: the policy's ids, through its stop token."""
    return [*policy_tok.encode(reply), policy_tok.eos_token_id]


# ----------------------------------------------------------------------------------------- scores

@pytest.mark.parametrize("config_pad", [True, False], ids=["config_pad", "tokenizer_pad"])
def test_scores_equal_the_models_own_forward_one_by_one(config_pad, hf_rm, corpus, policy_tok, tmp_path):
    """The policy's sampled ids (stop token, and a special token inside the reply, dropped) are scored as
    the reward model scores their text alone; batched (right-padded, lengths differing) as one by one. A
    config without pad_token_id takes the tokenizer's, and its forward one sequence at a time (which needs
    none) is the reference."""
    rm_dir = hf_rm if config_pad else save_rm(tmp_path / "no_pad", rm_tokenizer(corpus), 0, pad_token_id=None)
    scorer = HFRewardScorer(rm_dir, policy_tok)
    assert scorer.pad_id == scorer.tokenizer.pad_token_id and scorer.pad_chosen is not config_pad
    want = reference_scores(rm_dir, PROMPTS, REPLIES)
    assert max(want) - min(want) > 0.05  # scores that differ, so a mix-up of rows would show
    ids = [sampled(policy_tok, r) for r in REPLIES]
    ids[2] = [*policy_tok.encode("It is 7, I think,"), policy_tok.bos_token_id,
              *policy_tok.encode(" but I would check that again."), policy_tok.eos_token_id]
    lengths = [len(scorer.sequence_ids(m, c)) for m, c in zip(PROMPTS, ids)]
    assert len(set(lengths)) == 3 and max(lengths) <= RM_MAX_POSITIONS  # padding matters, no cut yet
    for batch_size in (3, 1):
        torch.testing.assert_close(torch.tensor(scorer.score(PROMPTS, ids, batch_size=batch_size)),
                                   torch.tensor(want), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(scorer.score(PROMPTS, REPLIES)), torch.tensor(want), atol=1e-5, rtol=0)


def test_an_over_long_conversation_keeps_its_end(hf_rm, policy_tok, tmp_path):
    """Longer than the model's max_position_embeddings (128), or than the tokenizer's model_max_length where
    it sets one (40), a conversation is cut from the left: its score is the forward of its last ids, batched
    with a short one as alone."""
    long_reply = " ".join(str(n) for n in range(80))
    prompts, replies = [PROMPTS[0], PROMPTS[1]], [long_reply, REPLIES[1]]
    limited = tmp_path / "limited"
    shutil.copytree(hf_rm, limited)
    config_file = limited / "tokenizer_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "model_max_length": 40}))
    for rm_dir, keep in ((hf_rm, RM_MAX_POSITIONS), (limited, 40)):
        scorer = HFRewardScorer(rm_dir, policy_tok)
        assert scorer.max_length == keep
        full = scorer.sequence_ids(prompts[0], long_reply, truncate=False)
        assert len(full) > RM_MAX_POSITIONS and scorer.sequence_ids(prompts[0], long_reply) == full[-keep:]
        want = reference_scores(rm_dir, prompts, replies, keep=keep)  # the second too, at 40
        got = scorer.score(prompts, [sampled(policy_tok, r) for r in replies])
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=1e-5, rtol=0)
    uncut = reference_scores(hf_rm, prompts[:1], replies[:1])[0]
    assert abs(uncut - want[0]) > 1e-3  # the cut changed the score: the test would see a missing one


def test_in_the_policys_bfloat16_it_scores_as_transformers_loads_it_in_bfloat16(corpus, policy_tok, tmp_path):
    """GRPO moves the scorer to the policy's dtype. Only the weights take it: transformers computes RoPE's
    frequencies in float32 and keeps them so in a bfloat16 model; rounded to bfloat16 they moved the score of a
    2000-token conversation by about a unit (0.03 is bfloat16's own error here)."""
    rm_dir = save_rm(tmp_path / "long", rm_tokenizer(corpus), 0, hidden_size=256, num_attention_heads=2,
                     intermediate_size=256, max_position_embeddings=4096, initializer_range=0.1)
    scorer = HFRewardScorer(rm_dir, policy_tok).to("cpu", torch.bfloat16)
    vocab = len(scorer.tokenizer)
    rows = [torch.randint(3, vocab, (2000 - 300 * i,), generator=torch.Generator().manual_seed(i)).tolist()
            for i in range(3)]
    got = torch.tensor(scorer.score_ids(rows))
    own = transformers.AutoModelForSequenceClassification.from_pretrained(rm_dir, dtype=torch.bfloat16).eval()
    exact = transformers.AutoModelForSequenceClassification.from_pretrained(rm_dir, dtype=torch.float64).eval()
    with torch.no_grad():
        want = torch.tensor([own(torch.tensor([r])).logits[0, 0].float().item() for r in rows])
        want64 = torch.tensor([exact(torch.tensor([r])).logits[0, 0].item() for r in rows])
    torch.testing.assert_close(want, want64.float(), atol=0.1, rtol=0)  # bfloat16's own error is small here
    torch.testing.assert_close(got, want, atol=0.02, rtol=0)


# --------------------------------------------------------------------------------------- refusals

def _edit_json(path: Path, **fields) -> None:
    data = json.loads(path.read_text())
    data.update(fields)
    path.write_text(json.dumps(data))


def broken_copies(hf_rm: Path, corpus: list[str], root: Path) -> list[tuple[Path, str]]:
    """(a reward model dir with one problem, the message expected)."""
    def copy(name: str) -> Path:
        shutil.copytree(hf_rm, root / name)
        return root / name

    two_labels = copy("two_labels")
    _edit_json(two_labels / "config.json", id2label={"0": "bad", "1": "good"}, label2id={"bad": 0, "good": 1})
    pickled = copy("pickled")
    state = transformers.AutoModelForSequenceClassification.from_pretrained(hf_rm).state_dict()
    torch.save(state, pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    headless = copy("headless")
    weights = load_file(headless / "model.safetensors")
    save_file({k: v for k, v in weights.items() if k != "score.weight"}, headless / "model.safetensors")
    no_template = copy("no_template")
    (no_template / "chat_template.jinja").unlink()
    _edit_json(no_template / "tokenizer_config.json", chat_template=None)
    no_tokenizer = copy("no_tokenizer")
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (no_tokenizer / f).unlink()
    causal = copy("causal_lm")
    _edit_json(causal / "config.json", architectures=["LlamaForCausalLM"])
    remote = copy("remote")
    _edit_json(remote / "config.json", architectures=["InternLM2ForSequenceClassification"], model_type="internlm2",
               auto_map={"AutoModelForSequenceClassification": "modeling_internlm2.InternLM2ForSequenceClassification"})
    # No pad id anywhere: eos would be chosen, and the template ends every conversation with it.
    eos_pad = save_rm(root / "eos_pad", rm_tokenizer(corpus, pad=None), 0, pad_token_id=None)
    return [(two_labels, r"two_labels/config.json: num_labels is 2 \(the field num_labels, or the entries of "
                         r"id2label\)"),
            (pickled, "weights only as pytorch_model.bin, a pickle, .* convert them to model.safetensors"),
            (headless, "headless: weights missing from its safetensors .* at random: score.weight"),
            (no_template, "no_template: its tokenizer has no chat template .* add the template"),
            (no_tokenizer, "no_tokenizer: no tokenizer .*reads text encoded with its own"),
            (causal, r"causal_lm/config.json: architectures \['LlamaForCausalLM'\] names no "
                     r"\*ForSequenceClassification"),
            (remote, "InternLM2ForSequenceClassification is not a class of transformers .* runs no remote code"),
            (eos_pad, r"eos_pad/config.json: no pad_token_id, and the chat template ends each conversation .* set "
                      "pad_token_id")]


def test_problems_are_refused_at_start_up_naming_the_file(hf_rm, corpus, policy_tok, tmp_path):
    for path, message in broken_copies(hf_rm, corpus, tmp_path):
        with pytest.raises(ValueError, match=f"--reward-model {path}:2: .*{message}"):
            load_model_reward(f"{path}:2", policy_tok, 128, "reference", PROMPTS[:1])
    # A template that cannot render one of the run's prompts (the second: it has a system message), as Gemma's
    no_system = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}" + TEMPLATE
    strict = save_rm(tmp_path / "strict", rm_tokenizer(corpus, template=no_system), 0)
    with pytest.raises(ValueError, match="prompt 2 of the run: .*strict: its chat template failed on a conversation "
                                         ".*no system role"):
        load_model_reward(str(strict), policy_tok, 128, "reference", PROMPTS)
    reward = load_model_reward(f"{hf_rm}:2", policy_tok, 128, "reference", PROMPTS)  # the unbroken original
    assert isinstance(reward.scorer, HFRewardScorer) and reward.weight == 2


def test_a_transformers_release_that_scores_before_the_first_pad_is_refused(hf_rm, policy_tok, monkeypatch):
    """Before 4.49 a reward model read its score before the first pad token: where the pad id also ends an
    earlier turn, that is the wrong position, so such a release is refused, naming the one needed."""
    # The module `import transformers` gives now: transformers' lazy loading may have replaced this file's.
    monkeypatch.setattr(importlib.import_module("transformers"), "__version__", "4.48.3")
    with pytest.raises(ValueError, match=r"needs transformers>=4.49 \(this is 4.48.3"):
        load_model_reward(str(hf_rm), policy_tok, 128, "reference", PROMPTS[:1])


# ------------------------------------------------------------------------------------------ in GRPO



def test_grpo_rewards_are_the_hf_models_scores(hf_rm, random_init, letter_reward, builtin_data):
    """Each completion's reward is the letter reward plus 2 x the HF model's own forward of its prompt and
    reply (decoded from the sampled ids, rendered with the reward model's template)."""
    data = builtin_data["files"]["grpo_prompts"]
    stage = _grpo_stage(random_init, data, "--reward", letter_reward, "--reward-model", f"{hf_rm}:2",
                        "--micro-batch-size", "2", "--group-size", "2", "--updates-per-rollout", "2")
    model = stage.reference  # the KL reference: a frozen copy of the policy's starting weights
    batch = next(iter(stage.build_loader(data, split="train", rank=0, world_size=1, vocab_size=1024)))
    _, metrics = stage.compute_loss(model, batch)
    r = stage.buffer[batch["rollout_id"]]
    completions = [t[m].tolist() for t, m in zip(r.targets, r.mask)]
    replies = [stage.tokenizer.decode(c[:-1] if c[-1] == stage.tokenizer.eos_token_id else c) for c in completions]
    messages = [stage.messages[i] for i in batch["prompt_index"] for _ in range(2)]
    scores = reference_scores(hf_rm, messages, replies, keep=RM_MAX_POSITIONS)
    letters = [stage.tokenizer.decode(c).count("e") / 4 for c in completions]
    torch.testing.assert_close(r.rewards, torch.tensor([x + 2 * s for x, s in zip(letters, scores)]),
                               atol=1e-5, rtol=0)
    assert metrics["reward_model"] == pytest.approx(sum(scores) / 4, abs=1e-5)


def test_grpo_run_logs_the_hf_reward_model(hf_rm, random_init, builtin_data, tmp_path):
    """launch/grpo.py with an HF reward model alone: the total reward is its weight times the score."""
    out = tmp_path / "grpo"
    run("grpo.py", ["--init", str(random_init), "--data", str(builtin_data["files"]["grpo_prompts"]),
                    "--out", str(out), "--steps", "2", "--seq-len", "128", "--micro-batch-size", "2",
                    "--group-size", "2", "--max-new-tokens", "16", "--save-every", "1000", "--seed", "1",
                    "--reward-model", f"{hf_rm}:0.5"])
    logged = records(out)
    assert [r["step"] for r in logged] == [1, 2]
    for r in logged:
        assert "reward_answer" not in r and r["reward_mean"] == pytest.approx(0.5 * r["reward_model"], abs=1e-6)


def test_resume_refuses_another_hf_reward_model(hf_rm, corpus, random_init, builtin_data, tmp_path):
    """The checkpoint records the reward model's weights: the same model copied elsewhere resumes, one with
    other weights (same architecture and tokenizer) is refused."""
    data = builtin_data["files"]["grpo_prompts"]
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    _grpo_stage(random_init, data, "--reward-model", str(hf_rm)).save_extra(None, ckpt)
    moved = shutil.copytree(hf_rm, tmp_path / "moved")
    _grpo_stage(random_init, data, "--reward-model", str(moved), resume=ckpt)
    other = save_rm(tmp_path / "other", rm_tokenizer(corpus), seed=1)
    with pytest.raises(ValueError, match=r"trained with another GRPO objective \(--reward-model"):
        _grpo_stage(random_init, data, "--reward-model", str(other), resume=ckpt)
