"""Background upkeep of the queue: lease heartbeat, recovery of orphaned jobs, queue timeouts.

The sweeper is what makes a kill -9 survivable: a running job whose worker stopped
heartbeating (or whose worker process on this host is gone) goes back to the queue with one
attempt used, or fails when its retries are spent; a queued job past its deadline expires.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable

import psutil

from app.logs import event
from app.queue.job import Job, JobState
from app.queue.retry import RetryPolicy
from app.queue.service import JobQueue

log = logging.getLogger("gateway.sweeper")


def make_worker_id() -> str:
    """host/pid/start-time: unique per gateway process, and checkable on the same host."""
    pid = os.getpid()
    return f"{socket.gethostname()}/{pid}/{int(psutil.Process(pid).create_time())}"


def worker_is_dead(worker: str | None) -> bool:
    """True only when we can see that worker's process is gone (same host, pid gone or reused)."""
    if not worker:
        return True
    try:
        host, pid_text, started = worker.rsplit("/", 2)
        pid, started_at = int(pid_text), int(started)
    except ValueError:
        return False
    if host != socket.gethostname():
        return False
    try:
        return int(psutil.Process(pid).create_time()) != started_at
    except psutil.NoSuchProcess:
        return True


class Sweeper:
    def __init__(
        self,
        queue: JobQueue,
        retry: RetryPolicy,
        local_running: Callable[[], list[str]],
        abandon: Callable[[Job], None] = lambda job: None,
    ) -> None:
        self._queue = queue
        self._retry = retry
        self._local_running = local_running
        self._abandon = abandon  # stop this instance's engine call for a job that is no longer its own

    async def heartbeat(self) -> int:
        """Extend the leases of the jobs running here; a job whose lease could not be extended
        was taken from this instance (cancelled through another instance, or recovered after a
        lapsed lease): its engine call here is stopped, since nothing it returns can be stored."""
        running = self._local_running()
        extended = await self._queue.extend_leases(running)
        if extended < len(running):
            for job in await self._queue.taken_over(running):
                event(log, "job.taken_over", job=job.id, state=job.state.value, worker=job.worker)
                self._abandon(job)
        return extended

    async def sweep(self) -> dict[str, int]:
        """One pass; returns what it did (tests and logs read it)."""
        now = self._queue.clock.now()
        mine = set(self._local_running())
        done = {"requeued": 0, "failed": 0, "expired": 0}
        for job in await self._queue.store.active():  # one small indexed read per pass
            if job.state == JobState.QUEUED:
                if job.queue_deadline < now and await self._queue.expire(job.id):
                    done["expired"] += 1
                continue
            if job.id in mine:
                continue
            lease_over = job.lease_until is None or job.lease_until < now
            if lease_over or worker_is_dead(job.worker):
                await self._recover(job, done)
        if any(done.values()):
            event(log, "sweeper.pass", **done)
        return done

    async def _recover(self, job: Job, done: dict[str, int]) -> None:
        error = {
            "type": "lease_expired",
            "message": f"worker {job.worker} stopped before finishing attempt {job.attempts}",
            "retryable": True,
            "attempt": job.attempts,
        }
        # a streamed job cannot move: its client was connected to the worker that is gone
        lost_worker = job.worker  # the requeue takes it off the job
        if not job.stream and self._retry.should_retry(retryable=True, attempts_made=job.attempts):
            if await self._queue.recover_running(job, error, self._retry.backoff(job.attempts)):
                done["requeued"] += 1
                event(log, "job.recovered", job=job.id, worker=lost_worker, attempt=job.attempts)
        elif await self._queue.recover_running(job, error, None):
            done["failed"] += 1
