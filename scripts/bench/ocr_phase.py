"""The OCR phase: in-process RapidOCR vs the cpu_ocr engine vs the gateway, page and PDF."""

from __future__ import annotations

import asyncio
import io
import json
import math
import random
import re
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
from PIL import Image, ImageDraw, ImageFont

from bench.harness import CostMeter, ForeignLoad, Stack
from bench.scenarios import (
    OCR_FONT_PX,
    OCR_LEADING_PX,
    OCR_LINES,
    OCR_MARGIN_PX,
    OCR_MODEL,
    OCR_PAGE_SIZE,
    OCR_PDF_DPI,
    OCR_PDF_PAGES,
    OCR_TITLE_PX,
    OCR_WORDS,
    Doc,
    Idle,
    OcrPath,
    OcrResult,
    OcrScenario,
    ServerCost,
)
from bench.streams import nearest_rank

# -- the OCR phase --------------------------------------------------------------------------------

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont
Reader = Callable[[Image.Image], str]


def ocr_page_lines(seed: int, font: Font, width: float) -> list[str]:
    """OCR_LINES lines of words, each filled to the text width like a typeset page (fixed seed)."""
    rng = random.Random(seed)
    lines: list[str] = []
    for _ in range(OCR_LINES):
        words: list[str] = []
        while True:
            word = rng.choice(OCR_WORDS)
            if words and font.getlength(" ".join([*words, word])) > width:
                break
            words.append(word)
        line = " ".join(words)
        lines.append(line[:1].upper() + line[1:])
    return lines


def draw_ocr_page(seed: int) -> tuple[Image.Image, list[str]]:
    """A dense text page (a title, then OCR_LINES lines of 26-px text) and the lines it holds."""
    page = Image.new("RGB", OCR_PAGE_SIZE, "white")
    draw = ImageDraw.Draw(page)
    title = f"Benchmark report {seed + 1}"
    draw.text((OCR_MARGIN_PX, 48), title, fill="black", font=ImageFont.load_default(size=OCR_TITLE_PX))
    body = ImageFont.load_default(size=OCR_FONT_PX)
    lines = ocr_page_lines(seed, body, OCR_PAGE_SIZE[0] - 2 * OCR_MARGIN_PX)
    for index, line in enumerate(lines):
        draw.text((OCR_MARGIN_PX, 110 + index * OCR_LEADING_PX), line, fill=(20, 20, 20), font=body)
    return page, [title, *lines]


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")  # Pillow's default compression, as a client would send it
    return buffer.getvalue()


def make_pdf(pages: list[Image.Image]) -> bytes:
    """A scan-like PDF: one JPEG image a page (Pillow's PDF writer), at the gateway's render dpi."""
    buffer = io.BytesIO()
    pages[0].save(buffer, format="PDF", save_all=True, append_images=pages[1:], resolution=OCR_PDF_DPI)
    return buffer.getvalue()


def word_recall(expected: list[str], text: str) -> float:
    """The share of the page's words (repeats counted) found in an answer, whatever their order."""
    want = Counter(re.findall(r"[a-z0-9]+", " ".join(expected).lower()))
    got = Counter(re.findall(r"[a-z0-9]+", text.lower()))
    total = sum(want.values())
    return sum(min(count, got[word]) for word, count in want.items()) / total if total else 0.0


def engine_pages(document: bytes) -> list[Image.Image]:
    """The pages as the gateway hands them to its engine, made by the gateway's own functions:
    loaded (a PDF rendered at the default dpi) and resized for the default resolution."""
    from app.ocr.documents import load_pages, resize_for_mode
    from app.settings import OcrSettings

    ocr = OcrSettings()
    loaded = load_pages(
        document, pages=None, max_pages=ocr.max_pages, max_pixels=ocr.max_pixels, dpi=ocr.pdf_dpi
    )
    return [resize_for_mode(page.image, ocr.default_resolution) for page in loaded]


