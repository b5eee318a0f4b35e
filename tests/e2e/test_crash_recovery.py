"""kill -9 of the gateway (and of the gateway with its database) while jobs run and wait:
every admitted job ends in a terminal state, none is lost, and a client that repeats its
request with the same Idempotency-Key gets that job's result without a second inference."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import psutil
import pytest
from pymongo import AsyncMongoClient

from tests.conftest import eventually
from tests.e2e.conftest import Daemon

pytestmark = pytest.mark.e2e
N = 10


async def _job_states(daemon: Daemon) -> list[dict[str, object]]:
    client: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(daemon.db_uri())
    try:
        return await client.gateway.jobs.find({}, {"state": 1, "attempts": 1, "idempotency_key": 1}).to_list()
    finally:
        await client.close()


async def _until_admitted(daemon: Daemon, running: int, queued: int, timeout_s: float = 30.0) -> None:
    async def states() -> list[str]:
        return [str(d["state"]) for d in await _job_states(daemon)]

    await eventually(
        states,
        lambda seen: seen.count("running") == running and seen.count("queued") == queued,
        f"{running} running and {queued} queued",
        timeout_s,
    )


async def _chat(client: httpx.AsyncClient, daemon: Daemon, i: int) -> httpx.Response:
    return await client.post(
        f"{daemon.url}/api/chat",
        json={"model": "slow", "messages": [{"role": "user", "content": f"request-{i}"}]},
        headers={
            "Authorization": f"Bearer {daemon.token}",
            "X-Client-ID": "crash-test",
            "Idempotency-Key": f"key-{i}",
        },
        timeout=120,
    )


async def _crash_and_recover(tmp_path: Path, daemons: list[Daemon], kill_database: bool) -> None:
    daemon = Daemon(
        tmp_path,
        {"slow": {"kind": "stub", "args": ["--latency-ms", "4000"], "max_concurrent": 5, "max_waiting": 5}},
    )
    daemons.append(daemon)
    daemon.start()
    await daemon.wait_healthy()
    engine_pids = [p for p in daemon.children_pids() if p != daemon.db_pid()]
    assert engine_pids
    async with httpx.AsyncClient() as client:
        inflight = [asyncio.create_task(_chat(client, daemon, i)) for i in range(N)]
        await _until_admitted(daemon, running=5, queued=5)
        db_pid = daemon.db_pid()
        daemon.kill9()
        if kill_database:
            psutil.Process(db_pid).send_signal(signal.SIGKILL)
        lost = await asyncio.gather(*inflight, return_exceptions=True)
        assert all(isinstance(r, httpx.HTTPError) for r in lost), lost

        daemon.start()
        await daemon.wait_healthy()
        if kill_database:
            assert daemon.db_pid() != db_pid
        else:
            assert daemon.db_pid() == db_pid  # the healthy database left behind was reused
        # the engine outlived the gateway and is healthy: adopted (same pid), not restarted
        engine = await _admin_model(client, daemon, "slow")
        assert engine["pid"] == engine_pids[0] and engine["adopted"] is True, engine
        again = await asyncio.gather(*(_chat(client, daemon, i) for i in range(N)))
        # the adopted engine dies: the supervisor restarts it as a load of its own
        psutil.Process(engine_pids[0]).send_signal(signal.SIGKILL)
        restarted = await eventually(
            lambda: _admin_model(client, daemon, "slow"),
            lambda m: m["state"] == "ready" and m["pid"] != engine_pids[0],
            "the adopted engine restarted after its crash",
            60,
        )
        assert restarted["adopted"] is False and restarted["load_seconds"] is not None, restarted

    assert [r.status_code for r in again] == [200] * N, [r.text for r in again]
    for i, response in enumerate(again):
        assert response.json()["message"]["content"] == f"stub reply to: request-{i}"
    docs = await _job_states(daemon)
    assert len(docs) == N  # nothing lost, no duplicate job for a repeated key
    assert {d["state"] for d in docs} == {"succeeded"}
    attempts = sorted(int(str(d["attempts"])) for d in docs)
    assert attempts == [1] * 5 + [2] * 5, attempts  # the five that were running ran once more, once
    assert {r.json()["id"] for r in again} == {d["_id"] for d in docs}
    assert daemon.terminate() in (0, -signal.SIGTERM)
    assert not _alive(engine_pids), "the adopted engine outlived the gateway's SIGTERM"


def _alive(pids: list[int]) -> list[int]:
    return [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]


async def _admin_model(client: httpx.AsyncClient, daemon: Daemon, name: str) -> dict[str, object]:
    response = await client.get(
        f"{daemon.url}/admin/models/{name}", headers={"Authorization": f"Bearer {daemon.admin_token}"}
    )
    assert response.status_code == 200, response.text
    body: dict[str, object] = response.json()
    return body


async def test_kill9_gateway_recovers_every_job(tmp_path: Path, daemons: list[Daemon]) -> None:
    await _crash_and_recover(tmp_path, daemons, kill_database=False)


async def test_kill9_gateway_and_database_recovers_every_job(tmp_path: Path, daemons: list[Daemon]) -> None:
    await _crash_and_recover(tmp_path, daemons, kill_database=True)


async def test_sigterm_stops_engines_and_database(tmp_path: Path, daemons: list[Daemon]) -> None:
    daemon = Daemon(tmp_path, {"demo": {"kind": "stub"}})
    daemons.append(daemon)
    daemon.start()
    await daemon.wait_healthy()
    children = daemon.children_pids()
    db_pid = daemon.db_pid()
    assert db_pid in children and len(children) >= 2
    # uvicorn re-raises the signal after its graceful shutdown, hence -SIGTERM
    assert daemon.terminate() in (0, -signal.SIGTERM)
    assert "gateway.stopped" in daemon.log.read_text()
    leftover = [
        p for p in children if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
    ]
    assert leftover == []
    assert not (daemon.data_dir / "db.pid").exists()


async def test_bad_config_fails_at_start_naming_the_key(tmp_path: Path, daemons: list[Daemon]) -> None:
    daemon = Daemon(tmp_path, {"demo": {"kind": "stub", "max_concurrent": -1}})
    daemon.start()
    assert daemon.proc is not None
    assert daemon.proc.wait(timeout=30) == 2
    assert "models.demo.max_concurrent: Input should be greater than or equal to 1" in daemon.log.read_text()


async def test_restart_adopts_healthy_engines_and_kills_orphans(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    """After kill -9: a still-configured healthy engine is adopted; one whose model was removed
    from the config, and one that hangs, are killed (their GPU memory would leak otherwise)."""
    models = {"keep": {"kind": "stub"}, "removed": {"kind": "stub"}, "hung": {"kind": "stub"}}
    daemon = Daemon(tmp_path, models)
    daemons.append(daemon)
    daemon.start()
    await daemon.wait_healthy()
    async with httpx.AsyncClient() as client:
        pids = {name: (await _admin_model(client, daemon, name))["pid"] for name in models}
        daemon.kill9()
        psutil.Process(int(str(pids["hung"]))).suspend()  # alive but never answers /health
        daemon.reconfigure({"keep": models["keep"], "hung": models["hung"]})
        daemon.start()
        await daemon.wait_healthy()
        keep = await _admin_model(client, daemon, "keep")
        assert keep["pid"] == pids["keep"] and keep["adopted"] is True
        hung = await _admin_model(client, daemon, "hung")
        assert hung["pid"] != pids["hung"] and hung["adopted"] is False
        assert _alive([int(str(pids["removed"])), int(str(pids["hung"]))]) == []
        log = daemon.log.read_text()
        assert "engine.orphan_stopped" in log and "model is no longer configured" in log
        assert "reason='not healthy'" in log or 'reason="not healthy"' in log or "reason=not healthy" in log
    assert daemon.terminate() in (0, -signal.SIGTERM)
    assert _alive([int(str(pids["keep"]))]) == []


async def test_restart_kills_the_child_that_outlived_a_dead_engine(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    """kill -9 of the gateway and of the engine's leader leaves its child (vLLM's EngineCore,
    which holds the GPU memory) running, out of any tree a restarted gateway could walk. The
    restarted gateway finds it by the engine id in its environment, kills it (it ignores
    SIGTERM: killed by the SIGKILL after stop_timeout), and loads the model again."""
    daemon = Daemon(
        tmp_path, {"core": {"kind": "stub", "args": ["--spawn-child"]}}, engines={"stop_timeout": 2}
    )
    daemons.append(daemon)
    daemon.start()
    await daemon.wait_healthy()
    async with httpx.AsyncClient() as client:
        leader = int(str((await _admin_model(client, daemon, "core"))["pid"]))
        (child,) = psutil.Process(leader).children()
        daemon.seen.add(child.pid)  # stopped after the test whatever happens
        daemon.kill9()
        os.kill(leader, signal.SIGKILL)
        await eventually(
            lambda: asyncio.to_thread(_alive, [leader]), lambda alive: alive == [], "the leader gone", 10
        )
        assert _alive([child.pid]) == [child.pid]  # the survivor this is about

        daemon.start()
        await daemon.wait_healthy()
        assert _alive([child.pid]) == []  # killed during adoption, before the gateway served
        again = await _admin_model(client, daemon, "core")
        assert again["pid"] != leader and again["adopted"] is False, again
    log = daemon.log.read_text()
    assert "engine.orphan_stopped" in log and f"pids=[{child.pid}]" in log and "process is gone" in log
    assert daemon.terminate() in (0, -signal.SIGTERM)


async def _engine_record(daemon: Daemon, name: str) -> dict[str, object] | None:
    client: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(daemon.db_uri())
    try:
        return await client.gateway.engines.find_one({"_id": name})
    finally:
        await client.close()


async def _kill9_while_loading(daemon: Daemon, client: httpx.AsyncClient) -> int:
    """Start the daemon, kill -9 it while its `slowload` engine loads; the engine's pid."""
    daemon.start()
    loading = await daemon.wait_health(lambda e: e["slowload"]["state"] == "starting", "slowload loading")
    assert loading["engines"]["slowload"]["state"] == "starting"
    pid = int(str((await _admin_model(client, daemon, "slowload"))["pid"]))
    assert pid in daemon.children_pids()
    record = await eventually(
        lambda: _engine_record(daemon, "slowload"), lambda r: r is not None, "engine record", 10
    )
    assert record is not None
    assert (record["state"], record["pid"], record["pgid"]) == ("starting", pid, os.getpgid(pid)), record
    daemon.kill9()
    assert _alive([pid]) == [pid]  # a loading engine outlives the gateway: it must be tracked
    return pid


