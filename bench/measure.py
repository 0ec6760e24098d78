"""Measuring: alternating timed runs with a warm-up and medians, peak memory, and this machine's
own limits (fp32 matmul throughput, memory bandwidth) measured in the same process run.

Timings on a shared machine are noisy, so the two systems of a case run alternately (A B, B A,
A B, ...) after one untimed warm-up each, and the median of each system's repeats is reported:
a burst of load from another process hits both, and the ratio stays meaningful. On a machine
that other processes keep busy, the benchmark runs single-threaded and times with the process's
CPU time (the `cpu` clock) rather than elapsed time: time slices lost to other processes then
do not count, while everything this process computes does.

Peak memory is the largest resident set size (RSS) above the level before the call, sampled every
millisecond in a background thread during the warm-up run (so the timed runs are not disturbed).
Freed heap is handed back to the system first (`malloc_trim`), so one system's leftovers do not
hide the other's growth. Model weights are loaded before, so this is the working memory of the
call (activations, KV cache, gradients, optimizer state), not the weights.
"""

from __future__ import annotations

import ctypes
import gc
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Timing:
    seconds: list[float] = field(default_factory=list)  # the timed repeats
    peak_mb: float | None = None  # working memory of one run
    result: Any = None  # what the first run returned (for checks)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def _trim_heap() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS just includes freed heap
        pass


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Context manager: `.peak_mb` is the largest RSS growth seen while it was open."""

    def __init__(self, interval: float = 0.001) -> None:
        self.interval = interval
        self.peak_mb = 0.0
        self._stop = threading.Event()

    def __enter__(self) -> PeakMemory:
        _trim_heap()
        self._base = _rss()
        self._peak = self._base
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, _rss())

    def __exit__(self, *exc: object) -> None:
        self._peak = max(self._peak, _rss())
        self._stop.set()
        self._thread.join()
        self.peak_mb = (self._peak - self._base) / 2**20


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def alternate(runs: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1, memory: bool = True,
              log: Callable[[str], None] | None = None, clock: str = "wall") -> dict[str, Timing]:
    """Time each callable `repeats` times, alternating their order every round, after `warmup`
    untimed rounds; with `memory`, the first warm-up round samples each call's peak memory
    (prime both systems beforehand so one-time initialisation is not charged to either).
    `clock`: "wall" (elapsed time) or "cpu" (this process's CPU time: with one thread, the time
    the work takes on a core of its own, whatever else the machine runs)."""
    if memory and warmup < 1:
        raise ValueError("memory sampling needs a warm-up round")
    now = CLOCKS[clock]
    names = list(runs)
    out = {name: Timing() for name in names}
    for round_ in range(warmup + repeats):
        order = names if round_ % 2 == 0 else names[::-1]
        for name in order:
            if round_ == 0 and memory:
                with PeakMemory() as mem:
                    out[name].result = runs[name]()
                out[name].peak_mb = round(mem.peak_mb, 1)
                continue
            start = now()
            result = runs[name]()
            t = now() - start
            if round_ == 0:
                out[name].result = result
            if round_ >= warmup:
                out[name].seconds.append(t)
            if log is not None:
                log(f"    {name:10s} {'warm-up' if round_ < warmup else f'run {round_ - warmup + 1}'}: {t:.3f}s")
    return out


# -- this machine's limits ------------------------------------------------------------------------


def matmul_flops(n: int = 2048, repeats: int = 5, clock: str = "wall") -> float:
    """fp32 matmul throughput (FLOP/s) of an n x n by n x n product, median of `repeats`."""
    import torch

    now = CLOCKS[clock]
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(repeats):
        start = now()
        a @ b
        times.append(now() - start)
    return 2 * n**3 / statistics.median(times)


def copy_bandwidth(megabytes: int = 512, repeats: int = 5, clock: str = "wall") -> float:
    """Memory bandwidth (bytes/s) of a large copy, bytes read plus bytes written (as STREAM's
    copy counts them), median of `repeats`. The buffer is larger than the caches."""
    import torch

    now = CLOCKS[clock]
    src = torch.ones(megabytes * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        start = now()
        dst.copy_(src)
        times.append(now() - start)
    return 2 * src.numel() * 4 / statistics.median(times)


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(threads: int, thread_reason: str, clock: str) -> dict[str, Any]:
    import torch
    import transformers

    return {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "threads": threads,
        "threads_reason": thread_reason,
        "clock": clock,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": "cpu",
        "dtype": "float32",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "load_average_start": load_average(),
    }
