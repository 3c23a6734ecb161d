"""Shared pieces of the benchmark suite: the results file, timing, and the formulas behind each number.

Results file (one per run, `benchmarks/results/<device-slug>-<YYYYmmdd-HHMMSS>.json`)::

    {"schema": 1, "device": "NVIDIA H100 80GB HBM3", "torch": ..., "triton": ..., "cuda": ...,
     "date": "2025-01-31T12:00:00+00:00", "commit": "<sha>[+dirty]", "full_sizes": true,
     "hardware": {"copy_GBps": ..., "bf16_tflops": ..., "fp32_tflops": ..., "peak_bf16_tflops": ...},
     "cases": [{"suite", "group", "name", "impl", "shape", "dtype", "median_ms", "p20_ms", "p80_ms",
                "peak_mem_MB", "gbps", "frac_of_copy", "tflops", "frac_of_matmul", "tokens_per_s",
                "mfu", "mfu_measured", "ratio_vs_eager", "ratio_vs_eager_lo", "ratio_vs_eager_hi",
                "mem_ratio_vs_eager", ...}],
     "timing": {"suite_s": ..., "deadline_s": ..., "test_seconds": {nodeid: s, ...}, "not_run": [nodeid, ...],
                "running": nodeid or null}}

`timing` is the run's own cost (see `SuiteClock`): each test's wall seconds, compilation and autotuning
included, slowest first, the tests a deadline left out, and (`running`, in a file whose run was killed)
the test that was under way.

A *group* is one comparison: the same op at the same shape, measured once per implementation
(`impl`) side by side in the same run. The implementations:

- ``eager``     the plain PyTorch reference op (`minimind_fast.kernels.reference`), not compiled;
- ``compile``   `torch.compile` of that same reference function;
- ``ours``      the Triton kernel from `minimind_fast.kernels.triton_ops()`;
- ``liger``     Liger-Kernel's kernel for the op, when `liger_kernel` is importable;
- ``minimind``  a MiniMind-style baseline: unfused ops and a loop over experts for MoE (in
                `bench_minimind_baseline.py`: MiniMind2's own model code, from `MINIMIND_REPO`);
- ``dense``     (MoE only) a dense SwiGLU with the same active FLOPs as the routed experts;
- ``hf``        (decode only) Hugging Face `generate` on a `LlamaForCausalLM` with the same weights;
- ``cudagraphs`` (training step against MiniMind2, CUDA only) ours under
                `torch.compile(mode="reduce-overhead")`: forward and backward replayed as CUDA graphs.

Ratios are speedups: ``ratio_vs_X = median_ms(X) / median_ms(this)`` (> 1 means faster than X),
computed within a run and a group for every baseline X in `BASELINES` present in the group. The
spread of a ratio, ``[ratio_vs_X_lo, ratio_vs_X_hi]``, pairs the baseline's 20th/80th percentile
with this case's 80th/20th. ``mem_ratio_vs_X = peak_mem_MB(X) / peak_mem_MB(this)`` (> 1: less memory).

Hardware fractions:

- ``gbps``: the bytes an op must move at least (each input read once, each output written once,
  forward plus backward; see `bench_kernels.py`) divided by its median time; ``frac_of_copy`` divides
  that by the device's copy bandwidth measured at the start of the run (`hardware.py`).
- ``tflops``: the op's matmul FLOPs divided by its time; ``frac_of_matmul`` divides by the measured
  bf16 (CUDA) or fp32 (CPU) matmul rate.
- ``mfu`` (training steps): achieved model FLOP/s over the datasheet's dense bf16 peak
  (H100 SXM: 989 TFLOP/s); ``mfu_measured`` over the measured matmul rate instead. Model FLOPs per
  token are `minimind_fast.training.flops.model_flops_per_token`: 6 * N_active (forward 2N, backward
  4N; N_active = matmul weights a token passes through: attention, the FFN or k routed + shared
  experts and the router, and the tied output head; embedding lookups excluded) + attention
  12 * L * T * d (QK^T and AV, forward and backward, counted without halving for the causal mask,
  as in PaLM's appendix B), with L layers, sequence length T and d = heads * head_dim.

Peak memory (CUDA only) is the highest `torch.cuda.max_memory_allocated` during one call minus the
memory allocated before it, so it counts what the op itself adds (activations, workspaces, gradients),
not its inputs.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
SCHEMA = 1
BASELINES = ("eager", "minimind", "dense", "hf")
IMPL_ORDER = ("eager", "hf", "minimind", "dense", "compile", "liger", "grouped_mm", "ours", "cudagraphs")


# --- the results file ------------------------------------------------------------------------------

def device_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3' (file names, one per device)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def git_commit(repo: Path = BENCH_DIR.parent) -> str:
    """HEAD's sha, with '+dirty' when tracked files differ from it; 'unknown' outside a checkout.
    BENCH_COMMIT, when set, wins: a copied working tree (a remote GPU machine) may carry a stale .git."""
    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                             check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return sha + ("+dirty" if dirty else "")


def _ratio(num: float | None, den: float | None) -> float | None:
    if not num or not den:
        return None
    return num / den


def compute_ratios(cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fill ratio_vs_X (+ _lo/_hi spread) and mem_ratio_vs_X for every baseline X in each case's group."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for case in cases:
        for key in [k for k in case if k.startswith(("ratio_vs_", "mem_ratio_vs_"))]:
            del case[key]
        groups.setdefault(case["group"], []).append(case)
    for members in groups.values():
        for base_impl in BASELINES:
            base = next((c for c in members if c["impl"] == base_impl and c.get("median_ms")), None)
            if base is None:
                continue
            for case in members:
                if not case.get("median_ms"):
                    continue
                case[f"ratio_vs_{base_impl}"] = _ratio(base["median_ms"], case["median_ms"])
                case[f"ratio_vs_{base_impl}_lo"] = _ratio(base.get("p20_ms"), case.get("p80_ms"))
                case[f"ratio_vs_{base_impl}_hi"] = _ratio(base.get("p80_ms"), case.get("p20_ms"))
                case[f"mem_ratio_vs_{base_impl}"] = _ratio(base.get("peak_mem_MB"), case.get("peak_mem_MB"))
    return cases


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write to a temp file in the same folder, then rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# The order files run in: the figures the open issues ask for first, so that a run cut by its deadline
# (or a timeout) has measured those (kernels, MoE, training step, then MiniMind's step, decode, data).
FILE_PRIORITY = ("bench_kernels", "bench_moe", "bench_model", "bench_minimind_baseline", "bench_decode",
                 "bench_data")


def file_priority(path: str | os.PathLike) -> int:
    """Position of a benchmark file in `FILE_PRIORITY` (files not listed go last, by name)."""
    stem = Path(path).stem
    return FILE_PRIORITY.index(stem) if stem in FILE_PRIORITY else len(FILE_PRIORITY)


class SuiteClock:
    """The whole run's time: each test's wall seconds (warm-up, compilation and autotuning included)
    and an optional deadline, after which the tests not yet started are left out and listed, so that
    `make bench-gpu` ends in time with every measured case written and every omission named."""

    def __init__(self, deadline_s: float | None, now: Callable[[], float] = time.perf_counter):
        self.deadline_s, self.now = deadline_s, now
        self.start = now()
        self.test_seconds: dict[str, float] = {}
        self.not_run: list[str] = []
        # the test under way: the file names it, so a run killed by `timeout` says where it stopped
        self.running: str | None = None

    def elapsed(self) -> float:
        return self.now() - self.start

    def past_deadline(self, nodeid: str) -> bool:
        """True (and `nodeid` listed as not run) once the deadline has passed."""
        if self.deadline_s is None or self.elapsed() < self.deadline_s:
            return False
        self.not_run.append(nodeid)
        return True

    def add(self, nodeid: str, seconds: float) -> None:
        self.test_seconds[nodeid] = self.test_seconds.get(nodeid, 0.0) + seconds
        self.running = None

    def as_dict(self) -> dict[str, Any]:
        slowest = sorted(self.test_seconds.items(), key=lambda kv: -kv[1])
        return {"suite_s": round(self.elapsed(), 1), "deadline_s": self.deadline_s,
                "test_seconds": {k: round(v, 2) for k, v in slowest}, "not_run": list(self.not_run),
                "running": self.running}


class ResultsError(ValueError):
    """A results file that is not valid JSON or lacks the fields the tools need."""


REQUIRED_RUN_FIELDS = ("device", "date", "cases")
REQUIRED_CASE_FIELDS = ("group", "impl", "median_ms")


def load_results(path: str | os.PathLike) -> dict[str, Any]:
    """Read one results file, checking the fields report.py and compare.py rely on."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ResultsError(f"{path}: no such results file") from None
    except json.JSONDecodeError as exc:
        raise ResultsError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    if not isinstance(data, dict):
        raise ResultsError(f"{path}: expected a JSON object at the top level")
    for name in REQUIRED_RUN_FIELDS:
        if name not in data:
            raise ResultsError(f"{path}: missing field {name!r}")
    if not isinstance(data["cases"], list):
        raise ResultsError(f"{path}: field 'cases' must be a list")
    for i, case in enumerate(data["cases"]):
        missing = [f for f in REQUIRED_CASE_FIELDS if f not in case]
        if missing:
            raise ResultsError(f"{path}: cases[{i}] lacks {', '.join(missing)}")
    return data


