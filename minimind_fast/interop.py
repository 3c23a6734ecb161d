"""Interop: MiniMind2 `.pth` checkpoints in, Hugging Face directories out and back in.

MiniMind2's trainer saves a bare state dict in half precision (`out/pretrain_512.pth`,
`full_sft_512_moe.pth`, ...). Its key names are Hugging Face Llama's, so a dense checkpoint maps onto our
model one to one; MoE checkpoints keep one module per expert (`mlp.experts.N.gate_proj.weight`), which
we stack into (E, I, H) banks. The first MiniMind2 release (early 2025, `MiniMindLM`) used Meta-style
names (`tok_embeddings`, `attention.wq`, `feed_forward.w1`) and interleaved-pair RoPE; those checkpoints
are renamed and their Q/K rows permuted to the half-rotation convention, which leaves q.k unchanged.

A `.pth` has no config: sizes are read from the shapes. The number of attention heads is not visible in
the shapes (q_proj is always hidden x hidden), so it defaults to MiniMind2's 8 unless given; with
per-head Q/K norms (minimind-3 checkpoints) it is read from the norm's size.

Hugging Face export writes a dense model as `LlamaForCausalLM` (with `qk_norm`, as `Qwen3ForCausalLM`,
whose attention is ours exactly). MoE models are refused: no Hugging Face architecture adds
MiniMind2's unweighted shared experts to softmax top-k routed experts with top-1 weights left
unnormalised.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from minimind_fast import checkpoint
from minimind_fast.config import ModelConfig
from minimind_fast.data.tokenizer import check_same_tokenizer, load_tokenizer
from minimind_fast.lora import load_lora, load_tuned_model, merge_lora
from minimind_fast.model import MiniMindForCausalLM

# Wrappers that prefix every key: DDP (`module.`) and torch.compile (`_orig_mod.`).
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Buffers some MiniMind versions saved beside the weights; recomputed from the config here.
BUFFER_SUFFIXES = ("freqs_cos", "freqs_sin", "pos_cis", "attention.mask", "rotary_emb.inv_freq")

MINIMIND2_DEFAULTS: dict[str, Any] = dict(rms_norm_eps=1e-5, rope_theta=1e6, max_position_embeddings=32768,
                                          num_experts_per_tok=2)
# minimind-3 (the line with per-head Q/K norms): eps 1e-6, top-1 routing, no shared experts.
MINIMIND3_DEFAULTS: dict[str, Any] = dict(rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=32768,
                                          num_experts_per_tok=1)
DEFAULT_HEADS = 8

_EXPERT_KEY = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")

# First-release MiniMind2 (`MiniMindLM`) names -> current names, applied in order to each key.
_LEGACY_RENAMES = (
    (r"^tok_embeddings\.", "model.embed_tokens."),
    (r"^output\.", "lm_head."),
    (r"^norm\.", "model.norm."),
    (r"^layers\.", "model.layers."),
    (r"\.attention\.w([qkvo])\.", r".self_attn.\1_proj."),
    (r"\.attention_norm\.", ".input_layernorm."),
    (r"\.ffn_norm\.", ".post_attention_layernorm."),
    (r"\.feed_forward\.", ".mlp."),
    (r"\.w1\.weight$", ".gate_proj.weight"),
    (r"\.w2\.weight$", ".down_proj.weight"),
    (r"\.w3\.weight$", ".up_proj.weight"),
    # It held its one shared expert as a bare FeedForward; ours (like later MiniMind2) numbers them.
    (r"\.shared_experts\.(gate_proj|up_proj|down_proj)\.", r".shared_experts.0.\1."),
)


# --------------------------------------------------------------------------------------------------
# MiniMind2 .pth -> our model
# --------------------------------------------------------------------------------------------------
def read_pth(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict in a MiniMind `.pth` (or the `model` entry of a `*_resume.pth`), keys unwrapped,
    saved buffers dropped, floats cast to fp32."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path}: a directory, not a file; {PTH_EXPECTED}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: an empty file; {PTH_EXPECTED}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for truncated or foreign files
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({checkpoint.load_failure(e)}); "
                         f"{PTH_EXPECTED}") from e
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]  # MiniMind's resume file: {'model': state_dict, 'optimizer': ..., 'step': ...}
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a state dict (parameter name -> tensor) as MiniMind's trainer "
                         f"saves it, found {_describe(obj)}")
    state = {}
    for key, value in obj.items():
        key = _strip_wrappers(key)
        if key.endswith(BUFFER_SUFFIXES):
            continue
        state[key] = value.float() if value.is_floating_point() else value
    return state


PTH_EXPECTED = "expected a MiniMind .pth (a state dict of tensors, saved by torch.save)"


def _describe(obj: object) -> str:
    """What a .pth held instead of a state dict, for the error that refuses it."""
    if not isinstance(obj, dict):
        return f"a {type(obj).__name__}"
    if not obj:
        return "an empty dict"
    key, value = next((k, v) for k, v in obj.items() if not isinstance(v, torch.Tensor))
    return f"a dict with non-tensor entries ({key!r}: {type(value).__name__})"


def _strip_wrappers(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix):], True
    return key


def is_legacy_layout(state: dict[str, torch.Tensor]) -> bool:
    """True for first-release MiniMind2 checkpoints (`tok_embeddings.weight`, `attention.wq`...)."""
    return "tok_embeddings.weight" in state


def rename_legacy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        for pattern, repl in _LEGACY_RENAMES:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def interleaved_to_half_rotation(weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Reorder a Q or K projection's rows so that the rotary pair (2i, 2i+1) becomes (i, i + D/2).

    Rotating interleaved pairs then projecting equals rotating halves of the permuted projection, and
    Q and K permuted alike leave every attention score unchanged.
    """
    rows, cols = weight.shape
    if rows % head_dim:
        raise ValueError(f"projection with {rows} rows is not a whole number of heads of {head_dim}")
    return weight.view(rows // head_dim, head_dim // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def infer_minimind_config(state: dict[str, torch.Tensor], source: str = "state dict",
                          **overrides: Any) -> ModelConfig:
    """A `ModelConfig` for a MiniMind state dict (current key names), from its shapes and `overrides`."""
    def need(key: str) -> torch.Tensor:
        if key not in state:
            sample = ", ".join(sorted(state)[:6])
            raise ValueError(f"{source}: no {key}: not a MiniMind2 state dict (its keys begin: {sample})")
        return state[key]

    vocab, hidden = need("model.embed_tokens.weight").shape
    layer_ids = {int(m.group(1)) for k in state if (m := _LAYER_KEY.match(k))}
    if not layer_ids:
        raise ValueError(f"{source}: no model.layers.N.* keys: not a MiniMind2 state dict")
    qk_norm = "model.layers.0.self_attn.q_norm.weight" in state
    heads = overrides.get("num_attention_heads")
    if heads is None and qk_norm:
        head_dim = need("model.layers.0.self_attn.q_norm.weight").shape[0]
        heads = need("model.layers.0.self_attn.q_proj.weight").shape[0] // head_dim
    if heads is None:
        heads = DEFAULT_HEADS
        warnings.warn(f"{source}: a .pth does not record the number of attention heads; assuming MiniMind2's "
                      f"{heads}; if it was trained with another count, convert it with "
                      f"`launch/convert.py from-minimind {source} --num-attention-heads N --out DIR` and use DIR",
                      stacklevel=3)
    if hidden % heads:
        raise ValueError(f"{source}: hidden_size {hidden} is not divisible by num_attention_heads={heads}; "
                         f"convert it with `launch/convert.py from-minimind {source} --num-attention-heads N "
                         "--out DIR` giving its head count, and use DIR")
    head_dim = hidden // heads
    k_rows = need("model.layers.0.self_attn.k_proj.weight").shape[0]
    if k_rows % head_dim:
        raise ValueError(f"{source}: k_proj has {k_rows} rows, not a multiple of head_dim {head_dim} "
                         f"(num_attention_heads={heads} is probably wrong)")

    use_moe = "model.layers.0.mlp.gate.weight" in state
    inferred: dict[str, Any] = dict(MINIMIND3_DEFAULTS if qk_norm else MINIMIND2_DEFAULTS)
    inferred.update(hidden_size=hidden, vocab_size=vocab, num_hidden_layers=max(layer_ids) + 1,
                    num_attention_heads=heads, num_key_value_heads=k_rows // head_dim, qk_norm=qk_norm,
                    use_moe=use_moe, tie_word_embeddings=_is_tied(state))
    if use_moe:
        shared = {m.group(1) for k in state
                  if (m := re.match(r"^model\.layers\.0\.mlp\.shared_experts\.(\d+)\.", k))}
        inferred.update(n_routed_experts=need("model.layers.0.mlp.gate.weight").shape[0],
                        n_shared_experts=len(shared),
                        intermediate_size=need("model.layers.0.mlp.experts.0.gate_proj.weight").shape[0])
    else:
        inferred["intermediate_size"] = need("model.layers.0.mlp.gate_proj.weight").shape[0]
    inferred.update(overrides)
    if qk_norm and use_moe and inferred["num_experts_per_tok"] == 1:
        warnings.warn(f"{source}: minimind-3 MoE with top-1 routing renormalises the single routing weight "
                      "to 1; this model keeps the router probability (so the router learns), so logits "
                      "differ by that scale", stacklevel=2)
    return ModelConfig(**inferred)


