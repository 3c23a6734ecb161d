"""Whole-model check: MiniMind with the Triton op table trains like the reference op table.

Two copies of a small decoder share initial weights; one runs `kernels="triton"`, the other
`kernels="reference"`. On the same batches their losses and every parameter's gradient must agree
over three AdamW steps, for the dense and the MoE variant (every op of the Triton table is checked to be
a kernel, not a reference stand-in). A KV-cache decode with rotary in place is checked too.
"""

from __future__ import annotations

import os

import pytest
import torch
from minimind_fast.kernels import cross_entropy as ce
from minimind_fast.kernels import rmsnorm, rope, swiglu

from minimind_fast import ops as op_table
from minimind_fast.config import get_preset
from minimind_fast.model import KVCache, MiniMindForCausalLM

HAS_CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(
    not (HAS_CUDA or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="Triton kernels need a CUDA GPU, or TRITON_INTERPRET=1 to run on CPU (`make test` sets it)",
)

SMALL = dict(num_hidden_layers=2, vocab_size=512, hidden_size=64)


@pytest.fixture(autouse=True)
def _no_kernel_override(monkeypatch):
    """MINIMIND_KERNELS would force both copies onto one table and make the comparison meaningless."""
    monkeypatch.delenv(op_table.ENV_VAR, raising=False)


def twin_models(preset: str, device: torch.device, **overrides) -> tuple[MiniMindForCausalLM, MiniMindForCausalLM]:
    torch.manual_seed(0)
    reference = MiniMindForCausalLM(get_preset(preset, kernels="reference", **SMALL, **overrides)).to(device)
    triton = MiniMindForCausalLM(get_preset(preset, kernels="triton", **SMALL, **overrides)).to(device)
    triton.load_state_dict(reference.state_dict())
    assert triton.ops.rms_norm is rmsnorm.rms_norm and triton.ops.apply_rotary is rope.apply_rotary
    assert triton.ops.swiglu is swiglu.swiglu and triton.ops.linear_cross_entropy is ce.linear_cross_entropy
    # an op the kernels package lacked would silently stay reference, and the comparison pass trivially
    stand_ins = [n for n in op_table.OP_NAMES if getattr(triton.ops, n) is getattr(op_table.REFERENCE, n)]
    assert not stand_ins, f"reference ops in the Triton table: {stand_ins}"
    return reference, triton


def batch(device: torch.device, bsz: int = 2, seqlen: int = 24, vocab: int = 512, step: int = 0):
    g = torch.Generator().manual_seed(100 + step)
    tokens = torch.randint(0, vocab, (bsz, seqlen + 1), generator=g)
    targets = tokens[:, 1:].clone()
    targets[0, :5] = -100  # a masked prompt, as in SFT
    return tokens[:, :-1].to(device), targets.to(device)


def packed_positions(bsz: int, seqlen: int, device: torch.device) -> torch.Tensor:
    """Positions restarting at document boundaries (different per row): exercises (B, T, D) rope tables."""
    rows = []
    for row in range(bsz):
        cut = 7 + 5 * row
        rows.append(torch.cat([torch.arange(cut), torch.arange(seqlen - cut)]))
    return torch.stack(rows).to(device)


def assert_close_rel(got: torch.Tensor, want: torch.Tensor, rel: float, what: str) -> None:
    """Relative error in norm and in the largest element, against the reference tensor's scale.

    AdamW's first steps move every weight by about lr * sign(grad), so rounding-level differences in
    near-zero gradients become visible in later steps; a relative criterion keeps the check meaningful.
    """
    assert torch.isfinite(got).all(), f"{what}: NaN/Inf"
    scale = want.abs().max().clamp(min=1e-30)
    norm_err = ((got - want).norm() / want.norm().clamp(min=1e-30)).item()
    max_err = ((got - want).abs().max() / scale).item()
    assert norm_err <= rel and max_err <= 10 * rel, f"{what}: relative error {norm_err:.2e} (norm), {max_err:.2e} (max)"


def train_and_compare(reference, triton, device, steps: int = 3, packed: bool = False) -> None:
    opts = [torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.1) for m in (reference, triton)]
    for step in range(steps):
        ids, targets = batch(device, step=step)
        positions = packed_positions(*ids.shape, device) if packed else None
        losses = []
        for model, opt in zip((reference, triton), opts):
            opt.zero_grad(set_to_none=True)
            out = model(ids, targets=targets, position_ids=positions)
            total = out.loss + out.aux_loss
            total.backward()
            losses.append(total.detach())
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6, msg=f"loss differs at step {step}")
        # Before any update the two copies hold identical weights: gradients must agree to fp32 rounding.
        rel = 1e-5 if step == 0 else 2e-4
        for (name, p_ref), p_tri in zip(reference.named_parameters(), triton.parameters()):
            assert p_tri.grad is not None, f"step {step}: no gradient for {name} with Triton kernels"
            assert_close_rel(p_tri.grad, p_ref.grad, rel, f"step {step}, grad of {name}")
        for opt in opts:
            opt.step()
    # Same tolerance as the gradients after the first update (AdamW's sign-like steps amplify rounding).
    for (name, p_ref), p_tri in zip(reference.named_parameters(), triton.parameters()):
        assert_close_rel(p_tri.detach(), p_ref.detach(), 2e-4, f"{name} after {steps} steps")


