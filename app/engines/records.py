"""What a restarted gateway needs to adopt or kill the engines a killed one left: one document per
spawned engine in `engines`, keyed by model, scoped to this host.

Apart from the supervisor because it is the supervisor's only database I/O, and because what it
stores (pid, process start time, process group, engine id, argv) is exactly what adoption
compares: keeping the writer and the reader of those fields side by side keeps them in step.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator
from typing import Any

from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import PyMongoError

from app.engines.lifecycle import EngineRecord, EngineState
from app.engines.process import SpawnedProcess
from app.logs import event

log = logging.getLogger("gateway.engines")
Doc = dict[str, Any]


class EngineRecords:
    def __init__(self, collection: AsyncCollection[Doc], host: str | None = None) -> None:
        self._collection = collection
        self.host = host or socket.gethostname()

    async def remember(self, engine: EngineRecord, argv: list[str]) -> None:
        """Persist what a restarted gateway needs to adopt this engine or kill it.

        Written as soon as the process exists (state `starting`), not once it is healthy: a
        vLLM load takes minutes, and a gateway killed during it must leave a record, or the
        next one would never know of an engine that goes on to hold the GPU.
        """
        assert engine.process is not None
        await self._collection.replace_one(
            {"_id": engine.name},
            {
                "_id": engine.name,
                "host": self.host,
                "state": EngineState.STARTING.value,
                "pid": engine.process.pid,
                "pgid": engine.process.pgid,
                "create_time": engine.process.create_time,
                "engine_id": engine.process.engine_id,  # finds children that outlive the leader
                "port": engine.port,
                "gpus": engine.gpus,
                "argv": argv,
                "kind": engine.settings.kind,
                "started_at": engine.started_at,
            },
            upsert=True,
        )

    async def remember_ready(self, engine: EngineRecord) -> None:
        """Mark the record ready (for the adoption log and operators reading the collection).

        The engine serves whether or not this lands, and adoption checks health itself, so a
        database error here is logged, not raised into the load.
        """
        try:
            await self._collection.update_one(
                {"_id": engine.name, "host": self.host, "pid": engine.pid},
                {"$set": {"state": EngineState.READY.value}},
            )
        except PyMongoError as exc:
            event(log, "engine.record_failed", logging.WARNING, model=engine.name, error=repr(exc))

    async def forget(self, name: str) -> None:
        await self._collection.delete_one({"_id": name, "host": self.host})

    async def left_here(self) -> AsyncIterator[Doc]:
        """The records of engines on this host (only a gateway that did not stop them leaves any)."""
        async for doc in self._collection.find({"host": self.host}):
            yield doc


def recorded_process(doc: Doc) -> SpawnedProcess:
    """The process a record describes (records written before pgid was stored: the engine led
    its own group)."""
    pgid = int(doc["pgid"] if "pgid" in doc else doc["pid"])
    return SpawnedProcess(
        int(doc["pid"]), float(doc["create_time"]), pgid, None, str(doc.get("engine_id") or "")
    )
