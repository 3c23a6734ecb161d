"""Cross-entropy fused with the output projection, in chunks of tokens (Triton + matmuls).

The (tokens x vocab) logits are the largest activation of a small model's step (vocab 6400 x 16k
tokens in fp32 is 400 MB). Here they exist one chunk at a time: for each chunk, a matmul gives the
logits, a Triton kernel computes the loss of each row with an online softmax over vocabulary blocks
and overwrites the logits in place with their gradient `softmax - onehot`, and two more matmuls turn
it into the chunk's grad_hidden and its share of grad_weight. The gradients are thus ready after
forward; backward only scales them by the incoming gradient over n_valid. That division happens in
fp32 in backward, never in the 16-bit logits: (softmax - onehot) / n_valid for thousands of tokens
is below fp16's normal range and would underflow before DeepSpeed's loss scale could lift it.

Around the chunks, few launches: the mean over valid targets and the check that every target is a
token id come from one small kernel after the chunks (`_ce_finish`), and backward's scale-and-cast is
one kernel per gradient (`_scale_cast`); torch ops would take about a dozen more launches per step,
which a small model's step, bound by the host's launches, pays for directly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import cdiv, check_device, is_interpreter, next_power_of_2, rows_per_tile

IGNORE_INDEX = -100
SCALE_BLOCK = 1024  # elements per program of the backward's scale-and-cast


@triton.jit
def _ce_rows(LOGITS, TARGETS, LOSS, stride, n_rows, n_cols, ignore_index,
             ROWS: tl.constexpr, BLOCK: tl.constexpr):
    # ROWS rows per program (one for a large vocabulary on a GPU); two passes over vocabulary blocks:
    # an online max / sum-of-exp for the log-sum-exp, then the gradient written over the logits.
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_mask = rows < n_rows
    target = tl.load(TARGETS + rows, mask=row_mask, other=ignore_index)
    # A target outside the vocabulary is treated as ignored here (no out-of-bounds read) and reported
    # by _ce_finish.
    valid = row_mask & (target != ignore_index) & (target >= 0) & (target < n_cols)
    base = LOGITS + rows[:, None] * stride
    cols = tl.arange(0, BLOCK)
    # Read before any pass: the second pass overwrites the logits, and nothing orders another warp's
    # store there against a load of this row's target logit issued after the first pass.
    x_t = tl.load(LOGITS + rows * stride + target, mask=valid, other=0.0).to(tl.float32)
    # A finite start for the running max: padding rows (all -inf) then give exp(-inf) = 0, never NaN.
    m = tl.full((ROWS,), -1e30, tl.float32)
    s = tl.zeros((ROWS,), tl.float32)
    for start in range(0, n_cols, BLOCK):
        mask = row_mask[:, None] & (start + cols < n_cols)[None, :]
        x = tl.load(base + start + cols[None, :], mask=mask, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), axis=1)
        m = m_new
    lse = tl.where(row_mask, m + tl.log(tl.where(row_mask, s, 1.0)), 0.0)  # padding rows: no log(0), no inf
    tl.store(LOSS + rows, tl.where(valid, lse - x_t, 0.0), mask=row_mask)
    for start in range(0, n_cols, BLOCK):
        mask = row_mask[:, None] & (start + cols < n_cols)[None, :]
        x = tl.load(base + start + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        grad = tl.exp(x - lse[:, None]) - tl.where(start + cols[None, :] == target[:, None], 1.0, 0.0)
        grad = tl.where(valid[:, None], grad, 0.0)
        tl.store(base + start + cols[None, :], grad.to(LOGITS.dtype.element_ty), mask=mask)


@triton.jit
def _ce_finish(LOSSES, TARGETS, LOSS, INV_N_VALID, ALL_VALID, n_rows, n_cols, ignore_index, BLOCK: tl.constexpr):
    # One program: the mean loss over valid targets, 1/n_valid for backward (1 when all are ignored),
    # and whether every target is ignored or a token id. Summed in a fixed order
    # (no atomics), so the loss is bitwise reproducible.
    offs = tl.arange(0, BLOCK)
    total = tl.zeros((BLOCK,), tl.float32)
    n_valid = tl.zeros((BLOCK,), tl.int32)
    n_bad = tl.zeros((BLOCK,), tl.int32)
    for start in range(0, n_rows, BLOCK):
        rows = start + offs
        mask = rows < n_rows
        target = tl.load(TARGETS + rows, mask=mask, other=ignore_index)
        counted = target != ignore_index
        inside = (target >= 0) & (target < n_cols)
        n_valid += (counted & inside).to(tl.int32)
        n_bad += (counted & ~inside).to(tl.int32)
        total += tl.load(LOSSES + rows, mask=mask, other=0.0)
    inv = 1.0 / tl.maximum(tl.sum(n_valid, axis=0), 1).to(tl.float32)
    tl.store(LOSS, tl.sum(total, axis=0) * inv)
    tl.store(INV_N_VALID, inv)
    tl.store(ALL_VALID, (tl.sum(n_bad, axis=0) == 0).to(tl.int32))


@triton.jit
def _scale_cast(SRC, DST, GRAD_LOSS, INV_N_VALID, n, BLOCK: tl.constexpr):
    # dst = src * (grad_loss / n_valid), in fp32, rounded once to dst's dtype.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    scale = tl.load(GRAD_LOSS).to(tl.float32) * tl.load(INV_N_VALID)
    x = tl.load(SRC + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(DST + offs, (x * scale).to(DST.dtype.element_ty), mask=mask)


def _chunk_rows(n_rows: int, hidden: int, vocab: int) -> int:
    """Rows per chunk: about as many logits as hidden states, so memory stays O(tokens x hidden)."""
    if is_interpreter():
        return max(1, min(n_rows, 64))
    return max(1, min(n_rows, next_power_of_2(max(1, n_rows * hidden // vocab)), 8192))


def _finish(losses: torch.Tensor, targets: torch.Tensor, vocab: int,
            ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean loss and 1/n_valid (fp32 scalars), with every target checked to be a token id. On CUDA
    neither touches the host: a sync here would stall the training step's launches every step (the GPU
    then idles while the backward is queued), so a bad id trips a device-side assert instead; the data
    pipeline has already checked ids against the vocabulary. Elsewhere the check names the row."""
    loss = losses.new_empty(())
    inv_n_valid = losses.new_empty(())
    all_valid = torch.empty((), dtype=torch.int32, device=losses.device)
    _ce_finish[(1,)](losses, targets, loss, inv_n_valid, all_valid, losses.shape[0], vocab, ignore_index,
                     BLOCK=1024)
    if targets.is_cuda:
        torch._assert_async(all_valid, "linear_cross_entropy: a target is outside the vocabulary")
    elif not all_valid.item():
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
        row = int(bad.nonzero()[0, 0])
        raise ValueError(f"linear_cross_entropy: target {int(targets[row])} at row {row} is outside the "
                         f"vocabulary [0, {vocab}) and is not ignore_index={ignore_index}")
    return loss, inv_n_valid


