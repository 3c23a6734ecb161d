"""Model configuration with MiniMind2's field names and defaults, plus named presets."""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minimind_fast.files import write_text_whole

YARN_DEFAULTS: dict[str, Any] = {
    "type": "yarn",
    "factor": 16.0,
    "original_max_position_embeddings": 2048,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "attention_factor": 1.0,
}

KERNEL_CHOICES = ("auto", "triton", "reference")

INT_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size",
              "intermediate_size", "max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
              "num_experts_per_tok", "n_routed_experts", "n_shared_experts")
FLOAT_FIELDS = ("rms_norm_eps", "rope_theta", "dropout", "aux_loss_alpha")
# The fields that size a model's weights and have no default that could be right for a given file: a
# model directory's model_config.json without one describes no model (the rest default as they always did).
SHAPE_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size")
BOOL_FIELDS = ("inference_rope_scaling", "tie_word_embeddings", "qk_norm", "use_moe", "seq_aux",
               "norm_topk_prob", "gradient_checkpointing")


# Keys MiniMind's `MiniMindConfig` and Hugging Face's `PretrainedConfig` write beside the model fields;
# they describe the file, not the architecture, and are kept in `extra`.
FOREIGN_KEYS = frozenset({
    "flash_attn", "model_type", "architectures", "auto_map", "torch_dtype", "dtype", "transformers_version",
    "_name_or_path", "use_cache", "initializer_range", "attention_dropout", "attention_bias", "mlp_bias",
    "pretraining_tp", "return_dict", "output_hidden_states", "output_attentions", "is_encoder_decoder",
    "tokenizer_class", "id2label", "label2id", "problem_type", "rope_parameters",
})


