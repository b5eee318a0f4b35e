"""POST /api/ocr through the queue to a real cpu_ocr engine process (RapidOCR), and every bad
upload refused with a clear 4xx before it takes a queue slot."""

from __future__ import annotations

import base64
import json
from typing import Any

import httpx
import pytest

from tests.conftest import GatewayClient, GatewayFactory, eventually, stub
from tests.documents import CATALOG, ENCRYPTED, encode, hand_pdf, png_claiming, text_image, text_pdf

OCR_MODEL = {"kind": "cpu_ocr", "aliases": ["deepseek-ai/DeepSeek-OCR"], "max_concurrent": 2}


def _png(lines: list[str]) -> bytes:
    return encode(text_image(lines), "PNG")


async def _ocr(gw: GatewayClient, data: bytes, name: str = "scan.png", **form: str) -> httpx.Response:
    headers = gw.headers(**{k: v for k, v in form.items() if k.startswith("X_")})
    fields = {k: v for k, v in form.items() if not k.startswith("X_")}
    return await gw.http.post(
        "/api/ocr", files={"file": (name, data, "application/octet-stream")}, data=fields, headers=headers
    )


@pytest.fixture
async def gw(gateway_factory: GatewayFactory) -> GatewayClient:
    return await gateway_factory(
        {
            "ocr": OCR_MODEL,
            "flaky": stub("--fail-first", "2"),
            "echo": stub("--log-requests"),
            "llm": {"kind": "vllm", "autostart": False},
        },
        engines={"startup_timeout": 60},
    )


async def test_image_text_is_read_through_the_queue(gw: GatewayClient) -> None:
    response = await _ocr(gw, _png(["INVOICE 4711", "TOTAL AMOUNT 99"]))
    assert response.status_code == 200, response.text
    body = response.json()
    assert "INVOICE" in body["text"] and "4711" in body["text"] and "TOTAL" in body["text"]
    assert body["text"].index("INVOICE") < body["text"].index("TOTAL")  # reading order
    assert body["model"] == "ocr" and body["mode"] == "large" and body["resolution"] == "large"
    assert body["output"] == "text" and body["truncated"] is False
    assert body["response"] == body["text"] and body["status"] == "completed"
    (page,) = body["pages"]
    assert (page["page"], page["width"], page["height"]) == (1, 1000, 400)
    job = (await gw.http.get(f"/api/jobs/{body['id']}", headers=gw.headers())).json()
    assert job["state"] == "succeeded" and "INVOICE" in job["result"]["text"]
    assert job["model"] == "ocr"


async def test_pdf_pages_are_read_one_by_one_and_selected(gw: GatewayClient) -> None:
    pdf = text_pdf([["FIRST PAGE ALPHA"], ["SECOND PAGE BRAVO"], ["THIRD PAGE CHARLIE"]])
    response = await _ocr(gw, pdf, "doc.bin")  # the type comes from the content, not the name
    assert response.status_code == 200, response.text
    pages = response.json()["pages"]
    assert [p["page"] for p in pages] == [1, 2, 3]
    for page, word in zip(pages, ["ALPHA", "BRAVO", "CHARLIE"], strict=True):
        assert word in page["text"], pages
    selected = await _ocr(gw, pdf, "doc.pdf", pages="1,3")
    assert [p["page"] for p in selected.json()["pages"]] == [1, 3]
    assert "BRAVO" not in selected.json()["text"] and "CHARLIE" in selected.json()["text"]


async def test_markdown_output_has_boxes_in_page_pixels(gw: GatewayClient) -> None:
    response = await _ocr(gw, _png(["HEADLINE NEWS"]), output="markdown", X_Resolution="base")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["mode"] == "base" and body["output"] == "markdown"
    (page,) = body["pages"]
    assert "HEADLINE" in page["text"] and "<|ref|>" not in page["text"]
    box = page["boxes"][0]
    assert 0 <= box["x1"] < box["x2"] <= 1000 and 0 <= box["y1"] < box["y2"] <= 400
    assert box["y1"] < 150  # the line was drawn at the top


