"""Job state transitions on the `jobs` collection.

Every transition is one conditional update on `{_id, rev: <the version read>}`, so two workers
never both win (SecantusDB matches two fields ~0.6 ms faster than `{_id, state, worker,
attempts}`), and every write is journaled and group-committed through the BatchWriter.
A terminal transition unsets `slot` (freeing the queue place in the same write) and sets
`expire_at`, which the TTL index turns into the history retention.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from pymongo import DESCENDING
from pymongo.asynchronous.collection import AsyncCollection

from app.clock import Clock, SystemClock
from app.queue import transitions
from app.queue.job import Doc, Job, JobState
from app.queue.jobs import ListingCursor, idempotency_scope
from app.queue.transitions import Change, Fields
from app.store.batch import BatchWriter
from app.store.database import ACTIVE

# the listing reads back this far from its newest edge, window by window, then the rest
LISTING_WINDOWS_H = (1, 4, 16, 64, 256)

# what an engine produced (chat message, OCR text and per-page text): dropped when outputs are not kept
_OUTPUT_FIELDS = frozenset({"message", "text", "pages", "logprobs"})


@dataclass(frozen=True)
class Occupancy:
    """Live jobs by (model, state, priority): admin views, the supervisor's busy check, the
    queue gauges and the tests all read this one count."""

    counts: dict[tuple[str, str, str], int]

    def of(self, model: str, state: JobState, priority: str | None = None) -> int:
        return sum(
            n
            for (m, st, p), n in self.counts.items()
            if m == model and st == state.value and (priority is None or p == priority)
        )

    def queued_by_priority(self) -> dict[tuple[str, str], int]:
        """(model, priority) -> queued jobs: the queue-depth gauge."""
        depth: dict[tuple[str, str], int] = {}
        for (model, state, priority), n in self.counts.items():
            if state == JobState.QUEUED.value:
                depth[(model, priority)] = depth.get((model, priority), 0) + n
        return depth


class JobStore:
    def __init__(
        self,
        jobs: AsyncCollection[Doc],
        writer: BatchWriter,
        retention: timedelta,
        store_prompts: bool = True,
        store_outputs: bool = True,
        clock: Clock | None = None,
    ) -> None:
        self._jobs = jobs
        self._clock = clock or SystemClock()  # where the listing's first window ends
        self._writer = writer
        self._retention = retention
        # privacy settings: what history keeps once a job ends
        self._dropped = () if store_prompts else ("request",)
        self._store_outputs = store_outputs

    async def insert(self, job: Job) -> None:
        await self._writer.insert(job.to_document())

    async def get(self, job_id: str) -> Job | None:
        doc = await self._jobs.find_one({"_id": job_id})
        return None if doc is None else Job.from_document(doc)

    async def get_many(self, job_ids: list[str]) -> list[Job]:
        if not job_ids:
            return []
        return [Job.from_document(doc) async for doc in self._jobs.find({"_id": {"$in": job_ids}})]

    async def find_by_idempotency_key(self, owner: str, key: str) -> Job | None:
        doc = await self._jobs.find_one({"idempotency_scope": idempotency_scope(owner, key)})
        return None if doc is None else Job.from_document(doc)

    async def occupied_slots(self, slot_keys: list[str]) -> list[str]:
        """Which of these slots a job holds now."""
        cursor = self._jobs.find({"slot": {"$in": slot_keys}}, {"slot": 1, "state": 1})
        return [doc["slot"] async for doc in cursor]

    async def live(self, model: str) -> list[Job]:
        """The model's queued and running jobs, requests included (at most max_concurrent +
        max_waiting): a claim orders the queued ones by the running ones' clients."""
        cursor = self._jobs.find({**ACTIVE, "model": model})
        return [Job.from_document(doc) async for doc in cursor]

    async def active(self, model: str | None = None) -> list[Job]:
        """Queued and running jobs (at most max_concurrent + max_waiting per model), without
        their requests."""
        query: Doc = dict(ACTIVE)
        if model is not None:
            query["model"] = model
        cursor = self._jobs.find(query, {"request": 0})
        return [Job.from_document(doc) async for doc in cursor]

    async def occupancy(self, model: str | None = None) -> Occupancy:
        """Queued and running jobs counted by model, state and priority, from one read of the live
        jobs (never a count over history: the partial index holds only live jobs, at most
        max_concurrent + max_waiting per model)."""
        query: Doc = dict(ACTIVE)
        if model is not None:
            query["model"] = model
        counts: dict[tuple[str, str, str], int] = {}
        async for doc in self._jobs.find(query, {"model": 1, "state": 1, "priority": 1}):
            key = (str(doc.get("model")), str(doc.get("state")), str(doc.get("priority")))
            counts[key] = counts.get(key, 0) + 1
        return Occupancy(counts)

    async def position(self, job: Job) -> int | None:
        """1-based place of a queued job among its model's queued jobs (claim order); None if not queued.

        At most max_concurrent + max_waiting jobs are active per model, so this reads a handful.
        """
        if job.state != JobState.QUEUED:
            return None
        mine = (job.priority_rank, job.enqueued_at)
        queued = [j for j in await self.active(job.model) if j.state == JobState.QUEUED]
        return 1 + sum(1 for j in queued if j.id != job.id and (j.priority_rank, j.enqueued_at) < mine)

    async def listing(
        self,
        *,
        owner: str | None,
        state: str | None,
        model: str | None,
        before: datetime | None,
        limit: int,
        after: ListingCursor | None = None,
    ) -> list[Job]:
        """Newest first by (enqueued_at, _id), without the request body (prompts can be large).

        `after` continues behind the last job of a page; `before` (a time, older clients)
        skips jobs of that very millisecond. Two simple range reads instead of one `$or`, so
        each is served by the (owner,) enqueued_at, _id index.
        """
        query: Doc = {}
        if owner is not None:
            query["owner"] = owner
        if state is not None:
            query["state"] = state
        if model is not None:
            query["model"] = model
        jobs: list[Job] = []
        if after is not None:
            same_ms = {**query, "enqueued_at": after.enqueued_at, "_id": {"$lt": after.job_id}}
            jobs = await self._newest(same_ms, limit)
            before = after.enqueued_at
        if len(jobs) < limit:
            jobs += await self._newest_windowed(query, before, limit - len(jobs))
        return jobs

    async def _newest_windowed(self, query: Doc, before: datetime | None, limit: int) -> list[Job]:
        """The newest `limit` jobs before `before`, read in windows that widen into the past.

        SecantusDB reads the whole index range of a sorted, limited query before it applies the
        limit (measured with 150,000 jobs over 15 days: the 20 newest took 4.5 s, an owner's
        7-8 s, and the dashboard asks every 2 s); a bounded range costs what it holds (one
        hour of 10,000 jobs a day: 17 ms). The windows cover all of time, so the answer is the
        same; they only stop reading once the page is full."""
        jobs: list[Job] = []
        upper = before
        edge = before or self._clock.now()
        for hours in LISTING_WINDOWS_H:
            lower = edge - timedelta(hours=hours)
            span: Doc = {"$gte": lower} if upper is None else {"$gte": lower, "$lt": upper}
            jobs += await self._newest({**query, "enqueued_at": span}, limit - len(jobs))
            if len(jobs) >= limit:
                return jobs
            upper = lower
        assert upper is not None
        return jobs + await self._newest({**query, "enqueued_at": {"$lt": upper}}, limit - len(jobs))

    async def _newest(self, query: Doc, limit: int) -> list[Job]:
        order = [("enqueued_at", DESCENDING), ("_id", DESCENDING)]
        cursor = self._jobs.find(query, {"request": 0}).sort(order).limit(limit)
        return [Job.from_document(doc) async for doc in cursor]

    async def expired_history(self, now: datetime, limit: int) -> list[str]:
        cursor = self._jobs.find({"expire_at": {"$lt": now}}, {"_id": 1}).limit(limit)
        return [doc["_id"] async for doc in cursor]

    async def delete(self, job_ids: list[str]) -> int:
        result = await self._jobs.delete_many({"_id": {"$in": job_ids}, "expire_at": {"$exists": True}})
        return result.deleted_count

    async def _change(self, job: Job, change: Change, outlast_s: float = 0.0) -> bool:
        """Apply the change only if nobody changed the job since it was read (same rev); the
        in-memory job takes it too. `outlast_s`: how long the write waits out a database outage
        (the outcome of a job that ran here: its answer is not thrown away; if the job's lease
        lapsed meanwhile and another instance took it, the rev no longer matches)."""
        rev = await self._writer.update(job.id, {"rev": job.rev}, change.update, retry_for_s=outlast_s)
        if rev is None:
            return False
        change.apply(job)
        job.rev = rev
        return True

    async def claim(self, job: Job, worker: str, now: datetime, lease_until: datetime) -> bool:
        return await self._change(job, transitions.claim(job, worker, now, lease_until))

    async def extend_leases(self, job_ids: list[str], worker: str, lease_until: datetime) -> int:
        result = await self._jobs.update_many(
            {"_id": {"$in": job_ids}, "state": JobState.RUNNING.value, "worker": worker},
            {"$set": {"lease_until": lease_until}},
        )
        return result.modified_count

    def _finish(self, state: JobState, now: datetime, fields: Fields, stored: Fields | None = None) -> Change:
        return transitions.finish(state, now, self._retention, fields, stored=stored, dropped=self._dropped)

    async def succeed(self, job: Job, now: datetime, result: Doc, outlast_s: float = 0.0) -> bool:
        stored: Fields | None = None
        if not self._store_outputs:
            kept = {k: v for k, v in result.items() if k not in _OUTPUT_FIELDS}
            stored = {"result": {**kept, "output_redacted": True}}
        finished = self._finish(JobState.SUCCEEDED, now, {"result": result}, stored)
        return await self._change(job, finished, outlast_s)

    async def fail(self, job: Job, now: datetime, error: Doc, outlast_s: float = 0.0) -> bool:
        return await self._change(job, self._finish(JobState.FAILED, now, {"error": error}), outlast_s)

    async def requeue(self, job: Job, not_before: datetime, error: Doc) -> bool:
        return await self._change(job, transitions.requeue(job, not_before, error))

    async def cancel(self, job_id: str, now: datetime, reason: str) -> Change | None:
        """By id and state only: the client that went away holds no fresh copy of the job. The
        change made, for the caller's copy, or None when the job had ended already."""
        change = self._finish(JobState.CANCELLED, now, {"error": {"type": "cancelled", "message": reason}})
        allowed = {"state": {"$in": [JobState.QUEUED.value, JobState.RUNNING.value]}}
        return change if await self._writer.update(job_id, allowed, change.update) is not None else None

    async def expire(self, job_id: str, now: datetime, error: Doc) -> bool:
        """By id and state only: the waiter that enforces the deadline holds no fresh copy."""
        change = self._finish(JobState.EXPIRED, now, {"error": error})
        return await self._writer.update(job_id, {"state": JobState.QUEUED.value}, change.update) is not None