@pytest.mark.parametrize("packed", [False, True], ids=["contiguous", "packed-positions"])
def test_dense_model_trains_like_reference(device, packed):
    reference, triton = twin_models("tiny", device)
    train_and_compare(reference, triton, device, packed=packed)


def test_dense_model_with_qk_norm(device):
    reference, triton = twin_models("tiny", device, qk_norm=True)
    train_and_compare(reference, triton, device, steps=2)


@pytest.mark.slow  # ~30 s under the CPU interpreter (MoE dispatch kernels); a second on a GPU
@pytest.mark.parametrize("gemm", ["triton", "torch"])
def test_moe_model_trains_like_reference(device, gemm, monkeypatch):
    """Expert GEMMs ours or torch's grouped GEMM (MINIMIND_MOE_GEMM; bf16-only on CUDA, so there the
    fp32 model keeps ours)."""
    from minimind_fast.kernels import moe

    monkeypatch.setattr(moe, "GEMM", gemm)
    reference, triton = twin_models("tiny-moe", device)
    train_and_compare(reference, triton, device)


def test_kv_cache_decode_matches(device):
    """Prefill then two single-token steps under no_grad (rotary in place) give the reference's logits."""
    reference, triton = twin_models("tiny", device)
    ids, _ = batch(device, seqlen=10)
    next_ids = torch.randint(0, 512, (2, 2), generator=torch.Generator().manual_seed(7)).to(device)
    logits = []
    for model in (reference, triton):
        model.eval()
        cache = KVCache(model.config, batch_size=2, max_len=16, device=device, dtype=torch.float32)
        with torch.no_grad():
            steps = [model(ids, kv_cache=cache).logits[:, -1]]
            for t in range(next_ids.shape[1]):
                steps.append(model(next_ids[:, t:t + 1], kv_cache=cache).logits[:, -1])
        logits.append(torch.stack(steps))
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=1e-5)


@pytest.mark.gpu  # inductor compiles the Triton kernels into the graph only on CUDA
@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_compiled_model_with_kernels_matches_eager(device, preset):
    """`--compile` with the Triton op table: torch.compile must trace every kernel (custom ops and
    autograd.Functions) and give the eager model's loss and gradients."""
    reference, triton = twin_models(preset, device)
    compiled = torch.compile(triton)
    ids, targets = batch(device)
    grads = []
    for model in (triton, compiled):
        model.zero_grad(set_to_none=True)
        out = model(ids, targets=targets)
        (out.loss + out.aux_loss).backward()
        grads.append({n: p.grad.clone() for n, p in triton.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert_close_rel(grads[1][name], grads[0][name], 1e-4, name)


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_model_with_kernels_compiles_as_one_graph(device, preset):
    """With the Triton op table, dynamo traces the whole decoder (dense, or MoE with its router, aux loss
    and expert kernels) and its fused loss without a graph break (fullgraph=True fails on one), so
    `--compile-mode reduce-overhead` can replay a step as few CUDA graphs; aot_eager runs here on the
    CPU, and values and gradients equal eager ones."""
    _, triton = twin_models(preset, device)
    compiled = torch.compile(triton, backend="aot_eager", fullgraph=True)
    ids, targets = batch(device)
    results = []
    for model in (triton, compiled):
        triton.zero_grad(set_to_none=True)
        out = model(ids, targets=targets)
        (out.loss + out.aux_loss).backward()
        results.append((out.loss.detach(), {n: p.grad.clone() for n, p in triton.named_parameters()}))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
    for name, grad in results[0][1].items():
        assert_close_rel(results[1][1][name], grad, 1e-4, name)


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_backward_fills_no_zero_gradients(device, preset):
    """Outputs a step leaves unused (the fused loss's saved gradients, the last norm's residual sum, the
    router's expert ids and counts) get no zero-filled gradient tensors in backward: at large-1b's
    vocabulary one of them was a 262 MB fp32 fill of the output weight's size. Nor does the MoE backward
    zero-fill its routing-weight partial sums (it sums only the rows its launch wrote)."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    class Fills(TorchDispatchMode):
        seen: Counter = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ in ("zeros", "new_zeros", "zeros_like", "zero_", "fill_"):
                Fills.seen[str(args[0] if args and isinstance(args[0], list) else func)] += 1
            return func(*args, **(kwargs or {}))

    _, triton = twin_models(preset, device)
    ids, targets = batch(device)
    out = triton(ids, targets=targets)
    with Fills():
        (out.loss + out.aux_loss).backward()
    assert not Fills.seen, Fills.seen
    assert all(p.grad is not None for p in triton.parameters())
