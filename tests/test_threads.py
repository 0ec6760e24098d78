"""vitune.threads: thread counts follow what the machine is doing now, not its last minute."""

import multiprocessing
import os
import time

from vitune.threads import busy_cores


def _spin(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def test_busy_cores_sees_a_spinning_process():
    proc = multiprocessing.get_context("spawn").Process(target=_spin, args=(6.0,))
    proc.start()
    try:
        time.sleep(1.5)  # past the child's interpreter start-up
        busy = busy_cores(window=1.0)
    finally:
        proc.terminate()
        proc.join()
    assert 0.5 <= busy <= (os.cpu_count() or 1) + 0.01
