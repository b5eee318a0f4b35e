"""The chat use case: resolve the model, admit the job, wait for its terminal state."""

from __future__ import annotations

import asyncio
from datetime import datetime

from app.auth.tokens import Principal
from app.dispatch.dispatcher import ModelDispatcher
from app.engines.manager import EngineManager
from app.errors import (
    JobAlreadyFinished,
    JobNotFound,
    ModelUnavailable,
    PermissionDenied,
    UnknownModel,
)
from app.history.missing import MissingModels
from app.models import ModelRegistry
from app.queue.delivery import StreamEvent
from app.queue.idempotency import admit_or_reuse
from app.queue.job import Doc, Job, JobState
from app.queue.jobs import ListingCursor, Submission, request_fingerprint
from app.queue.priority import Priority
from app.queue.service import JobQueue


def resolve_for(
    registry: ModelRegistry,
    principal: Principal,
    label: str,
    missing: MissingModels | None = None,
    client_id: str = "",
) -> str:
    """The model's canonical name, if this caller may use it (API keys can be model-scoped).
    An unknown name is recorded as a missing model (operators see what clients expect)."""
    try:
        model = registry.resolve(label)
    except UnknownModel:
        if missing is not None:
            missing.record(label, client_id, configured=False)
        raise
    if not principal.may_use(model):
        raise PermissionDenied(f"this API key may not use model {model!r}")
    return model


def ensure_servable(
    engines: EngineManager, model: str, missing: MissingModels | None, client_id: str
) -> None:
    """Admission's check that the model is (or is becoming) loaded; a refusal is demand that
    leaves no job behind, so it is recorded for auto-switch."""
    try:
        engines.ensure_servable(model)
    except ModelUnavailable:
        if missing is not None:
            missing.record(model, client_id, configured=True)
        raise


class ChatService:
    def __init__(
        self,
        registry: ModelRegistry,
        engines: EngineManager,
        queue: JobQueue,
        dispatchers: dict[str, ModelDispatcher],
        missing: MissingModels | None = None,
    ) -> None:
        self._registry = registry
        self._engines = engines
        self._queue = queue
        self._dispatchers = dispatchers
        self._missing = missing

    async def complete(
        self,
        principal: Principal,
        request: Doc,
        client_id: str,
        priority: Priority,
        idempotency_key: str | None,
    ) -> Job:
        """Return the job once it has ended (the API turns failures into errors)."""
        job, _ = await self._admit_once(principal, request, client_id, priority, idempotency_key)
        return await self.outcome(job)  # a repeated key: the same job's outcome, never a second inference

    async def submit(
        self,
        principal: Principal,
        request: Doc,
        client_id: str,
        priority: Priority,
        idempotency_key: str | None,
    ) -> Job:
        """Admit without waiting (POST /api/jobs); a repeated key returns the job it made."""
        job, admitted = await self._admit_once(principal, request, client_id, priority, idempotency_key)
        if admitted:
            self._queue.delivery.detach(job.id)
        return job

    async def _admit_once(
        self,
        principal: Principal,
        request: Doc,
        client_id: str,
        priority: Priority,
        idempotency_key: str | None,
        *,
        stream: bool = False,
    ) -> tuple[Job, bool]:
        """The job for this request: newly admitted (True), or the one its Idempotency-Key made.
        A streamed job is pinned to this instance, which holds its client's connection."""
        model, body = self._model_and_body(principal, request, client_id)

        async def admit() -> Job:
            ensure_servable(self._engines, model, self._missing, client_id)
            sub = self._submission(
                principal,
                model,
                body,
                client_id,
                priority,
                idempotency_key=idempotency_key,
                pinned_to=self._queue.worker_id if stream else None,
            )
            return await self._queue.admit(sub, self._dispatchers[model].direct_start())

        fingerprint = request_fingerprint(model, body)
        return await admit_or_reuse(self._queue, principal.subject, idempotency_key, fingerprint, admit)

    async def start_stream(
        self,
        principal: Principal,
        request: Doc,
        client_id: str,
        priority: Priority,
        idempotency_key: str | None = None,
    ) -> tuple[Job, asyncio.Queue[StreamEvent] | None]:
        """Admit a streamed job pinned to this instance; its events arrive on the returned queue.

        A repeated Idempotency-Key returns the job the key made and no queue: the caller waits
        for that job's end and replays its stored answer (a client whose stream broke gets the
        whole answer, not a second inference).
        """
        job, admitted = await self._admit_once(
            principal, request, client_id, priority, idempotency_key, stream=True
        )
        if not admitted:
            return job, None
        sink = self._queue.delivery.sink(job.id)
        assert sink is not None
        return job, sink

    async def outcome(self, job: Job) -> Job:
        """The job once it has ended (waiting for it if it is still queued or running)."""
        if job.state.terminal:
            return job
        return await self._queue.wait(job)

    def _model_and_body(self, principal: Principal, request: Doc, client_id: str) -> tuple[str, Doc]:
        """The canonical model name, and what the engine gets (the model is set per engine)."""
        model = resolve_for(self._registry, principal, str(request["model"]), self._missing, client_id)
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

    async def cancel(self, job: Job, reason: str) -> None:
        """Stop the engine call if the job runs here, else end it in the database."""
        if not self._dispatchers[job.model].cancel(job.id, reason):
            await self._queue.cancel(job.id, reason)

    async def cancel_job(self, principal: Principal, job_id: str) -> Job:
        """DELETE /api/jobs/{id}: the job once it is cancelled.

        A job that ends some other way first (it succeeded a moment before) is reported as
        such rather than claimed cancelled. A job running on another instance is marked
        cancelled here; that instance stops its engine call at its next lease heartbeat, and
        a result it gets before then loses its write (conditional on the job's revision).
        """
        job = await self.job(principal, job_id)
        if job is None:
            raise JobNotFound(job_id)
        if job.state.terminal:
            raise JobAlreadyFinished(job_id, job.state.value)
        reason = f"cancelled by {principal.subject}"
        if self._dispatchers[job.model].cancel(job_id, reason):
            final = await self._queue.wait(job)  # the engine call stops, then the job is written
        else:
            await self._queue.cancel(job_id, reason)
            final = await self._queue.store.get(job_id) or job
        if final.state != JobState.CANCELLED:
            raise JobAlreadyFinished(job_id, final.state.value)
        return final

    async def jobs(
        self,
        principal: Principal,
        *,
        state: JobState | None,
        model: str | None,
        before: datetime | None,
        limit: int,
        after: ListingCursor | None = None,
    ) -> list[Job]:
        """The caller's own jobs, newest first; admins see everyone's."""
        return await self._queue.store.listing(
            owner=None if principal.is_admin else principal.subject,
            state=state.value if state else None,
            model=self._registry.resolve(model) if model else None,
            before=before,
            limit=limit,
            after=after,
        )

    async def position(self, job: Job) -> int | None:
        return await self._queue.store.position(job)

    async def job(self, principal: Principal, job_id: str) -> Job | None:
        job = await self._queue.store.get(job_id)
        if job is None or not (principal.is_admin or job.owner == principal.subject):
            return None
        return job
