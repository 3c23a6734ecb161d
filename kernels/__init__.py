"""Triton kernels for the MiniMind decoder, installed as `minimind_fast.kernels`.

One file per op (forward kernel, backward kernel, `autograd.Function`, module wrapper), each matching
the signature of its plain-PyTorch twin in `reference.py`. This folder must stay importable under any
name (a checkout's root on sys.path makes it visible as a top-level `kernels`, which `transformers`
probes for an unrelated PyPI package), so it imports only relatively and loads Triton lazily.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable

# op-table name -> (module in this package, function name)
TRITON_OPS = {
    "rms_norm": ("rmsnorm", "rms_norm"),
    "add_rms_norm": ("rmsnorm", "add_rms_norm"),
    "apply_rotary": ("rope", "apply_rotary"),
    "swiglu": ("swiglu", "swiglu"),
    "swiglu_packed": ("swiglu", "swiglu_packed"),
    "moe_route": ("moe", "moe_route"),
    "moe_route_aux": ("moe", "moe_route_aux"),
    "moe_experts": ("moe", "moe_experts"),
    "linear_cross_entropy": ("cross_entropy", "linear_cross_entropy"),
}


def triton_ops() -> dict[str, Callable]:
    """The Triton implementations present in this package (op-table name -> function)."""
    ops: dict[str, Callable] = {}
    for name, (module, attr) in TRITON_OPS.items():
        if importlib.util.find_spec(f".{module}", __name__) is None:
            continue
        ops[name] = getattr(importlib.import_module(f".{module}", __name__), attr)
    return ops
