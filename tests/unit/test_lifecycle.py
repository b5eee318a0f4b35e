"""The engine state machine: the moves the supervisor makes are allowed, the others are bugs;
and the restart policy after a crash (backoff, window, giving up)."""

from __future__ import annotations

import pytest

from app.engines.lifecycle import EngineRecord, EngineState, IllegalTransition, plan_restart, restart_backoff
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


def test_restart_backoff_doubles_per_crash_and_is_capped() -> None:
    waits = [restart_backoff(n, first_s=0.5, max_s=3.0) for n in range(1, 7)]
    assert waits == [0.5, 1.0, 2.0, 3.0, 3.0, 3.0]
    assert restart_backoff(1, first_s=0.0, max_s=3.0) == 0.0  # restart at once, if asked
    assert restart_backoff(100_000, first_s=0.5, max_s=30.0) == 30.0  # no float overflow


def _plan(crashes: list[float], now: float, max_crashes: int = 3) -> tuple[list[float], bool, float]:
    plan = plan_restart(
        crashes, now, window_s=60.0, max_crashes=max_crashes, first_backoff_s=0.5, max_backoff_s=1.5
    )
    return plan.crashes, plan.gave_up, plan.backoff_s


def test_crashes_inside_the_window_grow_the_wait_until_the_supervisor_gives_up() -> None:
    assert _plan([], 100.0) == ([100.0], False, 0.5)
    assert _plan([100.0], 110.0) == ([100.0, 110.0], False, 1.0)
    assert _plan([100.0, 110.0], 120.0) == ([100.0, 110.0, 120.0], True, 0.0)  # the 3rd in 60 s
    assert _plan([100.0, 110.0], 120.0, max_crashes=4) == ([100.0, 110.0, 120.0], False, 1.5)  # capped


def test_crashes_older_than_the_window_no_longer_count() -> None:
    # two old crashes: the new one is the first in the window, so a short wait and no give-up
    assert _plan([100.0, 110.0], 165.0) == ([110.0, 165.0], False, 1.0)
    assert _plan([100.0, 110.0], 500.0) == ([500.0], False, 0.5)


@pytest.mark.parametrize("to", [S.STARTING, S.STOPPED])
def test_a_give_up_lasts_only_as_long_as_the_failed_state_it_explains(to: EngineState) -> None:
    """A model stopped or started again after the supervisor gave up on it is not refused as
    given up later (the flag would outlive the `failed` it belongs to)."""
    record = _record(S.CRASHED)
    record.move(S.FAILED, "crashed 5 times in 300 s")
    record.gave_up = True
    record.move(to)
    assert record.gave_up is False
