"""SwiGLU activation `silu(gate) * up`: one Triton kernel forward, one backward.

Backward recomputes `sigmoid(gate)` from the saved inputs instead of storing the activation, so the
op keeps only its two inputs alive (the same as the matmuls around it need anyway).

`swiglu_packed` takes gate and up as the two halves of one (..., 2I) tensor, the output of a single GEMM
over the stacked weights, and its backward writes the (..., 2I) gradient that GEMM needs: no split,
and no concatenation of the two gradients afterwards.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import cdiv, check_device, next_power_of_2

BLOCK = 1024


@triton.jit
def _sigmoid(x):
    # exp of a non-positive argument only, so large |x| never overflows (libdevice-free for the interpreter).
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _swiglu_fwd(G, U, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + offs, (g * _sigmoid(g) * u).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd(DY, G, U, DG, DU, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    sig = _sigmoid(g)
    silu = g * sig
    tl.store(DU + offs, (dy * silu).to(DU.dtype.element_ty), mask=mask)
    tl.store(DG + offs, (dy * u * sig * (1.0 + g * (1.0 - sig))).to(DG.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_packed_fwd(X, Y, inter, BLOCK: tl.constexpr):
    # Program (row, column block): gate at X[row, :I], up at X[row, I:], output Y[row, :I].
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    src = X + row * 2 * inter + cols
    g = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(src + inter, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * inter + cols, (g * _sigmoid(g) * u).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_packed_bwd(DY, X, DX, inter, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    src = row * 2 * inter + cols
    dy = tl.load(DY + row * inter + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(X + src, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(X + src + inter, mask=mask, other=0.0).to(tl.float32)
    sig = _sigmoid(g)
    tl.store(DX + src, (dy * u * sig * (1.0 + g * (1.0 - sig))).to(DX.dtype.element_ty), mask=mask)
    tl.store(DX + src + inter, (dy * g * sig).to(DX.dtype.element_ty), mask=mask)


def _out_dtype(gate: torch.Tensor, up: torch.Tensor) -> torch.dtype:
    return torch.promote_types(gate.dtype, up.dtype)  # as `silu(gate) * up` (bf16 gate, fp32 up: fp32)


def _forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    check_device(gate, up)
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} differ")
    gate, up = gate.contiguous(), up.contiguous()
    y = torch.empty_like(gate, dtype=_out_dtype(gate, up))
    n = gate.numel()
    if n:
        _swiglu_fwd[(cdiv(n, BLOCK),)](gate, up, y, n, BLOCK=BLOCK, num_warps=4)
    return y


def _backward(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    gate, up, dy = gate.contiguous(), up.contiguous(), dy.contiguous()
    dg, du = torch.empty_like(gate), torch.empty_like(up)
    n = gate.numel()
    if n:
        _swiglu_bwd[(cdiv(n, BLOCK),)](dy, gate, up, dg, du, n, BLOCK=BLOCK, num_warps=4)
    return dg, du


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        y = _forward(gate, up)
        ctx.save_for_backward(gate, up)
        return y

    @staticmethod
    def backward(ctx, dy):
        return _backward(dy, *ctx.saved_tensors)


# The same op for torch.compile: as custom ops, dynamo keeps each launch one opaque graph node instead of
# breaking the graph around the autograd.Function, so `--compile-mode reduce-overhead` can capture whole
# layers in one CUDA graph. Eager calls keep the autograd.Function: a custom op's dispatch costs more host
# time per call, and a small model's eager step is bound by exactly that.
@torch.library.custom_op("minimind_fast::swiglu", mutates_args=())
def _swiglu_op(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return _forward(gate, up)


@_swiglu_op.register_fake
def _(gate, up):
    return gate.new_empty(gate.shape, dtype=_out_dtype(gate, up))


@torch.library.custom_op("minimind_fast::swiglu_backward", mutates_args=())
def _swiglu_backward_op(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _backward(dy, gate, up)


@_swiglu_backward_op.register_fake
def _(dy, gate, up):
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


_swiglu_op.register_autograd(lambda ctx, dy: _swiglu_backward_op(dy, *ctx.saved_tensors),
                             setup_context=_setup_context)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Triton `silu(gate) * up` (same contract as `reference.swiglu`)."""
    if torch.compiler.is_compiling():
        return _swiglu_op(gate, up)
    return SwiGLUFunction.apply(gate, up)


def _packed_grid(rows: int, inter: int) -> tuple[tuple[int, int], int]:
    block = min(BLOCK, next_power_of_2(inter))
    return (rows, cdiv(inter, block)), block


def _packed_forward(gate_up: torch.Tensor) -> torch.Tensor:
    check_device(gate_up)
    if gate_up.shape[-1] % 2:
        raise ValueError(f"swiglu_packed: last dim {gate_up.shape[-1]} is not gate and up halves")
    gate_up = gate_up.contiguous()
    inter = gate_up.shape[-1] // 2
    y = gate_up.new_empty(*gate_up.shape[:-1], inter)
    if y.numel():
        grid, block = _packed_grid(y.numel() // inter, inter)
        _swiglu_packed_fwd[grid](gate_up, y, inter, BLOCK=block, num_warps=4)
    return y


def _packed_backward(dy: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
    dy, gate_up = dy.contiguous(), gate_up.contiguous()
    dx = torch.empty_like(gate_up)
    inter = gate_up.shape[-1] // 2
    if dy.numel():
        grid, block = _packed_grid(dy.numel() // inter, inter)
        _swiglu_packed_bwd[grid](dy, gate_up, dx, inter, BLOCK=block, num_warps=4)
    return dx


class SwiGLUPackedFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up):
        ctx.save_for_backward(gate_up)
        return _packed_forward(gate_up)

    @staticmethod
    def backward(ctx, dy):
        return _packed_backward(dy, *ctx.saved_tensors)


@torch.library.custom_op("minimind_fast::swiglu_packed", mutates_args=())
def _swiglu_packed_op(gate_up: torch.Tensor) -> torch.Tensor:
    return _packed_forward(gate_up)


@_swiglu_packed_op.register_fake
def _(gate_up):
    return gate_up.new_empty(*gate_up.shape[:-1], gate_up.shape[-1] // 2)


@torch.library.custom_op("minimind_fast::swiglu_packed_backward", mutates_args=())
def _swiglu_packed_backward_op(dy: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
    return _packed_backward(dy, gate_up)


@_swiglu_packed_backward_op.register_fake
def _(dy, gate_up):
    return gate_up.new_empty(gate_up.shape)


_swiglu_packed_op.register_autograd(lambda ctx, dy: _swiglu_packed_backward_op(dy, *ctx.saved_tensors),
                                    setup_context=_setup_context)


def swiglu_packed(gate_up: torch.Tensor) -> torch.Tensor:
    """Triton `silu(gate) * up` of the halves of gate_up's last dim (same contract as `reference.swiglu_packed`)."""
    if torch.compiler.is_compiling():
        return _swiglu_packed_op(gate_up)
    return SwiGLUPackedFunction.apply(gate_up)


class TritonSwiGLU(torch.nn.Module):
    def forward(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return swiglu(gate, up)
