"""Interop: MiniMind2 `.pth` import, Hugging Face export/import, and the convert CLI.

Oracles are independent of our model: Hugging Face's own LlamaForCausalLM / Qwen3ForCausalLM for dense
models (a dense MiniMind2 is a Llama with tied embeddings), and a naive per-token float64 forward pass
written here from MiniMind2's formulas for MoE and for the first release's interleaved RoPE.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from minimind_fast import interop
from minimind_fast.checkpoint import load_model
from minimind_fast.config import get_preset
from minimind_fast.model import MiniMindForCausalLM

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
# Most .pth here use MiniMind2's 8 heads and rely on that default; one test checks the warning itself.
pytestmark = pytest.mark.filterwarnings("ignore:.*does not record the number of attention heads")
SIZES = dict(hidden=64, layers=2, heads=8, kv=2, inter=192, vocab=128)  # MiniMind2 defaults: 8 heads


# ---------------------------------------------------------------------------------------------------
# MiniMind2-format state dicts, built from shapes alone (as MiniMind2's trainer writes them: fp16)
# ---------------------------------------------------------------------------------------------------
def _linear(out_f: int, in_f: int) -> torch.Tensor:
    return torch.randn(out_f, in_f) / math.sqrt(in_f)


def _norm(dim: int) -> torch.Tensor:
    return 1.0 + 0.1 * torch.randn(dim)


def _ffn(prefix: str, hidden: int, inter: int) -> dict[str, torch.Tensor]:
    return {f"{prefix}.gate_proj.weight": _linear(inter, hidden), f"{prefix}.up_proj.weight": _linear(inter, hidden),
            f"{prefix}.down_proj.weight": _linear(hidden, inter)}


def minimind2_state(hidden=64, layers=2, heads=8, kv=2, inter=192, vocab=128, experts=0, shared=1,
                    qk_norm=False) -> dict[str, torch.Tensor]:
    head_dim = hidden // heads
    emb = torch.randn(vocab, hidden)
    sd = {"model.embed_tokens.weight": emb, "model.norm.weight": _norm(hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        sd.update({p + "self_attn.q_proj.weight": _linear(hidden, hidden),
                   p + "self_attn.k_proj.weight": _linear(kv * head_dim, hidden),
                   p + "self_attn.v_proj.weight": _linear(kv * head_dim, hidden),
                   p + "self_attn.o_proj.weight": _linear(hidden, hidden),
                   p + "input_layernorm.weight": _norm(hidden), p + "post_attention_layernorm.weight": _norm(hidden)})
        if qk_norm:
            sd[p + "self_attn.q_norm.weight"] = _norm(head_dim)
            sd[p + "self_attn.k_norm.weight"] = _norm(head_dim)
        if experts:
            sd[p + "mlp.gate.weight"] = _linear(experts, hidden)
            for e in range(experts):
                sd.update(_ffn(f"{p}mlp.experts.{e}", hidden, inter))
            for s in range(shared):
                sd.update(_ffn(f"{p}mlp.shared_experts.{s}", hidden, inter))
        else:
            sd.update(_ffn(p + "mlp", hidden, inter))
    sd["lm_head.weight"] = emb  # MiniMind2 ties lm_head to the embedding; both names are in its state dict
    return {k: v.half() for k, v in sd.items()}


def naive_logits(sd: dict[str, torch.Tensor], ids: torch.Tensor, heads: int, eps=1e-5, theta=1e6,
                 top_k=2, interleaved_rope=False) -> torch.Tensor:
    """MiniMind2's forward pass for one sequence, token by token where it routes, in float64."""
    sd = {k: v.double() for k, v in sd.items()}
    emb = sd["model.embed_tokens.weight"]
    hidden = emb.shape[1]
    head_dim, seq = hidden // heads, ids.shape[0]
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    ang = torch.arange(seq, dtype=torch.float64)[:, None] * inv_freq[None]  # (T, D/2)
    cos, sin = ang.cos()[:, None], ang.sin()[:, None]

    def rope(v):  # (T, heads, D)
        if interleaved_rope:  # pairs (2i, 2i+1) rotated as complex numbers
            a, b = v[..., 0::2], v[..., 1::2]
            return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)
        a, b = v[..., : head_dim // 2], v[..., head_dim // 2:]
        return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)

    def norm(v, w):
        return w * v / torch.sqrt((v * v).mean(-1, keepdim=True) + eps)

    def ffn(v, p):
        return (F.silu(v @ sd[p + ".gate_proj.weight"].T) * (v @ sd[p + ".up_proj.weight"].T)) @ sd[
            p + ".down_proj.weight"].T

    x = emb[ids]
    n_layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("model.layers."))
    for layer in range(n_layers):
        p = f"model.layers.{layer}."
        h = norm(x, sd[p + "input_layernorm.weight"])
        q = (h @ sd[p + "self_attn.q_proj.weight"].T).view(seq, heads, head_dim)
        k = (h @ sd[p + "self_attn.k_proj.weight"].T).view(seq, -1, head_dim)
        v = (h @ sd[p + "self_attn.v_proj.weight"].T).view(seq, -1, head_dim)
        if p + "self_attn.q_norm.weight" in sd:
            q, k = norm(q, sd[p + "self_attn.q_norm.weight"]), norm(k, sd[p + "self_attn.k_norm.weight"])
        q, k = rope(q), rope(k)
        rep = heads // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        scores = torch.einsum("thd,shd->hts", q, k) / math.sqrt(head_dim)
        scores = scores.masked_fill(torch.ones(seq, seq).triu(1).bool(), float("-inf"))
        attn = torch.einsum("hts,shd->thd", scores.softmax(-1), v).reshape(seq, hidden)
        x = x + attn @ sd[p + "self_attn.o_proj.weight"].T
        h = norm(x, sd[p + "post_attention_layernorm.weight"])
        if p + "mlp.gate.weight" in sd:
            y = torch.zeros_like(h)
            for t in range(seq):
                probs = (h[t] @ sd[p + "mlp.gate.weight"].T).softmax(-1)
                weights, chosen = probs.topk(top_k)
                if top_k > 1:
                    weights = weights / weights.sum()
                for w, e in zip(weights, chosen.tolist()):
                    y[t] += w * ffn(h[t], f"{p}mlp.experts.{e}")
            shared = sorted({k.split(".")[5] for k in sd if k.startswith(p + "mlp.shared_experts.")})
            for s in shared:
                y = y + ffn(h, f"{p}mlp.shared_experts.{s}")
        else:
            y = ffn(h, p + "mlp")
        x = x + y
    x = norm(x, sd["model.norm.weight"])
    return x @ sd.get("lm_head.weight", emb).T