def _is_tied(state: dict[str, torch.Tensor]) -> bool:
    head = state.get("lm_head.weight")
    return head is None or torch.equal(head, state["model.embed_tokens.weight"])


def minimind_to_ours(state: dict[str, torch.Tensor], source: str = "state dict") -> dict[str, torch.Tensor]:
    """Current-layout MiniMind keys -> ours: the per-expert weights stacked into (E, I, H) / (E, H, I)."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for key, value in state.items():
        if m := _EXPERT_KEY.match(key):
            experts.setdefault((m.group(1), m.group(3)), {})[int(m.group(2))] = value
            continue
        out[key] = value
    for (prefix, proj), by_index in sorted(experts.items()):
        missing = sorted(set(range(max(by_index) + 1)) - set(by_index))
        if missing:
            raise ValueError(f"{source}: {prefix}: experts {missing} have no {proj} weight")
        shapes = {tuple(t.shape) for t in by_index.values()}
        if len(shapes) > 1:
            raise ValueError(f"{source}: {prefix}.*.{proj}: experts have different shapes {sorted(shapes)}")
        out[f"{prefix}.{proj}"] = torch.stack([by_index[i] for i in range(len(by_index))])
    return out


def load_minimind_pth(path: str | os.PathLike, config: ModelConfig | None = None,
                      **overrides: Any) -> MiniMindForCausalLM:
    """Load a MiniMind2 `.pth` state dict into our model (fp32).

    `config` replaces inference from shapes entirely; `overrides` (ModelConfig fields) adjust it, e.g.
    `num_attention_heads`, which the shapes do not reveal, or `inference_rope_scaling=True`.
    Mismatches raise ValueError listing the missing, unexpected and mis-shaped keys.
    """
    source = str(path)
    state = read_pth(path)
    legacy = is_legacy_layout(state)
    if legacy:
        state = rename_legacy(state)
    if config is None:
        config = infer_minimind_config(state, source=source, **overrides)
    elif overrides:
        config = config.replace(**overrides)
    if legacy:
        for key in [k for k in state if k.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight"))]:
            state[key] = interleaved_to_half_rotation(state[key], config.head_dim)
    model = MiniMindForCausalLM(config)
    checkpoint.load_state(model, minimind_to_ours(state, source), source=source)
    return model


# --------------------------------------------------------------------------------------------------
# Our model -> Hugging Face
# --------------------------------------------------------------------------------------------------
HF_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MOE_EXPORT_ERROR = (
    "Hugging Face export of MoE models is not supported: no transformers architecture computes "
    "MiniMind2's MoE exactly (softmax top-k routed experts plus unweighted shared experts, top-1 weight "
    "not renormalised). Use our model directory, or convert a dense model.")


def _yarn_correction_range(config_like: dict[str, Any], head_dim: int, theta: float) -> tuple[int, int]:
    """YaRN's (low, high) correction dimensions before clamping, as both implementations compute them."""
    orig = config_like.get("original_max_position_embeddings", 2048)

    def correction_dim(n_rotations: float) -> float:
        return head_dim * math.log(orig / (n_rotations * 2 * math.pi)) / (2 * math.log(theta))

    return (math.floor(correction_dim(config_like.get("beta_fast", 32.0))),
            math.ceil(correction_dim(config_like.get("beta_slow", 1.0))))


