"""Building a Decision: the actions, the deferred ones and a reason for every model, shared by
both policies (pure: no I/O, no clock), with the wording of the reasons operators read."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

from app.autoswitch.forecast import utc
from app.autoswitch.inputs import (
    HOLDS_GPU,
    Action,
    Capacity,
    Decision,
    Forecast,
    Mode,
    ModelView,
    PolicyConfig,
)


class DecisionBuilder:
    """Collects a decision's parts; `used`, `cooldown_until` and `loaded` are fixed at entry."""

    def __init__(
        self,
        config: PolicyConfig,
        now: datetime,
        mode: Mode,
        models: Sequence[ModelView],
        capacity: Capacity,
        forecasts: tuple[Forecast, ...],
    ) -> None:
        index_models(models)
        self.now, self.mode, self.models, self.capacity = now, mode, models, capacity
        self.forecasts = forecasts
        self.used = sum(m.cost for m in models if m.state in HOLDS_GPU)
        switches = [utc(m.last_switch) for m in models if m.last_switch is not None]
        until = max(switches) + timedelta(seconds=config.cooldown_s) if switches else None
        self.cooldown_until = until if until is not None and until > now else None
        self.actions: list[Action] = []
        self.deferred: list[Action] = []
        self.notes: list[str] = []

    def act(self, action: Action) -> None:
        self.actions.append(action)
        if action.kind == "start":
            self.used += next(m.cost for m in self.models if m.name == action.model)

    def defer(self, action: Action) -> None:
        self.deferred.append(action)

    def note(self, text: str) -> None:
        if text:
            self.notes.append(text)

    def blocked_by_stopping(self) -> bool:
        stopping = sorted(m.name for m in self.models if m.state == "stopping")
        if stopping:
            self.note(f"waiting for {', '.join(stopping)} to stop before deciding")
        return bool(stopping)

    def build(self) -> Decision:
        loaded = tuple(sorted(m.name for m in self.models if m.state in HOLDS_GPU))
        target = set(loaded)
        for action in self.actions:
            if action.kind == "stop":
                target.discard(action.model)
            else:
                target.add(action.model)
        self.actions.sort(key=lambda a: 0 if a.kind == "stop" else 1)  # stable: stops first
        return Decision(
            at=self.now,
            mode=self.mode,
            actions=tuple(self.actions),
            deferred=tuple(self.deferred),
            notes=tuple(self.notes),
            forecasts=self.forecasts,
            loaded=loaded,
            target=tuple(sorted(target)),
            budget=self.capacity.budget,
            used=sum(m.cost for m in self.models if m.state in HOLDS_GPU),
            cooldown_until=self.cooldown_until,
        )


def index_models(models: Sequence[ModelView]) -> dict[str, ModelView]:
    views: dict[str, ModelView] = {}
    for model in models:
        if model.name in views:
            raise ValueError(f"model {model.name!r} is listed twice")
        views[model.name] = model
    return views


def unstoppable(model: ModelView) -> str:
    """Why auto-switch may not stop this loaded model now ("" when it may)."""
    if not model.eligible:
        return "is not managed by auto-switch"
    if model.busy > 0:
        return f"busy ({model.busy} job{'s' if model.busy != 1 else ''})"
    if model.state == "starting":
        return "is loading"
    return ""


def not_startable(view: ModelView | None, name: str, capacity: Capacity) -> str:
    if view is None:
        return f"top model {name} is not configured here"
    if not view.eligible:
        return f"top model {name} is not managed by auto-switch"
    if view.state == "failed":
        return f"top model {name} is failed: an operator start clears it (auto-switch will not)"
    if view.cost > capacity.budget:
        return f"top model {name} never fits: needs {view.cost}, the budget is {capacity.budget}"
    return ""


def hms(moment: datetime) -> str:
    return moment.strftime("%H:%M:%S")


def span(seconds: float) -> str:
    return f"{seconds / 60:g} min" if seconds < 3600 else f"{seconds / 3600:g} h"