def our_logits(model, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(ids).logits.double()


# ---------------------------------------------------------------------------------------------------
# MiniMind2 .pth import
# ---------------------------------------------------------------------------------------------------
def test_dense_pth_matches_hf_llama(tmp_path):
    sd = minimind2_state(**SIZES)
    torch.save(sd, tmp_path / "full_sft_64.pth")
    # the way out it names is a real command (chat, generate and the stages take no head count)
    with pytest.warns(UserWarning, match="assuming MiniMind2's 8; if it was trained with another count, convert it "
                                         "with `launch/convert.py from-minimind .*full_sft_64.pth "
                                         "--num-attention-heads N --out DIR`"):
        model = load_model(tmp_path / "full_sft_64.pth")
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.intermediate_size, cfg.vocab_size, cfg.use_moe, cfg.tie_word_embeddings) == (
        64, 2, 8, 2, 192, 128, False, True)

    hf_cfg = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
        vocab_size=128, rms_norm_eps=1e-5, rope_theta=1e6, max_position_embeddings=512, tie_word_embeddings=True,
        attention_bias=False, mlp_bias=False, attn_implementation="eager")
    llama = transformers.LlamaForCausalLM(hf_cfg).eval()
    llama.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    ids = torch.randint(0, 128, (2, 17))
    with torch.no_grad():
        expected = llama(ids).logits.double()
    got = our_logits(model, ids)
    assert (got - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("top_k", [1, 2])
def test_moe_pth_matches_naive_minimind2(tmp_path, top_k):
    sd = minimind2_state(hidden=64, layers=2, heads=8, kv=2, inter=96, vocab=96, experts=4, shared=1)
    torch.save(sd, tmp_path / "pretrain_64_moe.pth")
    model = interop.load_minimind_pth(tmp_path / "pretrain_64_moe.pth", num_experts_per_tok=top_k)
    cfg = model.config
    assert (cfg.use_moe, cfg.n_routed_experts, cfg.n_shared_experts, cfg.intermediate_size) == (True, 4, 1, 96)
    ids = torch.randint(0, 96, (11,))
    expected = naive_logits(sd, ids, heads=8, top_k=top_k)
    got = our_logits(model, ids[None])[0]
    assert (got - expected).abs().max().item() < 1e-4


def test_first_release_layout_with_interleaved_rope(tmp_path):
    """MiniMindLM (early 2025): Meta-style names, one unnumbered shared expert, complex-pair RoPE."""
    sd = minimind2_state(hidden=64, layers=2, heads=8, kv=2, inter=96, vocab=96, experts=4, shared=1)
    names = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
             "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
             "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm",
             "shared_experts.0.": "shared_experts.", "gate_proj": "w1", "down_proj": "w2", "up_proj": "w3",
             "mlp.": "feed_forward.", "model.embed_tokens": "tok_embeddings", "model.norm": "norm",
             "lm_head": "output", "model.layers": "layers"}
    legacy = {}
    for key, value in sd.items():
        for new, old in names.items():
            key = key.replace(new, old)
        legacy[key] = value
    assert "layers.0.feed_forward.shared_experts.w1.weight" in legacy
    torch.save(legacy, tmp_path / "full_sft_64_moe.pth")
    model = load_model(tmp_path / "full_sft_64_moe.pth")
    ids = torch.randint(0, 96, (13,))
    expected = naive_logits(sd, ids, heads=8, top_k=2, interleaved_rope=True)
    got = our_logits(model, ids[None])[0]
    assert (got - expected).abs().max().item() < 1e-4


