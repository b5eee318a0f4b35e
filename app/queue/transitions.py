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
from typing import TypedDict

from app.queue.job import Doc, Job, JobState

UNCOUNTED = "uncounted"  # an ended job's outcomes, until its model's totals have them


class Fields(TypedDict, total=False):
    """What a transition sets, by the Job's attribute names: the document's keys (a transition
    never touches `_id`, the one key named otherwise). None takes the field off the job."""

    state: JobState
    worker: str | None
    lease_until: datetime | None
    started_at: datetime
    attempts: int
    not_before: datetime
    queue_deadline: datetime
    last_error: Doc
    finished_at: datetime
    result: Doc
    error: Doc


def _document(fields: Fields) -> Doc:
    """The fields as the document holds them: the state as its name."""
    return {name: value.value if isinstance(value, JobState) else value for name, value in fields.items()}


@dataclass(frozen=True)
class Change:
    update: Doc  # the database's: $set / $unset / $inc
    fields: Fields  # what the job in memory takes

    def apply(self, job: Job) -> None:
        for name, value in self.fields.items():
            setattr(job, name, value)


def claim(job: Job, worker: str, now: datetime, lease_until: datetime) -> Change:
    running: Fields = {
        "state": JobState.RUNNING,
        "worker": worker,
        "lease_until": lease_until,
        "started_at": now,
    }
    return Change(
        {"$set": _document(running), "$inc": {"attempts": 1}},
        {**running, "attempts": job.attempts + 1},
    )


def finish(
    state: JobState,
    now: datetime,
    retention: timedelta,
    fields: Fields,
    *,
    stored: Fields | None = None,
    dropped: Iterable[str] = (),
) -> Change:
    """A terminal transition: `slot` is unset (the queue place is freed in the same write) and
    `expire_at` set (the TTL index turns it into the history retention). `stored`: what the
    database keeps instead of `fields` (a redacted result); `dropped`: fields history does not
    keep (the prompt with `store_prompts` off)."""
    ended: Fields = {"state": state, "finished_at": now}
    return Change(
        {
            "$set": {
                **_document(ended),
                "expire_at": now + retention,
                **_document(fields if stored is None else stored),
                UNCOUNTED: outcomes(state, fields),  # the totals take it from here (app/queue/stats.py)
            },
            "$unset": {"slot": "", "lease_until": "", "not_before": "", **dict.fromkeys(dropped, "")},
        },
        {**ended, **fields},
    )


def timed_out(state: JobState, error: Doc | None) -> bool:
    """A job that failed by the processing timeout (an expired one waited too long instead)."""
    return state == JobState.FAILED and (error or {}).get("type") == "timeout"


def outcomes(state: JobState, fields: Fields) -> list[str]:
    """What an ended job adds to its model's totals: its state, and `timeouts` for a job that
    failed by the processing timeout."""
    return [state.value, "timeouts"] if timed_out(state, fields.get("error")) else [state.value]


def requeue(job: Job, not_before: datetime, error: Doc) -> Change:
    """Back to the queue after a failed or lost attempt, with a fresh queue-wait deadline: the
    time spent running does not count against the wait of the retry."""
    queued: Fields = {
        "state": JobState.QUEUED,
        "not_before": not_before,
        "queue_deadline": not_before + timedelta(seconds=job.queue_timeout_s),
        "last_error": error,
    }
    return Change(
        {"$set": _document(queued), "$unset": {"worker": "", "lease_until": ""}},
        {**queued, "worker": None, "lease_until": None},
    )
