"""A Hugging Face sequence-classification reward model (Skywork-Reward-Llama, a `*ForSequenceClassification`
trained with TRL's RewardTrainer, ...) as GRPO's and PPO's `--reward-model PATH[:WEIGHT]`.

It reads text, not the policy's ids: each sampled completion is decoded with the policy's tokenizer (the
stop token dropped, special tokens skipped), the prompt's messages plus that reply are rendered with the
reward model's own chat template and encoded with its own tokenizer, without adding special tokens (the
template writes them, as `apply_chat_template(tokenize=True)` assumes). So text that spells one of its
special tokens is read as that token, as that call and TRL's RewardTrainer read it when the model was trained;
the rule minimind_fast's own data and reward model follow (such text is text: `pipeline.doc_ids`) is not
applied to a foreign tokenizer, whose training read it otherwise. The score is the model's single
logit, which decoder models read at the last token that is not `pad_token_id`: so a sequence longer than
the model's maximum length keeps its end (cut from the left), and a batch is right-padded with exactly
that id, which makes each row's score its score alone.

Only safetensors weights and the transformers library's own classes are loaded: a pickle
(`pytorch_model.bin`) could run code, and so would a model's own modelling code (`trust_remote_code`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from minimind_fast.checkpoint import weights_fingerprint
from minimind_fast.data.records import conversation_tools
from minimind_fast.data.tokenizer import ChatTokenizer
from minimind_fast.training.rewards import ReplyScorer

HF_CONFIG = "config.json"
SAFETENSORS = ("model.safetensors", "model.safetensors.index.json")
PICKLED = ("pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spm.model", "sentencepiece.bpe.model")
SEQ_CLS = "ForSequenceClassification"
# transformers stands int(1e30) in for "no limit" in model_max_length; anything this large is no limit either
UNBOUNDED_LENGTH = 10 ** 8
# Config fields that say where and how the model was loaded, not what it computes: a copy of the same
# model elsewhere, or read by another transformers release, is the same reward.
LOAD_FIELDS = ("_name_or_path", "transformers_version", "use_cache", "_attn_implementation_autoset")


# From 4.49 a *ForSequenceClassification model reads its score at the last token that is not padding;
# before, at the one before the first pad: early, where the pad id (often end-of-turn) also ends a turn.
MIN_TRANSFORMERS = (4, 49)


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ValueError("a Hugging Face reward model needs the transformers library: "
                         "pip install 'minimind_fast[hf]' (transformers>=4.49)") from None
    if _version(transformers.__version__) < MIN_TRANSFORMERS:
        raise ValueError(f"a Hugging Face reward model needs transformers>=4.49 (this is "
                         f"{transformers.__version__}, whose reward models read the score before the first pad "
                         f"token, not after the last real one): pip install -U 'minimind_fast[hf]'")
    return transformers


def _version(text: str) -> tuple[int, int]:
    """(major, minor) of a release string such as 4.56.0 or 5.0.0rc1."""
    major, minor = text.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def _read_config(model_dir: Path) -> Any:
    """The model's config, checked: one `*ForSequenceClassification` of the transformers library, one label."""
    transformers = _transformers()
    path = model_dir / HF_CONFIG
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{path}: not readable JSON ({e})") from None
    archs = raw.get("architectures") or []
    seq_cls = [a for a in archs if isinstance(a, str) and a.endswith(SEQ_CLS)]
    if not seq_cls:
        raise ValueError(f"{path}: architectures {archs} names no *{SEQ_CLS} model; a reward model scores a "
                         "sequence with a classification head of one label")
    if not hasattr(transformers, seq_cls[0]):
        raise ValueError(f"{path}: architecture {seq_cls[0]} is not a class of transformers "
                         f"{transformers.__version__}: it needs the model's own code (auto_map), and minimind_fast "
                         "runs no remote code (trust_remote_code)")
    try:
        config = transformers.AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    except (ValueError, KeyError, OSError) as e:
        raise ValueError(f"{path}: transformers {transformers.__version__} cannot read it without the model's "
                         f"own code, which minimind_fast does not run (trust_remote_code): {e}") from None
    if config.num_labels != 1:
        raise ValueError(f"{path}: num_labels is {config.num_labels} (the field num_labels, or the entries of "
                         "id2label); a reward model has one label, its score")
    return config


