"""Decode throughput of `small-26m`: our `generate` against Hugging Face `generate`, batch 1 and 16.

Both models hold the same weights (MiniMind2's parameter names are Llama's) and decode greedily a
fixed number of new tokens after a 16-token prompt, stopping on nothing. tokens/s counts new tokens
over the whole call, prefill included, in both. On CUDA the weights are bf16.
"""

from __future__ import annotations

import pytest
import torch
from common import measure

from minimind_fast.config import ModelConfig, get_preset
from minimind_fast.model import MiniMindForCausalLM

PROMPT_LEN = 16
IMPLS = ("hf", "ours")


def pytest_generate_tests(metafunc):
    if {"batch", "impl"} <= set(metafunc.fixturenames):
        params = [(b, i) for b in (1, 16) for i in IMPLS]
        metafunc.parametrize(("batch", "impl"), params, ids=[f"batch={b}-{i}" for b, i in params])


def new_tokens(bench) -> int:
    return 256 if (bench.cuda or bench.full) else 8


def hf_llama(config: ModelConfig, ours: MiniMindForCausalLM):
    """A `LlamaForCausalLM` of the same shape, loaded with our weights."""
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError as exc:
        pytest.skip(f"transformers not importable: {exc}")
    hf_config = LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_key_value_heads,
        max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.rms_norm_eps,
        rope_theta=config.rope_theta, tie_word_embeddings=config.tie_word_embeddings,
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id)
    model = LlamaForCausalLM(hf_config)
    missing, unexpected = model.load_state_dict(ours.state_dict(), strict=False)
    if unexpected or [k for k in missing if "rotary" not in k]:
        raise AssertionError(f"weights do not map onto Llama: missing {missing}, unexpected {unexpected}")
    return model


def decode_call(bench, impl: str, model, hf_model, prompts: torch.Tensor, n_new: int):
    if impl == "ours":
        try:
            from minimind_fast.generation import GenerationConfig, generate
        except ImportError as exc:
            pytest.skip(f"minimind_fast.generation not available yet: {exc}")
        gen = GenerationConfig(max_new_tokens=n_new, temperature=0.0, stop_token_ids=[])
        rows = prompts.tolist()

        def run():
            out = generate(model, rows, gen)
            assert all(len(r) == n_new for r in out), "generation stopped early"

        return run
    mask = torch.ones_like(prompts)

    @torch.inference_mode()
    def run():
        out = hf_model.generate(input_ids=prompts, attention_mask=mask, max_new_tokens=n_new,
                                min_new_tokens=n_new, do_sample=False, pad_token_id=0)
        assert out.shape[1] == prompts.shape[1] + n_new

    return run


def test_decode(bench, benchmark, batch, impl):
    config = get_preset("small-26m", kernels="auto", max_position_embeddings=4096)
    torch.manual_seed(0)
    model = MiniMindForCausalLM(config).eval()
    hf_model = hf_llama(config, model) if impl == "hf" else None
    model = model.to(bench.device, bench.dtype)
    if hf_model is not None:
        hf_model = hf_model.to(bench.device, bench.dtype).eval()
    n_new = new_tokens(bench)
    prompts = torch.randint(3, config.vocab_size, (batch, PROMPT_LEN), device=bench.device)
    run = decode_call(bench, impl, model, hf_model, prompts, n_new)
    first_s = bench.warm_up(run, impl)
    timing = measure(benchmark, run, target_s=2.0, max_rounds=5, wall=True, first_s=first_s)
    dtype = str(bench.dtype).removeprefix("torch.")
    shape = dict(batch=batch, prompt=PROMPT_LEN, new_tokens=n_new)
    bench.record(benchmark, suite="decode", group=f"decode small-26m batch={batch} new={n_new} {dtype}",
                 impl=impl, timing=timing, shape=shape, dtype=dtype, tokens=batch * n_new)
