"""Audit log of admin actions: who started or stopped which model, made or revoked a key,
changed a user or a setting. Kept as long as the job history (TTL), read via GET /admin/audit.

Written after the action succeeded (a refused action changed nothing); a database error while
writing it is logged, never turned into a failure of the action that already happened.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from pymongo import DESCENDING
from pymongo.asynchronous.collection import AsyncCollection

from app.clock import Clock
from app.logs import event
from app.store.ttl import ensure_ttl_index

Doc = dict[str, Any]
log = logging.getLogger("gateway.audit")


class AuditLog:
    def __init__(self, collection: AsyncCollection[Doc], clock: Clock, retention_days: float) -> None:
        self._audit = collection
        self._clock = clock
        self._retention = timedelta(days=retention_days)

    async def ensure_indexes(self) -> None:
        await ensure_ttl_index(self._audit, "audit_ttl")
        await self._audit.create_index([("at", DESCENDING)], name="audit_recent")

    async def record(self, actor: str, action: str, target: str, **details: Any) -> None:
        now = self._clock.now()
        event(log, "audit", actor=actor, what=action, target=target)
        try:
            await self._audit.insert_one(
                {
                    "at": now,
                    "actor": actor,
                    "action": action,
                    "target": target,
                    "details": details,
                    "expire_at": now + self._retention,
                }
            )
        except Exception as exc:
            event(log, "audit.write_failed", logging.ERROR, what=action, error=repr(exc))

    async def recent(self, *, actor: str | None, action: str | None, limit: int) -> list[Doc]:
        query: Doc = {}
        if actor:
            query["actor"] = actor
        if action:
            query["action"] = action
        cursor = self._audit.find(query).sort("at", -1).limit(limit)
        return [
            {**{k: v for k, v in doc.items() if k not in ("_id", "expire_at")}, "id": str(doc["_id"])}
            async for doc in cursor
        ]
