"""MoE token dispatch in Triton: routing, a counting sort by expert, grouped GEMMs, weighted combine.

Forward of `moe_experts`, for P = N * top_k (token, slot) pairs:

1. Counting sort of the pairs by expert, with no host sync, in three launches: a per-block histogram
   kernel, a one-program kernel for the prefix sums over (block, expert) counts, and a scatter kernel
   that writes each pair's id at its stable position. Only the P pair ids move; activations are never copied into a
   padded per-expert buffer.
2. Grouped GEMM over all experts in one launch: program (m, n) finds its expert and row range from the
   per-expert counts (the tile schedule is computed inside the kernel, so the grid is an upper bound
   and no count ever travels to the host). The first GEMM gathers token rows straight into its tiles
   and computes gate and up together, applying SwiGLU in the epilogue; the second (down) scales each
   row by its routing weight and writes it at the pair's original (token, slot) position.
3. The k slots of each token are summed in fp32 in a fixed order, so results are deterministic (no
   atomics anywhere in the layer).

Backward: one grouped GEMM gives dh = dOut[token] @ W_down[e] and, in its epilogue, the SwiGLU
backward (recomputing silu from the saved pre-activations) and the routing-weight gradient
dot(dOut[token], expert_out) = dot(dh_unweighted, h); a second gives dX; two per-expert kernels reduce
the weight gradients over each expert's tokens in fp32. Empty experts get zero weight gradients.

`moe_route` is a one-pass softmax + top-k (+ renormalisation when k > 1 and `norm_topk_prob`) kernel
with its backward through the renormalisation and the softmax; `moe_route_with_counts` also returns the
per-expert (optionally per-sequence) token counts the load-balancing loss needs, from the same pass.
`moe_route_aux` goes on to the loss itself: it is linear in the router probabilities given the counts,
so one more kernel sums per-block partials, and its gradient is added in the router's backward kernel.

`moe_experts_grouped_mm` (or MINIMIND_MOE_GEMM=torch) runs the expert GEMMs on torch's grouped GEMM
instead, autograd differentiating it, with the same sort and SwiGLU kernels.

Each op exists twice, as in the other kernel files: an `autograd.Function` for eager mode (cheaper to
call) and a `torch.library` custom op that torch.compile keeps as one graph node, so that a MoE model
compiles without graph breaks.

Autotuning is on for CUDA and off under Triton's interpreter (or with MINIMIND_AUTOTUNE=0); under the
interpreter the matmul operands are upcast to fp32, the only precision it handles.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .swiglu import swiglu
from .utils import cdiv, check_device, is_interpreter, next_power_of_2, rows_per_tile

INTERPRET = is_interpreter()
AUTOTUNE = not INTERPRET and os.environ.get("MINIMIND_AUTOTUNE", "1") != "0"
# The expert GEMMs can instead run on torch's grouped GEMM (`F.grouped_mm`: CUTLASS on Hopper, the path
# torchtitan trains MoE with), keeping our routing, sort and SwiGLU kernels: MINIMIND_MOE_GEMM=torch.
# On CUDA it takes bf16 only; other dtypes keep the Triton GEMMs. The benchmark measures both.
GEMM = os.environ.get("MINIMIND_MOE_GEMM", "triton")
if GEMM not in ("triton", "torch"):
    raise ValueError(f"MINIMIND_MOE_GEMM={GEMM!r} must be triton or torch")
SORT_BLOCK = 256
OFFSETS_TILE = 4096  # (blocks x experts) counts the prefix-sum kernel holds at once
ROUTE_ROWS = 16
AUX_ROWS, AUX_TILE = 64, 4096  # rows per program of the aux-loss kernel, and its most elements


class _Fixed:
    """Stands in for `triton.autotune` when tuning is off: launches with one fixed configuration."""

    def __init__(self, fn, meta: dict):
        self.fn, self.meta = fn, meta

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.fn[grid](*args, **kwargs, **self.meta)

    @property
    def best_config(self) -> triton.Config:  # as triton.autotune's, after a launch
        return triton.Config({k: v for k, v in self.meta.items() if k.startswith("BLOCK")})


def _tuned(configs: list[triton.Config], fixed: dict, key: list[str], reset: list[str] | None = None):
    def wrap(fn):
        if AUTOTUNE:
            return triton.autotune(configs=configs, key=key, reset_to_zero=reset)(fn)
        return _Fixed(fn, fixed)
    return wrap


def _cfg(bm: int, bn: int, bk: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)


# Grouped GEMMs: M = rows of one expert, N = output columns, K = reduction.
GEMM_CONFIGS = [
    _cfg(128, 128, 64, 8, 3), _cfg(128, 64, 64, 4, 4), _cfg(64, 128, 64, 4, 4),
    _cfg(64, 64, 64, 4, 4), _cfg(128, 128, 32, 8, 4), _cfg(64, 256, 32, 8, 3),
]
# Weight-gradient kernels: N x K output tile per expert, looping over the expert's M rows.
DW_CONFIGS = [
    _cfg(64, 128, 128, 8, 3), _cfg(32, 128, 128, 8, 4), _cfg(64, 64, 128, 4, 3),
    _cfg(64, 128, 64, 4, 4), _cfg(32, 64, 64, 4, 4),
]
FIXED = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32} if INTERPRET else {"BLOCK_M": 64, "BLOCK_N": 64,
                                                                           "BLOCK_K": 64, "num_warps": 4}
MIN_BLOCK_N = 32  # smallest BLOCK_N of any configuration: sizes the routing-weight partial sums


# ---------------------------------------------------------------------------------------------------
# Routing
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _route_fwd(L, S, W, IDX, COUNTS, n_rows, n_exp, stride_l, group_size,
               K: tl.constexpr, NORM: tl.constexpr, COUNT: tl.constexpr,
               BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_E)
    rmask = rows < n_rows
    cmask = cols < n_exp
    mask = rmask[:, None] & cmask[None, :]
    x = tl.load(L + rows[:, None] * stride_l + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    x = tl.where(cmask[None, :], x, -float("inf"))
    e = tl.exp(x - tl.max(x, axis=1)[:, None])
    p = e / tl.sum(e, axis=1)[:, None]
    tl.store(S + rows[:, None] * n_exp + cols[None, :], p, mask=mask)

    # top-k by k rounds of argmax, in descending order. Equal scores (common from bf16 logits) go to the
    # lowest expert index first, as in reference.moe_route: a tie rule left to chance would route the same
    # token differently here and on the reference path (CPU inference of a GPU-trained model)
    kcols = tl.arange(0, BLOCK_K)
    top_w = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    top_i = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.int32)
    # A NaN score (a NaN or +inf logit makes the whole row NaN) ranks above every number, as in torch.sort:
    # argmax passes over NaN, and would pick a padding column, an expert id outside [0, E).
    work = tl.where(cmask[None, :], tl.where(p != p, 2.0, p), -1.0)
    for j in tl.static_range(K):
        arg = tl.argmax(work, axis=1, tie_break_left=True)
        best = tl.sum(tl.where(cols[None, :] == arg[:, None], p, 0.0), axis=1)  # the score itself, NaN kept
        top_w = tl.where(kcols[None, :] == j, best[:, None], top_w)
        top_i = tl.where(kcols[None, :] == j, arg[:, None], top_i)
        work = tl.where(cols[None, :] == arg[:, None], -1.0, work)
    if NORM:
        top_w = top_w / (tl.sum(top_w, axis=1)[:, None] + 1e-20)
    kmask = rmask[:, None] & (kcols[None, :] < K)
    tl.store(W + rows[:, None] * K + kcols[None, :], top_w, mask=kmask)
    tl.store(IDX + rows[:, None] * K + kcols[None, :], top_i.to(tl.int64), mask=kmask)
    if COUNT:
        # one-hot of the chosen experts, added to the row's group; integer atomics are exact
        chosen = tl.zeros((BLOCK_R, BLOCK_E), dtype=tl.int32)
        for j in tl.static_range(K):
            sel = tl.sum(tl.where(kcols[None, :] == j, top_i, 0), axis=1)
            chosen += (cols[None, :] == sel[:, None]).to(tl.int32)
        group = rows // group_size
        tl.atomic_add(COUNTS + group[:, None] * n_exp + cols[None, :], chosen, mask=mask)


@triton.jit
def _route_bwd(S, IDX, DW, DS, COUNTS, D_AUX, DL, n_rows, n_exp, stride_dl, group_size, aux_coef,
               K: tl.constexpr, NORM: tl.constexpr, HAS_DS: tl.constexpr, HAS_DW: tl.constexpr,
               HAS_AUX: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_E)
    rmask = rows < n_rows
    mask = rmask[:, None] & (cols[None, :] < n_exp)
    p = tl.load(S + rows[:, None] * n_exp + cols[None, :], mask=mask, other=0.0)
    if HAS_DS:
        dp = tl.load(DS + rows[:, None] * n_exp + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    else:
        dp = tl.zeros((BLOCK_R, BLOCK_E), dtype=tl.float32)
    if HAS_AUX:  # d aux / d p[r, e] = coef * counts[group of r, e], scaled by the aux loss's gradient
        group = rows // group_size
        c = tl.load(COUNTS + group[:, None] * n_exp + cols[None, :], mask=mask, other=0).to(tl.float32)
        dp += c * (tl.load(D_AUX) * aux_coef)
    if HAS_DW:
        if NORM:
            # w_j = p_j / s with s = sum of the selected p (+1e-20): dL/dp_j = (dw_j - sum_i dw_i w_i) / s
            s = tl.zeros((BLOCK_R,), dtype=tl.float32) + 1e-20
            dot = tl.zeros((BLOCK_R,), dtype=tl.float32)
            for j in tl.static_range(K):
                idx = tl.load(IDX + rows * K + j, mask=rmask, other=0)
                dw = tl.load(DW + rows * K + j, mask=rmask, other=0.0).to(tl.float32)
                p_sel = tl.sum(tl.where(cols[None, :] == idx[:, None], p, 0.0), axis=1)
                s += p_sel
                dot += dw * p_sel
            for j in tl.static_range(K):
                idx = tl.load(IDX + rows * K + j, mask=rmask, other=0)
                dw = tl.load(DW + rows * K + j, mask=rmask, other=0.0).to(tl.float32)
                g = (dw - dot / s) / s
                dp += tl.where(cols[None, :] == idx[:, None], g[:, None], 0.0)
        else:
            for j in tl.static_range(K):
                idx = tl.load(IDX + rows * K + j, mask=rmask, other=0)
                dw = tl.load(DW + rows * K + j, mask=rmask, other=0.0).to(tl.float32)
                dp += tl.where(cols[None, :] == idx[:, None], dw[:, None], 0.0)
    dl = p * (dp - tl.sum(p * dp, axis=1)[:, None])
    tl.store(DL + rows[:, None] * stride_dl + cols[None, :], dl.to(DL.dtype.element_ty), mask=mask)


@triton.jit
def _aux_rows(S, COUNTS, PARTIAL, n_rows, n_exp, group_size, coef, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr):
    """coef * sum over this block's rows r and experts e of counts[group of r, e] * p[r, e]: the load-
    balancing loss is the sum of these partials, as sum_g sum_e f_ge * mean_r p_re is linear in p."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_E)
    mask = (rows < n_rows)[:, None] & (cols < n_exp)[None, :]
    p = tl.load(S + rows[:, None] * n_exp + cols[None, :], mask=mask, other=0.0)
    c = tl.load(COUNTS + (rows // group_size)[:, None] * n_exp + cols[None, :], mask=mask, other=0).to(tl.float32)
    tl.store(PARTIAL + tl.program_id(0), tl.sum(tl.sum(p * c, axis=1), axis=0) * coef)


def _route_forward(logits, top_k, norm_topk_prob, group_size):
    check_device(logits)
    n_rows, n_exp = logits.shape
    _check_top_k(top_k, n_exp)
    logits = logits.contiguous()
    norm = bool(norm_topk_prob and top_k > 1)
    scores = torch.empty(n_rows, n_exp, dtype=torch.float32, device=logits.device)
    weight = torch.empty(n_rows, top_k, dtype=torch.float32, device=logits.device)
    idx = torch.empty(n_rows, top_k, dtype=torch.int64, device=logits.device)
    count = group_size is not None
    counts = torch.zeros(_route_groups(n_rows, group_size), n_exp, dtype=torch.int32, device=logits.device)
    if n_rows:
        _route_fwd[(cdiv(n_rows, ROUTE_ROWS),)](
            logits, scores, weight, idx, counts, n_rows, n_exp, logits.stride(0), group_size or 1,
            K=top_k, NORM=norm, COUNT=count, BLOCK_R=ROUTE_ROWS,
            BLOCK_E=next_power_of_2(n_exp), BLOCK_K=next_power_of_2(top_k))
    return scores, weight, idx, counts


def _check_top_k(top_k: int, n_exp: int) -> None:
    if not 1 <= top_k <= n_exp:
        raise ValueError(f"moe_route: top_k={top_k} must be between 1 and the {n_exp} experts")


def _route_groups(n_rows: int, group_size: int | None) -> int:
    return max(1, cdiv(n_rows, group_size)) if group_size is not None else 1


def _route_backward(scores, idx, d_scores, d_weight, norm, logits_dtype, counts=None, d_aux=None, aux_coef=0.0,
                    group_size=1):
    """Gradient of the logits from those of the scores, the top-k weights and (with counts and d_aux)
    the load-balancing loss of `_route_aux_forward`."""
    n_rows, n_exp = scores.shape
    dl = torch.empty(n_rows, n_exp, dtype=logits_dtype, device=scores.device)
    has_ds, has_dw, has_aux = d_scores is not None, d_weight is not None, d_aux is not None
    if n_rows:
        _route_bwd[(cdiv(n_rows, ROUTE_ROWS),)](
            scores, idx, d_weight.contiguous() if has_dw else scores, d_scores.contiguous() if has_ds else scores,
            counts if has_aux else scores, d_aux if has_aux else scores, dl, n_rows, n_exp, dl.stride(0),
            group_size, aux_coef, K=idx.shape[1], NORM=norm, HAS_DS=has_ds, HAS_DW=has_dw, HAS_AUX=has_aux,
            BLOCK_R=ROUTE_ROWS, BLOCK_E=next_power_of_2(n_exp))
    return dl


def _aux_setup(n_rows: int, n_exp: int, top_k: int, group_size: int | None, alpha: float) -> tuple[int, float]:
    """(rows per group, coef): the loss alpha * mean_g sum_e f_ge * P_ge, with f_ge = counts_ge * E / (rows * k)
    and P_ge the mean score over the group's rows, is coef * sum_r sum_e counts[g(r), e] * p[r, e]."""
    _check_top_k(top_k, n_exp)  # before the coefficient divides by it
    rows = group_size or n_rows or 1
    if n_rows % rows:
        raise ValueError(f"moe_route_aux: {n_rows} rows do not split into groups of {rows}")
    n_groups = max(1, n_rows // rows)
    return rows, alpha * n_exp / (rows * rows * top_k * n_groups)


def _route_aux_forward(logits, top_k, norm_topk_prob, group_size, alpha):
    """(topk_weight, topk_idx, aux loss, and for backward: scores, counts) in three launches."""
    n_rows, n_exp = logits.shape
    rows, coef = _aux_setup(n_rows, n_exp, top_k, group_size, alpha)
    scores, weight, idx, counts = _route_forward(logits, top_k, norm_topk_prob, rows)
    block_e = next_power_of_2(n_exp)
    block_r = max(1, min(AUX_ROWS, AUX_TILE // block_e))  # many experts: fewer rows per program
    n_blocks = max(1, cdiv(n_rows, block_r))
    partial = torch.empty(n_blocks, dtype=torch.float32, device=logits.device) if n_rows else \
        torch.zeros(1, dtype=torch.float32, device=logits.device)
    if n_rows:
        _aux_rows[(n_blocks,)](scores, counts, partial, n_rows, n_exp, rows, coef, BLOCK_R=block_r, BLOCK_E=block_e)
    return weight, idx, partial.sum(), scores, counts


def _eager_form(name: str, forward, setup_context, grads) -> type[torch.autograd.Function]:
    """The autograd.Function twin of a custom op below (see swiglu.py for why both forms): the same
    forward, setup_context (what backward keeps) and gradient function, which calls the plain backward
    instead of the backward op."""

    def function_forward(ctx, *inputs):
        outputs = forward(*inputs)
        setup_context(ctx, inputs, outputs)
        return outputs

    def function_backward(ctx, *output_grads):
        return grads(ctx, *output_grads, eager=True)

    return type(name, (torch.autograd.Function,), {"forward": staticmethod(function_forward),
                                                   "backward": staticmethod(function_backward)})


# As custom ops each stays one node of the graph, so a MoE model compiles without graph breaks and
# `reduce-overhead` can replay it as CUDA graphs.
@torch.library.custom_op("minimind_fast::moe_route", mutates_args=())
def _route_op(logits: torch.Tensor, top_k: int, norm_topk_prob: bool, group_size: int | None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _route_forward(logits, top_k, norm_topk_prob, group_size)


@_route_op.register_fake
def _(logits, top_k, norm_topk_prob, group_size):
    n_rows, n_exp = logits.shape
    return (logits.new_empty(n_rows, n_exp, dtype=torch.float32), logits.new_empty(n_rows, top_k, dtype=torch.float32),
            logits.new_empty(n_rows, top_k, dtype=torch.int64),
            logits.new_empty(_route_groups(n_rows, group_size), n_exp, dtype=torch.int32))


@torch.library.custom_op("minimind_fast::moe_route_backward", mutates_args=())
def _route_backward_op(scores: torch.Tensor, idx: torch.Tensor, d_scores: torch.Tensor | None,
                       d_weight: torch.Tensor | None, norm: bool, logits_dtype: torch.dtype,
                       counts: torch.Tensor | None, d_aux: torch.Tensor | None, aux_coef: float,
                       group_size: int) -> torch.Tensor:
    return _route_backward(scores, idx, d_scores, d_weight, norm, logits_dtype, counts, d_aux, aux_coef, group_size)


@_route_backward_op.register_fake
def _(scores, idx, d_scores, d_weight, norm, logits_dtype, counts, d_aux, aux_coef, group_size):
    return torch.empty_like(scores, dtype=logits_dtype)


def _route_setup_context(ctx, inputs, output):
    logits, top_k, norm_topk_prob, _ = inputs
    scores, _, idx, counts = output
    ctx.save_for_backward(scores, idx)
    ctx.norm, ctx.logits_dtype = bool(norm_topk_prob and top_k > 1), logits.dtype
    ctx.mark_non_differentiable(idx, counts)
    ctx.set_materialize_grads(False)  # unused outputs' gradients stay None: no zero tensors to launch


def _route_grads(ctx, d_scores, d_weight, _d_idx, _d_counts, eager=False):
    scores, idx = ctx.saved_tensors
    backward = _route_backward if eager else _route_backward_op
    return backward(scores, idx, d_scores, d_weight, ctx.norm, ctx.logits_dtype, None, None, 0.0, 1), None, None, None


_route_op.register_autograd(_route_grads, setup_context=_route_setup_context)
MoERouteFunction = _eager_form("MoERouteFunction", _route_forward, _route_setup_context, _route_grads)


@torch.library.custom_op("minimind_fast::moe_route_aux", mutates_args=())
def _route_aux_op(logits: torch.Tensor, top_k: int, norm_topk_prob: bool, group_size: int | None, alpha: float
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _route_aux_forward(logits, top_k, norm_topk_prob, group_size, alpha)


@_route_aux_op.register_fake
def _(logits, top_k, norm_topk_prob, group_size, alpha):
    n_rows, n_exp = logits.shape
    rows, _ = _aux_setup(n_rows, n_exp, top_k, group_size, alpha)
    return (logits.new_empty(n_rows, top_k, dtype=torch.float32), logits.new_empty(n_rows, top_k, dtype=torch.int64),
            logits.new_empty((), dtype=torch.float32), logits.new_empty(n_rows, n_exp, dtype=torch.float32),
            logits.new_empty(_route_groups(n_rows, rows), n_exp, dtype=torch.int32))


def _route_aux_setup_context(ctx, inputs, output):
    logits, top_k, norm_topk_prob, group_size, alpha = inputs
    _, idx, _, scores, counts = output
    ctx.save_for_backward(scores, idx, counts)
    ctx.norm, ctx.logits_dtype = bool(norm_topk_prob and top_k > 1), logits.dtype
    ctx.rows, ctx.coef = _aux_setup(*logits.shape, top_k, group_size, alpha)
    ctx.mark_non_differentiable(idx, scores, counts)
    ctx.set_materialize_grads(False)


def _route_aux_grads(ctx, d_weight, _d_idx, d_aux, _d_scores, _d_counts, eager=False):
    scores, idx, counts = ctx.saved_tensors
    backward = _route_backward if eager else _route_backward_op
    dl = backward(scores, idx, None, d_weight, ctx.norm, ctx.logits_dtype, counts, d_aux, ctx.coef, ctx.rows)
    return dl, None, None, None, None


_route_aux_op.register_autograd(_route_aux_grads, setup_context=_route_aux_setup_context)
MoERouteAuxFunction = _eager_form("MoERouteAuxFunction", _route_aux_forward, _route_aux_setup_context,
                                  _route_aux_grads)


def _apply(function: type[torch.autograd.Function], op, *args) -> tuple[torch.Tensor, ...]:
    """The custom op while torch.compile traces, else the autograd.Function (cheaper to call eagerly)."""
    return op(*args) if torch.compiler.is_compiling() else function.apply(*args)


def _route(logits, top_k, norm_topk_prob, group_size):
    return _apply(MoERouteFunction, _route_op, logits, top_k, norm_topk_prob, group_size)


def moe_route(
    logits: torch.Tensor, top_k: int, norm_topk_prob: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton softmax router (same contract as `reference.moe_route`).

    Returns (scores (N, E) fp32, topk_weight (N, k) fp32, topk_idx (N, k) int64); the weights are
    renormalised only when k > 1 and `norm_topk_prob`, so a top-1 router still gets main-loss gradient.
    """
    scores, weight, idx, _ = _route(logits, top_k, norm_topk_prob, None)
    return scores, weight, idx


def moe_route_aux(
    logits: torch.Tensor, top_k: int, norm_topk_prob: bool, group_size: int | None, alpha: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Routing plus MiniMind's load-balancing loss (same contract as `reference.moe_route_aux`).

    Returns (topk_weight, topk_idx, aux): the router kernel counts each expert's picks as it routes, a
    second kernel and a sum form the loss, and its gradient joins the router's own backward kernel.
    """
    return _apply(MoERouteAuxFunction, _route_aux_op, logits, top_k, norm_topk_prob, group_size, alpha)[:3]


def moe_route_with_counts(
    logits: torch.Tensor, top_k: int, norm_topk_prob: bool, group_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`moe_route` plus the tokens each expert receives, counted in the same pass.

    counts is int32 (G, E): with `group_size` (e.g. the sequence length, for MiniMind's per-sequence
    aux loss) row r is counted in group r // group_size; without it G = 1 and counts cover all rows.
    """
    return _route(logits, top_k, norm_topk_prob, group_size or logits.shape[0] or 1)


# ---------------------------------------------------------------------------------------------------
# Counting sort of (token, slot) pairs by expert
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _expert_histogram(IDX, BLOCK_COUNTS, n_pairs, BLOCK: tl.constexpr, BLOCK_E: tl.constexpr):
    b = tl.program_id(0)
    offs = b.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    expert = tl.load(IDX + offs, mask=offs < n_pairs, other=-1)
    cols = tl.arange(0, BLOCK_E)
    onehot = (expert[:, None] == cols[None, :]).to(tl.int32)
    tl.store(BLOCK_COUNTS + b * BLOCK_E + cols, tl.sum(onehot, axis=0))


@triton.jit
def _scatter_pairs(IDX, BLOCK_BASE, SORTED_PAIR, n_pairs, BLOCK: tl.constexpr, BLOCK_E: tl.constexpr):
    b = tl.program_id(0)
    offs = b.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_pairs
    expert = tl.load(IDX + offs, mask=mask, other=-1)
    cols = tl.arange(0, BLOCK_E)
    onehot = (expert[:, None] == cols[None, :]).to(tl.int32)
    rank = tl.cumsum(onehot, axis=0) - 1  # earlier pairs of this block with the same expert
    base = tl.load(BLOCK_BASE + b * BLOCK_E + cols)  # first slot of this block's pairs, per expert
    pos = tl.sum(onehot * (rank + base[None, :]), axis=1)
    tl.store(SORTED_PAIR + pos, offs.to(tl.int32), mask=mask)


@triton.jit
def _expert_offsets(BLOCK_COUNTS, COUNTS, BLOCK_BASE, ALL_VALID, n_blocks, n_exp, n_pairs, CHUNK: tl.constexpr,
                    BLOCK_E: tl.constexpr):
    """One program: pairs per expert, then each block's first sorted slot per expert, i.e. the expert's
    start plus the pairs of that expert in earlier blocks (the prefix sums, in one launch). ALL_VALID: 1
    when every pair was counted for an expert below n_exp (an id outside [0, E) lands in none, or in the
    padding, and would be left out of the GEMMs)."""
    cols = tl.arange(0, BLOCK_E)
    chunk = tl.arange(0, CHUNK)
    total = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for start in range(0, n_blocks, CHUNK):
        mask = (start + chunk < n_blocks)[:, None]
        c = tl.load(BLOCK_COUNTS + (start + chunk)[:, None] * BLOCK_E + cols[None, :], mask=mask, other=0)
        total += tl.sum(c, axis=0)
    tl.store(COUNTS + cols, total)
    tl.store(ALL_VALID, (tl.sum(tl.where(cols < n_exp, total, 0), axis=0) == n_pairs).to(tl.int32))
    running = tl.cumsum(total, axis=0) - total  # where each expert's pairs start
    for start in range(0, n_blocks, CHUNK):
        mask = (start + chunk < n_blocks)[:, None]
        offs = (start + chunk)[:, None] * BLOCK_E + cols[None, :]
        c = tl.load(BLOCK_COUNTS + offs, mask=mask, other=0)
        tl.store(BLOCK_BASE + offs, running[None, :] + tl.cumsum(c, axis=0) - c, mask=mask)
        running += tl.sum(c, axis=0)


def sort_by_expert(topk_idx: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable counting sort of the flattened (token, slot) pairs by expert, without a host sync.

    Returns (sorted_pair int32 (P,): pair ids grouped by expert, in pair order within each expert;
    counts int32 (next_pow2(E),): pairs per expert, zero-padded). Expert ids must lie in [0, E).
    """
    if torch.compiler.is_compiling():  # one opaque node (torch's grouped-GEMM path calls this traced)
        return _sort_op(topk_idx, n_experts)
    return _sort_by_expert(topk_idx, n_experts)


def _sort_by_expert(topk_idx: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    check_device(topk_idx)
    flat = topk_idx.reshape(-1).contiguous()
    n_pairs = flat.numel()
    block_e = next_power_of_2(n_experts)
    n_blocks = max(1, cdiv(n_pairs, SORT_BLOCK))
    block_counts = torch.empty(n_blocks, block_e, dtype=torch.int32, device=flat.device)
    _expert_histogram[(n_blocks,)](flat, block_counts, n_pairs, BLOCK=SORT_BLOCK, BLOCK_E=block_e)
    counts = torch.empty(block_e, dtype=torch.int32, device=flat.device)
    block_base = torch.empty_like(block_counts)
    all_valid = torch.empty((), dtype=torch.int32, device=flat.device)
    _expert_offsets[(1,)](block_counts, counts, block_base, all_valid, n_blocks, n_experts, n_pairs,
                          CHUNK=max(1, min(next_power_of_2(n_blocks), OFFSETS_TILE // block_e)), BLOCK_E=block_e)
    _check_expert_ids(all_valid, topk_idx, n_experts)
    sorted_pair = torch.empty(n_pairs, dtype=torch.int32, device=flat.device)
    _scatter_pairs[(n_blocks,)](flat, block_base, sorted_pair, n_pairs, BLOCK=SORT_BLOCK, BLOCK_E=block_e)
    return sorted_pair, counts


def _check_expert_ids(all_valid: torch.Tensor, topk_idx: torch.Tensor, n_experts: int) -> None:
    """An expert id outside [0, E) would leave its pair out of the GEMMs (garbage output rows). On CUDA
    a device-side assert, as a host sync here would stall every step's launches; elsewhere a ValueError
    naming the token and slot."""
    if topk_idx.is_cuda:
        torch._assert_async(all_valid, "moe: an expert id in topk_idx is outside [0, n_experts)")
    elif not all_valid.item():
        flat = topk_idx.reshape(-1)
        pair = int(((flat < 0) | (flat >= n_experts)).nonzero()[0, 0])
        k = topk_idx.shape[-1] if topk_idx.dim() else 1
        raise ValueError(f"moe: topk_idx holds expert {int(flat[pair])} at token {pair // k}, slot {pair % k}, "
                         f"outside the {n_experts} experts [0, {n_experts})")


@torch.library.custom_op("minimind_fast::moe_sort", mutates_args=())
def _sort_op(topk_idx: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _sort_by_expert(topk_idx, n_experts)


@_sort_op.register_fake
def _(topk_idx, n_experts):
    return (topk_idx.new_empty(topk_idx.numel(), dtype=torch.int32),
            topk_idx.new_empty(next_power_of_2(n_experts), dtype=torch.int32))


def moe_dispatch_stats(topk_idx: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Tokens routed to each expert (int32 (E,)), from the dispatch's own histogram kernel."""
    return sort_by_expert(topk_idx, n_experts)[1][:n_experts]


# ---------------------------------------------------------------------------------------------------
# Grouped GEMMs
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _expert_rows(e, COUNTS, BLOCK_E: tl.constexpr):
    """The sorted rows [start, end) of expert e."""
    cols = tl.arange(0, BLOCK_E)
    counts = tl.load(COUNTS + cols)
    ends = tl.cumsum(counts, axis=0)
    start = tl.sum(tl.where(cols == e, ends - counts, 0), axis=0)
    end = tl.sum(tl.where(cols == e, ends, 0), axis=0)
    return start, end


@triton.jit
def _tile_schedule(pid_m, COUNTS, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """Map an M-tile id to (expert, first row, end row): experts' tiles are laid out back to back."""
    cols = tl.arange(0, BLOCK_E)
    counts = tl.load(COUNTS + cols)
    tiles = (counts + BLOCK_M - 1) // BLOCK_M
    tile_end = tl.cumsum(tiles, axis=0)
    row_end = tl.cumsum(counts, axis=0)
    e = tl.sum((tile_end <= pid_m).to(tl.int32), axis=0)  # experts whose tiles all come before
    sel = cols == e
    first_tile = tl.sum(tl.where(sel, tile_end - tiles, 0), axis=0)
    row_start = tl.sum(tl.where(sel, row_end - counts, 0), axis=0)
    n_rows = tl.sum(tl.where(sel, counts, 0), axis=0)
    return e, row_start + (pid_m - first_tile) * BLOCK_M, row_start + n_rows


@triton.jit
def _sorted_rows(start, end, SORTED_PAIR, BLOCK_M: tl.constexpr):
    """BLOCK_M expert-sorted rows from `start`, their mask (rows before `end`) and each row's (token,
    slot) pair id, in int64 for the offsets built from it."""
    rows = start + tl.arange(0, BLOCK_M)
    rmask = rows < end
    pair = tl.load(SORTED_PAIR + rows, mask=rmask, other=0).to(tl.int64)
    return rows, rmask, pair


@triton.jit
def _block(pid, BLOCK: tl.constexpr, size):
    """Offsets of block `pid` along a dimension of `size`, and their mask."""
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    return offs, offs < size


@triton.jit
def _operand(t, FP32_DOT: tl.constexpr, DTYPE: tl.constexpr):
    if FP32_DOT:
        return t.to(tl.float32)
    return t.to(DTYPE)


@triton.jit
def _load_operand(ptr, mask, FP32_DOT: tl.constexpr, DTYPE: tl.constexpr):
    """A matmul operand tile, masked entries as zeros."""
    return _operand(tl.load(ptr, mask=mask, other=0.0), FP32_DOT, DTYPE)


@triton.jit
def _dot_k_block(acc, a_ptr, b_ptr, rmask, kmask, cmask, FP32_DOT: tl.constexpr, DTYPE: tl.constexpr,
                 PRECISION: tl.constexpr):
    """acc + A @ B over one K block: A (rows x K) at a_ptr, B (K x cols) at b_ptr."""
    a = _load_operand(a_ptr, rmask[:, None] & kmask[None, :], FP32_DOT, DTYPE)
    b = _load_operand(b_ptr, kmask[:, None] & cmask[None, :], FP32_DOT, DTYPE)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@_tuned(GEMM_CONFIGS, FIXED, key=["n_cols", "k_dim"])
@triton.jit
def _gate_up_fwd(X, WG, WU, SORTED_PAIR, COUNTS, G, U, Hout, n_exp, top_k, n_cols, k_dim,
                 PRECISION: tl.constexpr, FP32_DOT: tl.constexpr, BLOCK_E: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """g, u = X[token] @ W{gate,up}[e]^T, h = silu(g) * u, rows in expert-sorted order. n_cols = I, k_dim = H."""
    e, m_start, m_end = _tile_schedule(tl.program_id(0), COUNTS, BLOCK_M, BLOCK_E)
    if e >= n_exp:
        return
    rows, rmask, pair = _sorted_rows(m_start, m_end, SORTED_PAIR, BLOCK_M)
    cols, cmask = _block(tl.program_id(1), BLOCK_N, n_cols)
    ks = tl.arange(0, BLOCK_K)
    tok = pair // top_k
    w_off = e.to(tl.int64) * n_cols * k_dim
    a_ptr = X + tok[:, None] * k_dim + ks[None, :]
    wg_ptr = WG + w_off + cols[None, :].to(tl.int64) * k_dim + ks[:, None]
    wu_ptr = WU + w_off + cols[None, :].to(tl.int64) * k_dim + ks[:, None]
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    dt = X.dtype.element_ty
    for k0 in range(0, k_dim, BLOCK_K):
        kmask = ks + k0 < k_dim
        a = _load_operand(a_ptr, rmask[:, None] & kmask[None, :], FP32_DOT, dt)  # shared by both dots
        bg = _load_operand(wg_ptr, kmask[:, None] & cmask[None, :], FP32_DOT, dt)
        bu = _load_operand(wu_ptr, kmask[:, None] & cmask[None, :], FP32_DOT, dt)
        acc_g = tl.dot(a, bg, acc_g, input_precision=PRECISION)
        acc_u = tl.dot(a, bu, acc_u, input_precision=PRECISION)
        a_ptr += BLOCK_K
        wg_ptr += BLOCK_K
        wu_ptr += BLOCK_K
    h = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
    out = rows[:, None].to(tl.int64) * n_cols + cols[None, :]
    omask = rmask[:, None] & cmask[None, :]
    tl.store(G + out, acc_g.to(G.dtype.element_ty), mask=omask)
    tl.store(U + out, acc_u.to(U.dtype.element_ty), mask=omask)
    tl.store(Hout + out, h.to(Hout.dtype.element_ty), mask=omask)


@_tuned(GEMM_CONFIGS, FIXED, key=["n_cols", "k_dim"])
@triton.jit
def _down_fwd(Hin, WD, SORTED_PAIR, COUNTS, TW, Y, n_exp, n_cols, k_dim,
              PRECISION: tl.constexpr, FP32_DOT: tl.constexpr, BLOCK_E: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Y[pair] = weight[pair] * h @ W_down[e]^T, written at the pair's own row. n_cols = H, k_dim = I."""
    e, m_start, m_end = _tile_schedule(tl.program_id(0), COUNTS, BLOCK_M, BLOCK_E)
    if e >= n_exp:
        return
    rows, rmask, pair = _sorted_rows(m_start, m_end, SORTED_PAIR, BLOCK_M)
    cols, cmask = _block(tl.program_id(1), BLOCK_N, n_cols)
    ks = tl.arange(0, BLOCK_K)
    a_ptr = Hin + rows[:, None].to(tl.int64) * k_dim + ks[None, :]
    b_ptr = WD + e.to(tl.int64) * n_cols * k_dim + cols[None, :].to(tl.int64) * k_dim + ks[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    dt = Hin.dtype.element_ty
    for k0 in range(0, k_dim, BLOCK_K):
        acc = _dot_k_block(acc, a_ptr, b_ptr, rmask, ks + k0 < k_dim, cmask, FP32_DOT, dt, PRECISION)
        a_ptr += BLOCK_K
        b_ptr += BLOCK_K
    w = tl.load(TW + pair, mask=rmask, other=0.0)
    tl.store(Y + pair[:, None] * n_cols + cols[None, :], acc * w[:, None], mask=rmask[:, None] & cmask[None, :])


@_tuned(GEMM_CONFIGS, FIXED, key=["n_cols", "k_dim"], reset=["DW_PARTIAL"])
@triton.jit
def _down_bwd(DO, WD, SORTED_PAIR, COUNTS, TW, G, U, DG, DU, DW_PARTIAL, n_exp, top_k, n_pairs, n_cols, k_dim,
              PRECISION: tl.constexpr, FP32_DOT: tl.constexpr, BLOCK_E: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """dz = dOut[token] @ W_down[e] (z = unweighted h-gradient); epilogue: routing-weight gradient
    partial sum(dz * h) and the SwiGLU backward dg, du of dh = weight * dz. n_cols = I, k_dim = H."""
    e, m_start, m_end = _tile_schedule(tl.program_id(0), COUNTS, BLOCK_M, BLOCK_E)
    if e >= n_exp:
        return
    rows, rmask, pair = _sorted_rows(m_start, m_end, SORTED_PAIR, BLOCK_M)
    cols, cmask = _block(tl.program_id(1), BLOCK_N, n_cols)
    ks = tl.arange(0, BLOCK_K)
    tok = pair // top_k
    a_ptr = DO + tok[:, None] * k_dim + ks[None, :]
    b_ptr = WD + e.to(tl.int64) * n_cols * k_dim + ks[:, None].to(tl.int64) * n_cols + cols[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    dt = WD.dtype.element_ty
    for k0 in range(0, k_dim, BLOCK_K):
        acc = _dot_k_block(acc, a_ptr, b_ptr, rmask, ks + k0 < k_dim, cmask, FP32_DOT, dt, PRECISION)
        a_ptr += BLOCK_K
        b_ptr += BLOCK_K * n_cols
    out = rows[:, None].to(tl.int64) * n_cols + cols[None, :]
    omask = rmask[:, None] & cmask[None, :]
    g = tl.load(G + out, mask=omask, other=0.0).to(tl.float32)
    u = tl.load(U + out, mask=omask, other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-g))
    silu = g * sig
    tl.store(DW_PARTIAL + tl.program_id(1).to(tl.int64) * n_pairs + pair, tl.sum(acc * silu * u, axis=1),
             mask=rmask)
    dh = acc * tl.load(TW + pair, mask=rmask, other=0.0)[:, None]
    tl.store(DU + out, (dh * silu).to(DU.dtype.element_ty), mask=omask)
    tl.store(DG + out, (dh * u * sig * (1.0 + g * (1.0 - sig))).to(DG.dtype.element_ty), mask=omask)


@_tuned(GEMM_CONFIGS, FIXED, key=["n_cols", "k_dim"])
@triton.jit
def _gate_up_bwd_dx(DG, DU, WG, WU, SORTED_PAIR, COUNTS, DXP, n_exp, n_cols, k_dim,
                    PRECISION: tl.constexpr, FP32_DOT: tl.constexpr, BLOCK_E: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """dX[pair] = dg @ W_gate[e] + du @ W_up[e], written at the pair's own row. n_cols = H, k_dim = I."""
    e, m_start, m_end = _tile_schedule(tl.program_id(0), COUNTS, BLOCK_M, BLOCK_E)
    if e >= n_exp:
        return
    rows, rmask, pair = _sorted_rows(m_start, m_end, SORTED_PAIR, BLOCK_M)
    cols, cmask = _block(tl.program_id(1), BLOCK_N, n_cols)
    ks = tl.arange(0, BLOCK_K)
    row_off = rows[:, None].to(tl.int64) * k_dim + ks[None, :]
    w_off = e.to(tl.int64) * n_cols * k_dim + ks[:, None].to(tl.int64) * n_cols + cols[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    dt = WG.dtype.element_ty
    for k0 in range(0, k_dim, BLOCK_K):
        kmask = ks + k0 < k_dim
        acc = _dot_k_block(acc, DG + row_off, WG + w_off, rmask, kmask, cmask, FP32_DOT, dt, PRECISION)
        acc = _dot_k_block(acc, DU + row_off, WU + w_off, rmask, kmask, cmask, FP32_DOT, dt, PRECISION)
        row_off += BLOCK_K
        w_off += BLOCK_K * n_cols
    tl.store(DXP + pair[:, None] * n_cols + cols[None, :], acc, mask=rmask[:, None] & cmask[None, :])


@_tuned(DW_CONFIGS, FIXED, key=["n_out", "k_out"])
@triton.jit
def _gate_up_bwd_dw(X, DG, DU, SORTED_PAIR, COUNTS, DWG, DWU, top_k, n_out, k_out,
                    PRECISION: tl.constexpr, FP32_DOT: tl.constexpr, BLOCK_E: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """dW{gate,up}[e] = d{g,u}_e^T @ X[tokens of e], reduced in fp32. n_out = I, k_out = H."""
    e = tl.program_id(0)
    row_start, row_end = _expert_rows(e, COUNTS, BLOCK_E)
    rs, rmask = _block(tl.program_id(1), BLOCK_N, n_out)
    cs, cmask = _block(tl.program_id(2), BLOCK_K, k_out)
    acc_g = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    dt = X.dtype.element_ty
    for m0 in range(row_start, row_end, BLOCK_M):
        ms, mmask, pair = _sorted_rows(m0, row_end, SORTED_PAIR, BLOCK_M)
        tok = pair // top_k
        x = _load_operand(X + tok[:, None] * k_out + cs[None, :], mmask[:, None] & cmask[None, :], FP32_DOT, dt)
        d_off = ms[:, None].to(tl.int64) * n_out + rs[None, :]
        dmask = mmask[:, None] & rmask[None, :]
        dg = _load_operand(DG + d_off, dmask, FP32_DOT, dt)
        du = _load_operand(DU + d_off, dmask, FP32_DOT, dt)
        acc_g = tl.dot(tl.trans(dg), x, acc_g, input_precision=PRECISION)
        acc_u = tl.dot(tl.trans(du), x, acc_u, input_precision=PRECISION)
    out = e.to(tl.int64) * n_out * k_out + rs[:, None].to(tl.int64) * k_out + cs[None, :]
    omask = rmask[:, None] & cmask[None, :]
    tl.store(DWG + out, acc_g.to(DWG.dtype.element_ty), mask=omask)
    tl.store(DWU + out, acc_u.to(DWU.dtype.element_ty), mask=omask)


@_tuned(DW_CONFIGS, FIXED, key=["n_out", "k_out"])
@triton.jit
def _down_bwd_dw(DO, TW, G, U, SORTED_PAIR, COUNTS, DWD, top_k, n_out, k_out,
                 PRECISION: tl.constexpr, FP32_DOT: tl.constexpr, BLOCK_E: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """dW_down[e] = (weight * dOut[token])_e^T @ h_e, h recomputed from g, u. n_out = H, k_out = I."""
    e = tl.program_id(0)
    row_start, row_end = _expert_rows(e, COUNTS, BLOCK_E)
    rs, rmask = _block(tl.program_id(1), BLOCK_N, n_out)
    cs, cmask = _block(tl.program_id(2), BLOCK_K, k_out)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    dt = DO.dtype.element_ty
    for m0 in range(row_start, row_end, BLOCK_M):
        ms, mmask, pair = _sorted_rows(m0, row_end, SORTED_PAIR, BLOCK_M)
        w = tl.load(TW + pair, mask=mmask, other=0.0)
        dy = tl.load(DO + (pair // top_k)[:, None] * n_out + rs[None, :], mask=mmask[:, None] & rmask[None, :],
                     other=0.0).to(tl.float32) * w[:, None]
        h_off = ms[:, None].to(tl.int64) * k_out + cs[None, :]
        hmask = mmask[:, None] & cmask[None, :]
        g = tl.load(G + h_off, mask=hmask, other=0.0).to(tl.float32)
        u = tl.load(U + h_off, mask=hmask, other=0.0).to(tl.float32)
        h = g / (1.0 + tl.exp(-g)) * u
        acc = tl.dot(tl.trans(_operand(dy, FP32_DOT, dt)), _operand(h, FP32_DOT, dt), acc,
                     input_precision=PRECISION)
    out = e.to(tl.int64) * n_out * k_out + rs[:, None].to(tl.int64) * k_out + cs[None, :]
    tl.store(DWD + out, acc.to(DWD.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _combine_slots(Y, OUT, n_tokens, hidden, K: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """out[t] = sum over slots j of y[t * K + j], in fp32 and in slot order (deterministic), cast once."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = (rows < n_tokens)[:, None] & (cols < hidden)[None, :]
    acc = tl.zeros((ROWS, BLOCK), dtype=tl.float32)
    for j in tl.static_range(K):
        acc += tl.load(Y + (rows * K + j)[:, None] * hidden + cols[None, :], mask=mask, other=0.0)
    tl.store(OUT + rows[:, None] * hidden + cols[None, :], acc.to(OUT.dtype.element_ty), mask=mask)


def _combine(y: torch.Tensor, n_tokens: int, top_k: int, dtype: torch.dtype) -> torch.Tensor:
    """(N * k, H) fp32 rows of (token, slot) pairs -> (N, H) in `dtype`: one launch for sum and cast."""
    hidden = y.shape[1]
    out = torch.empty(n_tokens, hidden, dtype=dtype, device=y.device)
    if out.numel():
        block = min(256, next_power_of_2(hidden))
        rows = rows_per_tile(n_tokens, block * top_k)
        _combine_slots[(cdiv(n_tokens, rows), cdiv(hidden, block))](y, out, n_tokens, hidden, K=top_k, ROWS=rows,
                                                                    BLOCK=block)
    return out


def _gemm_grid(n_pairs: int, n_exp: int, n_cols: int):
    # an upper bound on the M tiles (each expert wastes at most one partial tile); extras exit at once
    return lambda meta: (cdiv(n_pairs, meta["BLOCK_M"]) + n_exp, cdiv(n_cols, meta["BLOCK_N"]))


def _dw_grid(n_exp: int, n_out: int, k_out: int):
    return lambda meta: (n_exp, cdiv(n_out, meta["BLOCK_N"]), cdiv(k_out, meta["BLOCK_K"]))


def _precision(dtype: torch.dtype) -> str:
    # match torch: fp32 matmuls use TF32 only when the user allowed it
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _experts_forward(x, topk_idx, topk_weight, w_gate, w_up, w_down):
    """(out, and what backward needs beside the inputs: sorted_pair, counts, g, u)."""
    check_device(x, topk_idx, topk_weight, w_gate, w_up, w_down)
    n_tokens, hidden = x.shape
    n_exp, inter, _ = w_gate.shape
    top_k = topk_idx.shape[1]
    n_pairs = n_tokens * top_k
    x, w_gate, w_up, w_down = x.contiguous(), w_gate.contiguous(), w_up.contiguous(), w_down.contiguous()
    sorted_pair, counts = sort_by_expert(topk_idx, n_exp)
    tw = topk_weight.reshape(-1).float().contiguous()
    g = torch.empty(n_pairs, inter, dtype=x.dtype, device=x.device)
    u, h = torch.empty_like(g), torch.empty_like(g)
    y = torch.empty(n_pairs, hidden, dtype=torch.float32, device=x.device)
    common = dict(PRECISION=_precision(x.dtype), FP32_DOT=INTERPRET, BLOCK_E=counts.numel())
    if n_pairs:
        _gate_up_fwd[_gemm_grid(n_pairs, n_exp, inter)](
            x, w_gate, w_up, sorted_pair, counts, g, u, h, n_exp, top_k, inter, hidden, **common)
        _down_fwd[_gemm_grid(n_pairs, n_exp, hidden)](
            h, w_down, sorted_pair, counts, tw, y, n_exp, hidden, inter, **common)
    return _combine(y, n_tokens, top_k, x.dtype), sorted_pair, counts, g, u


def _experts_backward(d_out, x, topk_weight, w_gate, w_up, w_down, sorted_pair, counts, g, u):
    """(dx, d_weight as (N * k,) fp32, dW_gate, dW_up, dW_down)."""
    n_tokens, hidden = x.shape
    n_exp, inter, _ = w_gate.shape
    top_k = topk_weight.shape[1]
    n_pairs = n_tokens * top_k
    tw = topk_weight.reshape(-1).float().contiguous()
    x, w_gate, w_up, w_down = x.contiguous(), w_gate.contiguous(), w_up.contiguous(), w_down.contiguous()
    d_out = d_out.to(x.dtype).contiguous()
    common = dict(PRECISION=_precision(x.dtype), FP32_DOT=INTERPRET, BLOCK_E=counts.numel())
    dg, du = torch.empty_like(g), torch.empty_like(u)
    # one row of routing-weight partial sums per column block of the tuned BLOCK_N; rows past those the
    # launch used stay unwritten and unread
    dw_partial = torch.empty(cdiv(inter, MIN_BLOCK_N), n_pairs, dtype=torch.float32, device=x.device)
    dxp = torch.empty(n_pairs, hidden, dtype=torch.float32, device=x.device)
    dwg, dwu, dwd = torch.empty_like(w_gate), torch.empty_like(w_up), torch.empty_like(w_down)
    if n_pairs:
        _down_bwd[_gemm_grid(n_pairs, n_exp, inter)](
            d_out, w_down, sorted_pair, counts, tw, g, u, dg, du, dw_partial,
            n_exp, top_k, n_pairs, inter, hidden, **common)
        _gate_up_bwd_dx[_gemm_grid(n_pairs, n_exp, hidden)](
            dg, du, w_gate, w_up, sorted_pair, counts, dxp, n_exp, hidden, inter, **common)
    if n_exp:
        _gate_up_bwd_dw[_dw_grid(n_exp, inter, hidden)](
            x, dg, du, sorted_pair, counts, dwg, dwu, top_k, inter, hidden, **common)
        _down_bwd_dw[_dw_grid(n_exp, hidden, inter)](
            d_out, tw, g, u, sorted_pair, counts, dwd, top_k, hidden, inter, **common)
    used = cdiv(inter, _down_bwd.best_config.kwargs["BLOCK_N"]) if n_pairs else 0
    return _combine(dxp, n_tokens, top_k, x.dtype), dw_partial[:used].sum(0), dwg, dwu, dwd


@torch.library.custom_op("minimind_fast::moe_experts", mutates_args=())
def _experts_op(x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor, w_gate: torch.Tensor,
                w_up: torch.Tensor, w_down: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _experts_forward(x, topk_idx, topk_weight, w_gate, w_up, w_down)


@_experts_op.register_fake
def _(x, topk_idx, topk_weight, w_gate, w_up, w_down):
    n_pairs, inter = topk_idx.numel(), w_gate.shape[1]
    return (x.new_empty(x.shape), x.new_empty(n_pairs, dtype=torch.int32),
            x.new_empty(next_power_of_2(w_gate.shape[0]), dtype=torch.int32), x.new_empty(n_pairs, inter),
            x.new_empty(n_pairs, inter))


@torch.library.custom_op("minimind_fast::moe_experts_backward", mutates_args=())
def _experts_backward_op(d_out: torch.Tensor, x: torch.Tensor, topk_weight: torch.Tensor, w_gate: torch.Tensor,
                         w_up: torch.Tensor, w_down: torch.Tensor, sorted_pair: torch.Tensor, counts: torch.Tensor,
                         g: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                   torch.Tensor, torch.Tensor]:
    return _experts_backward(d_out, x, topk_weight, w_gate, w_up, w_down, sorted_pair, counts, g, u)


@_experts_backward_op.register_fake
def _(d_out, x, topk_weight, w_gate, w_up, w_down, sorted_pair, counts, g, u):
    return (x.new_empty(x.shape), topk_weight.new_empty(topk_weight.numel(), dtype=torch.float32),
            *(w.new_empty(w.shape) for w in (w_gate, w_up, w_down)))


def _experts_setup_context(ctx, inputs, output):
    x, _, topk_weight, w_gate, w_up, w_down = inputs
    ctx.save_for_backward(x, topk_weight, w_gate, w_up, w_down, *output[1:])
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)


def _experts_grads(ctx, d_out, *_unused_output_grads, eager=False):
    x, topk_weight, *rest = ctx.saved_tensors
    dx, d_weight, dwg, dwu, dwd = (_experts_backward if eager else _experts_backward_op)(d_out, x, topk_weight, *rest)
    return dx, None, d_weight.view_as(topk_weight).to(topk_weight.dtype), dwg, dwu, dwd


_experts_op.register_autograd(_experts_grads, setup_context=_experts_setup_context)
MoEExpertsFunction = _eager_form("MoEExpertsFunction", _experts_forward, _experts_setup_context, _experts_grads)


def moe_experts(
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weight: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    gemm: str | None = None,
) -> torch.Tensor:
    """Dropless SwiGLU experts over routed tokens (same contract as `reference.moe_experts`).

    x (N, H); topk_idx, topk_weight (N, k); w_gate, w_up (E, I, H); w_down (E, H, I). Gradients flow to
    x, topk_weight and the three weights. Under autocast the matmuls run in the autocast dtype.
    `gemm`: "triton" (ours) or "torch" (torch's grouped GEMM, bf16 only on CUDA); by default
    MINIMIND_MOE_GEMM's, which falls back to ours where torch's does not apply.
    """
    if x.dim() != 2 or topk_idx.shape != topk_weight.shape or topk_idx.shape[0] != x.shape[0]:
        raise ValueError(f"moe_experts: x {tuple(x.shape)}, topk_idx {tuple(topk_idx.shape)} and "
                         f"topk_weight {tuple(topk_weight.shape)} do not match (N, H), (N, k), (N, k)")
    n_exp, inter, hidden = w_gate.shape
    if x.shape[1] != hidden or w_up.shape != w_gate.shape or w_down.shape != (n_exp, hidden, inter):
        raise ValueError(f"moe_experts: w_gate {tuple(w_gate.shape)}, w_up {tuple(w_up.shape)}, w_down "
                         f"{tuple(w_down.shape)} do not fit hidden {x.shape[1]} as (E, I, H), (E, I, H), (E, H, I)")
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    x, w_gate, w_up, w_down = (t.to(dtype) for t in (x, w_gate, w_up, w_down))
    chosen = gemm or GEMM
    if chosen not in ("triton", "torch"):
        raise ValueError(f"moe_experts: gemm={chosen!r} must be triton or torch")
    unfit = _grouped_mm_unfit(x, dtype, hidden, inter) if chosen == "torch" else None
    if unfit:
        if gemm:
            raise ValueError(f"moe_experts: {unfit}")
        chosen = "triton"
    if chosen == "torch":
        return _experts_grouped_mm(x, topk_idx, topk_weight, w_gate, w_up, w_down)
    return _apply(MoEExpertsFunction, _experts_op, x, topk_idx, topk_weight, w_gate, w_up, w_down)[0]


def _grouped_mm_unfit(x: torch.Tensor, dtype: torch.dtype, hidden: int, inter: int) -> str | None:
    """Why torch's grouped GEMM cannot take these experts (None when it can): bf16 only on CUDA, and
    rows of a multiple of 16 bytes (its operands' strides), which odd hidden sizes break everywhere."""
    if x.is_cuda and dtype != torch.bfloat16:
        return f"torch's grouped GEMM takes bf16 on CUDA, not {dtype}"
    size = torch.empty((), dtype=dtype).element_size()
    if (hidden * size) % 16 or (inter * size) % 16:
        return (f"torch's grouped GEMM needs hidden and intermediate sizes of a multiple of 16 bytes; "
                f"{hidden} and {inter} in {dtype} are not")
    return None


def _experts_grouped_mm(x, topk_idx, topk_weight, w_gate, w_up, w_down) -> torch.Tensor:
    """`moe_experts` with torch's grouped GEMMs; autograd differentiates it (no host sync either way)."""
    n_tokens, hidden = x.shape
    top_k, n_exp = topk_idx.shape[1], w_gate.shape[0]
    sorted_pair, counts = sort_by_expert(topk_idx, n_exp)
    pair = sorted_pair.long()
    offs = torch.cumsum(counts[:n_exp], 0, dtype=torch.int32)  # where each expert's rows end
    xs = x.index_select(0, pair // top_k)
    h = swiglu(F.grouped_mm(xs, w_gate.transpose(1, 2), offs=offs), F.grouped_mm(xs, w_up.transpose(1, 2), offs=offs))
    ys = F.grouped_mm(h, w_down.transpose(1, 2), offs=offs).float()
    ys = ys * topk_weight.reshape(-1).float().index_select(0, pair).unsqueeze(1)
    # Each (token, slot) row written once, then the k slots summed in a fixed order: deterministic.
    out = ys.new_zeros(n_tokens * top_k, hidden).index_copy(0, pair, ys)
    return out.view(n_tokens, top_k, hidden).sum(1).to(x.dtype)


def moe_experts_grouped_mm(*args: torch.Tensor) -> torch.Tensor:
    """`moe_experts(..., gemm="torch")`: the expert GEMMs on torch's grouped GEMM (bf16 on CUDA)."""
    return moe_experts(*args, gemm="torch")


class TritonMoEExperts(torch.nn.Module):
    def forward(self, x, topk_idx, topk_weight, w_gate, w_up, w_down) -> torch.Tensor:
        return moe_experts(x, topk_idx, topk_weight, w_gate, w_up, w_down)
