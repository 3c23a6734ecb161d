"""The decoder and its reference ops against float64 formulas and naive implementations.

Covers: reference ops forward and backward (fp32 and bf16), GQA against repeated-K/V multi-head
attention, YaRN tables, MoE routing / dispatch / aux loss against a per-token loop, router gradients
without the aux loss, gradient checkpointing, packed documents, save/load, and that `transformers`
still imports from the repository root beside our `kernels/` folder.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from minimind_fast.kernels import reference as ref

from minimind_fast.attention import causal_attention, document_mask
from minimind_fast.checkpoint import load_model, resolve_model_dir, save_model_dir
from minimind_fast.config import get_preset
from minimind_fast.model import MiniMindForCausalLM, MoEFeedForward, rope_tables
from minimind_fast.ops import get_ops

REPO = Path(__file__).resolve().parents[1]
F64 = torch.float64


def tiny(**overrides) -> MiniMindForCausalLM:
    return MiniMindForCausalLM(get_preset("tiny", vocab_size=128, kernels="reference", **overrides))


def tiny_moe(**overrides) -> MiniMindForCausalLM:
    return MiniMindForCausalLM(get_preset("tiny-moe", hidden_size=64, vocab_size=128, kernels="reference", **overrides))


def grads_of(fn, *tensors):
    """(output, grads) of sum(output * fixed random weights), so every output element matters."""
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*leaves)
    out = out[0] if isinstance(out, tuple) else out
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    (out.to(F64) * probe).sum().backward()
    return out, [t.grad for t in leaves]


# ---------------------------------------------------------------------------------------------------
# Reference ops vs float64 formulas
# ---------------------------------------------------------------------------------------------------
def rms_norm_f64(x, w, eps):
    return w * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def rotary_f64(x, cos, sin):
    """Pair (i, i + D/2) rotated by angle i: (a cos - b sin, b cos + a sin); cos/sin (T, D) halves repeated."""
    half = x.shape[-1] // 2
    c, s = cos[..., :half].unsqueeze(-2), sin[..., :half].unsqueeze(-2)
    a, b = x[..., :half], x[..., half:]
    return torch.cat([a * c - b * s, b * c + a * s], dim=-1)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_rms_norm_and_add_rms_norm(dtype, tol):
    x, res, w = torch.randn(2, 5, 48, dtype=F64), torch.randn(2, 5, 48, dtype=F64), 1 + torch.rand(48, dtype=F64)
    out, (gx, gw) = grads_of(lambda a, b: ref.rms_norm(a, b, 1e-5), x.to(dtype), w.to(dtype))
    exp, (ex, ew) = grads_of(lambda a, b: rms_norm_f64(a, b, 1e-5), x, w)
    assert out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out.to(F64), exp, atol=tol, rtol=tol)
    torch.testing.assert_close(gx.to(F64), ex, atol=tol * 10, rtol=tol)
    torch.testing.assert_close(gw.to(F64), ew, atol=tol * 10, rtol=tol)

    normed, new_res = ref.add_rms_norm(x.to(dtype), res.to(dtype), w.to(dtype), 1e-5)
    assert normed.dtype == new_res.dtype == dtype
    torch.testing.assert_close(new_res.to(F64), x + res, atol=tol, rtol=tol)
    torch.testing.assert_close(normed.to(F64), rms_norm_f64(x + res, w, 1e-5), atol=tol * 2, rtol=tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("batched_tables", [False, True])
def test_apply_rotary(dtype, tol, batched_tables):
    q, k = torch.randn(2, 7, 4, 16, dtype=F64), torch.randn(2, 7, 2, 16, dtype=F64)
    cos, sin = rope_tables(16, 7, 1e4)
    cos, sin = cos.to(F64), sin.to(F64)
    if batched_tables:
        cos, sin = cos.expand(2, 7, 16), sin.expand(2, 7, 16)
    (q_out, k_out) = ref.apply_rotary(q.to(dtype), k.to(dtype), cos.float(), sin.float())
    assert (q_out.dtype, k_out.dtype, q_out.shape, k_out.shape) == (dtype, dtype, q.shape, k.shape)
    torch.testing.assert_close(q_out.to(F64), rotary_f64(q, cos, sin), atol=tol, rtol=tol)
    torch.testing.assert_close(k_out.to(F64), rotary_f64(k, cos, sin), atol=tol, rtol=tol)
    _, (gq,) = grads_of(lambda a: ref.apply_rotary(a, k.float(), cos.float(), sin.float())[0], q.float())
    _, (eq,) = grads_of(lambda a: rotary_f64(a, cos, sin), q)
    torch.testing.assert_close(gq.to(F64), eq, atol=1e-5, rtol=1e-5)


def test_rope_tables_match_formula():
    cos, sin = rope_tables(8, 50, 1e6)
    inv = 1e6 ** (-torch.arange(0, 8, 2, dtype=F64) / 8)
    ang = torch.arange(50, dtype=F64)[:, None] * inv
    torch.testing.assert_close(cos.to(F64), torch.cat([ang.cos(), ang.cos()], -1), atol=1e-6, rtol=0)
    torch.testing.assert_close(sin.to(F64), torch.cat([ang.sin(), ang.sin()], -1), atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_swiglu(dtype, tol):
    g, u = torch.randn(3, 40, dtype=F64), torch.randn(3, 40, dtype=F64)
    out, (gg, gu) = grads_of(ref.swiglu, g.to(dtype), u.to(dtype))
    exp, (eg, eu) = grads_of(lambda a, b: a / (1 + torch.exp(-a)) * b, g, u)
    assert out.dtype == dtype
    torch.testing.assert_close(out.to(F64), exp, atol=tol, rtol=tol)
    torch.testing.assert_close(gg.to(F64), eg, atol=tol * 5, rtol=tol)
    torch.testing.assert_close(gu.to(F64), eu, atol=tol * 5, rtol=tol)


@pytest.mark.parametrize("top_k,norm", [(1, True), (2, True), (2, False), (3, True)])
def test_moe_route(top_k, norm):
    logits = torch.randn(20, 6, dtype=F64)
    scores, weight, idx = ref.moe_route(logits.float(), top_k, norm)
    assert (scores.dtype, weight.dtype, idx.dtype) == (torch.float32, torch.float32, torch.int64)
    assert weight.shape == idx.shape == (20, top_k)
    probs = logits.softmax(-1)
    torch.testing.assert_close(scores.to(F64), probs, atol=1e-6, rtol=1e-6)
    for t in range(20):
        order = sorted(range(6), key=lambda e: -probs[t, e].item())[:top_k]
        assert sorted(idx[t].tolist()) == sorted(order)
        chosen = probs[t, idx[t]]
        expected = chosen / chosen.sum() if (top_k > 1 and norm) else chosen
        torch.testing.assert_close(weight[t].to(F64), expected, atol=1e-6, rtol=1e-6)
    # The routing weights carry gradient back to the logits, also for top-1.
    _, (g,) = grads_of(lambda x: ref.moe_route(x, top_k, norm)[1], logits.float())
    assert g.abs().sum() > 0


def naive_experts(x, idx, w, gate, up, down):
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for slot in range(idx.shape[1]):
            e = idx[t, slot]
            out[t] += w[t, slot] * (F.silu(gate[e] @ x[t]) * (up[e] @ x[t])) @ down[e].T
    return out


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 6e-2)])
def test_moe_experts_against_per_token_loop(dtype, tol):
    n, h, inter, e, k = 24, 16, 32, 5, 2
    x = torch.randn(n, h, dtype=F64)
    gate, up = torch.randn(e, inter, h, dtype=F64) / 4, torch.randn(e, inter, h, dtype=F64) / 4
    down = torch.randn(e, h, inter, dtype=F64) / 6
    idx = torch.stack([torch.randperm(e)[:k] for _ in range(n)])
    idx[:, 0] = torch.where(torch.arange(n) < 3, 4, idx[:, 0])  # some expert gets many tokens
    idx[idx[:, 1] == idx[:, 0], 1] = (idx[idx[:, 1] == idx[:, 0], 0] + 1) % e
    w = torch.rand(n, k, dtype=F64)
    out, grads = grads_of(lambda *a: ref.moe_experts(a[0], idx, a[1], *a[2:]),
                          *(t.to(dtype) for t in (x, w, gate, up, down)))
    exp, egrads = grads_of(lambda *a: naive_experts(a[0], idx, a[1], *a[2:]), x, w, gate, up, down)
    assert out.dtype == dtype and out.shape == (n, h)
    torch.testing.assert_close(out.to(F64), exp, atol=tol, rtol=tol)
    for g, eg in zip(grads, egrads):
        torch.testing.assert_close(g.to(F64), eg, atol=tol * 3, rtol=tol * 3)


def test_linear_cross_entropy():
    hidden, weight = torch.randn(12, 16, dtype=F64), torch.randn(30, 16, dtype=F64) / 4
    targets = torch.randint(0, 30, (12,))
    targets[[1, 5, 6]] = -100
    keep = targets != -100

    def formula(hh, ww):
        logp = (hh @ ww.T).log_softmax(-1)
        return -logp[keep].gather(1, targets[keep, None]).mean()

    out, (gh, gw) = grads_of(lambda a, b: ref.linear_cross_entropy(a, b, targets), hidden.float(), weight.float())
    exp, (eh, ew) = grads_of(formula, hidden, weight)
    torch.testing.assert_close(out.to(F64), exp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gh.to(F64), eh, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gw.to(F64), ew, atol=1e-5, rtol=1e-5)
    h = hidden.float().requires_grad_(True)
    zero = ref.linear_cross_entropy(h, weight.float(), torch.full((12,), -100))
    zero.backward()
    assert zero.item() == 0.0 and h.grad is not None and h.grad.abs().sum() == 0


def test_reference_ops_keep_float64_precision():
    """Float64 in, float64 computed: the reference path is what float64 checks of a model (and of the
    kernels through it) compare against, so it must not round through fp32 on the way."""
    tol = dict(atol=1e-12, rtol=1e-12)
    x, w = torch.randn(3, 40, dtype=F64), 1 + torch.rand(40, dtype=F64)
    torch.testing.assert_close(ref.rms_norm(x, w, 1e-5), rms_norm_f64(x, w, 1e-5), **tol)
    q, k = torch.randn(1, 7, 4, 16, dtype=F64), torch.randn(1, 7, 2, 16, dtype=F64)
    ang = torch.rand(7, 8, dtype=F64) * 3
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    q_out, k_out = ref.apply_rotary(q, k, cos, sin)
    torch.testing.assert_close(q_out, rotary_f64(q, cos, sin), **tol)
    torch.testing.assert_close(k_out, rotary_f64(k, cos, sin), **tol)
    logits = torch.randn(10, 6, dtype=F64)
    scores, weight, idx = ref.moe_route(logits, 2, True)
    chosen = logits.softmax(-1).gather(1, idx)
    torch.testing.assert_close(scores, logits.softmax(-1), **tol)
    torch.testing.assert_close(weight, chosen / chosen.sum(-1, keepdim=True), **tol)
    # MiniMind2's seq_aux over two sequences of 5 rows: f = picks * E / (rows * k), P = mean score
    _, _, aux = ref.moe_route_aux(logits, 2, True, 5, 0.01)
    picks = torch.zeros(2, 6, dtype=F64).scatter_add_(1, idx.reshape(2, -1), torch.ones(2, 10, dtype=F64))
    want = (picks * 6 / (5 * 2) * logits.softmax(-1).view(2, 5, 6).mean(1)).sum(1).mean() * 0.01
    assert aux.dtype == F64
    torch.testing.assert_close(aux, want, **tol)
    gate, up, down = (torch.randn(6, 8, 40, dtype=F64), torch.randn(6, 8, 40, dtype=F64),
                      torch.randn(6, 40, 8, dtype=F64))
    tokens = torch.randn(10, 40, dtype=F64)
    torch.testing.assert_close(ref.moe_experts(tokens, idx, weight, gate, up, down),
                               naive_experts(tokens, idx, weight, gate, up, down), **tol)
    hidden, head, targets = torch.randn(12, 16, dtype=F64), torch.randn(30, 16, dtype=F64), torch.randint(0, 30, (12,))
    loss = ref.linear_cross_entropy(hidden, head, targets)
    assert loss.dtype == F64
    torch.testing.assert_close(loss, F.cross_entropy(hidden @ head.T, targets), **tol)


# ---------------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------------
def attention_f64(q, k, v):
    rep = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    t = q.shape[1]
    s = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(q.shape[-1])
    s = s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("bhts,bshd->bthd", s.softmax(-1), v)


def test_gqa_equals_multi_head_with_repeated_kv():
    q, k, v = torch.randn(2, 9, 8, 16), torch.randn(2, 9, 2, 16), torch.randn(2, 9, 2, 16)
    gqa = causal_attention(q, k, v)
    mha = causal_attention(q, k.repeat_interleave(4, dim=2), v.repeat_interleave(4, dim=2))
    torch.testing.assert_close(gqa, mha, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(gqa.to(F64), attention_f64(q.to(F64), k.to(F64), v.to(F64)), atol=1e-5, rtol=1e-5)


def attention_f64_documents(q, k, v, cu_seqlens):
    """`attention_f64` of each packed document on its own: (B, T) flattened, cut at cu_seqlens."""
    b, t = q.shape[:2]
    flat = [x.reshape(b * t, *x.shape[2:]) for x in (q, k, v)]
    cuts = cu_seqlens.tolist()
    outs = [attention_f64(*(x[s:e][None] for x in flat))[0] for s, e in zip(cuts[:-1], cuts[1:])]
    return torch.cat(outs).view(q.shape)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["flash", "sdpa"])
@pytest.mark.parametrize("documents", [False, True])
def test_cuda_attention_with_gqa_equals_float64(backend, documents, monkeypatch):
    """Each CUDA backend, bf16, 8 query heads over 2 KV heads, whole sequences or packed documents (flash-attn's
    varlen path, or SDPA's block mask): output and q/k/v gradients against float64 on the same inputs."""
    from minimind_fast import attention

    if backend == "flash" and attention._flash_attn() is None:
        pytest.skip("flash-attn is not installed (pip install flash-attn on a CUDA machine)")
    monkeypatch.setenv("MINIMIND_ATTENTION", backend)
    b, t, d = 2, 384, 64
    q, k, v = (torch.randn(b, t, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for h in (8, 2, 2))
    cu = torch.tensor([0, 100, 384, 500, 768], device="cuda", dtype=torch.int32) if documents else None
    out = causal_attention(q, k, v, cu_seqlens=cu, max_seqlen=284 if documents else None)
    grad = torch.randn_like(out)
    out.backward(grad)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = attention_f64_documents(q64, k64, v64, cu) if documents else attention_f64(q64, k64, v64)
    ref.backward(grad.double())
    for name, ours, exact in (("out", out, ref), ("dq", q.grad, q64.grad), ("dk", k.grad, k64.grad),
                              ("dv", v.grad, v64.grad)):
        assert torch.isfinite(ours).all(), name
        err = (ours.double() - exact).abs().max().item()
        assert err <= 2e-2 * exact.abs().max().item() + 1e-2, (name, err)


def test_gqa_model_equals_mha_model_with_repeated_heads():
    gqa = tiny().eval()
    mha = tiny(num_key_value_heads=4).eval()
    state = gqa.state_dict()
    d = gqa.config.head_dim
    for key in [k for k in state if k.endswith(("k_proj.weight", "v_proj.weight"))]:
        w = state[key].view(2, d, -1)  # (kv heads, D, H): each kv head serves 2 query heads
        state[key] = w.repeat_interleave(2, dim=0).reshape(4 * d, -1)
    mha.load_state_dict(state)
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(gqa(ids).logits, mha(ids).logits, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------
# YaRN
# ---------------------------------------------------------------------------------------------------
YARN = dict(type="yarn", factor=16.0, original_max_position_embeddings=2048, beta_fast=32.0, beta_slow=1.0,
            attention_factor=1.0)


def yarn_inv_freq_f64(dim, theta, s):
    """YaRN by its definition: dims rotating more than beta_fast times in the original context keep
    their frequency, fewer than beta_slow times are divided by `factor`, linear ramp in between."""
    inv = theta ** (-torch.arange(0, dim, 2, dtype=F64) / dim)

    def dim_for(rotations):
        return dim * math.log(s["original_max_position_embeddings"] / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = max(math.floor(dim_for(s["beta_fast"])), 0), min(math.ceil(dim_for(s["beta_slow"])), dim // 2 - 1)
    out = []
    for i, f in enumerate(inv.tolist()):
        gamma = min(max((i - low) / max(high - low, 1e-3), 0.0), 1.0)
        out.append(f * (1 - gamma) + f / s["factor"] * gamma)
    return torch.tensor(out, dtype=F64), low, high


@pytest.mark.parametrize("head_dim", [32, 64])
def test_yarn_tables(head_dim):
    cos, sin = rope_tables(head_dim, 4096, 1e6, {**YARN, "attention_factor": 1.25})
    inv, low, high = yarn_inv_freq_f64(head_dim, 1e6, YARN)
    ang = torch.arange(4096, dtype=F64)[:, None] * inv
    torch.testing.assert_close(cos.to(F64), 1.25 * torch.cat([ang.cos(), ang.cos()], -1), atol=2e-6, rtol=0)
    torch.testing.assert_close(sin.to(F64), 1.25 * torch.cat([ang.sin(), ang.sin()], -1), atol=2e-6, rtol=0)
    plain_inv = 1e6 ** (-torch.arange(0, head_dim, 2, dtype=F64) / head_dim)
    assert 0 < low < high < head_dim // 2 - 1
    torch.testing.assert_close(inv[: low + 1], plain_inv[: low + 1])  # fast dims untouched
    torch.testing.assert_close(inv[high:], plain_inv[high:] / 16)  # slow dims interpolated
    # No extension past the original length: the tables are the plain ones.
    c2, _ = rope_tables(head_dim, 2048, 1e6, YARN)
    torch.testing.assert_close(c2, rope_tables(head_dim, 2048, 1e6)[0])


def test_yarn_tables_match_transformers():
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = transformers.LlamaConfig(hidden_size=256, num_attention_heads=4, max_position_embeddings=32768,
                                   rope_theta=1e6, rope_scaling={**{k: v for k, v in YARN.items() if k != "type"},
                                                                 "rope_type": "yarn"})
    inv, factor = ROPE_INIT_FUNCTIONS["yarn"](cfg, "cpu")
    ang = torch.arange(300, dtype=F64)[:, None] * inv.to(F64)
    cos, _ = rope_tables(64, 32768, 1e6, YARN)
    torch.testing.assert_close(cos[:300].to(F64), factor * torch.cat([ang.cos(), ang.cos()], -1),
                               atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------------
# MoE
# ---------------------------------------------------------------------------------------------------
def naive_moe(layer: MoEFeedForward, x: torch.Tensor, top_k: int, alpha: float, seq_aux: bool):
    """Per-token routing and dispatch, and the aux loss by its definition, in float64."""
    cfg = layer.config
    bsz, seq, h = x.shape
    flat = x.reshape(-1, h).to(F64)
    wg = layer.gate.weight.to(F64)
    gate, up, down = (p.to(F64) for p in (layer.experts.gate_proj, layer.experts.up_proj, layer.experts.down_proj))
    probs = (flat @ wg.T).softmax(-1)
    y, chosen_all = torch.zeros_like(flat), []
    for t in range(flat.shape[0]):
        w, chosen = probs[t].topk(top_k)
        if top_k > 1 and cfg.norm_topk_prob:
            w = w / w.sum()
        chosen_all.append(chosen)
        for wi, e in zip(w, chosen):
            y[t] += wi * (F.silu(gate[e] @ flat[t]) * (up[e] @ flat[t])) @ down[e].T
    for shared in layer.shared_experts:
        sg, su, sd = (m.weight.to(F64) for m in (shared.gate_proj, shared.up_proj, shared.down_proj))
        y += (F.silu(flat @ sg.T) * (flat @ su.T)) @ sd.T
    chosen_all = torch.stack(chosen_all).view(bsz, seq * top_k)
    n_exp = cfg.n_routed_experts
    if seq_aux:  # per sequence: f_i = share of its k*T picks on expert i, times E; P_i = mean prob
        aux = 0.0
        for b in range(bsz):
            f = torch.bincount(chosen_all[b], minlength=n_exp).to(F64) / (seq * top_k) * n_exp
            p = probs.view(bsz, seq, n_exp)[b].mean(0)
            aux += (f * p).sum() / bsz
    else:  # over the whole batch, picks counted per (token, slot)
        f = torch.bincount(chosen_all.reshape(-1), minlength=n_exp).to(F64) / chosen_all.numel() * n_exp
        aux = (f * probs.mean(0)).sum()
    return y.view(bsz, seq, h), alpha * aux


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("seq_aux", [True, False])
def test_moe_layer_against_naive(top_k, seq_aux):
    model = tiny_moe(num_experts_per_tok=top_k, seq_aux=seq_aux, aux_loss_alpha=0.1, n_shared_experts=2)
    layer = model.model.layers[0].mlp
    layer.train()
    x = torch.randn(3, 7, 64)
    y, aux = layer(x)
    exp_y, exp_aux = naive_moe(layer, x, top_k, 0.1, seq_aux)
    torch.testing.assert_close(y.to(F64), exp_y, atol=1e-5, rtol=1e-5)
    assert aux.detach().item() == pytest.approx(float(exp_aux.detach()), rel=1e-5)
    # the aux loss's gradient reaches the router through the probabilities (the counts carry none)
    got = torch.autograd.grad(aux, layer.gate.weight)[0]
    wg64 = layer.gate.weight.detach().to(F64).requires_grad_(True)
    layer64 = SimpleNamespace(config=layer.config, experts=layer.experts, shared_experts=[],
                              gate=SimpleNamespace(weight=wg64))
    expect = torch.autograd.grad(naive_moe(layer64, x, top_k, 0.1, seq_aux)[1], wg64)[0]
    torch.testing.assert_close(got.to(F64), expect, atol=1e-7, rtol=1e-5)
    layer.eval()
    assert layer(x)[1] is None  # no aux loss outside training


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("norm", [True, False], ids=["norm_topk_prob", "raw-topk"])
def test_router_learns_from_main_loss_without_aux(top_k, norm):
    """MiniMind's trap: top-1 with renormalised weights makes every weight exactly 1, so the router learns
    only from the aux loss. A `> 0` check alone passed on that bug (an epsilon in the renormalisation left
    ~1e-18 of gradient), so the router's main-loss gradient is compared with the float64 per-token loop
    and must be of the size of the experts' own gradients."""
    model = tiny_moe(num_experts_per_tok=top_k, aux_loss_alpha=0.0, norm_topk_prob=norm).train()
    ids = torch.randint(0, 128, (2, 16))
    out = model(ids, targets=torch.roll(ids, -1, 1))
    assert out.aux_loss.item() == 0.0
    out.loss.backward()
    for layer in model.model.layers:
        grad, expert_grad = layer.mlp.gate.weight.grad, layer.mlp.experts.gate_proj.grad
        assert grad is not None and grad.norm() > 1e-3 * expert_grad.norm(), (grad.norm(), expert_grad.norm())
    # one layer's output alone (no aux loss) against the float64 loop's router gradient
    layer = model.model.layers[0].mlp
    x, g = torch.randn(2, 9, 64), torch.randn(2, 9, 64)
    (got,) = torch.autograd.grad((layer(x)[0] * g).sum(), layer.gate.weight)
    wg64 = layer.gate.weight.detach().to(F64).requires_grad_(True)
    layer64 = SimpleNamespace(config=layer.config, experts=layer.experts, shared_experts=layer.shared_experts,
                              gate=SimpleNamespace(weight=wg64))
    (want,) = torch.autograd.grad((naive_moe(layer64, x, top_k, 0.0, True)[0] * g.to(F64)).sum(), wg64)
    assert want.norm() > 1e-3
    torch.testing.assert_close(got.to(F64), want, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# Whole model
# ---------------------------------------------------------------------------------------------------
def _loss_and_grads(model, ids):
    out = model(ids, targets=torch.roll(ids, -1, 1))
    (out.loss + out.aux_loss).backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _aten_ops(run) -> dict[str, int]:
    """How many times `run()` dispatches each aten op (views included)."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        ops: Counter = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.ops[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    with Count():
        run()
    return Count.ops


def _matmuls(model, ids) -> int:
    ops = _aten_ops(lambda: model(ids))
    return ops["mm"] + ops["addmm"] + ops["bmm"]


def test_a_dense_step_launches_nothing_per_layer_for_the_aux_loss_or_the_rope_tables():
    """A dense model's aux loss is one zero for the whole model, not a zero and an add per layer, and
    consecutive positions slice the RoPE tables instead of gathering them (launches a GPU step pays for
    on the host); positions past the tables are an error, as the gather's were."""
    model, ids = tiny().train(), torch.randint(0, 128, (2, 8))
    ops = _aten_ops(lambda: model(ids, targets=ids))
    assert ops["new_zeros"] + ops["zeros"] == 1 and ops["index"] == 0, ops
    out = model(ids, targets=ids)
    assert out.aux_loss.item() == 0.0 and out.aux_loss.dtype == torch.float32
    moe = tiny_moe().train()
    per_layer = []
    for layer in moe.model.layers:
        layer.mlp.register_forward_hook(lambda module, args, out: per_layer.append(out[1].detach()))
    aux = moe(ids, targets=ids).aux_loss
    assert len(per_layer) == moe.config.num_hidden_layers and aux.item() > 0
    torch.testing.assert_close(aux.detach(), sum(per_layer))
    with pytest.raises(ValueError, match="context length"):
        model(torch.randint(0, 128, (1, model.config.max_position_embeddings + 1)))


@pytest.mark.parametrize("make", [tiny, tiny_moe])
def test_stacked_projections_train_like_separate_ones(make, monkeypatch):
    """In training q/k/v and gate/up run as one GEMM each over their stacked weights; the loss and every
    gradient (those of each projection's own weight included) match running them one by one."""
    import minimind_fast.model as model_module

    ids = torch.randint(0, 128, (2, 12))
    stacked = make().train()
    separate = make().train()
    separate.load_state_dict(stacked.state_dict())
    loss1, grads1 = _loss_and_grads(stacked, ids)
    monkeypatch.setattr(model_module, "stacked_weight", lambda *projections: None)
    loss2, grads2 = _loss_and_grads(separate, ids)
    torch.testing.assert_close(loss1, loss2, rtol=1e-6, atol=1e-6)
    assert grads1.keys() == grads2.keys() and any("q_proj" in n for n in grads1)
    for name in grads1:
        torch.testing.assert_close(grads1[name], grads2[name], atol=1e-6, rtol=1e-5, msg=name)


def test_projections_are_stacked_in_training_only_and_not_around_adapters_or_zero3():
    from minimind_fast.lora import LoraConfig, apply_lora

    model, ids = tiny(), torch.randint(0, 128, (1, 8))
    layers = model.config.num_hidden_layers
    head = 1  # the output projection (forward without targets)
    assert _matmuls(model, ids) == 4 * layers + head  # qkv, o, gate_up, down
    with torch.no_grad():  # decoding: stacking would copy the weights every token
        assert _matmuls(model, ids) == 7 * layers + head
    model.model.layers[0].self_attn.k_proj.weight.ds_id = 0  # as DeepSpeed ZeRO-3 marks its parameters
    assert _matmuls(model, ids) == 4 * layers + head + 2
    del model.model.layers[0].self_attn.k_proj.weight.ds_id
    apply_lora(model, LoraConfig(rank=2, target_modules=["q_proj"]))
    assert _matmuls(model, ids) == 4 * layers + head + 2 * layers + 2 * layers  # 3 projections + 2 adapter GEMMs


@pytest.mark.parametrize("make", [tiny, tiny_moe])
def test_gradient_checkpointing_gives_identical_loss_and_grads(make):
    plain = make().train()
    ckpt = make(gradient_checkpointing=True).train()
    ckpt.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 128, (2, 12))
    targets = torch.roll(ids, -1, 1)
    results = []
    for model in (plain, ckpt):
        out = model(ids, targets=targets)
        (out.loss + out.aux_loss).backward()
        results.append((out.loss.detach(), out.aux_loss.detach(),
                        {n: p.grad.clone() for n, p in model.named_parameters()}))
    (l1, a1, g1), (l2, a2, g2) = results
    assert torch.equal(l1, l2) and torch.equal(a1, a2)
    assert g1.keys() == g2.keys()
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], atol=1e-6, rtol=1e-5, msg=name)


def test_packed_documents_equal_separate_runs():
    model = tiny().eval()
    lengths = [[5, 3, 8], [9, 7]]
    docs = [[torch.randint(0, 128, (n,)) for n in row] for row in lengths]
    ids = torch.stack([torch.cat(row) for row in docs])  # (2, 16)
    pos = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths])
    offsets = [0]
    for row in lengths:
        for n in row:
            offsets.append(offsets[-1] + n)
    cu = torch.tensor(offsets, dtype=torch.int32)
    with torch.no_grad():
        packed = model(ids, position_ids=pos, cu_seqlens=cu, max_seqlen=9).logits
        for b, row in enumerate(docs):
            start = 0
            for doc in row:
                alone = model(doc[None]).logits[0]
                torch.testing.assert_close(packed[b, start:start + len(doc)], alone, atol=1e-5, rtol=1e-5)
                start += len(doc)


def test_loss_matches_logits_cross_entropy():
    model = tiny().eval()
    ids = torch.randint(0, 128, (2, 10))
    targets = torch.roll(ids, -1, 1)
    targets[:, -1] = -100
    with torch.no_grad():
        out = model(ids, targets=targets, return_logits=True)
        expected = F.cross_entropy(out.logits.reshape(-1, 128).double(), targets.reshape(-1), ignore_index=-100)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("make", [tiny, tiny_moe])
def test_save_load_round_trip(tmp_path, make):
    model = make(qk_norm=True).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    save_model_dir(model, tmp_path / "m")
    back = load_model(tmp_path / "m", kernels="reference").eval()
    assert back.config.to_dict() == model.config.to_dict()
    assert back.lm_head.weight is back.model.embed_tokens.weight  # still tied
    for (name, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), name
    ids = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, back(ids).logits)


def test_a_saved_kernel_choice_does_not_follow_the_model_to_another_machine(tmp_path):
    """A model trained with --kernels triton (on a GPU) is loaded by chat/serve/convert with this machine's
    auto choice, not Triton kernels that a CPU cannot run; an explicit `kernels` still wins."""
    model = MiniMindForCausalLM(get_preset("tiny", vocab_size=128, kernels="triton")).eval()
    save_model_dir(model, tmp_path / "m")
    back = load_model(tmp_path / "m")
    assert (back.config.kernels, back.ops.name) == ("auto", "auto")
    assert load_model(tmp_path / "m", kernels="reference").ops.name == "reference"
    ids = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits)


