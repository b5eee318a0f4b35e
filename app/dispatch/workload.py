"""A model's requests as the engine supervisor sees them: what runs, what waits, cancel all.

The supervisor must not stop a busy model without force, and with force it must end that
model's jobs cleanly (cancelled, slots freed) rather than let them retry against an engine
that is gone; the dispatchers and the queue hold those facts, so this adapter joins them.
"""

from __future__ import annotations

import asyncio

from app.dispatch.dispatcher import ModelDispatcher
from app.queue.job import JobState
from app.queue.service import JobQueue


class DispatchWorkload:
    def __init__(self, queue: JobQueue, dispatchers: dict[str, ModelDispatcher]) -> None:
        self._queue = queue
        self._dispatchers = dispatchers

    def running(self, model: str) -> list[str]:
        return self._dispatchers[model].running_ids()

    async def queued(self, model: str) -> int:
        return (await self._queue.store.occupancy(model)).of(model, JobState.QUEUED)

    async def cancel_all(self, model: str, reason: str) -> int:
        """Cancel the model's queued jobs and stop its running calls; returns how many."""
        count = 0
        for job_id in self.running(model):
            count += self._dispatchers[model].cancel(job_id, reason)
        for job in await self._queue.store.active(model):
            if job.state == JobState.QUEUED:
                count += await self._queue.cancel(job.id, reason)
        await self.settle(model, 10.0)
        return count

    async def drain(self, model: str, grace_s: float) -> int:
        """Let running and queued jobs finish (up to the grace period); cancel what is left."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while True:
            await self.settle(model, max(0.0, deadline - loop.time()))
            busy = self.running(model) or await self.queued(model)
            if not busy or loop.time() >= deadline:
                break
            await asyncio.sleep(0.05)  # queued jobs are being claimed
        return await self.cancel_all(model, f"model {model!r} was stopped after a {grace_s:g} s drain")

    async def settle(self, model: str, timeout_s: float) -> None:
        """Wait until the model's running calls have ended (or the timeout)."""
        await self._dispatchers[model].settle(timeout_s)
