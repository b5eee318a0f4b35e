"""The job as the queue works on it: typed, built once from its document (docs/ARCHITECTURE.md,
"The job document").

The document in `jobs` is the contract: clients and older instances read it, so `to_document`
writes exactly the keys it always had, in the order admission always wrote them, and
`from_document` is the only place that reads its keys. Everything past it reads attributes.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from app.errors import InvalidRequest
from app.queue.priority import Priority

Doc = dict[str, Any]


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL

    @classmethod
    def parse(cls, value: str) -> JobState:
        """Our names, or the ones clients of the system we re-implement use (`completed`, ...)."""
        name = _COMPAT_NAMES.get(value.strip().lower(), value.strip().lower())
        try:
            return cls(name)
        except ValueError:
            valid = ", ".join(s.value for s in cls)
            raise InvalidRequest(
                f"unknown job state {value[:40]!r}; valid states: {valid}", param="state"
            ) from None


_COMPAT_NAMES = {"completed": "succeeded", "processing": "running", "timeout": "expired"}
_TERMINAL = {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.EXPIRED}


@dataclass(slots=True)
class Job:
    """One job. Mutable on purpose: each conditional write that took effect is applied to the
    job in memory (transitions.py), and a job launched before its insert is the very object the
    insert and the dispatcher share. An optional field is None when the document lacks the key."""

    id: str  # the document's `_id`
    model: str
    kind: str  # "chat" or "ocr"
    state: JobState
    priority: Priority
    priority_rank: int  # the claim index sorts by it, so it is stored beside the priority
    owner: str
    client_id: str
    enqueued_at: datetime
    queue_deadline: datetime  # a retry gets a fresh one
    queue_timeout_s: float
    attempts: int
    rev: str  # the version every conditional write matches; each write stamps a new one
    slot: str | None = None  # the queue place held under a unique index; freed when the job ends
    # the engine's request: left out of listings, and out of history with `store_prompts` off
    request: Doc | None = None
    idempotency_key: str | None = None
    idempotency_scope: str | None = None  # owner and key: the unique index of a key
    request_hash: str | None = None  # what a repeated key must match
    pinned_to: str | None = None  # the instance holding a streamed job's client
    stream: bool = False  # stored only when true
    worker: str | None = None
    lease_until: datetime | None = None
    started_at: datetime | None = None
    not_before: datetime | None = None  # a retry's backoff
    last_error: Doc | None = None  # what ended the previous attempt
    finished_at: datetime | None = None
    expire_at: datetime | None = None  # the TTL index: history retention
    result: Doc | None = None
    error: Doc | None = None

    @classmethod
    def from_document(cls, doc: Doc) -> Job:
        """The job a full document holds, or one read without its request (listings)."""
        return cls(
            id=doc["_id"],
            model=doc["model"],
            kind=doc["kind"],
            state=JobState(doc["state"]),
            priority=Priority(doc["priority"]),
            priority_rank=doc["priority_rank"],
            owner=doc["owner"],
            client_id=doc["client_id"],
            enqueued_at=doc["enqueued_at"],
            queue_deadline=doc["queue_deadline"],
            queue_timeout_s=doc["queue_timeout_s"],
            attempts=doc["attempts"],
            rev=doc["rev"],
            slot=doc.get("slot"),
            request=doc.get("request"),
            idempotency_key=doc.get("idempotency_key"),
            idempotency_scope=doc.get("idempotency_scope"),
            request_hash=doc.get("request_hash"),
            pinned_to=doc.get("pinned_to"),
            stream=doc.get("stream", False),
            worker=doc.get("worker"),
            lease_until=doc.get("lease_until"),
            started_at=doc.get("started_at"),
            not_before=doc.get("not_before"),
            last_error=doc.get("last_error"),
            finished_at=doc.get("finished_at"),
            expire_at=doc.get("expire_at"),
            result=doc.get("result"),
            error=doc.get("error"),
        )

    def to_document(self) -> Doc:
        """The document, its keys in the order admission has always written them (a new job's
        insert is the same BSON as before); a field that is None is a key the document lacks."""
        doc: Doc = {
            "_id": self.id,
            "model": self.model,
            "kind": self.kind,
            "state": self.state.value,
            "priority": self.priority.value,
            "priority_rank": self.priority_rank,
            "slot": self.slot,
            "owner": self.owner,
            "client_id": self.client_id,
            "request": self.request,
            "enqueued_at": self.enqueued_at,
            "queue_deadline": self.queue_deadline,
            "queue_timeout_s": self.queue_timeout_s,
            "attempts": self.attempts,
            "rev": self.rev,
            "idempotency_key": self.idempotency_key,
            "idempotency_scope": self.idempotency_scope,
            "request_hash": self.request_hash,
            "pinned_to": self.pinned_to,
            "stream": self.stream or None,
            "worker": self.worker,
            "lease_until": self.lease_until,
            "started_at": self.started_at,
            "not_before": self.not_before,
            "last_error": self.last_error,
            "finished_at": self.finished_at,
            "expire_at": self.expire_at,
            "result": self.result,
            "error": self.error,
        }
        return {key: value for key, value in doc.items() if value is not None}

    def request_to_run(self) -> Doc:
        """The request, for the engine. A job read without it (a listing, or history that does not
        keep prompts) is never one that runs; if it were, this fails its attempt loudly."""
        if self.request is None:
            raise LookupError(f"job {self.id} was read without its request")
        return self.request
