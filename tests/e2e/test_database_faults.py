"""The embedded database killed or stalled under a running gateway (a real daemon, its real
SecantusDB process, signals sent by pid): admitted work is not lost, new work is refused at once
with the reason, /health tells a load balancer, the gateway recovers by itself, and a shutdown
with the database stalled still stops every process."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from pymongo import AsyncMongoClient

from tests.conftest import eventually
from tests.e2e.conftest import Daemon

pytestmark = pytest.mark.e2e


async def _started(tmp_path: Path, daemons: list[Daemon], latency_ms: int) -> Daemon:
    model = {"kind": "stub", "args": ["--latency-ms", str(latency_ms)], "max_concurrent": 4, "max_waiting": 4}
    daemon = Daemon(tmp_path, {"m": model})
    daemons.append(daemon)
    daemon.start()
    await daemon.wait_healthy()
    return daemon


async def _chat(client: httpx.AsyncClient, daemon: Daemon, text: str) -> httpx.Response:
    return await client.post(
        f"{daemon.url}/api/chat",
        json={"model": "m", "messages": [{"role": "user", "content": text}]},
        headers={"Authorization": f"Bearer {daemon.token}", "X-Client-ID": "faults", "Idempotency-Key": text},
        timeout=60,
    )


async def _health(client: httpx.AsyncClient, daemon: Daemon) -> httpx.Response:
    return await client.get(f"{daemon.url}/health", timeout=10)


async def _jobs(daemon: Daemon) -> list[dict[str, Any]]:
    db: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(daemon.db_uri())
    try:
        return await db.gateway.jobs.find({}, {"state": 1, "idempotency_key": 1}).to_list()
    finally:
        await db.close()


async def _states(daemon: Daemon) -> list[str]:
    return [str(job["state"]) for job in await _jobs(daemon)]


async def test_a_killed_database_is_restarted_and_admitted_jobs_finish(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    daemon = await _started(tmp_path, daemons, latency_ms=700)
    async with httpx.AsyncClient() as client:
        admitted = [asyncio.create_task(_chat(client, daemon, f"before-{i}")) for i in range(4)]
        await eventually(lambda: _states(daemon), lambda s: s.count("running") == 4, "4 jobs running")
        killed = daemon.db_pid()
        psutil.Process(killed).kill()

        answers = await asyncio.gather(*admitted)  # nothing admitted is lost
        for i, answer in enumerate(answers):
            assert answer.status_code == 200, answer.text
            assert answer.json()["response"] == f"stub reply to: before-{i}"
        await eventually(lambda: _health(client, daemon), lambda r: r.status_code == 200, "healthy again")
        assert daemon.db_pid() != killed  # restarted by the gateway, not by a restart of the gateway
        after = await _chat(client, daemon, "after")
        assert after.status_code == 200 and after.json()["response"] == "stub reply to: after"
    done = [await daemon.job(a.json()["id"]) for a in answers]
    assert [(d["state"], d["attempts"]) for d in done] == [("succeeded", 1)] * 4  # none ran twice
    assert "embedded_db.exited" in daemon.log.read_text()


async def test_a_stalled_database_gets_fast_refusals_and_a_503_health_then_recovers(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    daemon = await _started(tmp_path, daemons, latency_ms=10)
    db_pid = daemon.db_pid()
    async with httpx.AsyncClient() as client:
        os.kill(db_pid, signal.SIGSTOP)
        try:
            down = await eventually(
                lambda: _health(client, daemon), lambda r: r.status_code == 503, "/health says 503"
            )
            body = down.json()
            assert body["status"] == "unhealthy" and body["database"] == "unreachable"
            assert "Timeout" in body["database_error"]["reason"] and body["database_error"]["since"]

            began = time.monotonic()
            refused = await _chat(client, daemon, "while-stalled")
            waited = time.monotonic() - began
            assert refused.status_code == 503, refused.text
            assert refused.json()["code"] == "database_unavailable"
            assert "the database is unavailable" in refused.json()["detail"]
            assert int(refused.headers["Retry-After"]) >= 1
            assert waited < 2.0, waited  # refused from what the health loop knows, no 5 s wait
        finally:
            os.kill(db_pid, signal.SIGCONT)
        await eventually(lambda: _health(client, daemon), lambda r: r.status_code == 200, "healthy again")
        again = await _chat(client, daemon, "after-stall")
        assert again.status_code == 200 and again.json()["response"] == "stub reply to: after-stall"
    keys = {job.get("idempotency_key") for job in await _jobs(daemon)}
    assert "after-stall" in keys and "while-stalled" not in keys  # refused means not admitted
    assert daemon.db_pid() == db_pid  # a stalled server is never restarted under itself


async def test_shutdown_with_the_database_stalled_stops_every_process(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    daemon = await _started(tmp_path, daemons, latency_ms=10)
    db_pid = daemon.db_pid()
    children = daemon.children_pids()
    assert len(children) >= 2  # the database and the engine
    os.kill(db_pid, signal.SIGSTOP)
    async with httpx.AsyncClient() as client:
        await eventually(lambda: _health(client, daemon), lambda r: r.status_code == 503, "/health says 503")

    assert daemon.terminate(timeout_s=60) in (0, -signal.SIGTERM)
    await eventually(
        lambda: asyncio.to_thread(lambda: [p for p in children if psutil.pid_exists(p)]),
        lambda alive: not alive,
        "every child process gone",
    )
    log = daemon.log.read_text()
    assert "Application shutdown failed" not in log
    assert "engine.stopped" in log