def case_key(case: dict[str, Any]) -> tuple[str, str]:
    return case["group"], case["impl"]


def sort_impls(impls: Iterable[str]) -> list[str]:
    order = {name: i for i, name in enumerate(IMPL_ORDER)}
    return sorted(set(impls), key=lambda s: (order.get(s, len(order)), s))


# --- timing ----------------------------------------------------------------------------------------

@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    rounds: int

    def as_dict(self) -> dict[str, float]:
        return {"median_ms": self.median_ms, "p20_ms": self.p20_ms, "p80_ms": self.p80_ms,
                "rounds": self.rounds}


def timing_from_samples(samples_ms: list[float]) -> Timing:
    """Median and 20th/80th percentiles of per-call times (inclusive method: exact for few samples)."""
    if not samples_ms:
        raise ValueError("no timing samples")
    if len(samples_ms) == 1:
        t = samples_ms[0]
        return Timing(t, t, t, 1)
    deciles = statistics.quantiles(samples_ms, n=10, method="inclusive")
    return Timing(statistics.median(samples_ms), deciles[1], deciles[7], len(samples_ms))


def is_cuda_run() -> bool:
    import torch

    return torch.cuda.is_available() and os.environ.get("BENCH_DEVICE", "cuda") != "cpu"


def synchronized(fn: Callable[[], Any]) -> Callable[[], None]:
    """`fn` followed by a CUDA synchronize, so that wall-clock time covers the GPU work."""
    import torch

    def call() -> None:
        fn()
        torch.cuda.synchronize()

    return call


