"""The database handle: collections with the write concern every job write needs, and indexes.

SecantusDB loses every recent write on kill -9 unless it is journaled (DESIGN.md §3), so the
collections that hold admitted work are opened with `j=True` (and `w="majority"` on a replica set).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pymongo import ASCENDING, AsyncMongoClient
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.write_concern import WriteConcern

Doc = dict[str, Any]


@dataclass
class Database:
    client: AsyncMongoClient[Doc]
    db: AsyncDatabase[Doc]
    jobs: AsyncCollection[Doc]
    users: AsyncCollection[Doc]
    engines: AsyncCollection[Doc]
    queue_stats: AsyncCollection[Doc]

    async def ping(self) -> bool:
        try:
            await self.db.command("ping")
            return True
        except Exception:
            return False

    async def close(self) -> None:
        await self.client.close()


async def connect(uri: str, name: str, write_concern: str) -> Database:
    client: AsyncMongoClient[Doc] = AsyncMongoClient(
        uri, tz_aware=True, serverSelectionTimeoutMS=5000, maxPoolSize=64
    )
    hello = await client.admin.command("hello")
    replica_set = "setName" in hello
    if write_concern == "majority" or (write_concern == "auto" and replica_set):
        concern = WriteConcern(w="majority", j=True)
    else:
        concern = WriteConcern(w=1, j=True)
    db = client.get_database(name)
    durable = db.with_options(write_concern=concern)
    return Database(
        client=client,
        db=durable,
        jobs=durable.get_collection("jobs"),
        users=durable.get_collection("users"),
        engines=durable.get_collection("engines"),
        queue_stats=db.get_collection("queue_stats"),
    )


ACTIVE = {"slot": {"$exists": True}}


async def ensure_indexes(database: Database) -> None:
    """Every query on the request path has an index; SecantusDB scans are very slow (DESIGN §3).

    Indexes that only the queue needs are partial on `slot` (present only while a job is queued
    or running), so 15 days of history never enter them: claims, sweeps and their writes stay
    as cheap with 100k finished jobs as with none.
    """
    jobs = database.jobs
    # One document per occupied queue slot: the unique index makes admission atomic.
    await jobs.create_index([("slot", ASCENDING)], name="slot_unique", unique=True, sparse=True)
    await jobs.create_index(
        [("owner", ASCENDING), ("idempotency_key", ASCENDING)],
        name="idempotency_unique",
        unique=True,
        partialFilterExpression={"idempotency_key": {"$exists": True}},
    )
    await jobs.create_index([("expire_at", ASCENDING)], name="history_ttl", expireAfterSeconds=0)
    await jobs.create_index(
        [
            ("model", ASCENDING),
            ("state", ASCENDING),
            ("priority_rank", ASCENDING),
            ("enqueued_at", ASCENDING),
        ],
        name="claim_order",
        partialFilterExpression=ACTIVE,
    )
