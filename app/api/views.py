"""How job documents are shown to clients (one place, so /api/chat and /api/jobs agree)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from app import errors
from app.queue.jobs import Doc, JobState, timings

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


def job_view(doc: Doc) -> dict[str, Any]:
    state = JobState(doc["state"])
    view: dict[str, Any] = {
        "id": doc["_id"],
        "request_id": doc["_id"],
        "model": doc["model"],
        "state": state.value,
        "status": COMPAT_STATUS[state],
        "priority": doc.get("priority"),
        "client_id": doc.get("client_id"),
        "attempts": doc.get("attempts", 0),
        "created_at": _iso(doc.get("enqueued_at")),
        "started_at": _iso(doc.get("started_at")),
        "finished_at": _iso(doc.get("finished_at")),
        "timings": timings(doc),
    }
    if "result" in doc:
        view["result"] = doc["result"]
    if "error" in doc:
        view["error"] = doc["error"]
    elif "last_error" in doc:
        view["last_error"] = doc["last_error"]
    return view


def chat_answer(doc: Doc) -> dict[str, Any]:
    """The body of a successful /api/chat, or raises the error the job ended with."""
    raise_unless_succeeded(doc)
    job_id = doc["_id"]
    result = doc.get("result") or {}
    reply: dict[str, Any] = result.get("message") or {"role": "assistant", "content": None}
    return {
        "id": job_id,
        "request_id": job_id,
        "status": "completed",
        "model": doc["model"],
        "message": reply,
        "response": reply.get("content"),
        "finish_reason": result.get("finish_reason"),
        "output_redacted": bool(result.get("output_redacted")),
        "usage": result.get("usage") or {},
        "attempts": doc.get("attempts", 1),
        "priority": doc.get("priority"),
        "timings": timings(doc),
    }


def ocr_answer(doc: Doc) -> dict[str, Any]:
    """The body of a successful /api/ocr (`response` and `resolution` for older clients)."""
    raise_unless_succeeded(doc)
    result = doc.get("result") or {}
    return {
        "id": doc["_id"],
        "request_id": doc["_id"],
        "status": "completed",
        "model": doc["model"],
        "mode": result.get("mode"),
        "resolution": result.get("mode"),
        "output": result.get("output"),
        "text": result.get("text"),
        "response": result.get("text"),
        "pages": result.get("pages", []),
        "truncated": bool(result.get("truncated")),
        "output_redacted": bool(result.get("output_redacted")),
        "usage": result.get("usage") or {},
        "attempts": doc.get("attempts", 1),
        "priority": doc.get("priority"),
        "timings": timings(doc),
    }


def raise_unless_succeeded(doc: Doc) -> None:
    """Turn a job that did not succeed into the error it ended with."""
    state = JobState(doc["state"])
    job_id = doc["_id"]
    error = doc.get("error") or {}
    if state == JobState.EXPIRED:
        raise errors.JobTimedOut(f"job {job_id} waited in the queue longer than the model's timeout", job_id)
    if state == JobState.CANCELLED:
        raise errors.JobCancelled(job_id)
    if state == JobState.FAILED:
        message = str(error.get("message", "the engine failed"))
        if error.get("type") == "timeout":
            raise errors.JobTimedOut(f"job {job_id}: {message}", job_id)
        status = error.get("engine_status")
        attempts = doc.get("attempts", 0)
        prefix = (
            "engine rejected the request"
            if status and 400 <= status < 500
            else f"engine failed after {attempts} attempt(s)"
        )
        raise errors.JobFailed(f"{prefix}: {message}", job_id, status)
    if state != JobState.SUCCEEDED:
        raise errors.JobTimedOut(f"job {job_id} is still {state.value}", job_id)
