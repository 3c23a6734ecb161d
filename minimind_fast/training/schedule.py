"""Learning-rate schedules: linear warmup, then a decay to `min_lr_ratio * lr`.

- `cosine` (the default): half a cosine from the peak to the floor over every step after the warmup.
- `wsd` (warmup-stable-decay): the peak held until the last `decay_fraction` of the steps, then a
  straight line to the floor. A checkpoint of the stable phase can be trained on, or decayed, later
  (resume with more `--steps`), which a cosine tied to one run length cannot.
- `linear`: a straight line from the peak to the floor over every step after the warmup.
- `constant`: the peak after the warmup (the floor is not used).
"""

from __future__ import annotations

import math

SCHEDULES = ("cosine", "wsd", "linear", "constant")


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float, schedule: str = "cosine",
              decay_fraction: float = 0.2) -> float:
    """Multiplier of the peak learning rate for optimizer step `step` (0-based).

    The warmup's steps climb below the peak, step `warmup_steps` trains at the peak, and a decaying
    schedule reaches the floor at the last step, `total_steps - 1`, so the run does train at it."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    decay_start = warmup_steps
    if schedule == "wsd":  # at least the warmup's end: a decay longer than the run after it starts there
        # At least one step: a share that rounds to none would leave the run at the peak, never decayed.
        decay_steps = max(1, round(decay_fraction * (total_steps - 1)))
        decay_start = max(warmup_steps, total_steps - 1 - decay_steps)
    span = max(total_steps - 1 - decay_start, 1)
    progress = min(max(step - decay_start, 0) / span, 1.0)
    if schedule == "cosine":
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule in ("wsd", "linear"):
        return 1.0 - (1 - min_lr_ratio) * progress
    raise ValueError(f"unknown learning-rate schedule {schedule!r}: one of {', '.join(SCHEDULES)}")
