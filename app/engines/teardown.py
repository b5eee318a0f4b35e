"""Stopping an engine for sure: the process tree, then proof that it is gone (its port closed,
its GPU memory released), then its record.

Apart from the supervisor's state machine because "stopped" must mean "nothing left": every way
an engine ends (an admin stop, a crash, a hang, a failed load, an orphan found at start, the
gateway's shutdown) goes through this one path, so none of them can leave a process or GPU
memory behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from app.engines import process as proc
from app.engines.gpus import GpuInventory, memory_released
from app.engines.lifecycle import EngineRecord
from app.engines.records import EngineRecords
from app.logs import event
from app.settings import EngineDefaults

log = logging.getLogger("gateway.engines")
Doc = dict[str, Any]


class Teardown:
    def __init__(self, defaults: EngineDefaults, inventory: GpuInventory, records: EngineRecords) -> None:
        self._defaults = defaults
        self._inventory = inventory
        self._records = records

    async def kill(self, engine: EngineRecord) -> Doc:
        """Stop the process tree for sure, then confirm the port closed and GPU memory freed."""
        process, engine.process = engine.process, None
        confirmed: Doc = {"pid": process.pid if process else None}
        if process is not None:
            pids = await asyncio.to_thread(proc.stop, process, self._defaults.stop_timeout)
            event(log, "engine.stopped", model=engine.name, pid=process.pid)
            confirmed["port_closed"] = await port_closed(engine.port)
            if engine.gpus and self._inventory.available:
                released = await self._gpu_released(engine.gpus, pids or [process.pid])
                confirmed["gpu_memory_released"] = released
                if not released:
                    engine.last_error = (
                        f"GPU memory on GPU(s) {engine.gpus} still held by pids {pids} "
                        f"{self._defaults.gpu_release_timeout:g} s after the stop"
                    )
                    event(log, "engine.gpu_not_released", logging.ERROR, model=engine.name, pids=pids)
        await self._records.forget(engine.name)
        engine.gpus = []
        return confirmed

    async def kill_orphan(self, name: str, left: proc.SpawnedProcess, reason: str) -> None:
        """An engine a killed gateway left that is not adopted: its recorded group and every
        process marked with its engine id, then its record."""
        pids = await asyncio.to_thread(proc.stop, left, self._defaults.stop_timeout)
        if pids:  # the leader, or what survived it
            event(
                log,
                "engine.orphan_stopped",
                logging.WARNING,
                model=name,
                pid=left.pid,
                pids=pids,
                reason=reason,
            )
        await self._records.forget(name)

    async def _gpu_released(self, gpus: list[int], pids: list[int]) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._defaults.gpu_release_timeout
        while True:
            if await asyncio.to_thread(memory_released, self._inventory, gpus, pids):
                return True
            if loop.time() > deadline:
                return False
            await asyncio.sleep(0.5)


async def port_closed(port: int, timeout_s: float = 5.0) -> bool:
    """Nothing accepts connections on 127.0.0.1:`port` any more (within `timeout_s`)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 1.0)
        except (OSError, TimeoutError):
            return True
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.1)
