"""The chat use case: resolve the model, admit the job, wait for its terminal state."""

from __future__ import annotations

import asyncio
from typing import Any

from app.auth.tokens import Principal
from app.dispatch.dispatcher import ModelDispatcher
from app.engines.manager import EngineManager
from app.errors import IdempotencyConflict
from app.models import ModelRegistry
from app.queue.jobs import Doc, JobState, Submission, request_fingerprint
from app.queue.priority import Priority
from app.queue.service import JobQueue
from app.store.batch import DuplicateKey


class ChatService:
    def __init__(
        self,
        registry: ModelRegistry,
        engines: EngineManager,
        queue: JobQueue,
        dispatchers: dict[str, ModelDispatcher],
    ) -> None:
        self._registry = registry
        self._engines = engines
        self._queue = queue
        self._dispatchers = dispatchers

    async def complete(
        self,
        principal: Principal,
        request: Doc,
        client_id: str,
        priority: Priority,
        idempotency_key: str | None,
    ) -> Doc:
        """Return the job's terminal document (the API turns failures into errors)."""
        model, body = self._model_and_body(request)
        if idempotency_key is not None:
            existing = await self._queue.find_existing(principal.subject, idempotency_key)
            if existing is not None:
                return await self._replay(existing, model, body)
        self._engines.check_servable(model)
        sub = self._submission(principal, model, body, client_id, priority, idempotency_key=idempotency_key)
        try:
            doc = await self._queue.admit(sub, self._dispatchers[model].direct_start())
        except DuplicateKey:
            # the same key was admitted by a concurrent request a moment ago: share its job
            assert idempotency_key is not None
            existing = await self._queue.find_existing(principal.subject, idempotency_key)
            if existing is None:
                raise
            return await self._replay(existing, model, body)
        return await self._queue.wait(doc)

    async def start_stream(
        self, principal: Principal, request: Doc, client_id: str, priority: Priority
    ) -> tuple[Doc, asyncio.Queue[tuple[str, Any]]]:
        """Admit a streamed job pinned to this instance; its events arrive on the returned queue."""
        model, body = self._model_and_body(request)
        self._engines.check_servable(model)
        sub = self._submission(principal, model, body, client_id, priority, pinned_to=self._queue.worker_id)
        doc = await self._queue.admit(sub, self._dispatchers[model].direct_start())
        sink = self._queue.sink(doc["_id"])
        assert sink is not None
        return doc, sink

    def _model_and_body(self, request: Doc) -> tuple[str, Doc]:
        """The canonical model name, and what the engine gets (the model is set per engine)."""
        model = self._registry.resolve(str(request["model"]))
        return model, {k: v for k, v in request.items() if k != "model" and v is not None}

    def _submission(
        self,
        principal: Principal,
        model: str,
        body: Doc,
        client_id: str,
        priority: Priority,
        *,
        idempotency_key: str | None = None,
        pinned_to: str | None = None,
    ) -> Submission:
        return Submission(
            model=model,
            kind="chat",
            request=body,
            owner=principal.subject,
            client_id=client_id,
            priority=priority,
            idempotency_key=idempotency_key,
            queue_timeout_s=self._registry.models[model].timeout,
            pinned_to=pinned_to,
        )

    async def cancel(self, doc: Doc, reason: str) -> None:
        """The client went away: stop the engine call if it runs here, else end the queued job."""
        if not self._dispatchers[doc["model"]].cancel(doc["_id"]):
            await self._queue.cancel(doc["_id"], reason)

    async def _replay(self, existing: Doc, model: str, body: Doc) -> Doc:
        """A repeated Idempotency-Key: the same job's outcome, never a second inference."""
        if existing.get("request_hash") != request_fingerprint(model, body):
            raise IdempotencyConflict(existing["_id"])
        return existing if JobState(existing["state"]).terminal else await self._queue.wait(existing)

    async def job(self, principal: Principal, job_id: str) -> Doc | None:
        doc = await self._queue.store.get(job_id)
        if doc is None or not (principal.is_admin or doc.get("owner") == principal.subject):
            return None
        return doc