def hf_rope_scaling(config: ModelConfig) -> dict[str, Any] | None:
    """Our YaRN settings in Hugging Face's `rope_scaling` format, or None when RoPE is unscaled.

    MiniMind2 (and we) scale only when max_position_embeddings exceeds the original length, while
    Hugging Face always applies a YaRN config: such a model is exported without scaling, which is exact
    unless its attention_factor (applied even then) is not 1: that is refused.
    The two also clamp the ramp's upper end differently (head_dim/2 - 1 here, head_dim - 1 there); a
    config where that clamp matters is refused.
    """
    s = config.rope_scaling
    if s is None:
        return None
    if s.get("type", s.get("rope_type", "yarn")) != "yarn":
        raise ValueError(f"rope_scaling type {s.get('type')!r}: only YaRN can be exported")
    orig = s.get("original_max_position_embeddings", 2048)
    if config.max_position_embeddings / orig <= 1.0:
        # MiniMind2 (and we) still scale cos/sin by attention_factor here; Hugging Face has no form for that alone
        if s.get("attention_factor", 1.0) != 1.0:
            raise ValueError(f"rope_scaling attention_factor={s['attention_factor']} without a context extension "
                             f"(max_position_embeddings {config.max_position_embeddings} <= "
                             f"original_max_position_embeddings {orig}) has no Hugging Face equivalent")
        return None
    low, high = _yarn_correction_range(s, config.head_dim, config.rope_theta)
    if high > config.head_dim // 2 - 1 or high < max(low, 0):
        raise ValueError(f"YaRN with head_dim={config.head_dim}, theta={config.rope_theta}, beta_slow="
                         f"{s.get('beta_slow', 1.0)} has a correction range Hugging Face clamps differently; "
                         "export it without inference_rope_scaling")
    return {"rope_type": "yarn", "factor": float(s.get("factor", 16.0)), "original_max_position_embeddings": orig,
            "beta_fast": float(s.get("beta_fast", 32.0)), "beta_slow": float(s.get("beta_slow", 1.0)),
            "attention_factor": float(s.get("attention_factor", 1.0))}


