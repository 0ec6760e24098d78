"""Learning-rate schedules as pure functions of the step: warmup, then cosine / linear / constant /
wsd (warmup-stable-decay: constant, then a linear cool-down over the run's last `decay_ratio`).

The factor multiplies each part's own learning rate, so one schedule drives every parameter
group. Being a function of the step and the total alone, resuming a run restores the schedule by
restoring the step; there is no scheduler object with hidden state. A run with a wall-clock
allowance (`train.max_seconds`) passes `time_horizon`'s estimate as the total, so its schedule
also follows the machine's speed.
"""

from __future__ import annotations

import math


def warmup_steps_for(total_steps: int, warmup_ratio: float, warmup_steps: int | None = None) -> int:
    """Warmup length: explicit steps, else ceil(ratio x total) as the original recipe computes it."""
    if warmup_steps is not None:
        return max(0, int(warmup_steps))
    return max(0, math.ceil(total_steps * warmup_ratio))


def lr_factor(step: int, total_steps: int, warmup: int, schedule: str = "cosine", min_ratio: float = 0.0,
              decay_ratio: float = 0.2) -> float:
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
    if schedule == "wsd":
        decay_steps = max(1, math.ceil(decay_ratio * total_steps))
        start = max(warmup, total_steps - decay_steps)
        if step < start:
            return 1.0
        return min_ratio + (1.0 - min_ratio) * (1.0 - min(1.0, (step - start) / max(1, total_steps - start)))
    progress = (step - warmup) / max(1, total_steps - warmup)
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif schedule == "linear":
        decay = 1.0 - progress
    else:
        raise ValueError(f"unknown schedule {schedule!r}; choose cosine, linear, constant or wsd")
    return min_ratio + (1.0 - min_ratio) * decay


def time_horizon(step: int, total_steps: int, elapsed: float, max_seconds: float, steps_per_second: float) -> int:
    """The step a run with a wall-clock allowance (`train.max_seconds`) will end at: `step` plus
    what the time left gives at the recent step rate, never beyond the planned `total_steps`.
    The schedule uses it as its total, so a run cut short by time still ends on a decayed rate."""
    left = max(0.0, max_seconds - elapsed)
    return max(step + 1, min(total_steps, step + round(left * steps_per_second)))
