"""Run metrics: a JSONL file, a progress line with ETA, optional TensorBoard/wandb, a loss-curve PNG."""

from __future__ import annotations

import json
import math
import resource
import secrets
import time
from pathlib import Path

import torch
from tqdm import tqdm

from minimind_fast.files import write_file_whole, write_text_whole


def memory_mb(device: torch.device) -> float:
    """Peak memory: CUDA allocator peak on GPU, the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class MetricsLogger:
    """Rank 0's metrics sink. Other ranks get a logger whose methods do nothing."""

    def __init__(self, run_dir: Path, total_steps: int, start_step: int, enabled: bool,
                 tensorboard: bool = False, wandb_project: str | None = None, config: dict | None = None):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.run_dir = run_dir
        self.tb = self.wandb = None
        if not enabled:
            return
        trim_metrics(self.path, start_step)
        self.total_steps, self.start_step, self.started = total_steps, start_step, time.monotonic()
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True, disable=None)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise RuntimeError("--tensorboard needs the tensorboard package (pip install tensorboard)") from None
            # A resumed run drops the events a stopped or killed run wrote after its checkpoint, as
            # trim_metrics does for the JSONL file: kept, TensorBoard would draw those steps twice. From
            # step 0 too: a run killed before its first checkpoint starts over.
            self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1)
        if wandb_project:
            try:
                import wandb
            except ImportError:
                raise RuntimeError("--wandb needs the wandb package (pip install wandb)") from None
            self.wandb = wandb.init(project=wandb_project, dir=str(run_dir), config=config or {},
                                    id=wandb_run_id(run_dir), resume="allow")

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(json_safe(record)) + "\n")
        step = record["step"]
        for key, value in record.items():
            if self.tb is not None and isinstance(value, (int, float)) and key != "step":
                self.tb.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(record, step=step)
        if "loss" in record and self.bar.disable:
            # Output to a file or pipe (a cluster job, `| tee`): tqdm draws nothing there, so each logged
            # step gets a plain line instead.
            print(progress_line(record, self.total_steps, self._eta(step)), flush=True)
        elif "loss" in record:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                 tok_s=f"{record.get('tokens_per_s', 0):,.0f}", refresh=False)
        if "val_loss" in record:
            ppl = f"  ppl {record['val_ppl']:.2f}" if "val_ppl" in record else ""
            self.bar.write(f"step {step}: val_loss {record['val_loss']:.4f}{ppl}")

    def _eta(self, step: int) -> float | None:
        """Seconds left at this run's mean step time so far (evaluation and checkpoints included)."""
        done = step - self.start_step
        return (self.total_steps - step) * (time.monotonic() - self.started) / done if done > 0 else None

    def advance(self, steps: int = 1) -> None:
        if self.enabled:
            self.bar.update(steps)

    def message(self, text: str) -> None:
        if self.enabled:
            (self.bar.write if hasattr(self, "bar") else print)(text)

    def close(self) -> None:
        if not self.enabled:
            return
        self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
        plot_losses(self.path, self.run_dir / "loss.png")


def json_safe(value):
    """`value` with every NaN or infinity as None: json.dumps would write them bare (`NaN`, `Infinity`), which
    is no JSON to strict readers (jq, JavaScript). metrics.jsonl writes an unknown grad norm (NaN) or an
    overflowed perplexity (inf) as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def wandb_run_id(run_dir: Path) -> str:
    """The run directory's wandb id, made on its first run and kept in `wandb_run_id`, so that every
    resume continues the one wandb run instead of starting a new one per restart. Steps that a resume
    repeats are dropped by wandb (its steps only grow); under exact resume they are the same values."""
    path = run_dir / "wandb_run_id"
    if path.exists() and (run_id := path.read_text().strip()):
        return run_id
    run_id = secrets.token_hex(4)
    write_text_whole(path, run_id + "\n")
    return run_id


def progress_line(record: dict, total_steps: int, eta_s: float | None) -> str:
    """One logged step as text: `step 20/300 loss 5.1234 lr 3.00e-03 ... eta 0:01:05`."""
    parts = [f"step {record['step']}/{total_steps}", f"loss {record['loss']:.4f}", f"lr {record['lr']:.2e}"]
    if record.get("grad_norm") is not None and math.isfinite(record["grad_norm"]):
        parts.append(f"grad_norm {record['grad_norm']:.3g}")
    if "tokens_per_s" in record:
        parts.append(f"tok/s {record['tokens_per_s']:,.0f}")
    if "mfu" in record:
        parts.append(f"mfu {record['mfu']:.1%}")
    if "memory_mb" in record:
        parts.append(f"mem {record['memory_mb']:,.0f} MB")
    if eta_s is not None:
        parts.append(f"eta {tqdm.format_interval(eta_s)}")
    return "  ".join(parts)


def trim_metrics(path: Path, start_step: int) -> None:
    """Keep the records of steps up to `start_step`, where this run (re)starts.

    The rest were written by a run that stopped or was killed after its last checkpoint; they are about
    to be recomputed, and kept they would repeat steps in the file and the plot. A kill in mid-write
    leaves a torn last line: it is dropped. A broken line elsewhere is an error naming it.
    """
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines):
                break
            raise ValueError(f"{path}:{number}: not a JSON record ({exc.msg})") from None
        if record.get("step", 0) <= start_step:
            kept.append(line)
    if len(kept) == len(lines):
        return
    write_text_whole(path, "".join(x + "\n" for x in kept))


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _plottable(value) -> bool:
    """A number to draw: not a missing key, a null (a non-finite value, see `json_safe`) or an older file's NaN."""
    return isinstance(value, (int, float)) and math.isfinite(value)


def plot_losses(metrics_path: Path, out_png: Path) -> Path | None:
    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if _plottable(r.get("loss"))]
    val = [(r["step"], r["val_loss"]) for r in records if _plottable(r.get("val_loss"))]
    if not train:
        return None
    # The object API, not pyplot: nothing left in pyplot's global figure registry of a long-lived process.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(*zip(*train), label="train loss", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    # A kill mid-write leaves the old plot, not half a PNG.
    write_file_whole(out_png, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    return out_png
