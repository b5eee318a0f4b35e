"""The real OpenAI SDK against /v1: answers, usage, and each error class where it belongs."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime
from typing import Any

import httpx2
import openai
import pytest
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionMessageParam, ChatCompletionToolParam

from tests.conftest import GatewayClient, GatewayFactory, eventually, stub


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
    for stream in (False, True):  # a stream that fails before its first chunk keeps the status
        with pytest.raises(openai.BadRequestError, match="maximum context length"):
            await client.chat.completions.create(model="short", messages=hello * 3, stream=stream)
        with pytest.raises(openai.InternalServerError) as failed:
            await client.chat.completions.create(model="broken", messages=hello, stream=stream)
        assert failed.value.status_code == 502
        assert failed.value.response.headers["x-request-id"].startswith("job_")
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


async def test_a_queued_stream_gets_keep_alive_comments_then_its_chunks(
    gateway_factory: GatewayFactory,
) -> None:
    """Proxies cut a silent response; a stream waiting for its turn must not be silent.
    (The interval is shortened from its 10 s default so the test waits for the queue.)"""
    gw = await gateway_factory(
        {"one": stub("--token-latency-ms", "150", max_concurrent=1)},
        server={"stream_keepalive_seconds": 0.05},
    )
    client = sdk(gw)

    async def stream_ahead() -> str:
        """The request in flight: a stream, as the stub is slow only when it streams."""
        stream = await client.chat.completions.create(
            model="one", messages=[{"role": "user", "content": "a b c"}], stream=True
        )
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    ahead = asyncio.create_task(stream_ahead())
    await gw.until_count("one", "running", 1)
    async with client.chat.completions.with_streaming_response.create(
        model="one", messages=[{"role": "user", "content": "behind"}], stream=True
    ) as response:
        lines = [line async for line in response.iter_lines() if line]
    waiting = lines[: next(i for i, line in enumerate(lines) if line.startswith("data:"))]
    assert len(waiting) >= 3 and set(waiting) == {": keep-alive"}, lines
    data = [line for line in lines if line.startswith("data:")]  # comments may come between too
    chunks = [json.loads(line[5:]) for line in data[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == "stub reply to: behind"
    assert data[-1] == lines[-1] == "data: [DONE]"
    assert await ahead == "stub reply to: a b c"


async def test_x_priority_serves_a_high_request_before_earlier_low_ones(
    gateway_factory: GatewayFactory,
) -> None:
    gw = await gateway_factory({"one": stub("--latency-ms", "300", max_concurrent=1)})
    client = sdk(gw)

    async def ask(text: str, priority: str) -> tuple[str, str]:
        """The job's id and the answer's last word (the prompt, echoed by the stub)."""
        raw = await client.chat.completions.with_raw_response.create(
            model="one", messages=[{"role": "user", "content": text}], extra_headers={"X-Priority": priority}
        )
        return raw.headers["x-request-id"], (raw.parse().choices[0].message.content or "").split()[-1]

    ahead = asyncio.create_task(ask("ahead", "normal"))
    await gw.until_count("one", "running", 1)
    queued = []
    for n, (text, priority) in enumerate([("l1", "low"), ("l2", "low"), ("h1", "high")], start=1):
        queued.append(asyncio.create_task(ask(text, priority)))
        await gw.until_count("one", "queued", n)
    started: dict[str, datetime] = {}
    for job_id, word in await asyncio.gather(ahead, *queued):
        job = (await gw.http.get(f"/api/jobs/{job_id}", headers=gw.headers())).json()
        started[word] = datetime.fromisoformat(job["started_at"])
    assert sorted(started, key=started.__getitem__) == ["ahead", "h1", "l1", "l2"]


async def test_idempotency_key_replays_the_answer_and_rejects_another_body(
    gateway_factory: GatewayFactory,
) -> None:
    gw = await gateway_factory({"demo": stub("--log-requests")})
    client = sdk(gw)
    key = {"Idempotency-Key": "v1-key"}
    hello: list[ChatCompletionMessageParam] = [{"role": "user", "content": "once only"}]
    first = await client.chat.completions.create(model="demo", messages=hello, extra_headers=key)
    again = await client.chat.completions.create(model="demo", messages=hello, extra_headers=key)
    assert again.id == first.id
    assert again.choices[0].message.content == first.choices[0].message.content == "stub reply to: once only"
    assert gw.services.engines is not None
    engine_log = gw.services.engines.log_path("demo").read_text()
    assert engine_log.count("request ") == 1, engine_log  # the replay never reached the engine
    with pytest.raises(openai.ConflictError) as conflict:
        await client.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "another body"}], extra_headers=key
        )
    envelope = conflict.value.body
    assert isinstance(envelope, dict) and set(envelope) == {"message", "type", "param", "code"}
    assert envelope["type"] == "conflict_error"


async def test_a_streamed_idempotency_key_replays_the_stored_answer_as_a_stream(
    gateway_factory: GatewayFactory,
) -> None:
    gw = await gateway_factory(
        {"demo": stub("--log-requests"), "broken": stub("--fail-rate", "1")}, queue={"max_retries": 1}
    )
    client = sdk(gw)
    key = {"Idempotency-Key": "v1-stream-key"}
    hello: list[ChatCompletionMessageParam] = [{"role": "user", "content": "stream once"}]

    async def streamed() -> tuple[str, str, list[int]]:
        raw = await client.chat.completions.with_raw_response.create(
            model="demo",
            messages=hello,
            stream=True,
            stream_options={"include_usage": True},
            extra_headers=key,
        )
        chunks = [c async for c in raw.parse()]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        usage = [c.usage.completion_tokens for c in chunks if c.usage is not None]
        job_id = raw.headers["x-request-id"]
        assert {c.id for c in chunks} == {"chatcmpl-" + job_id.removeprefix("job_")}  # the replay's too
        return job_id, text, usage

    first_id, first_text, first_usage = await streamed()
    again_id, again_text, again_usage = await streamed()
    assert again_id == first_id
    assert again_text == first_text == "stub reply to: stream once"
    assert again_usage == first_usage == [5]
    assert gw.services.engines is not None
    engine_log = gw.services.engines.log_path("demo").read_text()
    assert engine_log.count("request ") == 1, engine_log  # the replay never reached the engine
    failed_key = {"Idempotency-Key": "v1-stream-failed"}
    for _ in range(2):  # the key's job failed: its repeat answers the same status, no new attempt
        with pytest.raises(openai.InternalServerError) as failed:
            await client.chat.completions.create(
                model="broken", messages=hello, stream=True, extra_headers=failed_key
            )
        assert failed.value.status_code == 502
        assert "after 2 attempt(s)" in str(failed.value)
    with pytest.raises(openai.ConflictError):  # the same key for another body: before any stream
        await client.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "other"}], stream=True, extra_headers=key
        )


async def test_an_engine_that_reports_no_usage_in_streams_gets_none_invented(
    gateway_factory: GatewayFactory,
) -> None:
    """llama.cpp's server ignores stream_options: no usage chunk comes. The gateway relays what
    it got, never a made-up count: no usage chunk live or in a replay, history usage empty."""
    gw = await gateway_factory({"quiet": stub("--no-stream-usage")})
    client = sdk(gw)
    hello: list[ChatCompletionMessageParam] = [{"role": "user", "content": "count nothing"}]
    key = {"Idempotency-Key": "no-usage-stream"}
    seen = []
    for _ in range(2):  # live, then the key's replay
        raw = await client.chat.completions.with_raw_response.create(
            model="quiet",
            messages=hello,
            stream=True,
            stream_options={"include_usage": True},
            extra_headers=key,
        )
        chunks = [c async for c in raw.parse()]
        seen.append(("".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks))
    for text, chunks in seen:
        assert text == "stub reply to: count nothing"
        assert [c for c in chunks if c.usage is not None or not c.choices] == []
        assert chunks[-1].choices[0].finish_reason == "stop"
    assert gw.services.queue is not None
    doc = await gw.services.queue.store.get(raw.headers["x-request-id"])
    assert doc is not None and doc.result is not None and doc.result["usage"] == {}
    plain = await client.chat.completions.create(model="quiet", messages=hello)  # not streamed: counted
    assert plain.usage is not None and plain.usage.completion_tokens == 5


async def test_queue_timeout_is_a_504_server_error(gateway_factory: GatewayFactory) -> None:
    """The SDK maps every status >= 500 to InternalServerError; the 504 says which one it was."""
    gw = await gateway_factory({"busy": stub("--latency-ms", "1500", max_concurrent=1, timeout=0.3)})
    client = sdk(gw)
    hello: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]
    ahead = asyncio.create_task(client.chat.completions.create(model="busy", messages=hello))
    await gw.until_count("busy", "running", 1)
    with pytest.raises(openai.InternalServerError) as timed_out:
        await client.chat.completions.create(model="busy", messages=hello)
    assert timed_out.value.status_code == 504
    assert timed_out.value.body["type"] == "timeout_error"  # type: ignore[index]
    assert "waited in the queue" in timed_out.value.message
    assert (await ahead).choices[0].message.content == "stub reply to: hi"


async def test_a_stream_that_ends_without_done_is_a_failure_not_an_answer(
    gateway_factory: GatewayFactory,
) -> None:
    """An engine body that just stops (no finish chunk, no [DONE]) may be cut anywhere: the
    client gets an error after the part it already has, and history says failed, not succeeded."""
    gw = await gateway_factory({"stops": stub("--end-stream-after", "2")})
    body = {"model": "stops", "messages": [{"role": "user", "content": "cut me short"}], "stream": True}
    response = await gw.http.post("/v1/chat/completions", json=body, headers=gw.headers())
    assert response.status_code == 200, response.text
    events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert "[DONE]" not in events
    error = json.loads(events[-1])["error"]
    assert "ended without data: [DONE]" in error["message"], error
    text = "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1])
    assert text == "stub"
    job = (await gw.http.get(f"/api/jobs/{response.headers['X-Request-ID']}", headers=gw.headers())).json()
    assert (job["state"], job["attempts"]) == ("failed", 1)
    assert "ended without data: [DONE]" in job["error"]["message"]


async def test_openai_fields_beyond_sampling_reach_the_engine_and_come_back(
    gateway_factory: GatewayFactory,
) -> None:
    """Tool calls, logprobs, max_completion_tokens, response_format and vLLM's extra_body
    sampling fields: SDK clients send them, vLLM implements them, the gateway passes them."""
    gw = await gateway_factory({"demo": stub("--log-requests")})
    client = sdk(gw)
    ask: list[ChatCompletionMessageParam] = [{"role": "user", "content": "weather in Paris"}]
    lookup: ChatCompletionToolParam = {
        "type": "function",
        "function": {
            "name": "lookup",
            "description": "look a thing up",
            "parameters": {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object"},
        },
    }
    called = await client.chat.completions.create(
        model="demo",
        messages=ask,
        tools=[lookup],
        tool_choice={"type": "function", "function": {"name": "lookup"}},
    )
    choice = called.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls is not None and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "lookup"
    assert json.loads(call.function.arguments) == {"text": "weather in Paris"}
    job = (
        await gw.http.get(f"/api/jobs/job_{called.id.removeprefix('chatcmpl-')}", headers=gw.headers())
    ).json()
    assert job["result"]["message"]["tool_calls"][0]["function"]["name"] == "lookup"  # in history too

    scored = await client.chat.completions.create(
        model="demo",
        messages=ask,
        logprobs=True,
        top_logprobs=1,
        max_completion_tokens=2,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "answer", "schema": {"type": "object"}},
        },
        extra_body={"top_k": 5, "min_p": 0.1, "repetition_penalty": 1.1},
    )
    assert scored.choices[0].message.content == "stub reply"
    assert scored.choices[0].finish_reason == "length"
    assert scored.choices[0].logprobs is not None and scored.choices[0].logprobs.content is not None
    assert [t.token for t in scored.choices[0].logprobs.content] == ["stub", "reply"]

    assert gw.services.engines is not None
    sent = [
        json.loads(line.split(" messages ", 1)[1])
        for line in gw.services.engines.log_path("demo").read_text().splitlines()
        if line.startswith("request ")
    ]
    assert sent[0]["tools"] == [lookup]  # the JSON Schema's "$schema" key survived the database
    assert sent[1]["response_format"]["json_schema"]["name"] == "answer"
    assert (sent[1]["top_k"], sent[1]["min_p"], sent[1]["repetition_penalty"]) == (5, 0.1, 1.1)
    assert (sent[1]["max_completion_tokens"], sent[1]["top_logprobs"]) == (2, 1)

    for bad, param in [
        ({"top_logprobs": 50, "logprobs": True}, "top_logprobs"),
        ({"tools": [{"type": "retrieval", "function": {"name": "x"}}]}, "tools"),
        ({"logit_bias": {"50256": 500}}, "logit_bias"),
        ({"tool_choice": "sometimes"}, "tool_choice"),
    ]:
        with pytest.raises(openai.UnprocessableEntityError) as refused:
            await client.chat.completions.create(model="demo", messages=ask, extra_body=bad)
        assert refused.value.body["param"].startswith(param), refused.value.body  # type: ignore[index]


async def test_a_streamed_tool_call_reaches_the_client_history_and_a_replay(
    gateway_factory: GatewayFactory,
) -> None:
    """Tool-call deltas are relayed as the engine sends them, assembled into the job's history,
    and a repeat of the stream's Idempotency-Key replays the assembled call."""
    gw = await gateway_factory({"demo": stub()})
    client = sdk(gw)
    lookup: ChatCompletionToolParam = {"type": "function", "function": {"name": "lookup"}}

    async def streamed_call() -> tuple[str, str, str, str | None]:
        raw = await client.chat.completions.with_raw_response.create(
            model="demo",
            messages=[{"role": "user", "content": "weather in Paris"}],
            tools=[lookup],
            tool_choice="required",
            stream=True,
            extra_headers={"Idempotency-Key": "streamed-tool-call"},
        )
        name, arguments, finish = "", "", None
        async for chunk in raw.parse():
            for choice in chunk.choices:
                for part in choice.delta.tool_calls or []:
                    name += (part.function.name or "") if part.function else ""
                    arguments += (part.function.arguments or "") if part.function else ""
                finish = choice.finish_reason or finish
        return raw.headers["x-request-id"], name, arguments, finish

    job_id, name, arguments, finish = await streamed_call()
    assert (name, json.loads(arguments), finish) == ("lookup", {"text": "weather in Paris"}, "tool_calls")

    async def history() -> dict[str, Any]:
        job: dict[str, Any] = (await gw.http.get(f"/api/jobs/{job_id}", headers=gw.headers())).json()
        return job

    job = await eventually(history, lambda j: j["state"] == "succeeded", "the stream's history")
    (stored,) = job["result"]["message"]["tool_calls"]
    assert stored["function"] == {"name": "lookup", "arguments": arguments}
    assert stored["id"].startswith("call_") and stored["type"] == "function"
    assert job["result"]["finish_reason"] == "tool_calls"

    assert await streamed_call() == (job_id, name, arguments, finish)  # the replay, from history


