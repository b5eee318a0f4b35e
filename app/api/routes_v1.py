"""OpenAI-compatible surface: the gateway as a drop-in base URL for the OpenAI SDK.

Every completion still goes through the durable per-model queue (same admission, priority,
retries, timeouts and idempotency as /api/chat); only the request and answer shapes differ.
Streaming (`stream: true`) is refused with a clear 400 until it runs through the queue too.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header
from fastapi.responses import JSONResponse
from pydantic import Field

from app.api.deps import GatewayDep, PrincipalDep, idempotency_key, optional_client_id
from app.api.schemas import ChatRequest
from app.api.views import chat_answer
from app.errors import InvalidRequest
from app.queue.priority import Priority

router = APIRouter(prefix="/v1")
_DEFAULT_CLIENT = "openai-api"


class OpenAIChatRequest(ChatRequest):
    """The OpenAI body: /api/chat's fields plus the ones the SDK may send."""

    n: int = Field(1, ge=1, le=1)
    user: str | None = Field(None, max_length=64)
    stream_options: dict[str, Any] | None = None

    def engine_request(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True, exclude={"stream", "stream_options", "n", "user"})


@router.get("/models")
async def list_models(gw: GatewayDep, _: PrincipalDep) -> dict[str, Any]:
    assert gw.engines is not None
    created = int(gw.clock.now().timestamp())
    data = [
        {
            "id": name,
            "object": "model",
            "created": created,
            "owned_by": "model-gateway",
            "aliases": engine.settings.aliases,
            "state": engine.state.value,
            "kind": engine.settings.kind,
        }
        for name, engine in gw.engines.engines.items()
    ]
    return {"object": "list", "data": data}


@router.post("/chat/completions")
async def chat_completions(
    body: OpenAIChatRequest,
    gw: GatewayDep,
    user: PrincipalDep,
    key: Annotated[str | None, Depends(idempotency_key)],
    x_client_id: Annotated[str | None, Depends(optional_client_id)],
    x_priority: Annotated[str | None, Header()] = None,
) -> JSONResponse:
    if body.stream:
        raise InvalidRequest(
            "stream: true is not supported yet; send the request without streaming", param="stream"
        )
    priority = Priority.parse(x_priority)
    client = x_client_id or body.user or _DEFAULT_CLIENT
    assert gw.chat is not None
    doc = await gw.chat.complete(user, body.engine_request(), client, priority, key)
    answer = chat_answer(doc)
    result = doc.get("result") or {}
    completion = {
        "id": "chatcmpl-" + answer["id"].removeprefix("job_"),
        "object": "chat.completion",
        "created": int(doc["enqueued_at"].timestamp()),
        "model": body.model,
        "choices": [
            {
                "index": 0,
                "message": answer["message"],
                "finish_reason": answer["finish_reason"],
                "logprobs": None,
            }
        ],
        "usage": answer["usage"],
        "system_fingerprint": result.get("system_fingerprint"),
    }
    return JSONResponse(completion, headers={"X-Request-ID": answer["id"]})