def test_wrapped_keys_and_resume_file_load_the_same(tmp_path):
    sd = minimind2_state(**SIZES)
    torch.save(sd, tmp_path / "plain.pth")
    torch.save({f"module._orig_mod.{k}": v for k, v in sd.items()} | {"model.freqs_cos": torch.zeros(3)},
               tmp_path / "wrapped.pth")
    torch.save({"model": sd, "optimizer": {"state": {}, "param_groups": []}, "epoch": 0, "step": 5},
               tmp_path / "pretrain_64_resume.pth")
    ids = torch.randint(0, 128, (1, 9))
    ref = our_logits(load_model(tmp_path / "plain.pth"), ids)
    for name in ("wrapped.pth", "pretrain_64_resume.pth"):
        assert torch.equal(our_logits(load_model(tmp_path / name), ids), ref), name


def test_qk_norm_pth_infers_heads_from_norm(tmp_path):
    sd = minimind2_state(hidden=64, layers=1, heads=4, kv=2, inter=64, vocab=64, qk_norm=True)
    torch.save(sd, tmp_path / "m3.pth")
    model = load_model(tmp_path / "m3.pth")
    assert (model.config.qk_norm, model.config.num_attention_heads, model.config.rms_norm_eps) == (True, 4, 1e-6)
    ids = torch.randint(0, 64, (10,))
    expected = naive_logits(sd, ids, heads=4, eps=1e-6)
    assert (our_logits(model, ids[None])[0] - expected).abs().max().item() < 1e-4


