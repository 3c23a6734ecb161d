"""Each kernel, forward + backward, against eager PyTorch, torch.compile and Liger-Kernel, side by side.

Every op is timed with the same inputs and output gradients for every implementation, at MiniMind's
shapes (hidden 512) and larger ones (hidden up to 4096, 8k-64k tokens) with `--gpu-sizes`.

Bytes each op must move at least (e = element size; forward + backward, each tensor read or
written once; the norm weight and the fp32 cos/sin tables count too):

- rms_norm      fwd: read x, write y;             bwd: read x, dy, write dx            -> 5*T*H*e
- add_rms_norm  fwd: read x, r, write y, x+r;     bwd: read x+r, dy, dres, write dx    -> 8*T*H*e
                (the gradient of x and of the residual is one tensor, written once)
- apply_rotary  fwd: read q, k, write q', k';     bwd: read dq', dk', write dq, dk    -> 4*(q+k)*e
- swiglu        fwd: read g, u, write y;          bwd: read g, u, dy, write dg, du    -> 8*T*I*e
- swiglu_packed the same with g and u the halves of one (T, 2I) tensor (the model's training path)
- linear_cross_entropy is matmul-bound: reported as TFLOP/s over 6*N*H*V (logits forward, and the
  gradients of hidden and weight), and by its peak memory (the point of fusing it).
"""

from __future__ import annotations

import functools
import os

import pytest
import torch
from common import forward_backward, measure, peak_memory_mb
from minimind_fast.kernels import reference, triton_ops

IMPLS = ("eager", "compile", "liger", "ours")
EPS = 1e-5


def kernel_shapes(full: bool) -> list[tuple[str, dict]]:
    """(op, shape) cases; CPU sizes keep `make bench` to minutes on two cores."""
    if not full:
        return [
            ("rms_norm", dict(T=2048, H=512)),
            ("add_rms_norm", dict(T=2048, H=512)),
            ("apply_rotary", dict(B=1, T=2048, Hq=8, Hk=2, D=64)),
            ("swiglu", dict(T=2048, I=1408)),
            ("swiglu_packed", dict(T=2048, I=1408)),
            ("linear_cross_entropy", dict(N=2048, H=512, V=6400)),
        ]
    cases: list[tuple[str, dict]] = []
    for tokens in (8192, 65536):
        for hidden in (512, 4096):
            cases.append(("rms_norm", dict(T=tokens, H=hidden)))
            cases.append(("add_rms_norm", dict(T=tokens, H=hidden)))
    cases.append(("add_rms_norm", dict(T=4096, H=32768)))
    # MiniMind2 heads (8 query, 2 KV, head_dim 64) at 8k tokens and a 1B-class layout (32/8, 128) at 64k.
    cases.append(("apply_rotary", dict(B=4, T=2048, Hq=8, Hk=2, D=64)))
    cases.append(("apply_rotary", dict(B=32, T=2048, Hq=32, Hk=8, D=128)))
    # The FFN widths of hidden 512 (MiniMind2) and 4096.
    cases += [("swiglu", dict(T=8192, I=1408)), ("swiglu", dict(T=65536, I=1408)),
              ("swiglu", dict(T=65536, I=11008))]
    cases += [("swiglu_packed", dict(T=65536, I=1408)), ("swiglu_packed", dict(T=65536, I=11008))]
    cases += [
        ("linear_cross_entropy", dict(N=65536, H=512, V=6400)),
        ("linear_cross_entropy", dict(N=8192, H=2048, V=32000)),
        ("linear_cross_entropy", dict(N=16384, H=4096, V=128256)),
    ]
    return cases


def pytest_generate_tests(metafunc):
    if {"op", "shape", "impl"} <= set(metafunc.fixturenames):
        full = metafunc.config.getoption("--gpu-sizes") or os.environ.get("BENCH_FULL") == "1"
        params, ids = [], []
        for op, shape in kernel_shapes(full):
            for impl in IMPLS:
                params.append((op, shape, impl))
                ids.append(f"{op}-{shape_id(shape)}-{impl}")
        metafunc.parametrize(("op", "shape", "impl"), params, ids=ids)


def shape_id(shape: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items())


# --- inputs ----------------------------------------------------------------------------------------

