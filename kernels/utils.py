"""Shared helpers for the Triton kernels: interpreter detection, launch sizes, input preparation.

Everything here runs on the host before each launch, a hundred times per training step, so it stays
plain Python: Triton's own `triton.cdiv` and `triton.next_power_of_2` are constexpr functions whose
host call costs about as much as a small kernel's launch.
"""

from __future__ import annotations

import functools
import os

import torch

# Triton reads this once too: `@triton.jit` picks the interpreter when the kernel is defined.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def is_interpreter() -> bool:
    """True when Triton runs kernels through its CPU interpreter (`TRITON_INTERPRET=1`)."""
    return _INTERPRET


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(n - 1, 0).bit_length()


def check_device(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if not t.is_cuda and not is_interpreter():
            raise RuntimeError("Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU testing); "
                               "use kernels='reference' on this device")


def row_block(n_cols: int) -> tuple[int, int]:
    """Block size (a power of two covering the row) and warps for a one-row-per-program kernel."""
    block = next_power_of_2(n_cols)
    if block > 65536:
        raise ValueError(f"row of {n_cols} elements is larger than the 65536 this kernel handles")
    # Wide rows (hidden 32k) keep a whole row in registers: 32 warps keep that under the spill limit.
    warps = 4 if block <= 2048 else 8 if block <= 8192 else 16 if block <= 16384 else 32
    return block, warps


def rows_per_tile(n_rows: int, block: int) -> int:
    """Rows per 2-D tile (a power of two) for row-wise kernels: enough that a tile holds ~4K elements
    on a GPU when rows are short; under the interpreter, whose cost is per program and per op rather
    than per element, as many as ~64K elements so that few programs run."""
    budget = 65536 if is_interpreter() else 4096
    return max(1, min(next_power_of_2(n_rows), budget // block))


def num_programs(n_rows: int) -> int:
    """Programs for a persistent-style grid: a few per multiprocessor, never more than rows."""
    if is_interpreter() or not torch.cuda.is_available():
        return max(1, min(n_rows, 4))
    return max(1, min(n_rows, 4 * _multiprocessors(torch.cuda.current_device())))


@functools.cache
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count
