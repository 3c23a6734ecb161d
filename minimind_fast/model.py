"""The MiniMind2 decoder: RMSNorm, RoPE (with YaRN), GQA attention, SwiGLU or MoE, tied embeddings.

Parameter names follow MiniMind2's (and Hugging Face Llama's) module tree, so a MiniMind2 state dict
maps onto this model one to one, except MoE experts, which are stored stacked (E, I, H) so that a
grouped GEMM can run them all in one launch. Every elementwise and norm op goes through the op table
(`minimind_fast.ops`), which picks Triton kernels or the plain PyTorch reference. In training, q/k/v
and gate/up each run as one GEMM over their stacked weights (`stacked_weight`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from minimind_fast.attention import cached_attention, causal_attention
from minimind_fast.config import ModelConfig
from minimind_fast.ops import OpTable, get_ops

if TYPE_CHECKING:  # generation imports this module; the name is needed by annotations alone
    from minimind_fast.generation import SlotKVCache


def rope_tables(
    head_dim: int, max_len: int, theta: float, scaling: dict | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (max_len, head_dim) in fp32, halves repeated (rotate_half convention).

    With `scaling` (YaRN), frequencies between the beta_fast and beta_slow correction dimensions
    are interpolated by a linear ramp towards freq/factor, as MiniMind2 does.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    attn_factor = 1.0
    if scaling is not None:
        orig = scaling.get("original_max_position_embeddings", 2048)
        factor = scaling.get("factor", 16.0)
        attn_factor = scaling.get("attention_factor", 1.0)
        if max_len / orig > 1.0:
            def correction_dim(n_rotations: float) -> float:
                return head_dim * math.log(orig / (n_rotations * 2 * math.pi)) / (2 * math.log(theta))

            low = max(math.floor(correction_dim(scaling.get("beta_fast", 32.0))), 0)
            high = min(math.ceil(correction_dim(scaling.get("beta_slow", 1.0))), head_dim // 2 - 1)
            ramp = ((torch.arange(head_dim // 2, dtype=torch.float64) - low) / max(high - low, 1e-3))
            ramp = ramp.clamp(0, 1)
            inv_freq = inv_freq * (1 - ramp + ramp / factor)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return (angles.cos() * attn_factor).float(), (angles.sin() * attn_factor).float()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, ops: OpTable):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.rms_norm(x, self.weight, self.eps)

    def add_and_norm(self, delta: torch.Tensor | None, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(residual + delta), residual + delta) in one fused op; plain norm when delta is None."""
        if delta is None:
            return self(residual), residual
        return self.ops.add_rms_norm(delta, residual, self.weight, self.eps)


def stacked_weight(*projections: nn.Module) -> torch.Tensor | None:
    """The weights of projections that read the same input, stacked for one GEMM, when that pays and is
    allowed; None otherwise (then each runs on its own).

    In training, one wide GEMM replaces two or three narrow ones, and backward's input gradient is one
    GEMM instead of three plus their sum: fewer launches for a host-bound small model, better shapes
    for the GPU. The stacking copy is small next to GEMMs over many tokens, but in decoding (no grad)
    it would add to the weight traffic that bounds the step, so it is skipped there. Only plain
    bias-free `nn.Linear`s qualify (not a LoRA-wrapped one), and not under ZeRO-3, whose hooks gather a
    module's weights only when that module itself runs.
    """
    if not torch.is_grad_enabled():
        return None
    for p in projections:
        if type(p) is not nn.Linear or p.bias is not None or hasattr(p.weight, "ds_id"):
            return None
    return torch.cat([p.weight for p in projections])


