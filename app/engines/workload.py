"""What the supervisor needs to know about a model's requests, as a port: the dispatchers
implement it (app/dispatch/workload.py), so the engines package never imports the queue."""

from __future__ import annotations

from typing import Protocol


class Workload(Protocol):
    def running(self, model: str) -> list[str]: ...

    async def queued(self, model: str) -> int: ...

    async def cancel_all(self, model: str, reason: str) -> int: ...

    async def drain(self, model: str, grace_s: float) -> int: ...


class NoWorkload:
    """Before the dispatchers are attached (and in tests of the supervisor alone)."""

    def running(self, model: str) -> list[str]:
        return []

    async def queued(self, model: str) -> int:
        return 0

    async def cancel_all(self, model: str, reason: str) -> int:
        return 0

    async def drain(self, model: str, grace_s: float) -> int:
        return 0
