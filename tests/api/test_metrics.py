"""GET /metrics: exact counts after a known sequence of requests, scrape-time gauges, and who
may scrape (metrics.auth)."""

from __future__ import annotations

import secrets
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from app import __version__
from app.engines.gpus import GIB
from tests.conftest import GatewayClient, GatewayFactory, eventually, stub

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
METRICS_TOKEN = secrets.token_hex(24)


def parse(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, metric: str, /, **labels: str) -> float | None:
    return samples.get((metric, frozenset(labels.items())))


def series(samples: Samples, name: str) -> list[dict[str, str]]:
    return [dict(labels) for sample_name, labels in samples if sample_name == name]


async def scrape(gw: GatewayClient) -> Samples:
    response = await gw.http.get("/metrics")  # ASGITransport's client is 127.0.0.1: localhost mode
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse(response.text)


async def submit(gw: GatewayClient, model: str, content: str, **headers: str) -> str:
    body = {"type": "chat", "model": model, "messages": [{"role": "user", "content": content}]}
    response = await gw.http.post("/api/jobs", json=body, headers=gw.headers(**headers))
    assert response.status_code == 202, response.text
    job_id: str = response.json()["id"]
    return job_id


async def cancel(gw: GatewayClient, job_id: str) -> None:
    response = await gw.http.delete(f"/api/jobs/{job_id}", headers=gw.headers())
    assert response.status_code == 200, response.text
    assert response.json()["state"] == "cancelled"


