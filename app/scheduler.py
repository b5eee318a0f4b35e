"""Periodic upkeep on APScheduler's AsyncIOScheduler, inside the gateway's own event loop."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from app.logs import event

log = logging.getLogger("gateway.scheduler")


class Scheduler:
    def __init__(self) -> None:
        self._scheduler = AsyncIOScheduler()
        self._final: list[Callable[[], Awaitable[object]]] = []
        self._running: set[asyncio.Task[Any]] = set()

    def every(
        self, seconds: float, name: str, job: Callable[[], Awaitable[object]], *, run_at_stop: bool = False
    ) -> None:
        """Run `job` every `seconds`; never two runs of it at once, missed runs coalesce."""

        async def guarded() -> None:
            task = asyncio.current_task()
            if task is not None:
                self._running.add(task)
            try:
                await job()
            except Exception as exc:  # a failing pass is logged and tried again next period
                event(log, "scheduler.job_failed", logging.WARNING, job=name, error=repr(exc))
            finally:
                if task is not None:
                    self._running.discard(task)

        self._scheduler.add_job(
            guarded,
            "interval",
            seconds=seconds,
            id=name,
            name=name,
            max_instances=1,
            coalesce=True,
            misfire_grace_time=None,
        )
        if run_at_stop:
            self._final.append(job)

    def next_run(self, name: str) -> datetime | None:
        """When the job `name` runs next (None before start or if there is no such job)."""
        job = self._scheduler.get_job(name)
        return job.next_run_time if job is not None and self._scheduler.running else None

    def start(self) -> None:
        self._scheduler.start()

    async def stop(self) -> None:
        """Stop scheduling, then run the jobs that must not lose their last period (drain)."""
        if self._scheduler.running:
            self._scheduler.shutdown(wait=False)
        if self._running:  # let a pass in progress finish rather than cut it mid-write
            await asyncio.wait(list(self._running), timeout=10)
        for job in self._final:
            try:
                await job()
            except Exception as exc:
                event(log, "scheduler.final_run_failed", logging.WARNING, error=repr(exc))