def measure(benchmark, fn: Callable[[], Any], *, target_s: float = 1.0, cuda_rep_ms: int = 60,
            max_rounds: int = 50, wall: bool = False, first_s: float | None = None) -> Timing:
    """Time `fn` (which must finish its own work, e.g. run backward and zero its grads).

    CUDA: `triton.testing.do_bench` (CUDA events, L2 flushed between calls) gives the median and
    20th/80th percentiles; pytest-benchmark then records one synchronised call for its own table.
    CPU, or `wall=True` (long calls with host syncs, e.g. generation): pytest-benchmark's `pedantic`
    runs enough synchronised rounds to fill about `target_s` seconds (at least 3); `first_s`, the
    time of a warm-up call already made, sizes them without another warm-up call.
    """
    cuda = is_cuda_run()
    if cuda and not wall:
        from triton.testing import do_bench

        median, p20, p80 = do_bench(fn, warmup=max(10, cuda_rep_ms // 4), rep=cuda_rep_ms,
                                    quantiles=[0.5, 0.2, 0.8])
        benchmark.pedantic(synchronized(fn), rounds=1, iterations=1)
        return Timing(float(median), float(p20), float(p80), rounds=-1)
    fn = synchronized(fn) if cuda else fn
    first = first_s
    if first is None:
        start = time.perf_counter()
        fn()  # warm-up, also sizes the number of rounds
        first = time.perf_counter() - start
    rounds = int(min(max_rounds, max(3, target_s / max(first, 1e-6))))
    if not getattr(benchmark, "enabled", True):  # --benchmark-disable: time it ourselves
        benchmark.pedantic(fn, rounds=1, iterations=1)
        samples = []
        for _ in range(rounds):
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e3)
        return timing_from_samples(samples)
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=0)
    return timing_from_samples([s * 1e3 for s in benchmark.stats.stats.data])


