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
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Literal

Mode = Literal["forecast", "threshold"]
ActionKind = Literal["start", "stop"]

STATES = frozenset({"stopped", "starting", "ready", "stopping", "crashed", "failed"})
_HOLDS_GPU = frozenset({"starting", "ready", "stopping", "crashed"})  # memory not free
_LOADED = frozenset({"starting", "ready", "crashed"})  # loaded or about to be: kept or stopped
HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
_EPS = 1e-9


@dataclass(frozen=True)
class PolicyConfig:
    """Every threshold of both policies. The defaults of the threshold rule match the old
    system (every 300 s, 5 min cooldown, 7 days, >= 10 requests and >= 60 % share)."""

    mode: Mode = "forecast"
    interval_s: float = 300.0  # how often the switcher evaluates (the policy does not use it)
    miss_delay_s: float = 30.0  # forecast mode: the switcher also evaluates this long after a
    # request finds its model not loaded (at most that often; 0 = only every interval_s)
    cooldown_s: float = 300.0  # at least this long between two switches
    window_days: int = 7  # usage history looked at
    min_requests: int = 10  # threshold: the top model needs this many requests in the window
    min_share: float = 0.6  # threshold: ... and this share of all requests
    horizon_s: float = 1800.0  # forecast: expected requests are counted over this far ahead
    recent_window_s: float = 900.0  # forecast: the recent rate is measured over this
    seasonal_weight: float = 0.5  # forecast: weight of the hour-of-week pattern vs recent rate
    weekly_weight: float = 0.6  # seasonal: same hour a week ago vs same hour on every day
    hysteresis: float = 0.25  # a switch must gain this share of what it evicts, on top
    min_gain: float = 4.0  # ... and at least this many expected requests
    waiting_weight: float = 1.0  # value of one job waiting for a model that is not loaded
    min_free_start: float = 0.5  # value a start into free room needs (no stop, no cooldown)
    default_load_s: float = 60.0  # load time assumed when a model has never been loaded
    exact_limit: int = 12  # exact subset search up to this many candidates, greedy beyond

    def __post_init__(self) -> None:
        if self.mode not in ("forecast", "threshold"):
            raise ValueError(f"mode must be 'forecast' or 'threshold', not {self.mode!r}")
        positive = {
            "interval_s": self.interval_s,
            "window_days": self.window_days,
            "horizon_s": self.horizon_s,
            "recent_window_s": self.recent_window_s,
        }
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"{name} must be > 0, not {value}")
        not_negative = {
            "cooldown_s": self.cooldown_s,
            "miss_delay_s": self.miss_delay_s,
            "min_requests": self.min_requests,
            "hysteresis": self.hysteresis,
            "min_gain": self.min_gain,
            "waiting_weight": self.waiting_weight,
            "min_free_start": self.min_free_start,
            "default_load_s": self.default_load_s,
        }
        for name, value in not_negative.items():
            if value < 0:
                raise ValueError(f"{name} must be >= 0, not {value}")
        for name, share in {
            "min_share": self.min_share,
            "seasonal_weight": self.seasonal_weight,
            "weekly_weight": self.weekly_weight,
        }.items():
            if not 0 <= share <= 1:
                raise ValueError(f"{name} must be between 0 and 1, not {share}")
        if not 1 <= self.exact_limit <= 20:
            raise ValueError(f"exact_limit must be between 1 and 20, not {self.exact_limit}")


@dataclass(frozen=True)
class Usage:
    """Requests per model, from the history.

    `hourly[model][hour]` counts the requests whose hour (UTC, truncated) is `hour`, for at
    least the hours from floor(now - window_days) to now; other keys are ignored. Timestamps
    that are not on the hour are truncated; naive datetimes are taken as UTC (pymongo's
    default). `recent[model]` counts the requests of the last `recent_window_s`.
    """

    hourly: Mapping[str, Mapping[datetime, int]] = field(default_factory=dict)
    recent: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelView:
    """One configured model as the supervisor and the queue see it now.

    `state` is an EngineState value (the enum itself works: it is a str). `busy` counts the
    jobs running on it plus those waiting for it; for a model that is not loaded those are
    demand the policy values. `cost` is what it holds of the budget when loaded (0 for CPU
    engines). `load_seconds` is its last load time (None: `default_load_s`). `last_switch` is
    when auto-switch last started or stopped it; the latest over all models starts the cooldown.
    """

    name: str
    state: str
    cost: int
    busy: int = 0
    eligible: bool = True
    load_seconds: float | None = None
    last_switch: datetime | None = None

    def __post_init__(self) -> None:
        if self.state not in STATES:
            raise ValueError(f"model {self.name!r}: unknown state {self.state!r}")
        if self.cost < 0 or self.busy < 0:
            raise ValueError(f"model {self.name!r}: cost and busy must be >= 0")


