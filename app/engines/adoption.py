"""Engines a killed gateway left running on this host: which to take over, which to kill.

Adopted: still the same process (pid and start time) and still configured with the same command
line; then one that was ready must answer health now, and one that was still loading is taken as
a load in progress (a vLLM load takes minutes; killing it would throw them away). Everything else
is an orphan holding memory: killed (its recorded process group, and every process marked with
its engine id, so a child that outlived a dead leader is killed too).

The review decides and kills orphans; the supervisor applies the adoptions, since it owns every
state change of its records.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Container, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from app.engines.commands import health_path
from app.engines.gpus import GpuInventory
from app.engines.lifecycle import EngineRecord, EngineState
from app.engines.process import SpawnedProcess
from app.engines.records import EngineRecords, recorded_process
from app.engines.teardown import Teardown
from app.errors import GatewayError
from app.proxy.client import EngineClient

Doc = dict[str, Any]
CommandOf = Callable[[EngineRecord, int, list[int]], list[str]]  # (engine, port, GPU sizes) -> argv


@dataclass(frozen=True)
class Adoption:
    """A recorded engine to take over as it is."""

    engine: EngineRecord
    process: SpawnedProcess
    port: int
    gpus: list[int]
    started_at: datetime | None
    argv: list[str]
    loading: bool  # still loading when its gateway died: watched as a load in progress


class AdoptionReview:
    def __init__(
        self,
        records: EngineRecords,
        teardown: Teardown,
        inventory: GpuInventory,
        client: EngineClient,
        command_of: CommandOf,
    ) -> None:
        self._records = records
        self._teardown = teardown
        self._inventory = inventory
        self._client = client
        self._command_of = command_of

    async def review(
        self, engines: Mapping[str, EngineRecord], not_spawned: Container[str]
    ) -> list[Adoption]:
        """The engines to adopt; every other recorded one is killed before this returns."""
        adoptions = []
        async for doc in self._records.left_here():
            name = str(doc["_id"])
            left = recorded_process(doc)
            engine = engines.get(name)
            loading = doc.get("state") == EngineState.STARTING.value
            refusal = await self._refusal(engine, doc, left, loading, not_spawned)
            if refusal is None and engine is not None:
                gpus = list(doc.get("gpus") or [])
                argv = list(doc["argv"])
                adoptions.append(
                    Adoption(engine, left, int(doc["port"]), gpus, doc.get("started_at"), argv, loading)
                )
                continue
            await self._teardown.kill_orphan(name, left, refusal or "")
        return adoptions

    async def _refusal(
        self,
        engine: EngineRecord | None,
        doc: Doc,
        left: SpawnedProcess,
        loading: bool,
        not_spawned: Container[str],
    ) -> str | None:
        if left.exit_code() is not None:  # not the same process any more, or a zombie nobody reaps
            return "process is gone"
        if engine is None:
            return "model is no longer configured"
        if engine.name in not_spawned:
            return "model is now an external upstream (kind openai)"
        sizes = {gpu.index: gpu.total_bytes for gpu in self._inventory.snapshot()}
        totals = [sizes[index] for index in doc.get("gpus") or [] if index in sizes]
        try:
            wanted = self._command_of(engine, int(doc["port"]), totals)
        except GatewayError as exc:
            return exc.message
        if wanted != doc.get("argv"):
            return "configuration changed since it was started"
        if loading:
            return None  # not healthy yet, as expected: the load watch polls its health
        url = f"http://127.0.0.1:{int(doc['port'])}{health_path(engine.settings.kind)}"
        for _ in range(3):  # a busy machine can be slow to answer; a hung engine never answers
            if await self._client.healthy(url, timeout_s=2.0):
                return None
            await asyncio.sleep(0.5)
        return "not healthy"
