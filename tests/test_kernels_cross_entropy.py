"""Fused linear + cross-entropy (Triton) against `reference.linear_cross_entropy`.

Loss, grad_hidden and grad_weight are compared with the reference in float64 (tight in fp32; in
bf16 at most 2x the error of the reference run in bf16, plus a small floor). Shapes with more rows
than one chunk check that chunking changes nothing; ignored targets, an all-ignored batch, a scaled
upstream gradient and bad targets are covered too.
"""

from __future__ import annotations

import os

import pytest
import torch
from minimind_fast.kernels import cross_entropy as ce
from minimind_fast.kernels import reference as ref

HAS_CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(
    not (HAS_CUDA or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="Triton kernels need a CUDA GPU, or TRITON_INTERPRET=1 to run on CPU (`make test` sets it)",
)

# (tokens, hidden, vocab); the interpreter's chunk is 64 rows, so 130 and 200 rows span several chunks.
SHAPES = [(1, 8, 50), (37, 48, 300), (130, 64, 1000), (200, 32, 97)]
if HAS_CUDA:
    SHAPES += [(4096, 512, 6400), (8192, 768, 32000), (1000, 96, 151936)]


def make_inputs(n, h, v, dtype, device, ignore_every=3):
    torch.manual_seed(n + h + v)
    hidden = torch.randn(n, h, device=device).to(dtype)
    weight = (torch.randn(v, h, device=device) / h**0.5).to(dtype)
    targets = torch.randint(0, v, (n,), device=device)
    if ignore_every:
        targets[::ignore_every] = -100
    return hidden, weight, targets


def loss_and_grads(fn, hidden, weight, targets, upstream=1.0):
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    loss = fn(h, w, targets)
    (loss * upstream).backward()
    return loss.detach(), h.grad, w.grad


def check(kernel, low_ref, exact, name):
    """Error vs float64 <= 2x the reference's own error in the same dtype + a floor scaled by the dtype.

    The loss is fp32 whatever the input dtype; with bf16 inputs it inherits the bf16 logits' error,
    which the reference's own error (the 2x term) accounts for.
    """
    for t, who in ((kernel, "kernel"), (low_ref, "reference"), (exact, "float64 reference")):
        assert torch.isfinite(t).all(), f"{name}: NaN/Inf in the {who}"  # an Inf there made the bound infinite
    assert kernel.dtype == low_ref.dtype, f"{name}: dtype {kernel.dtype}, reference gives {low_ref.dtype}"
    scale = exact.abs().max().item() or 1.0
    err = (kernel.double() - exact).abs().max().item()
    ref_err = (low_ref.double() - exact).abs().max().item()
    # low precision: one unit in the last place of the dtype at the largest magnitude (it was 1e-2 for both,
    # 20 ulps in fp16)
    floor = {torch.float32: 2e-5, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[kernel.dtype] * scale
    assert err <= 2 * ref_err + floor, f"{name}: error {err:.3e} vs reference's own {ref_err:.3e} (scale {scale:.2e})"


@pytest.mark.parametrize("where", ["kernel", "reference", "float64"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_comparison_never_passes_nan_or_inf(where, bad):
    exact = torch.randn(6, 5, dtype=torch.float64)
    tensors = {"kernel": exact.float(), "reference": exact.float(), "float64": exact.clone()}
    tensors[where][2, 1] = bad
    with pytest.raises(AssertionError, match="NaN/Inf"):
        check(tensors["kernel"], tensors["reference"], tensors["float64"], "probe")
    check(exact.float(), exact.float(), exact, "clean")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(device, shape, dtype):
    hidden, weight, targets = make_inputs(*shape, dtype, device)
    got = loss_and_grads(ce.linear_cross_entropy, hidden, weight, targets)
    low = loss_and_grads(ref.linear_cross_entropy, hidden, weight, targets)
    exact = loss_and_grads(ref.linear_cross_entropy, hidden.double(), weight.double(), targets)
    for name, k, r, x in zip(("loss", "hidden", "weight"), got, low, exact, strict=True):
        check(k, r, x, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_contiguous_inputs(device, dtype):
    """hidden as a transposed view and a column slice, weight transposed, targets strided: the values and
    both gradients as the reference's (the gradients keep their inputs' shapes)."""
    hidden, weight, targets = make_inputs(37, 48, 300, dtype, device)
    cases = [(hidden.t().contiguous().t(), weight.t().contiguous().t(), targets),
             (torch.cat([hidden, hidden], 1)[:, 5:53], weight, torch.stack([targets, targets], 1)[:, 1])]
    for h, w, t in cases:
        assert not (h.is_contiguous() and w.is_contiguous() and t.is_contiguous())
        got = loss_and_grads(ce.linear_cross_entropy, h, w, t)
        low = loss_and_grads(ref.linear_cross_entropy, h, w, t)
        exact = loss_and_grads(ref.linear_cross_entropy, h.double(), w.double(), t)
        for name, k, r, x in zip(("loss", "hidden", "weight"), got, low, exact, strict=True):
            check(k, r, x, name)


def test_fp32_tight(device):
    hidden, weight, targets = make_inputs(130, 64, 1000, torch.float32, device)
    got = loss_and_grads(ce.linear_cross_entropy, hidden, weight, targets)
    want = loss_and_grads(ref.linear_cross_entropy, hidden, weight, targets)
    for k, r in zip(got, want):
        torch.testing.assert_close(k, r, rtol=1e-5, atol=1e-6)


def test_upstream_gradient_scales(device):
    hidden, weight, targets = make_inputs(37, 48, 300, torch.float32, device)
    got = loss_and_grads(ce.linear_cross_entropy, hidden, weight, targets, upstream=3.5)
    want = loss_and_grads(ref.linear_cross_entropy, hidden, weight, targets, upstream=3.5)
    for k, r in zip(got, want):
        torch.testing.assert_close(k, r, rtol=1e-5, atol=1e-6)


def test_all_ignored_gives_zero_loss_and_gradients(device):
    hidden, weight, targets = make_inputs(20, 16, 64, torch.float32, device)
    targets.fill_(-100)
    loss, gh, gw = loss_and_grads(ce.linear_cross_entropy, hidden, weight, targets)
    assert loss.item() == 0.0 and loss.dtype == torch.float32
    assert torch.count_nonzero(gh) == 0 and torch.count_nonzero(gw) == 0


def test_custom_ignore_index(device):
    hidden, weight, targets = make_inputs(37, 48, 300, torch.float32, device, ignore_every=0)
    targets[::4] = 7  # a real token id used as the ignore marker
    fn_k = lambda h, w, t: ce.linear_cross_entropy(h, w, t, ignore_index=7)
    fn_r = lambda h, w, t: ref.linear_cross_entropy(h, w, t, ignore_index=7)
    for k, r in zip(loss_and_grads(fn_k, hidden, weight, targets), loss_and_grads(fn_r, hidden, weight, targets)):
        torch.testing.assert_close(k, r, rtol=1e-5, atol=1e-6)


def test_one_input_needs_grad(device):
    """Frozen output head (or frozen hidden): only the needed gradient is produced, and it is right."""
    hidden, weight, targets = make_inputs(37, 48, 300, torch.float32, device)
    h = hidden.clone().requires_grad_(True)
    ce.linear_cross_entropy(h, weight, targets).backward()
    h_ref = hidden.clone().requires_grad_(True)
    ref.linear_cross_entropy(h_ref, weight, targets).backward()
    torch.testing.assert_close(h.grad, h_ref.grad, rtol=1e-5, atol=1e-6)
    w = weight.clone().requires_grad_(True)
    ce.linear_cross_entropy(hidden, w, targets).backward()
    w_ref = weight.clone().requires_grad_(True)
    ref.linear_cross_entropy(hidden, w_ref, targets).backward()
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-5, atol=1e-6)


def test_no_grad_loss(device):
    hidden, weight, targets = make_inputs(130, 64, 1000, torch.bfloat16, device)
    with torch.no_grad():
        got = ce.linear_cross_entropy(hidden, weight, targets)
    want = ref.linear_cross_entropy(hidden.double(), weight.double(), targets)
    assert got.dtype == torch.float32
    low = ref.linear_cross_entropy(hidden, weight, targets)
    assert abs(got.item() - want.item()) <= 2 * abs(low.item() - want.item()) + 1e-3


def test_extreme_logits_stay_finite(device):
    """Logits in the thousands: the online softmax must not overflow. Against float64, with an absolute
    tolerance scaled to each result (hidden x300 makes weight gradients of order 100, whose fp32 sums
    over chunks round in the 1e-4s)."""
    hidden, weight, targets = make_inputs(37, 48, 300, torch.float32, device)
    hidden = hidden * 300.0
    got = loss_and_grads(ce.linear_cross_entropy, hidden, weight, targets)
    want = loss_and_grads(ref.linear_cross_entropy, hidden.double(), weight.double(), targets)
    for k, r in zip(got, want):
        assert torch.isfinite(k).all()
        torch.testing.assert_close(k, r.to(k.dtype), rtol=1e-4, atol=1e-5 * max(1.0, r.abs().max().item()))


@pytest.mark.parametrize("bad", [300, -5])
def test_bad_target_is_named(device, bad):
    if device.type == "cuda":
        pytest.skip("on CUDA a bad target trips a device-side assert (no host sync per step), which "
                    "poisons the process's CUDA context; the named error is the CPU path's")
    hidden, weight, targets = make_inputs(37, 48, 300, torch.float32, device)
    targets[11] = bad
    with pytest.raises(ValueError, match=f"target {bad} at row 11"):
        ce.linear_cross_entropy(hidden.requires_grad_(True), weight, targets)


def test_shape_mismatch_is_reported(device):
    hidden, weight, targets = make_inputs(37, 48, 300, torch.float32, device)
    with pytest.raises(ValueError, match="must be"):
        ce.linear_cross_entropy(hidden, weight, targets[:-1])
    # (B, T, H) hidden states not flattened: named, not "too many values to unpack"
    with pytest.raises(ValueError, match=r"hidden \(1, 37, 48\), weight \(300, 48\) .* must be \(N, H\)"):
        ce.linear_cross_entropy(hidden[None], weight, targets)
    with pytest.raises(ValueError, match=r"weight \(300,\) .* must be"):
        ce.linear_cross_entropy(hidden, weight[:, 0], targets)


def test_custom_op_registration_passes_opcheck(device):
    """Fake (meta) implementation, schema and autograd registration agree with the real op."""
    hidden, weight, targets = make_inputs(37, 48, 300, torch.float32, device)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    torch.library.opcheck(torch.ops.minimind_fast.linear_cross_entropy.default,
                          (hidden, weight, targets, -100, True, True),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    _, grad_hidden, grad_weight, inv_n_valid = torch.ops.minimind_fast.linear_cross_entropy(
        hidden, weight, targets, -100, True, True)
    torch.library.opcheck(torch.ops.minimind_fast.linear_cross_entropy_backward.default,
                          (torch.tensor(2.0, device=device), grad_hidden, grad_weight, inv_n_valid, torch.bfloat16),
                          test_utils=("test_schema", "test_faketensor"))


def test_custom_op_of_transposed_hidden_passes_opcheck(device):
    """The fake grad_hidden kept a transposed hidden's layout, the real one is contiguous."""
    hidden, weight, targets = make_inputs(37, 48, 300, torch.float32, device)
    hidden = hidden.t().contiguous().t().requires_grad_(True)
    torch.library.opcheck(torch.ops.minimind_fast.linear_cross_entropy.default,
                          (hidden, weight.requires_grad_(True), targets, -100, True, True),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_torch_compile_traces_the_fused_loss(device):
    """torch.compile keeps the op as one graph node (the host sync inside used to break tracing):
    compiled loss and gradients equal eager ones."""
    hidden, weight, targets = make_inputs(130, 64, 1000, torch.float32, device)

    def step(h, w, t):
        return ce.linear_cross_entropy(h * 2.0, w, t) * 3.0

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    got = loss_and_grads(compiled, hidden, weight, targets)
    want = loss_and_grads(step, hidden, weight, targets)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_fp16_gradients_survive_many_tokens(device):
    """fp16 training: with thousands of tokens, (softmax - onehot) / n_valid falls below fp16's normal
    range; the gradients must be carried unscaled and divided by n_valid only in fp32, or they
    underflow before DeepSpeed's loss scale (the upstream gradient) can lift them."""
    hidden, weight, targets = make_inputs(4096, 32, 512, torch.float16, device, ignore_every=0)
    got = loss_and_grads(ce.linear_cross_entropy, hidden, weight, targets, upstream=65536.0)
    low = loss_and_grads(ref.linear_cross_entropy, hidden, weight, targets, upstream=65536.0)
    exact = loss_and_grads(ref.linear_cross_entropy, hidden.double(), weight.double(), targets, upstream=65536.0)
    for name, k, r, x in zip(("loss", "hidden", "weight"), got, low, exact):
        check(k, r, x, name)
    for name, k, r, x in zip(("hidden", "weight"), got[1:], low[1:], exact[1:]):
        err, ref_err = (((t.double() - x).norm() / x.norm()).item() for t in (k, r))
        assert err <= 2 * ref_err + 2e-4, f"grad_{name}: relative error {err:.2e}, reference's own {ref_err:.2e}"


def test_only_the_gemms_are_torch_ops(device):
    """Beside its GEMMs the fused loss launches only Triton kernels, forward and backward: the mean over
    valid targets, the target check and backward's scale-and-cast are not a dozen small torch ops, each
    a launch from the host on a GPU (fp32 here, so that no cast is expected either). A dispatch mode
    does not see inside a custom op, so the op's implementation is called directly."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        seen: Counter = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Ops.seen[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    hidden, weight, targets = make_inputs(130, 64, 1000, torch.float32, device)
    grad_loss = torch.tensor(2.0, device=device)
    with Ops():
        _, grad_hidden, grad_weight, inv_n_valid = ce._fused_forward(hidden, weight, targets, -100, True, True)
        for grad in (grad_hidden, grad_weight):
            ce._scaled(grad, grad.dtype, grad_loss, inv_n_valid)
    views_and_allocations = {"empty", "empty_like", "new_empty", "empty_strided", "view", "t", "slice", "detach"}
    host_check = {"_local_scalar_dense"} if device.type == "cpu" else {"_assert_async"}
    interpreter_memory = {"set_", "copy_"} if device.type == "cpu" else set()
    launched = set(Ops.seen) - views_and_allocations - host_check - interpreter_memory
    assert launched <= {"mm", "addmm_", "add_"}, Ops.seen
    chunks = -(-130 // ce._chunk_rows(130, 64, 1000))  # 3 of the interpreter's 64 rows; more on a GPU
    assert Ops.seen["mm"] + Ops.seen["addmm_"] == 3 * chunks  # logits, grad_hidden, grad_weight per chunk