@dataclass(frozen=True)
class Capacity:
    """The GPU budget auto-switch may fill, in the unit of `ModelView.cost`."""

    budget: int

    @classmethod
    def slots(cls, count: int) -> Capacity:
        """`count` models at once, when every ModelView has cost 1."""
        return cls(count)


@dataclass(frozen=True)
class Action:
    kind: ActionKind
    model: str
    reason: str


@dataclass(frozen=True)
class Forecast:
    """What the policy believes about one model; counts are requests over `horizon_s`."""

    model: str
    window_requests: int  # in the last window_days, missing demand included
    share: float  # of all requests in the window
    seasonal: float | None  # from the hour-of-week/day pattern; None without a day of history
    # (a model first used less than a day ago: only the recent rate counts)
    recent: float  # from the recent rate
    expected: float  # the blend the forecast policy optimises


@dataclass(frozen=True)
class Decision:
    """One evaluation: the actions to apply in order, what was deferred and why, and notes on
    what was kept. `target` is what the GPUs should hold once the actions are applied."""

    at: datetime
    mode: Mode
    actions: tuple[Action, ...]
    deferred: tuple[Action, ...]
    notes: tuple[str, ...]
    forecasts: tuple[Forecast, ...]
    loaded: tuple[str, ...]
    target: tuple[str, ...]
    budget: int
    used: int
    cooldown_until: datetime | None

    @property
    def summary(self) -> str:
        if self.actions:
            return "; ".join(f"{a.kind} {a.model}: {a.reason}" for a in self.actions)
        if self.deferred:
            return "deferred: " + "; ".join(f"{a.kind} {a.model}: {a.reason}" for a in self.deferred)
        return self.notes[0] if self.notes else "no change"

    def as_dict(self) -> dict[str, object]:
        """JSON-ready, for the admin API and the decision log."""
        return {
            "at": self.at.isoformat(),
            "mode": self.mode,
            "summary": self.summary,
            "actions": [asdict(a) for a in self.actions],
            "deferred": [asdict(a) for a in self.deferred],
            "notes": list(self.notes),
            "forecasts": [asdict(f) for f in self.forecasts],
            "loaded": list(self.loaded),
            "target": list(self.target),
            "budget": self.budget,
            "used": self.used,
            "cooldown_until": self.cooldown_until.isoformat() if self.cooldown_until else None,
        }


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
    now = _utc(now)
    views = _index(models)
    forecasts = forecast_demand(config, usage, now, missing=missing, models=models)
    out = _Builder(config, now, "threshold", models, capacity, tuple(forecasts.values()))
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
    why_not = _not_startable(view, top.model, capacity)
    if view is None or why_not:
        out.note(why_not)
        return out.build()
    if view.state in _LOADED:
        out.note(f"top model {top.model} ({top.share:.0%} of {total} requests) is already {view.state}")
        return out.build()
    reason = f"top model: {top.share:.0%} of {total} requests in {days}"
    start = Action("start", top.model, reason)
    if out.cooldown_until is not None:
        out.defer(Action("start", top.model, f"{reason}; cooldown until {_hms(out.cooldown_until)}"))
        return out.build()
    need = view.cost - (capacity.budget - out.used)
    stops: list[Action] = []
    held: list[str] = []
    victims = sorted(
        (m for m in models if m.state in _LOADED and m.name != top.model),
        key=lambda m: (forecasts[m.name].window_requests if m.name in forecasts else 0, m.name),
    )
    for victim in victims:
        if need <= 0:
            break
        why = _unstoppable(victim)
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
    now = _utc(now)
    out = _Builder(config, now, "forecast", models, capacity, forecasts)
    if out.blocked_by_stopping():
        return out.build()
    for model in models:
        if model.eligible and model.state == "failed" and demand.get(model.name, 0) > _EPS:
            out.note(f"{model.name} is failed: an operator start clears it (auto-switch will not)")
        elif model.eligible and model.state == "stopped" and model.cost > capacity.budget:
            out.note(f"{model.name} never fits: needs {model.cost}, the budget is {capacity.budget}")

    current = [m for m in models if m.state in _LOADED and m.eligible]  # ours to keep or stop
    fixed = [m for m in models if m.state in _HOLDS_GPU and not (m.eligible and m.state in _LOADED)]
    pinned = [m for m in current if _unstoppable(m)]
    movable = [m for m in current if not _unstoppable(m)]
    startable = [
        m
        for m in models
        if m.eligible
        and m.state == "stopped"
        and m.cost <= capacity.budget
        and (demand.get(m.name, 0) > _EPS or m.busy > 0)
    ]
    room = capacity.budget - sum(m.cost for m in fixed) - sum(m.cost for m in pinned)
    values = {m.name: _value(config, m, demand) for m in models}
    chosen = _fill(config, movable + startable, room, values, current)
    starts = sorted((m for m in startable if m.name in chosen), key=lambda m: m.name)
    stops = sorted((m for m in movable if m.name not in chosen), key=lambda m: m.name)

    blocked = _busy_blocked(config, pinned, movable, startable, fixed, capacity, values, current)
    for model in pinned:
        out.note(f"kept {model.name}: {_unstoppable(model)}")

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
            until = _hms(out.cooldown_until)
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
                        f"{gain_in:.1f} requests in the next {_span(config.horizon_s)}",
                    )
                )
            for model in starts:
                why = _start_reason(config, model, values, demand, f"instead of {names_out}")
                out.act(Action("start", model.name, why))
    if blocked is not None:
        busy = "; ".join(f"{m.name} {_unstoppable(m)}" for m in blocked[0])
        handled = {a.model for a in out.actions} | {a.model for a in out.deferred}
        for model in blocked[1]:
            if model.name not in handled:
                why = _start_reason(config, model, values, demand, "best set")
                out.defer(Action("start", model.name, f"{why}; waiting for idle: {busy}"))
    if not out.actions and not out.deferred:
        kept = ", ".join(f"{m.name} ({values[m.name]:.1f})" for m in current)
        if not any(values[m.name] > _EPS for m in current + startable):
            out.note("no demand expected: nothing to change")
        elif kept:
            out.note(f"kept {kept}: the best set that fits ({_span(config.horizon_s)} ahead)")
    return out.build()


