"""A job's transitions as values (pure): each gives the conditional write's update and the fields
the job held in this process takes, so the database and the in-memory job cannot drift apart
(they were written twice, as a `$set` in the store and again as a `doc.update` in the queue).

Where the two differ on purpose, the transition says so: with `history.store_outputs` off the
database keeps a redacted result while the waiting client still gets the answer, and the
in-memory job keeps its `slot` so this instance can free its slot hint.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from app.queue.jobs import JobState

Doc = dict[str, Any]


@dataclass(frozen=True)
class Change:
    update: Doc  # the database's: $set / $unset / $inc
    fields: Doc  # what the job in memory takes
    removed: tuple[str, ...] = ()  # what the job in memory loses

    def apply(self, job: Doc) -> None:
        job.update(self.fields)
        for key in self.removed:
            job.pop(key, None)


def claim(job: Doc, worker: str, now: datetime, lease_until: datetime) -> Change:
    running = {
        "state": JobState.RUNNING.value,
        "worker": worker,
        "lease_until": lease_until,
        "started_at": now,
    }
    return Change(
        {"$set": running, "$inc": {"attempts": 1}},
        {**running, "attempts": int(job.get("attempts", 0)) + 1},
    )


def finish(
    state: JobState,
    now: datetime,
    retention: timedelta,
    fields: Doc,
    *,
    stored: Doc | None = None,
    dropped: Iterable[str] = (),
) -> Change:
    """A terminal transition: `slot` is unset (the queue place is freed in the same write) and
    `expire_at` set (the TTL index turns it into the history retention). `stored`: what the
    database keeps instead of `fields` (a redacted result); `dropped`: fields history does not
    keep (the prompt with `store_prompts` off)."""
    ended = {"state": state.value, "finished_at": now}
    return Change(
        {
            "$set": {**ended, "expire_at": now + retention, **(fields if stored is None else stored)},
            "$unset": {"slot": "", "lease_until": "", "not_before": "", **dict.fromkeys(dropped, "")},
        },
        {**ended, **fields},
    )


def requeue(job: Doc, not_before: datetime, error: Doc) -> Change:
    """Back to the queue after a failed or lost attempt, with a fresh queue-wait deadline: the
    time spent running does not count against the wait of the retry."""
    deadline = not_before + timedelta(seconds=float(job.get("queue_timeout_s", 300)))
    queued = {
        "state": JobState.QUEUED.value,
        "not_before": not_before,
        "queue_deadline": deadline,
        "last_error": error,
    }
    return Change(
        {"$set": queued, "$unset": {"worker": "", "lease_until": ""}},
        queued,
        removed=("worker", "lease_until"),
    )