@pytest.mark.parametrize("fields", [{}, {"hidden_size": 128, "vocab_size": 128}])
def test_a_model_config_without_the_shape_fields_is_refused_naming_them(tmp_path, fields):
    """`{}` (or a file that lost its sizes) built MiniMind2's default model and failed with a page of weight
    shape mismatches that never said the config was the culprit."""
    save_model_dir(tiny(), tmp_path / "m")
    (tmp_path / "m" / "model_config.json").write_text(json.dumps(fields))
    with pytest.raises(ValueError) as e:
        load_model(tmp_path / "m")
    missing = [f for f in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                           "vocab_size") if f not in fields]
    assert str(tmp_path / "m" / "model_config.json") in str(e.value)
    assert all(f in str(e.value) for f in missing) and "shape:" not in str(e.value)
    assert not any(f in str(e.value) for f in fields)


def test_a_model_config_with_only_the_shape_fields_loads_with_the_defaults_of_the_rest(tmp_path):
    """Optional fields (intermediate_size by MiniMind's rule, qk_norm, use_moe, rope settings) may be left
    out of a model_config.json: their defaults are what a file without them always meant."""
    model = tiny().eval()
    save_model_dir(model, tmp_path / "m")
    keep = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size",
            "max_position_embeddings")
    (tmp_path / "m" / "model_config.json").write_text(json.dumps({k: getattr(model.config, k) for k in keep}))
    back = load_model(tmp_path / "m", kernels="reference").eval()
    assert back.config.to_dict() == model.config.to_dict()
    ids = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, back(ids).logits)


