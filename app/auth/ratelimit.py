"""Per-client request rate limit, shared by every gateway instance through MongoDB.

Fixed windows (`window_seconds`, a minute by default), one counter document per client and
window, deleted by TTL. Why counted locally and synced twice a second rather than one database
write per request: the queue already costs the request path its round trips, and a limit of 60
a minute does not need per-request precision. The price is bounded and documented: across N
instances a client can overshoot by what N-1 instances admit in half a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from pymongo import ReturnDocument
from pymongo.asynchronous.collection import AsyncCollection

from app.auth.tokens import Principal
from app.clock import Clock
from app.errors import RateLimited
from app.logs import event
from app.metrics import Metrics
from app.store.ttl import ensure_ttl_index
from app.tasks import cancel_and_wait

Doc = dict[str, Any]
log = logging.getLogger("gateway.ratelimit")


@dataclass(frozen=True)
class RateState:
    limit: int
    remaining: int
    reset_s: int

    def headers(self) -> dict[str, str]:
        return {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(self.remaining),
            "X-RateLimit-Reset": str(self.reset_s),
        }


@dataclass
class _Window:
    synced: int = 0  # the global count at the last sync (every instance's requests)
    unsynced: int = 0  # this instance's requests since then
    subjects: set[str] = field(default_factory=set)


class RateLimiter:
    def __init__(
        self,
        counters: AsyncCollection[Doc],
        clock: Clock,
        per_window: int,
        window_seconds: float,
        exempt_roles: list[str],
        sync_interval_s: float = 0.5,
        metrics: Metrics | None = None,
    ) -> None:
        self._counters = counters
        self._clock = clock
        self._per_window = per_window
        self._window_s = window_seconds
        self._exempt = frozenset(exempt_roles)
        self._sync_interval_s = sync_interval_s
        self._metrics = metrics or Metrics()
        self._windows: dict[tuple[str, int], _Window] = {}
        self._task: asyncio.Task[None] | None = None

    async def ensure_indexes(self) -> None:
        await ensure_ttl_index(self._counters, "ratelimit_ttl")

    def limit_for(self, principal: Principal) -> int | None:
        if principal.rate_limit_per_minute is not None:
            return principal.rate_limit_per_minute
        if principal.role in self._exempt or self._per_window <= 0:
            return None
        return self._per_window

    def hit(self, principal: Principal) -> RateState | None:
        """Count one request; raises RateLimited when the window's budget is spent."""
        limit = self.limit_for(principal)
        if limit is None:
            return None
        now = self._clock.now().timestamp()
        index = int(now // self._window_s)
        reset_s = max(1, math.ceil((index + 1) * self._window_s - now))
        window = self._windows.setdefault((principal.subject, index), _Window())
        used = window.synced + window.unsynced
        if used >= limit:
            self._metrics.rejected("", "rate_limited")
            raise RateLimited(principal.subject, limit, self._window_s, reset_s)
        window.unsynced += 1
        return RateState(limit, max(0, limit - used - 1), reset_s)

    # -- background sync ---------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="ratelimit-sync")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        with contextlib.suppress(Exception):
            await self.sync()  # drain: what this instance counted reaches the shared counter

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._sync_interval_s)
            try:
                await self.sync()
            except Exception as exc:  # the database being away must not stop counting
                event(log, "ratelimit.sync_failed", logging.WARNING, error=repr(exc))

    async def sync(self) -> None:
        current = int(self._clock.now().timestamp() // self._window_s)
        for key in [k for k in self._windows if k[1] < current]:
            del self._windows[key]  # past windows: nothing more to enforce
        for (subject, index), window in list(self._windows.items()):
            # The count stays in `unsynced` until the shared counter includes it: zeroing it
            # before the await would let requests during the round trip see a window that
            # looks empty.
            count = window.unsynced
            doc = await self._counters.find_one_and_update(
                {"_id": f"{subject}|{index}"},
                {
                    "$inc": {"count": count},
                    "$setOnInsert": {
                        "expire_at": self._clock.now() + timedelta(seconds=2 * self._window_s + 60)
                    },
                },
                upsert=True,
                return_document=ReturnDocument.AFTER,
            )
            window.unsynced -= count
            window.synced = int(doc["count"]) if doc else window.synced + count
