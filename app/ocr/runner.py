"""Runs one admitted OCR job at its engine: page after page, each page retried on its own.

A page that fails with a retryable error is tried again (with backoff) before the job gives
up; pages already read are kept in the page store, so when the job itself is retried (engine
crash, lease lost) only the unfinished pages are sent again.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable
from typing import Any

from app.errors import EngineCallError
from app.ocr.grounding import Box
from app.ocr.pages import PageStore, StoredPage
from app.ocr.requests import DEFAULT_MAX_TOKENS, Output, PageResult, page_request, read_answer
from app.proxy.client import EngineClient
from app.queue.job import Job
from app.queue.retry import RetryPolicy

Doc = dict[str, Any]


class OcrRunner:
    def __init__(self, pages: PageStore, client: EngineClient, retry: RetryPolicy) -> None:
        self.pages = pages
        self._client = client
        self._retry = retry

    async def run(
        self, job: Job, engine_url: Callable[[], str | None], served_name: str, timeout_s: float
    ) -> Doc:
        """The job's result; raises EngineCallError when a page cannot be read."""
        request = job.request_to_run()
        output: Output = "markdown" if request["output"] == "markdown" else "text"
        max_tokens = int(request.get("max_tokens") or DEFAULT_MAX_TOKENS)
        stored = await self.pages.load(job.id)
        if not stored:
            raise EngineCallError(
                "the document's pages are gone (the job outlived its input)", retryable=False
            )
        results: list[PageResult] = []
        for page in stored:
            if page.result is not None:
                results.append(_from_record(page.result))
                continue
            result = await self._page(page, output, max_tokens, engine_url, served_name, timeout_s)
            await self.pages.record(job.id, page.number, _record(result))
            results.append(result)
        usage: dict[str, int] = {}
        for result in results:
            for key, value in result.usage.items():
                usage[key] = usage.get(key, 0) + value
        return {
            "mode": request["mode"],
            "output": output,
            "text": "\n\n".join(r.text for r in results),
            "pages": [r.view() for r in results],
            "truncated": any(r.truncated for r in results),
            "usage": usage,
        }

    async def _page(
        self,
        page: StoredPage,
        output: Output,
        max_tokens: int,
        engine_url: Callable[[], str | None],
        served_name: str,
        timeout_s: float,
    ) -> PageResult:
        data_url = "data:image/png;base64," + base64.b64encode(page.png).decode("ascii")
        payload = page_request(served_name, data_url, output, max_tokens)
        tries = 0
        while True:
            tries += 1
            try:
                url = engine_url()
                if url is None:
                    raise EngineCallError("engine is not ready", retryable=True)
                answer = await self._client.chat_completion(url, payload, timeout_s)
                return read_answer(answer, page.number, page.width, page.height)
            except EngineCallError as exc:
                if not self._retry.should_retry(retryable=exc.retryable, attempts_made=tries):
                    raise EngineCallError(
                        f"page {page.number}: {exc.message}", retryable=exc.retryable, status=exc.status
                    ) from None
                await asyncio.sleep(self._retry.backoff(tries))


def _record(result: PageResult) -> Doc:
    view = result.view()
    view["usage"] = result.usage
    return view


def _from_record(record: Doc) -> PageResult:
    boxes = [
        Box(b["label"], b.get("text"), b["x1"], b["y1"], b["x2"], b["y2"]) for b in record.get("boxes", [])
    ]
    return PageResult(
        int(record["page"]),
        str(record["text"]),
        int(record["width"]),
        int(record["height"]),
        boxes,
        bool(record["truncated"]),
        record.get("finish_reason"),
        dict(record.get("usage") or {}),
    )
