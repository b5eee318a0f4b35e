"""Regressions of the API's edges: rate-limit headers on every surface, the /api/jobs paging
cursor, one error code per kind of bad input, OCR replays without stored prompts, and the
body a DELETE of a running job answers."""

from __future__ import annotations

import base64
import io
from datetime import UTC, datetime
from typing import Any

import httpx
from PIL import Image

from tests.conftest import GatewayFactory, stub

BODY = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 32), "white").save(buffer, format="PNG")
    return buffer.getvalue()


def _rate_headers(response: httpx.Response) -> tuple[str | None, str | None, str | None]:
    h = response.headers
    return h.get("X-RateLimit-Limit"), h.get("X-RateLimit-Remaining"), h.get("X-RateLimit-Reset")


async def test_rate_limit_headers_on_every_surface(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory({"demo": stub()}, rate_limit={"per_minute": 50, "window_seconds": 600})
    plain = await gw.http.post("/api/chat", json=BODY, headers=gw.headers())
    v1 = await gw.http.post("/v1/chat/completions", json=BODY, headers=gw.headers())
    async with gw.http.stream(
        "POST", "/v1/chat/completions", json={**BODY, "stream": True}, headers=gw.headers()
    ) as streamed:
        assert streamed.status_code == 200
        text = "".join([chunk async for chunk in streamed.aiter_text()])
    assert text.rstrip().endswith("data: [DONE]")
    models = await gw.http.get("/v1/models", headers=gw.headers())
    for response in (plain, v1, streamed, models):
        limit, remaining, reset = _rate_headers(response)
        assert limit == "50", (response.request.url, response.headers)
        assert remaining is not None and reset is not None and int(reset) >= 1
    assert [_rate_headers(r)[1] for r in (plain, v1, streamed, models)] == ["49", "48", "47", "46"]


async def test_jobs_paging_cursor_does_not_skip_jobs_of_the_same_millisecond(
    gateway_factory: GatewayFactory,
) -> None:
    gw = await gateway_factory({"demo": stub()})
    ids = [(await gw.chat("demo", f"job {i}")).json()["id"] for i in range(5)]
    # four of them admitted in the same millisecond (as under load, or on two instances)
    assert gw.services.database is not None
    same = datetime(2030, 1, 1, 12, 0, 0, 123000, tzinfo=UTC)
    await gw.services.database.jobs.update_many({"_id": {"$in": ids[1:]}}, {"$set": {"enqueued_at": same}})
    seen: list[str] = []
    params: dict[str, Any] = {"limit": 2}
    for _ in range(10):
        page = (await gw.http.get("/api/jobs", params=params, headers=gw.headers())).json()
        seen += [job["id"] for job in page["data"]]
        if not page["has_more"]:
            assert page["next"] is None
            break
        assert isinstance(page["next"], str)
        params = {"limit": 2, "cursor": page["next"]}
    assert sorted(seen) == sorted(ids) and len(seen) == 5, seen
    assert seen[-1] == ids[0]  # the oldest comes last
    # `before` (a time) still works for older clients
    older = await gw.http.get("/api/jobs", params={"before": same.isoformat()}, headers=gw.headers())
    assert [job["id"] for job in older.json()["data"]] == [ids[0]]
    bad = await gw.http.get("/api/jobs", params={"cursor": "not-a-cursor"}, headers=gw.headers())
    assert bad.status_code == 400 and bad.json()["code"] == "invalid_request"
    assert "cursor" in bad.json()["detail"]
    both = await gw.http.get(
        "/api/jobs", params={"cursor": page["next"] or "x", "before": same.isoformat()}, headers=gw.headers()
    )
    assert both.status_code == 400


async def test_one_error_code_per_kind_of_bad_input(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory({"demo": stub(), "ocr": stub()})
    json_headers = {**gw.headers(), "Content-Type": "application/json"}
    admin_json = {**gw.headers(gw.admin_token), "Content-Type": "application/json"}
    # a body that is not JSON: 400 invalid_json on every route that takes JSON
    for path, headers in [
        ("/api/chat", json_headers),
        ("/api/jobs", json_headers),
        ("/api/ocr", json_headers),
        ("/admin/ocr/resolution", admin_json),
        ("/admin/api-keys", admin_json),
    ]:
        response = await gw.http.post(path, content=b'{"model": ', headers=headers)
        assert (response.status_code, response.json()["code"]) == (400, "invalid_json"), (path, response.text)
        assert response.json()["detail"] == "request body is not valid JSON"
    # a JSON body of the wrong shape: 422 validation_error, loc starting with "body"
    for path, headers in [
        ("/api/chat", json_headers),
        ("/api/jobs", json_headers),
        ("/api/ocr", json_headers),
        ("/admin/ocr/resolution", admin_json),
    ]:
        response = await gw.http.post(path, json={"modle": "demo"}, headers=headers)
        assert (response.status_code, response.json()["code"]) == (422, "validation_error"), (
            path,
            response.text,
        )
        locs = [problem["loc"] for problem in response.json()["detail"]]
        assert all(loc[0] == "body" for loc in locs), (path, locs)
        assert ["body", "modle"] in locs, (path, locs)
    # two files where one is expected: 400 invalid_request naming the field
    png = _png()
    two = [("file", ("a.png", png, "image/png")), ("file", ("b.png", png, "image/png"))]
    for path in ("/api/ocr", "/api/jobs"):
        response = await gw.http.post(path, files=two, headers=gw.headers())
        assert response.status_code == 400, (path, response.text)
        assert response.json()["code"] == "invalid_request", (path, response.text)
        assert "one file" in response.json()["detail"]
    # a multipart body that is cut off
    broken = await gw.http.post(
        "/api/ocr",
        content=b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\nabc',
        headers={**gw.headers(), "Content-Type": "multipart/form-data; boundary=xyz"},
    )
    assert broken.status_code == 400 and broken.json()["code"] == "invalid_request", broken.text


async def test_ocr_idempotency_replay_without_stored_prompts(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory({"ocr": stub()}, history={"store_prompts": False})
    png = _png()

    async def ocr(data: bytes, key: str, name: str = "scan.png") -> httpx.Response:
        return await gw.http.post(
            "/api/ocr",
            files={"file": (name, data, "image/png")},
            data={"model": "ocr"},
            headers=gw.headers(Idempotency_Key=key),
        )

    first = await ocr(png, "ocr-1")
    assert first.status_code == 200, first.text
    stored = await gw.services.database.jobs.find_one({"_id": first.json()["id"]})
    assert stored is not None and "request" not in stored  # the prompt was not kept
    again = await ocr(png, "ocr-1", name="renamed.png")  # the file name is not part of the request
    assert again.status_code == 200, again.text
    assert again.json()["id"] == first.json()["id"]
    other = await ocr(png + b"\0", "ocr-1")
    assert other.status_code == 409 and other.json()["code"] == "idempotency_key_reused"
    # the JSON form is the same request as the upload
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    part = {"type": "image_url", "image_url": {"url": url}}
    body = {"model": "ocr", "messages": [{"role": "user", "content": [part]}]}
    as_json = await gw.http.post("/api/ocr", json=body, headers=gw.headers(Idempotency_Key="ocr-1"))
    assert as_json.status_code == 200 and as_json.json()["id"] == first.json()["id"], as_json.text
    # a chat replay without stored prompts works too
    chat = {"model": "ocr", "messages": [{"role": "user", "content": "hi"}]}
    answers = [
        await gw.http.post("/api/chat", json=chat, headers=gw.headers(Idempotency_Key="c-1"))
        for _ in range(2)
    ]
    assert [a.status_code for a in answers] == [200, 200]
    assert answers[0].json()["id"] == answers[1].json()["id"]


async def test_cancelling_a_running_job_answers_its_end(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory({"one": stub("--latency-ms", "30000", max_concurrent=1)})
    body = {"model": "one", "type": "chat", "messages": [{"role": "user", "content": "long"}]}
    job = (await gw.http.post("/api/jobs", json=body, headers=gw.headers())).json()
    await gw.until_count("one", "running", 1)
    response = await gw.http.delete(f"/api/jobs/{job['id']}", headers=gw.headers())
    assert response.status_code == 200, response.text
    cancelled = response.json()
    assert cancelled["state"] == "cancelled"
    assert cancelled["finished_at"] is not None and cancelled["started_at"] is not None
    assert cancelled["timings"]["total_ms"] is not None and cancelled["timings"]["engine_ms"] is not None
    stored = (await gw.http.get(f"/api/jobs/{job['id']}", headers=gw.headers())).json()
    ended = [datetime.fromisoformat(j["finished_at"]) for j in (stored, cancelled)]
    assert abs(ended[0] - ended[1]).total_seconds() < 0.001  # the database keeps milliseconds
