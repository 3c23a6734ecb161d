"""The host-side launch-size helpers of the kernels, against Triton's own definitions."""

from __future__ import annotations

import pytest
import torch
import triton
from minimind_fast.kernels import utils


def test_cdiv_and_next_power_of_2_agree_with_triton():
    # Ours are plain Python because Triton's are constexpr functions, slow to call from the host.
    for n in [1, 2, 3, 4, 5, 63, 64, 65, 511, 512, 513, 6400, 2**20 - 1, 2**20, 2**31 + 5]:
        assert utils.next_power_of_2(n) == triton.next_power_of_2(n), n
        for d in (1, 3, 16, 64, 4096):
            assert utils.cdiv(n, d) == triton.cdiv(n, d), (n, d)
    assert utils.next_power_of_2(0) == 1 and utils.cdiv(0, 7) == 0


def _public_calls() -> dict:
    from minimind_fast.kernels import cross_entropy, moe, rmsnorm, rope, swiglu

    x, idx, weight = torch.randn(3, 8), torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1)
    experts = (torch.randn(2, 4, 8), torch.randn(2, 4, 8), torch.randn(2, 8, 4))
    return {
        "rms_norm": lambda: rmsnorm.rms_norm(x, torch.ones(8), 1e-6),
        "add_rms_norm": lambda: rmsnorm.add_rms_norm(x, x, torch.ones(8), 1e-6),
        "apply_rotary": lambda: rope.apply_rotary(torch.randn(1, 3, 2, 8), torch.randn(1, 3, 1, 8),
                                                  torch.ones(3, 8), torch.zeros(3, 8)),
        "swiglu": lambda: swiglu.swiglu(x, x),
        "swiglu_packed": lambda: swiglu.swiglu_packed(x),
        "linear_cross_entropy": lambda: cross_entropy.linear_cross_entropy(x, torch.randn(5, 8), idx[:, 0]),
        "moe_route": lambda: moe.moe_route(x[:, :4], 2, True),
        "moe_route_aux": lambda: moe.moe_route_aux(x[:, :4], 2, True, None, 0.1),
        "moe_route_with_counts": lambda: moe.moe_route_with_counts(x[:, :4], 2, True),
        "moe_experts": lambda: moe.moe_experts(x, idx, weight, *experts),
        "moe_experts_grouped_mm": lambda: moe.moe_experts_grouped_mm(x, idx, weight, *experts),
        "sort_by_expert": lambda: moe.sort_by_expert(idx, 2),
        "moe_dispatch_stats": lambda: moe.moe_dispatch_stats(idx, 2),
    }


@pytest.mark.parametrize("name", list(_public_calls()))
def test_cpu_tensors_without_the_interpreter_are_refused(monkeypatch, name):
    """Every public kernel entry point names the problem before launching on a CPU tensor outside the
    interpreter (the sort, and the stats and grouped-GEMM path through it, launched straight away)."""
    monkeypatch.setattr(utils, "_INTERPRET", False)
    with pytest.raises(RuntimeError, match="Triton kernels need CUDA tensors"):
        _public_calls()[name]()
