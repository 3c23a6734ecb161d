"""Plain PyTorch reference ops: the path CPU/MPS users run and every Triton kernel is tested against.

Each function here has the exact signature of its Triton counterpart, so the op table in
`minimind_fast.ops` can swap one for the other without the model noticing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _wide(x: torch.Tensor) -> torch.Tensor:
    """x in the dtype these ops compute in: fp32 for half precision and fp32, float64 kept as float64 (the
    precision the tests' references are computed in)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`weight * x / sqrt(mean(x^2) + eps)` over the last dim, computed in fp32 (or float64), returned in x's
    dtype."""
    xf = _wide(x)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * _wide(weight)).to(x.dtype)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add then RMSNorm: returns (normed, new_residual) with new_residual = x + residual."""
    new_residual = x + residual
    return rms_norm(new_residual, weight, eps), new_residual


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q (B, T, Hq, D) and k (B, T, Hk, D) in the half-rotation (HF Llama) convention.

    cos/sin are (T, D) or (B, T, D), each half repeated: cos[..., :D/2] == cos[..., D/2:].
    """
    if q.shape[-1] % 2:  # rotate_half of an odd head would pair elements of unequal halves: no rotation
        raise ValueError(f"rope: head_dim {q.shape[-1]} must be even")
    cos, sin = _wide(cos.unsqueeze(-2)), _wide(sin.unsqueeze(-2))
    q_out = _wide(q) * cos + rotate_half(_wide(q)) * sin
    k_out = _wide(k) * cos + rotate_half(_wide(k)) * sin
    return q_out.to(q.dtype), k_out.to(k.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up`, the activation of the SwiGLU feed-forward."""
    return F.silu(gate) * up


def swiglu_packed(gate_up: torch.Tensor) -> torch.Tensor:
    """`swiglu` of the two halves of the last dim, (..., 2I) -> (..., I): the output of one GEMM over the
    gate and up weights stacked."""
    gate, up = gate_up.chunk(2, dim=-1)
    return swiglu(gate, up)


def moe_route(
    logits: torch.Tensor, top_k: int, norm_topk_prob: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax router: returns (scores (N, E) fp32, topk_weight (N, k) fp32, topk_idx (N, k) int64); float64
    logits give float64 scores and weights.

    As in MiniMind2, the top-k weights are renormalised only when k > 1, so a top-1 router still
    receives gradient from the main loss through its (unnormalised) probability. Equal scores go to the
    lowest expert index first, as in the Triton router.
    """
    if not 1 <= top_k <= logits.shape[-1]:  # the sort below would quietly give fewer than k picks
        raise ValueError(f"moe_route: top_k={top_k} must be between 1 and the {logits.shape[-1]} experts")
    scores = _wide(logits).softmax(dim=-1)
    # torch.topk leaves the order of equal values unspecified (on the CPU it takes a higher index first as
    # often as not); a stable sort keeps equals in index order, so ties resolve as the Triton router's do
    topk_weight, topk_idx = (t[:, :top_k] for t in torch.sort(scores, dim=-1, descending=True, stable=True))
    if top_k > 1 and norm_topk_prob:
        topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + 1e-20)
    return scores, topk_weight, topk_idx


def moe_route_with_counts(
    logits: torch.Tensor, top_k: int, norm_topk_prob: bool, group_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`moe_route` plus the picks each expert receives, what the load-balancing loss needs.

    counts is int32 (G, E): with `group_size` (the sequence length, for MiniMind's per-sequence aux
    loss) row r is counted in group r // group_size; without it G = 1 and the counts cover all rows.
    """
    scores, topk_weight, topk_idx = moe_route(logits, top_k, norm_topk_prob)
    n_rows, n_exp = scores.shape
    group_size = group_size or n_rows or 1
    n_groups = -(-n_rows // group_size) or 1
    group = torch.arange(n_rows, device=logits.device).div(group_size, rounding_mode="floor")
    flat = (group[:, None] * n_exp + topk_idx).reshape(-1)
    counts = torch.zeros(n_groups * n_exp, dtype=torch.int32, device=logits.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    return scores, topk_weight, topk_idx, counts.view(n_groups, n_exp)


def moe_route_aux(
    logits: torch.Tensor, top_k: int, norm_topk_prob: bool, group_size: int | None, alpha: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Routing plus the load-balancing loss of MiniMind2: (topk_weight, topk_idx, aux).

    aux = alpha * mean over groups of sum_i(f_i * P_i), where in each group of `group_size` rows (a
    sequence, for MiniMind's seq_aux; all rows when None) P_i is expert i's mean router probability and
    f_i its share of the group's k picks per row, times E (1 for a perfectly even spread).
    """
    n_rows = logits.shape[0]
    rows = group_size or n_rows or 1
    if n_rows % rows:
        raise ValueError(f"moe_route_aux: {n_rows} rows do not split into groups of {rows}")
    scores, topk_weight, topk_idx, counts = moe_route_with_counts(logits, top_k, norm_topk_prob, rows)
    n_groups, n_exp = counts.shape
    f = counts.to(scores.dtype) * (n_exp / (rows * top_k))  # float64 scores: the fractions in float64 too
    p = scores.view(n_groups, -1, n_exp).sum(dim=1) / rows  # a mean, but 0 (not NaN) over no rows
    return topk_weight, topk_idx, (f * p).sum(dim=1).mean() * alpha


def moe_experts(
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weight: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
) -> torch.Tensor:
    """Dropless SwiGLU experts over routed tokens, grouped by expert.

    x (N, H); topk_idx, topk_weight (N, k); w_gate, w_up (E, I, H); w_down (E, H, I).
    The (token, slot) pairs are sorted by expert so each expert runs one matmul over its tokens;
    the weighted outputs are summed back per token in fp32.
    """
    n_tokens, hidden = x.shape
    top_k = topk_idx.shape[1]
    n_experts = w_gate.shape[0]
    flat_idx = topk_idx.reshape(-1)
    order = torch.argsort(flat_idx, stable=True)
    token_of = order // top_k
    counts = torch.bincount(flat_idx, minlength=n_experts).tolist()
    xs = x.index_select(0, token_of)
    outs = []
    for e, chunk in enumerate(torch.split(xs, counts)):
        h = swiglu(chunk @ w_gate[e].t(), chunk @ w_up[e].t())
        outs.append(h @ w_down[e].t())
    ys = _wide(torch.cat(outs)) * _wide(topk_weight.reshape(-1)[order]).unsqueeze(-1)
    out = torch.zeros(n_tokens, hidden, dtype=ys.dtype, device=x.device)
    out.index_add_(0, token_of, ys)
    return out.to(x.dtype)


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T` against targets, skipping ignore_index.

    hidden (N, H), weight (V, H), targets (N,). Returns 0 (with a graph) when every target is ignored.
    """
    logits = hidden @ weight.t()
    loss = F.cross_entropy(_wide(logits), targets, ignore_index=ignore_index, reduction="sum")
    count = (targets != ignore_index).sum().clamp(min=1)
    return loss / count
