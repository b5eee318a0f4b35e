"""The supervisor's watch over running engines: process exits at once (every `health_interval`),
HTTP health every `health_check_interval` for hangs, and log rotation while engines run.

A loop of its own (start/stop like every background loop) that only observes: what it finds goes
back to the supervisor through two calls, `check_process` (has this engine's process exited?)
and `hung` (it stopped answering health), because only the supervisor changes engine states.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from pathlib import Path

from app.engines import process as proc
from app.engines.commands import health_path
from app.engines.lifecycle import EngineRecord, EngineState
from app.logs import event
from app.proxy.client import EngineClient
from app.settings import EngineDefaults
from app.tasks import cancel_and_wait

log = logging.getLogger("gateway.engines")


def health_url(engine: EngineRecord) -> str:
    """The kind's health endpoint, or the model's own `health_path` (external upstreams)."""
    return engine.base_url + (engine.settings.health_path or health_path(engine.settings.kind))


class EngineWatch:
    def __init__(
        self,
        engines: Mapping[str, EngineRecord],
        defaults: EngineDefaults,
        client: EngineClient,
        log_path: Callable[[str], Path],
        check_process: Callable[[str], None],
        hung: Callable[[EngineRecord, str], None],
    ) -> None:
        self._engines = engines
        self._defaults = defaults
        self._client = client
        self._log_path = log_path
        self._check_process = check_process
        self._hung = hung
        self._task: asyncio.Task[None] | None = None
        self._last_health_round = 0.0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="engine-watch")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self._defaults.health_interval)
            for name in self._engines:
                self._check_process(name)
            if loop.time() - self._last_health_round >= self._defaults.health_check_interval:
                self._last_health_round = loop.time()
                ready = [
                    e
                    for e in self._engines.values()
                    if e.state == EngineState.READY and e.process is not None
                ]
                await asyncio.gather(*(self._check_health(e) for e in ready))
                await self._rotate_logs()

    async def _rotate_logs(self) -> None:
        """Engines that run for weeks write without end (vLLM logs every few seconds): their logs
        are cut while they run, not only at a restart."""
        for engine in self._engines.values():
            if engine.process is None:
                continue
            path = self._log_path(engine.name)
            limit, backups = self._defaults.log_max_bytes, self._defaults.log_backups
            try:
                if await asyncio.to_thread(proc.rotate_log, path, limit, backups, running=True):
                    event(log, "engine.log_rotated", model=engine.name, path=str(path))
            except OSError as exc:  # a full disk must not stop the watch loop
                event(log, "engine.log_rotate_failed", logging.WARNING, model=engine.name, error=repr(exc))

    async def _check_health(self, engine: EngineRecord) -> None:
        healthy = await self._client.healthy(
            health_url(engine), timeout_s=self._defaults.health_check_timeout
        )
        if engine.state != EngineState.READY:
            return
        if healthy:
            engine.health_failures = 0
            return
        engine.health_failures += 1
        event(log, "engine.unhealthy", logging.WARNING, model=engine.name, failures=engine.health_failures)
        if engine.health_failures >= self._defaults.health_check_failures:
            self._hung(engine, f"health check failed {engine.health_failures} times in a row (hung)")