class KVCache:
    """Keys and values for every layer, preallocated for the whole generation (no concatenation).

    k, v: (layers, batch, max_len, kv_heads, head_dim). `length` tokens are filled; the attention
    of each layer writes its new keys at [length, length + T) and the model advances `length` once
    all layers have run. `key_padding_mask` (batch, max_len) marks real (non left-padding) tokens.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int,
                 device: torch.device | str, dtype: torch.dtype):
        shape = (config.num_hidden_layers, batch_size, max_len,
                 config.num_key_value_heads, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.length = 0
        self.key_padding_mask: torch.Tensor | None = None

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[1]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} tokens > max_len {self.max_len}")
        self.k[layer, :, self.length:end] = k
        self.v[layer, :, self.length:end] = v
        return self.k[layer, :, :end], self.v[layer, :, :end]

    def reorder(self, index: torch.Tensor) -> None:
        """Keep only the batch rows in `index` (finished sequences dropped from a batch)."""
        self.k, self.v = self.k[:, index], self.v[:, index]
        if self.key_padding_mask is not None:
            self.key_padding_mask = self.key_padding_mask[index]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, ops: OpTable):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.dropout = config.dropout
        self.ops = ops
        h = config.hidden_size
        self.q_proj = nn.Linear(h, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(h, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(h, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, h, bias=False)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, ops)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, ops)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                max_seqlen: int | None = None, kv_cache: KVCache | SlotKVCache | None = None) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        qkv = stacked_weight(self.q_proj, self.k_proj, self.v_proj)
        if qkv is not None:
            q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
            q, k, v = F.linear(x, qkv).split([q_dim, kv_dim, kv_dim], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(bsz, seqlen, self.n_heads, self.head_dim)
        k = k.view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        v = v.view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.ops.apply_rotary(q, k, cos, sin)
        if kv_cache is None:
            dropout = self.dropout if self.training else 0.0
            out = causal_attention(q, k, v, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                                   dropout_p=dropout)
        elif hasattr(kv_cache, "attend"):  # per-row slot caches (generation.SlotKVCache) place and attend
            out = kv_cache.attend(self.layer_idx, q, k, v)
        else:
            past = kv_cache.length
            k, v = kv_cache.update(self.layer_idx, k, v)
            out = cached_attention(q, k, v, past_len=past, key_padding_mask=kv_cache.key_padding_mask)
        return self.resid_dropout(self.o_proj(out.reshape(bsz, seqlen, -1)))


class FeedForward(nn.Module):
    def __init__(self, config: ModelConfig, ops: OpTable):
        super().__init__()
        h, inter = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, inter, bias=False)
        self.up_proj = nn.Linear(h, inter, bias=False)
        self.down_proj = nn.Linear(inter, h, bias=False)
        self.dropout = nn.Dropout(config.dropout)
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = stacked_weight(self.gate_proj, self.up_proj)
        if gate_up is not None:
            h = self.ops.swiglu_packed(F.linear(x, gate_up))
        else:
            h = self.ops.swiglu(self.gate_proj(x), self.up_proj(x))
        return self.dropout(self.down_proj(h))


class ExpertBank(nn.Module):
    """The routed experts' SwiGLU weights, stacked: gate/up (E, I, H) and down (E, H, I)."""

    def __init__(self, n_experts: int, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(n_experts, inter, hidden))
        self.up_proj = nn.Parameter(torch.empty(n_experts, inter, hidden))
        self.down_proj = nn.Parameter(torch.empty(n_experts, hidden, inter))

    def weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gate, up, down) as the MoE ops take them; a LoRA wrapper (`lora.LoraExpertBank`) adds its update here."""
        return self.gate_proj, self.up_proj, self.down_proj


class MoEFeedForward(nn.Module):
    """Softmax top-k routing over `n_routed_experts`, plus always-active shared experts.

    In training the router also gives MiniMind2's load-balancing loss (its formula: `moe_route_aux` in
    `kernels/reference.py`), per sequence when `seq_aux`."""

    def __init__(self, config: ModelConfig, ops: OpTable):
        super().__init__()
        self.config = config
        self.ops = ops
        self.gate = nn.Linear(config.hidden_size, config.n_routed_experts, bias=False)
        self.experts = ExpertBank(config.n_routed_experts, config.hidden_size,
                                  config.intermediate_size)
        self.shared_experts = nn.ModuleList(
            FeedForward(config, ops) for _ in range(config.n_shared_experts))
        # MiniMind2 drops out each expert's output (each (token, slot) term) with its own mask
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(output, aux loss); the aux loss is None outside training or with aux_loss_alpha 0."""
        bsz, seqlen, hidden = x.shape
        cfg = self.config
        flat = x.reshape(-1, hidden)
        logits = self.gate(flat)
        if self.training and cfg.aux_loss_alpha > 0:
            # the router's kernels form the load-balancing loss too (per sequence for seq_aux)
            topk_weight, topk_idx, aux = self.ops.moe_route_aux(
                logits, cfg.num_experts_per_tok, cfg.norm_topk_prob, seqlen if cfg.seq_aux else None,
                cfg.aux_loss_alpha)
        else:
            _, topk_weight, topk_idx = self.ops.moe_route(logits, cfg.num_experts_per_tok, cfg.norm_topk_prob)
            aux = None
        y = self._routed(flat, topk_idx, topk_weight).view(bsz, seqlen, hidden)
        for expert in self.shared_experts:
            y = y + expert(x)
        return y, aux

    def _routed(self, flat: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor) -> torch.Tensor:
        """The routed experts' weighted sum, each (token, slot) term dropped out with its own mask in training."""
        weights = self.experts.weights()
        k = topk_idx.shape[1]
        if not (self.training and self.dropout.p > 0 and k > 1):
            return self.dropout(self.ops.moe_experts(flat, topk_idx, topk_weight, *weights))
        # One call per slot (the same pairs, so the same GEMM work) when the slots need their own masks:
        # one mask over the sum would keep or drop all k terms of an element together.
        terms = [self.dropout(self.ops.moe_experts(flat, topk_idx[:, j:j + 1], topk_weight[:, j:j + 1], *weights))
                 for j in range(k)]
        return torch.stack(terms).sum(0, dtype=torch.float32).to(terms[0].dtype)  # in fp32, as the fused combine


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, ops: OpTable):
        super().__init__()
        self.self_attn = Attention(config, layer_idx, ops)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops)
        self.mlp = MoEFeedForward(config, ops) if config.use_moe else FeedForward(config, ops)
        self.ops = ops

    def forward(self, residual: torch.Tensor, delta: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None,
                kv_cache: KVCache | SlotKVCache | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Pre-norm block on the residual stream, with each residual add fused into the next norm.

        `delta` is the previous block's MLP output, not yet added (None for the first block). Returns
        (residual, mlp_output, aux_loss or None): the add of mlp_output happens in the next block's (or
        the final) norm, so every activation is read once per add+norm instead of twice.
        """
        normed, residual = self.input_layernorm.add_and_norm(delta, residual)
        attn = self.self_attn(normed, cos, sin, cu_seqlens, max_seqlen, kv_cache)
        normed, residual = self.post_attention_layernorm.add_and_norm(attn, residual)
        if isinstance(self.mlp, MoEFeedForward):
            out, aux = self.mlp(normed)
        else:
            out, aux = self.mlp(normed), None  # no zero tensor per layer: two launches saved per layer
        return residual, out, aux


class ModelOutput(NamedTuple):
    """A tuple (so that DeepSpeed's ZeRO-3 hooks see the tensors in it) with named fields."""

    logits: torch.Tensor | None
    loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None


class MiniMindModel(nn.Module):
    """Decoder stack without the output head (`model.*` keys in MiniMind2's state dict)."""

    def __init__(self, config: ModelConfig, ops: OpTable):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(DecoderLayer(config, i, ops) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops)


class MiniMindForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.ops = get_ops(config.kernels)
        self.model = MiniMindModel(config, self.ops)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        cos, sin = rope_tables(config.head_dim, config.max_position_embeddings, config.rope_theta,
                               config.rope_scaling)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.gradient_checkpointing = config.gradient_checkpointing
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        std = 0.02
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, ExpertBank):
            for p in module.parameters():
                nn.init.normal_(p, std=std)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())

    def set_dropout(self, p: float) -> None:
        """Train a built model with another dropout rate (fine-tuning with `--dropout`); its config
        records the rate, so checkpoints say what the weights were trained with."""
        self.config.replace(dropout=p).validate()
        self.config.dropout = p  # in place: the MoE layers share this config object
        for module in self.modules():
            if isinstance(module, nn.Dropout):
                module.p = p
            elif isinstance(module, Attention):
                module.dropout = p

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        kv_cache: KVCache | SlotKVCache | None = None,
        logits_to_keep: int = 0,
        return_logits: bool | None = None,
    ) -> ModelOutput:
        """Run the decoder.

        input_ids (B, T). targets (B, T): the token each position must predict (already shifted;
        -100 is ignored); with targets the loss is computed through the op table's fused
        linear+cross-entropy and logits are not returned unless asked. position_ids (B, T) default to
        kv_cache.length + arange(T); packed documents pass positions restarting at each document
        together with `cu_seqlens`. logits_to_keep > 0 returns logits for the last positions only.
        """
        bsz, seqlen = input_ids.shape
        if position_ids is None:  # consecutive positions: a view of the tables, not a gather
            start = kv_cache.length if kv_cache is not None else 0
            if start + seqlen > self.rope_cos.shape[0]:
                raise ValueError(f"positions {start}..{start + seqlen - 1} exceed the context length "
                                 f"{self.rope_cos.shape[0]} (max_position_embeddings)")
            cos, sin = self.rope_cos[start:start + seqlen], self.rope_sin[start:start + seqlen]
        else:
            cos, sin = self.rope_cos[position_ids], self.rope_sin[position_ids]
        h = self.model.dropout(self.model.embed_tokens(input_ids))
        aux_losses = []
        delta = None
        for layer in self.model.layers:
            if self.gradient_checkpointing and self.training and kv_cache is None:
                h, delta, aux = checkpoint(layer, h, delta, cos, sin, cu_seqlens, max_seqlen, use_reentrant=False)
            else:
                h, delta, aux = layer(h, delta, cos, sin, cu_seqlens, max_seqlen, kv_cache)
            if aux is not None:
                aux_losses.append(aux)
        # one stack and one sum for all MoE layers' aux losses (not an add per layer); a dense model has none
        aux_total = torch.stack(aux_losses).sum() if aux_losses else h.new_zeros((), dtype=torch.float32)
        if kv_cache is not None:
            kv_cache.length += seqlen
        h, _ = self.model.norm.add_and_norm(delta, h)

        loss = logits = None
        if targets is not None:
            loss = self.ops.linear_cross_entropy(
                h.reshape(-1, h.shape[-1]), self.lm_head.weight, targets.reshape(-1))
        if targets is None or return_logits:
            kept = h[:, -logits_to_keep:] if logits_to_keep else h
            logits = self.lm_head(kept)
        return ModelOutput(logits=logits, loss=loss, aux_loss=aux_total, hidden_states=h)