def test_a_run_dir_resolves_to_its_newest_complete_checkpoint_never_a_half_written_one(tmp_path):
    """A run stopped before final/ (an --init or chat source): a `.tmp` checkpoint or one renamed but
    killed before its COMPLETE marker may hold torn weights, so only marked ones count."""
    model = tiny()
    ckpts = tmp_path / "run" / "checkpoints"
    for name in ("step_00000002", "step_00000004.tmp", "step_00000006"):
        save_model_dir(model, ckpts / name / "model")
    (ckpts / "step_00000002" / "COMPLETE").write_text("step 2\n")
    assert resolve_model_dir(tmp_path / "run") == ckpts / "step_00000002" / "model"


def test_reference_and_auto_tables_agree_on_cpu():
    ids = torch.randint(0, 128, (1, 6))
    a = tiny().eval()
    b = MiniMindForCausalLM(a.config.replace(kernels="auto")).eval()
    b.load_state_dict(a.state_dict())
    assert get_ops("reference").name == "reference"
    with torch.no_grad():
        torch.testing.assert_close(a(ids).logits, b(ids).logits)


@pytest.mark.parametrize("config_choice", ["auto", "triton", "reference"])
def test_kernel_switch_environment_variable_overrides_the_config_field(monkeypatch, config_choice):
    """MINIMIND_KERNELS forces either table whatever the config says; unset (or empty), the config's
    `kernels` field decides. The Triton table holds the kernels themselves, not reference stand-ins."""
    from minimind_fast.kernels import cross_entropy, moe, rmsnorm, rope, swiglu

    from minimind_fast import kernels, ops

    config = get_preset("tiny", vocab_size=128, kernels=config_choice)
    for env in ("", None):
        if env is None:
            monkeypatch.delenv(ops.ENV_VAR, raising=False)
        else:
            monkeypatch.setenv(ops.ENV_VAR, env)
        assert MiniMindForCausalLM(config).ops.name == config_choice
    monkeypatch.setenv(ops.ENV_VAR, "reference")
    assert MiniMindForCausalLM(config).ops is ops.REFERENCE
    monkeypatch.setenv(ops.ENV_VAR, "triton")
    table = MiniMindForCausalLM(config).ops
    assert table.name == "triton"
    expected = {"rms_norm": rmsnorm.rms_norm, "add_rms_norm": rmsnorm.add_rms_norm, "apply_rotary": rope.apply_rotary,
                "swiglu": swiglu.swiglu, "swiglu_packed": swiglu.swiglu_packed, "moe_route": moe.moe_route,
                "moe_route_aux": moe.moe_route_aux, "moe_experts": moe.moe_experts,
                "linear_cross_entropy": cross_entropy.linear_cross_entropy}
    assert set(expected) == set(ops.OP_NAMES) == set(kernels.TRITON_OPS)
    for name, fn in expected.items():
        assert getattr(table, name) is fn, name


