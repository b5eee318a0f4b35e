"""What admission makes of a request, and how jobs are paged and timed for clients (the job
itself, typed, is app/queue/job.py)."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import bson
import bson.errors

from app.errors import InvalidRequest
from app.queue.job import Doc, Job, JobState
from app.queue.priority import Priority


def new_job_id() -> str:
    return "job_" + secrets.token_hex(12)


@dataclass(frozen=True)
class Submission:
    """What a client asked for, as the queue needs it."""

    model: str
    kind: str
    request: Doc
    owner: str
    client_id: str
    priority: Priority
    idempotency_key: str | None
    queue_timeout_s: float
    # a streamed job runs only on the instance that holds the client's connection
    pinned_to: str | None = None
    # what identifies the request for an Idempotency-Key replay, when that is not the whole
    # `request` (OCR: the document's hash and the options, not the file name)
    request_hash: str | None = None

    def __post_init__(self) -> None:
        check_storable(self.request)


def check_storable(request: Doc) -> None:
    """Refuse (400) a request the database cannot store, before it is admitted.

    The API's schemas leave little room, but this is the last line: a document BSON cannot
    encode would fail the whole group-committed write it joined, other clients' jobs included.
    """
    try:
        bson.encode({"request": request})
    except OverflowError:
        raise InvalidRequest("the request holds an integer beyond 64 bits; it cannot be stored") from None
    except UnicodeEncodeError:
        raise InvalidRequest(
            "the request holds text that is not valid Unicode (a lone surrogate such as \\ud800)"
        ) from None
    except (bson.errors.InvalidDocument, ValueError) as exc:
        raise InvalidRequest(f"the request cannot be stored: {str(exc)[:200]}") from None


def idempotency_scope(owner: str, key: str) -> str:
    """Keys are per caller: alice's key-1 and bob's key-1 are different jobs."""
    return f"{owner}\x1f{key}"


def request_fingerprint(model: str, request: Doc) -> str:
    """Stable hash of what was asked, so a reused Idempotency-Key with another request is caught."""
    canonical = json.dumps(
        {"model": model, "request": request}, sort_keys=True, separators=(",", ":"), default=str
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_CURSOR = re.compile(r"^(\d{1,16})\.([A-Za-z0-9_-]{1,64})$")


@dataclass(frozen=True)
class ListingCursor:
    """Where a page of the job listing ended: newest first by (enqueued_at, _id), so jobs
    admitted in the same millisecond (the database's precision) are neither skipped nor
    repeated. Sent to clients as an opaque string."""

    enqueued_at: datetime
    job_id: str

    @classmethod
    def after(cls, job: Job) -> ListingCursor:
        return cls(job.enqueued_at, job.id)

    def encode(self) -> str:
        at = self.enqueued_at if self.enqueued_at.tzinfo else self.enqueued_at.replace(tzinfo=UTC)
        ms = (at - _EPOCH) // timedelta(milliseconds=1)
        return base64.urlsafe_b64encode(f"{ms}.{self.job_id}".encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, value: str) -> ListingCursor:
        try:
            raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).decode("ascii")
        except (binascii.Error, ValueError):
            raw = ""
        match = _CURSOR.match(raw)
        if match is None:
            raise InvalidRequest(
                "cursor is not one this gateway gave out; pass the `next` value of the previous page",
                param="cursor",
            )
        return cls(_EPOCH + timedelta(milliseconds=int(match[1])), match[2])


def elapsed_ms(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return round((end - start).total_seconds() * 1000, 3)


def timings(job: Job) -> dict[str, float | None]:
    return {
        "queue_ms": elapsed_ms(job.enqueued_at, job.started_at),
        "engine_ms": elapsed_ms(job.started_at, job.finished_at),
        "total_ms": elapsed_ms(job.enqueued_at, job.finished_at),
    }


def build_job(
    sub: Submission, job_id: str, slot: str, now: datetime, running_as: tuple[str, datetime] | None
) -> Job:
    """A new job, queued, or already running when the admitting instance can start it at once."""
    job = Job(
        id=job_id,
        model=sub.model,
        kind=sub.kind,
        state=JobState.QUEUED,
        priority=sub.priority,
        priority_rank=sub.priority.rank,
        slot=slot,
        owner=sub.owner,
        client_id=sub.client_id,
        request=sub.request,
        enqueued_at=now,
        queue_deadline=now + timedelta(seconds=sub.queue_timeout_s),
        queue_timeout_s=sub.queue_timeout_s,
        attempts=0,
        rev=secrets.token_hex(16),  # the version every later transition is conditional on
    )
    if sub.idempotency_key is not None:
        job.idempotency_key = sub.idempotency_key
        job.idempotency_scope = idempotency_scope(sub.owner, sub.idempotency_key)
        job.request_hash = sub.request_hash or request_fingerprint(sub.model, sub.request)
    if sub.pinned_to is not None:
        job.pinned_to = sub.pinned_to
        job.stream = True
    if running_as is not None:
        job.state = JobState.RUNNING
        job.worker, job.lease_until = running_as
        job.started_at = now
        job.attempts = 1
    return job
