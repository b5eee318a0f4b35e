"""Requests the gateway could not serve because of the model: unknown names, and configured
models that were not loaded.

Operators read unknown names to learn what clients expect (a typo in a client, or a model worth
adding); auto-switch reads the configured ones as demand that left no job in the history. One
document per model, client and hour keeps the count exact with one upsert per miss, gives the
policy a time resolution, and bounds what a client sending random names can create to one
document per name per hour (names are capped in length by the caller). Documents expire with
the history (TTL on `expire_at`).

Recording is off the request path: the 404 or 503 is answered at once and the write happens in
a background task; a bounded number of writes may be in flight, beyond that misses are counted
in a log line only (a flood of bad names must not grow memory).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from pymongo import ASCENDING, DESCENDING
from pymongo.asynchronous.collection import AsyncCollection

from app.clock import Clock
from app.logs import event
from app.store.ttl import ensure_ttl_index

Doc = dict[str, Any]
log = logging.getLogger("gateway.missing")

MAX_PENDING = 256


class MissingModels:
    def __init__(self, collection: AsyncCollection[Doc], clock: Clock, retention_days: float) -> None:
        self._collection = collection
        self._clock = clock
        self._retention = timedelta(days=retention_days)
        self._pending: set[asyncio.Task[None]] = set()
        self._dropped = 0
        self._listeners: list[Callable[[str], None]] = []

    async def ensure_indexes(self) -> None:
        await ensure_ttl_index(self._collection, "missing_ttl")
        await self._collection.create_index([("last_seen", DESCENDING)], name="missing_recent")
        await self._collection.create_index([("hour", ASCENDING)], name="missing_hour")

    def on_configured_miss(self, listener: Callable[[str], None]) -> None:
        """Auto-switch wants to hear at once that a configured model was asked for in vain."""
        self._listeners.append(listener)

    def record(self, model: str, client_id: str, *, configured: bool) -> None:
        """Count one miss; never blocks or fails the request that missed."""
        if configured:
            for listener in self._listeners:
                listener(model)
        if len(self._pending) >= MAX_PENDING:
            self._dropped += 1
            event(log, "missing.dropped", logging.WARNING, model=model[:128], dropped=self._dropped)
            return
        task = asyncio.create_task(self._write(model[:128], client_id[:128], configured, self._clock.now()))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _write(self, model: str, client_id: str, configured: bool, now: datetime) -> None:
        hour = now.replace(minute=0, second=0, microsecond=0)
        try:
            await self._collection.update_one(
                {"_id": f"{model}\x1f{client_id}\x1f{hour.isoformat()}"},
                {
                    "$inc": {"count": 1},
                    "$min": {"first_seen": now},
                    "$max": {"last_seen": now},
                    "$setOnInsert": {
                        "model_name": model,
                        "client_id": client_id,
                        "configured": configured,
                        "hour": hour,
                        "expire_at": hour + self._retention + timedelta(hours=1),
                    },
                },
                upsert=True,
            )
        except Exception as exc:  # the miss was answered already; losing its count is logged
            event(log, "missing.write_failed", logging.WARNING, model=model, error=repr(exc))

    async def drain(self) -> None:
        """Let the writes in flight land (gateway stop)."""
        if self._pending:
            await asyncio.wait(list(self._pending), timeout=5)

    async def listing(self, since: datetime | None = None, limit: int = 100) -> list[Doc]:
        """Per model and client: count, first and last seen, newest first.

        `model_name`, `client_id` and `timestamp` (= last seen) are the fields clients of the
        system we re-implement read.
        """
        match: Doc = {"last_seen": {"$gte": since}} if since is not None else {}
        pipeline: list[Doc] = [
            {"$match": match},
            {
                "$group": {
                    "_id": {"model": "$model_name", "client": "$client_id"},
                    "count": {"$sum": "$count"},
                    "first_seen": {"$min": "$first_seen"},
                    "last_seen": {"$max": "$last_seen"},
                    "configured": {"$max": "$configured"},
                }
            },
            {"$sort": {"last_seen": -1}},
            {"$limit": limit},
        ]
        rows = await (await self._collection.aggregate(pipeline)).to_list()
        return [
            {
                "model_name": row["_id"]["model"],
                "client_id": row["_id"]["client"],
                "configured": bool(row["configured"]),
                "count": row["count"],
                "first_seen": row["first_seen"],
                "last_seen": row["last_seen"],
                "timestamp": row["last_seen"],
            }
            for row in rows
        ]

    async def configured_since(self, since: datetime) -> dict[str, int]:
        """Misses per configured model from the hour holding `since` on (auto-switch demand)."""
        hour = since.replace(minute=0, second=0, microsecond=0)
        pipeline: list[Doc] = [
            {"$match": {"hour": {"$gte": hour}, "configured": True}},
            {"$group": {"_id": "$model_name", "count": {"$sum": "$count"}}},
        ]
        rows = await (await self._collection.aggregate(pipeline)).to_list()
        return {row["_id"]: int(row["count"]) for row in rows}
