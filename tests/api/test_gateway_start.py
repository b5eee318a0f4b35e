"""A start that fails half-way stops what it had started: no database server, engine process,
background task or open engine session is left (app/gateway.py builds the services on an exit
stack). Each case breaks one stage, from the first database call to the last service built."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
from asgi_lifespan import LifespanManager

import app.gateway as gateway_module
from app.autoswitch.switcher import Switcher
from app.engines.crashes import CrashLog
from app.engines.manager import EngineManager
from app.gateway import Gateway
from app.main import create_app
from app.queue.service import JobQueue
from app.queue.sweeper import Sweeper
from app.scheduler import Scheduler
from app.usecases.ocr import OcrService
from tests.conftest import eventually, make_settings, stub


class Broken(Exception):
    """The failure a test puts into one stage."""


def _fails(*_: Any, **__: Any) -> Any:
    raise Broken("this stage fails on purpose")


async def _fails_async(*_: Any, **__: Any) -> Any:
    raise Broken("this stage fails on purpose")


async def _start_all_then_fail(self: EngineManager) -> None:
    await ORIGINAL_START_ALL(self)  # the engines are spawned: the failure must kill them
    raise Broken("failed after the engines started")


ORIGINAL_START_ALL = EngineManager.start_all

STAGES: dict[str, tuple[Any, str, Callable[..., Any]]] = {
    "indexes, right after the database": (gateway_module, "ensure_indexes", _fails_async),
    "the queue's slots, writer running": (JobQueue, "load_slots", _fails_async),
    "crash log, rate limiter and engine client running": (CrashLog, "ensure_indexes", _fails_async),
    "the recovery sweep, engines built": (Sweeper, "sweep", _fails_async),
    "auto-switch start": (Switcher, "start", _fails_async),
    "the scheduler": (Scheduler, "start", _fails),
    "after the engines started": (EngineManager, "start_all", _start_all_then_fail),
    "the last service, everything running": (OcrService, "__init__", _fails),
}


def _children() -> set[int]:
    alive = set()
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE:
                alive.add(child.pid)
        except psutil.NoSuchProcess:
            continue
    return alive


@pytest.mark.parametrize("stage", list(STAGES))
async def test_a_start_that_fails_at_a_stage_leaves_nothing_running(
    stage: str, mongo_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target, attribute, replacement = STAGES[stage]
    monkeypatch.setattr(target, attribute, replacement)
    settings = make_settings(
        mongo_uri,
        tmp_path / "data",
        {"demo": stub(), "gpu-like": stub("--startup-s", "30")},  # one ready, one still loading
        database={"uri": "embedded"},  # a server process of its own, to be stopped too
        engines={"health_interval": 0.05},
    )
    processes_before, tasks_before = _children(), asyncio.all_tasks()
    app = create_app(settings)
    gateway: Gateway = app.state.gateway
    with pytest.raises(Broken):
        async with LifespanManager(app, startup_timeout=60, shutdown_timeout=60):
            pass
    assert gateway.services is None
    left = await eventually(
        lambda: asyncio.sleep(0, _children() - processes_before), lambda pids: not pids, "no process left", 15
    )
    assert left == set()
    tasks = await eventually(
        lambda: asyncio.sleep(0, {t for t in asyncio.all_tasks() - tasks_before if not t.done()}),
        lambda pending: not pending,
        "no task left",
        10,
    )
    assert tasks == set()
    assert gateway.engine_client._session is None  # closed, not leaked (aiohttp warns otherwise)