def hf_config(config: ModelConfig, dtype: str = "float32") -> dict[str, Any]:
    """`config.json` for Hugging Face: Llama for dense models, Qwen3 when Q/K are normed per head."""
    if config.use_moe:
        raise ValueError(MOE_EXPORT_ERROR)
    if dtype not in HF_DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose from {', '.join(HF_DTYPES)}")
    arch, model_type = ("Qwen3ForCausalLM", "qwen3") if config.qk_norm else ("LlamaForCausalLM", "llama")
    out: dict[str, Any] = {
        "architectures": [arch], "model_type": model_type,
        "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers, "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads, "head_dim": config.head_dim,
        "hidden_act": "silu", "rms_norm_eps": config.rms_norm_eps, "rope_theta": config.rope_theta,
        "rope_scaling": hf_rope_scaling(config), "max_position_embeddings": config.max_position_embeddings,
        "vocab_size": config.vocab_size, "tie_word_embeddings": config.tie_word_embeddings,
        "bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id, "attention_bias": False, "attention_dropout": 0.0,
        "initializer_range": 0.02, "use_cache": True, "torch_dtype": dtype, "dtype": dtype,
    }
    if config.qk_norm:
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=config.num_hidden_layers,
                   layer_types=["full_attention"] * config.num_hidden_layers)
    else:
        out.update(mlp_bias=False, pretraining_tp=1)
    return out


