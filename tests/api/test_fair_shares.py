"""Fair shares between clients of one model (app/queue/fairness.py), against the gateway and a
real stub engine process: a batch client cannot take the places of the others, and claims go
to clients in turn."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from tests.api.test_metrics import scrape, series, value
from tests.conftest import GatewayClient, GatewayFactory, eventually, stub

SHARES_ON = {"enabled": True}


async def _many(gw: GatewayClient, client: str, count: int, content: str) -> list[httpx.Response]:
    return await asyncio.gather(*(gw.chat("m", f"{content}-{i}", X_Client_ID=client) for i in range(count)))


async def test_a_batch_client_is_held_to_its_share_and_another_client_is_still_served(
    gateway_factory: GatewayFactory,
) -> None:
    # 2 in flight + 4 waiting: a client may hold max(ceil(0.5 * 6), 2) = 3 places. Each answer
    # takes 3 s, so no place frees before every request of the burst has had its answer.
    model = stub("--latency-ms", "3000", max_concurrent=2, max_waiting=4)
    gw = await gateway_factory({"m": model}, fair_share=SHARES_ON, metrics={"clients": ["batch"]})
    batch = asyncio.create_task(_many(gw, "batch", 8, "batch"))
    await gw.until_count("m", "running", 2)
    await gw.until_count("m", "queued", 1)

    interactive = await gw.chat("m", "one question", X_Client_ID="chat-ui")
    assert interactive.status_code == 200, interactive.text  # the queue had room for it
    assert interactive.json()["message"]["content"] == "stub reply to: one question"

    answers = await batch
    served = [a for a in answers if a.status_code == 200]
    refused = [a for a in answers if a.status_code == 429]
    assert len(served) == 3 and len(refused) == 5, [a.status_code for a in answers]
    for answer in refused:
        body = answer.json()
        assert body["code"] == "client_share_exceeded"
        assert "'batch' already holds 3 of the 6 places" in body["detail"]
        assert "fair share (at most 3)" in body["detail"]
        assert int(answer.headers["Retry-After"]) >= 1

    # per client only for the listed ids (metrics.clients): the others count as `other`
    samples = await scrape(gw)
    admissions = "gateway_client_admissions_total"
    assert value(samples, admissions, model="m", client="batch", result="admitted") == 3
    assert value(samples, admissions, model="m", client="batch", result="client_share") == 5
    assert value(samples, admissions, model="m", client="other", result="admitted") == 1
    assert {labels["client"] for labels in series(samples, admissions)} == {"batch", "other"}


async def test_with_shares_off_one_client_fills_the_queue_and_the_next_gets_queue_full(
    gateway_factory: GatewayFactory,
) -> None:
    model = stub("--latency-ms", "3000", max_concurrent=2, max_waiting=4)  # no place frees meanwhile
    gw = await gateway_factory({"m": model}, fair_share={"enabled": False})
    batch = asyncio.create_task(_many(gw, "batch", 8, "batch"))
    await gw.until_count("m", "queued", 4)
    interactive = await gw.chat("m", "one question", X_Client_ID="chat-ui")
    assert interactive.status_code == 429 and interactive.json()["code"] == "queue_full"
    answers = await batch
    assert sorted(a.status_code for a in answers) == [200] * 6 + [429] * 2


async def test_claims_take_clients_in_turn_and_the_admin_view_shows_who_holds_the_queue(
    gateway_factory: GatewayFactory,
) -> None:
    # one engine place: the order in which waiting jobs start is the claim order; 2 s an answer,
    # so the late question is queued before the running job ends
    model = stub("--latency-ms", "2000", max_concurrent=1, max_waiting=8)
    gw = await gateway_factory({"m": model}, fair_share={"enabled": True, "max_share": 1.0})
    batch = asyncio.create_task(_many(gw, "batch", 5, "batch"))
    await gw.until_count("m", "queued", 4)  # one running, four waiting
    interactive = asyncio.create_task(gw.chat("m", "late question", X_Client_ID="chat-ui"))
    await gw.until_count("m", "queued", 5)

    queue: dict[str, Any] = (await gw.http.get("/admin/queue/m", headers=gw.headers(gw.admin_token))).json()
    holders = {(c["client_id"], c["processing"], c["waiting"]) for c in queue["clients"]}
    assert holders == {("batch", 1, 4), ("chat-ui", 0, 1)}
    assert all(c["owner"] == "alice" and c["max_places"] == 9 for c in queue["clients"])

    await interactive
    await batch
    started = await _start_order(gw)
    # the interactive job arrived behind four batch jobs and started right after the running one
    assert started.index("late question") == 1, started


async def _start_order(gw: GatewayClient) -> list[str]:
    async def ended() -> list[Any]:
        return [
            job
            async for job in gw.services.database.jobs.find({"model": "m"}).sort("started_at", 1)
            if job.get("state") == "succeeded"
        ]

    jobs = await eventually(ended, lambda done: len(done) == 6, "six jobs ended")
    return [job["request"]["messages"][0]["content"] for job in jobs]