def _check_weights(model_dir: Path) -> None:
    if any((model_dir / name).exists() for name in SAFETENSORS):
        return
    pickled = [name for name in PICKLED if (model_dir / name).exists()]
    if pickled:
        raise ValueError(f"{model_dir}: weights only as {pickled[0]}, a pickle, which minimind_fast does not load "
                         "(it can run code): convert them to model.safetensors")
    raise ValueError(f"{model_dir}: no weights ({' or '.join(SAFETENSORS)})")


def _load_model(model_dir: Path, config: Any) -> Any:
    """The model in its checkpoint's own dtype (the policy's is applied by `to`), every weight from the file:
    transformers would start a missing one (a causal LM's weights under a classification config leave the
    score head out) from random numbers, and score with it."""
    transformers = _transformers()
    dtype_key = "dtype" if _version(transformers.__version__) >= (4, 56) else "torch_dtype"  # renamed in 4.56
    try:
        model, info = transformers.AutoModelForSequenceClassification.from_pretrained(
            model_dir, config=config, use_safetensors=True, trust_remote_code=False, output_loading_info=True,
            **{dtype_key: "auto"})
    except Exception as e:  # a truncated file, a class that does not take this config, ...
        raise ValueError(f"{model_dir}: the model does not load ({type(e).__name__}: {e})") from None
    absent = sorted(info.get("missing_keys") or []) + [str(k) for k in info.get("mismatched_keys") or []]
    if absent:
        raise ValueError(f"{model_dir}: weights missing from its safetensors or of another shape, which "
                         f"transformers would draw at random: {', '.join(absent[:5])}"
                         f"{f' and {len(absent) - 5} more' if len(absent) > 5 else ''}")
    return model


def _load_tokenizer(model_dir: Path) -> Any:
    """The reward model's own tokenizer, with a chat template."""
    transformers = _transformers()
    if not any((model_dir / name).exists() for name in TOKENIZER_FILES):
        raise ValueError(f"{model_dir}: no tokenizer (none of {', '.join(TOKENIZER_FILES)}); the reward model "
                         "reads text encoded with its own")
    try:
        tok = transformers.AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    except Exception as e:  # whatever a foreign tokenizer's loading raises, say whose it was
        raise ValueError(f"{model_dir}: its tokenizer does not load ({type(e).__name__}: {e})") from None
    if not tok.chat_template:
        raise ValueError(f"{model_dir}: its tokenizer has no chat template (tokenizer_config.json chat_template "
                         "or chat_template.jinja), so how it reads a conversation is unknown: add the template "
                         "the reward model was trained with")
    return tok


def _max_length(tokenizer: Any, config: Any, model_dir: Path) -> int:
    """The longest sequence the model reads: the tokenizer's model_max_length where it sets one, and no more
    than the config's max_position_embeddings."""
    limits = [n for n in (tokenizer.model_max_length, getattr(config, "max_position_embeddings", None))
              if isinstance(n, int) and 0 < n < UNBOUNDED_LENGTH]
    if not limits:
        raise ValueError(f"{model_dir}: no maximum length (model_max_length in tokenizer_config.json, or "
                         f"max_position_embeddings in {HF_CONFIG}): set model_max_length")
    return min(limits)


