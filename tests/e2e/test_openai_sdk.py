"""The synchronous OpenAI SDK against the daemon over a real socket."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import openai
import pytest
from openai import OpenAI
from openai.types.chat import ChatCompletionChunk

from tests.e2e.conftest import Daemon

pytestmark = pytest.mark.e2e


async def test_sync_sdk_gets_answers_and_errors(tmp_path: Path, daemons: list[Daemon]) -> None:
    daemon = Daemon(tmp_path, {"demo": {"kind": "stub", "aliases": ["gemma-3-4b-it"]}})
    daemons.append(daemon)
    daemon.start()
    await daemon.wait_healthy()

    def use_sdk() -> tuple[str | None, list[str], str]:
        client = OpenAI(api_key=daemon.token, base_url=f"{daemon.url}/v1", max_retries=0)
        answer = client.chat.completions.create(
            model="gemma-3-4b-it", messages=[{"role": "user", "content": "over a socket"}]
        )
        models = [m.id for m in client.models.list().data]
        try:
            OpenAI(api_key="bad", base_url=f"{daemon.url}/v1", max_retries=0).models.list()
        except openai.AuthenticationError as exc:
            return answer.choices[0].message.content, models, str(exc)
        raise AssertionError("a bad token was accepted")

    content, models, auth_error = await asyncio.to_thread(use_sdk)
    assert content == "stub reply to: over a socket"
    assert models == ["demo"]
    assert "token is invalid" in auth_error


async def test_sync_sdk_streams_content_and_usage(tmp_path: Path, daemons: list[Daemon]) -> None:
    """The sync client parses SSE on its own code path (Stream, not AsyncStream)."""
    daemon = Daemon(tmp_path, {"demo": {"kind": "stub", "args": ["--token-latency-ms", "10"]}})
    daemons.append(daemon)
    daemon.start()
    await daemon.wait_healthy()

    def stream(**options: Any) -> list[ChatCompletionChunk]:
        client = OpenAI(api_key=daemon.token, base_url=f"{daemon.url}/v1", max_retries=0)
        with client.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "sync stream"}], stream=True, **options
        ) as chunks:
            return list(chunks)

    counted = await asyncio.to_thread(stream, stream_options={"include_usage": True})
    text = "".join(c.choices[0].delta.content or "" for c in counted if c.choices)
    assert text == "stub reply to: sync stream"
    assert counted[-1].choices == [] and counted[-1].usage is not None
    assert counted[-1].usage.model_dump(include={"prompt_tokens", "completion_tokens", "total_tokens"}) == {
        "prompt_tokens": 2,
        "completion_tokens": 5,
        "total_tokens": 7,
    }
    assert all(c.usage is None for c in counted[:-1])
    assert all(c.usage is None for c in await asyncio.to_thread(stream))  # usage only when asked for
