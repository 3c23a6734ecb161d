"""LoRA adapters: exact math against a hand computation, frozen base, save/load, merge."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from minimind_fast import MiniMindForCausalLM, get_preset
from minimind_fast.lora import (
    LoraConfig,
    LoraExpertBank,
    LoraLinear,
    apply_lora,
    base_state_dict,
    load_lora,
    merge_lora,
    resolve_adapter_dir,
    save_lora,
)
from minimind_fast.training.lora_stage import adapted_projections


def _model(preset="tiny", **kw):
    torch.manual_seed(0)
    return MiniMindForCausalLM(get_preset(preset, num_hidden_layers=2, vocab_size=128, hidden_size=64,
                                          kernels="reference", **kw))


def _saved_adapted_model(preset: str, adapter_dir):
    """A model of `preset` with random (nonzero) adapters saved to `adapter_dir`, an input and its logits."""
    model = _model(preset)
    apply_lora(model, LoraConfig(rank=4, alpha=8))
    _randomise_adapters(model)
    model.eval()
    x = torch.randint(0, 128, (2, 12))
    want = model(x).logits
    save_lora(model, adapter_dir)
    return model, x, want


def _randomise_adapters(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoraLinear):
                m.lora_B.normal_(std=0.05)
            elif isinstance(m, LoraExpertBank):
                for b in m.lora_B.values():
                    b.normal_(std=0.05)


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
    model, x, want = _saved_adapted_model("tiny", tmp_path / "adapter")
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


def test_lora_expert_bank_forward_and_gradients_equal_a_per_token_float64_reference():
    model = _model("tiny-moe").double()
    cfg = LoraConfig(rank=3, alpha=6.0)
    apply_lora(model, cfg)
    _randomise_adapters(model)
    mlp = model.model.layers[0].mlp.eval()
    bank = mlp.experts
    assert isinstance(bank, LoraExpertBank) and set(bank.lora_A) == {"gate_proj", "up_proj", "down_proj"}
    n_experts, inter, hidden = bank.base.gate_proj.shape
    assert bank.lora_A["gate_proj"].shape == (n_experts, 3, hidden)
    assert bank.lora_B["down_proj"].shape == (n_experts, hidden, 3)
    x = torch.randn(1, 10, hidden, dtype=torch.float64)
    y, _ = mlp(x)
    probe = torch.randn_like(y)
    (y * probe).sum().backward()

    ref = {name: p.detach().clone().requires_grad_(True) for name, p in bank.named_parameters()
           if name.startswith("lora_")}
    base = {name: getattr(bank.base, name).detach() for name in ("gate_proj", "up_proj", "down_proj")}
    flat = x[0]
    probs = torch.softmax(flat @ mlp.gate.weight.detach().t(), dim=-1)
    top_w, top_i = probs.topk(model.config.num_experts_per_tok, dim=-1)
    if model.config.norm_topk_prob:
        top_w = top_w / top_w.sum(-1, keepdim=True)
    rows = []
    for t in range(flat.shape[0]):
        out = torch.zeros(hidden, dtype=torch.float64)
        for w, e in zip(top_w[t], top_i[t].tolist()):
            weight = {name: base[name][e] + 2.0 * ref[f"lora_B.{name}"][e] @ ref[f"lora_A.{name}"][e]
                      for name in base}
            h = torch.nn.functional.silu(weight["gate_proj"] @ flat[t]) * (weight["up_proj"] @ flat[t])
            out = out + w * (weight["down_proj"] @ h)
        rows.append(out)
    with torch.no_grad():
        shared = sum(expert(x) for expert in mlp.shared_experts)[0]
    want = torch.stack(rows) + shared
    torch.testing.assert_close(y[0].detach(), want.detach(), rtol=0, atol=1e-12)
    (want * probe[0]).sum().backward()
    for name, p in bank.named_parameters():
        if name.startswith("lora_"):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
            torch.testing.assert_close(p.grad, ref[name].grad, rtol=0, atol=1e-11, msg=name)
    assert all(p.grad is None for p in bank.base.parameters())


def test_moe_adapters_at_init_leave_the_logits_exactly_and_include_the_experts():
    base, model = _model("tiny-moe").eval(), _model("tiny-moe").eval()
    names = apply_lora(model, LoraConfig(rank=4))
    assert sum(n.endswith("mlp.experts") for n in names) == 2
    x = torch.randint(0, 128, (2, 12))
    assert torch.equal(model(x).logits, base(x).logits)
    some = _model("tiny-moe")
    apply_lora(some, LoraConfig(rank=4, target_modules=["q_proj", "up_proj"]))
    mlp = some.model.layers[0].mlp
    assert set(mlp.experts.lora_A) == {"up_proj"} and set(mlp.experts.lora_B) == {"up_proj"}
    assert isinstance(mlp.shared_experts[0].up_proj, LoraLinear)
    assert not isinstance(mlp.shared_experts[0].gate_proj, LoraLinear)
    dense = _model("tiny-moe")
    apply_lora(dense, LoraConfig(rank=4, target_modules=["q_proj", "v_proj"]))
    assert not any(isinstance(m, LoraExpertBank) for m in dense.modules())
    # the stage's start-up line counts each expert's projection, not each layer's bank as one
    n_experts = some.config.n_routed_experts
    # q_proj and the shared expert's up_proj in each of 2 layers; up_proj of each routed expert
    assert adapted_projections(some) == (f"{2 + 2} projections and {2 * n_experts} routed-expert projections "
                                         "(2 layers' experts)")
    assert adapted_projections(dense) == "4 projections"


def test_moe_save_load_and_merge_keep_the_function(tmp_path):
    model, x, want = _saved_adapted_model("tiny-moe", tmp_path / "adapter")
    assert any(".experts.lora_A.gate_proj" in k for k in load_file(str(tmp_path / "adapter" / "adapter.safetensors")))

    fresh = _model("tiny-moe")
    load_lora(fresh, tmp_path / "adapter").eval()
    assert any(isinstance(m, LoraExpertBank) for m in fresh.modules())
    torch.testing.assert_close(fresh(x).logits, want, rtol=0, atol=0)

    merged_state = base_state_dict(fresh)
    assert merged_state.keys() == _model("tiny-moe").state_dict().keys()
    merge_lora(fresh)
    assert not any(isinstance(m, (LoraLinear, LoraExpertBank)) for m in fresh.modules())
    assert not any("lora" in k or ".base." in k for k in fresh.state_dict())
    torch.testing.assert_close(fresh(x).logits, want, rtol=1e-5, atol=1e-5)
    plain = _model("tiny-moe")
    plain.load_state_dict(merged_state)
    torch.testing.assert_close(plain.eval()(x).logits, want, rtol=1e-5, atol=1e-5)


def test_a_dense_only_adapter_from_before_expert_lora_still_loads_into_an_moe_model(tmp_path):
    """Its config names gate/up/down_proj (the defaults) but it holds no expert weights."""
    model = _model("tiny-moe")
    apply_lora(model, LoraConfig(rank=4, alpha=8), experts=False)  # what apply_lora built before
    _randomise_adapters(model)
    model.eval()
    save_lora(model, tmp_path / "old")
    saved = load_file(str(tmp_path / "old" / "adapter.safetensors"))
    assert saved and not any(".experts." in k for k in saved)
    assert "gate_proj" in json.loads((tmp_path / "old" / "adapter_config.json").read_text())["target_modules"]
    x = torch.randint(0, 128, (2, 12))
    fresh = load_lora(_model("tiny-moe"), tmp_path / "old").eval()
    assert not any(isinstance(m, LoraExpertBank) for m in fresh.modules())
    torch.testing.assert_close(fresh(x).logits, model(x).logits, rtol=0, atol=0)
    assert (fresh(x).logits - _model("tiny-moe").eval()(x).logits).abs().max() > 1e-4


def test_a_run_dirs_adapter_comes_from_its_newest_complete_checkpoint(tmp_path):
    """A checkpoint killed before its COMPLETE marker may hold a half-written adapter: never the one taken."""
    for step, complete in ((4, True), (8, False)):
        adapter = tmp_path / "checkpoints" / f"step_{step:08d}" / "model" / "adapter"
        adapter.mkdir(parents=True)
        (adapter / "adapter_config.json").write_text("{}")
        if complete:
            (tmp_path / "checkpoints" / f"step_{step:08d}" / "COMPLETE").write_text(f"step {step}\n")
    assert resolve_adapter_dir(tmp_path) == tmp_path / "checkpoints" / "step_00000004" / "model" / "adapter"