# -- forecast --------------------------------------------------------------------------------


def forecast_demand(
    config: PolicyConfig,
    usage: Usage,
    now: datetime,
    *,
    missing: Mapping[str, int] | None = None,
    models: Sequence[ModelView] = (),
) -> dict[str, Forecast]:
    """Expected requests per model over the next `horizon_s` (sorted by model name)."""
    now = _utc(now)
    missing = missing or {}
    names = sorted(set(usage.hourly) | set(usage.recent) | set(missing) | {m.name for m in models})
    first_hour = _floor_hour(now - timedelta(days=config.window_days))
    buckets: dict[str, Mapping[datetime, int]] = {}
    totals: dict[str, int] = {}
    for name in names:
        buckets[name], in_window = _buckets(usage.hourly.get(name, {}), first_hour, now)
        totals[name] = in_window + missing.get(name, 0)
    grand = sum(totals.values())
    result: dict[str, Forecast] = {}
    for name in names:
        seen = [hour for hour, count in buckets[name].items() if count > 0 and first_hour <= hour <= now]
        # days before a model's first request in the window say nothing about its pattern
        seasonal = _seasonal(config, buckets[name], now, min(seen)) if seen else None
        recent_count = usage.recent.get(name, 0) + missing.get(name, 0)
        recent = recent_count * config.horizon_s / config.recent_window_s
        if seasonal is None:
            expected = recent
        else:
            expected = config.seasonal_weight * seasonal + (1 - config.seasonal_weight) * recent
        share = totals[name] / grand if grand else 0.0
        result[name] = Forecast(name, totals[name], share, seasonal, recent, expected)
    return result


def _seasonal(
    config: PolicyConfig, buckets: Mapping[datetime, int], now: datetime, first_hour: datetime
) -> float | None:
    """Requests over [now, now + horizon) from the same hours on past days and past weeks,
    looking back no further than `first_hour`; None when not even yesterday is there."""
    total = 0.0
    moment, end = now, now + timedelta(seconds=config.horizon_s)
    while moment < end:
        hour = _floor_hour(moment)
        upto = min(hour + HOUR, end)
        rate = _hour_rate(config, buckets, hour, first_hour)
        if rate is None:
            return None
        total += rate * ((upto - moment) / HOUR)
        moment = upto
    return total


