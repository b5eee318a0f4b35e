"""The rule of the system we re-implement (auto-switch mode `threshold`; pure: no I/O, no clock).

Over the last `window_days`, the single model with the most requests is loaded when it has at
least `min_requests` and at least `min_share` of all requests, evicting the least used idle
models to make room.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime

from app.autoswitch.decisions import DecisionBuilder, hms, index_models, not_startable, unstoppable
from app.autoswitch.forecast import forecast_demand, utc
from app.autoswitch.inputs import LOADED, Action, Capacity, Decision, ModelView, PolicyConfig, Usage


def threshold_policy(
    config: PolicyConfig,
    usage: Usage,
    models: Sequence[ModelView],
    capacity: Capacity,
    now: datetime,
    *,
    missing: Mapping[str, int] | None = None,
) -> Decision:
    """The old rule: load the top model by share over the window if it passes both thresholds."""
    now = utc(now)
    views = index_models(models)
    forecasts = forecast_demand(config, usage, now, missing=missing, models=models)
    out = DecisionBuilder(config, now, "threshold", models, capacity, tuple(forecasts.values()))
    if out.blocked_by_stopping():
        return out.build()
    total = sum(f.window_requests for f in forecasts.values())
    days = f"{config.window_days:g} days"
    if total == 0:
        out.note(f"no requests in the last {days}")
        return out.build()
    top = min(forecasts.values(), key=lambda f: (-f.window_requests, f.model))
    if top.window_requests < config.min_requests:
        out.note(
            f"top model {top.model} has {top.window_requests} requests in {days} "
            f"(needs {config.min_requests})"
        )
        return out.build()
    if top.share < config.min_share:
        out.note(f"top model {top.model} has {top.share:.0%} of requests (needs {config.min_share:.0%})")
        return out.build()
    view = views.get(top.model)
    why_not = not_startable(view, top.model, capacity)
    if view is None or why_not:
        out.note(why_not)
        return out.build()
    if view.state in LOADED:
        out.note(f"top model {top.model} ({top.share:.0%} of {total} requests) is already {view.state}")
        return out.build()
    reason = f"top model: {top.share:.0%} of {total} requests in {days}"
    start = Action("start", top.model, reason)
    if out.cooldown_until is not None:
        out.defer(Action("start", top.model, f"{reason}; cooldown until {hms(out.cooldown_until)}"))
        return out.build()
    need = view.cost - (capacity.budget - out.used)
    stops: list[Action] = []
    held: list[str] = []
    victims = sorted(
        (m for m in models if m.state in LOADED and m.name != top.model),
        key=lambda m: (forecasts[m.name].window_requests if m.name in forecasts else 0, m.name),
    )
    for victim in victims:
        if need <= 0:
            break
        why = unstoppable(victim)
        if why:
            held.append(f"{victim.name} {why}")
            continue
        stops.append(Action("stop", victim.name, f"make room for {top.model} ({reason})"))
        need -= victim.cost
    if need > 0:
        waiting = "; ".join(held) or "nothing else can be stopped"
        out.defer(Action("start", top.model, f"{reason}; waiting for idle: {waiting}"))
        for stop in stops:
            out.defer(Action("stop", stop.model, f"waiting with the start of {top.model}: {waiting}"))
        return out.build()
    for action in [*stops, start]:
        out.act(action)
    return out.build()
