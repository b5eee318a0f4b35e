"""Engine lifecycle for the walking skeleton: start configured stub engines at boot, watch
them, restart them when they crash, stop them for sure at shutdown.

GPU kinds (vllm, deepseek_ocr) are reported as unavailable with the reason until the
supervisor with GPU placement lands; requests for them get a clear 503 instead of waiting.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from pymongo.asynchronous.collection import AsyncCollection

from app.clock import Clock
from app.engines import process as proc
from app.errors import ModelUnavailable
from app.logs import event
from app.proxy.client import EngineClient
from app.settings import EngineDefaults, ModelSettings
from app.store.embedded import free_port

log = logging.getLogger("gateway.engines")
Doc = dict[str, Any]
STARTABLE_KINDS = frozenset({"stub"})


class EngineState(StrEnum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    CRASHED = "crashed"
    FAILED = "failed"
    UNAVAILABLE = "unavailable"


@dataclass
class Engine:
    name: str
    settings: ModelSettings
    state: EngineState = EngineState.STOPPED
    reason: str = ""
    port: int = 0
    process: proc.SpawnedProcess | None = None
    started_at: datetime | None = None
    ready_at: datetime | None = None
    crashes: list[float] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def served_name(self) -> str:
        return self.settings.served_name or self.name


class EngineManager:
    def __init__(
        self,
        models: dict[str, ModelSettings],
        defaults: EngineDefaults,
        records: AsyncCollection[Doc],
        client: EngineClient,
        clock: Clock,
        log_dir: Path,
        max_crashes: int = 5,
        crash_window_s: float = 300.0,
    ) -> None:
        self.engines = {name: Engine(name, cfg) for name, cfg in models.items()}
        self._defaults = defaults
        self._records = records
        self._client = client
        self._clock = clock
        self._log_dir = log_dir
        self._host = socket.gethostname()
        self._max_crashes = max_crashes
        self._crash_window_s = crash_window_s
        self._listeners: list[Callable[[str], None]] = []
        self._watch_task: asyncio.Task[None] | None = None
        self._start_tasks: dict[str, asyncio.Task[None]] = {}
        for engine in self.engines.values():
            if engine.settings.kind not in STARTABLE_KINDS:
                engine.state = EngineState.UNAVAILABLE
                engine.reason = (
                    f"engine kind {engine.settings.kind!r} needs the GPU engine supervisor, "
                    "which this build does not have yet"
                )

    def on_ready(self, listener: Callable[[str], None]) -> None:
        self._listeners.append(listener)

    def get(self, name: str) -> Engine:
        return self.engines[name]

    def ready_url(self, name: str) -> str | None:
        engine = self.engines[name]
        return engine.base_url if engine.state == EngineState.READY else None

    def check_servable(self, name: str) -> None:
        """Admission asks this first: queued work for a model nobody will start would only time out."""
        engine = self.engines[name]
        if engine.state in (EngineState.UNAVAILABLE, EngineState.FAILED):
            raise ModelUnavailable(f"model {name!r} cannot be served now: {engine.reason}")
        if engine.state == EngineState.STOPPED:
            raise ModelUnavailable(f"model {name!r} is stopped")

    # -- lifecycle ---------------------------------------------------------------------------

    async def start_all(self) -> None:
        await self._kill_left_behind()
        names = [
            n for n, e in self.engines.items() if e.settings.autostart and e.settings.kind in STARTABLE_KINDS
        ]
        await asyncio.gather(*(self.start(name) for name in names))
        self._watch_task = asyncio.create_task(self._watch(), name="engine-watch")

    async def start(self, name: str) -> None:
        """Start the engine, or join the start already in progress."""
        engine = self.engines[name]
        if engine.state == EngineState.READY:
            return
        task = self._start_tasks.get(name)
        if task is None or task.done():
            task = asyncio.create_task(self._start(engine), name=f"engine-start:{name}")
            self._start_tasks[name] = task
        await asyncio.shield(task)

    async def _start(self, engine: Engine) -> None:
        engine.port = engine.settings.port or free_port()
        argv = proc.stub_command(engine.port, engine.served_name, engine.settings.args)
        engine.state, engine.reason = EngineState.STARTING, ""
        engine.started_at = self._clock.now()
        log_path = self._log_dir / f"{engine.name}.log"
        engine.process = proc.spawn(argv, engine.settings, log_path)
        await self._records.replace_one(
            {"_id": engine.name},
            {
                "_id": engine.name,
                "host": self._host,
                "pid": engine.process.pid,
                "create_time": engine.process.create_time,
                "port": engine.port,
                "argv": argv,
                "started_at": engine.started_at,
            },
            upsert=True,
        )
        event(log, "engine.starting", model=engine.name, pid=engine.process.pid, port=engine.port)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._defaults.startup_timeout
        while loop.time() < deadline:
            code = engine.process.exit_code()
            if code is not None:
                engine.state = EngineState.FAILED
                engine.reason = f"exited with code {code} while starting: {proc.log_tail(log_path, 5)}"
                event(log, "engine.failed", logging.ERROR, model=engine.name, code=code)
                return
            if await self._client.healthy(engine.base_url, timeout_s=1.0):
                engine.state = EngineState.READY
                engine.ready_at = self._clock.now()
                event(log, "engine.ready", model=engine.name, port=engine.port)
                for listener in self._listeners:
                    listener(engine.name)
                return
            await asyncio.sleep(self._defaults.health_interval)
        await asyncio.to_thread(proc.stop, engine.process, self._defaults.stop_timeout)
        engine.state = EngineState.FAILED
        engine.reason = f"not healthy within {self._defaults.startup_timeout:g} s"

    async def stop(self, name: str) -> None:
        engine = self.engines[name]
        if engine.process is not None:
            await asyncio.to_thread(proc.stop, engine.process, self._defaults.stop_timeout)
            event(log, "engine.stopped", model=name, pid=engine.process.pid)
            engine.process = None
            await self._records.delete_one({"_id": name, "host": self._host})
        if engine.state != EngineState.UNAVAILABLE:
            engine.state = EngineState.STOPPED

    async def stop_all(self) -> None:
        if self._watch_task is not None:
            self._watch_task.cancel()
            await asyncio.gather(self._watch_task, return_exceptions=True)
            self._watch_task = None
        for task in self._start_tasks.values():
            task.cancel()
        await asyncio.gather(*(self.stop(name) for name in self.engines), return_exceptions=True)

    async def _kill_left_behind(self) -> None:
        """Engines recorded by a gateway on this host that was killed: stop them, never leak them."""
        async for doc in self._records.find({"host": self._host}):
            if proc.is_same_process(int(doc["pid"]), float(doc["create_time"])):
                event(log, "engine.orphan_stopped", model=doc["_id"], pid=doc["pid"])
                left = proc.SpawnedProcess(int(doc["pid"]), float(doc["create_time"]), None)
                await asyncio.to_thread(proc.stop, left, self._defaults.stop_timeout)
            await self._records.delete_one({"_id": doc["_id"]})

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._defaults.health_interval)
            for engine in self.engines.values():
                self.check_process(engine.name)

    def check_process(self, name: str) -> None:
        """Notice at once that a ready engine's process exited (also called by the dispatcher
        when a call fails to connect, so a retry does not go to a dead engine)."""
        engine = self.engines[name]
        if engine.state != EngineState.READY or engine.process is None:
            return
        code = engine.process.exit_code()
        if code is not None:
            engine.state = EngineState.CRASHED
            self._start_tasks[engine.name] = asyncio.create_task(
                self._crashed(engine, code), name=f"engine-restart:{engine.name}"
            )

    async def _crashed(self, engine: Engine, code: int) -> None:
        now = self._clock.monotonic()
        engine.crashes = [t for t in engine.crashes if now - t < self._crash_window_s] + [now]
        engine.state = EngineState.CRASHED
        engine.reason = f"exited with code {code}"
        event(log, "engine.crashed", logging.ERROR, model=engine.name, code=code, crashes=len(engine.crashes))
        if len(engine.crashes) >= self._max_crashes:
            engine.state = EngineState.FAILED
            engine.reason = (
                f"crashed {len(engine.crashes)} times in {self._crash_window_s:g} s; last exit code {code}"
            )
            return
        backoff = min(30.0, 0.5 * 2 ** (len(engine.crashes) - 1))
        await asyncio.sleep(backoff)
        await self._start(engine)

    def summary(self) -> dict[str, Doc]:
        """Public view (unauthenticated /health): states only, no log lines or pids."""
        return {name: {"state": e.state.value, "kind": e.settings.kind} for name, e in self.engines.items()}
