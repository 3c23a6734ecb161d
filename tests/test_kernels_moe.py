"""MoE dispatch kernels (`kernels/moe.py`) against `kernels/reference.py` and a float64 per-token loop.

On CPU these run through Triton's interpreter (`TRITON_INTERPRET=1`) at small shapes; on CUDA the same
checks also run at MiniMind's moe-145m and Liger's benchmark sizes. Every case checks the forward and
every gradient (x, routing weights, the three expert weights; router logits for `moe_route`).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from minimind_fast.kernels import moe, reference

# moe is imported even where the tests skip: parametrize names it at collection, and importing it
# needs no GPU (its kernels compile at their first launch).
HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(
    not (HAS_CUDA or INTERPRET),
    reason="Triton kernels need a CUDA GPU, or TRITON_INTERPRET=1 to run on CPU (`make test` sets it)")


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def naive_experts(x, idx, w, wg, wu, wd):
    """Per-token, per-slot loop: out[t] = sum_j w[t, j] * down_e(silu(gate_e x) * up_e x)."""
    rows = []
    for t in range(x.shape[0]):
        acc = torch.zeros_like(x[t])
        for j in range(idx.shape[1]):
            e = int(idx[t, j])
            h = F.silu(wg[e] @ x[t]) * (wu[e] @ x[t])
            acc = acc + w[t, j] * (wd[e] @ h)
        rows.append(acc)
    return torch.stack(rows) if rows else x.new_zeros(x.shape)


def naive_route(logits, idx, norm):
    """float64 softmax, weights at the given experts, renormalised like the reference."""
    p = logits.double().softmax(-1)
    w = p.gather(1, idx)
    if norm and idx.shape[1] > 1:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return p, w


def make_routing(n, n_exp, k, kind, device):
    """topk_idx (N, k) of distinct experts per token, and positive weights."""
    s = torch.rand(n, n_exp, device=device)
    if kind == "empty":  # experts 0 and the last never chosen
        s[:, 0] = -1.0
        s[:, -1] = -1.0
    elif kind == "one":  # expert 1 chosen by every token
        s[:, 1] = 2.0
    idx = s.topk(k, dim=-1).indices
    w = torch.rand(n, k, device=device) + 0.1
    return idx, w


def make_weights(n_exp, hidden, inter, device):
    wg = torch.randn(n_exp, inter, hidden, device=device) / hidden**0.5
    wu = torch.randn(n_exp, inter, hidden, device=device) / hidden**0.5
    wd = torch.randn(n_exp, hidden, inter, device=device) / inter**0.5
    return wg, wu, wd


def run(fn, tensors, idx, grad_out):
    """Forward of fn on fresh leaves cast like `tensors`, then every gradient for grad_out."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    x, w, wg, wu, wd = leaves
    out = fn(x, idx, w, wg, wu, wd)
    grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype))
    return [out.detach(), *grads]


NAMES = ["out", "dx", "dweight", "dw_gate", "dw_up", "dw_down"]


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-12)).item()


def check_experts(n, hidden, inter, n_exp, k, kind, device, dtype, experts=None):
    idx, w = make_routing(n, n_exp, k, kind, device)
    wg, wu, wd = make_weights(n_exp, hidden, inter, device)
    x = torch.randn(n, hidden, device=device)
    grad_out = torch.randn(n, hidden, device=device)
    base = [x, w, wg, wu, wd]

    exact = run(naive_experts if n * k <= 160 else reference.moe_experts,
                [t.double() for t in base], idx, grad_out.double())
    low = [t.to(dtype) if i != 1 else t for i, t in enumerate(base)]  # routing weights stay fp32
    ours = run(experts or moe.moe_experts, low, idx, grad_out)
    ref = run(reference.moe_experts, low, idx, grad_out)
    for name, o, r, e in zip(NAMES, ours, ref, exact, strict=True):
        assert_within(name, o, r, e, dtype)
    return ours


