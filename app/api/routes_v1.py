"""OpenAI-compatible surface: the gateway as a drop-in base URL for the OpenAI SDK.

Every completion still goes through the durable per-model queue (same admission, priority,
retries, timeouts and idempotency as /api/chat); only the request and answer shapes differ.
With `stream: true` the job is admitted like any other (429 at once when the queue is full),
the response starts with keep-alive comments while it waits, and chunks flow once it runs; if the
client goes away the engine call is cancelled and the slot freed at once. A failure known before
the first chunk and within one keep-alive interval keeps its HTTP status; later ones can only be
an error event inside the stream.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, Header
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from app.api.deps import PrincipalDep, ServicesDep, idempotency_key, optional_client_id
from app.api.schemas import ChatRequest
from app.api.views import chat_answer, raise_unless_succeeded
from app.queue.delivery import StreamEvent
from app.queue.job import Job, JobState
from app.queue.priority import Priority

router = APIRouter(prefix="/v1")
_DEFAULT_CLIENT = "openai-api"


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool | None = None
    include_obfuscation: bool | None = None  # accepted for the SDK; nothing is obfuscated


class OpenAIChatRequest(ChatRequest):
    """The OpenAI body: /api/chat's fields plus the ones the SDK may send."""

    n: int = Field(1, ge=1, le=1)
    user: str | None = Field(None, max_length=64)
    stream_options: StreamOptions | None = None

    def engine_request(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True, exclude={"stream", "stream_options", "n", "user"})

    def engine_stream_request(self) -> dict[str, Any]:
        """Always ask the engine for usage, so history records it even when the client did not."""
        return {**self.engine_request(), "stream": True, "stream_options": {"include_usage": True}}


@router.get("/models")
async def list_models(svc: ServicesDep, user: PrincipalDep) -> dict[str, Any]:
    created = int(svc.clock.now().timestamp())
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
        for name, engine in svc.engines.engines.items()
        if user.may_use(name)
    ]
    return {"object": "list", "data": data}


@router.post("/chat/completions")
async def chat_completions(
    body: OpenAIChatRequest,
    svc: ServicesDep,
    user: PrincipalDep,
    key: Annotated[str | None, Depends(idempotency_key)],
    x_client_id: Annotated[str | None, Depends(optional_client_id)],
    x_priority: Annotated[str | None, Header()] = None,
) -> Response:
    priority = Priority.parse(x_priority)
    client = x_client_id or body.user or _DEFAULT_CLIENT
    if body.stream:
        return await _stream(svc, user, body, client, priority, key)
    job = await svc.chat.complete(user, body.engine_request(), client, priority, key)
    answer = chat_answer(job)
    result = job.result or {}
    completion = {
        "id": _completion_id(job),
        "object": "chat.completion",
        "created": int(job.enqueued_at.timestamp()),
        "model": body.model,
        "choices": [
            {
                "index": 0,
                "message": answer["message"],
                "finish_reason": answer["finish_reason"],
                "logprobs": result.get("logprobs"),
            }
        ],
        "usage": answer["usage"],
        "system_fingerprint": result.get("system_fingerprint"),
    }
    return JSONResponse(completion, headers={"X-Request-ID": answer["id"]})