def export_hf(model_or_dir: MiniMindForCausalLM | str | os.PathLike, out_dir: str | os.PathLike,
              tokenizer_dir: str | os.PathLike | None = None, dtype: str = "float32") -> Path:
    """Write a Hugging Face directory (config.json, model.safetensors, generation_config.json, tokenizer).

    `model_or_dir` is a model or anything `checkpoint.load_model` reads (a LoRA run's adapter merged into
    its base, as chat applies it); its tokenizer is copied from
    `tokenizer_dir`, else from beside the weights when one is there. Written to a temporary sibling
    and renamed into place, so a failed export leaves nothing behind.
    """
    tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir is not None else None
    if isinstance(model_or_dir, MiniMindForCausalLM):
        model = model_or_dir
    else:
        src = Path(model_or_dir)
        tokenizer_dir = _tokenizer_dir(tokenizer_dir, checkpoint.tokenizer_dir_beside(src), src)
        model, _ = load_tuned_model(src)  # a LoRA run exports as its fine-tuned model, adapter merged
    config = hf_config(model.config, dtype)
    out = Path(out_dir)
    check_output_dir(out, "hf")
    state = {k: v.to(HF_DTYPES[dtype]).contiguous() for k, v in checkpoint.state_dict_for_saving(model).items()}
    generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
                  "pad_token_id": config["pad_token_id"]}

    def write(tmp: Path) -> None:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        if tokenizer_dir is not None:
            checkpoint.copy_tokenizer(tokenizer_dir, tmp)

    return checkpoint.write_dir_atomically(out, write, checkpoint.is_hf_dir)


def _tokenizer_dir(given: str | os.PathLike | None, beside: Path | None, model: str | os.PathLike) -> Path | None:
    """The tokenizer to write with a converted model: the one given, if it is the model's own, else beside it."""
    if given is None:
        return beside
    check_same_tokenizer(load_tokenizer(given), load_tokenizer(beside) if beside else None, model)
    return Path(given)


def check_output_dir(out: str | os.PathLike, kind: str) -> None:
    """Refuse an --out that exists and is not an empty directory or a directory of the same `kind`
    ("hf" or "model"), before any work is done."""
    out = Path(out)
    try:
        checkpoint.check_replaceable(out, checkpoint.is_hf_dir if kind == "hf" else checkpoint.is_model_dir)
    except FileExistsError:
        what = "a Hugging Face export" if kind == "hf" else "a model directory"
        raise FileExistsError(f"{out}: exists and is not {what}; refusing to replace it "
                              "(choose another --out)") from None


# --------------------------------------------------------------------------------------------------
# Hugging Face -> our model
# --------------------------------------------------------------------------------------------------
HF_ARCHITECTURES = {"LlamaForCausalLM": False, "Qwen3ForCausalLM": True}  # -> qk_norm