def assert_within(name, ours, low_ref, exact, dtype):
    """fp32: 1e-5 relative to float64 and close to the reference; lower precision: within 2x the
    reference's own error in that dtype, plus a floor. NaN/Inf anywhere fails (an Inf in the reference
    made its own error, and so the bound, infinite)."""
    assert ours.shape == exact.shape and ours.dtype == low_ref.dtype, name
    for t, who in ((ours, "kernel"), (low_ref, "reference"), (exact, "float64 reference")):
        assert torch.isfinite(t).all(), f"{name}: NaN/Inf in the {who}"
    err, ref_err = rel_err(ours, exact), rel_err(low_ref, exact)
    if dtype == torch.float32:
        assert err < 1e-5, f"{name}: relative error {err:.2e} vs float64"
        torch.testing.assert_close(ours, low_ref, rtol=1e-4, atol=1e-5, msg=name)
    else:
        assert err <= 2 * ref_err + 2e-3, f"{name}: error {err:.2e}, reference's {ref_err:.2e}"


@pytest.mark.parametrize("where", ["kernel", "reference", "float64"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_comparison_never_passes_nan_or_inf(where, bad, dtype):
    exact = torch.randn(5, 7, dtype=torch.float64)
    tensors = {"kernel": exact.to(dtype), "reference": exact.to(dtype), "float64": exact.clone()}
    tensors[where][3, 2] = bad
    with pytest.raises(AssertionError, match="NaN/Inf"):
        assert_within("probe", tensors["kernel"], tensors["reference"], tensors["float64"], dtype)
    assert_within("clean", exact.to(dtype), exact.to(dtype), exact, dtype)


# ----------------------------------------------------------------------------------------------
# experts
# ----------------------------------------------------------------------------------------------

CASES = [
    # n, hidden, inter, n_exp, k, routing
    (1, 48, 80, 4, 1, "random"),
    (37, 48, 80, 4, 2, "random"),
    (200, 64, 96, 8, 2, "random"),
    (50, 48, 80, 4, 4, "random"),  # k == n_experts
    (64, 64, 96, 8, 2, "empty"),  # two experts get no token
    (45, 48, 80, 4, 1, "one"),  # one expert gets every token
    (40, 64, 96, 8, 2, "one"),
]
ODD_SIZES = (19, 33, 37, 5, 2, "random")  # odd hidden and intermediate sizes, odd expert count


@pytest.mark.parametrize("n,hidden,inter,n_exp,k,kind", CASES + [ODD_SIZES])
def test_experts_fp32(n, hidden, inter, n_exp, k, kind, device):
    check_experts(n, hidden, inter, n_exp, k, kind, device, torch.float32)


@pytest.mark.parametrize("n,hidden,inter,n_exp,k,kind", [(96, 64, 96, 4, 2, "random"), (24, 48, 80, 8, 8, "random"),
                                                        ODD_SIZES])
def test_experts_bf16(n, hidden, inter, n_exp, k, kind, device):
    check_experts(n, hidden, inter, n_exp, k, kind, device, torch.bfloat16)


@pytest.mark.parametrize("layout", ["transposed", "expanded"])
def test_experts_of_non_contiguous_inputs(device, layout):
    """x, the routing weights and the expert weights as non-contiguous views (transposed layouts, or x
    and one expert's weights broadcast with stride 0): values and every gradient as the reference's."""
    n, hidden, inter, n_exp, k = 21, 48, 80, 4, 2
    idx, w = make_routing(n, n_exp, k, "random", device)
    wg, wu, wd = make_weights(n_exp, hidden, inter, device)
    if layout == "transposed":
        x = torch.randn(hidden, n, device=device).t()
        w = w.t().contiguous().t()
        wg, wd = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (wg, wd))
    else:
        x = torch.randn(1, hidden, device=device).expand(n, hidden)
        wu = wu[:1].expand(n_exp, inter, hidden)
    grad_out = torch.randn(n, hidden, device=device)
    inputs = [x, w, wg, wu, wd]
    assert not all(t.is_contiguous() for t in inputs)
    ours = run(moe.moe_experts, inputs, idx, grad_out)
    low = run(reference.moe_experts, inputs, idx, grad_out)
    exact = run(naive_experts, [t.double() for t in inputs], idx, grad_out.double())
    for name, o, r, e in zip(NAMES, ours, low, exact, strict=True):
        assert_within(name, o, r, e, torch.float32)


def test_empty_expert_has_zero_weight_grad(device):
    idx, w = make_routing(30, 4, 2, "empty", device)
    wg, wu, wd = make_weights(4, 48, 80, device)
    x = torch.randn(30, 48, device=device)
    _, _, _, dwg, dwu, dwd = run(moe.moe_experts, [x, w, wg, wu, wd], idx, torch.randn(30, 48, device=device))
    for g in (dwg, dwu, dwd):
        assert g[0].abs().max() == 0 and g[-1].abs().max() == 0
        assert g[1].abs().max() > 0


def test_deterministic(device):
    idx, w = make_routing(80, 4, 2, "random", device)
    wg, wu, wd = make_weights(4, 64, 96, device)
    x, grad_out = torch.randn(80, 64, device=device), torch.randn(80, 64, device=device)
    first = run(moe.moe_experts, [x, w, wg, wu, wd], idx, grad_out)
    second = run(moe.moe_experts, [x, w, wg, wu, wd], idx, grad_out)
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), name