async def _stream(
    svc: ServicesDep,
    user: PrincipalDep,
    body: OpenAIChatRequest,
    client: str,
    priority: Priority,
    key: str | None,
) -> StreamingResponse:
    job, sink = await svc.chat.start_stream(user, body.engine_stream_request(), client, priority, key)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    if sink is None:
        if job.state.terminal:
            raise_unless_succeeded(job)  # the key's job failed: its status, as without `stream`
        events = _replayed(svc, job, body.model, include_usage)
    else:
        first = await _first_event(svc, job, sink, cancel_on_close=key is None)
        if first is not None and first.kind == "error":
            raise_unless_succeeded(first.data)  # no byte went out yet: the failure keeps its status
        events = _relayed(svc, job, sink, first, body.model, include_usage, cancel_on_close=key is None)
    return StreamingResponse(
        events,
        media_type="text/event-stream",
        headers={"X-Request-ID": job.id, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _first_event(
    svc: ServicesDep, job: Job, sink: asyncio.Queue[StreamEvent], *, cancel_on_close: bool
) -> StreamEvent | None:
    """The stream's first event, if it comes within one keep-alive interval.

    The 200 is held back until then, so a failure that comes this early (the engine rejects the
    prompt, or is unavailable through every retry) is answered with its own status and the SDK
    raises the same class as for a request without `stream`, as OpenAI's API does. A job still
    waiting for its turn after that gets its 200 and keep-alive comments instead.
    """
    try:
        event = await asyncio.wait_for(sink.get(), timeout=svc.settings.server.stream_keepalive_seconds)
    except TimeoutError:
        return None
    except BaseException:  # the client went away before its stream began
        await _stream_closed(svc, job, cancel=cancel_on_close)
        raise
    if event.kind == "error":
        svc.queue.delivery.close_sink(job.id)
    return event


async def _relayed(
    svc: ServicesDep,
    job: Job,
    sink: asyncio.Queue[StreamEvent],
    first: StreamEvent | None,
    model: str,
    include_usage: bool,
    *,
    cancel_on_close: bool,
) -> AsyncIterator[bytes]:
    """The engine's chunks as they come. A client that goes away cancels the job and frees its
    slot at once, unless it sent an Idempotency-Key: then the job runs to its end so that the
    key's repeat gets the whole answer."""
    completion_id = _completion_id(job)  # the job's, as in a replay and a non-streamed answer
    finished = False
    pending = first
    try:
        while True:
            if pending is not None:
                (kind, data), pending = pending, None
            else:
                try:
                    kind, data = await asyncio.wait_for(
                        sink.get(), timeout=svc.settings.server.stream_keepalive_seconds
                    )
                except TimeoutError:
                    yield _KEEPALIVE  # waiting in the queue: keep proxies from cutting us
                    continue
            if kind == "chunk":
                if not include_usage:
                    if not data.get("choices"):
                        continue  # the usage-only chunk the client did not ask for
                    data.pop("usage", None)
                yield _event({**data, "id": completion_id, "model": model})
                continue
            finished = True
            yield _DONE if kind == "done" else _failed_event(data)
            return
    finally:
        await _stream_closed(svc, job, cancel=cancel_on_close and not finished)


async def _stream_closed(svc: ServicesDep, job: Job, *, cancel: bool) -> None:
    """No one reads the job's events any more; with `cancel` (the client went away before the
    end, without an Idempotency-Key) the job is cancelled and its slot freed at once, even while
    the handler itself is being cancelled."""
    svc.queue.delivery.close_sink(job.id)
    if cancel:
        with anyio.CancelScope(shield=True):
            await svc.chat.cancel(job, "the client closed the connection")


async def _replayed(svc: ServicesDep, job: Job, model: str, include_usage: bool) -> AsyncIterator[bytes]:
    """A repeated Idempotency-Key: the job's stored answer as a stream, once the job has ended
    (keep-alive comments until then), or the error it ended with."""
    outcome = asyncio.ensure_future(svc.chat.outcome(job))
    try:
        while not (await asyncio.wait({outcome}, timeout=svc.settings.server.stream_keepalive_seconds))[0]:
            yield _KEEPALIVE
        final = outcome.result()
    finally:
        outcome.cancel()
    result = final.result or {}
    if final.state != JobState.SUCCEEDED:
        yield _failed_event(final)
        return
    if result.get("output_redacted"):
        redacted = {
            "type": "invalid_request_error",
            "message": f"job {final.id} succeeded but its answer was not stored "
            "(history.store_outputs is off); send a new Idempotency-Key",
        }
        yield _error_event(redacted, "output_redacted")
        return
    base = {
        "id": _completion_id(final),
        "object": "chat.completion.chunk",
        "created": int(final.enqueued_at.timestamp()),
        "model": model,
        "system_fingerprint": result.get("system_fingerprint"),
    }
    message = result.get("message") or {}
    delta: dict[str, Any] = {"role": "assistant", "content": message.get("content") or ""}
    if message.get("tool_calls"):
        delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(message["tool_calls"])]
    yield _event({**base, "choices": [_choice(delta, None)]})
    yield _event({**base, "choices": [_choice({}, result.get("finish_reason"))]})
    if include_usage and result.get("usage"):  # as relayed: an engine that reported none gets none
        yield _event({**base, "choices": [], "usage": result["usage"]})
    yield _DONE


_KEEPALIVE = b": keep-alive\n\n"
_DONE = b"data: [DONE]\n\n"


def _completion_id(job: Job) -> str:
    return "chatcmpl-" + job.id.removeprefix("job_")


def _choice(delta: dict[str, Any], finish_reason: str | None) -> dict[str, Any]:
    return {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}


def _event(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data).encode() + b"\n\n"


def _failed_event(job: Job) -> bytes:
    """A job that ended without an answer, as a stream reports it once its 200 has gone out."""
    return _error_event(job.error or {}, job.state.value)


def _error_event(error: dict[str, Any], code: str) -> bytes:
    """OpenAI's error envelope, as an event."""
    envelope = {
        "message": error.get("message", "the job failed"),
        "type": error.get("type", "server_error"),
        "param": None,
        "code": code,
    }
    return _event({"error": envelope})