def test_kernel_switch_names_a_bad_value_and_where_it_came_from(monkeypatch):
    from minimind_fast import ops

    monkeypatch.setenv(ops.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match="^MINIMIND_KERNELS='cuda' must be auto, triton or reference"):
        ops.get_ops("reference")
    monkeypatch.delenv(ops.ENV_VAR)
    with pytest.raises(ValueError, match="^kernels='fast' must be auto, triton or reference"):
        ops.get_ops("fast")


def test_auto_table_sends_cuda_tensors_to_triton_and_others_to_the_reference(monkeypatch):
    """`auto` decides per call from the first tensor's device: CPU (and MPS) run the reference ops."""
    from minimind_fast import ops

    monkeypatch.delenv(ops.ENV_VAR, raising=False)
    calls = []
    monkeypatch.setattr(ops, "_triton_impls", lambda: {n: (lambda *a, n=n: calls.append(n) or n) for n in ops.OP_NAMES})
    table = ops.get_ops("auto")
    x, w = torch.randn(3, 8), torch.randn(8) + 1
    torch.testing.assert_close(table.rms_norm(x, w, 1e-6), ref.rms_norm(x, w, 1e-6))
    assert calls == []
    on_gpu = SimpleNamespace(is_cuda=True)
    assert table.rms_norm(on_gpu, w, 1e-6) == "rms_norm" and table.moe_experts(on_gpu) == "moe_experts"
    assert calls == ["rms_norm", "moe_experts"]
    monkeypatch.setattr(ops, "triton_available", lambda: False)
    with pytest.raises(RuntimeError, match="triton is not installed"):
        ops.get_ops("triton")


