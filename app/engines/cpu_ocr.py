"""CPU OCR engine: RapidOCR (PP-OCRv4 on onnxruntime) behind the same chat API as DeepSeek-OCR.

The gateway sends DeepSeek-OCR on vLLM an OpenAI chat request with one image as a data URL and
the prompt "Free OCR." or "<|grounding|>Convert the document to markdown.". This process takes
the very same request and answers in the same shape, grounding tags included, so a machine
without a GPU still serves OCR and the gateway needs no second code path. The models ship in
the rapidocr-onnxruntime wheel: nothing is downloaded at run time.

    python -m app.engines.cpu_ocr --port 9002 --model-name cpu-ocr
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import json
import logging
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from PIL import Image

from app import logs
from app.errors import GatewayError
from app.ocr.documents import detect_format, load_pages
from app.ocr.layout import Segment, grounding_block, group_lines

FINGERPRINT = "cpu-ocr (RapidOCR onnxruntime)"
GROUNDING = "<|grounding|>"

Recogniser = Callable[[Image.Image], list[Segment]]
logger = logging.getLogger("app.engines.cpu_ocr")


class BadRequest(Exception):
    """The request cannot be served as sent; answered with a 400 like vLLM's."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class OcrRequest:
    image_url: str
    prompt: str
    max_tokens: int | None
    stream: bool
    include_usage: bool

    @property
    def grounding(self) -> bool:
        return GROUNDING in self.prompt


# -- request parsing ---------------------------------------------------------------------------


def parse_request(body: Any) -> OcrRequest:
    """The one image and the prompt of an OpenAI chat request, or the reason it is unusable."""
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list")
    urls: list[Any] = []
    texts: list[str] = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            texts.append(content)
            continue
        for part in content if isinstance(content, list) else []:
            if not isinstance(part, dict):
                continue
            if part.get("type") == "image_url":
                image_url = part.get("image_url")
                urls.append(image_url.get("url") if isinstance(image_url, dict) else image_url)
            elif part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
    if not urls:
        raise BadRequest("no image: send one image_url content part holding a data URL")
    if len(urls) > 1:
        raise BadRequest(f"send one image per request (got {len(urls)})")
    if not isinstance(urls[0], str):
        raise BadRequest("image_url.url must be a string")
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
    if max_tokens is not None and (
        not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1
    ):
        raise BadRequest("max_tokens must be a positive integer")
    stream_options = body.get("stream_options")
    return OcrRequest(
        image_url=urls[0],
        prompt="\n".join(texts),
        max_tokens=max_tokens,
        stream=bool(body.get("stream")),
        include_usage=isinstance(stream_options, dict) and bool(stream_options.get("include_usage")),
    )


def decode_image(url: str, max_pixels: int) -> Image.Image:
    """The image of a base64 data URL, checked like an upload (type by content, pixel limit).

    Remote URLs are refused: the engine runs without network access, by design.
    """
    if not url.startswith("data:"):
        raise BadRequest(
            "image_url must be a data URL (data:image/png;base64,...); this engine does not fetch URLs"
        )
    header, comma, payload = url.partition(",")
    if not comma or not header.lower().endswith(";base64"):
        raise BadRequest("image data URL must be base64-encoded (data:image/png;base64,...)")
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
    except binascii.Error as exc:
        raise BadRequest(f"image data is not valid base64 ({exc})") from exc
    try:
        if detect_format(data) == "pdf":
            raise BadRequest("send a page image, not a PDF (the gateway renders PDF pages)")
        return load_pages(data, pages="1", max_pages=1, max_pixels=max_pixels)[0].image
    except GatewayError as exc:
        raise BadRequest(f"image cannot be used: {exc.message}") from exc


# -- answer ------------------------------------------------------------------------------------


def render_answer(request: OcrRequest, segments: list[Segment], width: int, height: int) -> tuple[str, str]:
    """The content in reading order, and the finish reason after applying max_tokens.

    Tokens are estimated as words; output is cut at whole lines, never inside a grounding tag.
    """
    lines = group_lines(segments)
    if request.grounding:
        blocks, separator = [grounding_block(line, width, height) for line in lines], "\n\n"
    else:
        blocks, separator = [line.text for line in lines], "\n"
    if request.max_tokens is None:
        return separator.join(blocks), "stop"
    kept: list[str] = []
    used = 0
    for block in blocks:
        used += len(block.split())
        if used > request.max_tokens:
            return separator.join(kept), "length"
        kept.append(block)
    return separator.join(kept), "stop"


def usage(request: OcrRequest, content: str) -> dict[str, int]:
    prompt_tokens, completion_tokens = len(request.prompt.split()), len(content.split())
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


# -- server ------------------------------------------------------------------------------------


