"""The typed job and its document: read once by `Job.from_document`, written by `to_document`, and
the document is the one clients and older instances have always read."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import bson
import pytest

from app.queue.job import Job, JobState
from app.queue.jobs import Submission, build_job, idempotency_scope, request_fingerprint
from app.queue.priority import Priority

NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
REQUEST = {"messages": [{"role": "user", "content": "hi"}]}


def _submission(key: str | None = None, pinned_to: str | None = None) -> Submission:
    return Submission(
        model="m",
        kind="chat",
        request=REQUEST,
        owner="alice",
        client_id="t",
        priority=Priority.HIGH,
        idempotency_key=key,
        queue_timeout_s=30.0,
        pinned_to=pinned_to,
    )


def test_a_queued_job_is_written_as_admission_always_wrote_it() -> None:
    job = build_job(_submission(), "job_1", "m#0", NOW, None)
    written = {
        "_id": "job_1",
        "model": "m",
        "kind": "chat",
        "state": "queued",
        "priority": "high",
        "priority_rank": 0,
        "slot": "m#0",
        "owner": "alice",
        "client_id": "t",
        "request": REQUEST,
        "enqueued_at": NOW,
        "queue_deadline": NOW + timedelta(seconds=30),
        "queue_timeout_s": 30.0,
        "attempts": 0,
        "rev": job.rev,
    }
    assert list(job.to_document().items()) == list(written.items())  # keys, their order, values
    assert bson.encode(job.to_document()) == bson.encode(written)
    assert all(type(job.to_document()[key]) is str for key in ("state", "priority"))


def test_a_job_started_at_once_with_a_key_and_a_stream_is_written_as_before() -> None:
    lease_until = NOW + timedelta(seconds=30)
    job = build_job(_submission("key-1", pinned_to="w1"), "job_2", "m#1", NOW, ("w1", lease_until))
    written = {
        "_id": "job_2",
        "model": "m",
        "kind": "chat",
        "state": "running",
        "priority": "high",
        "priority_rank": 0,
        "slot": "m#1",
        "owner": "alice",
        "client_id": "t",
        "request": REQUEST,
        "enqueued_at": NOW,
        "queue_deadline": NOW + timedelta(seconds=30),
        "queue_timeout_s": 30.0,
        "attempts": 1,
        "rev": job.rev,
        "idempotency_key": "key-1",
        "idempotency_scope": idempotency_scope("alice", "key-1"),
        "request_hash": request_fingerprint("m", REQUEST),
        "pinned_to": "w1",
        "stream": True,
        "worker": "w1",
        "lease_until": lease_until,
        "started_at": NOW,
    }
    assert list(job.to_document().items()) == list(written.items())
    assert bson.encode(job.to_document()) == bson.encode(written)


QUEUED: dict[str, Any] = {
    "_id": "job_q",
    "model": "m",
    "kind": "chat",
    "state": "queued",
    "priority": "normal",
    "priority_rank": 1,
    "slot": "m#2",
    "owner": "alice",
    "client_id": "t",
    "request": REQUEST,
    "enqueued_at": NOW,
    "queue_deadline": NOW + timedelta(seconds=300),
    "queue_timeout_s": 300.0,
    "attempts": 0,
    "rev": "rev-q",
}
# back in the queue after a lost attempt: backoff and the attempt's error, worker and lease gone
RETRYING = {
    **QUEUED,
    "attempts": 1,
    "rev": "rev-r",
    "started_at": NOW,
    "not_before": NOW + timedelta(seconds=2),
    "last_error": {"type": "engine_error", "message": "boom", "retryable": True, "attempt": 1},
}
RUNNING = {
    **QUEUED,
    "_id": "job_r",
    "kind": "ocr",
    "state": "running",
    "attempts": 1,
    "rev": "rev-2",
    "idempotency_key": "k",
    "idempotency_scope": "alice\x1fk",
    "request_hash": "abc",
    "pinned_to": "w1",
    "stream": True,
    "worker": "w1",
    "lease_until": NOW + timedelta(seconds=30),
    "started_at": NOW,
}
# ended: slot, lease and backoff unset, the prompt dropped (store_prompts off), TTL set
SUCCEEDED = {
    key: value
    for key, value in {
        **RUNNING,
        "state": "succeeded",
        "rev": "rev-3",
        "finished_at": NOW + timedelta(seconds=1),
        "expire_at": NOW + timedelta(days=15, seconds=1),
        "result": {"message": {"role": "assistant", "content": "hi"}, "usage": {}},
    }.items()
    if key not in ("slot", "lease_until", "request")
}
FAILED = {
    **{key: value for key, value in RETRYING.items() if key not in ("slot", "not_before")},
    "state": "failed",
    "attempts": 2,
    "worker": "w2",
    "finished_at": NOW + timedelta(seconds=5),
    "expire_at": NOW + timedelta(days=15, seconds=5),
    "error": {"type": "engine_error", "message": "refused", "engine_status": 400},
}
LISTED = {key: value for key, value in RUNNING.items() if key != "request"}  # read with {"request": 0}


@pytest.mark.parametrize(
    "document",
    [QUEUED, RETRYING, RUNNING, SUCCEEDED, FAILED, LISTED],
    ids=["queued", "retrying", "running", "succeeded", "failed", "listed"],
)
def test_a_document_round_trips_exactly(document: dict[str, Any]) -> None:
    job = Job.from_document(document)
    assert job.to_document() == document
    assert Job.from_document(job.to_document()) == job


def test_absent_keys_are_none_and_present_ones_typed() -> None:
    queued, running, succeeded = (Job.from_document(d) for d in (QUEUED, RUNNING, SUCCEEDED))
    assert (queued.state, queued.priority) == (JobState.QUEUED, Priority.NORMAL)
    assert queued.worker is None and queued.idempotency_key is None and not queued.stream
    assert (running.worker, running.stream, running.slot) == ("w1", True, "m#2")
    assert succeeded.state.terminal and succeeded.slot is None and succeeded.request is None
    assert "slot" not in succeeded.to_document() and "request" not in succeeded.to_document()


def test_a_job_read_without_its_request_is_refused_to_the_engine() -> None:
    with pytest.raises(LookupError, match="job_r"):
        Job.from_document(LISTED).request_to_run()
    assert Job.from_document(RUNNING).request_to_run() == REQUEST
