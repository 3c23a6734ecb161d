"""Shared helpers for the Triton kernels: interpreter detection, launch sizes, input preparation."""

from __future__ import annotations

import os

import torch
import triton


def is_interpreter() -> bool:
    """True when Triton runs kernels through its CPU interpreter (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_device(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if not t.is_cuda and not is_interpreter():
            raise RuntimeError("Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU testing); "
                               "use kernels='reference' on this device")


def row_block(n_cols: int) -> tuple[int, int]:
    """Block size (a power of two covering the row) and warps for a one-row-per-program kernel."""
    block = triton.next_power_of_2(n_cols)
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
    return max(1, min(triton.next_power_of_2(max(1, n_rows)), budget // block))


def num_programs(n_rows: int) -> int:
    """Programs for a persistent-style grid: a few per multiprocessor, never more than rows."""
    if is_interpreter() or not torch.cuda.is_available():
        return max(1, min(n_rows, 4))
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    return max(1, min(n_rows, 4 * sms))
