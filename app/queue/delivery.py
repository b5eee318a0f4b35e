"""Where a job's outcome goes in this process: the handler streaming it to its client (a sink of
events) and the handlers waiting for its end (one future per job, shared by repeated keys).

Apart from the queue's transitions because it holds no state of the job itself, only who is
listening here: the database is the job's truth, this is the fast path to whoever waits.
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal, NamedTuple

from app.queue.job import Job, JobState


class StreamEvent(NamedTuple):
    """What a stream's handler receives: `chunk` (an engine chunk, relayed), `done` (the answer is
    whole; `data` is the Job, or {} before its write), `error` (the Job)."""

    kind: Literal["chunk", "done", "error"]
    data: Any


class Delivery:
    def __init__(self) -> None:
        self._sinks: dict[str, asyncio.Queue[StreamEvent]] = {}
        self._waiters: dict[str, asyncio.Future[Job]] = {}
        self._waiting: dict[str, int] = {}  # handlers waiting per job (repeated idempotency keys share one)

    # -- streams ------------------------------------------------------------------------------

    def open_sink(self, job_id: str) -> asyncio.Queue[StreamEvent]:
        sink: asyncio.Queue[StreamEvent] = asyncio.Queue()
        self._sinks[job_id] = sink
        return sink

    def sink(self, job_id: str) -> asyncio.Queue[StreamEvent] | None:
        return self._sinks.get(job_id)

    def close_sink(self, job_id: str) -> None:
        self._sinks.pop(job_id, None)

    # -- waiters ------------------------------------------------------------------------------

    def expect(self, job_id: str) -> None:
        """A job is being admitted here: its end may come before anyone waits for it."""
        self._waiters[job_id] = asyncio.get_running_loop().create_future()

    def forget(self, job_id: str) -> None:
        """Admission failed: nobody will wait."""
        self._waiters.pop(job_id, None)

    def detach(self, job_id: str) -> None:
        """Nobody will wait on this job here (an async submission): drop its future now."""
        if not self._waiting.get(job_id):
            self._waiters.pop(job_id, None)

    def join(self, job_id: str) -> asyncio.Future[Job]:
        """A handler starts waiting for the job's end; `leave` when it stops."""
        future = self._waiters.get(job_id)
        if future is None:
            future = self._waiters[job_id] = asyncio.get_running_loop().create_future()
        self._waiting[job_id] = self._waiting.get(job_id, 0) + 1
        return future

    def leave(self, job_id: str) -> None:
        left = self._waiting.pop(job_id, 1) - 1
        if left > 0:
            self._waiting[job_id] = left
        else:
            self._waiters.pop(job_id, None)

    def deliver(self, job: Job) -> None:
        """A terminal job to whoever waits for it here: its stream's handler, its waiters."""
        sink = self._sinks.get(job.id)
        if sink is not None:
            sink.put_nowait(StreamEvent("done" if job.state == JobState.SUCCEEDED else "error", job))
        future = self._waiters.get(job.id)
        if future is not None and not future.done():
            future.set_result(job)
