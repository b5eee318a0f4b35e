"""The OCR use case: check and render the document, store its pages, admit one job for it.

Everything that can be wrong with the upload is found before a queue slot is taken (bad
type, corrupt, bomb, too many pages), so bad input costs a 4xx and never a slot; rendering
happens once here, in a worker thread, and the pages are stored already sized for the mode.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
from dataclasses import dataclass
from datetime import timedelta

from app.auth.tokens import Principal
from app.dispatch.dispatcher import ModelDispatcher
from app.engines.manager import EngineManager
from app.errors import DocumentTooLarge, InvalidRequest
from app.history.missing import MissingModels
from app.models import ModelRegistry
from app.ocr.documents import PageImage, detect_format, iter_pages, parse_resolution, resize_for_mode
from app.ocr.pages import PageStore
from app.ocr.requests import Output
from app.ocr.resolution import DefaultResolution
from app.queue.idempotency import admit_or_reuse
from app.queue.job import Doc, Job
from app.queue.jobs import Submission, new_job_id, request_fingerprint
from app.queue.priority import Priority
from app.queue.service import JobQueue
from app.settings import OcrSettings
from app.usecases.chat import ensure_servable, resolve_for

OCR_KINDS = frozenset({"cpu_ocr", "deepseek_ocr", "stub"})  # the stub stands in for both in tests
PAGES_KEPT = timedelta(days=1)  # pages of a job that never ended cleanly are pruned after this


@dataclass(frozen=True)
class OcrAsk:
    """One OCR request as the API parsed it."""

    document: bytes
    model: str | None
    output: Output
    pages: str | None
    resolution: str | None
    max_tokens: int | None
    filename: str | None


class OcrService:
    def __init__(
        self,
        registry: ModelRegistry,
        engines: EngineManager,
        queue: JobQueue,
        dispatchers: dict[str, ModelDispatcher],
        pages: PageStore,
        default_resolution: DefaultResolution,
        settings: OcrSettings,
        missing: MissingModels | None = None,
    ) -> None:
        self._registry = registry
        self._engines = engines
        self._queue = queue
        self._dispatchers = dispatchers
        self._pages = pages
        self.default_resolution = default_resolution
        self._settings = settings
        self._missing = missing

    def model_for(self, principal: Principal, label: str | None, client_id: str = "") -> str:
        if label is None:
            label = self._settings.default_model or self._first_ocr_model()
        name = resolve_for(self._registry, principal, label, self._missing, client_id)
        kind = self._registry.models[name].kind
        if kind not in OCR_KINDS:
            known = ", ".join(self._ocr_models()) or "none configured"
            raise InvalidRequest(
                f"model {name!r} ({kind}) does not read documents; OCR models: {known}", param="model"
            )
        return name

    def _ocr_models(self) -> list[str]:
        return [n for n, m in self._registry.models.items() if m.kind in ("cpu_ocr", "deepseek_ocr")]

    def _first_ocr_model(self) -> str:
        models = self._ocr_models()
        if not models:
            raise InvalidRequest("no OCR model is configured; name one with the `model` field", param="model")
        return models[0]

    async def submit(
        self,
        principal: Principal,
        ask: OcrAsk,
        client_id: str,
        priority: Priority,
        idempotency_key: str | None,
        *,
        wait: bool,
    ) -> Job:
        """The job once it has ended (wait) or as admitted (background job)."""
        if not ask.document:
            raise InvalidRequest("file is empty", param="file")
        if len(ask.document) > self._settings.max_upload_bytes:
            raise DocumentTooLarge(
                f"file is {len(ask.document)} bytes; the limit is {self._settings.max_upload_bytes}"
            )
        model = self.model_for(principal, ask.model, client_id)
        mode = parse_resolution(ask.resolution) if ask.resolution else await self.default_resolution.get()
        request: Doc = {
            "document": {
                "sha256": hashlib.sha256(ask.document).hexdigest(),
                "format": detect_format(ask.document),
                "bytes": len(ask.document),
                "filename": (ask.filename or "")[:200] or None,
                "pages": ask.pages,
            },
            "mode": mode,
            "output": ask.output,
            "max_tokens": ask.max_tokens,
        }
        # the file name is not part of the request; the pages rendered follow from the rest
        fingerprint = request_fingerprint(
            model, {**request, "document": {**request["document"], "filename": None}}
        )

        async def admit() -> Job:
            pages = await asyncio.to_thread(self._render, ask.document, ask.pages, mode)
            request["document"]["page_numbers"] = [number for number, *_ in pages]
            ensure_servable(self._engines, model, self._missing, client_id)
            job_id = new_job_id()
            await self._pages.save(job_id, pages, self._queue.clock.now() + PAGES_KEPT)
            sub = Submission(
                model=model,
                kind="ocr",
                request=request,
                owner=principal.subject,
                client_id=client_id,
                priority=priority,
                idempotency_key=idempotency_key,
                queue_timeout_s=self._registry.models[model].timeout,
                request_hash=fingerprint,
            )
            try:
                return await self._queue.admit(sub, self._dispatchers[model].direct_start(), job_id=job_id)
            except BaseException:
                await self._pages.delete(job_id)
                raise

        job, admitted = await admit_or_reuse(
            self._queue, principal.subject, idempotency_key, fingerprint, admit
        )
        if admitted and not wait:
            self._queue.delivery.detach(job.id)
        if not wait or job.state.terminal:
            return job
        return await self._queue.wait(job)

    def _render(self, document: bytes, pages: str | None, mode: str) -> list[tuple[int, bytes, int, int]]:
        """Check and render every selected page, sized for the mode, as PNG (in a thread)."""
        s = self._settings
        loaded = iter_pages(
            document, pages=pages, max_pages=s.max_pages, max_pixels=s.max_pixels, dpi=s.pdf_dpi
        )
        return [_png(page, mode) for page in loaded]  # each full-size page is dropped once encoded


def _png(page: PageImage, mode: str) -> tuple[int, bytes, int, int]:
    buffer = io.BytesIO()
    resize_for_mode(page.image, mode).save(buffer, format="PNG", compress_level=3)
    return page.number, buffer.getvalue(), page.width, page.height
