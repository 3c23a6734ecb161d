"""Cross-entropy fused with the output projection, in chunks of tokens (Triton + matmuls).

The (tokens x vocab) logits are the largest activation of a small model's step (vocab 6400 x 16k
tokens in fp32 is 400 MB). Here they exist one chunk at a time: for each chunk, a matmul gives the
logits, a Triton kernel computes the loss of each row with an online softmax over vocabulary blocks
and overwrites the logits in place with their gradient `softmax - onehot`, and two more matmuls turn
it into the chunk's grad_hidden and its share of grad_weight. The gradients are thus ready after
forward; backward only scales them by the incoming gradient over n_valid. That division happens in
fp32 in backward, never in the 16-bit logits: (softmax - onehot) / n_valid for thousands of tokens
is below fp16's normal range and would underflow before DeepSpeed's loss scale could lift it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import cdiv, check_device, is_interpreter, next_power_of_2, rows_per_tile

IGNORE_INDEX = -100


@triton.jit
def _ce_rows(LOGITS, TARGETS, LOSS, stride, n_rows, n_cols, ignore_index,
             ROWS: tl.constexpr, BLOCK: tl.constexpr):
    # ROWS rows per program (one for a large vocabulary on a GPU); two passes over vocabulary blocks:
    # an online max / sum-of-exp for the log-sum-exp, then the gradient written over the logits.
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_mask = rows < n_rows
    target = tl.load(TARGETS + rows, mask=row_mask, other=ignore_index)
    valid = row_mask & (target != ignore_index)
    base = LOGITS + rows[:, None] * stride
    cols = tl.arange(0, BLOCK)
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
    x_t = tl.load(LOGITS + rows * stride + target, mask=valid, other=0.0).to(tl.float32)
    tl.store(LOSS + rows, tl.where(valid, lse - x_t, 0.0), mask=row_mask)
    for start in range(0, n_cols, BLOCK):
        mask = row_mask[:, None] & (start + cols < n_cols)[None, :]
        x = tl.load(base + start + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        grad = tl.exp(x - lse[:, None]) - tl.where(start + cols[None, :] == target[:, None], 1.0, 0.0)
        grad = tl.where(valid[:, None], grad, 0.0)
        tl.store(base + start + cols[None, :], grad.to(LOGITS.dtype.element_ty), mask=mask)


def _chunk_rows(n_rows: int, hidden: int, vocab: int) -> int:
    """Rows per chunk: about as many logits as hidden states, so memory stays O(tokens x hidden)."""
    if is_interpreter():
        return max(1, min(n_rows, 64))
    return max(1, min(n_rows, next_power_of_2(max(1, n_rows * hidden // vocab)), 8192))


def _inv_n_valid(targets: torch.Tensor, vocab: int, ignore_index: int) -> torch.Tensor:
    """1 / (non-ignored targets), as an fp32 scalar tensor (1 when all are ignored), with every target
    checked to be a token id. On CUDA neither touches the host: a sync here would stall the training
    step's launches every step (the GPU then idles while the backward is queued), so a bad id trips a
    device-side assert instead; the data pipeline has already checked ids against the vocabulary.
    Elsewhere the check names the row."""
    valid = targets != ignore_index
    bad = valid & ((targets < 0) | (targets >= vocab))
    if targets.is_cuda:
        torch._assert_async(~bad.any(), "linear_cross_entropy: a target is outside the vocabulary")
    elif bad.any():
        row = int(bad.nonzero()[0, 0])
        raise ValueError(f"linear_cross_entropy: target {int(targets[row])} at row {row} is outside the "
                         f"vocabulary [0, {vocab}) and is not ignore_index={ignore_index}")
    return 1.0 / valid.sum().clamp(min=1).to(torch.float32)


def _add_weight_grad(grad_weight: torch.Tensor, g: torch.Tensor, h: torch.Tensor) -> None:
    """grad_weight (fp32) += g.T @ h, without rounding the bf16/fp16 product before it is summed."""
    if g.is_cuda and g.dtype != torch.float32:
        grad_weight += torch.mm(g.t(), h, out_dtype=torch.float32)
    else:
        grad_weight.addmm_(g.t().float(), h.float())


def _fused_forward(hidden, weight, targets, ignore_index, grad_hidden_needed, grad_weight_needed):
    n_rows, dim = hidden.shape
    vocab = weight.shape[0]
    if weight.dim() != 2 or weight.shape[1] != dim or targets.shape != (n_rows,):
        raise ValueError(f"linear_cross_entropy: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)} and "
                         f"targets {tuple(targets.shape)} must be (N, H), (V, H) and (N,)")
    inv_n_valid = _inv_n_valid(targets, vocab, ignore_index)
    losses = torch.zeros(n_rows, dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if grad_hidden_needed else None
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if grad_weight_needed else None
    chunk = _chunk_rows(n_rows, dim, vocab)
    block = min(next_power_of_2(vocab), 4096 if not is_interpreter() else 1024)
    for start in range(0, n_rows, chunk):
        h = hidden[start:start + chunk]
        t = targets[start:start + chunk].contiguous()
        # The interpreter's bf16 arithmetic is unreliable: give it fp32 logits (CPU testing only).
        logits = (h @ weight.t()).float() if is_interpreter() else h @ weight.t()
        rows = rows_per_tile(h.shape[0], block)
        _ce_rows[(cdiv(h.shape[0], rows),)](logits, t, losses[start:start + chunk], logits.stride(0),
                                                   h.shape[0], vocab, ignore_index, ROWS=rows, BLOCK=block,
                                                   num_warps=8 if block >= 2048 else 4)
        g = logits.to(hidden.dtype)  # now softmax - onehot, written over the logits
        if grad_hidden is not None:
            torch.mm(g, weight, out=grad_hidden[start:start + chunk])
        if grad_weight is not None:
            _add_weight_grad(grad_weight, g, h)
    return losses.sum() * inv_n_valid, grad_hidden, grad_weight, inv_n_valid


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
    grad_hidden = torch.empty_like(hidden) if need_grad_hidden else hidden.new_empty(0)
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


def _backward(ctx, grad_loss, *_unused_output_grads):
    grad_hidden, grad_weight, inv_n_valid = ctx.saved_tensors
    g = grad_loss.float() * inv_n_valid
    dh = (grad_hidden.float() * g).to(grad_hidden.dtype) if ctx.needs[0] else None
    dw = (grad_weight * g).to(ctx.weight_dtype) if ctx.needs[1] else None
    return dh, dw, None, None, None, None


_linear_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T` against targets without materialising all logits
    (same contract as `reference.linear_cross_entropy`: fp32 loss, 0 when every target is ignored)."""
    grad = torch.is_grad_enabled()
    return _linear_cross_entropy_op(hidden, weight, targets, ignore_index,
                                    grad and hidden.requires_grad, grad and weight.requires_grad)[0]
