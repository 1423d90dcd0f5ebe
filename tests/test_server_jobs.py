"""The job queue on its own: one job at a time, own results, cancelling and failing touch no other job."""
from __future__ import annotations

import concurrent.futures
import threading
import time

import pytest

from latent_diffusion.server.jobs import JobInterrupted, JobQueue, QueueFull


@pytest.fixture()
def queue():
    jobs = JobQueue(max_pending=3)
    yield jobs
    jobs.close()


def blocker():
    release = threading.Event()
    started = threading.Event()

    def work(job):
        started.set()
        while not release.is_set():
            job.check_interrupted()
            time.sleep(0.005)
        return "released"

    return work, started, release


def test_jobs_run_one_at_a_time_and_get_their_own_results(queue):
    running = []
    overlaps = []

    def work_for(value):
        def work(job):
            running.append(value)
            overlaps.append(len(running))
            time.sleep(0.01)
            running.remove(value)
            return value * 10
        return work

    jobs = [queue.submit(f"job {i}", work_for(i)) for i in range(3)]
    assert [job.future.result(10) for job in jobs] == [0, 10, 20]
    assert max(overlaps) == 1


def test_a_job_is_no_longer_current_when_its_client_hears_back(queue):
    seen_when_done = []
    for work in (lambda job: "done", lambda job: 1 / 0):
        job = queue.submit("one", work)
        # Callbacks run as the future resolves, as a response handler would wake.
        job.future.add_done_callback(lambda _: seen_when_done.append(queue.current))
        concurrent.futures.wait([job.future], timeout=10)
    assert seen_when_done == [None, None]


def test_cancel_waiting_job_and_interrupt_running_one(queue):
    work, started, release = blocker()
    first = queue.submit("blocking", work)
    assert started.wait(10)
    second = queue.submit("cancelled while waiting", lambda job: "never")
    third = queue.submit("runs afterwards", lambda job: "ran")
    queue.cancel(second)
    assert second.future.cancelled()
    assert queue.interrupt_current()
    with pytest.raises(JobInterrupted):
        first.future.result(10)
    assert third.future.result(10) == "ran"
    release.set()


def test_failing_job_does_not_stop_the_worker(queue):
    def fail(job):
        raise ValueError("bad input deep inside")

    failing = queue.submit("fails", fail)
    after = queue.submit("after", lambda job: 42)
    with pytest.raises(ValueError, match="deep inside"):
        failing.future.result(10)
    assert after.future.result(10) == 42


def test_full_queue_refuses_and_close_cancels_waiting(queue):
    work, started, release = blocker()
    queue.submit("blocking", work)
    assert started.wait(10)
    waiting = [queue.submit(f"wait {i}", lambda job: None) for i in range(3)]
    with pytest.raises(QueueFull, match="3 jobs are already waiting"):
        queue.submit("one too many", lambda job: None)
    queue.close()
    assert all(job.future.cancelled() for job in waiting)
    with pytest.raises(RuntimeError, match="shut down"):
        queue.submit("late", lambda job: None)
    release.set()


def test_fraction_done_counts_batches_and_steps(queue):
    seen = concurrent.futures.Future()

    def work(job):
        job.batch_count, job.batch_no, job.steps, job.step = 4, 1, 10, 5
        seen.set_result(job.fraction_done)

    queue.submit("progress", work).future.result(10)
    assert seen.result() == pytest.approx((1 + 0.5) / 4)
