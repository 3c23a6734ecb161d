"""What the device can do at best: copy bandwidth and matmul rate, measured, plus the datasheet peak.

Every kernel's bandwidth and every step's FLOP rate in the suite is reported as a fraction of these,
so a reader sees how far each one is from the hardware limit. Run alone: `python benchmarks/hardware.py`.
"""

from __future__ import annotations

import json
import time
from typing import Any

import torch

try:
    from minimind_fast.training.flops import datasheet_peak
except ImportError:  # the suite still measures without the training package
    def datasheet_peak(name: str) -> float | None:
        return None


def _median_ms(fn, cuda: bool, reps: int) -> float:
    if cuda:
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=200, return_mode="median"))
    fn()
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    samples.sort()
    return samples[len(samples) // 2]


def copy_bandwidth_gbps(device: torch.device, nbytes: int | None = None) -> float:
    """Device-to-device copy rate in GB/s, counting the read and the write (2 * size per copy)."""
    cuda = device.type == "cuda"
    nbytes = nbytes or (2 << 30 if cuda else 128 << 20)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src), cuda, reps=5)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int | None = None) -> float:
    """Square matmul rate in TFLOP/s (TF32 left off for fp32, so fp32 means fp32)."""
    cuda = device.type == "cuda"
    n = n or (8192 if cuda else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = _median_ms(lambda: a @ b, cuda, reps=3)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def datasheet_peak_bf16_tflops(name: str) -> float | None:
    flops = datasheet_peak(name)
    return None if flops is None else flops / 1e12


def measure_hardware(device: torch.device) -> dict[str, Any]:
    """copy_GBps, bf16_tflops, fp32_tflops (measured) and peak_bf16_tflops (datasheet, None if unknown)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        result = {
            "copy_GBps": copy_bandwidth_gbps(device),
            "bf16_tflops": matmul_tflops(device, torch.bfloat16),
            "fp32_tflops": matmul_tflops(device, torch.float32),
            "peak_bf16_tflops": datasheet_peak_bf16_tflops(name),
        }
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


if __name__ == "__main__":
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(json.dumps(measure_hardware(dev), indent=1))
