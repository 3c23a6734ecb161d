"""ModelConfig: preset sizes against their names, the parameter formula against real models, JSON round
trips, and clear errors for shapes that cannot exist."""

from __future__ import annotations

import json

import pytest
import torch

from minimind_fast.config import (
    PRESET_NOMINAL_PARAMS,
    PRESETS,
    ModelConfig,
    default_intermediate_size,
    get_preset,
)
from minimind_fast.model import MiniMindForCausalLM


def count_unique_params(model: torch.nn.Module) -> int:
    """Parameters counted once each (the tied head shares the embedding's tensor)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def meta_model(config: ModelConfig) -> MiniMindForCausalLM:
    with torch.device("meta"):
        return MiniMindForCausalLM(config)


@pytest.mark.parametrize("name", sorted(PRESET_NOMINAL_PARAMS))
def test_preset_size_matches_its_name(name):
    config = get_preset(name)
    counted = count_unique_params(meta_model(config))
    assert config.num_parameters() == counted
    nominal = PRESET_NOMINAL_PARAMS[name]
    assert abs(counted - nominal) / nominal < 0.15, f"{name}: {counted / 1e6:.1f}M parameters"


def test_every_preset_has_a_meta_model():
    for name in PRESETS:
        config = get_preset(name)
        assert config.num_parameters() == count_unique_params(meta_model(config)), name


@pytest.mark.parametrize("name,overrides", [
    ("tiny", {}), ("tiny", {"qk_norm": True}), ("tiny", {"tie_word_embeddings": False}),
    ("tiny-moe", {}), ("tiny-moe", {"n_shared_experts": 0, "qk_norm": True}), ("small-26m", {}),
])
def test_parameter_formula_against_instantiated_model(name, overrides):
    config = get_preset(name, **overrides)
    model = MiniMindForCausalLM(config)
    # Hand count from the shapes, independent of both.
    h, inter, kv = config.hidden_size, config.intermediate_size, config.num_key_value_heads * config.head_dim
    ffn = 3 * h * inter
    if config.use_moe:
        ffn = ffn * (config.n_routed_experts + config.n_shared_experts) + config.n_routed_experts * h
    layer = 2 * h * h + 2 * h * kv + ffn + 2 * h + (2 * config.head_dim if config.qk_norm else 0)
    head = 0 if config.tie_word_embeddings else config.vocab_size * h
    by_hand = config.num_hidden_layers * layer + h + config.vocab_size * h + head
    assert count_unique_params(model) == config.num_parameters() == model.num_parameters() == by_hand
    assert config.num_parameters(include_embedding=False) == by_hand - config.vocab_size * h


def test_minimind2_defaults():
    config = ModelConfig()
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
            config.num_key_value_heads, config.vocab_size, config.rms_norm_eps, config.rope_theta) == (
        512, 8, 8, 2, 6400, 1e-5, 1e6)
    assert config.intermediate_size == 1408 == default_intermediate_size(512)  # MiniMind2-small's FFN
    assert default_intermediate_size(640) == 1728 and default_intermediate_size(768) == 2048
    assert ModelConfig(inference_rope_scaling=True).rope_scaling["factor"] == 16.0


def test_json_round_trip(tmp_path):
    config = get_preset("tiny-moe", vocab_size=300, qk_norm=True, inference_rope_scaling=True,
                        num_experts_per_tok=1, kernels="reference")
    path = tmp_path / "model_config.json"
    config.save(path)
    assert not list(tmp_path.glob("*.tmp"))
    assert ModelConfig.load(path) == config
    assert ModelConfig.from_json(config.to_json()) == config
    assert json.loads(path.read_text())["n_routed_experts"] == 4


def test_unknown_fields_are_kept_in_extra():
    data = get_preset("tiny").to_dict() | {"flash_attn": True, "model_type": "minimind"}
    config = ModelConfig.from_dict(data)
    assert config.extra == {"flash_attn": True, "model_type": "minimind"}
    assert ModelConfig.from_json(config.to_json()) == config


def test_get_preset_overrides_and_unknown_name():
    assert get_preset("tiny", vocab_size=1000).vocab_size == 1000
    assert get_preset("tiny").vocab_size == 6400  # presets are not mutated by overrides
    with pytest.raises(KeyError, match="unknown preset 'huge'.*tiny"):
        get_preset("huge")


@pytest.mark.parametrize("overrides,field", [
    (dict(hidden_size=130, num_attention_heads=4), "num_attention_heads=4 does not divide hidden_size=130"),
    (dict(num_attention_heads=4, num_key_value_heads=3), "num_key_value_heads=3"),
    (dict(hidden_size=12, num_attention_heads=4, num_key_value_heads=2), "head_dim=3 must be even"),
    (dict(vocab_size=0), "vocab_size=0"),
    (dict(num_hidden_layers=-1), "num_hidden_layers=-1"),
    (dict(intermediate_size=0), "intermediate_size=0"),
    (dict(kernels="cuda"), "kernels='cuda'"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(use_moe=True, num_experts_per_tok=5, n_routed_experts=4), "num_experts_per_tok=5"),
    (dict(use_moe=True, n_routed_experts=0), "n_routed_experts"),
    (dict(use_moe=True, scoring_func="sigmoid"), "scoring_func='sigmoid'"),
])
def test_impossible_shapes_are_refused_with_the_field(overrides, field):
    with pytest.raises(ValueError, match="invalid ModelConfig") as err:
        get_preset("tiny", **overrides)
    assert field in str(err.value)


@pytest.mark.parametrize("overrides,field", [
    # from JSON or `--set NAME=VALUE`: the string "false" is truthy and would build another model
    (dict(use_moe="false"), "use_moe='false' must be true or false"),
    (dict(tie_word_embeddings="False"), "tie_word_embeddings='False' must be true or false"),
    (dict(hidden_size="128"), "hidden_size='128' must be an integer"),
    (dict(num_hidden_layers=2.0), "num_hidden_layers=2.0 must be an integer"),
    (dict(vocab_size=None), "vocab_size=None must be an integer"),
    (dict(rms_norm_eps="1e-5"), "rms_norm_eps='1e-5' must be a number"),
    (dict(rms_norm_eps=-1e-5), "rms_norm_eps=-1e-05 must be positive"),
    (dict(rope_theta=0.0), "rope_theta=0.0 must be greater than 1"),
    (dict(max_position_embeddings=0), "max_position_embeddings=0 must be positive"),
    (dict(dropout=1.5), "dropout=1.5 must be in [0, 1)"),
    (dict(eos_token_id=6400), "eos_token_id=6400 is not a token id below vocab_size=6400"),
    (dict(pad_token_id=-1), "pad_token_id=-1"),
    (dict(inference_rope_scaling=True, rope_scaling={"type": "linear", "factor": 4.0}), "rope_scaling type='linear'"),
    (dict(inference_rope_scaling=True, rope_scaling={"factor": 0}), "rope_scaling.factor=0"),
    (dict(inference_rope_scaling=True, rope_scaling={"factor": 4.0, "mscale": 1.0}),
     "rope_scaling has unknown keys ['mscale']"),
    (dict(inference_rope_scaling=True, rope_scaling={"beta_fast": 1.0, "beta_slow": 32.0}),
     "beta_fast=1.0 must exceed beta_slow=32.0"),
    (dict(use_moe=True, aux_loss_alpha=-0.1), "aux_loss_alpha=-0.1"),
    # a model_config.json edited to turn YaRN off, its settings left in place, kept YaRN on
    (dict(inference_rope_scaling=False, rope_scaling={"factor": 4.0}),
     "rope_scaling is set but inference_rope_scaling=false"),
])
def test_wrong_types_and_values_are_refused_with_the_field(overrides, field):
    with pytest.raises(ValueError, match="invalid ModelConfig") as err:
        get_preset("tiny", **overrides)
    assert field in str(err.value)


def test_a_misspelt_field_is_refused_not_left_at_its_default():
    data = get_preset("tiny").to_dict()
    data["num_hiden_layers"] = data.pop("num_hidden_layers")
    with pytest.raises(ValueError, match=r"unknown field 'num_hiden_layers' \(did you mean 'num_hidden_layers'\?\)"):
        ModelConfig.from_dict(data)
    with pytest.raises(ValueError, match="unknown field 'colour'"):
        ModelConfig.from_dict({"colour": "blue"})
    with pytest.raises(ValueError, match="expected a JSON object of fields, found list"):
        ModelConfig.from_json("[1, 2]")


def test_minimind_config_json_saved_by_transformers_5_keeps_its_yarn():
    """transformers >= 5 writes MiniMind's rope_scaling as rope_parameters: a bookkeeping-looking key that
    holds the YaRN settings."""
    data = {"model_type": "minimind", "transformers_version": "5.0.0", "flash_attn": True, "hidden_size": 128,
            "num_attention_heads": 4, "inference_rope_scaling": True, "rope_theta": 1e6,
            "rope_parameters": {"attention_factor": 1.0, "beta_fast": 32, "beta_slow": 1, "factor": 8,
                                "original_max_position_embeddings": 1024, "rope_theta": 1e6,
                                "rope_type": "yarn", "type": "yarn"}}
    config = ModelConfig.from_dict(data)
    assert (config.rope_scaling["factor"], config.rope_scaling["original_max_position_embeddings"]) == (8, 1024)
    assert config.extra["model_type"] == "minimind"
    plain = ModelConfig.from_dict(data | {"inference_rope_scaling": False, "rope_parameters": None})
    assert plain.rope_scaling is None
