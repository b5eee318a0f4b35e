"""The real OpenAI SDK against /v1: answers, usage, and each error class where it belongs."""

from __future__ import annotations

import asyncio

import httpx2
import openai
import pytest
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionMessageParam

from tests.conftest import GatewayClient, GatewayFactory, stub


def sdk(gw: GatewayClient, token: str | None = None, retries: int = 0) -> AsyncOpenAI:
    """The SDK's own HTTP client (httpx2) on the in-process ASGI app: no socket, same code paths."""
    transport = httpx2.ASGITransport(app=gw.http._transport.app)  # type: ignore[attr-defined]
    return AsyncOpenAI(
        api_key=token or gw.client_token,
        base_url="http://gw/v1",
        max_retries=retries,
        http_client=httpx2.AsyncClient(transport=transport, base_url="http://gw/v1"),
    )


@pytest.fixture
async def gw(gateway_factory: GatewayFactory) -> GatewayClient:
    return await gateway_factory(
        {
            "demo": stub(aliases=["demo-chat"]),
            "slow": stub("--latency-ms", "1500", max_concurrent=1, max_waiting=1),
            "broken": stub("--fail-rate", "1"),
            "short": stub("--max-model-len", "2"),
            "gpu": {"kind": "vllm"},
        },
        queue={"max_retries": 1},
    )


async def test_completion_through_the_queue_with_usage(gw: GatewayClient) -> None:
    client = sdk(gw)
    raw = await client.chat.completions.with_raw_response.create(
        model="demo-chat", messages=[{"role": "user", "content": "hello sdk"}], max_tokens=16
    )
    completion = raw.parse()
    assert completion.choices[0].message.content == "stub reply to: hello sdk"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.model == "demo-chat"
    assert completion.usage is not None and completion.usage.completion_tokens == 5
    job_id = raw.headers["x-request-id"]
    job = (await gw.http.get(f"/api/jobs/{job_id}", headers=gw.headers())).json()
    assert job["state"] == "succeeded"
    assert job["client_id"] == "openai-api"


async def test_models_list_shows_state(gw: GatewayClient) -> None:
    models = {m.id: m for m in (await sdk(gw).models.list()).data}
    assert set(models) == {"demo", "slow", "broken", "short", "gpu"}
    assert models["demo"].model_extra == {"aliases": ["demo-chat"], "state": "ready", "kind": "stub"}
    assert models["gpu"].model_extra["state"] == "failed"  # type: ignore[index]


async def test_error_classes(gw: GatewayClient) -> None:
    client = sdk(gw)
    hello: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.NotFoundError, match="known models") as unknown:
        await client.chat.completions.create(model="nope", messages=hello)
    assert unknown.value.body["param"] == "model"  # type: ignore[index]
    with pytest.raises(openai.AuthenticationError):
        await sdk(gw, token="not-a-token").chat.completions.create(model="demo", messages=hello)
    with pytest.raises(openai.UnprocessableEntityError) as bad:
        await client.chat.completions.create(model="demo", messages=[])
    assert bad.value.body["param"] == "messages"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError, match="cannot be used with stream"):
        await client.chat.completions.create(
            model="demo",
            messages=hello,
            stream=True,
            extra_headers={"Idempotency-Key": "k1"},
        )
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        await client.chat.completions.create(model="short", messages=hello * 3)
    with pytest.raises(openai.InternalServerError) as failed:
        await client.chat.completions.create(model="broken", messages=hello)
    assert failed.value.status_code == 502
    with pytest.raises(openai.InternalServerError) as unavailable:
        await client.chat.completions.create(model="gpu", messages=hello)
    assert unavailable.value.status_code == 503
    assert "needs a GPU but none is usable" in str(unavailable.value)


async def test_queue_full_is_a_rate_limit_error_with_retry_after(gw: GatewayClient) -> None:
    client = sdk(gw)
    hello: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]
    calls = [client.chat.completions.with_raw_response.create(model="slow", messages=hello) for _ in range(3)]
    results = await asyncio.gather(*calls, return_exceptions=True)
    limited = [r for r in results if isinstance(r, openai.RateLimitError)]
    assert len(limited) == 1, results
    assert limited[0].response.headers["retry-after"] == "1"
    assert limited[0].body["type"] == "rate_limit_error"  # type: ignore[index]
