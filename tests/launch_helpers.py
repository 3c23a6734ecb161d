"""Helpers for tests that run the launch scripts as users do: in subprocesses, DeepSpeed on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from minimind_fast.config import ModelConfig, get_preset

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def tiny_config(vocab_size: int = 1024) -> ModelConfig:
    return get_preset("tiny", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      vocab_size=vocab_size, max_position_embeddings=256)


def two_ranks(port: int) -> list[str]:
    """DeepSpeed's launcher for two CPU ranks; each test its own master port (a port still held by an
    earlier run's ranks would make the next one fail to start)."""
    return [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", "2", "--master_port", str(port)]


def run(script: str, args: list[str], launcher: list[str] | None = None, check: bool = True,
        timeout: int = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run launch/`script` (in `env`, default ENV); with `check`, a failure raises with the tail of its output."""
    cmd = (launcher or [sys.executable]) + [str(ROOT / "launch" / script)] + args
    proc = subprocess.run(cmd, cwd=ROOT, env=env or ENV, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-3000:]}")
    return proc


def common(data: Path, out: Path, steps: int, *extra: str) -> list[str]:
    """Flags of a short, deterministic CPU run (later flags win, so `extra` may override these)."""
    return ["--data", str(data), "--out", str(out), "--seq-len", "64", "--micro-batch-size", "4",
            "--steps", str(steps), "--lr", "3e-3", "--warmup-steps", "2", "--log-every", "1",
            "--eval-every", "1000", "--save-every", "4", "--seed", "7", *extra]


def records(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path, key: str = "loss") -> dict[int, float]:
    """step -> `key` over the records of metrics.jsonl that have it (training or evaluation records)."""
    return {r["step"]: r[key] for r in records(run_dir) if key in r}
