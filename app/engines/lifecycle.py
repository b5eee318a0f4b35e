"""The engine lifecycle as data: states, the transitions allowed between them, and the record
the supervisor keeps per model.

Why a table: the supervisor is the one owner of transitions, and every transition goes through
`EngineRecord.move`, so an impossible jump (ready → starting without a stop or a crash) is a
bug found at once instead of a model stuck in a state nobody can leave.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

from app.engines.process import SpawnedProcess
from app.settings import ModelSettings


class EngineState(StrEnum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    CRASHED = "crashed"  # died while ready; a restart is scheduled
    FAILED = "failed"  # could not start, or crashed too often; an operator start clears it


_ALLOWED: dict[EngineState, frozenset[EngineState]] = {
    EngineState.STOPPED: frozenset({EngineState.STARTING, EngineState.FAILED}),
    EngineState.STARTING: frozenset({EngineState.READY, EngineState.FAILED, EngineState.STOPPING}),
    EngineState.READY: frozenset({EngineState.STOPPING, EngineState.CRASHED}),
    EngineState.STOPPING: frozenset({EngineState.STOPPED}),
    EngineState.CRASHED: frozenset({EngineState.STARTING, EngineState.FAILED, EngineState.STOPPING}),
    EngineState.FAILED: frozenset({EngineState.STARTING, EngineState.STOPPED}),
}


class IllegalTransition(RuntimeError):
    """A supervisor bug: the state machine does not allow this move."""


@dataclass
class EngineRecord:
    """What the supervisor knows about one configured model's engine."""

    name: str
    settings: ModelSettings
    state: EngineState = EngineState.STOPPED
    reason: str = ""  # why it is failed/crashed/stopped, shown to operators and in 503s
    port: int = 0
    gpus: list[int] = field(default_factory=list)
    process: SpawnedProcess | None = None
    adopted: bool = False
    started_at: datetime | None = None  # when the current load began
    ready_at: datetime | None = None
    load_seconds: float | None = None  # how long the last load took
    last_error: str | None = None
    placement_failed: bool = False  # the last start was refused by placement (503 insufficient_gpu)
    crashes: list[float] = field(default_factory=list)  # monotonic times, inside the window
    health_failures: int = 0
    # jobs whose calls failed to reach it while it was ready: if it turns out to have died, they
    # were running on it, even if they have left the dispatcher by the time the death is seen
    suspected_jobs: set[str] = field(default_factory=set)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def served_name(self) -> str:
        return self.settings.served_name or self.name

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def move(self, to: EngineState, reason: str = "") -> None:
        if to not in _ALLOWED[self.state]:
            raise IllegalTransition(f"engine {self.name!r}: {self.state.value} -> {to.value} is not allowed")
        self.state = to
        self.reason = reason