async def test_counters_and_histograms_match_a_known_sequence(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory(
        {
            "ok": stub(),
            "flaky": stub("--fail-first", "1"),
            "hung": stub("--hang", request_timeout=0.5),
            "held": stub("--hang", max_concurrent=1, max_waiting=1),
            "slowq": stub("--hang", max_concurrent=1, timeout=0.5),
        }
    )
    # ok: two answers and one stream
    for text in ("one", "two"):
        assert (await gw.chat("ok", text)).status_code == 200
    body = {"model": "ok", "messages": [{"role": "user", "content": "three"}], "stream": True}
    async with gw.http.stream("POST", "/v1/chat/completions", json=body, headers=gw.headers()) as streamed:
        assert streamed.status_code == 200
        text = "".join([chunk async for chunk in streamed.aiter_text()])
    assert text.rstrip().endswith("data: [DONE]")
    # flaky: a 500, one retry, then the answer
    flaky = await gw.chat("flaky", "again")
    assert flaky.status_code == 200 and flaky.json()["attempts"] == 2
    # hung: the engine call runs past request_timeout (not retried)
    assert (await gw.chat("hung")).status_code == 504
    # held: one running, one waiting (high), the third refused at once
    running = await submit(gw, "held", "first")
    await gw.until_count("held", "running", 1)
    waiting = await submit(gw, "held", "second", X_Priority="high")
    await gw.until_count("held", "queued", 1)
    full = await gw.chat("held", "third")
    assert full.status_code == 429, full.text
    # slowq: the second request waits in the queue past its timeout
    blocker = await submit(gw, "slowq", "blocker")
    await gw.until_count("slowq", "running", 1)
    assert (await gw.chat("slowq", "too late")).status_code == 504

    during = await scrape(gw)
    assert value(during, "gateway_in_flight", model="held") == 1
    assert value(during, "gateway_queue_depth", model="held", priority="high") == 1
    assert value(during, "gateway_queue_depth", model="held", priority="normal") == 0
    assert value(during, "gateway_queue_depth", model="held", priority="low") == 0
    assert value(during, "gateway_in_flight", model="ok") == 0
    assert value(during, "gateway_queue_capacity", model="held", tier="primary") == 1
    assert value(during, "gateway_queue_capacity", model="held", tier="secondary") == 1
    assert value(during, "gateway_queue_capacity", model="ok", tier="primary") == 10

    await cancel(gw, waiting)  # the queued one first, so it is never dispatched
    await cancel(gw, running)
    await cancel(gw, blocker)

    expected: dict[tuple[str, str], float] = {
        ("ok", "succeeded"): 3,
        ("flaky", "succeeded"): 1,
        ("hung", "timeout"): 1,
        ("held", "cancelled"): 2,
        ("slowq", "expired"): 1,
        ("slowq", "cancelled"): 1,
    }

    def finished(samples: Samples) -> dict[tuple[str, str], float]:
        return {
            (labels["model"], labels["outcome"]): v
            for labels in series(samples, "gateway_requests_total")
            if (v := value(samples, "gateway_requests_total", **labels))
        }

    async def outcomes() -> dict[tuple[str, str], float]:
        return finished(await scrape(gw))

    # the streamed job's outcome is written after the client's [DONE]
    await eventually(outcomes, lambda seen: seen == expected, "every outcome counted")
    after = await scrape(gw)
    for model in ("ok", "flaky", "hung", "held", "slowq"):
        for outcome in ("succeeded", "failed", "timeout", "cancelled", "expired"):
            assert value(after, "gateway_requests_total", model=model, outcome=outcome) is not None
    assert value(after, "gateway_admissions_rejected_total", model="held", reason="queue_full") == 1
    assert value(after, "gateway_admissions_rejected_total", model="ok", reason="queue_full") == 0
    assert value(after, "gateway_retries_total", model="flaky") == 1
    assert value(after, "gateway_retries_total", model="ok") == 0
    assert value(after, "gateway_timeouts_total", model="hung") == 1
    assert value(after, "gateway_timeouts_total", model="flaky") == 0
    # one observation per engine call that ended (cancelled calls are not durations)
    engine_calls = {"ok": 3, "flaky": 2, "hung": 1, "held": 0, "slowq": 0}
    for model, calls in engine_calls.items():
        assert value(after, "gateway_engine_seconds_count", model=model) == calls, model
    # one observation per job's first dispatch (the waiting jobs that ended queued are not)
    first_dispatches = {"ok": 3, "flaky": 1, "hung": 1, "held": 1, "slowq": 1}
    for model, dispatched in first_dispatches.items():
        assert value(after, "gateway_queue_wait_seconds_count", model=model) == dispatched, model
    assert value(after, "gateway_time_to_first_token_seconds_count", model="ok") == 1
    assert value(after, "gateway_time_to_first_token_seconds_count", model="flaky") == 0
    assert value(after, "gateway_in_flight", model="held") == 0
    assert value(after, "gateway_queue_depth", model="held", priority="high") == 0
    for model in engine_calls:
        assert value(after, "gateway_engine_state", model=model, state="ready") == 1
        assert value(after, "gateway_engine_state", model=model, state="stopped") == 0
        assert value(after, "gateway_engine_load_seconds_count", model=model) == 1
        assert value(after, "gateway_engine_crashes_total", model=model) == 0
    assert (value(after, "gateway_db_operation_seconds_count", operation="batch_write") or 0) > 0
    assert (value(after, "gateway_db_operation_seconds_count", operation="claim") or 0) > 0
    assert (value(after, "gateway_event_loop_lag_seconds") or 0) >= 0
    assert series(after, "gateway_gpu_memory_total_bytes") == []  # no GPU inventory configured
    info = {"version": __version__, "worker": gw.gateway.worker_id}
    [build] = series(after, "gateway_build_info")
    assert {k: build[k] for k in info} == info
    assert value(after, "gateway_build_info", **build) == 1


async def test_engine_crash_restart_and_gpu_gauges(gateway_factory: GatewayFactory) -> None:
    fake = {"name": "fake-a100", "total_gib": 80, "free_gib": 60, "utilization": 0.25}
    gw = await gateway_factory({"fragile": stub("--crash-after", "1")}, engines={"fake_gpus": [fake]})
    assert (await gw.chat("fragile", "one")).status_code == 200
    assert (await gw.chat("fragile", "two")).status_code == 200  # crashes it; retried after the restart

    async def ready() -> float | None:
        return value(await scrape(gw), "gateway_engine_state", model="fragile", state="ready")

    await eventually(ready, lambda state: state == 1, "fragile ready again")
    samples = await scrape(gw)
    assert value(samples, "gateway_engine_crashes_total", model="fragile") == 1
    assert value(samples, "gateway_engine_restarts_total", model="fragile") == 1
    assert value(samples, "gateway_engine_load_seconds_count", model="fragile") == 2
    assert value(samples, "gateway_engine_state", model="fragile", state="crashed") == 0
    assert value(samples, "gateway_requests_total", model="fragile", outcome="succeeded") == 2
    gpu = {"gpu": "0", "name": "fake-a100"}
    assert value(samples, "gateway_gpu_memory_total_bytes", **gpu) == 80 * GIB
    assert value(samples, "gateway_gpu_memory_used_bytes", **gpu) == 20 * GIB
    assert value(samples, "gateway_gpu_utilization_ratio", **gpu) == 0.25


def remote(gw: GatewayClient) -> httpx.AsyncClient:
    """A client on the same app that connects from another host than localhost."""
    transport = httpx.ASGITransport(app=gw.app, client=("203.0.113.9", 40000))  # type: ignore[arg-type]
    return httpx.AsyncClient(transport=transport, base_url="http://gw")


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_localhost_mode_opens_to_loopback_only(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory(
        {}, metrics={"token": METRICS_TOKEN}, rate_limit={"per_minute": 1, "window_seconds": 3600}
    )
    assert (await gw.http.get("/metrics")).status_code == 200
    async with remote(gw) as other:
        missing = await other.get("/metrics")
        assert missing.status_code == 401, missing.text
        assert missing.headers["WWW-Authenticate"] == "Bearer"
        assert missing.json()["code"] == "invalid_credentials"
        client = await other.get("/metrics", headers=bearer(gw.client_token))
        assert client.status_code == 403 and client.json()["code"] == "permission_denied"
        wrong = await other.get("/metrics", headers=bearer("x" * 48))
        assert wrong.status_code == 401
        assert (await other.get("/metrics", headers=bearer(gw.admin_token))).status_code == 200
        assert (await other.get("/metrics", headers=bearer(METRICS_TOKEN))).status_code == 200
    # a scrape is never counted against a rate limit; a request refused by one is counted
    assert (await gw.http.get("/v1/models", headers=gw.headers())).status_code == 200
    assert (await gw.http.get("/v1/models", headers=gw.headers())).status_code == 429
    samples = await scrape(gw)
    assert value(samples, "gateway_admissions_rejected_total", model="", reason="rate_limited") == 1


async def test_token_mode_asks_every_client(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory({}, metrics={"auth": "token", "token": METRICS_TOKEN})
    assert (await gw.http.get("/metrics")).status_code == 401
    assert (await gw.http.get("/metrics", headers=bearer(gw.client_token))).status_code == 403
    assert (await gw.http.get("/metrics", headers=bearer(gw.admin_token))).status_code == 200
    answer = await gw.http.get("/metrics", headers=bearer(METRICS_TOKEN))
    assert answer.status_code == 200
    assert value(parse(answer.text), "gateway_event_loop_lag_seconds") is not None


async def test_open_mode_and_disabled(gateway_factory: GatewayFactory) -> None:
    opened = await gateway_factory({}, metrics={"auth": "open"})
    async with remote(opened) as other:
        assert (await other.get("/metrics")).status_code == 200
    off = await gateway_factory({}, metrics={"enabled": False})
    disabled = await off.http.get("/metrics", headers=bearer(off.admin_token))
    assert disabled.status_code == 404
    assert "metrics.enabled" in disabled.json()["detail"]


def test_settings_refuse_a_short_metrics_token() -> None:
    from app.errors import ConfigError
    from app.settings_loader import parse_settings

    settings: dict[str, Any] = {"metrics": {"token": "short"}}
    try:
        parse_settings(settings, env={})
    except ConfigError as exc:
        assert "metrics.token" in exc.message
    else:
        raise AssertionError("a 5-character metrics token was accepted")
    assert parse_settings({}, env={"GATEWAY_METRICS_TOKEN": METRICS_TOKEN}).metrics.token == METRICS_TOKEN