# ---------------------------------------------------------------------------------------------------
# Packaging: our kernels/ folder must not shadow the PyPI `kernels` package transformers probes for
# ---------------------------------------------------------------------------------------------------
def test_transformers_imports_from_repo_root():
    code = ("import transformers; from transformers.utils import is_kernels_available; "
            "print(is_kernels_available()); from minimind_fast.kernels import reference; "
            "print(reference.rms_norm.__name__)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "rms_norm"]


def test_flash_attn_lookup_is_traceable_without_a_graph_break():
    """`use_flash` runs inside every compiled layer on CUDA; the lookup of flash-attn must not import
    there (a failed import broke torch.compile's graph once per layer)."""
    from minimind_fast import attention

    factor = 2.0 if attention._flash_attn() is None else 3.0
    compiled = torch.compile(lambda x: x * (2.0 if attention._flash_attn() is None else 3.0), backend="eager",
                             fullgraph=True)
    assert torch.equal(compiled(torch.ones(3)), torch.full((3,), factor))


def test_attention_backend_choice_is_checked(monkeypatch):
    """MINIMIND_ATTENTION=sdpa runs SDPA, =flash without flash-attn says so, and a misspelt value is an
    error rather than a silent auto."""
    from minimind_fast import attention

    q = torch.randn(1, 4, 2, 8)
    monkeypatch.setenv(attention.ENV_VAR, "sdpa")
    assert not attention.use_flash(q)
    monkeypatch.setenv(attention.ENV_VAR, "flash")
    with pytest.raises(RuntimeError, match="flash-attn is unavailable"):
        attention.use_flash(q)  # a CPU fp32 tensor: never flash
    monkeypatch.setenv(attention.ENV_VAR, "flash-attn")
    with pytest.raises(ValueError, match="MINIMIND_ATTENTION='flash-attn': choose auto, flash or sdpa"):
        tiny().eval()(torch.randint(0, 128, (1, 5)))


@pytest.mark.parametrize("make", [tiny, tiny_moe])
def test_set_dropout_trains_as_a_model_built_with_that_rate(make):
    built, changed = make(dropout=0.25).train(), make().train()
    changed.load_state_dict(built.state_dict())
    changed.set_dropout(0.25)
    assert changed.config.dropout == 0.25
    ids = torch.randint(0, 128, (2, 12))
    losses = []
    for model in (built, changed):
        torch.manual_seed(3)
        losses.append(model(ids, targets=torch.roll(ids, -1, 1)).loss)
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)
    with torch.no_grad():
        eval_loss = changed.eval()(ids, targets=torch.roll(ids, -1, 1)).loss
    assert not torch.equal(eval_loss, losses[1])  # the rate acts in training
    with pytest.raises(ValueError, match="dropout=1.5"):
        changed.set_dropout(1.5)


