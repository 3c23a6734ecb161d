"""Rotary position embedding on Q and K in one launch, forward and backward (Triton).

Half-rotation convention (Hugging Face Llama, MiniMind): for the two halves x1, x2 of a head,
`y1 = x1*cos - x2*sin`, `y2 = x2*cos + x1*sin`. Each program rotates a tile of (token, head) rows,
each reading its token's cos/sin row (from a (T, D) table, or (B, T, D) for per-sequence positions: KV-cache offsets,
positions restarting per packed document, YaRN-scaled tables). Q's and K's heads are rotated in one
launch, so GQA shapes (fewer K heads) need nothing special. Backward is the rotation by the
opposite angle.

Q and K are rotated in place whenever autograd allows it (`ctx.mark_dirty`), which saves two
activation-sized buffers. Autograd allows it for tensors it does not track (generation, eval) and for
tracked tensors that are not views; it forbids it for a view (the model's `q_proj(x).view(...)`)
modified by a function with two outputs, so there the rotation goes to new tensors. That costs only
transient memory in training: the unrotated q/k are freed right after, as nothing saves them.
Where in-place is not allowed (also: a leaf that requires grad, overlapping memory, last dim not
unit-stride) the input is left untouched. Callers must use the returned tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import cdiv, check_device, next_power_of_2, rows_per_tile


@triton.jit
def _rotate_rows(src, dst, COS, SIN, first, n_rows, n_heads, seq_len, s_b, s_t, s_h, d_b, d_t, d_h, sc_b, sc_t,
                 half, sign, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    # Rows are (token, head) pairs in (batch, seq, head) order; each reads its token's cos/sin row.
    rows = first + tl.arange(0, ROWS)
    d = tl.arange(0, BLOCK_D)
    mask = (rows < n_rows)[:, None] & (d < half)[None, :]
    tok = rows // n_heads
    head = rows % n_heads
    b = tok // seq_len
    t = tok % seq_len
    # Only the first half of each table row is read: the halves are equal by construction.
    table = (b * sc_b + t * sc_t)[:, None] + d[None, :]
    cos = tl.load(COS + table, mask=mask, other=0.0).to(tl.float32)
    sin = tl.load(SIN + table, mask=mask, other=0.0).to(tl.float32) * sign
    src_offs = (b * s_b + t * s_t + head * s_h)[:, None] + d[None, :]
    dst_offs = (b * d_b + t * d_t + head * d_h)[:, None] + d[None, :]
    x1 = tl.load(src + src_offs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + src_offs + half, mask=mask, other=0.0).to(tl.float32)
    tl.store(dst + dst_offs, (x1 * cos - x2 * sin).to(dst.dtype.element_ty), mask=mask)
    tl.store(dst + dst_offs + half, (x2 * cos + x1 * sin).to(dst.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(Q, K, QO, KO, COS, SIN,
                 sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, oq_b, oq_t, oq_h, ok_b, ok_t, ok_h, sc_b, sc_t,
                 seq_len, n_q_rows, n_k_rows, n_q_heads, n_k_heads, q_programs, half, sign,
                 ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    # One launch for both: the first q_programs programs rotate Q's rows, the rest K's.
    pid = tl.program_id(0).to(tl.int64)
    if pid < q_programs:
        _rotate_rows(Q, QO, COS, SIN, pid * ROWS, n_q_rows, n_q_heads, seq_len,
                     sq_b, sq_t, sq_h, oq_b, oq_t, oq_h, sc_b, sc_t, half, sign, ROWS, BLOCK_D)
    else:
        _rotate_rows(K, KO, COS, SIN, (pid - q_programs) * ROWS, n_k_rows, n_k_heads, seq_len,
                     sk_b, sk_t, sk_h, ok_b, ok_t, ok_h, sc_b, sc_t, half, sign, ROWS, BLOCK_D)


def _table(table: torch.Tensor, bsz: int, seq_len: int, dim: int, name: str) -> tuple[torch.Tensor, int]:
    """The (B or 1, T, D) view of a cos/sin table and its batch stride (0 when shared by all rows)."""
    t3 = table if table.dim() == 3 else table.unsqueeze(0)
    if t3.dim() != 3 or t3.shape[1] != seq_len or t3.shape[2] != dim or t3.shape[0] not in (1, bsz):
        raise ValueError(f"rope: {name} has shape {tuple(table.shape)}; expected ({seq_len}, {dim}) "
                         f"or ({bsz}, {seq_len}, {dim})")
    if t3.stride(-1) != 1:
        t3 = t3.contiguous()
    return t3, (t3.stride(0) if t3.shape[0] > 1 else 0)


def _distinct_elements(t: torch.Tensor) -> bool:
    """True when no two elements of the strided tensor share memory (each stride clears the dims below it)."""
    span = 1
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz > 1):
        if stride < span:
            return False
        span += stride * (size - 1)
    return True


def _ranges_overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the memory spans of a and b intersect (conservative: interleaved views count)."""
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False

    def span(t: torch.Tensor) -> tuple[int, int]:
        last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride())) if t.numel() else -1
        return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()

    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1


def _may_overwrite(t: torch.Tensor, tracked: bool) -> bool:
    """Whether `t` can be rotated in place: autograd permits it and no two elements share memory.

    `tracked`: autograd records this call (grad mode on and q or k requires grad).
    """
    if t.stride(-1) != 1 or not _distinct_elements(t):
        return False
    if torch.is_inference(t) and not torch.is_inference_mode_enabled():
        return False
    if not tracked:
        return True
    return t._base is None and not (t.is_leaf and t.requires_grad)


