"""Fused RMSNorm and residual-add + RMSNorm: forward and backward Triton kernels.

Forward: one pass over each row in fp32: `y = x * rstd * w` with `rstd = 1/sqrt(mean(x^2) + eps)`,
saved (fp32, one per row) for backward. The fused variant first forms `h = x + residual`, writes it
(the new residual stream) and normalises it, so the decoder reads each activation once.
Backward: `dx = rstd * (w*dy - x_hat * mean(x_hat * w*dy))`; the weight gradient `sum_rows(dy * x_hat)`
is reduced without atomics: each program accumulates its rows in fp32 registers and writes one
partial row, and a second kernel sums the partial rows in a fixed order and casts once.

Rows wider than `WIDE_COLS` (hidden 16k-32k) would need a whole row per thread block in registers, more
than a block's threads can hold without spilling, so they take a looped path instead: each row is read
in `CHUNK`-wide pieces twice (the sum of squares, then the output; the second read mostly from L2), and
the weight gradient is a separate column-reduction kernel (partial sums per row span, then the same
fixed-order sum).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import cdiv, check_device, num_programs, row_block, rows_per_tile

PARTIAL_COLS, PARTIAL_ROWS = 64, 64  # tile of the kernel summing the weight gradient's partial rows
WIDE_COLS = 8192  # rows wider than this take the looped kernels
CHUNK, CHUNK_WARPS = 4096, 8  # the looped kernels' piece of a row
DW_COLS, DW_ROWS = 256, 16  # tile of the wide path's weight-gradient kernel


@triton.jit
def _rmsnorm_fwd(X, R, W, Y, H, RSTD, stride_x, stride_r, stride_y, stride_h, n_rows, n_cols, eps,
                 HAS_RESIDUAL: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    # A tile of ROWS whole rows per program: one row per program for wide rows, several for narrow
    # ones (hidden 512) so that each program still moves enough bytes.
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    row_mask = rows < n_rows
    mask = row_mask[:, None] & (cols < n_cols)[None, :]
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        x += tl.load(R + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        h = x.to(H.dtype.element_ty)
        tl.store(H + rows[:, None] * stride_h + cols[None, :], h, mask=mask)
        # Normalise the rounded sum, as the reference and the wide kernel do: backward reads that h back.
        x = h.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / n_cols + eps)
    w = tl.load(W + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    y = x * rstd[:, None] * w[None, :]
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=row_mask)


@triton.jit
def _row_span(part, rows_per_part, n_rows):
    """Rows [first, last) of span `part`, the rows split in spans of rows_per_part."""
    first = part.to(tl.int64) * rows_per_part
    return first, tl.minimum(first + rows_per_part, n_rows)


@triton.jit
def _load_grad_rows(X, DY, RSTD, start, last, cols, col_mask, stride_x, stride_dy, ROWS: tl.constexpr):
    """The backward's inputs for ROWS rows from `start` (those before `last`): the rows, the tile mask,
    x and dy in fp32 and rstd."""
    rows = start + tl.arange(0, ROWS)
    row_mask = rows < last
    mask = row_mask[:, None] & col_mask[None, :]
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
    return rows, mask, x, dy, rstd


@triton.jit
def _rmsnorm_bwd(DY, X, W, RSTD, DX, DH, DW_PARTIAL, stride_dy, stride_x, stride_dx, stride_dh,
                 n_rows, n_cols, rows_per_prog, HAS_DH: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    # Each program walks its own span of rows, ROWS at a time, keeping its share of the weight
    # gradient in fp32 registers; it writes one partial row, summed over programs afterwards.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    col_mask = cols < n_cols
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK,), dtype=tl.float32)
    first, last = _row_span(pid, rows_per_prog, n_rows)
    for start in range(first, last, ROWS):
        rows, mask, x, dy, rstd = _load_grad_rows(X, DY, RSTD, start, last, cols, col_mask, stride_x, stride_dy, ROWS)
        x_hat = x * rstd[:, None]
        wdy = w[None, :] * dy
        dx = rstd[:, None] * (wdy - x_hat * (tl.sum(x_hat * wdy, axis=1) / n_cols)[:, None])
        if HAS_DH:
            dx += tl.load(DH + rows[:, None] * stride_dh + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        dw += tl.sum(dy * x_hat, axis=0)
    tl.store(DW_PARTIAL + pid.to(tl.int64) * n_cols + cols, dw, mask=col_mask)


@triton.jit
def _sum_partials(PARTIAL, DW, n_parts, n_cols, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    # The programs' partial rows summed in fp32 in a fixed order and cast to the weight's dtype in the
    # same launch (a torch sum then a cast would be two launches per norm on the host's critical path).
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    col_mask = cols < n_cols
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, n_parts, ROWS):
        rows = start + tl.arange(0, ROWS)
        mask = (rows < n_parts)[:, None] & col_mask[None, :]
        acc += tl.sum(tl.load(PARTIAL + rows[:, None] * n_cols + cols[None, :], mask=mask, other=0.0), axis=0)
    tl.store(DW + cols, acc.to(DW.dtype.element_ty), mask=col_mask)


@triton.jit
def _rmsnorm_fwd_wide(X, R, W, Y, H, RSTD, stride_x, stride_r, stride_y, stride_h, n_cols, eps,
                      HAS_RESIDUAL: tl.constexpr, CHUNK: tl.constexpr):
    # One row per program, in CHUNK-wide pieces: the sum of squares (writing the residual sum), then
    # the output from a second read of the row (of h for the fused variant, as the reference normalises
    # the rounded sum).
    row = tl.program_id(0).to(tl.int64)
    acc = tl.zeros((CHUNK,), dtype=tl.float32)
    for start in range(0, n_cols, CHUNK):
        cols = start + tl.arange(0, CHUNK)
        mask = cols < n_cols
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            h = (x + tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)).to(H.dtype.element_ty)
            tl.store(H + row * stride_h + cols, h, mask=mask)
            x = h.to(tl.float32)
        acc += x * x
    rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / n_cols + eps)
    tl.store(RSTD + row, rstd)
    if HAS_RESIDUAL:
        # h is read back below; a block barrier makes every thread's stores of it visible to all,
        # whichever thread layout the compiler gives the two loops
        tl.debug_barrier()
    for start in range(0, n_cols, CHUNK):
        cols = start + tl.arange(0, CHUNK)
        mask = cols < n_cols
        if HAS_RESIDUAL:
            x = tl.load(H + row * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
        else:
            x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + row * stride_y + cols, (x * rstd * w).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _load_grad_chunk(X, DY, W, row, start, n_cols, stride_x, stride_dy, CHUNK: tl.constexpr):
    """The wide backward's inputs for one CHUNK of a row from column `start`: the columns, their mask,
    and x, dy and w in fp32."""
    cols = start + tl.arange(0, CHUNK)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    return cols, mask, x, dy, w


@triton.jit
def _rmsnorm_bwd_wide(DY, X, W, RSTD, DX, DH, stride_dy, stride_x, stride_dx, stride_dh, n_cols,
                      HAS_DH: tl.constexpr, CHUNK: tl.constexpr):
    # dx of one row, in CHUNK-wide pieces: mean(x_hat * w*dy) first, then dx; no weight gradient here.
    row = tl.program_id(0).to(tl.int64)
    rstd = tl.load(RSTD + row)
    acc = tl.zeros((CHUNK,), dtype=tl.float32)
    for start in range(0, n_cols, CHUNK):
        _, _, x, dy, w = _load_grad_chunk(X, DY, W, row, start, n_cols, stride_x, stride_dy, CHUNK)
        acc += x * rstd * w * dy
    mean = tl.sum(acc, axis=0) / n_cols
    for start in range(0, n_cols, CHUNK):
        cols, mask, x, dy, w = _load_grad_chunk(X, DY, W, row, start, n_cols, stride_x, stride_dy, CHUNK)
        dx = rstd * (w * dy - x * rstd * mean)
        if HAS_DH:
            dx += tl.load(DH + row * stride_dh + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _rmsnorm_dw_wide(DY, X, RSTD, DW_PARTIAL, stride_dy, stride_x, n_rows, n_cols, rows_per_split,
                     ROWS: tl.constexpr, BLOCK: tl.constexpr):
    # Weight gradient of wide rows: program (c, s) sums dy * x_hat over split s's rows for BLOCK columns
    # and writes them as partial row s.
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    split = tl.program_id(1)
    col_mask = cols < n_cols
    first, last = _row_span(split, rows_per_split, n_rows)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(first, last, ROWS):
        _, _, x, dy, rstd = _load_grad_rows(X, DY, RSTD, start, last, cols, col_mask, stride_x, stride_dy, ROWS)
        acc += tl.sum(dy * x * rstd[:, None], axis=0)
    tl.store(DW_PARTIAL + split.to(tl.int64) * n_cols + cols, acc, mask=col_mask)


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    t = t.reshape(t.shape[:-1].numel(), t.shape[-1])  # not (-1, D): D = 0 leaves -1 undefined
    return t if t.stride(-1) == 1 else t.contiguous()


def _check_shapes(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor) -> None:
    # The kernels index the weight and the residual by x's rows and columns: a mismatch would read past them.
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"rms_norm: weight {tuple(weight.shape)} does not match the last dim of x {tuple(x.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"add_rms_norm: residual {tuple(residual.shape)} and x {tuple(x.shape)} differ")


def _out_dtype(x: torch.Tensor, residual: torch.Tensor | None) -> torch.dtype:
    # As the reference: the sum x + residual promotes (bf16 + an fp32 residual stream stays fp32), and the
    # norm keeps its input's dtype.
    return x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)


def _forward(x, residual, weight, eps):
    check_device(x, weight)
    _check_shapes(x, residual, weight)
    weight = weight.contiguous()
    shape = x.shape
    x2 = _as_rows(x)
    r2 = _as_rows(residual) if residual is not None else x2
    n_rows, n_cols = x2.shape
    y = torch.empty((n_rows, n_cols), dtype=_out_dtype(x, residual), device=x.device)
    h = torch.empty_like(y) if residual is not None else y
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    # No launch for no rows, or rows of nothing (as the reference: an empty norm, and a sum of nothing).
    if n_rows and n_cols > WIDE_COLS:
        _rmsnorm_fwd_wide[(n_rows,)](
            x2, r2, weight, y, h, rstd, x2.stride(0), r2.stride(0), y.stride(0), h.stride(0), n_cols, eps,
            HAS_RESIDUAL=residual is not None, CHUNK=CHUNK, num_warps=CHUNK_WARPS)
    elif n_rows and n_cols:
        block, warps = row_block(n_cols)
        tile = rows_per_tile(n_rows, block)
        _rmsnorm_fwd[(cdiv(n_rows, tile),)](
            x2, r2, weight, y, h, rstd, x2.stride(0), r2.stride(0), y.stride(0), h.stride(0), n_rows, n_cols, eps,
            HAS_RESIDUAL=residual is not None, ROWS=tile, BLOCK=block, num_warps=warps)
    return y.view(shape), (h.view(shape) if residual is not None else None), rstd, (h if residual is not None
                                                                                    else x2)


def _backward(dy, normed_input, weight, rstd, dh):
    shape = dy.shape
    weight = weight.contiguous()
    dy2 = _as_rows(dy)
    dh2 = _as_rows(dh) if dh is not None else dy2
    n_rows, n_cols = dy2.shape
    dx = torch.empty((n_rows, n_cols), dtype=dy.dtype, device=dy.device)
    dw = torch.empty(n_cols, dtype=weight.dtype, device=dy.device)
    if not n_rows or not n_cols:
        return dx.view(shape), dw.zero_()
    if n_cols > WIDE_COLS:
        return _backward_wide(dy2, dh2, normed_input, weight, rstd, dh is not None, dx, dw, shape)
    block, warps = row_block(n_cols)
    programs = num_programs(n_rows)
    rows_per_prog = cdiv(n_rows, programs)
    partial = torch.empty((programs, n_cols), dtype=torch.float32, device=dy.device)  # every program writes its row
    _rmsnorm_bwd[(programs,)](dy2, normed_input, weight, rstd, dx, dh2, partial, dy2.stride(0),
                              normed_input.stride(0), dx.stride(0), dh2.stride(0), n_rows, n_cols,
                              rows_per_prog, HAS_DH=dh is not None, ROWS=rows_per_tile(rows_per_prog, block),
                              BLOCK=block, num_warps=warps)
    _sum_partials[(cdiv(n_cols, PARTIAL_COLS),)](partial, dw, programs, n_cols, ROWS=PARTIAL_ROWS,
                                                  BLOCK=PARTIAL_COLS)
    return dx.view(shape), dw


def _backward_wide(dy2, dh2, normed_input, weight, rstd, has_dh, dx, dw, shape):
    n_rows, n_cols = dy2.shape
    _rmsnorm_bwd_wide[(n_rows,)](dy2, normed_input, weight, rstd, dx, dh2, dy2.stride(0), normed_input.stride(0),
                                 dx.stride(0), dh2.stride(0), n_cols, HAS_DH=has_dh, CHUNK=CHUNK,
                                 num_warps=CHUNK_WARPS)
    # Enough row spans that the column blocks times spans fill the device (a few programs per SM).
    col_blocks = cdiv(n_cols, DW_COLS)
    splits = max(1, min(cdiv(n_rows, DW_ROWS), cdiv(num_programs(n_rows), col_blocks)))
    rows_per_split = cdiv(n_rows, splits)
    splits = cdiv(n_rows, rows_per_split)
    partial = torch.empty((splits, n_cols), dtype=torch.float32, device=dy2.device)
    _rmsnorm_dw_wide[(col_blocks, splits)](dy2, normed_input, rstd, partial, dy2.stride(0), normed_input.stride(0),
                                           n_rows, n_cols, rows_per_split, ROWS=DW_ROWS, BLOCK=DW_COLS)
    _sum_partials[(cdiv(n_cols, PARTIAL_COLS),)](partial, dw, splits, n_cols, ROWS=PARTIAL_ROWS, BLOCK=PARTIAL_COLS)
    return dx.view(shape), dw


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        y, _, rstd, rows = _forward(x, None, weight, eps)
        ctx.save_for_backward(rows, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        rows, weight, rstd = ctx.saved_tensors
        dx, dw = _backward(dy, rows, weight, rstd, None)
        return dx, dw, None


class AddRMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, eps):
        y, h, rstd, rows = _forward(x, residual, weight, eps)
        ctx.save_for_backward(rows, weight, rstd)
        ctx.set_materialize_grads(False)  # the last norm's h is unused: its gradient stays None, not zeros
        return y, h

    @staticmethod
    def backward(ctx, dy, dh):
        rows, weight, rstd = ctx.saved_tensors
        if dy is None:  # only the sum was used: its gradient passes through, the weight gets none
            return dh, dh, None, None
        dx, dw = _backward(dy, rows, weight, rstd, dh)
        return dx, dx, dw, None


# The same ops for torch.compile (see swiglu.py for why both forms): custom ops stay one graph node each.
@torch.library.custom_op("minimind_fast::rms_norm", mutates_args=())
def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    y, _, rstd, _ = _forward(x, None, weight, eps)
    return y, rstd


@_rms_norm_op.register_fake
def _(x, weight, eps):
    return x.new_empty(x.shape), x.new_empty(x.shape[:-1].numel(), dtype=torch.float32)


@torch.library.custom_op("minimind_fast::add_rms_norm", mutates_args=())
def _add_rms_norm_op(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y, h, rstd, _ = _forward(x, residual, weight, eps)
    return y, h, rstd


@_add_rms_norm_op.register_fake
def _(x, residual, weight, eps):
    dtype = _out_dtype(x, residual)
    return (x.new_empty(x.shape, dtype=dtype), x.new_empty(x.shape, dtype=dtype),
            x.new_empty(x.shape[:-1].numel(), dtype=torch.float32))


@torch.library.custom_op("minimind_fast::rms_norm_backward", mutates_args=())
def _rms_norm_backward_op(dy: torch.Tensor, normed_input: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                          dh: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    return _backward(dy, _as_rows(normed_input), weight, rstd, dh)


@_rms_norm_backward_op.register_fake
def _(dy, normed_input, weight, rstd, dh):
    return dy.new_empty(dy.shape), weight.new_empty(weight.shape)


def _save_rms_norm(ctx, inputs, output):
    x, weight, _ = inputs
    ctx.save_for_backward(x, weight, output[1])


def _save_add_rms_norm(ctx, inputs, output):
    ctx.save_for_backward(output[1], inputs[2], output[2])  # h (the normalised input), weight, rstd


def _rms_norm_grads(ctx, dy, _drstd):
    dx, dw = _rms_norm_backward_op(dy, *ctx.saved_tensors, None)
    return dx, dw, None


def _add_rms_norm_grads(ctx, dy, dh, _drstd):
    dx, dw = _rms_norm_backward_op(dy, *ctx.saved_tensors, dh)
    return dx, dx, dw, None


_rms_norm_op.register_autograd(_rms_norm_grads, setup_context=_save_rms_norm)
_add_rms_norm_op.register_autograd(_add_rms_norm_grads, setup_context=_save_add_rms_norm)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Triton RMSNorm over the last dim (same contract as `reference.rms_norm`)."""
    if torch.compiler.is_compiling():
        return _rms_norm_op(x, weight, eps)[0]
    return RMSNormFunction.apply(x, weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton residual add + RMSNorm: (normed, x + residual), as `reference.add_rms_norm`."""
    if torch.compiler.is_compiling():
        y, h, _ = _add_rms_norm_op(x, residual, weight, eps)
        return y, h
    return AddRMSNormFunction.apply(x, residual, weight, eps)


class TritonRMSNorm(torch.nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)