@pytest.mark.parametrize("top_k", [1, 2])
def test_moe_routed_experts_output_is_dropped_out_in_training(top_k):
    """Each routed expert's output is dropped out with its own mask, as MiniMind2's experts (FeedForward
    modules, each with its dropout) run on their own tokens: with top-2, an output element keeps both
    slots' terms, one of them or none. One mask over the slots' weighted sum (as before) kept all or none,
    another noise than the model being matched: half the elements zeroed at p = 0.5 instead of a quarter."""
    layer = tiny_moe(dropout=0.5, n_shared_experts=0, num_experts_per_tok=top_k).model.layers[0].mlp
    x = torch.randn(4, 32, layer.config.hidden_size)
    flat = x.reshape(-1, x.shape[-1])
    _, weight, idx = ref.moe_route(layer.gate(flat), top_k, True)
    # each slot's term w_j * expert_j(x), without dropout
    terms = [ref.moe_experts(flat, idx[:, j:j + 1], weight[:, j:j + 1], *layer.experts.weights()).detach()
             for j in range(top_k)]
    torch.manual_seed(0)
    trained = layer.train()(x)[0].detach().reshape(flat.shape)
    masks = torch.cartesian_prod(*[torch.tensor([0.0, 1.0])] * top_k).reshape(-1, top_k)
    candidates = torch.stack([2 * sum(m[j] * terms[j] for j in range(top_k)) for m in masks])  # (masks, N, H)
    which = (candidates - trained).abs().argmin(0)
    torch.testing.assert_close(candidates.gather(0, which[None])[0], trained, rtol=1e-5, atol=1e-6)
    share = torch.bincount(which.flatten(), minlength=len(masks)).float() / which.numel()
    # every keep/drop pattern of the slots about equally often (1/4 each for top-2, 1/2 each for top-1)
    assert ((share - 1 / len(masks)).abs() < 0.06).all(), share