def test_pth_errors_name_the_problem(tmp_path):
    sd = minimind2_state(**SIZES)
    broken = dict(sd)
    del broken["model.layers.1.mlp.up_proj.weight"]
    broken["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
    broken["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(8, 64, dtype=torch.half)
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(ValueError) as err:
        load_model(tmp_path / "broken.pth")
    msg = str(err.value)
    assert "broken.pth" in msg
    assert "missing: model.layers.1.mlp.up_proj.weight" in msg
    assert "unexpected: model.layers.0.self_attn.extra.weight" in msg
    assert "shape: model.layers.1.self_attn.k_proj.weight" in msg

    torch.save(sd, tmp_path / "ok.pth")
    with pytest.raises(ValueError, match="not divisible by num_attention_heads=7"):
        interop.load_minimind_pth(tmp_path / "ok.pth", num_attention_heads=7)
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="expected a state dict"):
        load_model(tmp_path / "list.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        load_model(tmp_path / "garbage.pth")
    torch.save({"foo.weight": torch.zeros(2)}, tmp_path / "foreign.pth")
    with pytest.raises(ValueError, match="no model.embed_tokens.weight"):
        load_model(tmp_path / "foreign.pth")
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        interop.load_minimind_pth(tmp_path / "missing.pth")
    experts = minimind2_state(hidden=64, layers=1, heads=8, kv=2, inter=32, vocab=32, experts=3)
    del experts["model.layers.0.mlp.experts.1.up_proj.weight"]
    torch.save(experts, tmp_path / "moe.pth")
    with pytest.raises(ValueError, match=r"experts \[1\] have no up_proj"):
        load_model(tmp_path / "moe.pth")


def test_untied_head_under_a_tied_config_is_refused(tmp_path):
    """Forcing tie_word_embeddings on weights with their own lm_head would drop that head silently."""
    sd = minimind2_state(**SIZES)
    sd["lm_head.weight"] = torch.randn_like(sd["lm_head.weight"])
    torch.save(sd, tmp_path / "untied.pth")
    assert not interop.load_minimind_pth(tmp_path / "untied.pth").config.tie_word_embeddings
    with pytest.raises(ValueError, match="untied.pth: .*\n.*tied: lm_head.weight differs from model.embed_tokens"):
        interop.load_minimind_pth(tmp_path / "untied.pth", tie_word_embeddings=True)


def test_interleaved_permutation_preserves_scores():
    """Rotating interleaved pairs of W x equals rotating halves of (P W) x, for every position."""
    head_dim, rows = 8, 16
    w, x = torch.randn(rows, 12, dtype=torch.float64), torch.randn(5, 12, dtype=torch.float64)
    angles = torch.arange(5, dtype=torch.float64)[:, None] * torch.rand(head_dim // 2, dtype=torch.float64)
    rot = torch.polar(torch.ones_like(angles), angles)[:, None]
    y = (x @ w.T).view(5, -1, head_dim // 2, 2)
    interleaved = torch.view_as_real(torch.view_as_complex(y.contiguous()) * rot).flatten(-2)
    z = (x @ interop.interleaved_to_half_rotation(w, head_dim).T).view(5, -1, head_dim)
    a, b = z[..., : head_dim // 2], z[..., head_dim // 2:]
    c, s = angles.cos()[:, None], angles.sin()[:, None]
    halves = torch.cat([a * c - b * s, b * c + a * s], dim=-1)
    # the same numbers, moved from (2i, 2i+1) to (i, i + D/2)
    assert torch.allclose(halves[..., : head_dim // 2], interleaved[..., 0::2])
    assert torch.allclose(halves[..., head_dim // 2:], interleaved[..., 1::2])


# ---------------------------------------------------------------------------------------------------
# Hugging Face export / import
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from minimind_fast.data.tokenizer import SPECIAL_TOKENS, save_tokenizer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the cat sat on the mat", "hello world, the end"] * 20, trainer=trainer)
    return save_tokenizer(tok, tmp_path_factory.mktemp("tok") / "tokenizer")


def _tiny_model(**overrides):
    from minimind_fast.model import MiniMindForCausalLM

    model = MiniMindForCausalLM(get_preset("tiny", vocab_size=320, num_hidden_layers=2, kernels="reference",
                                           **overrides))
    with torch.no_grad():  # give norms non-trivial weights so a transposed or dropped one shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("variant", ["llama", "llama-yarn", "qwen3-qk-norm", "untied"])
def test_export_hf_loads_in_transformers_with_equal_logits(tmp_path, tokenizer_dir, variant):
    overrides = {"llama": {}, "llama-yarn": dict(inference_rope_scaling=True, max_position_embeddings=4096),
                 "qwen3-qk-norm": dict(qk_norm=True), "untied": dict(tie_word_embeddings=False)}[variant]
    model = _tiny_model(**overrides)
    out = interop.export_hf(model, tmp_path / "hf", tokenizer_dir=tokenizer_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    expected_cls = "Qwen3ForCausalLM" if variant.startswith("qwen3") else "LlamaForCausalLM"
    assert type(hf).__name__ == expected_cls
    if variant == "llama-yarn":
        assert json.loads((out / "config.json").read_text())["rope_scaling"]["rope_type"] == "yarn"
    ids = torch.randint(0, 320, (2, 19))
    with torch.no_grad():
        expected = hf(ids).logits.double()
    got = our_logits(model, ids)
    assert (got - expected).abs().max().item() < 1e-4

    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.convert_ids_to_tokens([0, 1, 2]) == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert tok.decode(tok("the cat sat")["input_ids"]) == "the cat sat"
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2

    back = load_model(out)  # HF dir -> our model: same config, bit-identical logits (fp32 export)
    assert back.config.to_dict() | {"kernels": "reference"} == model.config.to_dict() | {"kernels": "reference"}
    assert torch.equal(our_logits(back, ids), got)


def test_yarn_table_without_extension_exports_unscaled(tmp_path):
    """max_position_embeddings <= original: MiniMind2 does not scale, so neither may the export."""
    model = _tiny_model(inference_rope_scaling=True, max_position_embeddings=2048)
    assert interop.hf_config(model.config)["rope_scaling"] is None


def test_an_attention_factor_without_extension_is_refused_not_dropped(tmp_path):
    """MiniMind2 scales cos/sin by attention_factor even when it does not extend the context; Hugging Face
    would apply it only with YaRN's interpolation: exporting without it would give other logits."""
    from minimind_fast.config import YARN_DEFAULTS

    model = _tiny_model(inference_rope_scaling=True, max_position_embeddings=2048,
                        rope_scaling=dict(YARN_DEFAULTS, attention_factor=1.25))
    plain = _tiny_model(inference_rope_scaling=True, max_position_embeddings=2048)
    ids = torch.randint(0, 320, (1, 9))
    plain.load_state_dict(model.state_dict())
    assert not torch.allclose(our_logits(model, ids), our_logits(plain, ids))  # the factor does change them
    with pytest.raises(ValueError, match="attention_factor=1.25"):
        interop.export_hf(model, tmp_path / "hf")
    assert list(tmp_path.iterdir()) == []


def test_hf_dir_written_by_transformers_loads(tmp_path):
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=1, vocab_size=100, rms_norm_eps=1e-6, rope_theta=10000.0,
                                   max_position_embeddings=256, tie_word_embeddings=False)
    llama = transformers.LlamaForCausalLM(cfg).eval()
    llama.save_pretrained(tmp_path / "llama")
    model = load_model(tmp_path / "llama")
    assert (model.config.tie_word_embeddings, model.config.num_key_value_heads, model.config.rope_theta) == (
        False, 1, 10000.0)
    ids = torch.randint(0, 100, (1, 15))
    with torch.no_grad():
        expected = llama(ids).logits.double()
    assert (our_logits(model, ids) - expected).abs().max().item() < 1e-4


def test_export_refuses_moe_and_leaves_nothing(tmp_path):
    from minimind_fast.model import MiniMindForCausalLM

    model = MiniMindForCausalLM(get_preset("tiny-moe", vocab_size=64))
    with pytest.raises(ValueError, match="MoE"):
        interop.export_hf(model, tmp_path / "hf")
    assert list(tmp_path.iterdir()) == []


def test_export_bf16_and_refuses_foreign_out_dir(tmp_path):
    model = _tiny_model()
    out = interop.export_hf(model, tmp_path / "hf16", dtype="bfloat16")
    with safe_open(out / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
        assert "lm_head.weight" not in set(f.keys())  # tied: stored once
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        interop.export_hf(model, tmp_path / "notes")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"


def test_hf_config_errors():
    base = interop.hf_config(get_preset("tiny", vocab_size=64))
    with pytest.raises(ValueError, match="architecture 'GPT2LMHeadModel'"):
        interop.config_from_hf(base | {"architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(ValueError, match="attention_bias"):
        interop.config_from_hf(base | {"attention_bias": True})
    with pytest.raises(ValueError, match="rope_type='llama3'"):
        interop.config_from_hf(base | {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}})


def test_invalid_configs_name_their_file(tmp_path):
    from minimind_fast.checkpoint import save_model_dir

    model = _tiny_model()
    ours = save_model_dir(model, tmp_path / "ours")
    hf = interop.export_hf(model, tmp_path / "hf")
    config = json.loads((ours / "model_config.json").read_text())
    hf_config = json.loads((hf / "config.json").read_text())
    (ours / "model_config.json").write_text(json.dumps(config | {"num_key_value_heads": 3}))
    with pytest.raises(ValueError, match=r"ours/model_config.json: invalid ModelConfig: num_key_value_heads=3"):
        load_model(ours)
    (ours / "model_config.json").write_text("{broken")
    with pytest.raises(ValueError, match=r"ours/model_config.json: Expecting property name"):
        load_model(ours)
    (ours / "model_config.json").write_bytes(b'{"hidden_size": "caf\xe9"}')  # was the codec's message alone
    with pytest.raises(ValueError, match=r"ours/model_config.json: 'utf-8' codec can't decode"):
        load_model(ours)
    for damaged in (b'{"architectures": "caf\xe9"}', b"{broken"):  # was "no such file: hf/model_config.json"
        (hf / "config.json").write_bytes(damaged)
        with pytest.raises(ValueError, match=r"hf/config.json: cannot read the Hugging Face config"):
            load_model(hf)
    for change, message in [({"num_key_value_heads": 3}, "num_key_value_heads=3 does not divide"),
                            ({"num_hidden_layers": "2"}, "num_hidden_layers='2' must be an integer"),
                            ({"num_attention_heads": 0, "head_dim": None}, "num_attention_heads=0 must be a positive"),
                            ({"hidden_size": 128.0}, "hidden_size=128.0 must be a positive integer")]:
        (hf / "config.json").write_text(json.dumps(hf_config | change))
        with pytest.raises(ValueError, match=r"hf/config.json: .*" + re.escape(message)):
            load_model(hf)


@pytest.mark.parametrize("config", [[1, 2], {"eos_token_id": []}, {"rope_scaling": "yarn"},
                                    {"architectures": "LlamaForCausalLM"}])
def test_a_malformed_hf_config_is_an_error_naming_it(tmp_path, capsys, config):
    main = _convert_main()
    hf = interop.export_hf(_tiny_model(), tmp_path / "hf")
    good = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps(good | config if isinstance(config, dict) else config))
    assert main(["from-hf", str(hf), "--out", str(tmp_path / "out")]) == 1
    assert f"error: {hf / 'config.json'}: " in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_truncated_weight_files_name_the_file(tmp_path):
    from minimind_fast.checkpoint import save_model_dir
    from minimind_fast.lora import LoraConfig, apply_lora, load_lora, save_lora

    model = _tiny_model()
    dirs = [save_model_dir(model, tmp_path / "ours"), interop.export_hf(model, tmp_path / "hf")]
    for d in dirs:
        data = (d / "model.safetensors").read_bytes()
        (d / "model.safetensors").write_bytes(data[: len(data) // 2])
        with pytest.raises(ValueError, match=re.escape(str(d / "model.safetensors")) + ": not a readable safetensors"):
            load_model(d)
    hf = tmp_path / "hf"
    (hf / "model.safetensors").rename(hf / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pytorch_model.bin: not a readable PyTorch checkpoint"):
        load_model(hf)
    (hf / "pytorch_model.bin").unlink()
    (hf / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(ValueError, match="model.safetensors.index.json: not a safetensors index"):
        load_model(hf)
    apply_lora(model, LoraConfig(rank=2, target_modules=["q_proj"]))
    adapter = save_lora(model, tmp_path / "adapter")
    (adapter / "adapter.safetensors").write_bytes(b"\x00" * 12)
    with pytest.raises(ValueError, match="adapter.safetensors: not a readable safetensors"):
        load_lora(_tiny_model(), adapter)


# ---------------------------------------------------------------------------------------------------
# The CLI
# ---------------------------------------------------------------------------------------------------
def _convert_main():
    spec = importlib.util.spec_from_file_location("convert_cli", REPO / "launch" / "convert.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_convert_cli_round_trip(tmp_path, tokenizer_dir, capsys):
    main = _convert_main()
    sd = minimind2_state(hidden=64, layers=2, heads=4, kv=2, inter=192, vocab=320)
    torch.save(sd, tmp_path / "full_sft_64.pth")
    assert main(["from-minimind", str(tmp_path / "full_sft_64.pth"), "--out", str(tmp_path / "ours"),
                 "--tokenizer", str(tokenizer_dir), "--num-attention-heads", "4",
                 "--set", "max_position_embeddings=1024"]) == 0
    assert (tmp_path / "ours" / "tokenizer.json").exists()
    ours = load_model(tmp_path / "ours")
    assert (ours.config.num_attention_heads, ours.config.max_position_embeddings) == (4, 1024)
    assert main(["to-hf", str(tmp_path / "ours"), "--out", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "tokenizer.json").exists()  # taken from beside the weights
    assert main(["from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    ids = torch.randint(0, 320, (1, 12))
    expected = naive_logits(sd, ids[0], heads=4)
    for name in ("ours", "hf", "back"):
        assert (our_logits(load_model(tmp_path / name), ids)[0] - expected).abs().max().item() < 1e-4, name

    assert main(["from-minimind", str(tmp_path / "nope.pth"), "--out", str(tmp_path / "x")]) == 1
    assert "nope.pth" in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("a file, not a directory")
    assert main(["to-hf", str(tmp_path / "ours"), "--out", str(tmp_path / "notes.txt" / "a" / "hf")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "notes.txt" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()
    for bad, message in (("hidden-size=64", "'hidden-size' is not a ModelConfig field"),
                         ("hidden_size", "expected NAME=VALUE")):
        assert main(["from-minimind", str(tmp_path / "full_sft_64.pth"), "--out", str(tmp_path / "x"),
                     "--num-attention-heads", "4", "--set", bad]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"error: --set {bad!r}: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("kind, needle", [
    ("directory", "a directory, not a file"),
    ("empty", "an empty file"),
    ("text", "not a readable PyTorch checkpoint"),
    ("binary", "not a readable PyTorch checkpoint (UnpicklingError: Unsupported global"),
    ("pickled-model", "not a readable PyTorch checkpoint (UnpicklingError: Unsupported global: "
                      "GLOBAL torch.nn.modules.linear.Linear"),
    ("trainer-state", "found a dict with non-tensor entries ('step': int)"),
    ("empty-dict", "found an empty dict"),
    ("other-model", "no model.embed_tokens.weight: not a MiniMind2 state dict (its keys begin: bert."),
])
def test_from_minimind_names_a_file_that_is_no_minimind_checkpoint(tmp_path, capsys, kind, needle):
    """A directory was "no such file"; torch's refusals spread over several lines of advice to load the file
    as trusted code; a dict of other things was "found dict". Each is one line naming the file, what it is and
    what was expected."""
    path = tmp_path / "model.pth"
    if kind == "directory":
        path.mkdir()
    elif kind in ("empty", "text", "binary"):
        path.write_bytes({"empty": b"", "text": b"hello\n", "binary": b"caf\xe9"}[kind])
    else:
        obj = {"pickled-model": torch.nn.Linear(2, 2), "trainer-state": {"step": 3, "lr": 0.1}, "empty-dict": {},
               "other-model": {"bert.embeddings.word_embeddings.weight": torch.zeros(4, 4)}}[kind]
        torch.save(obj, path)
    assert _convert_main()(["from-minimind", str(path), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: ") and needle in err and err.count("\n") == 1, err
    assert "MiniMind" in err and not (tmp_path / "out").exists(), err


def test_convert_refuses_a_tokenizer_other_than_the_models_own(tmp_path, tokenizer_dir, capsys):
    """Every conversion that writes a model with a tokenizer refuses a --tokenizer with another tokenizer.json
    than the model's own, naming both, and writes nothing; restating the model's own is accepted."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from minimind_fast.checkpoint import save_model_dir
    from minimind_fast.data.tokenizer import SPECIAL_TOKENS, save_tokenizer
    from minimind_fast.lora import LoraConfig, apply_lora, save_lora

    other = Tokenizer(models.BPE())
    other.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    other.decoder = decoders.ByteLevel()
    other.train_from_iterator(["dogs run in the park"] * 20, trainer=trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    other_dir = save_tokenizer(other, tmp_path / "other")
    main = _convert_main()
    model = _tiny_model()
    save_model_dir(model, tmp_path / "base", tokenizer_dir=tokenizer_dir)
    apply_lora(model, LoraConfig(rank=4, target_modules=["q_proj"]))
    save_lora(model, tmp_path / "adapter")
    assert main(["to-hf", str(tmp_path / "base"), "--out", str(tmp_path / "hf")]) == 0
    commands = {"to-hf": [str(tmp_path / "base")], "from-hf": [str(tmp_path / "hf")],
                "merge-lora": [str(tmp_path / "base"), "--lora", str(tmp_path / "adapter")]}
    for command, args in commands.items():
        out = tmp_path / f"out-{command}"
        assert main([command, *args, "--out", str(out), "--tokenizer", str(other_dir)]) == 1, command
        err = capsys.readouterr().err
        assert f"error: --tokenizer {other_dir} is not the tokenizer of the model {args[0]}" in err, (command, err)
        assert not out.exists(), command
        assert main([command, *args, "--out", str(out), "--tokenizer", str(tokenizer_dir)]) == 0, command
        assert (out / "tokenizer.json").read_bytes() == (tokenizer_dir / "tokenizer.json").read_bytes()


def test_convert_cli_merge_lora_and_refuses_foreign_out(tmp_path):
    from minimind_fast.checkpoint import save_model_dir
    from minimind_fast.lora import LoraConfig, apply_lora, save_lora

    main = _convert_main()
    model = _tiny_model()
    save_model_dir(model, tmp_path / "base")
    apply_lora(model, LoraConfig(rank=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora" in name:
                p.normal_(std=0.2)
    save_lora(model, tmp_path / "adapter")
    ids = torch.randint(0, 320, (1, 9))
    expected = our_logits(model, ids)
    assert main(["merge-lora", str(tmp_path / "base"), "--lora", str(tmp_path / "adapter"),
                 "--out", str(tmp_path / "merged")]) == 0
    merged = load_model(tmp_path / "merged")
    assert (our_logits(merged, ids) - expected).abs().max().item() < 1e-4
    assert (our_logits(merged, ids) - our_logits(load_model(tmp_path / "base"), ids)).abs().max().item() > 1e-3

    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "keep.txt").write_text("mine")
    for argv in (["to-hf", str(tmp_path / "base"), "--out", str(tmp_path / "docs")],
                 ["from-hf", str(tmp_path / "base"), "--out", str(tmp_path / "docs")],
                 ["to-hf", str(tmp_path / "merged"), "--out", str(tmp_path / "base")]):
        assert main(argv) == 1, argv
    assert (tmp_path / "docs" / "keep.txt").read_text() == "mine"
    assert (tmp_path / "base" / "model_config.json").exists()


def test_a_failed_swap_keeps_the_previous_output(tmp_path, monkeypatch):
    """Replacing an existing model or export directory: if moving the new one in fails, the old one is
    still whole at --out and no temporary directory is left beside it."""
    import os

    from minimind_fast import checkpoint

    first, second = _tiny_model(), _tiny_model()
    out = checkpoint.save_model_dir(first, tmp_path / "model")
    ids = torch.randint(0, 320, (1, 7))
    real_replace = os.replace

    def failing_replace(src, dst):
        if Path(src).name.startswith(".model.tmp-"):
            raise OSError("disk unplugged")
        return real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk unplugged"):
        checkpoint.save_model_dir(second, out)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert torch.equal(our_logits(load_model(out), ids), our_logits(first, ids))
    checkpoint.save_model_dir(second, out)  # and a swap that works replaces it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert torch.equal(our_logits(load_model(out), ids), our_logits(second, ids))


def test_to_hf_of_a_lora_run_exports_the_merged_model_not_its_base(tmp_path):
    from minimind_fast.checkpoint import save_model_dir
    from minimind_fast.lora import LoraConfig, apply_lora, save_lora

    main = _convert_main()
    model = _tiny_model()
    save_model_dir(model, tmp_path / "run" / "final")  # a LoRA run: base weights, adapter beside them
    apply_lora(model, LoraConfig(rank=4, target_modules=["q_proj", "up_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)
    save_lora(model, tmp_path / "run" / "final" / "adapter")
    run = str(tmp_path / "run")
    ids = torch.randint(0, 320, (1, 9))
    assert main(["to-hf", run, "--out", str(tmp_path / "hf")]) == 0
    assert main(["merge-lora", run, "--lora", run, "--out", str(tmp_path / "merged")]) == 0
    assert main(["to-hf", str(tmp_path / "merged"), "--out", str(tmp_path / "hf2")]) == 0
    for out in ("hf", "hf2"):  # both the fine-tuned model: base + adapter
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / out, attn_implementation="eager").eval()
        with torch.no_grad():
            got = hf(ids).logits.double()
        assert (got - our_logits(model, ids)).abs().max().item() < 1e-4, out


# ---------------------------------------------------------------------------------------------------
# Against MiniMind2's own model file (a checkout named by MINIMIND_REPO; nothing of it is copied here)
# ---------------------------------------------------------------------------------------------------
def _minimind_module():
    import importlib.util
    import os
    import sys

    repo = os.environ.get("MINIMIND_REPO")
    path = Path(repo or ".") / "model" / "model_minimind.py"
    if not repo or not path.exists():
        pytest.skip("set MINIMIND_REPO to a MiniMind2 checkout (model/model_minimind.py) to compare against it")
    name = "minimind_upstream_for_interop_tests"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.mark.parametrize("variant", ["dense", "dense-yarn", "moe-top2", "moe-top1-yarn"])
def test_minimind2_checkpoint_through_every_conversion_matches_minimind2(tmp_path, variant):
    """MiniMind2's model saves a .pth; from-minimind, and for dense models to-hf (loaded by transformers)
    and from-hf back, all give MiniMind2's own logits, in float64."""
    mm = _minimind_module()
    yarn, moe = variant.endswith("yarn"), variant.startswith("moe")
    top_k = 1 if "top1" in variant else 2
    cfg = mm.MiniMindConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                            vocab_size=96, max_position_embeddings=4096, inference_rope_scaling=yarn,
                            use_moe=moe, num_experts_per_tok=top_k)
    theirs = mm.MiniMindForCausalLM(cfg).double().eval()
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "norm" in name:  # non-trivial norms, so a dropped or misplaced one shows
                p.add_(0.1 * torch.randn_like(p))
    torch.save({k: v.half() for k, v in theirs.state_dict().items()}, tmp_path / "model.pth")
    theirs.load_state_dict({k: v.half().double() for k, v in theirs.state_dict().items()})  # what the .pth holds
    ids = torch.randint(0, 96, (2, 33))
    with torch.no_grad():
        expected = theirs(ids).logits

    main = _convert_main()
    args = ["--set", "max_position_embeddings=4096", "--set", f"num_experts_per_tok={top_k}"] + (["--yarn"] * yarn)
    assert main(["from-minimind", str(tmp_path / "model.pth"), "--out", str(tmp_path / "ours")] + args) == 0
    ours = load_model(tmp_path / "ours").double()
    assert (ours.config.use_moe, ours.config.rope_scaling is not None) == (moe, yarn)
    assert (our_logits(ours, ids) - expected).abs().max().item() < 1e-5
    if yarn:  # the scaling is live at these positions: the unscaled model is far off
        plain = MiniMindForCausalLM(ours.config.replace(inference_rope_scaling=False, rope_scaling=None)).double()
        plain.load_state_dict(ours.state_dict())
        assert (our_logits(plain, ids) - expected).abs().max().item() > 1e-3
    if moe:
        return
    assert main(["to-hf", str(tmp_path / "ours"), "--out", str(tmp_path / "hf")]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager")
    with torch.no_grad():
        assert (hf.double().eval()(ids).logits - expected).abs().max().item() < 1e-5
    assert main(["from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    back = load_model(tmp_path / "back")
    assert back.config.to_dict() == load_model(tmp_path / "ours").config.to_dict()
    assert (our_logits(back.double(), ids) - expected).abs().max().item() < 1e-5


def test_out_may_be_the_current_directory(tmp_path, monkeypatch):
    """`--out .` from inside an empty directory: `.` has no name to put the temporary sibling beside."""
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    model = _tiny_model()
    interop.export_hf(model, ".")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here"]
    ids = torch.randint(0, 320, (1, 6))
    assert torch.equal(our_logits(load_model(tmp_path / "here"), ids), our_logits(model, ids))


@pytest.mark.parametrize("text", ["5", "null", '"architectures"', "[1]"])
def test_a_config_json_that_is_no_object_is_not_taken_for_a_hugging_face_export(tmp_path, text):
    """`is_hf_dir` read `"architectures" in <JSON value>`: a number or null raised TypeError (a traceback in
    chat, LoRA and load_model), and a JSON string containing the word counted as an export."""
    from minimind_fast.checkpoint import is_hf_dir

    (tmp_path / "config.json").write_text(text)
    assert not is_hf_dir(tmp_path)
