"""Background jobs: POST /api/jobs → 202, poll, list, cancel (queued and running)."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from tests.conftest import GatewayClient, GatewayFactory, eventually, stub


def _body(model: str, content: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


async def _submit(gw: GatewayClient, model: str, content: str, **headers: str) -> httpx.Response:
    return await gw.http.post(
        "/api/jobs", json=_body(model, content, type="chat"), headers=gw.headers(**headers)
    )


async def _until_state(
    gw: GatewayClient, job_id: str, states: set[str], timeout_s: float = 10.0
) -> dict[str, Any]:
    async def job() -> dict[str, Any]:
        body: dict[str, Any] = (await gw.http.get(f"/api/jobs/{job_id}", headers=gw.headers())).json()
        return body

    return await eventually(
        job, lambda j: j.get("state") in states, f"job {job_id} reaching {states}", timeout_s
    )


async def test_submit_poll_result(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory({"demo": stub("--latency-ms", "300")})
    response = await _submit(gw, "demo", "in the background")
    assert response.status_code == 202, response.text
    accepted = response.json()
    job_id = accepted["id"]
    assert accepted["location"] == f"/api/jobs/{job_id}"
    assert response.headers["Location"] == accepted["location"]
    assert accepted["state"] in ("queued", "running")
    assert accepted["request_id"] == job_id
    done = await _until_state(gw, job_id, {"succeeded"})
    assert done["result"]["message"]["content"] == "stub reply to: in the background"
    assert done["status"] == "completed"
    assert done["position"] is None


async def test_position_in_queue_and_cancel_queued(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory({"one": stub("--latency-ms", "1500", max_concurrent=1, max_waiting=5)})
    first = (await _submit(gw, "one", "first")).json()
    await gw.until_count("one", "running", 1)
    low = (await _submit(gw, "one", "low", X_Priority="low")).json()
    high = (await _submit(gw, "one", "high", X_Priority="high")).json()
    assert low["position"] == 1 and high["position"] == 1
    # the high-priority job went ahead of the low one
    assert (await gw.http.get(f"/api/jobs/{low['id']}", headers=gw.headers())).json()["position"] == 2

    cancelled = await gw.http.delete(f"/api/jobs/{high['id']}", headers=gw.headers())
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["state"] == "cancelled"
    assert cancelled.json()["error"]["message"] == "cancelled by alice"
    assert (await gw.http.get(f"/api/jobs/{low['id']}", headers=gw.headers())).json()["position"] == 1
    await gw.until_count("one", "queued", 1)

    again = await gw.http.delete(f"/api/jobs/{high['id']}", headers=gw.headers())
    assert again.status_code == 409
    assert "already ended (cancelled)" in again.json()["detail"]
    assert (await _until_state(gw, low["id"], {"succeeded"}, 15))["result"]["message"]["content"].endswith(
        "low"
    )
    assert (await _until_state(gw, first["id"], {"succeeded"}))["attempts"] == 1


async def test_cancel_running_frees_the_slot_for_the_next(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory({"one": stub("--latency-ms", "30000", max_concurrent=1, max_waiting=2)})
    running = (await _submit(gw, "one", "long")).json()
    await gw.until_count("one", "running", 1)
    waiting = (await _submit(gw, "one", "next")).json()
    response = await gw.http.delete(f"/api/jobs/{running['id']}", headers=gw.headers())
    assert response.status_code == 200, response.text
    assert response.json()["state"] == "cancelled"
    # the engine call was dropped and the waiting job took the slot well before 30 s
    started = await _until_state(gw, waiting["id"], {"running"}, timeout_s=5)
    assert started["position"] is None
    await gw.http.delete(f"/api/jobs/{waiting['id']}", headers=gw.headers())


async def test_list_own_jobs_filters_and_admin_sees_all(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory({"a": stub(), "b": stub()})
    assert gw.services.users is not None
    await gw.services.users.create("bob", "bob-password-long", "client")
    bob = gw.gateway.tokens.issue("bob", "client")
    for content in ("a1", "a2", "a3"):
        assert (await gw.chat("a", content)).status_code == 200
    assert (await gw.chat("b", "b1")).status_code == 200
    assert (await gw.chat("a", "bob's", token=bob)).status_code == 200

    mine = (await gw.http.get("/api/jobs", headers=gw.headers())).json()
    assert mine["object"] == "list"
    assert [j["client_id"] for j in mine["data"]] == ["tests"] * 4
    created = [j["created_at"] for j in mine["data"]]
    assert created == sorted(created, reverse=True)

    only_a = (await gw.http.get("/api/jobs", params={"model": "a", "limit": 2}, headers=gw.headers())).json()
    assert len(only_a["data"]) == 2 and only_a["has_more"] is True
    assert {j["model"] for j in only_a["data"]} == {"a"}
    older = await gw.http.get(
        "/api/jobs", params={"model": "a", "before": only_a["data"][-1]["created_at"]}, headers=gw.headers()
    )
    assert len(older.json()["data"]) == 1 and older.json()["has_more"] is False

    done = (await gw.http.get("/api/jobs", params={"state": "completed"}, headers=gw.headers())).json()
    assert len(done["data"]) == 4
    assert (await gw.http.get("/api/jobs", params={"state": "failed"}, headers=gw.headers())).json()[
        "data"
    ] == []

    everyone = (await gw.http.get("/api/jobs", headers=gw.headers(gw.admin_token))).json()
    assert len(everyone["data"]) == 5
    bob_job = next(j for j in everyone["data"] if j["model"] == "a" and j not in mine["data"])
    hidden = await gw.http.get(f"/api/jobs/{bob_job['id']}", headers=gw.headers())
    assert hidden.status_code == 404
    assert (await gw.http.delete(f"/api/jobs/{bob_job['id']}", headers=gw.headers())).status_code == 404


async def test_bad_job_requests(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory({"demo": stub()})
    bad_state = await gw.http.get("/api/jobs", params={"state": "done"}, headers=gw.headers())
    assert bad_state.status_code == 400
    assert "valid states: queued, running" in bad_state.json()["detail"]
    bad_limit = await gw.http.get("/api/jobs", params={"limit": 0}, headers=gw.headers())
    assert bad_limit.status_code == 422
    assert "limit" in bad_limit.text
    bad_before = await gw.http.get("/api/jobs", params={"before": "yesterday"}, headers=gw.headers())
    assert bad_before.status_code == 422
    unknown_model = await gw.http.get("/api/jobs", params={"model": "nope"}, headers=gw.headers())
    assert unknown_model.status_code == 404
    streamed = await gw.http.post("/api/jobs", json=_body("demo", "x", stream=True), headers=gw.headers())
    assert streamed.status_code == 400
    assert "poll the job" in streamed.json()["detail"]
    wrong_type = await gw.http.post("/api/jobs", json=_body("demo", "x", type="video"), headers=gw.headers())
    assert wrong_type.status_code == 422
    missing = await gw.http.delete("/api/jobs/job_doesnotexist", headers=gw.headers())
    assert missing.status_code == 404
    no_auth = await gw.http.post("/api/jobs", json=_body("demo", "x"))
    assert no_auth.status_code == 401


async def test_idempotent_submit_returns_the_same_job(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory({"demo": stub("--latency-ms", "200")})
    first = await _submit(gw, "demo", "once", Idempotency_Key="bg-1")
    second = await _submit(gw, "demo", "once", Idempotency_Key="bg-1")
    assert first.status_code == second.status_code == 202
    assert first.json()["id"] == second.json()["id"]
    conflict = await _submit(gw, "demo", "other", Idempotency_Key="bg-1")
    assert conflict.status_code == 409
    await _until_state(gw, first.json()["id"], {"succeeded"})
    queue = (await gw.http.get("/admin/queue/demo", headers=gw.headers(gw.admin_token))).json()
    assert queue["total_processed"] == 1


async def test_a_job_cancelled_through_another_instance_stops_its_engine_call_here(
    gateway_factory: GatewayFactory,
) -> None:
    """DELETE on another gateway instance can only end the job in the database. The instance
    running it learns at its next heartbeat (the lease no longer extends) and stops the engine
    call instead of running it to the end; its waiting client gets the cancellation then."""
    gw = await gateway_factory(
        {"slow": stub("--latency-ms", "30000")}, queue={"heartbeat_seconds": 0.2, "lease_seconds": 2}
    )
    queue, dispatcher = gw.services.queue, gw.services.dispatchers["slow"]
    assert queue is not None
    waiting = asyncio.create_task(gw.chat("slow", "cancelled elsewhere"))
    (job,) = await eventually(
        lambda: queue.store.active("slow"), lambda docs: len(docs) == 1, "the job running here"
    )
    assert dispatcher.running_ids() == [job.id]

    # what another instance's DELETE writes: the job ends cancelled, its slot freed
    assert await queue.store.cancel(job.id, queue.clock.now(), "cancelled by someone elsewhere")

    response = await eventually(
        lambda: asyncio.sleep(0, waiting), lambda task: task.done(), "the waiting client's answer"
    )
    assert response.result().status_code == 409, response.result().text
    assert (dispatcher.in_flight, dispatcher.running_ids()) == (0, [])  # 30 s before the engine answers
    stored = await queue.store.get(job.id)
    assert stored is not None and stored.state == "cancelled"
    assert stored.error is not None
    assert stored.error["message"] == "cancelled by someone elsewhere"  # nothing overwrote it
