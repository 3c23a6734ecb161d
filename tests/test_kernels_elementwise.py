"""Triton RMSNorm (+ residual add), RoPE and SwiGLU against the plain-PyTorch reference ops.

Every test checks the forward output and every gradient. Errors are measured against the reference
run in float64; in fp32 the kernel must be within a tight tolerance of it, and in bf16/fp16 its error
may be at most 2x the error of the reference op run in that same precision (plus a small floor), so
the tolerance scales with the dtype instead of being a constant that cannot fail.

On CPU the kernels run through Triton's interpreter (`TRITON_INTERPRET=1`, small shapes); on CUDA
larger, realistic shapes are added.
"""

from __future__ import annotations

import os

import pytest
import torch
from minimind_fast.kernels import reference as ref
from minimind_fast.kernels import rmsnorm, rope, swiglu

HAS_CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(
    not (HAS_CUDA or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="Triton kernels need a CUDA GPU, or TRITON_INTERPRET=1 to run on CPU (`make test` sets it)",
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FP32_TOL = 2e-5  # relative to the largest reference magnitude


def within_reference_error(kernel: torch.Tensor, low_ref: torch.Tensor, exact: torch.Tensor, name: str) -> None:
    """Kernel error vs float64 <= 2x (reference op in the same dtype vs float64) + a small floor.

    NaN/Inf anywhere fails: an Inf in either reference made the scale or the reference's own error
    infinite, and then any finite kernel output passed."""
    for t, who in ((kernel, "kernel output"), (low_ref, "reference"), (exact, "float64 reference")):
        assert torch.isfinite(t).all(), f"{name}: NaN/Inf in the {who}"
    assert kernel.shape == exact.shape, f"{name}: shape {tuple(kernel.shape)} != {tuple(exact.shape)}"
    scale = exact.abs().max().clamp(min=1.0).item()
    err = (kernel.double() - exact).abs().max().item()
    if kernel.dtype == torch.float32:
        assert err <= FP32_TOL * scale, f"{name}: fp32 error {err:.3e} (scale {scale:.3e})"
        return
    ref_err = (low_ref.double() - exact).abs().max().item()
    # one unit in the last place of the dtype at the largest magnitude: the output's own final rounding
    # (it was 1e-2, 2.5 bf16 ulps at that magnitude)
    floor = (2.0**-8 if kernel.dtype == torch.bfloat16 else 2.0**-11) * scale
    assert err <= 2 * ref_err + floor, f"{name}: error {err:.3e} vs reference's own {ref_err:.3e} in {kernel.dtype}"


@pytest.mark.parametrize("where", ["kernel", "reference", "float64"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_comparison_never_passes_nan_or_inf(where, bad, dtype):
    exact = torch.randn(4, 8, dtype=torch.float64)
    tensors = {"kernel": exact.to(dtype), "reference": exact.to(dtype), "float64": exact.clone()}
    tensors[where][1, 3] = bad
    with pytest.raises(AssertionError, match="NaN/Inf"):
        within_reference_error(tensors["kernel"], tensors["reference"], tensors["float64"], "probe")
    within_reference_error(exact.to(dtype), exact.to(dtype), exact, "clean")  # the same values pass


def run(fn, inputs: list[torch.Tensor], grads_out: list[torch.Tensor] | None = None):
    """Outputs of fn(*inputs) and the gradients of sum(out * g) with respect to every input."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    outs = fn(*leaves)
    outs = list(outs) if isinstance(outs, tuple) else [outs]
    if grads_out is None:
        torch.manual_seed(1)
        grads_out = [torch.randn_like(o) for o in outs]
    loss = sum((o.float() * g.float()).sum() for o, g in zip(outs, grads_out))
    grads = torch.autograd.grad(loss, leaves)
    return [o.detach() for o in outs], list(grads), grads_out


def compare(kernel_fn, ref_fn, inputs: list[torch.Tensor], names: list[str]) -> None:
    """Kernel vs reference in the inputs' dtype vs reference in float64: outputs, then each gradient."""
    k_out, k_grads, g = run(kernel_fn, inputs)
    r_out, r_grads, _ = run(ref_fn, inputs, g)
    x_out, x_grads, _ = run(ref_fn, [t.double() for t in inputs], [t.double() for t in g])
    assert len(k_out) == len(r_out), f"{len(k_out)} outputs, the reference gives {len(r_out)}"
    for i, (k, r, x) in enumerate(zip(k_out, r_out, x_out, strict=True)):
        within_reference_error(k, r, x, f"output {i}")
    for name, k, r, x in zip(names, k_grads, r_grads, x_grads, strict=True):
        assert k.dtype == r.dtype, f"d{name}: dtype {k.dtype} != reference {r.dtype}"
        within_reference_error(k, r, x, f"d{name}")


def shapes_for(cpu: list, gpu: list) -> list:
    return cpu + (gpu if HAS_CUDA else [])


# ----------------------------------------------------------------------------------------------- RMSNorm

NORM_SHAPES = shapes_for(
    cpu=[(1, 96), (3, 5, 130), (7, 1000), (2, 4, 64)],
    gpu=[(4096, 512), (2, 1024, 768), (33, 8192), (3, 65536)],
)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", NORM_SHAPES)
def test_rms_norm(device, shape, dtype):
    x = torch.randn(shape, device=device).to(dtype)
    w = (1 + 0.3 * torch.randn(shape[-1], device=device)).to(dtype)
    compare(lambda a, b: rmsnorm.rms_norm(a, b, 1e-6), lambda a, b: ref.rms_norm(a, b, 1e-6), [x, w], ["x", "w"])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", NORM_SHAPES)
def test_add_rms_norm(device, shape, dtype):
    x = torch.randn(shape, device=device).to(dtype)
    res = (3 * torch.randn(shape, device=device)).to(dtype)
    w = (1 + 0.3 * torch.randn(shape[-1], device=device)).to(dtype)
    compare(lambda a, r, b: rmsnorm.add_rms_norm(a, r, b, 1e-5), lambda a, r, b: ref.add_rms_norm(a, r, b, 1e-5),
            [x, res, w], ["x", "residual", "w"])


def test_rms_norm_fp32_weight_with_bf16_input(device):
    """The model may keep norm weights in fp32 while activations are bf16: output dtype follows x."""
    x = torch.randn(6, 130, device=device).bfloat16()
    w = 1 + 0.3 * torch.randn(130, device=device)
    compare(lambda a, b: rmsnorm.rms_norm(a, b, 1e-6), lambda a, b: ref.rms_norm(a, b, 1e-6), [x, w], ["x", "w"])


def test_add_rms_norm_keeps_an_fp32_residual_stream(device):
    """bf16 sublayer output added to an fp32 residual: the sum (and the norm of it) stays fp32 as in the
    reference, instead of being rounded to x's bf16; each gradient comes back in its input's dtype."""
    x = torch.randn(6, 130, device=device).bfloat16()
    res = 3 * torch.randn(6, 130, device=device)
    w = 1 + 0.3 * torch.randn(130, device=device)
    got = rmsnorm.add_rms_norm(x, res, w, 1e-5)
    assert [t.dtype for t in got] == [t.dtype for t in ref.add_rms_norm(x, res, w, 1e-5)] == [torch.float32] * 2
    compare(lambda a, r, b: rmsnorm.add_rms_norm(a, r, b, 1e-5), lambda a, r, b: ref.add_rms_norm(a, r, b, 1e-5),
            [x, res, w], ["x", "residual", "w"])


def test_rms_norm_non_contiguous(device):
    base = torch.randn(8, 2 * 130, device=device)
    x = base[:, ::2]  # strided rows and columns
    xt = torch.randn(130, 6, device=device).t()  # transposed
    w = 1 + 0.3 * torch.randn(130, device=device)
    for inp in (x, xt):
        k = rmsnorm.rms_norm(inp, w, 1e-6)
        torch.testing.assert_close(k, ref.rms_norm(inp, w, 1e-6), rtol=1e-5, atol=1e-5)
    # Gradients through a strided view of a graph tensor.
    a = base.detach().clone().requires_grad_(True)
    b = base.detach().clone().requires_grad_(True)
    g = torch.randn(8, 130, device=device)
    (rmsnorm.rms_norm(a[:, ::2], w, 1e-6) * g).sum().backward()
    (ref.rms_norm(b[:, ::2], w, 1e-6) * g).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5)
    assert (a.grad[:, 1::2] == 0).all()


def test_rms_norm_weight_grad_reduced_in_fp32(device):
    """Many rows into one bf16 weight gradient: a bf16 running sum would drift far past the tolerance."""
    rows = 4096 if HAS_CUDA else 256
    compare(lambda a, b: rmsnorm.rms_norm(a, b, 1e-6), lambda a, b: ref.rms_norm(a, b, 1e-6),
            [torch.randn(rows, 96, device=device).bfloat16(), torch.ones(96, device=device).bfloat16()], ["x", "w"])


def test_rms_norm_weight_grad_sums_many_partials_in_fp32(device, monkeypatch):
    """One partial row per input row, summed two at a time: on the interpreter's default 4 programs a
    bf16 running sum of the partials hid inside the floor; over 512 partials it drifts far past it."""
    monkeypatch.setattr(rmsnorm, "PARTIAL_ROWS", 2)
    monkeypatch.setattr(rmsnorm, "num_programs", lambda n_rows: n_rows)
    x = torch.randn(512, 40, device=device).bfloat16() + 1
    compare(lambda a, b: rmsnorm.rms_norm(a, b, 1e-6), lambda a, b: ref.rms_norm(a, b, 1e-6),
            [x, torch.ones(40, device=device).bfloat16()], ["x", "w"])


@pytest.mark.parametrize("fused", [False, True], ids=["rms_norm", "add_rms_norm"])
def test_rms_norm_weight_grad_sums_partials_in_chunks(device, monkeypatch, fused):
    """The partial rows of the weight gradient summed a few at a time (the last chunk partial), cast
    to the weight's dtype in the same kernel."""
    monkeypatch.setattr(rmsnorm, "PARTIAL_ROWS", 2)
    monkeypatch.setattr(rmsnorm, "num_programs", lambda n_rows: min(n_rows, 5))
    x, r = torch.randn(2, 9, 200, device=device), torch.randn(2, 9, 200, device=device)
    w = torch.randn(200, device=device).bfloat16()
    if fused:
        compare(lambda a, b, c: rmsnorm.add_rms_norm(a, b, c, 1e-6), lambda a, b, c: ref.add_rms_norm(a, b, c, 1e-6),
                [x.bfloat16(), r.bfloat16(), w], ["x", "residual", "w"])
    else:
        compare(lambda a, b: rmsnorm.rms_norm(a, b, 1e-6), lambda a, b: ref.rms_norm(a, b, 1e-6), [x, w.float()],
                ["x", "w"])


WIDE_SHAPES = shapes_for(cpu=[(3, 130), (2, 3, 200)], gpu=[(4, 32768), (3, 100_003)])


@pytest.mark.parametrize("fused", [False, True], ids=["rms_norm", "add_rms_norm"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", WIDE_SHAPES)
def test_rms_norm_wide_rows_take_the_looped_kernels(device, monkeypatch, shape, dtype, fused):
    """Rows wider than WIDE_COLS are read in CHUNK-wide pieces (a partial last one here) and their weight
    gradient summed by the column kernel over several row spans; on the CPU the threshold is lowered
    so that small rows take that path. On a GPU, rows past the one-block limit of 65536 work too."""
    if not HAS_CUDA:
        monkeypatch.setattr(rmsnorm, "WIDE_COLS", 64)
        monkeypatch.setattr(rmsnorm, "CHUNK", 32)
        monkeypatch.setattr(rmsnorm, "DW_COLS", 32)
        monkeypatch.setattr(rmsnorm, "DW_ROWS", 2)
        monkeypatch.setattr(rmsnorm, "num_programs", lambda n_rows: 64)  # several row spans, the last short
    launched = []
    original = rmsnorm._backward_wide
    monkeypatch.setattr(rmsnorm, "_backward_wide", lambda *a: launched.append(1) or original(*a))
    x = torch.randn(shape, device=device).to(dtype)
    w = (1 + 0.3 * torch.randn(shape[-1], device=device)).to(dtype)
    if fused:
        res = (3 * torch.randn(shape, device=device)).to(dtype)
        compare(lambda a, r, b: rmsnorm.add_rms_norm(a, r, b, 1e-5), lambda a, r, b: ref.add_rms_norm(a, r, b, 1e-5),
                [x, res, w], ["x", "residual", "w"])
    else:
        compare(lambda a, b: rmsnorm.rms_norm(a, b, 1e-6), lambda a, b: ref.rms_norm(a, b, 1e-6), [x, w], ["x", "w"])
    assert launched, "the wide path was not taken"


def test_rms_norm_of_no_rows_has_zero_weight_grad(device):
    w = torch.randn(48, device=device, requires_grad=True)
    x = torch.randn(0, 48, device=device, requires_grad=True)
    rmsnorm.rms_norm(x, w, 1e-6).sum().backward()
    assert x.grad.shape == (0, 48) and torch.equal(w.grad, torch.zeros_like(w))


def test_add_rms_norm_normalises_the_rounded_sum_it_returns(device):
    """As the reference (and the backward, which reads h back): y = rms_norm(h) for the h returned, not
    for the unrounded fp32 sum, which gave 1-ulp differences in about a quarter of fp16 outputs. fp16
    because the interpreter rounds to it as the GPU does (to bf16 it truncates)."""
    x = torch.randn(64, 96, device=device).half()
    r = (3 * torch.randn(64, 96, device=device)).half()
    w = (torch.rand(96, device=device) + 0.5).half()
    y, h = rmsnorm.add_rms_norm(x, r, w, 1e-6)
    assert torch.equal(h, x + r)
    differ = (y != ref.rms_norm(h, w, 1e-6)).float().mean().item()
    assert differ < 0.01, differ  # a rare last-bit flip from another fp32 summation order, at most


def test_rms_norm_of_zero_width_rows_is_empty_as_the_reference(device):
    """Rows of no columns failed in a reshape with an error about -1 (the reference gives empties)."""
    w = torch.randn(0, device=device, requires_grad=True)
    x = torch.randn(3, 0, device=device, requires_grad=True)
    r = torch.randn(3, 0, device=device, requires_grad=True)
    y = rmsnorm.rms_norm(x, w, 1e-6)
    y2, h = rmsnorm.add_rms_norm(x, r, w, 1e-6)
    assert y.shape == y2.shape == h.shape == ref.rms_norm(x, w, 1e-6).shape == (3, 0)
    (y.sum() + y2.sum() + h.sum()).backward()
    assert x.grad.shape == r.grad.shape == (3, 0) and w.grad.shape == (0,)


def test_rms_norm_rejects_a_weight_or_residual_of_another_shape(device):
    """The kernels index weight and residual by x's rows and columns: a short weight, or a residual the
    reference would broadcast, was read past its end (garbage output) instead of refused."""
    x, w = torch.randn(3, 16, device=device), torch.ones(16, device=device)
    with pytest.raises(ValueError, match=r"weight \(8,\) does not match"):
        rmsnorm.rms_norm(x, torch.ones(8, device=device), 1e-6)
    with pytest.raises(ValueError, match=r"weight \(32,\) does not match"):
        rmsnorm.add_rms_norm(x, x, torch.ones(32, device=device), 1e-6)
    with pytest.raises(ValueError, match=r"residual \(1, 16\) and x \(3, 16\) differ"):
        rmsnorm.add_rms_norm(x, torch.randn(1, 16, device=device), w, 1e-6)


def test_triton_rmsnorm_module(device):
    mod = rmsnorm.TritonRMSNorm(130, eps=1e-6).to(device)
    with torch.no_grad():
        mod.weight.normal_()
    x = torch.randn(2, 3, 130, device=device, requires_grad=True)
    mod(x).square().sum().backward()
    w = mod.weight.detach().clone().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    ref.rms_norm(x2, w, 1e-6).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mod.weight.grad, w.grad, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------- RoPE


def rope_tables(positions: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables in the rotate_half convention (halves repeated) for integer positions (any shape)."""
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    angles = positions.double()[..., None] * inv_freq.to(positions.device)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().float(), angles.sin().float()


# (batch, seq, q heads, k heads, head_dim)
ROPE_SHAPES = shapes_for(
    cpu=[(1, 1, 1, 1, 2), (2, 7, 4, 2, 16), (3, 5, 6, 6, 10), (2, 9, 8, 1, 64)],
    gpu=[(4, 512, 16, 4, 64), (2, 2048, 32, 8, 128), (8, 333, 12, 12, 96)],
)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ROPE_SHAPES)
def test_rope_shared_table_with_offset(device, shape, dtype):
    """(T, D) table starting at a KV-cache offset, GQA head counts."""
    b, t, hq, hk, d = shape
    cos, sin = rope_tables(torch.arange(37, 37 + t, device=device), d)
    q = torch.randn(b, t, hq, d, device=device).to(dtype)
    k = torch.randn(b, t, hk, d, device=device).to(dtype)
    compare(lambda x, y: rope.apply_rotary(x, y, cos, sin), lambda x, y: ref.apply_rotary(x, y, cos, sin),
            [q, k], ["q", "k"])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ROPE_SHAPES)
def test_rope_per_sequence_positions(device, shape, dtype):
    """(B, T, D) table: positions restarting at each packed document, a different layout per row."""
    b, t, hq, hk, d = shape
    positions = torch.stack([torch.cat([torch.arange(n, device=device) for n in _doc_lengths(t, row)])
                             for row in range(b)])
    cos, sin = rope_tables(positions, d)
    q = torch.randn(b, t, hq, d, device=device).to(dtype)
    k = torch.randn(b, t, hk, d, device=device).to(dtype)
    compare(lambda x, y: rope.apply_rotary(x, y, cos, sin), lambda x, y: ref.apply_rotary(x, y, cos, sin),
            [q, k], ["q", "k"])


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_yarn_table_at_a_cache_offset(device, dtype):
    """The model's YaRN-scaled table (frequencies ramped, cos/sin scaled by the attention factor), sliced
    at a KV-cache offset as decoding does, with GQA heads."""
    from minimind_fast.model import rope_tables as model_tables

    scaling = {"original_max_position_embeddings": 16, "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0,
               "attention_factor": 1.3}
    cos, sin = (t.to(device) for t in model_tables(32, 64, 1e6, scaling))
    assert not torch.equal(cos, model_tables(32, 64, 1e6)[0].to(device))  # the scaling took effect
    cos, sin = cos[40:47], sin[40:47]
    q, k = (torch.randn(2, 7, h, 32, device=device).to(dtype) for h in (6, 2))
    compare(lambda x, y: rope.apply_rotary(x, y, cos, sin), lambda x, y: ref.apply_rotary(x, y, cos, sin),
            [q, k], ["q", "k"])


def _doc_lengths(total: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    lengths, left = [], total
    while left:
        n = int(torch.randint(1, max(2, total // 2 + 1), (1,), generator=g).clamp(max=left))
        lengths.append(n)
        left -= n
    return lengths


def test_rope_batch_one_table_broadcasts(device):
    """A (1, T, D) table is shared by every sequence, as the reference's broadcasting does."""
    cos, sin = rope_tables(torch.arange(5, device=device)[None], 16)
    q, k = torch.randn(3, 5, 4, 16, device=device), torch.randn(3, 5, 2, 16, device=device)
    for got, want in zip(rope.apply_rotary(q.clone(), k.clone(), cos, sin), ref.apply_rotary(q, k, cos, sin)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("per_sequence", ["sin", "cos"])
def test_rope_one_table_shared_and_the_other_per_sequence(device, per_sequence):
    """cos (T, D) with sin (B, T, D), and the reverse: the kernel read both with the first table's batch
    stride, so sin's later sequences took the first one's angles, or cos was read past its end."""
    positions = torch.stack([torch.arange(3, 8, device=device), torch.arange(5, device=device)])
    cos_b, sin_b = rope_tables(positions, 16)
    cos_t, sin_t = rope_tables(torch.arange(5, device=device), 16)
    cos, sin = (cos_t, sin_b) if per_sequence == "sin" else (cos_b, sin_t)
    q, k = torch.randn(2, 5, 4, 16, device=device), torch.randn(2, 5, 2, 16, device=device)
    compare(lambda x, y: rope.apply_rotary(x, y, cos, sin), lambda x, y: ref.apply_rotary(x, y, cos, sin),
            [q, k], ["q", "k"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_strided_views_of_fused_qkv(device, dtype):
    """q and k sliced out of one fused projection (non-contiguous views): values and the weight gradient."""
    b, t, hq, hk, d, hidden = 2, 6, 4, 2, 16, 32
    cos, sin = rope_tables(torch.arange(t, device=device), d)
    x = torch.randn(b, t, hidden, device=device).to(dtype)
    w = (0.2 * torch.randn((hq + 2 * hk) * d, hidden, device=device)).to(dtype)

    def attention_inputs(apply, x, w):
        qkv = (x @ w.t()).view(b, t, hq + 2 * hk, d)
        q, k = qkv[:, :, :hq], qkv[:, :, hq:hq + hk]
        assert not q.is_contiguous() and not k.is_contiguous()
        return apply(q, k, cos, sin)

    compare(lambda a, c: attention_inputs(rope.apply_rotary, a, c),
            lambda a, c: attention_inputs(ref.apply_rotary, a, c), [x, w], ["x", "w"])


def test_rope_with_no_k_heads_still_rotates_q(device):
    """An empty k (no heads) made the launch return early, handing back q's output buffer unwritten."""
    cos, sin = rope_tables(torch.arange(5, device=device), 16)
    q, k = torch.randn(2, 5, 4, 16, device=device), torch.randn(2, 5, 0, 16, device=device)
    compare(lambda x: rope.apply_rotary(x, k, cos, sin)[0], lambda x: ref.apply_rotary(x, k, cos, sin)[0],
            [q], ["q"])


@pytest.mark.parametrize("impl", [rope, ref], ids=["triton", "reference"])
def test_rope_refuses_an_odd_head_dim(device, impl):
    """The reference rotated an odd head anyway (halves of unequal length: no rotation at all)."""
    q, cos = torch.randn(1, 2, 1, 7, device=device), torch.randn(2, 7, device=device)
    with pytest.raises(ValueError, match="head_dim 7 must be even"):
        impl.apply_rotary(q, q.clone(), cos, cos)


def test_rope_rejects_bad_tables(device):
    q, k = torch.randn(1, 4, 2, 8, device=device), torch.randn(1, 4, 2, 8, device=device)
    cos, sin = rope_tables(torch.arange(5, device=device), 8)
    with pytest.raises(ValueError, match="cos has shape"):
        rope.apply_rotary(q, k, cos, sin)


class TestRopeInPlace:
    """In-place rotation must never change results or gradients, whoever else holds the inputs."""

    def _tables(self, device, t=5, d=16):
        return rope_tables(torch.arange(t, device=device), d)

    def test_leaf_inputs_are_left_untouched(self, device):
        cos, sin = self._tables(device)
        q = torch.randn(2, 5, 4, 16, device=device, requires_grad=True)
        k = torch.randn(2, 5, 2, 16, device=device, requires_grad=True)
        q0, k0 = q.detach().clone(), k.detach().clone()
        qo, ko = rope.apply_rotary(q, k, cos, sin)
        assert torch.equal(q.detach(), q0) and torch.equal(k.detach(), k0)
        for got, want in zip((qo, ko), ref.apply_rotary(q0, k0, cos, sin)):
            torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-5)

    def test_no_grad_rotates_in_place(self, device):
        cos, sin = self._tables(device)
        q, k = torch.randn(2, 5, 4, 16, device=device), torch.randn(2, 5, 2, 16, device=device)
        want = ref.apply_rotary(q, k, cos, sin)
        with torch.no_grad():
            qo, ko = rope.apply_rotary(q, k, cos, sin)
        assert qo.data_ptr() == q.data_ptr() and ko.data_ptr() == k.data_ptr()
        torch.testing.assert_close(qo, want[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ko, want[1], rtol=1e-5, atol=1e-5)

    def test_input_reused_by_a_later_op(self, device):
        """A non-view graph tensor is overwritten in place; a later use of the returned tensor sees the
        rotation and gradients through both uses match the reference."""
        cos, sin = self._tables(device)
        base = torch.randn(2, 5, 4, 16, device=device)
        kb = torch.randn(2, 5, 2, 16, device=device)

        def loss_of(apply, a, c):
            q, k = a * 1.5, c + 0.0  # graph tensors that are not views
            qo, ko = apply(q, k, cos, sin)
            return (qo * qo).sum() + (qo * ko.repeat_interleave(2, dim=2)).sum() + ko.sum()

        a1, c1 = base.clone().requires_grad_(True), kb.clone().requires_grad_(True)
        a2, c2 = base.clone().requires_grad_(True), kb.clone().requires_grad_(True)
        torch.testing.assert_close(loss_of(rope.apply_rotary, a1, c1), loss_of(ref.apply_rotary, a2, c2))
        loss_of(rope.apply_rotary, a1, c1).backward()
        loss_of(ref.apply_rotary, a2, c2).backward()
        torch.testing.assert_close(a1.grad, a2.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(c1.grad, c2.grad, rtol=1e-5, atol=1e-5)

    def test_input_saved_by_its_producer_fails_loudly(self, device):
        """exp() saves its output for backward: overwriting it must raise, never give wrong gradients."""
        cos, sin = self._tables(device)
        a = torch.randn(2, 5, 4, 16, device=device, requires_grad=True)
        qo, _ = rope.apply_rotary(a.exp(), torch.randn(2, 5, 2, 16, device=device), cos, sin)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            qo.sum().backward()

    def test_same_tensor_as_q_and_k(self, device):
        cos, sin = self._tables(device)
        x = torch.randn(2, 5, 4, 16, device=device)
        want = ref.apply_rotary(x, x, cos, sin)
        with torch.no_grad():
            qo, ko = rope.apply_rotary(x.clone(), x.clone(), cos, sin)
            same = x.clone()
            qs, ks = rope.apply_rotary(same, same, cos, sin)
        for got in (qo, qs):
            torch.testing.assert_close(got, want[0], rtol=1e-5, atol=1e-5)
        for got in (ko, ks):
            torch.testing.assert_close(got, want[1], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------- SwiGLU

SWIGLU_SHAPES = shapes_for(
    cpu=[(1, 1), (3, 7, 130), (17, 1000), (5, 96)],
    gpu=[(8, 2048, 1408), (4096, 5632), (3, 1 << 20)],
)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SWIGLU_SHAPES)
def test_swiglu(device, shape, dtype):
    gate = (2 * torch.randn(shape, device=device)).to(dtype)
    up = torch.randn(shape, device=device).to(dtype)
    compare(swiglu.swiglu, ref.swiglu, [gate, up], ["gate", "up"])


def test_swiglu_extreme_gates_stay_finite(device):
    gate = torch.tensor([[-1e4, -80.0, -20.0, 0.0, 20.0, 80.0, 1e4]], device=device)
    up = torch.ones_like(gate)
    compare(swiglu.swiglu, ref.swiglu, [gate, up], ["gate", "up"])


def test_swiglu_of_mixed_dtypes_promotes_as_the_reference(device):
    """A bf16 gate with an fp32 up: the product is fp32 as `silu(gate) * up` gives, not rounded to the
    gate's bf16; each gradient in its input's dtype. Also under torch.compile (the custom op's fake)."""
    gate, up = (2 * torch.randn(5, 96, device=device)).bfloat16(), torch.randn(5, 96, device=device)
    compiled = torch.compile(swiglu.swiglu, backend="aot_eager", fullgraph=True)
    assert swiglu.swiglu(gate, up).dtype == compiled(gate, up).dtype == ref.swiglu(gate, up).dtype == torch.float32
    compare(swiglu.swiglu, ref.swiglu, [gate, up], ["gate", "up"])


def test_swiglu_halves_of_one_projection(device):
    """gate and up as column halves of one (N, 2I) projection: non-contiguous inputs."""
    x = torch.randn(9, 24, device=device)
    w = 0.3 * torch.randn(2 * 130, 24, device=device)

    def mlp(apply, x, w):
        gu = x @ w.t()
        return apply(gu[:, :130], gu[:, 130:])

    compare(lambda a, b: mlp(swiglu.swiglu, a, b), lambda a, b: mlp(ref.swiglu, a, b), [x, w], ["x", "w"])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SWIGLU_SHAPES)
def test_swiglu_packed(device, shape, dtype):
    """gate and up as the halves of one (..., 2I) tensor (one GEMM over the stacked weights)."""
    *rows, inter = shape
    gate_up = torch.cat([2 * torch.randn(*rows, inter, device=device), torch.randn(*rows, inter, device=device)], -1)
    compare(swiglu.swiglu_packed, ref.swiglu_packed, [gate_up.to(dtype)], ["gate_up"])


def test_swiglu_packed_of_a_projection_and_of_a_strided_view(device):
    x = torch.randn(9, 24, device=device)
    w = 0.3 * torch.randn(2 * 130, 24, device=device)
    compare(lambda a, b: swiglu.swiglu_packed(a @ b.t()), lambda a, b: ref.swiglu_packed(a @ b.t()), [x, w], ["x", "w"])
    wide = torch.randn(5, 3 * 2 * 40, device=device)
    compare(lambda a: swiglu.swiglu_packed(a[:, ::3]), lambda a: ref.swiglu_packed(a[:, ::3]), [wide], ["wide"])
    with pytest.raises(ValueError, match="halves"):
        swiglu.swiglu_packed(torch.randn(2, 7, device=device))


def test_triton_swiglu_module(device):
    gate, up = torch.randn(4, 130, device=device), torch.randn(4, 130, device=device)
    torch.testing.assert_close(swiglu.TritonSwiGLU()(gate, up), ref.swiglu(gate, up), rtol=1e-5, atol=1e-5)


# --- the custom-op forms used under torch.compile ----------------------------------------------------

def _leaves(*shapes, device):
    return [torch.randn(s, device=device, requires_grad=True) for s in shapes]


def _op_cases(device):
    x, r = _leaves((3, 5, 48), (3, 5, 48), device=device)
    w = torch.randn(48, device=device, requires_grad=True)
    q, k = _leaves((2, 6, 4, 16), (2, 6, 2, 16), device=device)
    cos, sin = rope_tables(torch.arange(6, device=device), 16)
    g, u = _leaves((7, 40), (7, 40), device=device)
    gu = torch.cat([g, u], -1).detach().requires_grad_()
    return {
        "rms_norm": (torch.ops.minimind_fast.rms_norm.default, (x, w, 1e-5)),
        "add_rms_norm": (torch.ops.minimind_fast.add_rms_norm.default, (x, r, w, 1e-5)),
        "rotary": (torch.ops.minimind_fast.rotary.default, (q, k, cos, sin, 1.0)),
        "swiglu": (torch.ops.minimind_fast.swiglu.default, (g, u)),
        "swiglu_packed": (torch.ops.minimind_fast.swiglu_packed.default, (gu,)),
    }


@pytest.mark.parametrize("name", ["rms_norm", "add_rms_norm", "rotary", "swiglu", "swiglu_packed"])
def test_custom_op_registration_passes_opcheck(device, name):
    """Schema, fake (meta) implementation and autograd registration agree with the real op."""
    op, args = _op_cases(device)[name]
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def _transposed(t: torch.Tensor, dims: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """t's values in a dense but non-contiguous layout (dims swapped in memory), as a new leaf."""
    return t.detach().transpose(*dims).contiguous().transpose(*dims).requires_grad_(t.requires_grad)


def test_custom_ops_of_transposed_inputs_pass_opcheck(device):
    """The fake implementations promised outputs in the input's (transposed) layout while the kernels
    write contiguous ones: torch.compile then plans for strides the real op does not return."""
    x, r, g, u, gu = (_transposed(t) for t in _leaves((16, 6), (16, 6), (8, 7), (8, 7), (8, 8), device=device))
    w = torch.randn(6, device=device, requires_grad=True)
    q, k = (_transposed(t, (-1, -2)) for t in _leaves((2, 6, 4, 16), (2, 6, 2, 16), device=device))
    cos, sin = rope_tables(torch.arange(6, device=device), 16)
    ops = torch.ops.minimind_fast
    cases = [(ops.rms_norm.default, (x, w, 1e-5)), (ops.add_rms_norm.default, (x, r, w, 1e-5)),
             (ops.rms_norm_backward.default, (x.detach(), x.detach(), w.detach(), torch.rand(16, device=device), None)),
             (ops.swiglu.default, (g, u)), (ops.swiglu_backward.default, (g.detach(), g.detach(), u.detach())),
             (ops.swiglu_packed_backward.default, (gu.detach()[:, :4], gu.detach())),
             (ops.rotary.default, (q, k, cos, sin, 1.0))]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def _compiled_matches_eager(fn, inputs):
    """fullgraph=True: a graph break (an autograd.Function dynamo cannot keep whole) fails the test."""
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    results = []
    for f in (fn, compiled):
        leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
        out = f(*leaves)
        outs = out if isinstance(out, tuple) else (out,)
        sum((o.double() * torch.linspace(0.5, 1.5, o.numel(), device=o.device, dtype=torch.float64).view_as(o)).sum()
            for o in outs).backward()
        results.append([o.detach() for o in outs] + [t.grad for t in leaves])
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_compiled_ops_trace_without_graph_breaks(device):
    x, r, g, u = (torch.randn(s, device=device) for s in ((3, 5, 48), (3, 5, 48), (7, 40), (7, 40)))
    w = torch.randn(48, device=device) + 1.0
    q, k = torch.randn(2, 6, 4, 16, device=device), torch.randn(2, 6, 2, 16, device=device)
    cos, sin = rope_tables(torch.arange(6, device=device), 16)
    _compiled_matches_eager(lambda a, b: rmsnorm.rms_norm(a * 2.0, b, 1e-5), [x, w])
    _compiled_matches_eager(lambda a, b, c: rmsnorm.add_rms_norm(a, b * 0.5, c, 1e-5), [x, r, w])
    _compiled_matches_eager(lambda a, b: rope.apply_rotary(a * 1.0, b * 1.0, cos, sin), [q, k])
    _compiled_matches_eager(lambda a, b: swiglu.swiglu(a, b) * 3.0, [g, u])
    _compiled_matches_eager(lambda a, b: swiglu.swiglu_packed(torch.cat([a, b], -1)) * 3.0, [g, u])