async def test_json_form_of_older_clients(gw: GatewayClient) -> None:
    url = "data:image/png;base64," + base64.b64encode(_png(["RECEIPT 2024"])).decode()
    prompt = {"type": "text", "text": "Free OCR."}
    body: dict[str, Any] = {
        "model": "deepseek-ai/DeepSeek-OCR",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": url}},
                    prompt,
                ],
            }
        ],
        "max_tokens": 4096,
    }
    response = await gw.http.post("/api/ocr", json=body, headers=gw.headers(X_Resolution="gundam"))
    assert response.status_code == 200, response.text
    assert "RECEIPT" in response.json()["response"] and response.json()["resolution"] == "gundam"


def _json_ocr(*parts: dict[str, Any]) -> dict[str, Any]:
    return {"model": "ocr", "messages": [{"role": "user", "content": list(parts)}]}


def _image_part(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


PROMPT = {"type": "text", "text": "Free OCR."}
PNG_URL = "data:image/png;base64," + base64.b64encode(encode(text_image(["X"]), "PNG")).decode()


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (_json_ocr(PROMPT), 400, "exactly one image_url part (got 0)"),
        (_json_ocr(_image_part(PNG_URL), _image_part(PNG_URL)), 400, "exactly one image_url part (got 2)"),
        (_json_ocr({"type": "image_url", "image_url": {}}, PROMPT), 422, "Field required"),
        (_json_ocr(_image_part("http://x/y.png"), PROMPT), 400, "must be a base64 data URL"),
        (_json_ocr(_image_part("data:image/png,rawbytes"), PROMPT), 400, "must be a base64 data URL"),
        (_json_ocr(_image_part("data:image/png;base64,not*base64!"), PROMPT), 400, "not valid base64"),
        (_json_ocr(_image_part("data:image/png;base64,"), PROMPT), 400, "file is empty"),
        (
            _json_ocr(_image_part("data:image/png;base64," + base64.b64encode(b"plain text").decode())),
            400,
            "not a supported image or PDF (got text)",
        ),
    ],
    ids=["no-image", "two-images", "no-url", "not-data-url", "not-base64-url", "bad-base64", "empty", "text"],
)
async def test_json_form_bad_input(
    gw: GatewayClient, body: dict[str, Any], status: int, message: str
) -> None:
    """Older clients' JSON form (docs/ARCHITECTURE.md): a wrong image is a clear 4xx, never a queued job."""
    response = await gw.http.post("/api/ocr", json=body, headers=gw.headers())
    assert response.status_code == status, response.text
    assert message in str(response.json()["detail"]), response.json()
    assert await gw.count("ocr", "queued") + await gw.count("ocr", "running") == 0


async def test_default_resolution_is_persisted(gw: GatewayClient, gateway_factory: GatewayFactory) -> None:
    admin = gw.headers(gw.admin_token)
    assert (await gw.http.get("/admin/ocr/resolution", headers=admin)).json()["resolution"] == "large"
    switched = await gw.http.post("/admin/ocr/resolution", params={"resolution": "small"}, headers=admin)
    assert switched.json() == {
        "status": "switched",
        "resolution": "small",
        "mode": "small",
        "message": "default OCR resolution is now small (640 px)",
    }
    body = await gw.http.post("/admin/ocr/resolution", json={"mode": "tiny"}, headers=admin)
    assert body.json()["resolution"] == "tiny"
    bad = await gw.http.post("/admin/ocr/resolution", json={"mode": "huge"}, headers=admin)
    assert bad.status_code == 400 and "valid: tiny, small, base, large, gundam" in bad.json()["detail"]
    empty = await gw.http.post("/admin/ocr/resolution", headers=admin)
    assert empty.status_code == 400
    assert (
        await gw.http.post("/admin/ocr/resolution", json={"mode": "base"}, headers=gw.headers())
    ).status_code == 403
    used = await _ocr(gw, _png(["SMALL TEXT"]))
    assert used.json()["mode"] == "tiny"
    models = (await gw.http.get("/admin/models", headers=admin)).json()
    assert (models["ocr"]["resolution"], models["llm"]["resolution"]) == ("tiny", None)
    # another gateway on the same database (a restart, or a second instance) sees it
    assert gw.services.ocr is not None
    database = gw.gateway.settings.database.name
    other = await gateway_factory({"ocr": stub()}, database={"name": database})
    assert (await other.http.get("/admin/ocr/resolution", headers=other.headers(other.admin_token))).json()[
        "resolution"
    ] == "tiny"


