"""The op table: the one place where the decoder's elementwise, norm, MoE and loss ops are chosen.

The model calls `ops.rms_norm(...)` etc. and never imports a kernel directly. Three tables exist:

- ``reference``: plain PyTorch (`minimind_fast.kernels.reference`), runs anywhere.
- ``triton``: the Triton kernels (`minimind_fast.kernels`); on CPU tensors they run only under
  Triton's interpreter (``TRITON_INTERPRET=1``), which is how the tests exercise them.
- ``auto`` (default): per call, Triton for CUDA tensors when Triton is importable, reference otherwise.

The choice comes from `ModelConfig.kernels`; the environment variable ``MINIMIND_KERNELS``
(auto|triton|reference) overrides it, so a run can be switched without editing a config.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass

from minimind_fast.kernels import reference

OP_NAMES = (
    "rms_norm",
    "add_rms_norm",
    "apply_rotary",
    "swiglu",
    "swiglu_packed",
    "moe_route",
    "moe_route_aux",
    "moe_experts",
    "linear_cross_entropy",
)
ENV_VAR = "MINIMIND_KERNELS"


@dataclass(frozen=True)
class OpTable:
    name: str
    rms_norm: Callable
    add_rms_norm: Callable
    apply_rotary: Callable
    swiglu: Callable
    swiglu_packed: Callable
    moe_route: Callable
    moe_route_aux: Callable
    moe_experts: Callable
    linear_cross_entropy: Callable


REFERENCE = OpTable("reference", **{n: getattr(reference, n) for n in OP_NAMES})


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _triton_impls() -> dict[str, Callable]:
    """The Triton implementations the kernels package provides (any op it lacks stays reference)."""
    from minimind_fast import kernels

    provided = kernels.triton_ops() if hasattr(kernels, "triton_ops") else {}
    return {n: provided.get(n, getattr(reference, n)) for n in OP_NAMES}


def _by_device(name: str) -> Callable:
    ref = getattr(reference, name)

    def op(first, *args, **kwargs):
        if first.is_cuda and triton_available():
            return _triton_impls()[name](first, *args, **kwargs)
        return ref(first, *args, **kwargs)

    op.__name__ = f"auto_{name}"
    return op


def resolve_mode(mode: str | None = None) -> str:
    """The op table's name: MINIMIND_KERNELS when set, else `mode` (the config's `kernels`), else auto."""
    source, chosen = (ENV_VAR, os.environ[ENV_VAR]) if os.environ.get(ENV_VAR) else ("kernels", mode or "auto")
    if chosen not in ("auto", "triton", "reference"):
        raise ValueError(f"{source}={chosen!r} must be auto, triton or reference")
    return chosen


def check_kernels(mode: str | None, device_type: str) -> None:
    """Refuse Triton kernels (asked for by `mode` or the environment) where they cannot run, before a model
    is built: otherwise the first forward fails with a traceback from inside the kernel wrappers."""
    if resolve_mode(mode) != "triton":
        return
    asked = f"{ENV_VAR}=triton" if os.environ.get(ENV_VAR) else "--kernels triton"
    if not triton_available():
        raise ValueError(f"{asked}: triton is not installed; use auto or reference")
    from minimind_fast.kernels.utils import is_interpreter

    if device_type != "cuda" and not is_interpreter():
        raise ValueError(f"{asked}: Triton kernels need a CUDA device (TRITON_INTERPRET=1 runs them on the CPU, "
                         f"for testing); use auto or reference on {device_type}")


def get_ops(mode: str | None = None) -> OpTable:
    """The op table for `mode` (auto|triton|reference), after the environment override."""
    mode = resolve_mode(mode)
    if mode == "reference":
        return REFERENCE
    if mode == "triton":
        if not triton_available():
            raise RuntimeError("kernels='triton' was asked for but triton is not installed")
        return OpTable("triton", **_triton_impls())
    return OpTable("auto", **{n: _by_device(n) for n in OP_NAMES})