async def test_a_streamed_replay_of_an_answer_that_was_not_stored_says_so(
    gateway_factory: GatewayFactory,
) -> None:
    """With history.store_outputs off there is nothing to replay: an error event saying why,
    never an empty answer passed off as the model's."""
    gw = await gateway_factory({"demo": stub()}, history={"store_outputs": False})
    body = {"model": "demo", "messages": [{"role": "user", "content": "keep nothing"}], "stream": True}
    headers = gw.headers(Idempotency_Key="redacted-stream")
    first = await gw.http.post("/v1/chat/completions", json=body, headers=headers)
    assert " nothing" in first.text and first.text.rstrip().endswith("data: [DONE]")
    job_id = first.headers["X-Request-ID"]

    async def stored() -> dict[str, Any]:
        job: dict[str, Any] = (await gw.http.get(f"/api/jobs/{job_id}", headers=gw.headers())).json()
        return job

    await eventually(stored, lambda j: j["state"] == "succeeded", "the stream's history write")
    again = await gw.http.post("/v1/chat/completions", json=body, headers=headers)
    assert again.status_code == 200 and again.headers["X-Request-ID"] == job_id
    events = [line[6:] for line in again.text.splitlines() if line.startswith("data: ")]
    error = json.loads(events[-1])["error"]
    assert error["code"] == "output_redacted" and "store_outputs" in error["message"], error
    assert "[DONE]" not in events and " nothing" not in again.text