def _add_weight_grad(grad_weight: torch.Tensor | None, g: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """grad_weight (fp32; None before the first chunk, which then writes it instead of adding to
    zeros) + g.T @ h, without rounding the bf16/fp16 product before it is summed."""
    if g.is_cuda and g.dtype != torch.float32:
        part = torch.mm(g.t(), h, out_dtype=torch.float32)
        return part if grad_weight is None else grad_weight.add_(part)
    g, h = g.t().float(), h.float()
    return torch.mm(g, h) if grad_weight is None else grad_weight.addmm_(g, h)


def _fused_forward(hidden, weight, targets, ignore_index, grad_hidden_needed, grad_weight_needed):
    if (hidden.dim() != 2 or weight.dim() != 2 or weight.shape[1] != hidden.shape[1]
            or targets.shape != hidden.shape[:1]):
        raise ValueError(f"linear_cross_entropy: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)} and "
                         f"targets {tuple(targets.shape)} must be (N, H), (V, H) and (N,)")
    n_rows, dim = hidden.shape
    vocab = weight.shape[0]
    targets = targets.contiguous()
    losses = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)  # _ce_rows writes every row
    grad_hidden = torch.empty_like(hidden) if grad_hidden_needed else None
    grad_weight = None
    chunk = _chunk_rows(n_rows, dim, vocab)
    block = min(next_power_of_2(vocab), 4096 if not is_interpreter() else 1024)
    for start in range(0, n_rows, chunk):
        h = hidden[start:start + chunk]
        t = targets[start:start + chunk]
        # The interpreter's bf16 arithmetic is unreliable: give it fp32 logits (CPU testing only).
        logits = (h @ weight.t()).float() if is_interpreter() else h @ weight.t()
        rows = rows_per_tile(h.shape[0], block)
        _ce_rows[(cdiv(h.shape[0], rows),)](logits, t, losses[start:start + chunk], logits.stride(0),
                                                   h.shape[0], vocab, ignore_index, ROWS=rows, BLOCK=block,
                                                   num_warps=8 if block >= 2048 else 4)
        g = logits.to(hidden.dtype)  # now softmax - onehot, written over the logits
        if grad_hidden is not None:
            torch.mm(g, weight, out=grad_hidden[start:start + chunk])
        if grad_weight_needed:
            grad_weight = _add_weight_grad(grad_weight, g, h)
    if grad_weight_needed and grad_weight is None:  # no rows
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    loss, inv_n_valid = _finish(losses, targets, vocab, ignore_index)
    return loss, grad_hidden, grad_weight, inv_n_valid