async def test_a_failed_page_is_retried_not_the_document(gw: GatewayClient) -> None:
    pdf = text_pdf([["ONE"], ["TWO"], ["THREE"]])
    response = await _ocr(gw, pdf, model="flaky")  # the stub fails its first two calls
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["attempts"] == 1 and len(body["pages"]) == 3
    assert body["pages"][0]["text"] == "stub reply to: Free OCR."


async def test_answer_cut_by_max_tokens_is_flagged_truncated(gw: GatewayClient) -> None:
    """The engine stopping on length (DeepSeek-OCR's runaway repetition) is never a clean
    answer: the page that was cut and the document both say so; a page that fit does not."""
    pdf = text_pdf([["ALPHA ONE UNO", "BRAVO TWO DOS", "CHARLIE THREE TRES"], ["DELTA"]])
    response = await _ocr(gw, pdf, max_tokens="3")  # cpu_ocr counts words, cut at whole lines
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["truncated"] is True
    cut, whole = body["pages"]
    assert (cut["truncated"], cut["finish_reason"]) == (True, "length"), cut
    assert "ALPHA" in cut["text"] and "BRAVO" not in cut["text"]
    assert (whole["truncated"], whole["finish_reason"]) == (False, "stop"), whole
    assert "DELTA" in whole["text"]
    job = (await gw.http.get(f"/api/jobs/{body['id']}", headers=gw.headers())).json()
    assert job["result"]["truncated"] is True
    clean = await _ocr(gw, pdf, pages="2", max_tokens="3")
    assert clean.json()["truncated"] is False, clean.text


async def test_engine_is_sent_the_deepseek_ocr_prompts(gw: GatewayClient) -> None:
    """The stub answers with the prompt it was given, so this is what arrived at the engine."""
    text = await _ocr(gw, _png(["X"]), model="echo")
    assert text.status_code == 200, text.text
    assert text.json()["text"] == "stub reply to: Free OCR."
    markdown = await _ocr(gw, _png(["X"]), model="echo", output="markdown")
    assert markdown.json()["text"] == "stub reply to: <|grounding|>Convert the document to markdown."
    assert markdown.json()["truncated"] is False
    cut = await _ocr(gw, _png(["X"]), model="echo", max_tokens="2")
    assert (cut.json()["text"], cut.json()["truncated"]) == ("stub reply", True)
    assert gw.services.engines is not None
    logged = [
        json.loads(line.split(" messages ", 1)[1])
        for line in gw.services.engines.log_path("echo").read_text().splitlines()
        if line.startswith("request ")
    ]
    assert len(logged) == 3
    for fields in logged:  # what vLLM's DeepSeek-OCR needs with every request (docs/ARCHITECTURE.md)
        assert fields["skip_special_tokens"] is False
        assert fields["vllm_xargs"] == {
            "ngram_size": 30,
            "window_size": 90,
            "whitelist_token_ids": [128821, 128822],
        }
    assert logged[2]["max_tokens"] == 2


async def test_background_ocr_job(gw: GatewayClient) -> None:
    accepted = await gw.http.post(
        "/api/jobs",
        files={"file": ("a.png", _png(["BACKGROUND JOB"]), "image/png")},
        headers=gw.headers(),
    )
    assert accepted.status_code == 202, accepted.text

    async def job() -> dict[str, Any]:
        body: dict[str, Any] = (await gw.http.get(accepted.json()["location"], headers=gw.headers())).json()
        return body

    done = await eventually(job, lambda j: j["state"] == "succeeded", "the OCR job succeeding", 60)
    assert "BACKGROUND" in done["result"]["text"], done


