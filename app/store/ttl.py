"""History that expires: one TTL convention for every collection that keeps it.

Every history document carries `expire_at` (when it may go) and its collection a TTL index on
that field with `expireAfterSeconds: 0`, so a real MongoDB deletes it by itself. The embedded
SecantusDB's TTL monitor stalls every operation while it sweeps (app/queue/history.py), so there
the gateway deletes what expired through the same index instead; the jobs, the one large
collection, get a plain index there, which the monitor does not walk (app/store/database.py).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pymongo import ASCENDING
from pymongo.asynchronous.collection import AsyncCollection

Doc = dict[str, Any]
TTL_FIELD = "expire_at"


async def ensure_ttl_index(collection: AsyncCollection[Doc], name: str) -> None:
    await collection.create_index([(TTL_FIELD, ASCENDING)], name=name, expireAfterSeconds=0)


async def prune_expired(collection: AsyncCollection[Doc], now: datetime) -> int:
    """Delete what a TTL monitor would have deleted by `now`."""
    return (await collection.delete_many({TTL_FIELD: {"$lt": now}})).deleted_count
