"""The CPU OCR engine as a real process: real RapidOCR models, real sockets, real images.

One engine per module, since loading the models takes about a second; each test then costs
one OCR call (well under a second or two on two cores).
"""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image, ImageDraw, ImageFont

from app.ocr.grounding import parse_grounding
from app.store.embedded import free_port
from tests.conftest import eventually_sync

ROOT = Path(__file__).resolve().parents[2]
LINES = [(60, 60, "Invoice number 4711"), (60, 210, "Total amount due"), (60, 360, "Thank you for shopping")]
SIZE = (1280, 520)


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log_path = tmp_path_factory.mktemp("cpu_ocr") / "engine.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "app.engines.cpu_ocr", "--port", str(port), "--model-name", "ocr-test"],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:

        def health() -> int:
            if process.poll() is not None:
                pytest.fail(f"engine exited with {process.returncode}:\n{log_path.read_text()}")
            try:
                return httpx.get(base + "/health", timeout=1).status_code
            except httpx.TransportError:
                return 0  # connection refused while the models load

        try:
            eventually_sync(health, lambda status: status == 200, "engine healthy", 60)
        except AssertionError as exc:
            pytest.fail(f"{exc}:\n{log_path.read_text()}")
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def document(size: tuple[int, int] = SIZE) -> Image.Image:
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=48)  # Pillow's bundled TrueType font: no system fonts
    for x, y, text in LINES:
        draw.text((x, y), text, fill="black", font=font)
    return image


def data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def body(url: Any, prompt: str = "Free OCR.", **extra: Any) -> dict[str, Any]:
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": prompt}]
    return {"model": "ocr-test", "messages": [{"role": "user", "content": content}], **extra}


def ocr(base: str, payload: Any, timeout: float = 60) -> httpx.Response:
    return httpx.post(base + "/v1/chat/completions", json=payload, timeout=timeout)


def test_health_and_models(engine: str) -> None:
    assert httpx.get(engine + "/health").json()["status"] == "ok"
    assert [m["id"] for m in httpx.get(engine + "/v1/models").json()["data"]] == ["ocr-test"]


def test_free_ocr_reads_the_words_in_reading_order(engine: str) -> None:
    response = ocr(engine, body(data_url(document()), max_tokens=8192))
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["object"] == "chat.completion"
    assert answer["system_fingerprint"] == "cpu-ocr (RapidOCR onnxruntime)"
    assert answer["choices"][0]["finish_reason"] == "stop"
    content = answer["choices"][0]["message"]["content"]
    lines = content.lower().splitlines()
    assert lines == [text.lower() for _, _, text in LINES], content
    assert answer["usage"]["completion_tokens"] == len(content.split())


def test_markdown_mode_answers_with_grounding_boxes(engine: str) -> None:
    prompt = "<|grounding|>Convert the document to markdown."
    response = ocr(engine, body(data_url(document()), prompt))
    assert response.status_code == 200, response.text
    content = response.json()["choices"][0]["message"]["content"]
    assert content.startswith("<|ref|>text<|/ref|><|det|>[[")
    text, boxes = parse_grounding(content, *SIZE)
    assert text.lower() == "\n\n".join(t.lower() for _, _, t in LINES)
    assert [b.label for b in boxes] == ["text"] * 3
    for box, (x, y, _) in zip(boxes, LINES, strict=True):
        # Drawn at (x, y) with a 48 px font: the box starts near there and is a line tall.
        assert abs(box.x1 - x) < 25 and abs(box.y1 - y) < 40, box
        assert 30 < box.y2 - box.y1 < 90 and box.x2 > box.x1 + 300, box


def test_streaming_answer(engine: str) -> None:
    payload = body(data_url(document()), stream=True, stream_options={"include_usage": True})
    with httpx.stream("POST", engine + "/v1/chat/completions", json=payload, timeout=60) as response:
        assert response.status_code == 200
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert "thank you for shopping" in text.lower()
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["usage"]["completion_tokens"] == len(text.split())


def test_blank_image_gives_empty_text(engine: str) -> None:
    response = ocr(engine, body(data_url(Image.new("RGB", (200, 100), "white"))))
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == ""


def pdf_data_url() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (50, 50), "white").save(buffer, format="PDF")
    return "data:application/pdf;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"model": "x", "messages": [{"role": "user", "content": "Free OCR."}]}, "no image"),
        ({"model": "x", "messages": []}, "messages must be a non-empty list"),
        (body("https://example.com/scan.png"), "must be a data URL"),
        (body("data:image/png,rawbytes"), "must be base64-encoded"),
        (body("data:image/png;base64,@@@not-base64@@@"), "not valid base64"),
        (body("data:image/png;base64," + base64.b64encode(b"hello, not an image").decode()), "got text"),
        (body("data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\nbroken").decode()), "corrupt"),
        (body(pdf_data_url()), "not a PDF"),
        (body(data_url(Image.new("RGB", (9, 9))), max_tokens=0), "max_tokens must be a positive integer"),
        (
            {
                "model": "x",
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}] * 2}
                ],
            },
            "one image per request",
        ),
    ],
    ids=[
        "no-image",
        "no-messages",
        "remote-url",
        "not-base64-url",
        "bad-base64",
        "text",
        "corrupt",
        "pdf",
        "max-tokens",
        "two-images",
    ],
)
def test_bad_input_gets_a_400_that_says_why(engine: str, payload: dict[str, Any], message: str) -> None:
    response = ocr(engine, payload)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert message in error["message"]


def test_invalid_json_gets_a_400(engine: str) -> None:
    response = httpx.post(
        engine + "/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_health_answers_while_pages_are_being_read(engine: str) -> None:
    """OCR runs off the event loop: a busy engine must still look alive to the gateway."""
    payload = body(data_url(document((1280, 960))))
    answered_while_busy: list[float] = []
    with ThreadPoolExecutor(max_workers=2) as pool:
        pending = [pool.submit(ocr, engine, payload) for _ in range(2)]

        def health_while_busy() -> bool:
            started = time.monotonic()
            assert httpx.get(engine + "/health", timeout=5).status_code == 200
            if not all(f.done() for f in pending):
                answered_while_busy.append(time.monotonic() - started)
            return all(f.done() for f in pending)

        eventually_sync(health_while_busy, bool, "both OCR requests answered", 120)
        assert all(f.result().status_code == 200 for f in pending)
    assert answered_while_busy, "OCR finished before /health was asked; the test proved nothing"
    assert max(answered_while_busy) < 1.0, f"/health took up to {max(answered_while_busy):.2f} s during OCR"