def peak_memory_mb(fn: Callable[[], Any], absolute: bool = False) -> float | None:
    """Memory one call of `fn` adds at its peak on CUDA (MB), or with `absolute` the whole peak
    (weights and optimizer state included); None on CPU, where torch does not track it."""
    if not is_cuda_run():
        return None
    import torch

    # A `forward_backward` step frees the input gradients its previous call left and writes new ones:
    # held in the base, they would go uncounted in what the call adds
    drop_grads = getattr(fn, "drop_grads", None)
    if drop_grads is not None:
        drop_grads()
    torch.cuda.synchronize()
    base = 0 if absolute else torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def forward_backward(fn: Callable[..., Any], inputs: list, grads: list) -> Callable[[], None]:
    """A closure running fn(*inputs) and backward with fixed output gradients, clearing input grads first
    (also its `drop_grads()`, which `peak_memory_mb` calls).

    A None gradient skips that output; a step that would backpropagate nothing is an error, so that a
    fused loss (whose gradients are computed in its forward) is never timed against a forward alone."""
    import torch

    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]

    def drop_grads() -> None:
        for t in leaves:
            t.grad = None

    def step() -> None:
        drop_grads()
        out = fn(*inputs)
        outs = out if isinstance(out, tuple | list) else (out,)
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
        if not pairs:
            raise ValueError("forward_backward: no output gets a gradient, so nothing would be backpropagated")
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])

    step.drop_grads = drop_grads
    return step


def training_step(model, forward: Callable[..., Any], batch: int, seq: int, device) -> Callable[[], None]:
    """A closure running one training step of `model` (through `forward`, e.g. its compiled form) on a
    fixed random batch: forward with the fused loss (+ MoE aux), backward, AdamW (fused on CUDA)."""
    import torch

    vocab = model.config.vocab_size
    input_ids = torch.randint(0, vocab, (batch, seq), device=device)
    targets = torch.randint(0, vocab, (batch, seq), device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=torch.device(device).type == "cuda")

    def step() -> None:
        torch.compiler.cudagraph_mark_step_begin()  # a no-op unless compiled with CUDA graphs
        out = forward(input_ids, targets=targets)
        (out.loss + out.aux_loss).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def fmt_bytes_per_s(nbytes: float, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


# --- the MiniMind-style baseline -------------------------------------------------------------------

def loop_moe_experts(x, topk_idx, topk_weight, w_gate, w_up, w_down):
    """Routed experts the way MiniMind2 trains them: every token copied k times, then a Python loop
    over experts, each picking its rows with a boolean mask (one host sync per expert).

    Same signature and result as `reference.moe_experts`; it is the unfused baseline the grouped
    kernels are measured against.
    """
    import torch
    import torch.nn.functional as F

    n_tokens, hidden = x.shape
    top_k = topk_idx.shape[1]
    flat_idx = topk_idx.reshape(-1)
    repeated = x.repeat_interleave(top_k, dim=0)
    out = repeated.new_zeros(repeated.shape)
    for e in range(w_gate.shape[0]):
        rows = flat_idx == e
        if not bool(rows.any()):
            continue
        xe = repeated[rows]
        out[rows] = (F.silu(xe @ w_gate[e].t()) * (xe @ w_up[e].t())) @ w_down[e].t()
    wide = torch.promote_types(x.dtype, torch.float32)  # as the reference: fp32, or float64 in a float64 check
    weighted = out.view(n_tokens, top_k, hidden).to(wide) * topk_weight.unsqueeze(-1).to(wide)
    return weighted.sum(dim=1).to(x.dtype)
