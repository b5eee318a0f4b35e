"""Adoption of a load in progress: two supervisors on one database, the first abandoned mid-load
as a gateway killed with -9 would leave it (its tasks gone, its engine running, its record kept).
Real stub engine processes; the second supervisor's clock is injected."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from app.clock import Clock, SystemClock
from app.engines import process as proc
from app.engines.crashes import CrashLog
from app.engines.gpus import StaticInventory
from app.engines.lifecycle import EngineState
from app.engines.manager import EngineManager
from app.proxy.client import EngineClient
from app.settings import EngineDefaults, ModelSettings
from app.store.database import Database
from tests.conftest import ShiftedClock, eventually

DEFAULTS = EngineDefaults(health_interval=0.05, stop_timeout=2)
Managers = Callable[[dict[str, ModelSettings], Clock], EngineManager]


@pytest.fixture
async def managers(database: Database, tmp_path: Path) -> AsyncIterator[Managers]:
    """Supervisors on the test's database; each stopped after the test (engines it holds too)."""
    client = EngineClient()
    await client.start()
    made: list[EngineManager] = []

    def make(models: dict[str, ModelSettings], clock: Clock) -> EngineManager:
        crashes = CrashLog(database.crash_logs, clock, 15)
        manager = EngineManager(
            models, DEFAULTS, database.engines, crashes, client, clock, tmp_path / "logs", StaticInventory()
        )
        made.append(manager)
        return manager

    yield make
    for manager in made:
        await manager.stop_all()
    await client.stop()


async def _abandoned_load(
    database: Database, make: Managers, models: dict[str, ModelSettings]
) -> proc.SpawnedProcess:
    """A load begun by a first supervisor that then 'dies': its watch of the load is cancelled
    (its record stays, its engine runs on) and it forgets the engine, so its stop does not kill it."""
    first = make(models, SystemClock())
    engine = first.begin_start("m")
    spawned = engine.process
    assert spawned is not None
    await eventually(
        lambda: database.engines.find_one({"_id": "m"}), lambda r: r is not None, "the engine recorded"
    )
    first._tasks["m"].cancel()  # the killed gateway's load watch
    engine.process = None
    return spawned


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _reap(spawned: proc.SpawnedProcess) -> None:
    """Kill what a failed test left and reap the leader (the first supervisor's child)."""
    proc.stop(spawned, 1)


async def test_an_adopted_load_gets_only_what_is_left_of_its_startup_timeout(
    database: Database, managers: Managers
) -> None:
    """The record's started_at is where the timeout counts from, by the injected clock: with
    599 of 600 s gone, the adopted load fails about a second later, named and killed, instead of
    being given 600 s more."""
    models = {"m": ModelSettings(kind="stub", args=["--startup-s", "300"], startup_timeout=600)}
    spawned = await _abandoned_load(database, managers, models)
    try:
        clock = ShiftedClock()
        clock.advance(599)
        second = managers(models, clock)
        await second.start_all()
        engine = second.get("m")
        assert (engine.state, engine.pid, engine.adopted) == (EngineState.STARTING, spawned.pid, True)
        await second.wait_loads(20)
        assert engine.state == EngineState.FAILED, engine
        assert engine.reason.startswith("not healthy within 600 s (startup_timeout)"), engine.reason
        assert not _alive(spawned.pid)
        assert await database.engines.find_one({"_id": "m"}) is None
    finally:
        _reap(spawned)


async def test_an_adopted_load_whose_leader_dies_fails_and_leaves_no_child(
    database: Database, managers: Managers
) -> None:
    models = {"m": ModelSettings(kind="stub", args=["--startup-s", "300", "--spawn-child"])}
    spawned = await _abandoned_load(database, managers, models)
    children: list[Any] = []
    try:
        children = await eventually(
            lambda: asyncio.to_thread(psutil.Process(spawned.pid).children), bool, "the stub's child"
        )
        second = managers(models, SystemClock())
        await second.start_all()
        engine = second.get("m")
        assert (engine.state, engine.pid) == (EngineState.STARTING, spawned.pid)
        psutil.Process(spawned.pid).kill()
        await second.wait_loads(20)
        assert engine.state == EngineState.FAILED, engine
        assert engine.reason.startswith("exited with code -1 while starting"), engine.reason
        assert [c.pid for c in children if _alive(c.pid)] == []  # it ignores SIGTERM: SIGKILLed
    finally:
        for child in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        _reap(spawned)
