"""External upstreams (kind openai): servers the gateway routes to but does not run. Here the
upstream is our stub engine started by the test on its own port (a real process the gateway
did not spawn); tests/e2e/test_llama_cpp.py does the same with llama.cpp's server."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from app.store.embedded import free_port
from tests.api.test_supervisor import _model, _until_model
from tests.conftest import GatewayFactory, eventually
from tests.upstream import ExternalServer, stub_server

KEY_ENV = "TEST_UPSTREAM_API_KEY"
KEY = "sk-upstream-key-for-tests-0123456789"
FAST_HEALTH = {
    "health_interval": 0.05,
    "health_check_interval": 0.2,
    "health_check_timeout": 0.5,
    "health_check_failures": 2,
}


def upstream(url: str, **fields: Any) -> dict[str, Any]:
    return {"kind": "openai", "url": url, **fields}


def _started(servers: list[ExternalServer], tmp_path: Path, *args: str) -> ExternalServer:
    server = stub_server(tmp_path / f"upstream{len(servers)}.log", *args)
    servers.append(server)
    server.start()
    return server


async def test_an_upstream_is_served_through_the_queue_with_its_api_key(
    gateway_factory: GatewayFactory,
    external_servers: list[ExternalServer],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)
    server = _started(external_servers, tmp_path, "--api-key", KEY, "--model-name", "remote-name")
    gw = await gateway_factory(
        {"remote": upstream(f"{server.url}/v1/", api_key_env=KEY_ENV, served_name="remote-name")},
        engines=FAST_HEALTH,
    )
    view = await _model(gw, "remote")
    assert view["kind"] == "openai" and view["state"] == "ready"
    assert view["url"] == server.url  # "/v1/" is taken off: the relay appends /v1/chat/completions
    assert view["last_check_at"] is not None and view["pid"] is None and view["port"] is None

    answer = await gw.chat("remote", "over there")
    assert answer.status_code == 200, answer.text  # the stub refuses /v1 calls without the key
    assert answer.json()["message"]["content"] == "stub reply to: over there"

    body = {"model": "remote", "messages": [{"role": "user", "content": "streamed"}], "stream": True}
    async with gw.http.stream("POST", "/v1/chat/completions", json=body, headers=gw.headers()) as streamed:
        assert streamed.status_code == 200
        lines = [line async for line in streamed.aiter_lines() if line.startswith("data: {")]
        job_id = streamed.headers["x-request-id"]
    text = "".join(json.loads(line[6:])["choices"][0]["delta"].get("content") or "" for line in lines)
    assert text == "stub reply to: streamed"
    assert gw.services.queue is not None
    doc = await eventually(
        lambda: gw.services.queue.store.get(job_id),
        lambda j: j is not None and j.state == "succeeded",
        "the streamed job in history",
    )
    assert doc is not None and doc.result is not None
    assert doc.result["message"]["content"] == text and doc.attempts == 1


async def test_a_wrong_api_key_is_a_502_naming_the_refusal_and_is_not_retried(
    gateway_factory: GatewayFactory,
    external_servers: list[ExternalServer],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(KEY_ENV, "sk-not-the-right-one")
    server = _started(external_servers, tmp_path, "--api-key", KEY)
    # the health check is a /v1 call too: the upstream refuses it, so it is unavailable with the reason
    gw = await gateway_factory(
        {
            "remote": upstream(server.url, api_key_env=KEY_ENV),
            "open": upstream(server.url, health_path="/health"),
        },
        engines=FAST_HEALTH,
    )
    refused = await _model(gw, "remote")
    assert refused["state"] == "unavailable" and "answered 401" in refused["reason"]
    assert "Unauthorized" in refused["reason"]
    # served by a health path that needs no key, the calls themselves are refused: a 502 (the
    # client's own token is fine), with the upstream's words, and no retry of a refusal
    answer = await gw.chat("open")
    assert answer.status_code == 502, answer.text
    assert "Unauthorized" in answer.json()["detail"]
    assert gw.services.queue is not None
    doc = await gw.services.queue.store.get(answer.json()["request_id"])
    assert doc is not None and doc.error is not None
    assert doc.attempts == 1 and doc.error["engine_status"] == 401


async def test_admin_start_and_stop_of_an_upstream_are_409_with_the_reason(
    gateway_factory: GatewayFactory, external_servers: list[ExternalServer], tmp_path: Path
) -> None:
    server = _started(external_servers, tmp_path)
    gw = await gateway_factory({"remote": upstream(server.url)}, engines=FAST_HEALTH)
    for action in ("start", "stop"):
        response = await gw.http.post(f"/admin/models/remote/{action}", headers=gw.headers(gw.admin_token))
        assert response.status_code == 409, response.text
        body = response.json()
        assert body["code"] == "model_not_managed"
        assert f"is an external upstream ({server.url})" in body["detail"]
        assert "does not start or stop it" in body["detail"]
    assert (await _model(gw, "remote"))["state"] == "ready"  # nothing happened to it
    assert (await gw.chat("remote")).status_code == 200


async def test_an_upstream_that_goes_away_is_unavailable_and_comes_back_by_itself_with_its_jobs(
    gateway_factory: GatewayFactory, external_servers: list[ExternalServer], tmp_path: Path
) -> None:
    server = _started(external_servers, tmp_path, "--latency-ms", "600")
    gw = await gateway_factory({"remote": upstream(server.url)}, engines=FAST_HEALTH)
    first = asyncio.create_task(gw.chat("remote", "admitted before the fall"))
    await gw.until_count("remote", "running", 1)
    server.kill()  # mid-call: the connection is reset under the running job

    down = await _until_model(gw, "remote", lambda m: m["state"] == "unavailable", 10)
    assert "cannot be reached" in down["reason"] and server.url in down["reason"]
    refused = await gw.chat("remote", "after the fall")
    assert refused.status_code == 503, refused.text
    assert refused.json()["code"] == "upstream_unavailable"
    assert "its upstream cannot be reached" in refused.json()["detail"]
    assert refused.headers["retry-after"] == "1"
    health = (await gw.http.get("/health")).json()["engines"]["remote"]
    assert health["state"] == "unavailable"
    await gw.until_count("remote", "queued", 1)  # the admitted job waits; it is not failed
    assert not first.done()

    await server.start_async()  # the same port: whoever runs it brought it back
    await _until_model(gw, "remote", lambda m: m["state"] == "ready", 10)
    answer = await first
    assert answer.status_code == 200, answer.text
    assert answer.json()["message"]["content"] == "stub reply to: admitted before the fall"
    assert gw.services.queue is not None
    doc = await gw.services.queue.store.get(answer.json()["request_id"])
    assert doc is not None and doc.attempts == 2  # one attempt lost with the server, one answered
    again = await gw.chat("remote", "after the return")
    assert (
        again.status_code == 200 and again.json()["message"]["content"] == "stub reply to: after the return"
    )


async def test_an_upstream_down_at_start_is_unavailable_then_served_when_it_appears(
    gateway_factory: GatewayFactory, external_servers: list[ExternalServer], tmp_path: Path
) -> None:
    server = stub_server(tmp_path / "late.log")
    external_servers.append(server)
    gw = await gateway_factory({"remote": upstream(server.url)}, engines=FAST_HEALTH)
    down = await _model(gw, "remote")  # the gateway started anyway: one upstream does not stop it
    assert down["state"] == "unavailable" and "cannot be reached" in down["reason"]
    assert (await gw.chat("remote")).status_code == 503
    await server.start_async()
    await _until_model(gw, "remote", lambda m: m["state"] == "ready", 10)
    assert (await gw.chat("remote", "late")).json()["message"]["content"] == "stub reply to: late"


async def test_a_missing_api_key_variable_stops_the_start_naming_it(
    gateway_factory: GatewayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TEST_UPSTREAM_KEY_NOT_SET", raising=False)
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(Exception, match="api_key_env names TEST_UPSTREAM_KEY_NOT_SET, which is not set"):
        await gateway_factory({"remote": upstream(url, api_key_env="TEST_UPSTREAM_KEY_NOT_SET")})
