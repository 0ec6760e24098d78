"""How many CPU threads a compute-heavy job should use on a machine it may share."""

from __future__ import annotations

import os
import time


def pick_threads() -> int:
    """Torch threads for this run: the cores not already busy (`busy_cores`).

    On a shared machine, two spinning OpenMP threads on a core another process is using run
    several times slower than one thread (measured here: 4.7 s against 0.7 s per CLIP step), so
    a busy machine gets fewer threads. OMP_NUM_THREADS, when set, wins."""
    import torch

    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    cores = os.cpu_count() or 1
    free = cores - busy_cores()
    threads = max(1, min(cores, int(free + 0.5)))
    torch.set_num_threads(threads)
    return threads


def busy_cores(window: float = 0.5) -> float:
    """Cores other processes keep busy now: CPU time over a short window (/proc/stat), else the
    1-minute load average. The load average remembers the last minute, so right after a busy step
    (`pip install`, rendering) an idle machine would look busy and get one thread."""
    try:
        def ticks() -> tuple[int, int]:
            with open("/proc/stat") as f:
                values = [int(v) for v in f.readline().split()[1:]]
            return sum(values), values[3] + (values[4] if len(values) > 4 else 0)  # all, idle + iowait

        total0, idle0 = ticks()
        time.sleep(window)
        total1, idle1 = ticks()
    except (OSError, ValueError, IndexError):
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if total1 <= total0:
        return 0.0
    return (os.cpu_count() or 1) * (1 - (idle1 - idle0) / (total1 - total0))
