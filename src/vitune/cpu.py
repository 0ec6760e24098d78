"""CPU settings for compute-heavy jobs: how many threads on a machine that may be shared, and
flushing subnormal floats while a job runs."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager


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


@contextmanager
def job_threads() -> Iterator[int]:
    """`pick_threads()` for the duration of a job, then the previous count: the setting is
    process-wide, and code that runs later in the process (a training run that must repeat another
    bit for bit) expects the default."""
    import torch

    before = torch.get_num_threads()
    try:
        yield pick_threads()
    finally:
        torch.set_num_threads(before)


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


def flushing_subnormals() -> bool:
    """Whether the CPU currently flushes subnormal floats to zero (torch has no getter)."""
    import torch

    return (torch.tensor([1e-38], dtype=torch.float32) * 1e-3).item() == 0.0


@contextmanager
def flush_subnormals() -> Iterator[None]:
    """Flush subnormal floats to zero for the duration of a job, then restore the previous mode.

    x86 arithmetic on subnormals is many times slower, and training makes them: Adam's first moment
    of embedding rows that a batch does not use decays geometrically into the subnormal range
    (measured here: a CPU run fell from 5 to 1.4 steps/s between steps 800 and 1400). The mode is
    process-wide processor state, so it is put back afterwards: other code in the process (numpy,
    hypothesis) expects IEEE subnormals."""
    import torch

    before = flushing_subnormals()
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(before)
