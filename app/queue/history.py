"""Deleting history past its retention where no TTL monitor does it (the embedded database).

SecantusDB's TTL sweeper walks and decodes the whole collection under its storage lock every
60 s: with 100k finished jobs every operation stalls ~3 s once a minute. So on the embedded
database the jobs' `expire_at` index carries no TTL option (the sweeper passes such a
collection by; app/store/database.py), and this pruner deletes expired jobs in small batches
found through that index. On a real MongoDB the TTL index does the work.
"""

from __future__ import annotations

import logging

from app.clock import Clock
from app.logs import event
from app.queue.store import JobStore

log = logging.getLogger("gateway.history")


class HistoryPruner:
    def __init__(self, store: JobStore, clock: Clock, batch: int = 500, max_batches: int = 20) -> None:
        self._store = store
        self._clock = clock
        self._batch = batch
        self._max_batches = max_batches

    async def prune(self) -> int:
        now = self._clock.now()
        deleted = 0
        for _ in range(self._max_batches):
            ids = await self._store.expired_history(now, self._batch)
            if ids:
                deleted += await self._store.delete(ids)
            if len(ids) < self._batch:
                break
        if deleted:
            event(log, "history.pruned", deleted=deleted)
        return deleted