def make_inputs(op: str, shape: dict, device, dtype) -> tuple[list, list, float, float]:
    """(inputs, output gradients, minimal bytes moved, matmul FLOPs) for one fwd+bwd of `op`."""
    e = torch.tensor([], dtype=dtype).element_size()

    def t(*size, grad=True):
        return torch.randn(*size, device=device, dtype=dtype).requires_grad_(grad)

    if op == "rms_norm":
        T, H = shape["T"], shape["H"]
        weight = (1 + 0.1 * torch.randn(H, device=device)).to(dtype).requires_grad_()
        return [t(T, H), weight], [t(T, H, grad=False)], 5 * T * H * e, 0.0
    if op == "add_rms_norm":
        T, H = shape["T"], shape["H"]
        weight = (1 + 0.1 * torch.randn(H, device=device)).to(dtype).requires_grad_()
        return [t(T, H), t(T, H), weight], [t(T, H, grad=False), t(T, H, grad=False)], 8 * T * H * e, 0.0
    if op == "apply_rotary":
        B, T, Hq, Hk, D = (shape[k] for k in ("B", "T", "Hq", "Hk", "D"))
        angles = torch.rand(T, D // 2, device=device) * 6.28
        cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
        q, k = t(B, T, Hq, D), t(B, T, Hk, D)
        grads = [t(B, T, Hq, D, grad=False), t(B, T, Hk, D, grad=False)]
        return [q, k, cos, sin], grads, 4 * (q.numel() + k.numel()) * e + 4 * T * D * 4, 0.0
    if op == "swiglu":
        T, inter = shape["T"], shape["I"]
        return [t(T, inter), t(T, inter)], [t(T, inter, grad=False)], 8 * T * inter * e, 0.0
    if op == "swiglu_packed":
        T, inter = shape["T"], shape["I"]
        return [t(T, 2 * inter)], [t(T, inter, grad=False)], 8 * T * inter * e, 0.0
    if op == "linear_cross_entropy":
        N, H, V = shape["N"], shape["H"], shape["V"]
        targets = torch.randint(0, V, (N,), device=device)
        targets[torch.rand(N, device=device) < 0.05] = -100  # some ignored positions, as in SFT
        weight = (0.02 * torch.randn(V, H, device=device)).to(dtype).requires_grad_()
        # The loss is an fp32 scalar: backward from 1.0, as a training step does.
        return [t(N, H), weight, targets], [torch.ones((), device=device)], 0.0, 6.0 * N * H * V
    raise KeyError(op)


# --- implementations -------------------------------------------------------------------------------

def reference_fn(op: str):
    fn = getattr(reference, op)
    return functools.partial(fn, eps=EPS) if op in ("rms_norm", "add_rms_norm") else fn


@functools.cache
def compiled_fn(op: str):
    """One compiled function per op for the whole run: later shapes reuse it (dynamic after the first)."""
    return torch.compile(reference_fn(op))


def liger_impl(op: str, inputs: list, grads: list) -> tuple:
    """(fn, inputs, output gradients) running Liger-Kernel's kernel for `op`, in Liger's layouts; skips when
    Liger or that kernel is absent."""
    try:
        import liger_kernel.ops as liger_ops
        import liger_kernel.transformers as liger
    except Exception as exc:  # ImportError, or Liger failing to initialise its Triton backend
        pytest.skip(f"liger_kernel not importable: {exc}")
    if op == "rms_norm":
        x, w = inputs
        # in_place=False: Liger's in-place backward would overwrite the shared output gradient.
        norm = liger.LigerRMSNorm(w.shape[0], eps=EPS, in_place=False).to(w.device, w.dtype)
        return (lambda x, w: norm(x)), [x, norm.weight], grads
    if op == "add_rms_norm":
        if not hasattr(liger, "LigerFusedAddRMSNorm"):
            pytest.skip("this liger_kernel has no fused add+RMSNorm")
        x, r, w = inputs
        norm = liger.LigerFusedAddRMSNorm(w.shape[0], eps=EPS).to(w.device, w.dtype)
        return (lambda x, r, w: norm(x, r)), [x, r, norm.weight], grads
    if op == "apply_rotary":
        q, k, cos, sin = inputs
        # Liger wants heads before time: (B, H, T, D), cos/sin (1, T, D) in the activations' dtype; its
        # outputs, and so their gradients, are (B, H, T, D) too.
        ql = q.detach().transpose(1, 2).contiguous().requires_grad_()
        kl = k.detach().transpose(1, 2).contiguous().requires_grad_()
        cl, sl = cos[None].to(q.dtype), sin[None].to(q.dtype)
        return ((lambda q, k, c, s: liger.liger_rotary_pos_emb(q, k, c, s)), [ql, kl, cl, sl],
                [g.transpose(1, 2).contiguous() for g in grads])
    if op == "swiglu":
        return (lambda g, u: liger_ops.LigerSiLUMulFunction.apply(g, u)), inputs, grads
    if op == "linear_cross_entropy":
        loss = liger.LigerFusedLinearCrossEntropyLoss(ignore_index=-100)
        return (lambda h, w, tgt: loss(w, h, tgt)), inputs, grads
    pytest.skip(f"Liger-Kernel has no {op}")


def implementation(bench, op: str, impl: str, inputs: list, grads: list) -> tuple:
    """(fn, inputs, output gradients) for one implementation, or a skip with the reason."""
    if impl == "eager":
        return reference_fn(op), inputs, grads
    if impl == "compile":
        bench.require_compile_budget()
        return compiled_fn(op), inputs, grads
    if not bench.cuda:
        pytest.skip(f"{impl} kernels need CUDA (Triton interpreter timings are meaningless)")
    if impl == "liger":
        return liger_impl(op, inputs, grads)
    ours = triton_ops().get(op)
    if ours is None:
        pytest.skip(f"no Triton kernel for {op} yet (minimind_fast.kernels.triton_ops())")
    if op in ("rms_norm", "add_rms_norm"):
        ours = functools.partial(ours, eps=EPS)
    return ours, inputs, grads


def test_kernel(bench, benchmark, op, shape, impl):
    inputs, grads, bytes_moved, flops = make_inputs(op, shape, bench.device, bench.dtype)
    fn, inputs, grads = implementation(bench, op, impl, inputs, grads)
    step = forward_backward(fn, inputs, grads)
    try:
        bench.warm_up(step, impl)
    except torch.OutOfMemoryError:
        pytest.skip(f"{impl} runs out of GPU memory at {shape_id(shape)}")
    except Exception as exc:
        if impl in ("compile", "liger"):  # third-party paths: report, don't fail the suite
            pytest.skip(f"{impl} failed on {op} {shape_id(shape)}: {type(exc).__name__}: {exc}"[:300])
        raise
    timing = measure(benchmark, step, target_s=0.5)
    peak = peak_memory_mb(step)
    dtype = str(bench.dtype).removeprefix("torch.")
    bench.record(benchmark, suite="kernels", group=f"{op} fwd+bwd {shape_id(shape)} {dtype}", impl=impl,
                 timing=timing, shape=shape, dtype=dtype, peak_mem_MB=peak, bytes_moved=bytes_moved or None,
                 flops=flops or None)
    del inputs, grads, step
    if bench.cuda:
        torch.cuda.empty_cache()
