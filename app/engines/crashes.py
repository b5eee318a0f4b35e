"""Crash logs: one document per engine death, kept as long as the job history (TTL).

Operators read them through GET /admin/crashes to see why a model restarted, which requests
were in flight, and the engine's last log lines, long after the restart hid the evidence.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from pymongo import ASCENDING, DESCENDING
from pymongo.asynchronous.collection import AsyncCollection

from app.clock import Clock
from app.store.ttl import ensure_ttl_index

Doc = dict[str, Any]


class CrashLog:
    def __init__(self, collection: AsyncCollection[Doc], clock: Clock, retention_days: float) -> None:
        self._crashes = collection
        self._clock = clock
        self._retention = timedelta(days=retention_days)

    async def ensure_indexes(self) -> None:
        await ensure_ttl_index(self._crashes, "crash_ttl")
        await self._crashes.create_index([("model", ASCENDING), ("at", DESCENDING)], name="model_recent")

    async def record(
        self,
        model: str,
        *,
        exit_code: int | None,
        reason: str,
        log_tail: str,
        jobs_affected: list[str],
        pid: int | None,
        restart: str,
    ) -> Doc:
        now = self._clock.now()
        doc: Doc = {
            "model": model,
            "at": now,
            "exit_code": exit_code,
            # a negative exit code is the signal that killed it (Popen's convention)
            "signal": -exit_code if exit_code is not None and exit_code < 0 else None,
            "reason": reason,
            "pid": pid,
            "log_tail": log_tail,
            "jobs_affected": jobs_affected,
            "restart": restart,
            "expire_at": now + self._retention,
        }
        await self._crashes.insert_one(doc)
        return doc

    async def recent(self, model: str | None, since: datetime | None, limit: int) -> list[Doc]:
        query: Doc = {}
        if model is not None:
            query["model"] = model
        if since is not None:
            query["at"] = {"$gte": since}
        cursor = self._crashes.find(query).sort("at", -1).limit(limit)
        return [doc async for doc in cursor]
