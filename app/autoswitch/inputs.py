"""The auto-switch policy's inputs and outputs as plain values (pure: no I/O, no clock).

Apart from the policy itself (app/autoswitch/policy.py) so the switcher, the settings and the
simulation can speak about usage, models, capacity and decisions without importing the search.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Literal

Mode = Literal["forecast", "threshold"]
ActionKind = Literal["start", "stop"]

STATES = frozenset({"stopped", "starting", "ready", "stopping", "crashed", "failed"})
HOLDS_GPU = frozenset({"starting", "ready", "stopping", "crashed"})  # memory not free
LOADED = frozenset({"starting", "ready", "crashed"})  # loaded or about to be: kept or stopped
HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
EPS = 1e-9


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
