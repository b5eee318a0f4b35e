"""A job's transitions: the database's update and the in-memory job come from one value."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from app.queue import transitions
from app.queue.job import Job, JobState
from app.queue.priority import Priority
from app.queue.transitions import Fields

NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)


def _job(state: JobState, attempts: int = 1) -> Job:
    return Job(
        id="job_1",
        model="m",
        kind="chat",
        state=state,
        priority=Priority.NORMAL,
        priority_rank=Priority.NORMAL.rank,
        owner="alice",
        client_id="t",
        enqueued_at=NOW,
        queue_deadline=NOW + timedelta(seconds=60),
        queue_timeout_s=60,
        attempts=attempts,
        rev="rev-1",
    )


def test_a_claim_sets_the_same_fields_in_the_database_and_in_memory() -> None:
    job = _job(JobState.QUEUED, attempts=1)
    change = transitions.claim(job, "worker-a", NOW, NOW + timedelta(seconds=30))
    change.apply(job)
    assert change.update["$set"] == {
        k: getattr(job, k) for k in ("state", "worker", "lease_until", "started_at")
    }
    assert change.update["$inc"] == {"attempts": 1} and job.attempts == 2
    assert job.state == JobState.RUNNING.value and job.worker == "worker-a"


def test_a_finish_frees_the_slot_in_the_database_and_keeps_it_in_memory() -> None:
    job = _job(JobState.RUNNING)
    job.slot, job.request = "m:3", {"messages": []}
    result = {"message": {"role": "assistant", "content": "hi"}, "usage": {"completion_tokens": 1}}
    redacted: Fields = {"result": {"usage": {"completion_tokens": 1}, "output_redacted": True}}
    change = transitions.finish(
        JobState.SUCCEEDED, NOW, timedelta(days=15), {"result": result}, stored=redacted, dropped=("request",)
    )
    change.apply(job)
    stored = change.update["$set"]
    assert stored["result"] == redacted["result"] and stored["expire_at"] == NOW + timedelta(days=15)
    assert set(change.update["$unset"]) == {"slot", "lease_until", "not_before", "request"}
    assert job.result == result  # the waiting client still gets the answer
    assert job.slot == "m:3"  # this instance frees its slot hint from it
    assert (job.state, job.finished_at) == ("succeeded", NOW)


def test_a_requeue_gives_a_fresh_queue_deadline_and_takes_the_worker_off() -> None:
    job = _job(JobState.RUNNING)
    job.worker, job.lease_until = "w", NOW
    change = transitions.requeue(job, NOW + timedelta(seconds=2), {"type": "engine_error"})
    change.apply(job)
    assert job.queue_deadline == NOW + timedelta(seconds=62) == change.update["$set"]["queue_deadline"]
    assert job.worker is None and job.lease_until is None
    assert set(change.update["$unset"]) == {"worker", "lease_until"}
