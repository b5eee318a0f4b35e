"""Retries, engine errors, timeouts and idempotency, end to end through the queue."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from tests.conftest import GatewayFactory, stub


async def test_retry_succeeds_after_engine_errors(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory({"flaky": stub("--fail-first", "2")})
    response = await gw.chat("flaky", "try again")
    assert response.status_code == 200, response.text
    assert response.json()["attempts"] == 3
    assert response.json()["message"]["content"] == "stub reply to: try again"


async def test_gives_up_after_three_retries(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory({"broken": stub("--fail-rate", "1")})
    response = await gw.chat("broken")
    assert response.status_code == 502, response.text
    body = response.json()
    assert "after 4 attempt(s)" in body["detail"]
    assert "stub failure" in body["detail"]
    job = (await gw.http.get(f"/api/jobs/{body['request_id']}", headers=gw.headers())).json()
    assert job["state"] == "failed"
    assert job["attempts"] == 4
    assert job["error"]["engine_status"] == 500


async def test_engine_4xx_fails_at_once_with_engine_message(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory({"short": stub("--max-model-len", "3")})
    response = await gw.chat("short", "this prompt is longer than three tokens")
    assert response.status_code == 400, response.text
    assert "maximum context length is 3 tokens" in response.json()["detail"]
    job = (await gw.http.get(f"/api/jobs/{response.json()['request_id']}", headers=gw.headers())).json()
    assert job["attempts"] == 1
    assert job["state"] == "failed"


async def test_a_stream_refused_after_its_200_is_a_400_with_the_engines_message_not_a_retry(
    gateway_factory: GatewayFactory,
) -> None:
    """llama.cpp checks the context only once its stream has begun: a 200 and an empty body.
    The gateway asks the same request without stream once, and relays that refusal."""
    gw = await gateway_factory(
        {"short": stub("--max-model-len", "3", "--late-stream-refusals", "--log-requests")}
    )
    body = {
        "model": "short",
        "messages": [{"role": "user", "content": "this prompt is longer than three tokens"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    response = await gw.http.post("/v1/chat/completions", json=body, headers=gw.headers())
    assert response.status_code == 400, response.text
    assert "maximum context length is 3 tokens" in response.json()["error"]["message"]
    job = (await gw.http.get(f"/api/jobs/{response.headers['X-Request-ID']}", headers=gw.headers())).json()
    assert (job["state"], job["attempts"], job["error"]["engine_status"]) == ("failed", 1, 400)
    logs = await gw.http.get("/admin/models/short/logs?lines=50", headers=gw.headers(gw.admin_token))
    sent = [line for line in logs.json()["lines"] if line.startswith("request ")]
    assert len(sent) == 2  # the stream, then the probe without stream (and without stream_options)
    assert '"stream": true' in sent[0] and '"stream": false' in sent[1] and "stream_options" not in sent[1]


async def test_queue_wait_timeout_expires_the_job(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory({"busy": stub("--latency-ms", "2500", max_concurrent=1, timeout=0.5)})
    first = asyncio.create_task(gw.chat("busy", "first"))
    await gw.until_count("busy", "running", 1)
    second = await gw.chat("busy", "second")
    assert second.status_code == 504, second.text
    assert "waited in the queue" in second.json()["detail"]
    job = (await gw.http.get(f"/api/jobs/{second.json()['request_id']}", headers=gw.headers())).json()
    assert job["state"] == "expired"
    assert job["status"] == "timeout"
    assert (await first).status_code == 200


async def test_processing_timeout_fails_with_504(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory({"hung": stub("--hang", request_timeout=0.5)})
    response = await gw.chat("hung")
    assert response.status_code == 504, response.text
    assert "did not answer within 0.5 s" in response.json()["detail"]


async def test_same_idempotency_key_gets_the_same_job(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory({"demo": stub("--latency-ms", "200")})
    together = await asyncio.gather(*(gw.chat("demo", "once", Idempotency_Key="key-1") for _ in range(3)))
    ids = {r.json()["id"] for r in together}
    assert len(ids) == 1, ids
    again = await gw.chat("demo", "once", Idempotency_Key="key-1")
    assert again.json()["id"] in ids
    other = await gw.chat("demo", "once", Idempotency_Key="key-2")
    assert other.json()["id"] not in ids
    queue = (await gw.http.get("/admin/queue/demo", headers=gw.headers(gw.admin_token))).json()
    assert queue["total_processed"] == 2  # one inference per key
    reused = await gw.chat("demo", "something else", Idempotency_Key="key-1")
    assert reused.status_code == 409
    assert "already used for a different request" in reused.json()["detail"]


async def test_history_ttl_index_and_expire_at(gateway_factory: GatewayFactory) -> None:
    """As on a real MongoDB, whose TTL monitor deletes expired history (the tests' server is a
    SecantusDB, where the gateway would prune itself by default)."""
    gw = await gateway_factory({"demo": stub()}, history={"prune": "off"})
    response = await gw.chat("demo")
    database = gw.services.database
    assert database is not None
    indexes = await database.jobs.index_information()
    ttl = indexes["history_ttl"]
    assert ttl["key"] == [("expire_at", 1)]
    assert ttl["expireAfterSeconds"] == 0
    doc = await database.jobs.find_one({"_id": response.json()["id"]})
    assert doc is not None
    assert doc["expire_at"] - doc["finished_at"] == timedelta(days=15)
    assert "slot" not in doc


async def test_where_the_gateway_prunes_history_jobs_carry_no_ttl_index(
    gateway_factory: GatewayFactory,
) -> None:
    """SecantusDB's TTL sweeper walks every document of a collection with a TTL index each
    minute, and `secantusd-py` runs it whatever its config says: on SecantusDB (`prune: auto`)
    the gateway deletes expired jobs itself and their `expire_at` index is a plain one."""
    gw = await gateway_factory({"demo": stub()})
    assert gw.services.database.secantus
    indexes = await gw.services.database.jobs.index_information()
    assert "history_ttl" not in indexes
    assert indexes["history_expiry"]["key"] == [("expire_at", 1)]
    assert "expireAfterSeconds" not in indexes["history_expiry"]


async def test_privacy_settings_keep_prompts_and_outputs_out_of_history(
    gateway_factory: GatewayFactory,
) -> None:
    gw = await gateway_factory({"demo": stub()}, history={"store_prompts": False, "store_outputs": False})
    response = await gw.chat("demo", "a private question", Idempotency_Key="private-1")
    assert response.status_code == 200, response.text
    assert response.json()["message"]["content"] == "stub reply to: a private question"
    database = gw.services.database
    assert database is not None
    doc = await database.jobs.find_one({"_id": response.json()["id"]})
    assert doc is not None
    assert "request" not in doc
    assert "message" not in doc["result"]
    assert doc["result"]["output_redacted"] is True
    assert doc["result"]["usage"]["total_tokens"] > 0
    replay = await gw.chat("demo", "a private question", Idempotency_Key="private-1")
    assert replay.json()["id"] == response.json()["id"]
    assert replay.json()["output_redacted"] is True
    assert replay.json()["message"]["content"] is None


async def test_engines_do_not_inherit_the_gateway_secrets(gateway_factory: GatewayFactory) -> None:
    import os

    import psutil

    os.environ["GATEWAY_ADMIN_PASSWORD"] = "should-not-leak-to-engines"
    try:
        gw = await gateway_factory({"demo": stub()})
    finally:
        del os.environ["GATEWAY_ADMIN_PASSWORD"]
    engines = gw.services.engines
    assert engines is not None
    process = engines.get("demo").process
    assert process is not None
    environment = psutil.Process(process.pid).environ()
    assert "GATEWAY_ADMIN_PASSWORD" not in environment
    assert "PATH" in environment


async def test_engine_crash_mid_request_is_retried_after_restart(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory({"fragile": stub("--crash-after", "1")})
    first = await gw.chat("fragile", "one")
    assert first.status_code == 200
    engines = gw.services.engines
    assert engines is not None
    old_pid = engines.get("fragile").process.pid  # type: ignore[union-attr]
    second = await gw.chat("fragile", "two")  # kills the engine; retried on the restarted one
    assert second.status_code == 200, second.text
    assert second.json()["message"]["content"] == "stub reply to: two"
    # one attempt hits the dying engine; the retry waits for the restart (a second failed
    # attempt is possible only if the retry raced the crash being noticed)
    assert second.json()["attempts"] in (2, 3)
    engine = engines.get("fragile")
    assert len(engine.crashes) == 1
    assert engine.process is not None and engine.process.pid != old_pid
    job = (await gw.http.get(f"/api/jobs/{second.json()['id']}", headers=gw.headers())).json()
    assert job["last_error"]["retryable"] is True
    assert "engine connection failed" in job["last_error"]["message"]
