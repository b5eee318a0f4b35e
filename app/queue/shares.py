"""Admission's fair-share check: a client that holds its cap of a model's places is refused
(429 `client_share_exceeded`) while the queue still has room for others (the rule itself is
pure, in app/queue/fairness.py).

Whether the client holds its cap is read from the database (its jobs on every instance) plus
its admissions on this instance still in flight (reserved, not yet journaled, so not in that
read); those checks take turns per client on this instance, so two cannot both take the
client's last place. While the model has fewer places taken than the cap nothing is read.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from app.errors import ClientShareFull
from app.metrics import Metrics
from app.queue.fairness import FairShares, client_key, holdings
from app.queue.jobs import Submission
from app.queue.store import JobStore

if TYPE_CHECKING:
    from app.queue.service import DirectStart


class ShareGate:
    def __init__(
        self, store: JobStore, shares: FairShares, engine_places: dict[str, int], metrics: Metrics | None
    ) -> None:
        self.shares = shares
        self._store = store
        self._engine_places = engine_places  # max_concurrent per model: a cap never goes below it
        self._metrics = metrics or Metrics()
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._admitting: dict[tuple[str, str], set[str]] = {}  # per client: admissions in flight

    def cap(self, model: str, capacity: int, client_id: str, owner: str) -> int:
        """The most places this client may hold in the model."""
        return self.shares.cap(model, capacity, self._engine_places.get(model, 0), client_id, owner)

    @asynccontextmanager
    async def place(
        self, sub: Submission, job_id: str, capacity: int, taken: int, direct: DirectStart | None
    ) -> AsyncIterator[None]:
        """Inside: the client may take one more place; the admission counts as the client's
        until it ends. Raises ClientShareFull (and gives a direct start's place back) if not."""
        cap = self.cap(sub.model, capacity, sub.client_id, sub.owner)
        key = (sub.model, client_key(sub.owner, sub.client_id))
        admitting = self._admitting.setdefault(key, set())
        try:
            if cap < capacity and taken >= cap:  # the client may hold its cap already: find out
                await self._check(sub, key, cap, capacity, admitting, direct)
            admitting.add(job_id)
            yield
        finally:
            admitting.discard(job_id)
            if not admitting:
                self._admitting.pop(key, None)

    async def _check(
        self,
        sub: Submission,
        key: tuple[str, str],
        cap: int,
        capacity: int,
        admitting: set[str],
        direct: DirectStart | None,
    ) -> None:
        lock = self._locks.setdefault(key, asyncio.Lock())
        try:
            async with lock:
                live = await self._store.active(sub.model)
                held = len(holdings(live, sub.owner, sub.client_id) | admitting)
                if held >= cap:
                    if direct is not None:
                        direct.cancel()
                    self._metrics.rejected(sub.model, "client_share")
                    self._metrics.client_admission(sub.model, sub.client_id, "client_share")
                    raise ClientShareFull(sub.model, sub.client_id, held, cap, capacity, retry_after_s=1)
        finally:
            if not lock.locked():
                self._locks.pop(key, None)
