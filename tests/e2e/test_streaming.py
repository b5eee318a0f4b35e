"""Streaming through the queue, over a real socket, with the real async OpenAI SDK."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionMessageParam
from pymongo import AsyncMongoClient

from tests.conftest import eventually
from tests.e2e.conftest import Daemon

pytestmark = pytest.mark.e2e
HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "stream me please"}]


async def _job(daemon: Daemon, job_id: str) -> dict[str, object]:
    client: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(daemon.db_uri())
    try:
        doc = await client.gateway.jobs.find_one({"_id": job_id})
        assert doc is not None
        return doc
    finally:
        await client.close()


async def _until_state(daemon: Daemon, job_id: str, state: str, timeout_s: float = 15.0) -> dict[str, object]:
    return await eventually(
        lambda: _job(daemon, job_id), lambda doc: doc["state"] == state, f"job {job_id} {state}", timeout_s
    )


async def test_stream_chunks_usage_history_and_cancel(tmp_path: Path, daemons: list[Daemon]) -> None:
    daemon = Daemon(
        tmp_path,
        {
            "demo": {"kind": "stub", "args": ["--token-latency-ms", "20"]},
            "slow": {
                "kind": "stub",
                "args": ["--token-latency-ms", "300"],
                "max_concurrent": 1,
                "max_waiting": 1,
            },
        },
    )
    daemons.append(daemon)
    daemon.start()
    await daemon.wait_healthy()
    client = AsyncOpenAI(api_key=daemon.token, base_url=f"{daemon.url}/v1", max_retries=0)

    raw = await client.chat.completions.with_raw_response.create(
        model="demo",
        messages=HELLO,
        stream=True,
        stream_options={"include_usage": True},
    )
    job_id = raw.headers["x-request-id"]
    chunks = [chunk async for chunk in raw.parse()]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "stub reply to: stream me please"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6
    assert all(c.model == "demo" for c in chunks)
    doc = await _until_state(daemon, job_id, "succeeded")
    assert doc["result"]["message"]["content"] == text  # type: ignore[index]
    assert doc["result"]["usage"]["total_tokens"] == 9  # type: ignore[index]

    plain = await client.chat.completions.create(model="demo", messages=HELLO, stream=True)
    assert all([c.usage is None async for c in plain])  # usage only when asked for

    # the client goes away mid-stream: the job ends cancelled and its slot is free at once
    raw = await client.chat.completions.with_raw_response.create(
        model="slow",
        messages=HELLO,
        stream=True,
    )
    cancelled_id = raw.headers["x-request-id"]
    stream = raw.parse()
    first = await stream.__anext__()
    assert first.choices[0].delta.role == "assistant"
    await stream.close()
    doc = await _until_state(daemon, cancelled_id, "cancelled")
    assert "slot" not in doc
    after = await client.chat.completions.create(
        model="slow", messages=[{"role": "user", "content": "x"}], max_tokens=2
    )
    assert after.choices[0].message.content == "stub reply"


async def test_thirty_streams_against_ten_plus_ten(tmp_path: Path, daemons: list[Daemon]) -> None:
    daemon = Daemon(tmp_path, {"demo": {"kind": "stub", "args": ["--latency-ms", "1500"]}})
    daemons.append(daemon)
    daemon.start()
    await daemon.wait_healthy()
    client = AsyncOpenAI(api_key=daemon.token, base_url=f"{daemon.url}/v1", max_retries=0)

    async def one() -> str:
        try:
            stream = await client.chat.completions.create(model="demo", messages=HELLO, stream=True)
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        except Exception as exc:
            return type(exc).__name__

    results = await asyncio.gather(*(one() for _ in range(30)))
    assert results.count("stub reply to: stream me please") == 20, results
    assert results.count("RateLimitError") == 10, results