def test_no_tokens(device):
    wg, wu, wd = make_weights(4, 48, 80, device)
    x = torch.zeros(0, 48, device=device, requires_grad=True)
    idx = torch.zeros(0, 2, dtype=torch.long, device=device)
    w = torch.zeros(0, 2, device=device, requires_grad=True)
    out = moe.moe_experts(x, idx, w, wg.requires_grad_(), wu, wd)
    assert out.shape == (0, 48)
    out.sum().backward()
    assert wg.grad.abs().max() == 0


def test_bad_shapes(device):
    wg, wu, wd = make_weights(4, 48, 80, device)
    with pytest.raises(ValueError, match="w_down"):
        moe.moe_experts(torch.randn(3, 48, device=device), torch.zeros(3, 2, dtype=torch.long, device=device),
                        torch.rand(3, 2, device=device), wg, wu, wd.transpose(1, 2))
    with pytest.raises(ValueError, match="gemm='cublas' must be triton or torch"):
        moe.moe_experts(torch.randn(3, 48, device=device), torch.zeros(3, 2, dtype=torch.long, device=device),
                        torch.rand(3, 2, device=device), wg, wu, wd, gemm="cublas")
    if device.type == "cuda":
        with pytest.raises(ValueError, match="takes bf16 on CUDA"):
            moe.moe_experts_grouped_mm(torch.randn(3, 48, device=device), torch.zeros(3, 2, dtype=torch.long,
                                       device=device), torch.rand(3, 2, device=device), wg, wu, wd)


@pytest.mark.parametrize("bad", [3, 7, -1], ids=["in-padding", "past-padding", "negative"])
def test_expert_id_outside_the_experts_is_refused(device, bad):
    """An expert id >= E (in the counts' power-of-two padding or past it) or < 0 was left out of the
    GEMMs, and the output came back with uninitialised rows; both expert paths now refuse it."""
    if device.type == "cuda":
        pytest.skip("on CUDA a bad id trips a device-side assert (no host sync per step), which poisons the "
                    "process's CUDA context; the named error is the CPU path's")
    wg, wu, wd = make_weights(3, 48, 80, device)
    idx = torch.tensor([[0, 1], [2, bad], [0, 2]], device=device)
    x, w = torch.randn(3, 48, device=device), torch.rand(3, 2, device=device)
    for experts in (moe.moe_experts, moe.moe_experts_grouped_mm):
        with pytest.raises(ValueError, match=f"expert {bad} at token 1, slot 1, outside the 3 experts"):
            experts(x, idx, w, wg, wu, wd)


# The expert GEMMs on torch's grouped GEMM (bf16 only on CUDA; on the CPU its fallback takes fp32 too).

@pytest.mark.parametrize("n,hidden,inter,n_exp,k,kind", CASES)
def test_experts_grouped_mm_fp32(n, hidden, inter, n_exp, k, kind, device):
    if device.type == "cuda":
        pytest.skip("torch's grouped GEMM takes bf16 on CUDA")
    check_experts(n, hidden, inter, n_exp, k, kind, device, torch.float32, moe.moe_experts_grouped_mm)


