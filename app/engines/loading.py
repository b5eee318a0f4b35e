"""A load: spawn an engine's process, then poll its health until it answers, exits, or runs out
of its startup timeout.

Apart from the supervisor's state machine for the same reason as adoption and teardown: this
part does the I/O and reports an outcome (healthy, or why not, with the engine's last log
lines), and the supervisor alone turns that into a state.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

from app.clock import Clock
from app.engines import process as proc
from app.engines.commands import build_environment
from app.engines.lifecycle import EngineRecord
from app.engines.records import EngineRecords
from app.engines.teardown import Teardown
from app.engines.watch import health_url
from app.logs import event
from app.proxy.client import EngineClient
from app.settings import EngineDefaults

log = logging.getLogger("gateway.engines")


class Loader:
    def __init__(
        self,
        defaults: EngineDefaults,
        client: EngineClient,
        clock: Clock,
        records: EngineRecords,
        teardown: Teardown,
        log_path: Callable[[str], Path],
    ) -> None:
        self._defaults = defaults
        self._client = client
        self._clock = clock
        self._records = records
        self._teardown = teardown
        self._log_path = log_path

    def spawn(self, engine: EngineRecord, argv: list[str]) -> str | None:
        """Start the process (its log rotated first); None, or why it could not run."""
        log_path = self._log_path(engine.name)
        try:
            proc.rotate_log(log_path, self._defaults.log_max_bytes, self._defaults.log_backups)
            engine.process = proc.spawn(argv, build_environment(engine.settings, engine.gpus), log_path)
        except OSError as exc:
            return f"could not run {argv[0]}: {exc.strerror or exc}"
        event(log, "engine.starting", model=engine.name, pid=engine.pid, port=engine.port, gpus=engine.gpus)
        return None

    async def until_healthy(self, engine: EngineRecord, argv: list[str]) -> str | None:
        """Record the engine, then poll health until it answers (None), or the process exits or
        the startup timeout passes (the reason; what is left of the process is killed).

        The timeout counts from `started_at` by the injected clock, not from this call: a load
        adopted from a killed gateway gets only what is left of it. Health is polled at least
        once, so an adopted engine that finished loading while no gateway watched is taken.
        """
        assert engine.process is not None
        await self._records.remember(engine, argv)
        log_path = self._log_path(engine.name)
        timeout = engine.settings.startup_timeout or self._defaults.startup_timeout
        elapsed = (self._clock.now() - engine.started_at).total_seconds() if engine.started_at else 0.0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout - elapsed
        while True:
            code = engine.process.exit_code()
            if code is not None:
                tail = proc.log_tail(log_path, 5)
                await self._teardown.kill(engine)  # children it started may outlive it, holding the GPU
                return f"exited with code {code} while starting; log: {tail}"
            if await self._client.healthy(health_url(engine), timeout_s=1.0):
                return None
            if loop.time() >= deadline:
                break
            await asyncio.sleep(self._defaults.health_interval)
        await self._teardown.kill(engine)
        return f"not healthy within {timeout:g} s (startup_timeout); log: {proc.log_tail(log_path, 5)}"
