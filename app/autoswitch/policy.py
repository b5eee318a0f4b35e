"""The auto-switch policy: which models to start and stop next, and why (pure: no I/O, no clock).

Inputs are plain values the switcher gathers (usage per model and hour from the history, the
supervisor's engine states and busy counts, the GPU budget, `now`); the output is a `Decision`
with the actions to apply in order (stops first, then starts) and a reason for every action,
every deferred action and every model kept. Two policies share those inputs:

- `threshold_policy`: the rule of the system we re-implement. Over the last `window_days`,
  the single model with the most requests is loaded when it has at least `min_requests` and
  at least `min_share` of all requests, evicting the least used idle models to make room.
- `forecast_policy` (ours): per model, the requests expected in the next `horizon_s`, a blend
  of the hour-of-week / hour-of-day pattern and the recent rate; the set of models that fits
  the budget and serves the most expected requests is chosen (exact subset search for up to
  `exact_limit` candidates), and a switch that evicts something happens only when its gain,
  net of the requests lost while the new model loads, beats the evicted models' value by the
  hysteresis margin.

Both: a model with jobs running or waiting is never stopped (the switch waits until it is idle
and says so), at most one switch per `cooldown_s` (threshold: any start; forecast: a start that
needs a stop, since a start into free room evicts nobody and cannot flap), nothing is decided
while an engine is stopping, and a model that is loading is never evicted.

Units: `ModelView.cost` and `Capacity.budget` are in the same unit, bytes of GPU memory (sum
of `placement.required_bytes` over the GPUs the model takes) or unitless slots. Capacity is a
single budget: GPU fragmentation across several cards is placement's concern, which still
refuses a start that cannot fit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import datetime

from app.autoswitch.decisions import DecisionBuilder, hms, span, unstoppable
from app.autoswitch.forecast import forecast_demand, utc
from app.autoswitch.inputs import (
    EPS,
    HOLDS_GPU,
    LOADED,
    Action,
    Capacity,
    Decision,
    Forecast,
    ModelView,
    PolicyConfig,
    Usage,
)
from app.autoswitch.threshold import threshold_policy

# -- entry points ----------------------------------------------------------------------------


def decide(
    config: PolicyConfig,
    usage: Usage,
    models: Sequence[ModelView],
    capacity: Capacity,
    now: datetime,
    *,
    missing: Mapping[str, int] | None = None,
) -> Decision:
    """The policy `config.mode` names. `missing` counts recent requests for configured models
    that were refused because the model was not loaded (requests that left no job in the
    history; jobs that wait for the model belong in `ModelView.busy` instead)."""
    policy = forecast_policy if config.mode == "forecast" else threshold_policy
    return policy(config, usage, models, capacity, now, missing=missing)


def forecast_policy(
    config: PolicyConfig,
    usage: Usage,
    models: Sequence[ModelView],
    capacity: Capacity,
    now: datetime,
    *,
    missing: Mapping[str, int] | None = None,
) -> Decision:
    """Fill the budget with the models expected to serve the most requests next (see module)."""
    forecasts = forecast_demand(config, usage, now, missing=missing, models=models)
    demand = {name: f.expected for name, f in forecasts.items()}
    return plan(config, demand, models, capacity, now, forecasts=tuple(forecasts.values()))


def plan(
    config: PolicyConfig,
    demand: Mapping[str, float],
    models: Sequence[ModelView],
    capacity: Capacity,
    now: datetime,
    *,
    forecasts: tuple[Forecast, ...] = (),
) -> Decision:
    """The forecast policy's optimiser, given expected requests over `horizon_s` per model.

    Exposed so that a simulation can feed it the true future (an oracle) or other forecasts.
    """
    now = utc(now)
    out = DecisionBuilder(config, now, "forecast", models, capacity, forecasts)
    if out.blocked_by_stopping():
        return out.build()
    for model in models:
        if model.eligible and model.state == "failed" and demand.get(model.name, 0) > EPS:
            out.note(f"{model.name} is failed: an operator start clears it (auto-switch will not)")
        elif model.eligible and model.state == "stopped" and model.cost > capacity.budget:
            out.note(f"{model.name} never fits: needs {model.cost}, the budget is {capacity.budget}")

    current = [m for m in models if m.state in LOADED and m.eligible]  # ours to keep or stop
    fixed = [m for m in models if m.state in HOLDS_GPU and not (m.eligible and m.state in LOADED)]
    pinned = [m for m in current if unstoppable(m)]
    movable = [m for m in current if not unstoppable(m)]
    startable = [
        m
        for m in models
        if m.eligible
        and m.state == "stopped"
        and m.cost <= capacity.budget
        and (demand.get(m.name, 0) > EPS or m.busy > 0)
    ]
    room = capacity.budget - sum(m.cost for m in fixed) - sum(m.cost for m in pinned)
    values = {m.name: _value(config, m, demand) for m in models}
    chosen = _fill(config, movable + startable, room, values, current)
    starts = sorted((m for m in startable if m.name in chosen), key=lambda m: m.name)
    stops = sorted((m for m in movable if m.name not in chosen), key=lambda m: m.name)

    blocked = _busy_blocked(config, pinned, movable, startable, fixed, capacity, values, current)
    for model in pinned:
        out.note(f"kept {model.name}: {unstoppable(model)}")

    if starts and not stops:
        _free_starts(config, out, starts, capacity, values, demand)
    elif starts:
        gain_in = sum(values[m.name] for m in starts)
        gain_out = sum(values[m.name] for m in stops)
        margin = max(config.min_gain, config.hysteresis * gain_out)
        names_in = ", ".join(m.name for m in starts)
        names_out = ", ".join(m.name for m in stops)
        if gain_in - gain_out < margin:
            out.note(
                f"kept {names_out}: starting {names_in} would gain {gain_in - gain_out:.1f} expected "
                f"requests, under the margin {margin:.1f}"
            )
            _free_starts(config, out, startable, capacity, values, demand)
        elif out.cooldown_until is not None:
            until = hms(out.cooldown_until)
            for model in stops:
                out.defer(Action("stop", model.name, f"to make room for {names_in}; cooldown until {until}"))
            for model in starts:
                why = _start_reason(config, model, values, demand, f"instead of {names_out}")
                out.defer(Action("start", model.name, f"{why}; cooldown until {until}"))
            _free_starts(config, out, startable, capacity, values, demand)
        else:
            for model in stops:
                out.act(
                    Action(
                        "stop",
                        model.name,
                        f"make room for {names_in}: expects {values[model.name]:.1f} vs "
                        f"{gain_in:.1f} requests in the next {span(config.horizon_s)}",
                    )
                )
            for model in starts:
                why = _start_reason(config, model, values, demand, f"instead of {names_out}")
                out.act(Action("start", model.name, why))
    if blocked is not None:
        busy = "; ".join(f"{m.name} {unstoppable(m)}" for m in blocked[0])
        handled = {a.model for a in out.actions} | {a.model for a in out.deferred}
        for model in blocked[1]:
            if model.name not in handled:
                why = _start_reason(config, model, values, demand, "best set")
                out.defer(Action("start", model.name, f"{why}; waiting for idle: {busy}"))
    if not out.actions and not out.deferred:
        kept = ", ".join(f"{m.name} ({values[m.name]:.1f})" for m in current)
        if not any(values[m.name] > EPS for m in current + startable):
            out.note("no demand expected: nothing to change")
        elif kept:
            out.note(f"kept {kept}: the best set that fits ({span(config.horizon_s)} ahead)")
    return out.build()


# -- optimiser -------------------------------------------------------------------------------


def _value(config: PolicyConfig, model: ModelView, demand: Mapping[str, float]) -> float:
    """Expected requests the model serves from the GPU over the horizon if the set holds it:
    all of them when it is loaded; when it must load first, those after the load, plus the
    jobs already waiting for it."""
    expected = max(0.0, demand.get(model.name, 0.0))
    if model.state in LOADED:
        return expected
    load = config.default_load_s if model.load_seconds is None else model.load_seconds
    after_load = max(0.0, config.horizon_s - load) / config.horizon_s
    return expected * after_load + config.waiting_weight * model.busy


def _fill(
    config: PolicyConfig,
    candidates: list[ModelView],
    room: int,
    values: Mapping[str, float],
    current: Sequence[ModelView],
) -> frozenset[str]:
    """The subset of candidates that fits `room` with the most value. Ties: fewer changes to
    what is loaded, then the alphabetically first set. Exact for up to `exact_limit`
    candidates (by value); the rest are added greedily by value per unit of cost."""
    loaded = {m.name for m in current}
    ranked = sorted(candidates, key=lambda m: (-values[m.name], m.name))
    exact, rest = ranked[: config.exact_limit], ranked[config.exact_limit :]
    # every subset of `exact` as a bit mask, each built from the mask without its lowest bit
    size = 1 << len(exact)
    costs, worth, changes = [0] * size, [0.0] * size, [0] * size
    changes[0] = sum(1 for m in exact if m.name in loaded)  # choosing nothing drops them all
    best_mask, best_key = 0, (0.0, changes[0])
    for mask in range(1, size):
        low = mask & -mask
        index, rest_mask = low.bit_length() - 1, mask ^ low
        model = exact[index]
        costs[mask] = costs[rest_mask] + model.cost
        worth[mask] = worth[rest_mask] + values[model.name]
        changes[mask] = changes[rest_mask] + (-1 if model.name in loaded else 1)
        if costs[mask] > room:
            continue
        key = (-round(worth[mask], 6), changes[mask])
        if key < best_key or (key == best_key and _names(exact, mask) < _names(exact, best_mask)):
            best_mask, best_key = mask, key
    best = [m for i, m in enumerate(exact) if best_mask >> i & 1]
    chosen = {m.name for m in best}
    left = room - sum(m.cost for m in best)
    greedy = sorted(rest, key=lambda m: (-(values[m.name] / m.cost if m.cost else math.inf), m.name))
    for model in greedy:
        if model.cost <= left and (values[model.name] > EPS or model.name in loaded):
            chosen.add(model.name)
            left -= model.cost
    for model in sorted(current, key=lambda m: (-values[m.name], m.name)):  # keep what still fits
        if model.name not in chosen and model in candidates and model.cost <= left:
            chosen.add(model.name)
            left -= model.cost
    return frozenset(chosen)


def _names(models: Sequence[ModelView], mask: int) -> tuple[str, ...]:
    return tuple(sorted(m.name for i, m in enumerate(models) if mask >> i & 1))


def _busy_blocked(
    config: PolicyConfig,
    pinned: list[ModelView],
    movable: list[ModelView],
    startable: list[ModelView],
    fixed: list[ModelView],
    capacity: Capacity,
    values: Mapping[str, float],
    current: Sequence[ModelView],
) -> tuple[list[ModelView], list[ModelView]] | None:
    """If the best set would stop a busy model, (those busy models, the starts they hold up)."""
    busy = [m for m in pinned if m.busy > 0 and m.state != "starting"]
    if not busy:
        return None
    room = capacity.budget - sum(m.cost for m in fixed) - sum(m.cost for m in pinned if m not in busy)
    ideal = _fill(config, busy + movable + startable, room, values, current)
    blocked = [m for m in busy if m.name not in ideal]
    if not blocked:
        return None
    starts = [m for m in startable if m.name in ideal]
    gain_in = sum(values[m.name] for m in starts)
    gain_out = sum(values[m.name] for m in movable + busy if m.name not in ideal)
    if not starts or gain_in - gain_out < max(config.min_gain, config.hysteresis * gain_out):
        return None
    return blocked, starts


def _free_starts(
    config: PolicyConfig,
    out: DecisionBuilder,
    startable: list[ModelView],
    capacity: Capacity,
    values: Mapping[str, float],
    demand: Mapping[str, float],
) -> None:
    """Starts that need no stop: the best subset of stopped models for the room left now."""
    room = capacity.budget - out.used
    worth = [m for m in startable if values[m.name] >= config.min_free_start]
    chosen = _fill(config, worth, room, values, [])
    for model in sorted((m for m in worth if m.name in chosen), key=lambda m: m.name):
        out.act(Action("start", model.name, _start_reason(config, model, values, demand, "free room")))


def _start_reason(
    config: PolicyConfig,
    model: ModelView,
    values: Mapping[str, float],
    demand: Mapping[str, float],
    context: str,
) -> str:
    text = f"expects {demand.get(model.name, 0.0):.1f} requests in the next {span(config.horizon_s)}"
    if model.busy:
        text += f", {model.busy} waiting"
    return f"{text} (value {values[model.name]:.1f}, {context})"