# A custom op rather than an autograd.Function: the forward loops over chunks and (off CUDA) checks
# targets on the host, which torch.compile should not trace; as an opaque op with a fake
# implementation it stays one node of the compiled graph. Unneeded gradients come back as empty tensors.
@torch.library.custom_op("minimind_fast::linear_cross_entropy", mutates_args=())
def _linear_cross_entropy_op(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                             need_grad_hidden: bool, need_grad_weight: bool
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    check_device(hidden, weight)
    loss, grad_hidden, grad_weight, inv_n_valid = _fused_forward(hidden.contiguous(), weight, targets,
                                                                 ignore_index, need_grad_hidden, need_grad_weight)
    return (loss, grad_hidden if grad_hidden is not None else hidden.new_empty(0),
            grad_weight if grad_weight is not None else hidden.new_empty(0), inv_n_valid)


@_linear_cross_entropy_op.register_fake
def _(hidden, weight, targets, ignore_index, need_grad_hidden, need_grad_weight):
    loss = hidden.new_empty((), dtype=torch.float32)
    grad_hidden = hidden.new_empty(hidden.shape) if need_grad_hidden else hidden.new_empty(0)
    grad_weight = weight.new_empty(weight.shape, dtype=torch.float32) if need_grad_weight else hidden.new_empty(0)
    return loss, grad_hidden, grad_weight, hidden.new_empty((), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    _, weight, _, _, need_grad_hidden, need_grad_weight = inputs
    _, grad_hidden, grad_weight, inv_n_valid = output
    ctx.save_for_backward(grad_hidden, grad_weight, inv_n_valid)
    ctx.needs = (need_grad_hidden, need_grad_weight)
    ctx.weight_dtype = weight.dtype
    ctx.mark_non_differentiable(grad_hidden, grad_weight, inv_n_valid)
    # autograd would otherwise hand _backward a zero tensor for each of those three outputs, one the size
    # of the output weight (fp32): launches and memory for nothing
    ctx.set_materialize_grads(False)


def _scaled(src: torch.Tensor, dtype: torch.dtype, grad_loss: torch.Tensor, inv_n_valid: torch.Tensor) -> torch.Tensor:
    out = torch.empty(src.shape, dtype=dtype, device=src.device)
    if src.numel():
        _scale_cast[(cdiv(src.numel(), SCALE_BLOCK),)](src, out, grad_loss, inv_n_valid, src.numel(), BLOCK=SCALE_BLOCK)
    return out


# Backward as a custom op too, so that torch.compile keeps its Triton launches as one graph node.
@torch.library.custom_op("minimind_fast::linear_cross_entropy_backward", mutates_args=())
def _linear_cross_entropy_backward_op(grad_loss: torch.Tensor, grad_hidden: torch.Tensor, grad_weight: torch.Tensor,
                                      inv_n_valid: torch.Tensor, weight_dtype: torch.dtype
                                      ) -> tuple[torch.Tensor, torch.Tensor]:
    return (_scaled(grad_hidden, grad_hidden.dtype, grad_loss, inv_n_valid),
            _scaled(grad_weight, weight_dtype, grad_loss, inv_n_valid))


@_linear_cross_entropy_backward_op.register_fake
def _(grad_loss, grad_hidden, grad_weight, inv_n_valid, weight_dtype):
    return torch.empty_like(grad_hidden), grad_weight.new_empty(grad_weight.shape, dtype=weight_dtype)


def _backward(ctx, grad_loss, *_unused_output_grads):
    grad_hidden, grad_weight, inv_n_valid = ctx.saved_tensors
    dh, dw = _linear_cross_entropy_backward_op(grad_loss, grad_hidden, grad_weight, inv_n_valid, ctx.weight_dtype)
    return (dh if ctx.needs[0] else None), (dw if ctx.needs[1] else None), None, None, None, None


_linear_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T` against targets without materialising all logits
    (same contract as `reference.linear_cross_entropy`: fp32 loss, 0 when every target is ignored)."""
    grad = torch.is_grad_enabled()
    return _linear_cross_entropy_op(hidden, weight, targets, ignore_index,
                                    grad and hidden.requires_grad, grad and weight.requires_grad)[0]
