"""Dynamic batching: one worker thread owns the model and decodes the requests that arrive together.

Request handlers (HTTP, the web demo) prepare prompt ids and pixels themselves, then `submit` a
`Job`; the worker takes every job waiting (up to `max_batch_size`), runs them as one batch through
`Decoder.decode_steps` (each row keeps its own sampling parameters), and hands each row's text
deltas to that job's `sink`. New jobs are admitted between batches. A job whose client went away is
`cancel()`ed: a waiting job is dropped before it runs, a running row leaves the batch at its next
step. The wait queue is bounded; `submit` raises `QueueFull` rather than letting a burst of clients
pile up unbounded memory.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from vitune.generation import SamplingParams, StepEvent

log = logging.getLogger(__name__)

# What a sink receives: text deltas (the last one carries finish_reason and output_ids), or the
# exception that ended the job (the decoder failed, or the server is shutting down).
Event = StepEvent | BaseException
Sink = Callable[[Event], None]


class StepDecoder(Protocol):
    def decode_steps(self, prompts, pixel_values, params, cancelled=None): ...  # pragma: no cover


class QueueFull(Exception):
    """The wait queue is at its limit; the client should retry later."""


class ShuttingDown(Exception):
    """The batcher stopped before this job could finish."""


_ids = itertools.count(1)


@dataclass(eq=False)
class Job:
    """One generation: a prepared prompt, its pixels, its sampling params and where its events go."""

    prompt_ids: list[int]
    pixel_values: torch.Tensor | None
    params: SamplingParams
    sink: Sink
    id: int = field(default_factory=lambda: next(_ids))
    _cancelled: threading.Event = field(default_factory=threading.Event, repr=False)

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


@dataclass
class BatcherStats:
    batches: int = 0
    jobs_done: int = 0
    jobs_cancelled: int = 0
    max_batch_seen: int = 0
    tokens_generated: int = 0


class Batcher:
    """The worker thread and its bounded queue; `start()` before `submit`, `stop()` at shutdown."""

    def __init__(self, decoder: StepDecoder, max_batch_size: int = 8, max_queue: int = 128, batch_wait_s: float = 0.005) -> None:
        if max_batch_size < 1 or max_queue < 1:
            raise ValueError("max_batch_size and max_queue must be >= 1")
        self.decoder = decoder
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.batch_wait_s = batch_wait_s
        self.stats = BatcherStats()
        self._waiting: collections.deque[Job] = collections.deque()
        self._running: list[Job] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> Batcher:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="vitune-batcher", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel everything, fail waiting jobs with ShuttingDown, and join the worker."""
        with self._cond:
            self._stopping = True
            waiting = list(self._waiting)
            self._waiting.clear()
            for job in self._running:
                job.cancel()
            self._cond.notify_all()
        for job in waiting:
            _deliver(job, ShuttingDown("the server is shutting down"))
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    # -- clients -----------------------------------------------------------------------------
    def submit(self, job: Job) -> Job:
        with self._cond:
            if self._stopping or self._thread is None:
                raise ShuttingDown("the server is not accepting requests")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting, the limit is {self.max_queue}")
            self._waiting.append(job)
            self._cond.notify_all()
        return job

    @property
    def queued(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    # -- worker ------------------------------------------------------------------------------
    def _take_batch(self) -> list[Job] | None:
        with self._cond:
            while not self._waiting and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
        # Requests "arriving together" reach us a few milliseconds apart; a short wait lets them
        # share the prefill instead of the first one running alone.
        if self.batch_wait_s > 0:
            deadline = time.monotonic() + self.batch_wait_s
            with self._cond:
                while len(self._waiting) < self.max_batch_size and not self._stopping:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
        with self._cond:
            batch: list[Job] = []
            while self._waiting and len(batch) < self.max_batch_size:
                job = self._waiting.popleft()
                if job.cancelled:
                    self.stats.jobs_cancelled += 1
                    _deliver(job, StepEvent(0, "", "cancelled", []))
                    continue
                batch.append(job)
            self._running = batch
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            if not batch:
                continue
            try:
                self._run(batch)
            except BaseException as err:  # noqa: BLE001 - every waiting client must hear about it
                log.exception("batch of %d failed", len(batch))
                for job in batch:
                    _deliver(job, err)
            finally:
                with self._cond:
                    self._running = []

    def _run(self, batch: list[Job]) -> None:
        self.stats.batches += 1
        self.stats.max_batch_seen = max(self.stats.max_batch_seen, len(batch))
        finished: set[int] = set()
        events = self.decoder.decode_steps(
            [job.prompt_ids for job in batch],
            [job.pixel_values for job in batch],
            [job.params for job in batch],
            cancelled=lambda row: batch[row].cancelled,
        )
        for event in events:
            job = batch[event.row]
            if event.finish_reason is not None:
                finished.add(event.row)
                self.stats.tokens_generated += len(event.output_ids or [])
                if event.finish_reason == "cancelled":
                    self.stats.jobs_cancelled += 1
                else:
                    self.stats.jobs_done += 1
            _deliver(job, StepEvent(0, event.text, event.finish_reason, event.output_ids))
        for row, job in enumerate(batch):
            if row not in finished:  # a decoder that ended a row without saying so
                _deliver(job, RuntimeError("generation ended without a finish reason"))


def _deliver(job: Job, event: Event) -> None:
    try:
        job.sink(event)
    except Exception:  # noqa: BLE001 - a broken sink (e.g. a closed event loop) must not stop the worker
        log.exception("could not deliver an event to job %d", job.id)
        job.cancel()
