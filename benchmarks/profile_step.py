"""Where a training step's time goes on CUDA: host launch overhead against GPU time, per op and per step.

    python benchmarks/profile_step.py [--preset small-26m] [--batch 32] [--seq 512] [--kernels triton]

`--device cpu --tiny` (with `TRITON_INTERPRET=1` for `--kernels triton`) runs every line of it on the CPU
with the preset shrunk to one narrow layer, to check the script before a GPU is spent on it; its times
mean nothing.

Prints, for one configuration:
- the host cost of one launch: an empty Triton kernel, a torch elementwise op, and each of our ops'
  forward+backward at a tiny shape (where the GPU work is negligible, so the time is the host's);
- for the training step (`common.training_step`, as `bench_model.py` times it):
  the wall time per step with a sync, the host time to enqueue one step without a sync (if it is close
  to the wall time, the step is launch-bound and the GPU waits on Python), and torch.profiler's top
  ops by GPU and by host time.
A diagnostic, not a benchmark: nothing is written to `benchmarks/results/`.
"""

from __future__ import annotations

import argparse
import time

import torch
import triton
from common import forward_backward, training_step
from minimind_fast.kernels import reference, triton_ops

from minimind_fast.config import get_preset
from minimind_fast.model import MiniMindForCausalLM


@triton.jit
def _empty(X):
    pass


def sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def host_us(fn, device: str, n: int = 300) -> float:
    """Microseconds of host time per call with the GPU kept ahead: no sync inside the loop."""
    for _ in range(min(n, 20)):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - start) / n * 1e6
    sync(device)
    return host


# --tiny: the preset's architecture (dense or MoE, its expert counts) at a size Triton's interpreter runs
TINY = dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
            intermediate_size=128)


def launch_costs(device: str, n: int, tiny: bool = False) -> None:
    x = torch.zeros(1024, device=device)
    print(f"empty Triton kernel launch   {host_us(lambda: _empty[(1,)](x), device, n):8.1f} us")
    print(f"torch.add                    {host_us(lambda: torch.add(x, x), device, n):8.1f} us")
    ops = triton_ops()
    t, h, i = (8, 64, 128) if tiny else (64, 512, 1408)

    def fwd_bwd(fn, *shapes):
        inputs = [torch.randn(s, device=device, dtype=torch.bfloat16, requires_grad=True) for s in shapes]
        return forward_backward(fn, inputs, [torch.ones(shapes[0], device=device, dtype=torch.bfloat16)])

    w = torch.ones(h, device=device, dtype=torch.bfloat16, requires_grad=True)
    cases = {
        "swiglu": lambda impl: fwd_bwd(impl, (t, i), (t, i)),
        "rms_norm": lambda impl: fwd_bwd(lambda x: impl(x, w, 1e-5), (t, h)),
        "add_rms_norm": lambda impl: fwd_bwd(lambda x, r: impl(x, r, w, 1e-5), (t, h), (t, h)),
    }
    for name, make in cases.items():
        row = [f"{name:28s}"]
        for label, impl in (("eager", getattr(reference, name)), ("ours", ops.get(name))):
            if impl is not None:
                row.append(f"{label} {host_us(make(impl), device, min(n, 100)):8.1f} us")
        print("  ".join(row), "(fwd+bwd, tiny shape)")


def profile_step(preset: str, batch: int, seq: int, kernels: str, compile_: str | None, device: str,
                 n: int = 10, tiny: bool = False) -> None:
    config = get_preset(preset, kernels=kernels, max_position_embeddings=max(seq, 512), **(TINY if tiny else {}))
    torch.manual_seed(0)
    model = MiniMindForCausalLM(config).to(device, torch.bfloat16).train()
    step = training_step(model, torch.compile(model, mode=compile_) if compile_ else model, batch, seq, device)
    for _ in range(min(n, 5)):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(n):
        step()
    sync(device)
    wall = (time.perf_counter() - start) / n * 1e3
    host = []
    for _ in range(n):
        sync(device)
        t0 = time.perf_counter()
        step()
        host.append((time.perf_counter() - t0) * 1e3)
    sync(device)
    host_ms = sorted(host)[n // 2]
    tokens = batch * seq
    label = f"{preset} {batch}x{seq} kernels={kernels}{f' compile mode={compile_}' if compile_ else ''}"
    print(f"\n=== {label}: {wall:.2f} ms/step synced ({tokens / wall * 1e3:,.0f} tok/s), "
          f"host enqueue {host_ms:.2f} ms/step")
    from torch.profiler import ProfilerActivity, profile
    cuda = torch.device(device).type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(3):
            step()
        sync(device)
    table = prof.key_averages()
    if cuda:
        print(table.table(sort_by="self_cuda_time_total", row_limit=18, max_name_column_width=60))
    print(table.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small-26m")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--kernels", nargs="+", default=["triton", "reference"])
    p.add_argument("--compile", nargs="*", metavar="MODE",
                   help="also profile torch.compile of the model in these modes (default, reduce-overhead)")
    p.add_argument("--device", default="cuda", help="cuda, or cpu to check the script itself (with --tiny)")
    p.add_argument("--tiny", action="store_true",
                   help="the preset shrunk to one layer of hidden size 64 (vocab 512), tiny launch shapes")
    a = p.parse_args()
    cuda = torch.device(a.device).type == "cuda"
    launch_costs(a.device, 300 if cuda else 3, a.tiny)
    n = 10 if cuda else 1
    for kernels in a.kernels:
        profile_step(a.preset, a.batch, a.seq, kernels, None, a.device, n, a.tiny)
    modes = [] if a.compile is None else (a.compile or ["default"])  # a bare --compile: the default mode
    for mode in modes:
        profile_step(a.preset, a.batch, a.seq, "triton", mode, a.device, n, a.tiny)


if __name__ == "__main__":
    main()