def engine_body(image: Image.Image) -> bytes:
    """The gateway's engine request for one page (PNG data URL, app/ocr/requests.py), pre-encoded."""
    from app.ocr.documents import encode_data_url
    from app.ocr.requests import DEFAULT_MAX_TOKENS, page_request

    request = page_request(OCR_MODEL, encode_data_url(image), "text", DEFAULT_MAX_TOKENS)
    return json.dumps(request).encode()


def load_inprocess_ocr() -> Reader:
    """RapidOCR in this process, built as app/engines/cpu_ocr.py load_rapidocr builds it, with
    the engine's own defaults (the gateway starts it with no further args): det_unclip_ratio,
    onnxruntime threads, and the angle classifier off."""
    from rapidocr_onnxruntime import RapidOCR  # type: ignore[import-untyped]

    from app.engines.cpu_ocr import parse_args

    engine = parse_args(["--port", "0"])
    options: dict[str, Any] = {"det_unclip_ratio": engine.unclip_ratio}
    if engine.threads > 0:
        options["intra_op_num_threads"] = engine.threads
    model = RapidOCR(**options)
    use_cls = bool(engine.angle_cls)

    def read(image: Image.Image) -> str:
        result, _elapsed = model(image, use_cls=use_cls)
        return "\n".join(str(text) for _box, text, _score in result or [])

    return read


class EngineLog:
    """The inference time a cpu_ocr engine logs for each page (`cpu_ocr.done ... ms=N`), read as
    its log grows. Pages go one at a time, so the lines new since the last look are the call's.

    Wall time minus this is what a path adds to RapidOCR itself, a figure that holds on a busy
    machine where the inference time of one page varies several-fold from read to read.
    """

    _DONE = re.compile(rb"cpu_ocr\.done .*?\bms=(\d+)")

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = path.stat().st_size if path.exists() else 0

    def take(self) -> list[float]:
        """Inference ms of each page logged since the last call (complete lines only)."""
        try:
            with self.path.open("rb") as log:
                log.seek(self.offset)
                data = log.read()
        except OSError:
            return []
        data = data[: data.rfind(b"\n") + 1]
        self.offset += len(data)
        return [float(ms) for ms in self._DONE.findall(data)]

    def last(self) -> float:
        taken = self.take()
        return taken[-1] if taken else math.nan


def timed_read(read: Reader, image: Image.Image) -> tuple[float, str]:
    began = time.perf_counter()
    text = read(image)
    return (time.perf_counter() - began) * 1000, text


class OcrFailed(Exception):
    """An OCR call that did not answer 200 with a usable body."""


OCR_CALL_ERRORS = (OcrFailed, aiohttp.ClientError, TimeoutError, ValueError, LookupError, TypeError)


def describe(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, OcrFailed) else repr(exc)


async def ocr_engine_call(session: aiohttp.ClientSession, url: str, body: bytes) -> tuple[float, str]:
    """One page straight to a cpu_ocr engine: (ms, the answer's text)."""
    began = time.perf_counter()
    async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as response:
        payload = await response.read()
        status = response.status
    elapsed_ms = (time.perf_counter() - began) * 1000
    if status != 200:
        raise OcrFailed(f"engine HTTP {status}: {payload[:300].decode(errors='replace')}")
    return elapsed_ms, str(json.loads(payload)["choices"][0]["message"]["content"])


async def ocr_gateway_call(
    session: aiohttp.ClientSession, stack: Stack, document: bytes, filename: str, content_type: str
) -> tuple[float, Doc]:
    """One document through POST /api/ocr as multipart: (ms, the answer)."""
    form = aiohttp.FormData()
    form.add_field("file", document, filename=filename, content_type=content_type)
    form.add_field("model", OCR_MODEL)
    headers = {"Authorization": f"Bearer {stack.token}", "X-Client-ID": "bench"}
    began = time.perf_counter()
    async with session.post(f"{stack.gateway_url}/api/ocr", data=form, headers=headers) as response:
        payload = await response.read()
        status = response.status
    elapsed_ms = (time.perf_counter() - began) * 1000
    if status != 200:
        raise OcrFailed(f"gateway HTTP {status}: {payload[:300].decode(errors='replace')}")
    answer: Doc = json.loads(payload)
    return elapsed_ms, answer


