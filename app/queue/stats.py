"""Per-model outcome totals (succeeded, failed, expired, ...) for the admin queue view: exact,
and never going backwards.

Counting finished jobs in history costs SecantusDB ~35 ms per 1,000 documents, so the totals
live in one `queue_stats` document per model. They used to be counted in memory and added every
2 s, so a kill -9 lost the last interval: 10 jobs done, a crash, and `total_processed` read 5
(a counter that goes backwards breaks every rate() on it). Now the terminal transition itself
marks the job `uncounted` (its outcomes) in the same journaled write that ends it
(app/queue/transitions.py), and a tally pass moves those marks into the totals exactly once:

1. the totals take the batch's counts and remember its job ids (`pending`) in one atomic update
   of the model's document;
2. the marks are taken off those jobs (`pending` is kept, marked settled).

A pass that dies after 1 is finished by the next one (it takes the marks off `pending`'s jobs
without counting them again); a job ends only once, so its mark never changes under the pass.
One instance tallies at a time (a lease). A reader adds the marks not yet tallied (a small read
through a sparse index), the jobs read before the totals and `pending`'s excluded, so what it
gets is exact at any moment of a pass, on every instance, and never smaller than before.

Retries are not an outcome (a job is requeued many times): they are counted in memory and added
every interval, and a crash can lose the last interval's retries.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from pymongo.asynchronous.collection import AsyncCollection

from app.queue.transitions import UNCOUNTED
from app.store.lease import Lease

Doc = dict[str, Any]
OUTCOMES = ("succeeded", "failed", "expired", "cancelled", "timeouts", "retries")
BATCH = 1000
LEASE_S = 30.0


class OutcomeCounters:
    def __init__(
        self, stats: AsyncCollection[Doc], jobs: AsyncCollection[Doc], lease: Lease | None = None
    ) -> None:
        self._stats = stats
        self._jobs = jobs
        self._lease = lease  # None: this instance tallies without asking (one instance, tests)
        self._retries: Counter[str] = Counter()

    def record_retry(self, model: str) -> None:
        self._retries[model] += 1

    async def flush(self) -> None:
        """One interval: this instance's retries, then (by the lease holder) a tally pass when
        there is anything to tally (an idle gateway writes nothing: two indexed reads)."""
        await self._flush_retries()
        if not await self._work_left():
            return
        if self._lease is None or await self._lease.hold(LEASE_S):
            await self.tally()

    async def _work_left(self) -> bool:
        marked = await self._jobs.find_one({UNCOUNTED: {"$exists": True}}, {"_id": 1})
        return marked is not None or await self._stats.find_one({"settled": False}, {"_id": 1}) is not None

    async def _flush_retries(self) -> None:
        pending, self._retries = self._retries, Counter()
        for model, n in pending.items():
            try:
                await self._stats.update_one({"_id": model}, {"$inc": {"counts.retries": n}}, upsert=True)
            except Exception:
                self._retries[model] += n  # kept for the next interval
                raise

    async def tally(self) -> int:
        """Move the outcomes of ended jobs into the totals, exactly once; returns how many jobs."""
        await self._settle()
        marked: dict[str, list[Doc]] = {}
        async for job in self._jobs.find({UNCOUNTED: {"$exists": True}}, {"model": 1, UNCOUNTED: 1}).limit(
            BATCH
        ):
            marked.setdefault(str(job["model"]), []).append(job)
        for model, jobs in marked.items():
            counts = Counter(outcome for job in jobs for outcome in job[UNCOUNTED])
            ids = [job["_id"] for job in jobs]
            await self._stats.update_one(
                {"_id": model},
                {
                    "$inc": {f"counts.{k}": v for k, v in counts.items()},
                    "$set": {"pending": ids, "settled": False},
                },
                upsert=True,
            )
            await self._unmark(model, ids)
        return sum(len(jobs) for jobs in marked.values())

    async def _settle(self) -> None:
        """A pass that died between counting and unmarking: its jobs are unmarked, not recounted."""
        async for doc in self._stats.find({"settled": False}, {"pending": 1}):
            await self._unmark(doc["_id"], list(doc.get("pending", [])))

    async def _unmark(self, model: str, ids: list[Any]) -> None:
        await self._jobs.update_many({"_id": {"$in": ids}}, {"$unset": {UNCOUNTED: ""}})
        await self._stats.update_one({"_id": model}, {"$set": {"settled": True}})

    async def totals(self, model: str) -> dict[str, int]:
        """Exact now: the totals plus the marks not yet tallied (the jobs are read first: a pass
        that counts a batch between the two reads is then seen in `pending`, not twice)."""
        untallied = {
            job["_id"]: job[UNCOUNTED]
            async for job in self._jobs.find({UNCOUNTED: {"$exists": True}, "model": model}, {UNCOUNTED: 1})
        }
        doc = await self._stats.find_one({"_id": model}) or {}
        counted = set(doc.get("pending", []))
        extra = Counter(
            o for job_id, outcomes in untallied.items() if job_id not in counted for o in outcomes
        )
        extra["retries"] += self._retries[model]
        stored = doc.get("counts", {})
        return {k: int(stored.get(k, 0)) + extra[k] for k in OUTCOMES}
