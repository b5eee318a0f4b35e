"""Streaming through the queue, over a real socket, with the real async OpenAI SDK."""

from __future__ import annotations

import asyncio
from pathlib import Path

import openai
import pytest
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionMessageParam
from pymongo import AsyncMongoClient

from tests.conftest import eventually
from tests.e2e.conftest import Daemon

pytestmark = pytest.mark.e2e
HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "stream me please"}]


async def _job(daemon: Daemon, job_id: str) -> dict[str, object]:
    return await daemon.job(job_id)


async def _until_state(daemon: Daemon, job_id: str, state: str, timeout_s: float = 15.0) -> dict[str, object]:
    return await eventually(
        lambda: _job(daemon, job_id), lambda doc: doc["state"] == state, f"job {job_id} {state}", timeout_s
    )


async def _serving(
    tmp_path: Path, daemons: list[Daemon], models: dict[str, object]
) -> tuple[Daemon, AsyncOpenAI]:
    """A healthy gateway daemon serving `models`, and the real async SDK pointed at its /v1."""
    daemon = Daemon(tmp_path, models)
    daemons.append(daemon)
    daemon.start()
    await daemon.wait_healthy()
    return daemon, AsyncOpenAI(api_key=daemon.token, base_url=f"{daemon.url}/v1", max_retries=0)


async def test_stream_chunks_usage_history_and_cancel(tmp_path: Path, daemons: list[Daemon]) -> None:
    daemon, client = await _serving(
        tmp_path,
        daemons,
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
    _, client = await _serving(
        tmp_path, daemons, {"demo": {"kind": "stub", "args": ["--latency-ms", "1500"]}}
    )

    async def one() -> str:
        try:
            stream = await client.chat.completions.create(model="demo", messages=HELLO, stream=True)
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        except Exception as exc:
            return type(exc).__name__

    results = await asyncio.gather(*(one() for _ in range(30)))
    assert results.count("stub reply to: stream me please") == 20, results
    assert results.count("RateLimitError") == 10, results


async def _queued_ids(daemon: Daemon, model: str) -> list[str]:
    client: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(daemon.db_uri())
    try:
        return [str(d["_id"]) async for d in client.gateway.jobs.find({"model": model, "state": "queued"})]
    finally:
        await client.close()


async def test_stream_retried_before_its_first_chunk_never_after(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    """A retry after a chunk reached the client would send it a second answer after the first part."""
    daemon, client = await _serving(
        tmp_path,
        daemons,
        {
            "flaky": {"kind": "stub", "args": ["--fail-first", "1"]},
            "cut": {"kind": "stub", "args": ["--break-stream-after", "2", "--token-latency-ms", "100"]},
        },
    )

    raw = await client.chat.completions.with_raw_response.create(model="flaky", messages=HELLO, stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in raw.parse() if c.choices])
    assert text == "stub reply to: stream me please"
    assert (await _until_state(daemon, raw.headers["x-request-id"], "succeeded"))["attempts"] == 2

    raw = await client.chat.completions.with_raw_response.create(model="cut", messages=HELLO, stream=True)
    received: list[str] = []
    with pytest.raises(openai.APIError, match="stream broken after the first chunk"):
        async for chunk in raw.parse():
            received.extend(c.delta.content or "" for c in chunk.choices)
    assert "".join(received) == "stub"  # the role chunk and one word, then the error: nothing twice
    assert (await _until_state(daemon, raw.headers["x-request-id"], "failed"))["attempts"] == 1


async def test_closing_a_stream_starts_the_request_queued_behind_it(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    """The slot of a stream whose client left goes to the next job at once, not when the engine ends."""
    daemon, client = await _serving(
        tmp_path,
        daemons,
        {
            "slow": {
                "kind": "stub",
                "args": ["--token-latency-ms", "1000"],
                "max_concurrent": 1,
                "max_waiting": 1,
            }
        },
    )

    long_prompt: list[ChatCompletionMessageParam] = [{"role": "user", "content": " ".join("w" * 20)}]
    raw = await client.chat.completions.with_raw_response.create(
        model="slow", messages=long_prompt, stream=True, max_tokens=16
    )
    running_id = raw.headers["x-request-id"]
    stream = raw.parse()
    assert (await stream.__anext__()).choices[0].delta.role == "assistant"  # 16 s of tokens to come
    behind = asyncio.create_task(
        client.chat.completions.create(model="slow", messages=[{"role": "user", "content": "behind"}])
    )
    (queued_id,) = await eventually(
        lambda: _queued_ids(daemon, "slow"), lambda ids: len(ids) == 1, "a request queued behind the stream"
    )
    await stream.close()
    await _until_state(daemon, running_id, "cancelled", timeout_s=5)
    await _until_state(daemon, queued_id, "succeeded", timeout_s=5)
    assert (await behind).choices[0].message.content == "stub reply to: behind"


async def test_a_keyed_stream_outlives_its_client_and_its_repeat_gets_the_whole_answer(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    """With an Idempotency-Key a broken connection does not cancel the job (unlike a plain
    stream): the answer is finished and stored, and the client's repeat of the key gets all of it
    as a stream, without a second inference."""
    daemon, client = await _serving(
        tmp_path, daemons, {"slow": {"kind": "stub", "args": ["--token-latency-ms", "200", "--log-requests"]}}
    )
    key = {"Idempotency-Key": "stream-outlives-client"}

    raw = await client.chat.completions.with_raw_response.create(
        model="slow", messages=HELLO, stream=True, extra_headers=key
    )
    job_id = raw.headers["x-request-id"]
    stream = raw.parse()
    first = await stream.__anext__()
    assert first.choices[0].delta.role == "assistant"
    await stream.close()  # the connection breaks mid-answer
    doc = await _until_state(daemon, job_id, "succeeded")
    assert doc["result"]["message"]["content"] == "stub reply to: stream me please"  # type: ignore[index]

    again = await client.chat.completions.with_raw_response.create(
        model="slow", messages=HELLO, stream=True, extra_headers=key
    )
    assert again.headers["x-request-id"] == job_id
    text = "".join([c.choices[0].delta.content or "" async for c in again.parse() if c.choices])
    assert text == "stub reply to: stream me please"
    log = (daemon.data_dir / "logs" / "slow.log").read_text()
    assert log.count("request ") == 1, log
