"""A llama.cpp server someone started by hand, behind the gateway as an external upstream (kind
openai): the real daemon, the real openai SDK, a real model, and a server the gateway did not
spawn, cannot start or stop, and must survive the restart of."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import pytest
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionMessageParam

from app.engines.model_files import resolve_model_file
from tests.conftest import eventually
from tests.e2e.conftest import Daemon
from tests.e2e.test_llama_cpp import SMOLLM2, _model
from tests.upstream import ExternalServer

pytestmark = pytest.mark.e2e
KEY_ENV = "E2E_LLAMA_UPSTREAM_KEY"
KEY = "sk-e2e-llama-upstream-0123456789"
ASK: list[ChatCompletionMessageParam] = [{"role": "user", "content": "What is the capital of France?"}]


def llama_server(tmp_path: Path) -> ExternalServer:
    """llama-cpp-python's server as an operator would run it, with an API key. Its health for the
    gateway is /docs: its /v1/models waits for a running generation (app/engines/commands.py)."""
    argv = [sys.executable, "-m", "llama_cpp.server", "--model", resolve_model_file("smol", SMOLLM2)]
    argv += ["--n_ctx", "512", "--n_threads", "1", "--n_threads_batch", "1", "--interrupt_requests", "False"]
    argv += ["--api_key", KEY, "--host", "127.0.0.1", "--model_alias", "SmolLM2-135M-Instruct"]
    return ExternalServer(argv, tmp_path / "llama-upstream.log", "/docs")


async def test_a_hand_started_llama_cpp_server_is_served_refuses_admin_and_survives_its_restart(
    tmp_path: Path,
    daemons: list[Daemon],
    external_servers: list[ExternalServer],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = llama_server(tmp_path)
    external_servers.append(server)
    server.start()
    monkeypatch.setenv(KEY_ENV, KEY)  # the daemon inherits it; the key is in no file
    remote = {
        "kind": "openai",
        "url": f"{server.url}/v1",
        "api_key_env": KEY_ENV,
        "served_name": "SmolLM2-135M-Instruct",
        "aliases": ["by-hand"],
        "health_path": "/docs",
        "max_concurrent": 1,
    }
    fast = {"health_interval": 0.1, "health_check_interval": 0.5, "health_check_timeout": 2}
    daemon = Daemon(tmp_path, {"remote": remote}, engines=fast)
    daemons.append(daemon)
    daemon.start()
    await daemon.wait_healthy()
    client = AsyncOpenAI(api_key=daemon.token, base_url=f"{daemon.url}/v1", max_retries=0)

    plain = await client.chat.completions.create(model="by-hand", messages=ASK, max_tokens=16, temperature=0)
    text = plain.choices[0].message.content or ""
    assert text.strip() and "stub" not in text, text
    assert plain.model == "by-hand"  # the name the client used, not the upstream's
    assert plain.usage is not None and 0 < plain.usage.completion_tokens <= 16
    stream = await client.chat.completions.create(
        model="remote", messages=ASK, max_tokens=16, temperature=0, stream=True
    )
    assert "".join([c.choices[0].delta.content or "" async for c in stream if c.choices]) == text

    async with httpx.AsyncClient() as http:
        admin = {"Authorization": f"Bearer {daemon.admin_token}"}
        for action in ("start", "stop"):
            refused = await http.post(f"{daemon.url}/admin/models/remote/{action}", headers=admin)
            assert refused.status_code == 409 and refused.json()["code"] == "model_not_managed"
    assert server.proc is not None and server.proc.poll() is None  # untouched
    view = await _model(daemon, "remote")
    assert (view["state"], view["kind"], view["url"], view["pid"]) == ("ready", "openai", server.url, None)

    server.kill()
    down = await eventually(
        lambda: _model(daemon, "remote"), lambda m: m["state"] == "unavailable", "upstream unavailable"
    )
    assert "cannot be reached" in down["reason"]
    async with httpx.AsyncClient() as http:
        body = {"model": "remote", "messages": ASK, "max_tokens": 4}
        headers = {"Authorization": f"Bearer {daemon.token}", "X-Client-ID": "tests"}
        turned_away = await http.post(f"{daemon.url}/v1/chat/completions", json=body, headers=headers)
    assert turned_away.status_code == 503 and turned_away.json()["error"]["code"] == "upstream_unavailable"

    server.start()  # its operator brings it back on the same port
    await eventually(lambda: _model(daemon, "remote"), lambda m: m["state"] == "ready", "upstream back", 30)
    again = await client.chat.completions.create(model="remote", messages=ASK, max_tokens=16, temperature=0)
    assert again.choices[0].message.content == text  # the same model, temperature 0