def config_from_hf(hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """Our `ModelConfig` for a Llama or Qwen3 `config.json`, refusing anything we would compute differently."""
    arch = (hf.get("architectures") or ["?"])[0]
    if arch not in HF_ARCHITECTURES:
        raise ValueError(f"{source}: architecture {arch!r} is not supported (expected one of "
                         f"{', '.join(HF_ARCHITECTURES)})")

    def refuse_if(condition: bool, what: str) -> None:
        if condition:
            raise ValueError(f"{source}: {what} has no equivalent in this model")

    refuse_if(hf.get("hidden_act", "silu") != "silu", f"hidden_act={hf.get('hidden_act')!r}")
    refuse_if(bool(hf.get("attention_bias")), "attention_bias=true")
    refuse_if(bool(hf.get("mlp_bias")), "mlp_bias=true")
    refuse_if(bool(hf.get("use_sliding_window")), "use_sliding_window=true")
    hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
    for name, value in (("hidden_size", hidden), ("num_attention_heads", heads)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{source}: {name}={value!r} must be a positive integer")
    head_dim = hf.get("head_dim") or hidden // heads
    refuse_if(head_dim * heads != hidden, f"head_dim={head_dim} with {heads} heads and hidden_size={hidden}")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise ValueError(f"{source}: rope_scaling={rope!r} must be an object")
    rope = dict(rope)
    theta = hf.get("rope_theta") or rope.get("rope_theta") or 10000.0
    kind = rope.get("rope_type", rope.get("type", "default"))
    refuse_if(kind not in ("default", "yarn"), f"rope_type={kind!r}")
    max_pos = hf.get("max_position_embeddings", 2048)
    rope_scaling = None
    if kind == "yarn":
        rope_scaling = _yarn_from_hf(rope, head_dim, theta, max_pos, source)

    def first(value: Any) -> Any:
        return value[0] if isinstance(value, list) else value

    fields = dict(
        hidden_size=hidden, num_hidden_layers=hf["num_hidden_layers"], num_attention_heads=heads,
        num_key_value_heads=hf.get("num_key_value_heads") or heads, vocab_size=hf["vocab_size"],
        intermediate_size=hf["intermediate_size"], rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta), max_position_embeddings=max_pos, rope_scaling=rope_scaling,
        inference_rope_scaling=rope_scaling is not None,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)), qk_norm=HF_ARCHITECTURES[arch],
        bos_token_id=first(hf.get("bos_token_id")) if hf.get("bos_token_id") is not None else 1,
        eos_token_id=first(hf.get("eos_token_id")) if hf.get("eos_token_id") is not None else 2,
        pad_token_id=first(hf.get("pad_token_id")) if hf.get("pad_token_id") is not None else 0,
    )
    try:
        return ModelConfig(**fields)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from e


def _yarn_from_hf(rope: dict[str, Any], head_dim: int, theta: float, max_pos: int, source: str) -> dict[str, Any]:
    factor = rope.get("factor") or max_pos / rope["original_max_position_embeddings"]
    orig = rope.get("original_max_position_embeddings") or max_pos
    attention_factor = rope.get("attention_factor")
    if attention_factor is None:  # Hugging Face's default, YaRN's sqrt(1/t) = 0.1 ln(s) + 1
        attention_factor = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    ours = {"type": "yarn", "factor": float(factor), "original_max_position_embeddings": orig,
            "beta_fast": float(rope.get("beta_fast") or 32.0), "beta_slow": float(rope.get("beta_slow") or 1.0),
            "attention_factor": float(attention_factor)}
    low, high = _yarn_correction_range(ours, head_dim, theta)
    if (max_pos / orig <= 1.0 or high > head_dim // 2 - 1 or rope.get("truncate") is False
            or rope.get("mscale") or rope.get("mscale_all_dim")):
        raise ValueError(f"{source}: this YaRN configuration ({rope}) is computed differently here "
                         "(MiniMind2's YaRN applies only beyond original_max_position_embeddings)")
    return ours


