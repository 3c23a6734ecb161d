"""LoRA adapters: exact math against a hand computation, frozen base, save/load, merge."""

from __future__ import annotations

import pytest
import torch

from minimind_fast import MiniMindForCausalLM, get_preset
from minimind_fast.lora import (
    LoraConfig,
    LoraLinear,
    apply_lora,
    base_state_dict,
    load_lora,
    merge_lora,
    save_lora,
)


def _model(**kw):
    torch.manual_seed(0)
    return MiniMindForCausalLM(get_preset("tiny", num_hidden_layers=2, vocab_size=128, hidden_size=64,
                                          kernels="reference", **kw))


def _randomise_adapters(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoraLinear):
                m.lora_B.normal_(std=0.05)


def test_lora_linear_equals_formula():
    base = torch.nn.Linear(12, 5, bias=False).double()
    cfg = LoraConfig(rank=3, alpha=6.0)
    layer = LoraLinear(base, cfg)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 12, dtype=torch.float64)
    expected = x @ (base.weight + 2.0 * layer.lora_B @ layer.lora_A).t()
    torch.testing.assert_close(layer(x), expected)


def test_every_projection_adapted_even_under_gqa_and_base_frozen():
    model = _model()
    names = apply_lora(model, LoraConfig(rank=4))
    # q, k, v, o and the 3 MLP projections in each of the 2 layers: k/v are not square under GQA.
    assert len(names) == 2 * 7
    assert any(n.endswith("k_proj") for n in names)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    x = torch.randint(0, 128, (2, 16))
    model(x, targets=x).loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if ".lora_" not in n)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters()
               if "lora_A" in n or "lora_B" in n)


def test_save_load_and_merge_keep_the_function(tmp_path):
    model = _model()
    apply_lora(model, LoraConfig(rank=4, alpha=8))
    _randomise_adapters(model)
    model.eval()
    x = torch.randint(0, 128, (2, 12))
    want = model(x).logits
    save_lora(model, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter.safetensors").stat().st_size < 200_000

    fresh = _model()
    load_lora(fresh, tmp_path / "adapter").eval()
    torch.testing.assert_close(fresh(x).logits, want)

    merged_state = base_state_dict(fresh)
    merge_lora(fresh)
    assert not any(isinstance(m, LoraLinear) for m in fresh.modules())
    torch.testing.assert_close(fresh(x).logits, want, rtol=1e-5, atol=1e-5)
    plain = _model()
    plain.load_state_dict(merged_state)
    torch.testing.assert_close(plain.eval()(x).logits, want, rtol=1e-5, atol=1e-5)


def test_load_lora_reports_a_mismatched_adapter(tmp_path):
    model = _model()
    apply_lora(model, LoraConfig(rank=4))
    save_lora(model, tmp_path / "a")
    other = MiniMindForCausalLM(get_preset("tiny", num_hidden_layers=2, vocab_size=128, hidden_size=32,
                                           kernels="reference"))
    try:
        load_lora(other, tmp_path / "a")
    except ValueError as e:
        assert "adapter does not fit" in str(e)
    else:
        raise AssertionError("mismatched adapter loaded silently")


def test_merge_in_float64_equals_base_plus_adapter_forward():
    """Merging must not round through fp32: in float64 the merged model is the adapted one to 1e-12."""
    model = _model().double()
    apply_lora(model, LoraConfig(rank=4, alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"]))
    _randomise_adapters(model)
    model.eval()
    x = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        want = model(x).logits
        merge_lora(model)
        got = model(x).logits
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_a_malformed_adapter_config_names_the_file(tmp_path):
    model = _model()
    apply_lora(model, LoraConfig(rank=2, target_modules=["q_proj"]))
    save_lora(model, tmp_path / "a")
    config = tmp_path / "a" / "adapter_config.json"
    for text, message in [('{"rank": 2, "target_modules": ["q_proj"], "use_dora": true}', "unknown field"),
                          ('{"rank": "2", "target_modules": ["q_proj"]}', "rank must be a positive integer"),
                          ('{"rank": 2, "target_modules": "q_proj"}', "target_modules must be a list"),
                          ('{"rank": 2, "dropout": 1.0, "target_modules": ["q_proj"]}', "dropout must be in"),
                          ("[2]", "expected a JSON object"), ("{oops", "Expecting property name")]:
        config.write_text(text)
        with pytest.raises(ValueError, match="adapter_config.json: .*" + message):
            load_lora(_model(), tmp_path / "a")
