"""The engine lifecycle as data: states, the transitions allowed between them, and the record
the supervisor keeps per model.

Why a table: the supervisor is the one owner of transitions, and every transition goes through
`EngineRecord.move`, so an impossible jump (ready → starting without a stop or a crash) is a
bug found at once instead of a model stuck in a state nobody can leave.
"""

from __future__ import annotations

from collections.abc import Callable
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
    # an external upstream (kind openai) that does not answer its health check; it comes back by
    # itself when it answers again (the gateway never runs such an engine, so it never crashes)
    UNAVAILABLE = "unavailable"


_ALLOWED: dict[EngineState, frozenset[EngineState]] = {
    EngineState.STOPPED: frozenset({EngineState.STARTING, EngineState.FAILED}),
    EngineState.STARTING: frozenset(
        {EngineState.READY, EngineState.FAILED, EngineState.STOPPING, EngineState.UNAVAILABLE}
    ),
    EngineState.READY: frozenset({EngineState.STOPPING, EngineState.CRASHED, EngineState.UNAVAILABLE}),
    EngineState.STOPPING: frozenset({EngineState.STOPPED}),
    EngineState.CRASHED: frozenset({EngineState.STARTING, EngineState.FAILED, EngineState.STOPPING}),
    EngineState.FAILED: frozenset({EngineState.STARTING, EngineState.STOPPED}),
    EngineState.UNAVAILABLE: frozenset({EngineState.READY}),
}


@dataclass(frozen=True)
class RestartPlan:
    """What to do after a crash: the crash times that still count, and give up or wait."""

    crashes: list[float]  # monotonic times inside the window, the new crash last
    gave_up: bool
    backoff_s: float  # how long to wait before the restart (0 when it gave up)


def plan_restart(
    crashes: list[float],
    now: float,
    *,
    window_s: float,
    max_crashes: int,
    first_backoff_s: float,
    max_backoff_s: float,
) -> RestartPlan:
    """Decide the restart after a crash at `now` (pure, so the policy is unit-tested).

    Only crashes inside the window count: an engine that crashes once a day is restarted every
    time, one that crash-loops is given up on after `max_crashes` (then it is `failed`, and the
    GPU is no longer held by a process that cannot stay up). The wait doubles with each counted
    crash, so a loop does not hammer a GPU or a disk, and is capped so a long-lived engine with
    a few old crashes still comes back quickly.
    """
    recent = [t for t in crashes if now - t < window_s] + [now]
    if len(recent) >= max_crashes:
        return RestartPlan(recent, gave_up=True, backoff_s=0.0)
    return RestartPlan(
        recent, gave_up=False, backoff_s=restart_backoff(len(recent), first_backoff_s, max_backoff_s)
    )


def restart_backoff(crash_count: int, first_s: float, max_s: float) -> float:
    """first_s, 2 x first_s, 4 x first_s, ... for the 1st, 2nd, 3rd ... crash, at most max_s.

    The exponent is bounded so a large `max_crashes` cannot overflow the float.
    """
    return min(max_s, first_s * 2.0 ** min(crash_count - 1, 1000))


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
    # failed because the supervisor gave up after too many crashes: only an operator's start
    # runs it again (traffic must not restart a crash loop); any state change clears it
    gave_up: bool = False
    health_failures: int = 0
    # jobs whose calls failed to reach it while it was ready: if it turns out to have died, they
    # were running on it, even if they have left the dispatcher by the time the death is seen
    suspected_jobs: set[str] = field(default_factory=set)
    # sent with every call to it: an external upstream's API key (kind openai), never logged
    auth_headers: dict[str, str] = field(default_factory=dict, repr=False)
    last_check_at: datetime | None = None  # external upstreams: the last health check's time
    # told of every state change (record, before, after): the supervisor's log and metrics
    listeners: list[Callable[[EngineRecord, EngineState, EngineState], None]] = field(
        default_factory=list, repr=False
    )

    @property
    def base_url(self) -> str:
        """An external upstream's configured URL; a spawned engine listens on 127.0.0.1."""
        return self.settings.url or f"http://127.0.0.1:{self.port}"

    @property
    def served_name(self) -> str:
        return self.settings.served_name or self.name

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def begin_load(self, now: datetime, port: int, gpus: list[int], *, adopted: bool = False) -> None:
        """A load begins (spawned here, or adopted from a killed gateway): fields of the last
        run are reset together, so no view mixes two runs."""
        self.move(EngineState.STARTING)
        self.port, self.gpus, self.adopted = port, gpus, adopted
        self.started_at, self.ready_at, self.load_seconds = now, None, None
        self.placement_failed = False

    def became_ready(self, now: datetime) -> None:
        """Ready: the load's time is set before the move, so listeners of the move see it."""
        self.check(EngineState.READY)
        self.ready_at = now
        self.health_failures = 0
        self.suspected_jobs.clear()
        if self.started_at is not None:
            self.load_seconds = round((now - self.started_at).total_seconds(), 3)
        self.move(EngineState.READY)

    def give_up(self, verdict: str) -> None:
        """Failed too often inside the window: only an operator's start runs it again."""
        if self.state != EngineState.FAILED:
            self.move(EngineState.FAILED, verdict)
        self.reason = self.last_error = verdict
        self.gave_up = True

    def loading_seconds(self, now: datetime) -> float | None:
        """While starting: how long the load has taken so far (shown to operators)."""
        if self.state != EngineState.STARTING or self.started_at is None:
            return None
        return round((now - self.started_at).total_seconds(), 1)

    def check(self, to: EngineState) -> None:
        if to not in _ALLOWED[self.state]:
            raise IllegalTransition(f"engine {self.name!r}: {self.state.value} -> {to.value} is not allowed")

    def move(self, to: EngineState, reason: str = "") -> None:
        """The one way a state changes; every listener hears of it (logs, metrics)."""
        self.check(to)
        before, self.state = self.state, to
        self.reason = reason
        self.gave_up = False
        for listener in self.listeners:
            listener(self, before, to)