def read_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a Hugging Face directory (single or sharded safetensors, or pytorch_model.bin), in fp32."""
    if (path / "model.safetensors").exists():
        state = checkpoint.read_safetensors(path / "model.safetensors")
    elif (path / "model.safetensors.index.json").exists():
        state = {}
        for shard in _index_shards(path / "model.safetensors.index.json"):
            if not (path / shard).exists():
                raise FileNotFoundError(f"{path / shard}: shard named in model.safetensors.index.json is missing")
            state.update(checkpoint.read_safetensors(path / shard))
    elif (path / "pytorch_model.bin").exists():
        try:
            state = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for truncated or foreign files
            raise ValueError(f"{path / 'pytorch_model.bin'}: not a readable PyTorch checkpoint "
                             f"({checkpoint.load_failure(e)})") from e
    else:
        raise FileNotFoundError(f"{path}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()
            if not k.endswith(BUFFER_SUFFIXES)}


def _index_shards(index_file: Path) -> list[str]:
    try:
        return sorted(set(json.loads(index_file.read_text())["weight_map"].values()))
    except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as e:
        raise ValueError(f"{index_file}: not a safetensors index (a weight_map of key -> shard file)") from e


def load_hf_dir(path: str | os.PathLike) -> MiniMindForCausalLM:
    """Load a Hugging Face Llama (or Qwen3) directory, e.g. one `export_hf` wrote, into our model (fp32)."""
    path = Path(path)
    config_file = path / "config.json"
    try:
        hf = json.loads(config_file.read_text())
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8
        raise ValueError(f"{config_file}: cannot read the Hugging Face config ({e})") from e
    if not isinstance(hf, dict):
        raise ValueError(f"{config_file}: not a JSON object")
    try:
        config = config_from_hf(hf, source=str(config_file))
    except KeyError as e:
        raise ValueError(f"{config_file}: missing field {e.args[0]!r}") from e
    except (TypeError, IndexError, AttributeError) as e:  # a field of another type than Hugging Face writes
        raise ValueError(f"{config_file}: malformed ({type(e).__name__}: {e})") from e
    model = MiniMindForCausalLM(config)
    checkpoint.load_state(model, read_hf_weights(path), source=str(path))
    return model


# --------------------------------------------------------------------------------------------------
# launch/convert.py's subcommands that write our model directory
# --------------------------------------------------------------------------------------------------
def convert_minimind_pth(pth: str | os.PathLike, out: str | os.PathLike,
                         tokenizer_dir: str | os.PathLike | None = None, **overrides: Any) -> Path:
    """A MiniMind2 `.pth` (sizes from its shapes, `overrides` for what they do not show) -> model dir."""
    check_output_dir(out, "model")  # before the work, which a refused --out would waste
    model = load_minimind_pth(pth, **overrides)
    return checkpoint.save_model_dir(model, out, tokenizer_dir=tokenizer_dir, metadata={"converted_from": str(pth)})


def convert_hf_dir(hf_dir: str | os.PathLike, out: str | os.PathLike,
                   tokenizer_dir: str | os.PathLike | None = None) -> Path:
    """A Hugging Face Llama/Qwen3 directory -> model dir, with its own tokenizer unless one is given."""
    check_output_dir(out, "model")
    own = Path(hf_dir) if (Path(hf_dir) / "tokenizer.json").exists() else None
    tokenizer_dir = _tokenizer_dir(tokenizer_dir, own, hf_dir)
    model = load_hf_dir(hf_dir)
    return checkpoint.save_model_dir(model, out, tokenizer_dir=tokenizer_dir,
                                     metadata={"converted_from": str(hf_dir)})


def merge_lora_into_dir(model_path: str | os.PathLike, lora: str | os.PathLike, out: str | os.PathLike,
                        tokenizer_dir: str | os.PathLike | None = None) -> Path:
    """A base model with a LoRA adapter (or a LoRA run's newest) folded in -> model dir."""
    check_output_dir(out, "model")
    tokenizer_dir = _tokenizer_dir(tokenizer_dir, checkpoint.tokenizer_dir_beside(Path(model_path)), model_path)
    model = merge_lora(load_lora(checkpoint.load_model(model_path), lora))
    return checkpoint.save_model_dir(model, out, tokenizer_dir=tokenizer_dir, metadata={"merged_lora": str(lora)})
