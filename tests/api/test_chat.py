"""POST /api/chat through the real queue, real DB and a real stub engine process."""

from __future__ import annotations

import asyncio

from tests.conftest import GatewayFactory, stub


async def test_chat_answer_carries_engine_reply_and_compat_fields(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory({"demo": stub(aliases=["demo-chat"])})
    response = await gw.chat("demo-chat", "what is two plus two")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["message"] == {"role": "assistant", "content": "stub reply to: what is two plus two"}
    assert body["model"] == "demo"
    assert body["status"] == "completed"
    assert body["request_id"] == body["id"]
    assert body["usage"]["prompt_tokens"] == 5
    assert body["usage"]["completion_tokens"] == 8
    assert body["attempts"] == 1
    assert body["timings"]["total_ms"] >= body["timings"]["engine_ms"] > 0

    job = await gw.http.get(f"/api/jobs/{body['id']}", headers=gw.headers())
    assert job.status_code == 200
    assert job.json()["state"] == "succeeded"
    assert job.json()["result"]["message"]["content"] == body["message"]["content"]


async def test_admission_is_exactly_capacity_under_40_concurrent_requests(
    gateway_factory: GatewayFactory,
) -> None:
    gw = await gateway_factory({"slow": stub("--latency-ms", "1500")})
    responses = await asyncio.gather(*(gw.chat("slow", f"request {i}") for i in range(40)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses.count(200) == 20, statuses
    assert statuses.count(429) == 20, statuses
    rejected = [r for r in responses if r.status_code == 429]
    assert all(r.headers["Retry-After"] == "1" for r in rejected)
    assert "full" in rejected[0].json()["detail"]
    queue = await gw.http.get("/admin/queue/slow", headers=gw.headers(gw.admin_token))
    assert queue.json()["total_processed"] == 20


async def test_priority_order_with_one_slot(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory({"one": stub("--latency-ms", "300", max_concurrent=1, max_waiting=10)})
    first = asyncio.create_task(gw.chat("one", "first"))
    await gw.until_count("one", "running", 1)
    order = [("low", "l1"), ("normal", "n1"), ("low", "l2"), ("high", "h1"), ("normal", "n2"), ("high", "h2")]
    tasks = []
    for n, (priority, text) in enumerate(order, start=1):
        tasks.append(asyncio.create_task(gw.chat("one", text, X_Priority=priority)))
        await gw.until_count("one", "queued", n)
    answers = [r.json() for r in await asyncio.gather(first, *tasks)]
    started = sorted(answers[1:], key=lambda a: a["timings"]["queue_ms"])
    assert [a["message"]["content"].split()[-1] for a in started] == ["h1", "h2", "n1", "n2", "l1", "l2"]
