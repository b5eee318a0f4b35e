"""The engine state machine: the moves the supervisor makes are allowed, the others are bugs."""

from __future__ import annotations

import pytest

from app.engines.lifecycle import EngineRecord, EngineState, IllegalTransition
from app.settings import ModelSettings

S = EngineState


def _record(state: EngineState) -> EngineRecord:
    record = EngineRecord("m", ModelSettings(kind="stub"))
    record.state = state
    return record


@pytest.mark.parametrize(
    "path",
    [
        [S.STARTING, S.READY, S.STOPPING, S.STOPPED],  # normal life
        [S.STARTING, S.FAILED, S.STARTING, S.READY],  # operator retries a failed start
        [S.STARTING, S.READY, S.CRASHED, S.STARTING, S.READY],  # crash and restart
        [S.STARTING, S.READY, S.CRASHED, S.FAILED, S.STOPPED],  # gave up, then stopped
        [S.STARTING, S.STOPPING, S.STOPPED],  # stop during a load
        [S.STARTING, S.READY, S.CRASHED, S.STOPPING, S.STOPPED],  # stop during the backoff
    ],
)
def test_lives_the_supervisor_leads(path: list[EngineState]) -> None:
    record = _record(S.STOPPED)
    for state in path:
        record.move(state, f"to {state.value}")
    assert record.state == path[-1] and record.reason == f"to {path[-1].value}"


@pytest.mark.parametrize(
    ("start", "to"),
    [
        (S.STOPPED, S.READY),  # ready without a load
        (S.READY, S.STARTING),  # a second load of a running engine
        (S.STOPPING, S.READY),  # back to work while stopping
        (S.STOPPED, S.CRASHED),  # nothing runs that could crash
        (S.FAILED, S.READY),
    ],
)
def test_impossible_moves_are_refused(start: EngineState, to: EngineState) -> None:
    record = _record(start)
    with pytest.raises(IllegalTransition, match=f"{start.value} -> {to.value}"):
        record.move(to)
    assert record.state == start
