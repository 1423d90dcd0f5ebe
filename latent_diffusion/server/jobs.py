"""A bounded job queue with one worker thread, so that a model's weights are never used by two jobs at once.

Each request becomes a :class:`Job` whose ``work(job)`` runs on the worker; the client awaits the
job's future and so gets its own result. A job that fails or is interrupted settles only its own
future; the worker then takes the next one.
"""
from __future__ import annotations

import collections
import concurrent.futures
import itertools
import threading
import time
from typing import Any, Callable

from PIL import Image


class QueueFull(Exception):
    """More jobs are waiting than the server accepts (answered with HTTP 429)."""


class JobInterrupted(Exception):
    """Raised inside a job's sampling when the job was interrupted; caught by the job's own code."""


class Job:
    """One queued piece of work with its progress, readable from other threads while it runs."""

    _ids = itertools.count(1)

    def __init__(self, name: str, work: Callable[[Job], Any]) -> None:
        self.id = f"task({next(self._ids)})"
        self.name = name
        self.work = work
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        self.interrupted = threading.Event()
        self.created = time.time()
        self.started: float | None = None
        # Progress, written by the worker only.
        self.batch_no = 0
        self.batch_count = 1
        self.step = 0
        self.steps = 0
        self.preview: Image.Image | None = None

    def interrupt(self) -> None:
        """Ask the job to stop at its next step."""
        self.interrupted.set()

    def check_interrupted(self) -> None:
        """Raise :class:`JobInterrupted` in the job's own thread once it was asked to stop."""
        if self.interrupted.is_set():
            raise JobInterrupted(self.id)

    @property
    def fraction_done(self) -> float:
        """Progress in [0, 1] over all batches of the job."""
        if self.started is None:
            return 0.0
        per_batch = self.step / self.steps if self.steps else 0.0
        return min(1.0, (self.batch_no + per_batch) / max(self.batch_count, 1))


class JobQueue:
    """FIFO of jobs run one at a time on a single worker thread; at most ``max_pending`` wait."""

    def __init__(self, max_pending: int = 16) -> None:
        if max_pending < 1:
            raise ValueError(f"the queue must hold at least one job, got max_pending={max_pending}")
        self.max_pending = max_pending
        self._pending: collections.deque[Job] = collections.deque()
        self._lock = threading.Condition()
        self._current: Job | None = None
        self._closed = False
        self._worker = threading.Thread(target=self._run, name="ldm-job-worker", daemon=True)
        self._worker.start()

    @property
    def current(self) -> Job | None:
        """The running job, if any."""
        return self._current

    @property
    def pending_count(self) -> int:
        with self._lock:
            return len(self._pending)

    def submit(self, name: str, work: Callable[[Job], Any]) -> Job:
        """Queue ``work``; raises :class:`QueueFull` when ``max_pending`` jobs are already waiting."""
        job = Job(name, work)
        with self._lock:
            if self._closed:
                raise RuntimeError("the job queue is shut down")
            if len(self._pending) >= self.max_pending:
                raise QueueFull(f"{len(self._pending)} jobs are already waiting (the limit is {self.max_pending})")
            self._pending.append(job)
            self._lock.notify()
        return job

    def cancel(self, job: Job) -> None:
        """Drop a waiting job, or interrupt it if it is running (its client went away)."""
        with self._lock:
            if job in self._pending:
                self._pending.remove(job)
                job.future.cancel()
                return
        job.interrupt()

    def interrupt_current(self) -> bool:
        """Interrupt the running job (A1111's interrupt); waiting jobs are not touched."""
        job = self._current
        if job is None:
            return False
        job.interrupt()
        return True

    def close(self, timeout: float = 10.0) -> None:
        """Stop taking jobs, cancel the waiting ones, interrupt the running one and wait for the worker."""
        with self._lock:
            self._closed = True
            while self._pending:
                self._pending.popleft().future.cancel()
            self._lock.notify_all()
        self.interrupt_current()
        self._worker.join(timeout)

    def _next(self) -> Job | None:
        with self._lock:
            while not self._pending and not self._closed:
                self._lock.wait()
            if self._closed:
                return None
            job = self._pending.popleft()
            self._current = job
            return job

    def _run(self) -> None:
        while (job := self._next()) is not None:
            if not job.future.set_running_or_notify_cancel():
                self._current = None
                continue
            job.started = time.time()
            result, failure = None, None
            try:
                result = job.work(job)
            except BaseException as error:  # noqa: BLE001 - a job's failure belongs to its client alone
                failure = error
            # No longer current before its client hears back: a progress request sent after the
            # response must not still find the job running.
            self._current = None
            if failure is not None:
                job.future.set_exception(failure)
            else:
                job.future.set_result(result)
