"""What a request for a model gets from the model's engine state (pure: no I/O).

Admission asks this first: queue for a model that is (or will be) loading, else a 503 that says
why. Kept apart from the supervisor so the whole table is read in one place and unit-tested.
"""

from __future__ import annotations

from typing import Literal

from app.engines.lifecycle import EngineRecord, EngineState
from app.errors import ModelUnavailable, PlacementFailed


def admission(engine: EngineRecord) -> Literal["admit", "start"]:
    """`admit`: queue it (ready, loading, or restarting after a crash); `start`: a stopped or
    failed `on_demand` model, started by this request (placement runs then, so a model that
    cannot fit is refused at once instead of timing out in the queue). Otherwise raises the 503.

    Not a model the supervisor gave up on after too many crashes: traffic must not restart a
    crash loop forever, so that waits for an operator's start.
    """
    name = engine.name
    if engine.state in (EngineState.READY, EngineState.STARTING, EngineState.CRASHED):
        return "admit"
    if engine.state == EngineState.STOPPING:
        raise ModelUnavailable(f"model {name!r} is stopping")
    if engine.gave_up:
        raise given_up(engine)
    if engine.settings.on_demand:
        return "start"
    if engine.state == EngineState.FAILED:
        if engine.placement_failed:  # its reason names the model, the GPUs and who holds them
            raise PlacementFailed(name, engine.reason)
        raise ModelUnavailable(f"model {name!r} cannot be served now: {engine.reason}")
    raise ModelUnavailable(
        f"model {name!r} is stopped; an admin can start it (POST /admin/models/{name}/start)"
    )


def given_up(engine: EngineRecord) -> ModelUnavailable:
    """The 503 for a model the supervisor gave up on: the crash verdict, and the way out."""
    return ModelUnavailable(
        f"model {engine.name!r} cannot be served now: {engine.reason}; an admin can start it "
        f"again (POST /admin/models/{engine.name}/start)"
    )