def test_grouped_mm_refuses_rows_it_cannot_stride_and_the_default_falls_back(device, monkeypatch):
    """torch's grouped GEMM needs rows of a multiple of 16 bytes: odd hidden or intermediate sizes failed
    inside it ("strides should be multiple of 16 bytes"). Asked for by name it now says why; chosen by
    MINIMIND_MOE_GEMM=torch it leaves those experts to ours."""
    n, hidden, inter, n_exp, k, kind = ODD_SIZES
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    idx, w = make_routing(n, n_exp, k, kind, device)
    weights = [t.to(dtype) for t in make_weights(n_exp, hidden, inter, device)]
    x = torch.randn(n, hidden, device=device, dtype=dtype)
    with pytest.raises(ValueError, match="multiple of 16 bytes; 33 and 37 in torch.(bfloat16|float32) are not"):
        moe.moe_experts_grouped_mm(x, idx, w, *weights)
    monkeypatch.setattr(moe, "GEMM", "torch")
    ours = moe.moe_experts(x, idx, w, *weights, gemm="triton")
    torch.testing.assert_close(moe.moe_experts(x, idx, w, *weights), ours)


@pytest.mark.parametrize("n,hidden,inter,n_exp,k,kind", [(96, 64, 96, 4, 2, "random"), (64, 64, 96, 8, 2, "empty")])
def test_experts_grouped_mm_bf16(n, hidden, inter, n_exp, k, kind, device):
    check_experts(n, hidden, inter, n_exp, k, kind, device, torch.bfloat16, moe.moe_experts_grouped_mm)


def test_experts_grouped_mm_is_deterministic_and_handles_no_tokens(device):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    idx, w = make_routing(80, 4, 2, "empty", device)
    wg, wu, wd = (t.to(dtype) for t in make_weights(4, 64, 96, device))
    x, grad_out = torch.randn(80, 64, device=device, dtype=dtype), torch.randn(80, 64, device=device)
    first = run(moe.moe_experts_grouped_mm, [x, w, wg, wu, wd], idx, grad_out)
    second = run(moe.moe_experts_grouped_mm, [x, w, wg, wu, wd], idx, grad_out)
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), name
    for g in first[3:]:  # experts 0 and 3 get no token: zero weight gradients
        assert g[0].abs().max() == 0 and g[-1].abs().max() == 0 and g[1].abs().max() > 0
    none = torch.zeros(0, 64, device=device, dtype=dtype, requires_grad=True)
    out = moe.moe_experts_grouped_mm(none, idx[:0], w[:0].requires_grad_(), wg.requires_grad_(), wu, wd)
    out.sum().backward()
    assert out.shape == (0, 64) and wg.grad.abs().max() == 0


# ----------------------------------------------------------------------------------------------
# dispatch (counting sort) and statistics
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,n_exp,k,kind", [(1, 4, 1, "random"), (300, 8, 2, "empty"), (150, 4, 4, "random"),
                                            (200, 8, 2, "one"), (700, 64, 2, "random")])
@pytest.mark.parametrize("tile", [None, 16], ids=["one-chunk", "chunked"])
def test_sort_by_expert(n, n_exp, k, kind, tile, device, monkeypatch):
    if tile:  # the prefix-sum kernel then walks the blocks in several chunks, the last one partial
        monkeypatch.setattr(moe, "OFFSETS_TILE", tile)
    idx, _ = make_routing(n, n_exp, k, kind, device)
    sorted_pair, counts = moe.sort_by_expert(idx, n_exp)
    flat = idx.reshape(-1)
    assert torch.equal(sorted_pair.long(), torch.argsort(flat, stable=True))
    assert torch.equal(counts[:n_exp].long(), torch.bincount(flat, minlength=n_exp))
    assert torch.equal(moe.moe_dispatch_stats(idx, n_exp).long(), torch.bincount(flat, minlength=n_exp))