def _launch(q, k, qo, ko, cos3, sin3, stride_cb, sign: float) -> None:
    bsz, seq_len, n_q, dim = q.shape
    n_k = k.shape[2]
    if q.numel() == 0 and k.numel() == 0:
        return
    block_d = next_power_of_2(max(dim // 2, 1))
    n_q_rows, n_k_rows = bsz * seq_len * n_q, bsz * seq_len * n_k
    rows = rows_per_tile(max(n_q_rows, n_k_rows), 2 * block_d)
    q_programs = cdiv(n_q_rows, rows)
    _rope_kernel[(q_programs + cdiv(n_k_rows, rows),)](
        q, k, qo, ko, cos3, sin3,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        qo.stride(0), qo.stride(1), qo.stride(2), ko.stride(0), ko.stride(1), ko.stride(2),
        stride_cb, cos3.stride(1), seq_len, n_q_rows, n_k_rows, n_q, n_k, q_programs, dim // 2, sign,
        ROWS=rows, BLOCK_D=block_d, num_warps=4)


def _check(q: torch.Tensor, k: torch.Tensor) -> None:
    check_device(q, k)
    if q.dim() != 4 or k.dim() != 4 or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        raise ValueError(f"rope: q {tuple(q.shape)} and k {tuple(k.shape)} must be (B, T, H, D) with equal B, T, D")
    if q.shape[3] % 2:
        raise ValueError(f"rope: head_dim {q.shape[3]} must be even")


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _out_like(t: torch.Tensor) -> torch.Tensor:
    """The custom op's output for t, laid out as its real and fake forms both promise: t's layout when
    its last dim is unit-stride, else contiguous."""
    return torch.empty_like(t) if t.stride(-1) == 1 else torch.empty_like(t, memory_format=torch.contiguous_format)


def _tables(q, cos, sin) -> tuple[torch.Tensor, torch.Tensor, int]:
    """cos and sin as (B or 1, T, D) views with one layout, and their batch stride."""
    bsz, seq_len, _, dim = q.shape
    cos3, stride_cb = _table(cos, bsz, seq_len, dim, "cos")
    sin3, _ = _table(sin, bsz, seq_len, dim, "sin")
    if cos3.shape != sin3.shape:  # one shared (T, D), the other per sequence: the kernel reads both alike
        cos3, sin3 = cos3.expand(bsz, -1, -1), sin3.expand(bsz, -1, -1)
    if sin3.stride() != cos3.stride():
        cos3, sin3 = cos3.contiguous(), sin3.contiguous()
        stride_cb = cos3.stride(0) if cos3.shape[0] > 1 else 0
    return cos3, sin3, stride_cb


class RotaryFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin, tracked):
        _check(q, k)
        cos3, sin3, stride_cb = _tables(q, cos, sin)
        # Writing q where it lies while k still has to be read from the same memory would corrupt k.
        apart = not _ranges_overlap(q, k)
        in_place_q = apart and _may_overwrite(q, tracked)
        in_place_k = apart and _may_overwrite(k, tracked)
        q_src, k_src = _unit_stride(q), _unit_stride(k)
        qo = q if in_place_q else torch.empty_like(q_src)
        ko = k if in_place_k else torch.empty_like(k_src)
        _launch(q_src, k_src, qo, ko, cos3, sin3, stride_cb, 1.0)
        dirty = [t for t, done in ((q, in_place_q), (k, in_place_k)) if done]
        if dirty:
            ctx.mark_dirty(*dirty)
        ctx.save_for_backward(cos3, sin3)
        ctx.stride_cb = stride_cb
        return qo, ko

    @staticmethod
    def backward(ctx, dq, dk):
        cos3, sin3 = ctx.saved_tensors
        dq, dk = _unit_stride(dq), _unit_stride(dk)
        # The incoming gradients may be shared with other nodes of the graph: write fresh buffers.
        dq_out, dk_out = torch.empty_like(dq), torch.empty_like(dk)
        _launch(dq, dk, dq_out, dk_out, cos3, sin3, ctx.stride_cb, -1.0)
        return dq_out, dk_out, None, None, None


# The same op for torch.compile (see swiglu.py for why both forms), always out of place: the compiler
# plans the buffers itself. The backward is the same rotation by the negative angle.
@torch.library.custom_op("minimind_fast::rotary", mutates_args=())
def _rotary_op(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               sign: float) -> tuple[torch.Tensor, torch.Tensor]:
    _check(q, k)
    cos3, sin3, stride_cb = _tables(q, cos, sin)
    qo, ko = _out_like(q), _out_like(k)
    _launch(_unit_stride(q), _unit_stride(k), qo, ko, cos3, sin3, stride_cb, sign)
    return qo, ko


@_rotary_op.register_fake
def _(q, k, cos, sin, sign):
    return _out_like(q), _out_like(k)


def _save_rotary(ctx, inputs, output):
    _, _, cos, sin, sign = inputs
    ctx.save_for_backward(cos, sin)
    ctx.sign = sign


def _rotary_grads(ctx, dq, dk):
    cos, sin = ctx.saved_tensors
    dq, dk = _rotary_op(dq, dk, cos, sin, -ctx.sign)
    return dq, dk, None, None, None


_rotary_op.register_autograd(_rotary_grads, setup_context=_save_rotary)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton rotary embedding of q (B,T,Hq,D) and k (B,T,Hk,D); same contract as `reference.apply_rotary`.

    Rotates in place when autograd allows (see the module docstring): use the returned tensors.
    """
    if torch.compiler.is_compiling():
        return _rotary_op(q, k, cos, sin, 1.0)
    tracked = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
    return RotaryFunction.apply(q, k, cos, sin, tracked)


class TritonRotary(torch.nn.Module):
    """Module form of `apply_rotary` (cos/sin tables are passed per call, as the model slices them)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return apply_rotary(q, k, cos, sin)