class HFRewardScorer(ReplyScorer):
    """A Hugging Face sequence-classification reward model that scores (prompt messages, reply) pairs:
    frozen, eval mode, no_grad; the policy's replies reach it as text."""

    def __init__(self, path: str | Path, policy_tokenizer: ChatTokenizer):
        self.path = self.model_dir = Path(path)
        self.policy_tokenizer = policy_tokenizer
        config = _read_config(self.model_dir)
        _check_weights(self.model_dir)
        self.tokenizer = _load_tokenizer(self.model_dir)
        self.max_length = _max_length(self.tokenizer, config, self.model_dir)
        model = _load_model(self.model_dir, config)
        self.pad_chosen = self._set_pad_id(model.config)
        model.config.use_cache = False
        self.model = model.requires_grad_(False).eval()

    def _set_pad_id(self, config: Any) -> bool:
        """The id batches are padded with, which the model skips to find each row's last token: the config's,
        else (set into the config) the tokenizer's pad or eos token. True when chosen here."""
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        if text_config.pad_token_id is not None:
            self.pad_id = text_config.pad_token_id
            return False
        tok = self.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        if self.pad_id is None:
            raise ValueError(f"{self.model_dir / HF_CONFIG}: no pad_token_id, and its tokenizer has no pad or eos "
                             "token to batch with: set pad_token_id")
        config.pad_token_id = text_config.pad_token_id = self.pad_id
        return True

    def check(self, prompts: list[list[dict]]) -> None:
        """Refuse at start-up what would fail or mis-score mid-run: a template that cannot render one of the
        run's prompts (each is rendered once: a string, cheap beside a rollout), or a pad id chosen here that
        ends every conversation (the model would take it for padding and read its score one token early)."""
        for i, messages in enumerate(prompts):
            try:
                ids = self.sequence_ids(messages, "")
            except ValueError as e:
                raise ValueError(f"prompt {i + 1} of the run: {e}") from None
            if i == 0:
                first = ids
        ids = first
        if self.pad_chosen and ids and ids[-1] == self.pad_id:
            raise ValueError(f"{self.model_dir / HF_CONFIG}: no pad_token_id, and the chat template ends each "
                             f"conversation with the tokenizer's token {self.pad_id}, which batching would pad "
                             "with: set pad_token_id to a token the template does not end with")

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> HFRewardScorer:
        """On `device`, the weights in `dtype`. The buffers transformers computes at load time (not read from
        the checkpoint: RoPE's inv_freq) keep their precision, as its from_pretrained(dtype=...) keeps them:
        rounded to bfloat16, the rotary frequencies drift over long sequences and move the score by units."""
        computed = [(module, name, buf) for module in self.model.modules()
                    for name, buf in module._buffers.items()
                    if buf is not None and buf.is_floating_point() and name in module._non_persistent_buffers_set]
        self.model.to(device=device, dtype=dtype)
        for module, name, buf in computed:  # `to` put new tensors in their place: the originals are unrounded
            module._buffers[name] = buf.to(device)
        return self

    def fingerprint(self) -> str:
        """The weights and architecture, not where or by which transformers release they were read."""
        return weights_fingerprint(self.model, ignore=LOAD_FIELDS)

    def reply_text(self, completion: str | list[int]) -> str:
        """A reply given as sampled ids, as text: the stop token dropped and special tokens skipped (they
        are the policy's, not the reward model's)."""
        if isinstance(completion, str):
            return completion
        ids = list(completion)
        if ids and ids[-1] == self.policy_tokenizer.eos_token_id:
            ids = ids[:-1]
        return self.policy_tokenizer.decode(ids, skip_special_tokens=True)

    def sequence_ids(self, messages: list[dict], completion: str | list[int], truncate: bool = True) -> list[int]:
        """prompt + reply rendered with the reward model's chat template and encoded with its tokenizer,
        cut from the left to `max_length` (the score is read at the end)."""
        conversation = [*messages, {"role": "assistant", "content": self.reply_text(completion)}]
        tools = conversation_tools(messages)
        try:
            text = self.tokenizer.apply_chat_template(conversation, tokenize=False,
                                                      **({"tools": tools} if tools else {}))
        except Exception as e:  # jinja's errors, or the template's own raise_exception
            raise ValueError(f"{self.model_dir}: its chat template failed on a conversation ({e})") from None
        # verbose=False: transformers would warn of a length that the cut below takes care of
        ids = self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        return ids[-self.max_length:] if truncate else ids

    def score_padded(self, ids: torch.Tensor, lengths: torch.Tensor) -> list[float]:
        device = next(self.model.parameters()).device
        mask = (torch.arange(ids.shape[1]) < lengths[:, None]).long()
        logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        return logits[:, 0].float().tolist()
