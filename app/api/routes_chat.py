"""POST /api/chat and the job lookup: every request goes through the durable queue."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header

from app.api.deps import GatewayDep, PrincipalDep, client_id, idempotency_key
from app.api.schemas import ChatRequest
from app.api.views import chat_answer, job_view
from app.errors import InvalidRequest, JobNotFound
from app.queue.priority import Priority

router = APIRouter()


@router.post("/api/chat")
async def chat(
    body: ChatRequest,
    gw: GatewayDep,
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
    assert gw.chat is not None
    doc = await gw.chat.complete(user, body.engine_request(), client, priority, key)
    return chat_answer(doc)


@router.get("/api/jobs/{job_id}")
async def get_job(job_id: str, gw: GatewayDep, user: PrincipalDep) -> dict[str, Any]:
    assert gw.chat is not None
    doc = await gw.chat.job(user, job_id[:64])
    if doc is None:
        raise JobNotFound(job_id[:64])
    return job_view(doc)