def _hour_rate(
    config: PolicyConfig, buckets: Mapping[datetime, int], hour: datetime, first_hour: datetime
) -> float | None:
    daily: list[int] = []
    weekly: list[int] = []
    for days_back in range(1, config.window_days + 1):
        past = hour - days_back * DAY
        if past < first_hour:
            break
        count = buckets.get(past, 0)
        daily.append(count)
        if days_back % 7 == 0:
            weekly.append(count)
    if not daily:
        return None
    by_day = sum(daily) / len(daily)
    if not weekly:
        return by_day
    return config.weekly_weight * sum(weekly) / len(weekly) + (1 - config.weekly_weight) * by_day


# -- optimiser -------------------------------------------------------------------------------


def _value(config: PolicyConfig, model: ModelView, demand: Mapping[str, float]) -> float:
    """Expected requests the model serves from the GPU over the horizon if the set holds it:
    all of them when it is loaded; when it must load first, those after the load, plus the
    jobs already waiting for it."""
    expected = max(0.0, demand.get(model.name, 0.0))
    if model.state in _LOADED:
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
        if model.cost <= left and (values[model.name] > _EPS or model.name in loaded):
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
    out: _Builder,
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


# -- helpers ---------------------------------------------------------------------------------


class _Builder:
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
        _index(models)
        self.now, self.mode, self.models, self.capacity = now, mode, models, capacity
        self.forecasts = forecasts
        self.used = sum(m.cost for m in models if m.state in _HOLDS_GPU)
        switches = [_utc(m.last_switch) for m in models if m.last_switch is not None]
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
        loaded = tuple(sorted(m.name for m in self.models if m.state in _HOLDS_GPU))
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
            used=sum(m.cost for m in self.models if m.state in _HOLDS_GPU),
            cooldown_until=self.cooldown_until,
        )


def _index(models: Sequence[ModelView]) -> dict[str, ModelView]:
    views: dict[str, ModelView] = {}
    for model in models:
        if model.name in views:
            raise ValueError(f"model {model.name!r} is listed twice")
        views[model.name] = model
    return views


def _unstoppable(model: ModelView) -> str:
    """Why auto-switch may not stop this loaded model now ("" when it may)."""
    if not model.eligible:
        return "is not managed by auto-switch"
    if model.busy > 0:
        return f"busy ({model.busy} job{'s' if model.busy != 1 else ''})"
    if model.state == "starting":
        return "is loading"
    return ""


def _not_startable(view: ModelView | None, name: str, capacity: Capacity) -> str:
    if view is None:
        return f"top model {name} is not configured here"
    if not view.eligible:
        return f"top model {name} is not managed by auto-switch"
    if view.state == "failed":
        return f"top model {name} is failed: an operator start clears it (auto-switch will not)"
    if view.cost > capacity.budget:
        return f"top model {name} never fits: needs {view.cost}, the budget is {capacity.budget}"
    return ""


def _start_reason(
    config: PolicyConfig,
    model: ModelView,
    values: Mapping[str, float],
    demand: Mapping[str, float],
    context: str,
) -> str:
    text = f"expects {demand.get(model.name, 0.0):.1f} requests in the next {_span(config.horizon_s)}"
    if model.busy:
        text += f", {model.busy} waiting"
    return f"{text} (value {values[model.name]:.1f}, {context})"


def _buckets(
    hourly: Mapping[datetime, int], first_hour: datetime, now: datetime
) -> tuple[Mapping[datetime, int], int]:
    """The counts keyed by aware, whole hours, and their sum over [first_hour, now]."""
    total = 0
    for moment, count in hourly.items():
        if moment.tzinfo is None or moment.minute or moment.second or moment.microsecond:
            break
        if first_hour <= moment <= now:
            total += count
    else:
        return hourly, total
    merged: dict[datetime, int] = {}
    for moment, count in hourly.items():
        hour = _floor_hour(_utc(moment))
        merged[hour] = merged.get(hour, 0) + count
    return merged, sum(c for hour, c in merged.items() if first_hour <= hour <= now)


def _floor_hour(moment: datetime) -> datetime:
    return moment.replace(minute=0, second=0, microsecond=0)


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def _hms(moment: datetime) -> str:
    return moment.strftime("%H:%M:%S")


def _span(seconds: float) -> str:
    return f"{seconds / 60:g} min" if seconds < 3600 else f"{seconds / 3600:g} h"