class CpuOcrEngine:
    """HTTP front of one recogniser; inference runs on one worker thread, so the event loop
    keeps answering /health and cheap 400s while a page is being read."""

    def __init__(self, recognise: Recogniser, model: str, max_pixels: int) -> None:
        self.recognise = recognise
        self.model = model
        self.max_pixels = max_pixels
        # One thread: onnxruntime already uses every core per call, and RapidOCR is not
        # documented as thread-safe. Waiting requests queue here; the gateway bounds how many.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ocr")

    async def health(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "engine": FINGERPRINT})

    async def models(self, _: web.Request) -> web.Response:
        return web.json_response(
            {"object": "list", "data": [{"id": self.model, "object": "model", "owned_by": "cpu-ocr"}]}
        )

    async def chat(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "request body is not valid JSON")
        try:
            ocr = parse_request(body)
            image = await asyncio.to_thread(decode_image, ocr.image_url, self.max_pixels)
        except BadRequest as exc:
            return _error(400, exc.message)
        started = time.monotonic()
        try:
            loop = asyncio.get_running_loop()
            segments = await loop.run_in_executor(self.executor, self.recognise, image)
        except Exception:
            logger.exception("cpu_ocr.failed size=%dx%d", image.width, image.height)
            return _error(500, "OCR failed inside the engine; see the engine log")
        content, finish = render_answer(ocr, segments, image.width, image.height)
        logs.event(
            logger,
            "cpu_ocr.done",
            size=f"{image.width}x{image.height}",
            segments=len(segments),
            grounding=ocr.grounding,
            ms=round((time.monotonic() - started) * 1000),
        )
        if ocr.stream:
            return await self._stream(
                request, content, finish, usage(ocr, content) if ocr.include_usage else None
            )
        return web.json_response(
            {
                **self._envelope("chat.completion"),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": content},
                        "finish_reason": finish,
                    }
                ],
                "usage": usage(ocr, content),
            }
        )

    def _envelope(self, kind: str, chunk_id: str | None = None) -> dict[str, Any]:
        return {
            "id": chunk_id or "chatcmpl-" + uuid.uuid4().hex,
            "object": kind,
            "created": int(time.time()),
            "model": self.model,
            "system_fingerprint": FINGERPRINT,
        }

    async def _stream(
        self, request: web.Request, content: str, finish: str, usage_: dict[str, int] | None
    ) -> web.StreamResponse:
        """The whole answer as one content chunk: the OCR result exists only once complete."""
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        chunk_id = "chatcmpl-" + uuid.uuid4().hex
        deltas: list[tuple[dict[str, Any], str | None]] = [
            ({"role": "assistant", "content": ""}, None),
            ({"content": content}, None),
            ({}, finish),
        ]
        for delta, reason in deltas:
            chunk = {
                **self._envelope("chat.completion.chunk", chunk_id),
                "choices": [{"index": 0, "delta": delta, "finish_reason": reason}],
            }
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        if usage_ is not None:
            chunk = {**self._envelope("chat.completion.chunk", chunk_id), "choices": [], "usage": usage_}
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def close(self, _: web.Application) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


def _error(status: int, message: str) -> web.Response:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return web.json_response({"error": {"message": message, "type": kind, "code": status}}, status=status)


def build_app(engine: CpuOcrEngine) -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_get("/health", engine.health)
    app.router.add_get("/v1/models", engine.models)
    app.router.add_post("/v1/chat/completions", engine.chat)
    app.on_cleanup.append(engine.close)
    return app


# -- model -------------------------------------------------------------------------------------


def load_rapidocr(threads: int, *, angle_cls: bool = False, unclip_ratio: float = 2.4) -> Recogniser:
    """Load the detector and recogniser from the wheel (no download, under a second).

    The defaults are measured on rendered document pages, not RapidOCR's own (tuned for photos
    of Chinese text): its 180-degree classifier flips many long, thin English lines and they are
    then read as garbage and dropped, and its tight boxes (unclip 1.6) lose the spaces between
    words. With these settings 20-px text at normal leading comes back line for line.
    """
    from rapidocr_onnxruntime import RapidOCR  # type: ignore[import-untyped]

    options: dict[str, Any] = {"det_unclip_ratio": unclip_ratio}
    if threads > 0:
        options["intra_op_num_threads"] = threads
    model = RapidOCR(**options)

    def recognise(image: Image.Image) -> list[Segment]:
        result, _elapsed = model(image, use_cls=angle_cls)
        return [Segment.from_quad(box, str(text).strip()) for box, text, _score in result or []]

    return recognise


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="CPU OCR engine (RapidOCR) with an OpenAI-style chat API.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model-name", default="cpu-ocr")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime threads per call; 0: all cores")
    parser.add_argument(
        "--max-pixels", type=int, default=50_000_000, help="larger images are refused with a 400"
    )
    parser.add_argument(
        "--angle-cls", action="store_true", help="turn upside-down lines (misfires on long English lines)"
    )
    parser.add_argument(
        "--unclip-ratio", type=float, default=2.4, help="how far text boxes grow around glyphs"
    )
    parser.add_argument("--log-level", default="INFO")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Load the model before listening: a refused connection already means "loading" to the
    gateway, and /health can then never say ready before it is."""
    args = parse_args(argv)
    logs.configure(args.log_level)
    started = time.monotonic()
    recognise = load_rapidocr(args.threads, angle_cls=args.angle_cls, unclip_ratio=args.unclip_ratio)
    logs.event(logger, "cpu_ocr.loaded", load_s=round(time.monotonic() - started, 2), port=args.port)
    engine = CpuOcrEngine(recognise, args.model_name, args.max_pixels)
    web.run_app(build_app(engine), host=args.host, port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