async def test_kill9_while_an_engine_loads_adopts_the_load(tmp_path: Path, daemons: list[Daemon]) -> None:
    """The engine record is written when the engine is spawned, not once it is ready: a gateway
    killed during a long load (vLLM takes minutes) leaves a record, and the next gateway adopts
    the load in progress (same process, same command line) instead of throwing it away. It
    becomes ready under the new gateway, its load time counted from its spawn."""
    daemon = Daemon(tmp_path, {"slowload": {"kind": "stub", "args": ["--startup-s", "8"]}})
    daemons.append(daemon)
    async with httpx.AsyncClient() as client:
        old = await _kill9_while_loading(daemon, client)
        daemon.start()
        await daemon.wait_healthy()
        again = await _admin_model(client, daemon, "slowload")
        assert (again["pid"], again["adopted"]) == (old, True), again
        assert float(str(again["load_seconds"])) >= 8, again  # from the spawn, not the adoption
    log = daemon.log.read_text()
    assert "engine.adopted_loading" in log and "engine.orphan_stopped" not in log
    assert daemon.terminate() in (0, -signal.SIGTERM)
    assert _alive([old]) == []


async def test_kill9_while_an_engine_loads_kills_it_if_its_config_changed(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    """A load whose command line the config no longer produces is not adopted: its process
    group is killed before the new gateway serves, and the model loads again as configured."""
    daemon = Daemon(tmp_path, {"slowload": {"kind": "stub", "args": ["--startup-s", "300"]}})
    daemons.append(daemon)
    async with httpx.AsyncClient() as client:
        old = await _kill9_while_loading(daemon, client)
        daemon.reconfigure({"slowload": {"kind": "stub", "args": ["--startup-s", "0.5"]}})
        daemon.start()
        await daemon.wait_healthy()
        assert _alive([old]) == []
        again = await _admin_model(client, daemon, "slowload")
        assert again["pid"] != old and again["adopted"] is False, again
        new = int(str(again["pid"]))
        assert new in daemon.children_pids()
    log = daemon.log.read_text()
    assert "engine.orphan_stopped" in log and "configuration changed since it was started" in log
    assert daemon.terminate() in (0, -signal.SIGTERM)
    assert _alive([old, new]) == []


async def test_totals_are_exact_after_a_machine_crash(tmp_path: Path, daemons: list[Daemon]) -> None:
    """10 jobs done, then gateway, database and engine killed together (a machine crash): the
    totals read 10 after the restart, as before it; they never go back to what was last flushed."""
    daemon = Daemon(tmp_path, {"fast": {"kind": "stub", "max_concurrent": 4, "max_waiting": 6}})
    daemons.append(daemon)
    daemon.start()
    await daemon.wait_healthy()
    admin = {"Authorization": f"Bearer {daemon.admin_token}"}
    async with httpx.AsyncClient() as client:

        async def total_processed() -> int:
            answer = await client.get(f"{daemon.url}/admin/queue/fast", headers=admin, timeout=10)
            return int(answer.json()["total_processed"])

        answers = await asyncio.gather(
            *(
                client.post(
                    f"{daemon.url}/api/chat",
                    json={"model": "fast", "messages": [{"role": "user", "content": f"n{i}"}]},
                    headers={"Authorization": f"Bearer {daemon.token}", "X-Client-ID": "books"},
                    timeout=60,
                )
                for i in range(10)
            )
        )
        assert [a.status_code for a in answers] == [200] * 10
        assert await total_processed() == 10
        machine = [daemon.proc.pid if daemon.proc else 0, daemon.db_pid(), *daemon.children_pids()]
        for pid in dict.fromkeys(machine):  # all at once, as a power cut would
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(pid).kill()
        assert daemon.proc is not None
        daemon.proc.wait(timeout=10)

        daemon.start()
        await daemon.wait_healthy()
        assert await total_processed() == 10
        tallied = await eventually(
            _uncounted_jobs_of(daemon), lambda n: n == 0, "the outcomes tallied into the totals", 30
        )
        assert tallied == 0 and await total_processed() == 10  # and not counted a second time


def _uncounted_jobs_of(daemon: Daemon) -> Callable[[], Awaitable[int]]:
    async def count() -> int:
        client: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(daemon.db_uri())
        try:
            return await client.gateway.jobs.count_documents({"uncounted": {"$exists": True}})
        finally:
            await client.close()

    return count