def _truncated_png() -> bytes:
    data = _png(["CUT"])
    return data[: len(data) // 2]


@pytest.mark.parametrize(
    ("data", "name", "status", "message"),
    [
        (b"", "empty.png", 400, "file is empty"),
        (b"hello, I am a text file\n", "notes.png", 400, "not a supported image or PDF"),
        ("truncated", "cut.png", 400, "truncated or corrupt"),
        (
            png_claiming(30000, 30000),
            "bomb.png",
            413,
            "far too large to decode; the limit is 50,000,000 pixels",
        ),
        (png_claiming(8000, 7000), "big.png", 413, "8000x7000 = 56,000,000 pixels; the limit is 50,000,000"),
        (ENCRYPTED, "secret.pdf", 400, "PDF is encrypted"),
        (b"%PDF-1.7\nthis is not really a PDF\n", "broken.pdf", 400, "damaged or unreadable"),
        (hand_pdf([CATALOG, b"<< /Type /Pages /Kids [] /Count 0 >>"]), "none.pdf", 400, "PDF has no pages"),
    ],
    ids=[
        "empty",
        "text-as-png",
        "truncated-png",
        "bomb",
        "over-pixel-limit",
        "encrypted-pdf",
        "broken-pdf",
        "zero-page-pdf",
    ],
)
async def test_bad_documents(
    gw: GatewayClient, data: bytes | str, name: str, status: int, message: str
) -> None:
    content = _truncated_png() if data == "truncated" else data
    assert isinstance(content, bytes)
    response = await _ocr(gw, content, name)
    assert response.status_code == status, response.text
    assert message in response.json()["detail"], response.json()
    assert await gw.count("ocr", "queued") + await gw.count("ocr", "running") == 0


async def test_unknown_resolution_is_refused(gw: GatewayClient) -> None:
    unknown = await _ocr(gw, _png(["X"]), X_Resolution="huge")
    assert unknown.status_code == 400, unknown.text
    assert unknown.json()["detail"] == "unknown resolution 'huge'; valid: tiny, small, base, large, gundam"
    assert await gw.count("ocr", "queued") + await gw.count("ocr", "running") == 0


async def test_missing_file_field_is_refused(gw: GatewayClient) -> None:
    missing = await gw.http.post(
        "/api/ocr", data={"model": "ocr"}, files={"other": ("a", b"x")}, headers=gw.headers()
    )
    assert missing.status_code == 400, missing.text
    assert "multipart field 'file' is required" in missing.json()["detail"]
    assert await gw.count("ocr", "queued") + await gw.count("ocr", "running") == 0


async def test_bad_requests(gw: GatewayClient) -> None:
    png = _png(["X"])
    output = await _ocr(gw, png, output="html")
    assert output.status_code == 400 and "valid: text, markdown" in output.json()["detail"]
    unknown_model = await _ocr(gw, png, model="nope")
    assert unknown_model.status_code == 404
    chat_model = await _ocr(gw, png, model="llm")
    assert (
        chat_model.status_code == 400
        and "does not read documents; OCR models: ocr" in chat_model.json()["detail"]
    )
    pages = await _ocr(gw, text_pdf([["A"], ["B"]]), pages="5")
    assert pages.status_code == 400 and "pages" in pages.json()["detail"]
    too_many = await _ocr(gw, text_pdf([["A"]] * 21))
    assert too_many.status_code == 413 and "PDF has 21 pages; the limit is 20" in too_many.json()["detail"]
    big = await _ocr(gw, b"\x89PNG\r\n\x1a\n" + b"\0" * (10 * 1024 * 1024 + 10))
    assert big.status_code == 413 and "limit" in big.json()["detail"]
    plain = await gw.http.post("/api/ocr", content=b"raw bytes", headers=gw.headers())
    assert plain.status_code == 400 and "multipart/form-data" in plain.json()["detail"]
    extra = await _ocr(gw, png, colour="blue")
    assert extra.status_code == 400 and "unknown form field(s): colour" in extra.json()["detail"]
    no_auth = await gw.http.post("/api/ocr", files={"file": ("a.png", png)})
    assert no_auth.status_code == 401