def test_sort_by_expert_is_three_kernels_and_no_torch_ops(device):
    """Histogram, prefix sums and scatter are all Triton: no torch op is launched beside allocations
    (the interpreter's own copies aside) and the expert-id check (a device-side assert on CUDA, the
    host's read of its flag elsewhere), which on a GPU each cost a launch from the host."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        seen: Counter = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Ops.seen[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    idx, _ = make_routing(300, 8, 2, "random", device)
    with Ops():
        moe.sort_by_expert(idx, 8)
    host_check = {"_local_scalar_dense"} if device.type == "cpu" else {"_assert_async"}
    launched = set(Ops.seen) - {"empty", "empty_like", "new_empty", "view", "set_", "copy_"} - host_check
    assert not launched, Ops.seen


# ----------------------------------------------------------------------------------------------
# router
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,n_exp,k,norm", [(1, 4, 1, True), (100, 4, 2, True), (100, 8, 2, False),
                                            (64, 8, 8, True), (33, 4, 4, False), (50, 8, 1, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_route(n, n_exp, k, norm, dtype, device):
    # distinct logits per row (spaced wider than bf16 rounding) so that top-k has no ties to break
    ranks = torch.rand(n, n_exp, device=device).argsort(-1).float()
    logits = (ranks * 0.37 - 1 + 0.05 * torch.randn(n, n_exp, device=device)).to(dtype)
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    s1, w1, i1 = moe.moe_route(a, k, norm)
    s2, w2, i2 = reference.moe_route(b, k, norm)
    assert s1.dtype == w1.dtype == torch.float32 and i1.dtype == torch.int64
    assert torch.equal(i1, i2)
    torch.testing.assert_close(s1, s2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w1, w2, rtol=1e-5, atol=1e-6)
    ds, dw = torch.randn_like(s1), torch.randn_like(w1)
    (g1,) = torch.autograd.grad([s1, w1], [a], [ds, dw])
    (g2,) = torch.autograd.grad([s2, w2], [b], [ds, dw])
    assert g1.dtype == dtype
    c = logits.double().requires_grad_()
    p, w = naive_route(c, i2, norm)
    (g64,) = torch.autograd.grad([p, w], [c], [ds.double(), dw.double()])
    tol = 1e-5 if dtype == torch.float32 else 2 * rel_err(g2, g64) + 1e-3
    assert rel_err(g1, g64) <= tol
    # only the routing weights used (no aux loss): still a gradient
    (g_w,) = torch.autograd.grad(moe.moe_route(a, k, norm)[1], [a], dw)
    (g_w_ref,) = torch.autograd.grad(reference.moe_route(b, k, norm)[1], [b], dw)
    assert g_w.abs().max() > 0
    if dtype == torch.float32:
        torch.testing.assert_close(g_w, g_w_ref, rtol=1e-4, atol=1e-5)
    else:  # bf16 gradients: one rounding apart at most
        torch.testing.assert_close(g_w, g_w_ref)


@pytest.mark.parametrize("k", [1, 2])
def test_router_learns_without_aux_loss(k, device):
    """MiniMind's trap: top-1 with renormalised weights gives the router no main-loss gradient."""
    n, hidden, inter, n_exp = 24, 48, 80, 4
    router = torch.randn(n_exp, hidden, device=device, requires_grad=True)
    wg, wu, wd = make_weights(n_exp, hidden, inter, device)
    x = torch.randn(n, hidden, device=device)
    grads = []
    for ops in (moe, reference):
        _, w, idx = ops.moe_route(x @ router.t(), k, True)
        loss = ops.moe_experts(x, idx, w, wg, wu, wd).pow(2).mean()
        grads.append(torch.autograd.grad(loss, router)[0])
    assert grads[0].abs().max() > 1e-4
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("impl", [moe, reference], ids=["triton", "reference"])
@pytest.mark.parametrize("n,group", [(60, 20), (61, 20), (7, 7), (0, 5)])
def test_route_counts(impl, n, group, device):
    """Picks per expert per group of `group` rows (the last group may be short), and in all."""
    logits = torch.randn(n, 8, device=device)
    scores, w, idx, counts = impl.moe_route_with_counts(logits, 2, True, group_size=group)
    s2, w2, i2 = reference.moe_route(logits, 2, True)
    assert torch.equal(idx, i2) and torch.allclose(w, w2, atol=1e-6) and torch.allclose(scores, s2, atol=1e-6)
    groups = max(1, -(-n // group))
    expect = torch.stack([torch.bincount(idx[g * group:(g + 1) * group].reshape(-1).cpu(), minlength=8)
                          for g in range(groups)])
    assert counts.dtype == torch.int32 and torch.equal(counts.long().cpu(), expect)
    _, _, _, total = impl.moe_route_with_counts(logits, 2, True)
    assert torch.equal(total.long().cpu(), expect.sum(0, keepdim=True))


def lowest_index_first(logits, k):
    """The tie rule spelt out on the logits (the softmax keeps their order and their ties): experts by
    descending score, equal ones in ascending index."""
    return torch.tensor([sorted(range(len(row)), key=lambda e: (-row[e], e))[:k] for row in logits.tolist()])


@pytest.mark.parametrize("n_exp,k", [(4, 1), (4, 2), (8, 1), (8, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_route_breaks_ties_toward_the_lower_expert(n_exp, k, dtype, device):
    """Equal router scores (frequent from bf16 logits) go to the lowest expert index first, in the Triton
    router and the reference alike, and fill the slots in that order. The reference used torch.topk,
    which leaves equals in no set order (on the CPU it often took the higher index), so the two paths sent
    such tokens to different experts. The layer's output and every gradient then agree with float64."""
    n, hidden, inter = 48, 32, 48
    logits = (torch.randint(0, 3, (n, n_exp), device=device) * 0.5).to(dtype)  # three values, exact in bf16
    want = lowest_index_first(logits.cpu(), k)
    top = logits.double().sort(-1, descending=True).values
    assert (top[:, k - 1] == top[:, k]).any()  # some pick decided by the rule: a tie across the k-th place
    if k > 1:
        assert (top[:, 0] == top[:, 1]).any()  # and the slot order of equals
    x, grad_out = torch.randn(n, hidden, device=device), torch.randn(n, hidden, device=device)
    weights = make_weights(n_exp, hidden, inter, device)
    results = []
    for ops in (moe, reference):
        leaves = [t.detach().clone().requires_grad_() for t in (logits, x, *weights)]
        _, w, idx = ops.moe_route(leaves[0], k, True)
        assert torch.equal(idx.cpu(), want), ops.__name__
        assert torch.equal(ops.moe_route_aux(logits, k, True, None, 0.1)[1].cpu(), want), ops.__name__
        out = ops.moe_experts(leaves[1], idx, w, *leaves[2:])
        results.append([out.detach(), *torch.autograd.grad(out, leaves, grad_out)])
    leaves = [t.detach().double().requires_grad_() for t in (logits, x, *weights)]
    _, w = naive_route(leaves[0], want.to(device), True)
    out = naive_experts(leaves[1], want.to(device), w, *leaves[2:])
    exact = [out.detach(), *torch.autograd.grad(out, leaves, grad_out.double())]
    for name, ours, ref, e in zip(["out", "dlogits", "dx", "dw_gate", "dw_up", "dw_down"], *results, exact,
                                  strict=True):
        assert_within(name, ours, ref, e, ours.dtype)


@pytest.mark.parametrize("impl", [moe, reference], ids=["triton", "reference"])
@pytest.mark.parametrize("n_exp", [4, 6])
def test_route_of_non_finite_logits_keeps_expert_ids_in_range(impl, n_exp, device):
    """A NaN or +inf router logit (an fp16 overflow, a diverging step) makes its row's scores NaN. The
    router must still pick experts inside [0, E) and hand the NaN on in the weights, as torch.sort ranks
    NaN (above every number), so the loss comes out NaN and the trainer skips the batch. The Triton
    router's argmax passed over the NaN scores: it picked a padding column of the expert tile (an id E or
    above, for an expert count that is not a power of two), which moe_experts refuses (a device-side
    assert on CUDA, killing the run), and under the interpreter it raised on the all-NaN row."""
    logits = torch.randn(5, n_exp, device=device)
    logits[1, 2] = float("nan")
    logits[3, 0] = float("inf")
    for k in (1, 2):
        _, w, idx = impl.moe_route(logits, k, True)
        _, w_aux, idx_aux, _ = impl.moe_route_with_counts(logits, k, True, group_size=5)
        for weights, ids in ((w, idx), (w_aux, idx_aux)):
            assert ((ids >= 0) & (ids < n_exp)).all(), ids
            # the NaN rows take the lowest experts, in order, as the reference's stable sort does
            assert torch.equal(ids[[1, 3]].cpu(), torch.tensor([list(range(k))] * 2))
            assert weights[[1, 3]].isnan().all() and torch.isfinite(weights[[0, 2, 4]]).all()
        torch.testing.assert_close(w[[0, 2, 4]], reference.moe_route(logits, k, True)[1][[0, 2, 4]])
        assert torch.equal(idx.cpu(), reference.moe_route(logits, k, True)[2].cpu())
        out = impl.moe_experts(torch.randn(5, 16, device=device), idx, w, *make_weights(n_exp, 16, 24, device))
        assert out[[1, 3]].isnan().all() and torch.isfinite(out[[0, 2, 4]]).all()


# ----------------------------------------------------------------------------------------------
# full sizes (CUDA only)
# ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("gemm", ["triton", "torch"])
@pytest.mark.parametrize("n,hidden,inter,n_exp,k", [(8192, 640, 1728, 4, 2), (4096, 2048, 4096, 8, 2)])
def test_experts_large_bf16(n, hidden, inter, n_exp, k, gemm, device):
    experts = moe.moe_experts if gemm == "triton" else moe.moe_experts_grouped_mm
    check_experts(n, hidden, inter, n_exp, k, "random", device, torch.bfloat16, experts)


@pytest.mark.gpu
def test_experts_large_fp32(device):
    check_experts(4096, 640, 1728, 4, 2, "one", device, torch.float32)


def naive_aux(logits, k, norm, group, alpha):
    """MiniMind2's load-balancing loss by its definition, in float64 (the weights as the reference's)."""
    probs = logits.double().softmax(-1)
    n, n_exp = probs.shape
    rows = group or n
    chosen = probs.topk(k, dim=-1).indices
    total = 0.0
    for g in range(n // rows):
        picks = torch.bincount(chosen[g * rows:(g + 1) * rows].reshape(-1), minlength=n_exp).double()
        total = total + (picks / (rows * k) * n_exp * probs[g * rows:(g + 1) * rows].mean(0)).sum()
    return alpha * total / (n // rows)


@pytest.mark.parametrize("impl", [moe, reference], ids=["triton", "reference"])
@pytest.mark.parametrize("n,n_exp,k,group", [(60, 8, 2, 20), (60, 8, 2, None), (48, 4, 1, 16), (7, 6, 3, 7),
                                             (70, 128, 2, 35)])
@pytest.mark.parametrize("use_weight", [True, False], ids=["weights-and-aux", "aux-only"])
def test_route_aux_loss_and_gradients(impl, n, n_exp, k, group, use_weight, device):
    """The aux loss against its definition in float64, and the logits' gradient (through the top-k
    weights and the aux loss together, or the aux loss alone) against the reference's autograd."""
    logits = torch.randn(n, n_exp, device=device, dtype=torch.float64).float()
    w_grad = torch.randn(n, k, device=device)
    weight, idx, aux = impl.moe_route_aux(logits.requires_grad_(), k, True, group, 0.1)
    _, w2, i2 = reference.moe_route(logits, k, True)
    assert torch.equal(idx, i2) and torch.allclose(weight, w2, atol=1e-6)
    assert aux.shape == () and aux.dtype == torch.float32
    torch.testing.assert_close(aux.double().cpu(), naive_aux(logits.detach().cpu(), k, True, group, 0.1),
                               rtol=1e-5, atol=1e-8)
    loss = 3.0 * aux + ((weight * w_grad).sum() if use_weight else 0.0)
    (got,) = torch.autograd.grad(loss, logits)
    ref_w, _, ref_aux = reference.moe_route_aux(logits, k, True, group, 0.1)
    ref_loss = 3.0 * ref_aux + ((ref_w * w_grad).sum() if use_weight else 0.0)
    (want,) = torch.autograd.grad(ref_loss, logits)
    assert want.abs().max() > 0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("impl", [moe, reference], ids=["triton", "reference"])
@pytest.mark.parametrize("group", [None, 4])
def test_route_aux_of_no_rows_is_zero(impl, group, device):
    """An empty batch: the reference's mean router probability over no rows was NaN, which poisoned the
    loss it is added to; the Triton kernel gave 0. Both give 0 now, and an empty logits gradient."""
    logits = torch.randn(0, 4, device=device, requires_grad=True)
    weight, idx, aux = impl.moe_route_aux(logits, 2, True, group, 0.1)
    assert weight.shape == idx.shape == (0, 2) and aux.item() == 0.0
    aux.backward()
    assert logits.grad.shape == (0, 4)


@pytest.mark.parametrize("impl", [moe, reference], ids=["triton", "reference"])
def test_route_aux_rejects_uneven_groups(impl, device):
    with pytest.raises(ValueError, match="groups of 7"):
        impl.moe_route_aux(torch.randn(20, 4, device=device), 2, True, 7, 0.1)


@pytest.mark.parametrize("impl", [moe, reference], ids=["triton", "reference"])
@pytest.mark.parametrize("top_k", [0, 5])
def test_route_rejects_a_top_k_outside_the_experts(impl, top_k, device):
    """The reference's sort gave fewer than k picks for k > E (or none for k = 0) without a word, and its aux
    loss then divided by k picks per row that were not there; both routers name the bad k instead."""
    logits = torch.randn(6, 4, device=device)
    for call in (lambda: impl.moe_route(logits, top_k, True),
                 lambda: impl.moe_route_with_counts(logits, top_k, True, 3),
                 lambda: impl.moe_route_aux(logits, top_k, True, 3, 0.1)):
        with pytest.raises(ValueError, match=f"top_k={top_k} must be between 1 and the 4 experts"):
            call()


# ----------------------------------------------------------------------------------------------
# the custom-op forms used under torch.compile
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("group_size", [None, 5])
def test_route_custom_op_passes_opcheck(group_size, device):
    """Schema, fake (meta) implementation and autograd registration agree with the real op."""
    logits = torch.randn(12, 6, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.minimind_fast.moe_route.default, (logits, 2, True, group_size),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.parametrize("group_size", [None, 4])
def test_route_aux_custom_op_passes_opcheck(group_size, device):
    logits = torch.randn(12, 6, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.minimind_fast.moe_route_aux.default, (logits, 2, True, group_size, 0.1),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.parametrize("kind", ["random", "empty"])
def test_experts_custom_op_passes_opcheck(kind, device):
    idx, w = make_routing(10, 4, 2, kind, device)
    x = torch.randn(10, 32, device=device, requires_grad=True)
    wg, wu, wd = (t.requires_grad_() for t in make_weights(4, 32, 24, device))
    torch.library.opcheck(torch.ops.minimind_fast.moe_experts.default, (x, idx, w.requires_grad_(), wg, wu, wd),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_experts_custom_ops_of_transposed_inputs_pass_opcheck(device):
    """The fakes gave the output (and the backward's dx and weight gradients) the inputs' transposed
    layouts, while the kernels write contiguous tensors."""
    idx, w = make_routing(10, 4, 2, "random", device)
    x = torch.randn(32, 10, device=device).t().requires_grad_()
    wg, wu, wd = (t.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
                  for t in make_weights(4, 32, 24, device))
    args = (x, idx, w.requires_grad_(), wg, wu, wd)
    torch.library.opcheck(torch.ops.minimind_fast.moe_experts.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    saved = torch.ops.minimind_fast.moe_experts(*args)[1:]
    torch.library.opcheck(torch.ops.minimind_fast.moe_experts_backward.default,
                          (torch.randn(10, 32, device=device), x.detach(), w.detach(), wg.detach(), wu.detach(),
                           wd.detach(), *saved), test_utils=("test_schema", "test_faketensor"))


def test_sort_custom_op_passes_opcheck(device):
    idx, _ = make_routing(40, 8, 2, "empty", device)
    torch.library.opcheck(torch.ops.minimind_fast.moe_sort.default, (idx, 8),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("gemm", ["triton", "torch"])
def test_experts_compile_as_one_graph(gemm, device):
    """fullgraph=True: both expert paths trace without a graph break (ours as custom ops; torch's grouped
    GEMM with the sort as one), values and gradients as in eager. bf16, the dtype torch's path takes."""
    idx, w = make_routing(24, 4, 2, "empty", device)
    x = torch.randn(24, 32, device=device, dtype=torch.bfloat16)
    weights = [t.to(torch.bfloat16) for t in make_weights(4, 32, 48, device)]

    def layer(x, w, wg, wu, wd):
        return moe.moe_experts(x, idx, w, wg, wu, wd, gemm=gemm)

    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    results = []
    for fn in (layer, compiled):
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, *weights)]
        out = fn(*leaves)
        out.float().pow(2).sum().backward()
        results.append([out.detach()] + [t.grad for t in leaves])
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)
