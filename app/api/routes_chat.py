"""POST /api/chat and the job lookup: every request goes through the durable queue."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request, Response

from app.api.deps import PrincipalDep, ServicesDep, client_id, idempotency_key
from app.api.routes_ocr import OCR_FORM_SCHEMA, read_ocr_request
from app.api.schemas import ChatRequest, JobRequest, inline_schema, parse_json_body
from app.api.views import chat_answer, job_view
from app.errors import InvalidRequest, JobNotFound
from app.queue.job import JobState
from app.queue.jobs import ListingCursor
from app.queue.priority import Priority

router = APIRouter()


@router.post("/api/chat")
async def chat(
    body: ChatRequest,
    svc: ServicesDep,
    user: PrincipalDep,
    client: Annotated[str, Depends(client_id)],
    key: Annotated[str | None, Depends(idempotency_key)],
    x_priority: Annotated[str | None, Header()] = None,
) -> dict[str, Any]:
    if body.stream:
        raise InvalidRequest(
            "stream is not supported on /api/chat; use POST /v1/chat/completions", param="stream"
        )
    priority = Priority.parse(x_priority)
    job = await svc.chat.complete(user, body.engine_request(), client, priority, key)
    return chat_answer(job)


_JOB_REQUEST_BODY = {
    "required": True,
    "content": {
        "application/json": {"schema": inline_schema(JobRequest)},
        "multipart/form-data": {"schema": OCR_FORM_SCHEMA},
    },
}


@router.post("/api/jobs", status_code=202, openapi_extra={"requestBody": _JOB_REQUEST_BODY})
async def submit_job(
    request: Request,
    response: Response,
    svc: ServicesDep,
    user: PrincipalDep,
    client: Annotated[str, Depends(client_id)],
    key: Annotated[str | None, Depends(idempotency_key)],
    x_priority: Annotated[str | None, Header()] = None,
    x_resolution: Annotated[str | None, Header()] = None,
) -> dict[str, Any]:
    """Admit and answer at once; the client polls `location` (or repeats its Idempotency-Key).

    A JSON chat body (`"type": "chat"`, the rest as for /api/chat), or an OCR document as
    multipart exactly as for /api/ocr.
    """
    priority = Priority.parse(x_priority)
    if request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        ask = await read_ocr_request(request, svc.settings.ocr.max_upload_bytes, x_resolution)
        job = await svc.ocr.submit(user, ask, client, priority, key, wait=False)
    else:
        body = parse_json_body(JobRequest, await request.body())
        job = await svc.chat.submit(user, body.engine_request(), client, priority, key)
    location = f"/api/jobs/{job.id}"
    response.headers["Location"] = location
    return {**job_view(job), "location": location, "position": await svc.chat.position(job)}


@router.get("/api/jobs")
async def list_jobs(
    svc: ServicesDep,
    user: PrincipalDep,
    state: str | None = None,
    model: Annotated[str | None, Query(max_length=128)] = None,
    before: Annotated[
        datetime | None, Query(description="only jobs created before this time (prefer `cursor`)")
    ] = None,
    cursor: Annotated[
        str | None, Query(max_length=200, description="the `next` value of the previous page")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> dict[str, Any]:
    """Own jobs newest first (admins: everyone's); page back with `cursor` = the previous
    page's `next` (null on the last page)."""
    if cursor is not None and before is not None:
        raise InvalidRequest("send either cursor or before, not both", param="cursor")
    after = ListingCursor.decode(cursor) if cursor is not None else None
    wanted = JobState.parse(state) if state else None
    jobs = await svc.chat.jobs(user, state=wanted, model=model, before=before, limit=limit + 1, after=after)
    page = jobs[:limit]
    more = len(jobs) > limit
    return {
        "object": "list",
        "data": [job_view(job) for job in page],
        "has_more": more,
        "next": ListingCursor.after(page[-1]).encode() if more else None,
    }


@router.get("/api/jobs/{job_id}")
async def get_job(job_id: str, svc: ServicesDep, user: PrincipalDep) -> dict[str, Any]:
    job = await svc.chat.job(user, job_id[:64])
    if job is None:
        raise JobNotFound(job_id[:64])
    return {**job_view(job), "position": await svc.chat.position(job)}


@router.delete("/api/jobs/{job_id}")
async def cancel_job(job_id: str, svc: ServicesDep, user: PrincipalDep) -> dict[str, Any]:
    """Cancel a queued or running job (a running one's engine call is stopped); 409 if it ended."""
    return job_view(await svc.chat.cancel_job(user, job_id[:64]))
