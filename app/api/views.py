"""How jobs are shown to clients (one place, so /api/chat and /api/jobs agree)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from app import errors
from app.queue.job import Job, JobState
from app.queue.jobs import timings

# The system we re-implement reports `completed`/`queued`/`processing`; clients grep for them.
COMPAT_STATUS = {
    JobState.QUEUED: "queued",
    JobState.RUNNING: "processing",
    JobState.SUCCEEDED: "completed",
    JobState.FAILED: "failed",
    JobState.CANCELLED: "cancelled",
    JobState.EXPIRED: "timeout",
}


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def job_view(job: Job) -> dict[str, Any]:
    view: dict[str, Any] = {
        "id": job.id,
        "request_id": job.id,
        "model": job.model,
        "state": job.state.value,
        "status": COMPAT_STATUS[job.state],
        "priority": job.priority.value,
        "client_id": job.client_id,
        "attempts": job.attempts,
        "created_at": _iso(job.enqueued_at),
        "started_at": _iso(job.started_at),
        "finished_at": _iso(job.finished_at),
        "timings": timings(job),
    }
    if job.result is not None:
        view["result"] = job.result
    if job.error is not None:
        view["error"] = job.error
    elif job.last_error is not None:
        view["last_error"] = job.last_error
    return view


def chat_answer(job: Job) -> dict[str, Any]:
    """The body of a successful /api/chat, or raises the error the job ended with."""
    raise_unless_succeeded(job)
    job_id = job.id
    result = job.result or {}
    reply: dict[str, Any] = result.get("message") or {"role": "assistant", "content": None}
    return {
        "id": job_id,
        "request_id": job_id,
        "status": "completed",
        "model": job.model,
        "message": reply,
        "response": reply.get("content"),
        "finish_reason": result.get("finish_reason"),
        "output_redacted": bool(result.get("output_redacted")),
        "usage": result.get("usage") or {},
        "attempts": job.attempts,
        "priority": job.priority.value,
        "timings": timings(job),
    }


def ocr_answer(job: Job) -> dict[str, Any]:
    """The body of a successful /api/ocr (`response` and `resolution` for older clients)."""
    raise_unless_succeeded(job)
    result = job.result or {}
    return {
        "id": job.id,
        "request_id": job.id,
        "status": "completed",
        "model": job.model,
        "mode": result.get("mode"),
        "resolution": result.get("mode"),
        "output": result.get("output"),
        "text": result.get("text"),
        "response": result.get("text"),
        "pages": result.get("pages", []),
        "truncated": bool(result.get("truncated")),
        "output_redacted": bool(result.get("output_redacted")),
        "usage": result.get("usage") or {},
        "attempts": job.attempts,
        "priority": job.priority.value,
        "timings": timings(job),
    }


def raise_unless_succeeded(job: Job) -> None:
    """Turn a job that did not succeed into the error it ended with."""
    state = job.state
    job_id = job.id
    error = job.error or {}
    if state == JobState.EXPIRED:
        raise errors.JobTimedOut(f"job {job_id} waited in the queue longer than the model's timeout", job_id)
    if state == JobState.CANCELLED:
        raise errors.JobCancelled(job_id)
    if state == JobState.FAILED:
        message = str(error.get("message", "the engine failed"))
        if error.get("type") == "timeout":
            raise errors.JobTimedOut(f"job {job_id}: {message}", job_id)
        status = error.get("engine_status")
        attempts = job.attempts
        prefix = (
            "engine rejected the request"
            if status and 400 <= status < 500
            else f"engine failed after {attempts} attempt(s)"
        )
        raise errors.JobFailed(f"{prefix}: {message}", job_id, status)
    if state != JobState.SUCCEEDED:
        raise errors.JobTimedOut(f"job {job_id} is still {state.value}", job_id)
