"""Learning-rate schedules as pure functions of the step: warmup, then cosine / linear / constant.

The factor multiplies each part's own learning rate, so one schedule drives every parameter
group. Being a function of the step alone, resuming a run restores the schedule by restoring
the step; there is no scheduler object with hidden state.
"""

from __future__ import annotations

import math


def warmup_steps_for(total_steps: int, warmup_ratio: float, warmup_steps: int | None = None) -> int:
    """Warmup length: explicit steps, else ceil(ratio x total) as the original recipe computes it."""
    if warmup_steps is not None:
        return max(0, int(warmup_steps))
    return max(0, math.ceil(total_steps * warmup_ratio))


def lr_factor(step: int, total_steps: int, warmup: int, schedule: str = "cosine", min_ratio: float = 0.0) -> float:
    """Multiplier of the base lr for optimizer step `step` (0-based) of `total_steps`.

    Warmup rises linearly and reaches 1 at the end of warmup; the first step already learns
    (1/(warmup+1)), unlike schedules that waste it at 0. After warmup, cosine/linear decay from 1
    towards `min_ratio` and never quite reach it within the run, so the last step learns too.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total_steps - warmup)
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif schedule == "linear":
        decay = 1.0 - progress
    else:
        raise ValueError(f"unknown schedule {schedule!r}; choose cosine, linear or constant")
    return min_ratio + (1.0 - min_ratio) * decay