def _rope_from_transformers(data: dict[str, Any], kwargs: dict[str, Any]) -> None:
    """transformers >= 5 saves MiniMind's `rope_scaling` as `rope_parameters` (with rope_theta inside);
    take its YaRN settings back, so that they are not dropped with the bookkeeping keys."""
    rope = data.get("rope_parameters")
    if not isinstance(rope, dict) or data.get("rope_scaling") is not None:
        return
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        kwargs["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    if "rope_theta" in rope and "rope_theta" not in data:
        kwargs["rope_theta"] = rope["rope_theta"]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _fail(msg: str) -> None:
    raise ValueError(f"invalid ModelConfig: {msg}")


def default_intermediate_size(hidden_size: int) -> int:
    """MiniMind2's rule: 8/3 of the hidden size, rounded up to a multiple of 64."""
    return 64 * math.ceil(int(hidden_size * 8 / 3) / 64)


@dataclass
class ModelConfig:
    hidden_size: int = 512
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    vocab_size: int = 6400
    intermediate_size: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e6
    max_position_embeddings: int = 32768
    inference_rope_scaling: bool = False
    rope_scaling: dict[str, Any] | None = None
    dropout: float = 0.0
    tie_word_embeddings: bool = True
    hidden_act: str = "silu"
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0
    # Qwen3-style per-head RMSNorm on Q and K (minimind-3 checkpoints); off for MiniMind2.
    qk_norm: bool = False
    # MoE (ignored unless use_moe)
    use_moe: bool = False
    num_experts_per_tok: int = 2
    n_routed_experts: int = 4
    n_shared_experts: int = 1
    scoring_func: str = "softmax"
    aux_loss_alpha: float = 0.01
    seq_aux: bool = True
    norm_topk_prob: bool = True
    # Runtime switches (not part of the architecture).
    kernels: str = "auto"
    gradient_checkpointing: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._check_types()  # before the sizes are computed with
        if self.intermediate_size is None:
            self.intermediate_size = default_intermediate_size(self.hidden_size)
        if self.inference_rope_scaling and self.rope_scaling is None:
            self.rope_scaling = dict(YARN_DEFAULTS)
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate(self) -> None:
        """Raise ValueError naming the first field whose type or value no model can be built from."""
        self._check_types()
        self._check_sizes()
        self._check_rope()
        self._check_moe()

    def _check_types(self) -> None:
        # JSON and --set NAME=VALUE hand over strings or floats where a number or bool belongs; a string
        # "false" is truthy, so it must be refused here rather than silently build another model.
        for name in INT_FIELDS:
            value = getattr(self, name)
            if not (value is None and name == "intermediate_size") and not _is_int(value):
                _fail(f"{name}={value!r} must be an integer")
        for name in FLOAT_FIELDS:
            value = getattr(self, name)
            if not _is_int(value) and not isinstance(value, float):
                _fail(f"{name}={value!r} must be a number")
        for name in BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                _fail(f"{name}={getattr(self, name)!r} must be true or false")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, dict):
            _fail(f"rope_scaling={self.rope_scaling!r} must be an object (YaRN settings) or null")

    def _check_sizes(self) -> None:
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                     "vocab_size", "intermediate_size", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                _fail(f"{name}={getattr(self, name)} must be positive")
        if self.hidden_size % self.num_attention_heads:
            _fail(f"num_attention_heads={self.num_attention_heads} does not divide "
                  f"hidden_size={self.hidden_size}")
        if self.head_dim % 2:
            _fail(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.num_attention_heads % self.num_key_value_heads:
            _fail(f"num_key_value_heads={self.num_key_value_heads} does not divide "
                  f"num_attention_heads={self.num_attention_heads}")
        if self.rms_norm_eps <= 0:
            _fail(f"rms_norm_eps={self.rms_norm_eps} must be positive")
        if not 0 <= self.dropout < 1:
            _fail(f"dropout={self.dropout} must be in [0, 1)")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                _fail(f"{name}={getattr(self, name)} is not a token id below vocab_size={self.vocab_size}")
        if self.kernels not in KERNEL_CHOICES:
            _fail(f"kernels={self.kernels!r} must be one of {KERNEL_CHOICES}")
        if self.hidden_act != "silu":
            _fail(f"hidden_act={self.hidden_act!r}: only 'silu' (SwiGLU) is supported")

    def _check_rope(self) -> None:
        if self.rope_theta <= 1:  # YaRN divides by log(theta); below 1 the frequencies would rise
            _fail(f"rope_theta={self.rope_theta} must be greater than 1")
        if self.rope_scaling is None:
            return
        s = self.rope_scaling
        unknown = sorted(set(s) - set(YARN_DEFAULTS) - {"rope_type"})
        if unknown:
            _fail(f"rope_scaling has unknown keys {unknown} (YaRN takes {sorted(YARN_DEFAULTS)})")
        kind = s.get("type", s.get("rope_type", "yarn"))
        if kind != "yarn":
            _fail(f"rope_scaling type={kind!r}: only 'yarn' is supported")
        for key in ("factor", "beta_fast", "beta_slow", "attention_factor", "original_max_position_embeddings"):
            value = s.get(key, YARN_DEFAULTS[key])
            if not (_is_int(value) or isinstance(value, float)) or value <= 0:
                _fail(f"rope_scaling.{key}={value!r} must be a positive number")
        if s.get("beta_fast", YARN_DEFAULTS["beta_fast"]) <= s.get("beta_slow", YARN_DEFAULTS["beta_slow"]):
            _fail(f"rope_scaling.beta_fast={s.get('beta_fast')} must exceed beta_slow={s.get('beta_slow')}")
        if not self.inference_rope_scaling:  # as in MiniMind, the flag is what turns YaRN on or off
            _fail("rope_scaling is set but inference_rope_scaling=false: set it true to apply YaRN, "
                  "or rope_scaling null to turn YaRN off")

    def _check_moe(self) -> None:
        if not self.use_moe:
            return
        if self.n_routed_experts <= 0:
            _fail("n_routed_experts must be positive when use_moe")
        if not 0 < self.num_experts_per_tok <= self.n_routed_experts:
            _fail(f"num_experts_per_tok={self.num_experts_per_tok} must be in "
                  f"1..n_routed_experts={self.n_routed_experts}")
        if self.scoring_func != "softmax":
            _fail(f"scoring_func={self.scoring_func!r}: only 'softmax' is supported")
        if self.n_shared_experts < 0:
            _fail("n_shared_experts must be >= 0")
        if self.aux_loss_alpha < 0:
            _fail(f"aux_loss_alpha={self.aux_loss_alpha} must be >= 0")

    # --- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any], required: tuple[str, ...] = ()) -> ModelConfig:
        """A config from its JSON fields. Bookkeeping keys of MiniMind's and Hugging Face's config.json
        (`FOREIGN_KEYS`) are kept in `extra`; any other unknown key is refused, since a misspelt field
        would otherwise leave its default in place and build another model, and so is a missing `required` one."""
        if not isinstance(data, dict):
            _fail(f"expected a JSON object of fields, found {type(data).__name__}")
        if missing := [k for k in required if k not in data]:
            _fail(f"missing {', '.join(missing)}: the defaults would build another model than the weights beside it")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known - FOREIGN_KEYS)
        if unknown:
            hints = [f"{k!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(k, known, 1)) else repr(k)
                     for k in unknown]
            _fail(f"unknown field {', '.join(hints)}")
        kwargs = {k: v for k, v in data.items() if k in known}
        _rope_from_transformers(data, kwargs)
        foreign = {k: data[k] for k in set(data) - known}
        if foreign:
            kwargs["extra"] = {**kwargs.get("extra", {}), **foreign}
        return cls(**kwargs)

    @classmethod
    def from_json(cls, text: str, required: tuple[str, ...] = ()) -> ModelConfig:
        return cls.from_dict(json.loads(text), required)

    def save(self, path: str | os.PathLike) -> None:
        write_text_whole(Path(path), self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike, required: tuple[str, ...] = ()) -> ModelConfig:
        """The config in a JSON file; a malformed or invalid one, or one without a `required` field, raises
        ValueError naming the file."""
        with open(path, encoding="utf-8") as f:
            try:
                return cls.from_json(f.read(), required)
            except ValueError as e:  # json.JSONDecodeError is one, and so is a file that is not UTF-8
                raise ValueError(f"{path}: {e}") from e

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    # --- sizes ---------------------------------------------------------------------------
    def num_parameters(self, include_embedding: bool = True) -> int:
        """Parameter count computed from the shapes (tied embeddings counted once)."""
        h, inter, kv = self.hidden_size, self.intermediate_size, self.num_key_value_heads * self.head_dim
        attn = 2 * h * h + 2 * h * kv + (2 * self.head_dim if self.qk_norm else 0)
        ffn = 3 * h * inter
        if self.use_moe:
            ffn = ffn * (self.n_routed_experts + self.n_shared_experts) + self.n_routed_experts * h
        per_layer = attn + ffn + 2 * h
        emb = self.vocab_size * h if include_embedding else 0
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.num_hidden_layers * per_layer + h + emb + head


PRESETS: dict[str, dict[str, Any]] = {
    # For tests and CPU demos: trains visibly in minutes on two cores.
    "tiny": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=2048),
    "tiny-moe": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=2048, use_moe=True,
                     n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2),
    "small-26m": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                      num_key_value_heads=2),
    "base-104m": dict(hidden_size=768, num_hidden_layers=16, num_attention_heads=8,
                      num_key_value_heads=2),
    "moe-145m": dict(hidden_size=640, num_hidden_layers=8, num_attention_heads=8,
                     num_key_value_heads=2, use_moe=True),
    "medium-200m": dict(hidden_size=1024, num_hidden_layers=16, num_attention_heads=16,
                        num_key_value_heads=4, vocab_size=32000, max_position_embeddings=4096),
    "large-1b": dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=32000, max_position_embeddings=8192),
}

# Nominal sizes the preset names promise (checked by the tests, within 15%).
PRESET_NOMINAL_PARAMS = {
    "small-26m": 26e6, "base-104m": 104e6, "moe-145m": 145e6,
    "medium-200m": 200e6, "large-1b": 1e9,
}


def get_preset(name: str, **overrides: Any) -> ModelConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})
