"""The database handle: collections with the write concern every job write needs, and indexes.

SecantusDB loses every recent write on kill -9 unless it is journaled (docs/ARCHITECTURE.md,
"The embedded database"), so the collections that hold admitted work are opened with `j=True`
(and `w="majority"` on a replica set).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pymongo
from pymongo import ASCENDING, DESCENDING, AsyncMongoClient
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
    crash_logs: AsyncCollection[Doc]
    ocr_pages: AsyncCollection[Doc]
    api_keys: AsyncCollection[Doc]
    audit: AsyncCollection[Doc]
    rate_limits: AsyncCollection[Doc]
    login_failures: AsyncCollection[Doc]
    runtime_settings: AsyncCollection[Doc]  # what admins change at run time (OCR resolution, ...)
    queue_stats: AsyncCollection[Doc]
    missing_models: AsyncCollection[Doc]
    usage: AsyncCollection[Doc]  # hourly rollups: recomputed from jobs, so not journaled
    autoswitch_decisions: AsyncCollection[Doc]
    leaders: AsyncCollection[Doc]  # leases: which instance runs a once-per-host loop
    secantus: bool = (
        False  # the server is SecantusDB (embedded or not): its TTL monitor walks whole collections
    )

    async def ping(self, timeout_s: float) -> None:
        """Raises when the database does not answer within `timeout_s`."""
        with pymongo.timeout(timeout_s):
            await self.db.command("ping")

    async def close(self) -> None:
        await self.client.close()


# Upkeep that reads or deletes in bulk (rollups over the history, pruning, index builds at start)
# gets this instead of the request path's operation timeout.
MAINTENANCE_TIMEOUT_S = 120.0


@contextmanager
def within(seconds: float) -> Iterator[None]:
    """Every database operation inside (in this task) shares one deadline `seconds` away,
    instead of each having the per-operation timeout."""
    with pymongo.timeout(seconds):
        yield


async def connect(
    uri: str, name: str, write_concern: str, operation_timeout_s: float = 5.0, connect_timeout_s: float = 2.0
) -> Database:
    """Every operation is bounded (the driver's `timeoutMS`): a stalled database costs a request
    at most `operation_timeout_s`, never a hang; a down one `connect_timeout_s` (server selection)
    until the health loop (app/store/health.py) knows and refuses requests at once."""
    client: AsyncMongoClient[Doc] = AsyncMongoClient(
        uri,
        tz_aware=True,
        maxPoolSize=64,
        timeoutMS=int(operation_timeout_s * 1000),
        serverSelectionTimeoutMS=int(connect_timeout_s * 1000),
        connectTimeoutMS=int(connect_timeout_s * 1000),
    )
    hello = await client.admin.command("hello")
    build = await client.admin.command("buildInfo")
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
        crash_logs=durable.get_collection("crash_logs"),
        ocr_pages=durable.get_collection("ocr_pages"),
        api_keys=durable.get_collection("api_keys"),
        audit=durable.get_collection("audit_log"),
        rate_limits=db.get_collection("rate_limits"),
        login_failures=db.get_collection("login_failures"),
        runtime_settings=durable.get_collection("runtime_settings"),
        queue_stats=db.get_collection("queue_stats"),
        missing_models=db.get_collection("missing_model_requests"),
        usage=db.get_collection("usage"),
        autoswitch_decisions=durable.get_collection("autoswitch_decisions"),
        leaders=durable.get_collection("leaders"),
        secantus="secantusVersion" in build,
    )


ACTIVE = {"slot": {"$exists": True}}


# name -> (keys, options). Indexes that only the queue needs are partial on `slot` (present only
# while a job is queued or running), so 15 days of history never enter them: claims, sweeps and
# their writes cost the same with 100k finished jobs as with none.
JOB_INDEXES: dict[str, tuple[list[tuple[str, int]], dict[str, Any]]] = {
    # one document per occupied queue slot: the unique index makes admission atomic
    "slot_unique": ([("slot", ASCENDING)], {"unique": True, "sparse": True}),
    # owner + key in one sparse field: SecantusDB's planner does not use a partial index for an
    # equality query (a full scan, ~250 ms at 20k jobs), but it does use a sparse one
    "idempotency_unique": ([("idempotency_scope", ASCENDING)], {"unique": True, "sparse": True}),
    "history_ttl": ([("expire_at", ASCENDING)], {"expireAfterSeconds": 0}),  # see ensure_indexes
    # ended jobs whose outcomes the totals do not have yet (app/queue/stats.py): a handful
    "uncounted_sparse": ([("uncounted", ASCENDING)], {"sparse": True}),
    "claim_order": (
        [
            ("model", ASCENDING),
            ("state", ASCENDING),
            ("priority_rank", ASCENDING),
            ("enqueued_at", ASCENDING),
        ],
        {"partialFilterExpression": ACTIVE},
    ),
    # GET /api/jobs: a client's own jobs newest first, and everyone's for admins
    # (_id breaks ties within a millisecond, the paging cursor's order)
    "owner_recent": ([("owner", ASCENDING), ("enqueued_at", DESCENDING), ("_id", DESCENDING)], {}),
    "recent": ([("enqueued_at", DESCENDING), ("_id", DESCENDING)], {}),
}


def job_indexes(ttl: bool) -> dict[str, tuple[list[tuple[str, int]], dict[str, Any]]]:
    """The job indexes; `ttl=False` where the gateway prunes history itself (the embedded
    database): then `expire_at` gets a plain index, because SecantusDB's TTL sweeper walks and
    decodes every document of a collection with a TTL index every 60 s (4.5 s of CPU in 125 s
    with 150,000 jobs), and `secantusd-py` runs that sweeper whatever `ttl_sweep_seconds` its
    config file says (its command line never passes the setting on)."""
    if ttl:
        return JOB_INDEXES
    indexes = {name: spec for name, spec in JOB_INDEXES.items() if name != "history_ttl"}
    return {**indexes, "history_expiry": ([("expire_at", ASCENDING)], {})}


async def ensure_indexes(database: Database, ttl: bool = True) -> None:
    """Every query on the request path has an index; SecantusDB scans are very slow (docs/ARCHITECTURE.md).

    Indexes an earlier version made and this one does not want (or wants with other keys) are
    dropped first: each costs work on every job write.
    """
    wanted_indexes = job_indexes(ttl)
    jobs = database.jobs
    with within(
        MAINTENANCE_TIMEOUT_S
    ):  # an index build over 15 days of history takes longer than one request
        for name, spec in (await jobs.index_information()).items():
            wanted = wanted_indexes.get(name)
            if name != "_id_" and (wanted is None or list(spec["key"]) != wanted[0]):
                await jobs.drop_index(name)
        for name, (keys, options) in wanted_indexes.items():
            await jobs.create_index(keys, name=name, **options)
