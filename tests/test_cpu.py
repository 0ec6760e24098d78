"""vitune.cpu: thread counts follow what the machine is doing now; subnormals are flushed only while a job runs."""

import multiprocessing
import os
import time

from vitune.cpu import busy_cores, flush_subnormals, flushing_subnormals


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


def test_flush_subnormals_is_scoped_to_the_job():
    assert not flushing_subnormals()  # IEEE default, which numpy and hypothesis rely on
    with flush_subnormals():
        assert flushing_subnormals()
        with flush_subnormals():
            pass
        assert flushing_subnormals()  # a nested job leaves the outer one's mode
    assert not flushing_subnormals()


def test_job_threads_are_scoped_to_the_job(monkeypatch):
    """A job on a busy machine runs on fewer threads; afterwards the process has its count back
    (a later training run in the same process must repeat a run made elsewhere bit for bit)."""
    import torch

    from vitune import cpu

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(cpu, "busy_cores", lambda window=0.5: float(os.cpu_count() or 1))  # every core busy
    before = torch.get_num_threads()
    with cpu.job_threads() as threads:
        assert threads == torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
