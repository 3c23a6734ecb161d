"""`--profile-steps N`: torch.profiler over N optimizer steps after a warm-up, written as tables.

The tables (`profile.txt` in the run directory, rank 0) rank ops by GPU time and by host time. A small
model's step is often bound by the host's kernel launches rather than by the GPU: when the host total
is well above the GPU total, CUDA graphs (`--compile --compile-mode reduce-overhead`) or a larger
micro batch pay more than faster kernels.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from minimind_fast.files import write_text_whole

WARMUP_STEPS = 5


class StepProfiler:
    def __init__(self, steps: int, first_step: int, out: Path, enabled: bool):
        self.start = first_step + WARMUP_STEPS
        self.stop = self.start + steps
        self.out = out
        self.enabled = enabled and steps > 0
        self.prof = None

    def before_step(self, step: int) -> None:
        """Called with the number of the step about to run (0-based count of steps done)."""
        if not self.enabled or step != self.start:
            return
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        self.prof = profile(activities=activities)
        self.prof.__enter__()

    def after_step(self, step: int) -> None:
        """Called with the number of steps done."""
        if self.prof is not None and step == self.stop:
            self._write(step - self.start)

    def close(self) -> None:
        """End of the run (or an error): a profile still open is written with the steps it has."""
        if self.prof is not None:
            self._write(None)

    def _write(self, steps: int | None) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.prof.__exit__(None, None, None)
        table = self.prof.key_averages()
        self.prof = None
        span = f"{steps} optimizer steps" if steps is not None else "the steps before the run ended"
        text = [f"torch.profiler over {span} (from step {self.start + 1})", ""]
        if torch.cuda.is_available():
            text += ["By GPU time:", table.table(sort_by="self_cuda_time_total", row_limit=25,
                                                 max_name_column_width=70), ""]
        text += ["By host time:", table.table(sort_by="self_cpu_time_total", row_limit=25,
                                              max_name_column_width=70)]
        write_text_whole(self.out, "\n".join(text))
