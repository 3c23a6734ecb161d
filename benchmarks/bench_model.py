"""A full training step per preset: forward with the fused loss, backward, AdamW step.

Implementations (the same model, weights and batch):

- ``eager``     reference ops (`kernels="reference"`), no compilation;
- ``compile``   the same model under `torch.compile`;
- ``ours``      the Triton op table (`kernels="triton"`; ops without a kernel yet stay reference,
                listed in the case's `reference_ops`);
- ``minimind``  (MoE presets) reference ops with MiniMind2's loop-over-experts MoE.

On CUDA the weights are bf16 with a fused AdamW, as under the engine's DeepSpeed bf16 config
(which also keeps an fp32 master copy: its optimizer step costs more than this one); on the CPU,
fp32. Reported: tokens/s, MFU against the datasheet's bf16 peak and against the measured matmul
rate (formula in `common.py`), and the whole peak GPU memory (weights, gradients, optimizer state,
activations).
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from common import loop_moe_experts, measure, peak_memory_mb, training_step
from minimind_fast.kernels import triton_ops

from minimind_fast.config import get_preset
from minimind_fast.model import MiniMindForCausalLM
from minimind_fast.ops import OP_NAMES, REFERENCE
from minimind_fast.training.flops import model_flops_per_token

IMPLS = ("eager", "minimind", "compile", "ours")


def step_cases(full: bool) -> list[dict]:
    """(preset, seq_len, batch); the full run keeps 16k tokens per step at both lengths."""
    if not full:
        return [dict(preset="tiny", seq=256, batch=4), dict(preset="small-26m", seq=256, batch=1)]
    return [dict(preset=p, seq=s, batch=16384 // s)
            for p in ("small-26m", "base-104m", "moe-145m") for s in (512, 2048)]


def pytest_generate_tests(metafunc):
    if {"case", "impl"} <= set(metafunc.fixturenames):
        full = metafunc.config.getoption("--gpu-sizes") or os.environ.get("BENCH_FULL") == "1"
        params = [(c, i) for c in step_cases(full) for i in IMPLS]
        metafunc.parametrize(("case", "impl"), params, ids=[f"{case_id(c)}-{i}" for c, i in params])


def case_id(case: dict) -> str:
    return f"{case['preset']} seq={case['seq']} batch={case['batch']}"


def build_model(bench, preset: str, impl: str) -> MiniMindForCausalLM:
    config = get_preset(preset, kernels="triton" if impl == "ours" else "reference",
                        max_position_embeddings=4096)
    if impl == "minimind" and not config.use_moe:
        pytest.skip("the MiniMind-style baseline differs from eager only in the MoE layer")
    if impl == "ours" and not bench.cuda:
        pytest.skip("ours kernels need CUDA (Triton interpreter timings are meaningless)")
    torch.manual_seed(0)
    model = MiniMindForCausalLM(config).to(bench.device, bench.dtype)
    if impl == "minimind":
        table = dataclasses.replace(REFERENCE, name="minimind", moe_experts=loop_moe_experts)
        for module in model.modules():
            if hasattr(module, "ops"):
                module.ops = table
    return model.train()


def test_train_step(bench, benchmark, case, impl):
    if impl == "compile":
        if not bench.cuda and not bench.full:
            pytest.skip("compiling a whole model takes minutes on a CPU; run with --gpu-sizes to include it")
        bench.require_compile_budget()
    model = build_model(bench, case["preset"], impl)
    forward = torch.compile(model) if impl == "compile" else model
    step = training_step(model, forward, case["batch"], case["seq"], bench.device)
    try:
        first_s = bench.warm_up(step, impl)
    except torch.OutOfMemoryError:
        pytest.skip(f"{impl} runs out of GPU memory at {case_id(case)}")
    except Exception as exc:
        if impl == "compile":
            pytest.skip(f"torch.compile failed on {case_id(case)}: {type(exc).__name__}: {exc}"[:300])
        raise
    timing = measure(benchmark, step, target_s=2.0, cuda_rep_ms=200, max_rounds=20, first_s=first_s)
    tokens = case["batch"] * case["seq"]
    dtype = str(bench.dtype).removeprefix("torch.")
    extra = {}
    if impl == "ours":
        extra["reference_ops"] = [n for n in OP_NAMES if n not in triton_ops()]
    bench.record(benchmark, suite="model", group=f"train step {case_id(case)} {dtype}", impl=impl,
                 timing=timing, shape=dict(case), dtype=dtype,
                 peak_mem_MB=peak_memory_mb(step, absolute=True), tokens=tokens,
                 model_flops=model_flops_per_token(model.config, case["seq"]) * tokens,
                 params=model.num_parameters(), **extra)
    del model, forward, step
    if bench.cuda:
        torch.cuda.empty_cache()
