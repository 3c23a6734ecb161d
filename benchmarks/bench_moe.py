"""The routed MoE layer (router + top-k + experts), forward + backward, against its baselines.

Implementations, all on the same tokens and weights:

- ``minimind``  MiniMind2's training path: tokens repeated k times and a loop over experts
                (`common.loop_moe_experts`); the target is ours >= 3x this;
- ``eager``     the reference ops: softmax top-k routing, tokens sorted by expert, one matmul each;
- ``compile``   torch.compile of the eager layer;
- ``liger``     Liger-Kernel's fused MoE (`LigerFusedMoEFunction`) where installed;
- ``grouped_mm`` ours with the expert GEMMs on torch's grouped GEMM (`moe_experts_grouped_mm`, bf16 on
                CUDA): the same routing, sort and SwiGLU kernels, CUTLASS's GEMMs instead of ours;
- ``ours``      the Triton `moe_route` + `moe_experts`;
- ``dense``     a dense SwiGLU of width k * I: the same active FLOPs, the ceiling an MoE layer can
                reach (target: ours within 1.5x of it).

Shared experts are left out: they are a dense FFN identical in every variant.
FLOPs counted: 18 * N * k * H * I (three matmuls, forward 2 + backward 4 per multiply-add) + the
router's 6 * N * H * E.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch
from common import forward_backward, loop_moe_experts, measure, peak_memory_mb
from minimind_fast.kernels import reference, triton_ops

IMPLS = ("minimind", "eager", "compile", "liger", "grouped_mm", "ours", "dense")


def moe_shapes(full: bool) -> list[dict]:
    """moe-145m's layer (H=640, I=1728, 4 experts, top-2) and Liger's benchmark sizes (H=2048, 8/128)."""
    if not full:
        return [dict(N=256, H=640, I=1728, E=4, k=2)]
    return [
        dict(N=8192, H=640, I=1728, E=4, k=2),
        dict(N=8192, H=2048, I=1408, E=8, k=2),
        dict(N=8192, H=2048, I=768, E=128, k=8),
    ]


def pytest_generate_tests(metafunc):
    if {"shape", "impl"} <= set(metafunc.fixturenames):
        full = metafunc.config.getoption("--gpu-sizes") or os.environ.get("BENCH_FULL") == "1"
        params = [(s, i) for s in moe_shapes(full) for i in IMPLS]
        metafunc.parametrize(("shape", "impl"), params, ids=[f"{shape_id(s)}-{i}" for s, i in params])


def shape_id(shape: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items())


def make_weights(shape: dict, device, dtype) -> list[torch.Tensor]:
    """x (N, H) and the router and expert weights, MiniMind's init scale (std 0.02)."""
    N, H, inter, E = shape["N"], shape["H"], shape["I"], shape["E"]

    def p(*size, std=0.02):
        return (std * torch.randn(*size, device=device)).to(dtype).requires_grad_()

    return [p(N, H, std=1.0), p(E, H), p(E, inter, H), p(E, inter, H), p(E, H, inter)]


def routed_layer(route, experts, top_k: int):
    def layer(x, w_router, w_gate, w_up, w_down):
        _, topk_weight, topk_idx = route(x @ w_router.t(), top_k, True)
        return experts(x, topk_idx, topk_weight, w_gate, w_up, w_down)

    return layer


@functools.cache
def compiled_layer(top_k: int):
    return torch.compile(routed_layer(reference.moe_route, reference.moe_experts, top_k))


def liger_layer(inputs: list, top_k: int) -> tuple:
    try:
        from liger_kernel.ops import LigerFusedMoEFunction
    except Exception as exc:
        pytest.skip(f"liger_kernel with a fused MoE not importable: {exc}")
    x, w_router, w_gate, w_up, w_down = inputs
    # Liger keeps gate and up stacked in one (E, 2I, H) tensor.
    gate_up = torch.cat([w_gate.detach(), w_up.detach()], dim=1).requires_grad_()

    def layer(x, w_router, gate_up, w_down):
        _, topk_weight, topk_idx = reference.moe_route(x @ w_router.t(), top_k, True)
        return LigerFusedMoEFunction.apply(x, gate_up, w_down, topk_idx.to(torch.int32), topk_weight.to(x.dtype))

    return layer, [x, w_router, gate_up, w_down]


def dense_layer(inputs: list, shape: dict) -> tuple:
    x = inputs[0]
    H, width = shape["H"], shape["k"] * shape["I"]
    w = [(0.02 * torch.randn(*s, device=x.device)).to(x.dtype).requires_grad_()
         for s in ((width, H), (width, H), (H, width))]

    def layer(x, w_gate, w_up, w_down):
        return reference.swiglu(x @ w_gate.t(), x @ w_up.t()) @ w_down.t()

    return layer, [x, *w]


def implementation(bench, impl: str, inputs: list, shape: dict) -> tuple:
    k = shape["k"]
    if impl == "minimind":
        return routed_layer(reference.moe_route, loop_moe_experts, k), inputs
    if impl == "eager":
        return routed_layer(reference.moe_route, reference.moe_experts, k), inputs
    if impl == "dense":
        return dense_layer(inputs, shape)
    if impl == "compile":
        if not bench.cuda and not bench.full:
            pytest.skip("compiling the MoE layer takes minutes on a CPU; run with --gpu-sizes to include it")
        bench.require_compile_budget()
        return compiled_layer(k), inputs
    if not bench.cuda:
        pytest.skip(f"{impl} kernels need CUDA (Triton interpreter timings are meaningless)")
    if impl == "liger":
        return liger_layer(inputs, k)
    ops = triton_ops()
    if "moe_experts" not in ops:
        pytest.skip("no Triton moe_experts yet (kernels/moe.py)")
    if impl == "grouped_mm":
        if bench.dtype != torch.bfloat16:
            pytest.skip("torch's grouped GEMM takes bf16 on CUDA")
        from minimind_fast.kernels.moe import moe_experts_grouped_mm

        return routed_layer(ops["moe_route"], moe_experts_grouped_mm, k), inputs
    return routed_layer(ops.get("moe_route", reference.moe_route), ops["moe_experts"], k), inputs


def test_moe_layer(bench, benchmark, shape, impl):
    inputs = make_weights(shape, bench.device, bench.dtype)
    fn, inputs = implementation(bench, impl, inputs, shape)
    grad = torch.randn(shape["N"], shape["H"], device=bench.device, dtype=bench.dtype)
    step = forward_backward(fn, inputs, [grad])
    try:
        bench.warm_up(step, impl)
    except torch.OutOfMemoryError:
        pytest.skip(f"{impl} runs out of GPU memory at {shape_id(shape)}")
    except Exception as exc:
        if impl in ("compile", "liger"):
            pytest.skip(f"{impl} failed on the MoE layer {shape_id(shape)}: {type(exc).__name__}: {exc}"[:300])
        raise
    timing = measure(benchmark, step, target_s=1.0)
    N, H, inter, E, k = (shape[n] for n in ("N", "H", "I", "E", "k"))
    flops = 18.0 * N * k * H * inter + 6.0 * N * H * E
    dtype = str(bench.dtype).removeprefix("torch.")
    bench.record(benchmark, suite="moe", group=f"moe layer fwd+bwd {shape_id(shape)} {dtype}", impl=impl,
                 timing=timing, shape=shape, dtype=dtype, peak_mem_MB=peak_memory_mb(step), flops=flops,
                 tokens=N)
    del inputs, step
    if bench.cuda:
        torch.cuda.empty_cache()
