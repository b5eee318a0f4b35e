"""The synchronous OpenAI SDK against the daemon over a real socket."""

from __future__ import annotations

import asyncio
from pathlib import Path

import openai
import pytest
from openai import OpenAI

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