def test_weights_fingerprint_names_the_function_not_how_it_trains():
    """A reference or teacher is compared by fingerprint on resume: the same weights with another dropout,
    kernel table or checkpointing compute the same function in eval mode, other weights do not."""
    from minimind_fast.checkpoint import weights_fingerprint

    model = tiny()
    before = weights_fingerprint(model)
    model.set_dropout(0.3)
    model.config.gradient_checkpointing = True
    assert weights_fingerprint(model) == before
    with torch.no_grad():
        model.lm_head.weight[0, 0] += 1e-3
    assert weights_fingerprint(model) != before
    other = tiny(rope_theta=5e5)  # the same weights under another architecture setting
    same = tiny()
    same.load_state_dict(other.state_dict())
    assert weights_fingerprint(other) != weights_fingerprint(same)


def test_an_empty_document_in_cu_seqlens_masks_as_without_it():
    """flash-attn takes cu_seqlens with a repeated bound (an empty document), at the end too; the SDPA path's
    mask must as well, not index past the last position."""
    plain = document_mask(torch.tensor([0, 3, 8], dtype=torch.int32), 2, 4)
    for cu in ([0, 3, 8, 8], [0, 3, 3, 8]):
        assert torch.equal(document_mask(torch.tensor(cu, dtype=torch.int32), 2, 4), plain), cu
    assert not plain[0, 0, 3, 2] and plain[0, 0, 2, 0] and plain[1, 0, 3, 0]  # documents [0, 3) and [3, 8)