async def run_ocr_phase(stack: Stack, sc: OcrScenario, history: int, idle: Idle) -> OcrResult:
    """One page three ways in rounds, then the PDF; one page in flight at a time throughout.

    Each round reads the page once on every path, in an order that rotates from round to round,
    so a busy neighbour on a shared machine slows all three alike instead of whichever ran last.
    """
    assert stack.ocr_url is not None, "the stack was started without the OCR engine"
    page, lines = draw_ocr_page(0)
    upload = png_bytes(page)
    image = engine_pages(upload)[0]
    body = engine_body(image)
    read = await asyncio.to_thread(load_inprocess_ocr)
    engine_url = f"{stack.ocr_url}/v1/chat/completions"
    direct_log = EngineLog(stack.tmp / "direct-cpu-ocr.log")
    gateway_log = EngineLog(stack.tmp / "gateway-data" / "logs" / f"{OCR_MODEL}.log")
    paths = {"in-process": OcrPath(), "engine": OcrPath(), "gateway": OcrPath()}
    job_ms: list[float] = []
    run_ms: list[float] = []
    outside_ms: list[float] = []
    costs: list[ServerCost] = []
    metered_s = 0.0
    meter = CostMeter(stack.gateway_pid, stack.db)
    foreign = ForeignLoad(stack.own_pids)
    foreign.start()

    async def in_process(sink: OcrPath, measured: bool) -> None:
        elapsed, text = await asyncio.to_thread(timed_read, read, image)
        sink.ok(elapsed, word_recall(lines, text), elapsed)

    async def engine(sink: OcrPath, measured: bool) -> None:
        direct_log.take()
        try:
            elapsed, text = await ocr_engine_call(session, engine_url, body)
        except OCR_CALL_ERRORS as exc:
            sink.fail(describe(exc))
            return
        sink.ok(elapsed, word_recall(lines, text), direct_log.last())

    async def gateway(sink: OcrPath, measured: bool) -> None:
        nonlocal metered_s
        gateway_log.take()
        began = time.perf_counter()
        meter.start()
        try:
            elapsed, answer = await ocr_gateway_call(session, stack, upload, "page.png", "image/png")
        except OCR_CALL_ERRORS as exc:
            sink.fail(describe(exc))
            return
        finally:
            cost = meter.stop()
            if measured:
                costs.append(cost)
                metered_s += time.perf_counter() - began
        sink.ok(elapsed, word_recall(lines, str(answer.get("text") or "")), gateway_log.last())
        spent = answer.get("timings") or {}
        if measured and isinstance(spent.get("total_ms"), int | float):
            job_ms.append(float(spent["total_ms"]))
            run_ms.append(float(spent.get("engine_ms") or math.nan))
            outside_ms.append(elapsed - float(spent["total_ms"]))

    steps = [(name, step) for name, step in zip(paths, (in_process, engine, gateway), strict=True)]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900)) as session:
        for round_ in range(sc.warmup + sc.pages):
            measured = round_ >= sc.warmup
            shift = round_ % len(steps)
            for name, step in steps[shift:] + steps[:shift]:
                await step(paths[name] if measured else OcrPath(), measured)

        pdf_pages = [draw_ocr_page(seed) for seed in range(1, OCR_PDF_PAGES + 1)]
        pdf = make_pdf([p for p, _ in pdf_pages])
        bodies = [engine_body(im) for im in engine_pages(pdf)]
        pdf_paths = {"engine": OcrPath(), "gateway": OcrPath()}
        for _ in range(sc.pdf_runs):
            direct_log.take()
            began = time.perf_counter()
            worst = 1.0
            try:
                for page_body, (_, expected) in zip(bodies, pdf_pages, strict=True):
                    _, text = await ocr_engine_call(session, engine_url, page_body)
                    worst = min(worst, word_recall(expected, text))
                elapsed = (time.perf_counter() - began) * 1000
                pdf_paths["engine"].ok(elapsed, worst, sum(direct_log.take()))
            except OCR_CALL_ERRORS as exc:
                pdf_paths["engine"].fail(describe(exc))
            gateway_log.take()
            try:
                elapsed, answer = await ocr_gateway_call(session, stack, pdf, "report.pdf", "application/pdf")
                read_pages = answer.get("pages") or []
                if len(read_pages) != OCR_PDF_PAGES:
                    raise OcrFailed(f"gateway answered {len(read_pages)} pages of {OCR_PDF_PAGES}")
                worst = min(
                    word_recall(expected, str(got.get("text") or ""))
                    for got, (_, expected) in zip(read_pages, pdf_pages, strict=True)
                )
                pdf_paths["gateway"].ok(elapsed, worst, sum(gateway_log.take()))
            except OCR_CALL_ERRORS as exc:
                pdf_paths["gateway"].fail(describe(exc))
    foreign_cores = foreign.stop()

    gw = paths["gateway"]
    done = max(1, len(gw.latencies_ms))
    trips = sum(c.db_round_trips for c in costs)
    background = idle.db_ops_per_s * metered_s
    every = [*paths.values(), *pdf_paths.values()]
    return OcrResult(
        history=history,
        pages=sc.pages,
        warmup=sc.warmup,
        upload=f"{page.width}x{page.height} PNG, {len(upload):,} bytes",
        engine_page=f"{image.width}x{image.height} PNG data URL, {len(body):,} bytes of JSON",
        inproc_p50_ms=paths["in-process"].p50(),
        inproc_max_ms=max(paths["in-process"].latencies_ms, default=math.nan),
        direct_p50_ms=paths["engine"].p50(),
        direct_max_ms=max(paths["engine"].latencies_ms, default=math.nan),
        gateway_p50_ms=gw.p50(),
        gateway_max_ms=max(gw.latencies_ms, default=math.nan),
        inference_p50_ms={name: path.inference_p50() for name, path in paths.items()},
        outside_p50_ms={name: path.outside_p50() for name, path in paths.items()},
        inference_pooled_p50_ms=nearest_rank(
            [ms for path in paths.values() for ms in path.inference_ms if not math.isnan(ms)], 0.50
        ),
        gateway_job_p50_ms=nearest_rank(job_ms, 0.50),
        gateway_run_p50_ms=nearest_rank(run_ms, 0.50),
        gateway_outside_p50_ms=nearest_rank(outside_ms, 0.50),
        recall_min={name: min(path.recalls, default=math.nan) for name, path in paths.items()},
        errors={name: path.errors for name, path in paths.items()},
        gateway_cpu_ms_per_page=sum(c.gateway_cpu_s for c in costs) * 1000 / done,
        db_cpu_ms_per_page=sum(c.db_cpu_s for c in costs) * 1000 / done,
        db_round_trips_per_page=trips / done,
        db_round_trips_net_per_page=max(0.0, trips - background) / done,
        pdf=(
            f"{OCR_PDF_PAGES} pages of {OCR_PAGE_SIZE[0]}x{OCR_PAGE_SIZE[1]} px, one JPEG each "
            f"at {OCR_PDF_DPI} dpi, {len(pdf):,} bytes"
        ),
        pdf_pages=OCR_PDF_PAGES,
        pdf_direct_s=[ms / 1000 for ms in pdf_paths["engine"].latencies_ms],
        pdf_gateway_s=[ms / 1000 for ms in pdf_paths["gateway"].latencies_ms],
        pdf_direct_inference_s=[ms / 1000 for ms in pdf_paths["engine"].inference_ms],
        pdf_gateway_inference_s=[ms / 1000 for ms in pdf_paths["gateway"].inference_ms],
        pdf_errors={name: path.errors for name, path in pdf_paths.items()},
        foreign_cores=foreign_cores,
        first_error=next((path.first_error for path in every if path.first_error), None),
    )
