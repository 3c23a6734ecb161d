"""Attention backends: flash-attn when importable on CUDA, torch SDPA otherwise.

All entry points take q (B, Tq, Hq, D) and k, v (B, Tk, Hk, D) with Hk dividing Hq (GQA) and
return (B, Tq, Hq, D). Packed documents are described by `cu_seqlens` (int32 offsets of the
documents in the flattened B*T token stream, as flash-attn's varlen API takes them).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

ENV_VAR = "MINIMIND_ATTENTION"  # auto | flash | sdpa


def _load_flash_attn():
    """flash-attn's (func, varlen_func) pair, or None when it is not installed."""
    try:
        from flash_attn import flash_attn_func, flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_func, flash_attn_varlen_func


# Looked up once, at import: torch.compile traces `use_flash` in every layer's forward, and an import
# (a failing one above all) inside traced code breaks the graph there.
_FLASH_ATTN = _load_flash_attn()


def _flash_attn():
    return _FLASH_ATTN


def use_flash(q: torch.Tensor) -> bool:
    choice = os.environ.get(ENV_VAR, "auto")
    if choice not in ("auto", "flash", "sdpa"):  # a misspelt choice must not quietly mean auto
        raise ValueError(f"{ENV_VAR}={choice!r}: choose auto, flash or sdpa")
    if choice == "sdpa":
        return False
    ok = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and _flash_attn() is not None
    if choice == "flash" and not ok:
        raise RuntimeError(f"{ENV_VAR}=flash but flash-attn is unavailable for {q.device}/{q.dtype}")
    return ok


def _sdpa(q, k, v, *, is_causal: bool, mask: torch.Tensor | None, dropout_p: float) -> torch.Tensor:
    # SDPA wants (B, H, T, D); enable_gqa lets its kernels read shared K/V heads without repeating them.
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal,
        enable_gqa=k.shape[2] != q.shape[2],
    )
    return out.transpose(1, 2)


def document_mask(cu_seqlens: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """Boolean (B, 1, T, T) mask: causal and block-diagonal over the packed documents."""
    device = cu_seqlens.device
    total = batch * seqlen
    starts = torch.zeros(total, dtype=torch.int64, device=device)
    bounds = cu_seqlens[:-1].long()
    starts[bounds[bounds < total]] = 1  # an empty document at the end starts at `total`: nothing to mark
    doc = (torch.cumsum(starts, 0) - 1).view(batch, seqlen)
    pos = torch.arange(seqlen, device=device)
    causal = pos[None, :] <= pos[:, None]
    same_doc = doc[:, :, None] == doc[:, None, :]
    return (same_doc & causal)[:, None]


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Causal self-attention over full sequences (training, prefill from an empty cache)."""
    batch, seqlen, n_heads, head_dim = q.shape
    if use_flash(q):
        flash_func, flash_varlen = _flash_attn()
        if cu_seqlens is None:
            return flash_func(q, k, v, dropout_p=dropout_p, causal=True)
        out = flash_varlen(
            q.reshape(batch * seqlen, n_heads, head_dim),
            k.reshape(batch * seqlen, k.shape[2], head_dim),
            v.reshape(batch * seqlen, v.shape[2], head_dim),
            cu_seqlens, cu_seqlens, max_seqlen or seqlen, max_seqlen or seqlen,
            dropout_p=dropout_p, causal=True,
        )
        return out.view(batch, seqlen, n_heads, head_dim)
    if cu_seqlens is None:
        return _sdpa(q, k, v, is_causal=True, mask=None, dropout_p=dropout_p)
    return _sdpa(q, k, v, is_causal=False, mask=document_mask(cu_seqlens, batch, seqlen),
                 dropout_p=dropout_p)


def cached_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    past_len: int,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of Tq new queries over Tk = past_len + Tq cached keys (generation).

    key_padding_mask (B, Tk) is True for real tokens and False for left padding.
    """
    tq, tk = q.shape[1], k.shape[1]
    if key_padding_mask is None and past_len == 0:
        return _sdpa(q, k, v, is_causal=True, mask=None, dropout_p=0.0)
    q_pos = torch.arange(past_len, past_len + tq, device=q.device)
    mask = (torch.arange(tk, device=q.device)[None, :] <= q_pos[:, None])[None, None]
    if key_padding_mask is not None:
        mask = mask & key_padding_mask[:, None, None, :tk]
        # A left-padding query row may see no key at all; let it see itself to stay finite.
        mask = mask | torch.eye(tq, tk, dtype=torch.bool, device=q.device).roll(past_len, 1)[None, None]
    return _sdpa(q, k, v, is_causal=False, mask=mask, dropout_p=0.0)
