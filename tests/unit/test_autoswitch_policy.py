"""The auto-switch policy, table by table: thresholds, cooldown, busy models, capacity, ties,
empty history, hysteresis, and the forecast seeing a peak coming."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from app.autoswitch.forecast import forecast_demand
from app.autoswitch.inputs import Capacity, Decision, ModelView, PolicyConfig, Usage
from app.autoswitch.policy import decide, forecast_policy, plan
from app.autoswitch.threshold import threshold_policy
from app.engines.lifecycle import EngineState

NOW = datetime(2026, 1, 12, 10, 0, tzinfo=UTC)  # a Monday, 10:00
THRESHOLD = PolicyConfig(mode="threshold")
FORECAST = PolicyConfig()
CONFIGS = {"threshold": THRESHOLD, "forecast": FORECAST}
ONE_SLOT = Capacity(40)  # every model below costs 40 unless it says otherwise


def view(name: str, state: str = "stopped", **fields: Any) -> ModelView:
    return ModelView(name=name, state=state, cost=fields.pop("cost", 40), **fields)


def window(counts: Mapping[str, int], hours_ago: int = 2) -> Usage:
    """`counts` requests per model, all in one hour of the window."""
    hour = NOW - timedelta(hours=hours_ago)
    return Usage(hourly={name: {hour: count} for name, count in counts.items()})


def recent(counts: Mapping[str, int]) -> Usage:
    return Usage(recent=dict(counts))


def acts(decision: Decision) -> list[str]:
    return [f"{a.kind} {a.model}" for a in decision.actions]


def deferred(decision: Decision) -> list[str]:
    return [f"{a.kind} {a.model}" for a in decision.deferred]


def text(decision: Decision) -> str:
    return " | ".join([*decision.notes, *(a.reason for a in (*decision.actions, *decision.deferred))])


# -- threshold: the old rule ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "counts", "models", "want", "says"),
    [
        ("empty history", {}, [view("a", "ready"), view("b")], [], "no requests in the last 7 days"),
        (
            "below min requests",
            {"b": 9},
            [view("a", "ready"), view("b")],
            [],
            "top model b has 9 requests in 7 days (needs 10)",
        ),
        (
            "below min share",
            {"a": 41, "b": 59},
            [view("a", "ready"), view("b")],
            [],
            "top model b has 59% of requests (needs 60%)",
        ),
        ("at min share", {"a": 20, "b": 30}, [view("a", "ready"), view("b")], ["stop a", "start b"], ""),
        ("at min requests", {"b": 10}, [view("a", "ready"), view("b")], ["stop a", "start b"], ""),
        ("top already loaded", {"a": 90, "b": 10}, [view("a", "ready"), view("b")], [], "already ready"),
        ("top is loading", {"b": 90}, [view("a"), view("b", "starting")], [], "already starting"),
        ("free room: no stop", {"b": 90}, [view("a"), view("b")], ["start b"], ""),
        ("top is failed", {"b": 90}, [view("a", "ready"), view("b", "failed")], [], "b is failed"),
        (
            "top not managed",
            {"b": 90},
            [view("a", "ready"), view("b", eligible=False)],
            [],
            "not managed by auto-switch",
        ),
        ("top never fits", {"b": 90}, [view("a", "ready"), view("b", cost=41)], [], "never fits"),
        ("tie goes to the first name", {"a": 50, "b": 50}, [view("a"), view("b")], [], "top model a has 50%"),
    ],
)
def test_threshold_rule(
    case: str, counts: dict[str, int], models: list[ModelView], want: list[str], says: str
) -> None:
    decision = threshold_policy(THRESHOLD, window(counts), models, ONE_SLOT, NOW)
    assert acts(decision) == want, case
    assert says in text(decision), case
    assert decision.mode == "threshold"


def test_threshold_tie_break_picks_first_name_when_it_passes() -> None:
    config = replace(THRESHOLD, min_share=0.5)
    decision = threshold_policy(config, window({"b": 50, "c": 50}), [view("c"), view("b")], ONE_SLOT, NOW)
    assert acts(decision) == ["start b"]


def test_threshold_evicts_least_used_idle_model_first() -> None:
    models = [view("a", "ready"), view("b", "ready"), view("c")]
    decision = threshold_policy(THRESHOLD, window({"a": 5, "b": 2, "c": 93}), models, Capacity(80), NOW)
    assert acts(decision) == ["stop b", "start c"]  # b has fewer requests than a
    assert "make room for c" in decision.actions[0].reason


def test_threshold_skips_a_busy_model_and_evicts_another() -> None:
    models = [view("a", "ready"), view("b", "ready", busy=2), view("c")]
    decision = threshold_policy(THRESHOLD, window({"a": 5, "b": 2, "c": 93}), models, Capacity(80), NOW)
    assert acts(decision) == ["stop a", "start c"]


# -- busy models are never evicted -------------------------------------------------------------


@pytest.mark.parametrize("policy", ["threshold", "forecast"])
def test_busy_model_is_never_evicted_and_the_start_waits(policy: str) -> None:
    config = CONFIGS[policy]
    usage = Usage(hourly=window({"b": 90}).hourly, recent={"b": 60})
    models = [view("a", "ready", busy=3), view("b")]
    decision = decide(config, usage, models, ONE_SLOT, NOW)
    assert decision.actions == ()
    assert deferred(decision) == ["start b"]
    assert "waiting for idle: a busy (3 jobs)" in decision.deferred[0].reason
    if policy == "forecast":
        assert "kept a: busy (3 jobs)" in decision.notes
    idle = decide(config, usage, [view("a", "ready"), view("b")], ONE_SLOT, NOW)
    assert acts(idle) == ["stop a", "start b"]


def test_a_loading_model_is_not_evicted() -> None:
    decision = plan(FORECAST, {"a": 0, "b": 50}, [view("a", "starting"), view("b")], ONE_SLOT, NOW)
    assert decision.actions == ()
    assert "kept a: is loading" in decision.notes


@pytest.mark.parametrize("policy", ["threshold", "forecast"])
def test_nothing_is_decided_while_an_engine_stops(policy: str) -> None:
    config = CONFIGS[policy]
    usage = Usage(hourly=window({"b": 90}).hourly, recent={"b": 60})
    decision = decide(config, usage, [view("a", "stopping"), view("b")], ONE_SLOT, NOW)
    assert decision.actions == () and decision.deferred == ()
    assert decision.notes == ("waiting for a to stop before deciding",)


# -- cooldown ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "switched_ago_s", "want_actions", "want_deferred"),
    [
        ("threshold", 60, [], ["start b"]),
        ("threshold", 299, [], ["start b"]),
        ("threshold", 300, ["stop a", "start b"], []),
        ("forecast", 60, [], ["stop a", "start b"]),
        ("forecast", 300, ["stop a", "start b"], []),
        ("forecast", 3600, ["stop a", "start b"], []),
    ],
)
def test_cooldown_between_switches(
    policy: str, switched_ago_s: int, want_actions: list[str], want_deferred: list[str]
) -> None:
    config = CONFIGS[policy]
    last = NOW - timedelta(seconds=switched_ago_s)
    usage = Usage(hourly=window({"b": 90}).hourly, recent={"b": 60})
    models = [view("a", "ready", last_switch=last), view("b")]
    decision = decide(config, usage, models, ONE_SLOT, NOW)
    assert acts(decision) == want_actions
    assert deferred(decision) == want_deferred
    if want_deferred:
        until = last + timedelta(seconds=300)
        assert decision.cooldown_until == until
        assert f"cooldown until {until:%H:%M:%S}" in decision.deferred[-1].reason
    else:
        assert decision.cooldown_until is None


def test_cooldown_counts_from_the_latest_switch_of_any_model() -> None:
    models = [
        view("a", "ready", last_switch=NOW - timedelta(hours=2)),
        view("b", last_switch=NOW - timedelta(seconds=10)),
        view("c"),
    ]
    decision = plan(FORECAST, {"c": 50}, models, ONE_SLOT, NOW)
    assert deferred(decision) == ["stop a", "start c"]


def test_cooldown_does_not_hold_a_start_into_free_room() -> None:
    models = [view("a", "ready", last_switch=NOW - timedelta(seconds=10)), view("b")]
    decision = plan(FORECAST, {"a": 5, "b": 20}, models, Capacity(80), NOW)
    assert acts(decision) == ["start b"]
    assert "free room" in decision.actions[0].reason


# -- capacity ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "demand", "models", "budget", "want"),
    [
        ("fills free room", {"a": 9, "b": 5}, [view("a"), view("b")], 80, ["start a", "start b"]),
        ("best of two that fit", {"a": 9, "b": 5, "c": 7}, [view("a"), view("b"), view("c")], 80, ["a", "c"]),
        (
            "two small beat one large",
            {"big": 30, "s1": 20, "s2": 20},
            [view("big", "ready", cost=80), view("s1"), view("s2")],
            80,
            ["stop big", "start s1", "start s2"],
        ),
        (
            "one large beats two small",
            {"big": 60, "s1": 20, "s2": 20},
            [view("big", cost=80), view("s1", "ready"), view("s2", "ready")],
            80,
            ["stop s1", "stop s2", "start big"],
        ),
        ("too big never starts", {"huge": 99}, [view("huge", cost=120)], 80, []),
        (
            "unmanaged engine holds its share",
            {"a": 10, "b": 10},
            [view("pinned", "ready", eligible=False), view("a"), view("b")],
            80,
            ["start a"],
        ),
        (
            "stopping engine holds its share",
            {"a": 10},
            [view("x", "stopping"), view("a")],
            40,
            [],
        ),
        ("failed model is not started", {"a": 10}, [view("a", "failed")], 80, []),
        (
            "zero-cost engine always fits",
            {"cpu": 5},
            [view("cpu", cost=0), view("a", "ready")],
            40,
            ["start cpu"],
        ),
    ],
)
def test_capacity_is_respected(
    case: str, demand: dict[str, float], models: list[ModelView], budget: int, want: list[str]
) -> None:
    decision = plan(FORECAST, demand, models, Capacity(budget), NOW)
    if want and " " not in want[0]:  # a target set rather than actions
        assert sorted(m for m in decision.target) == want, case
    else:
        assert acts(decision) == want, case
    cost = {m.name: m.cost for m in models}
    assert sum(cost[name] for name in decision.target) <= budget, case


def test_stops_come_before_starts() -> None:
    models = [view("a", "ready"), view("b", "ready"), view("c", cost=80)]
    decision = plan(FORECAST, {"c": 100}, models, Capacity(80), NOW)
    assert [a.kind for a in decision.actions] == ["stop", "stop", "start"]
    assert decision.target == ("c",)


def test_idle_models_stay_loaded_when_nothing_needs_their_room() -> None:
    models = [view("a", "ready"), view("b", "ready")]
    decision = plan(FORECAST, {"a": 0, "b": 0}, models, Capacity(80), NOW)
    assert decision.actions == ()
    assert decision.target == ("a", "b")


def test_jobs_waiting_for_a_stopped_model_are_demand() -> None:
    models = [view("a", "ready"), view("b", busy=12)]
    decision = plan(FORECAST, {"a": 3}, models, ONE_SLOT, NOW)
    assert acts(decision) == ["stop a", "start b"]
    assert "12 waiting" in decision.actions[1].reason


def test_slots_capacity() -> None:
    models = [view("a", cost=1), view("b", cost=1), view("c", cost=1)]
    decision = plan(FORECAST, {"a": 1, "b": 3, "c": 2}, models, Capacity.slots(2), NOW)
    assert acts(decision) == ["start b", "start c"]


# -- ties and empty history --------------------------------------------------------------------


@pytest.mark.parametrize("order", [["a", "b"], ["b", "a"]])
def test_ties_go_to_the_first_name_whatever_the_order(order: list[str]) -> None:
    models = [view(name) for name in order]
    decision = plan(FORECAST, {"a": 10, "b": 10}, models, ONE_SLOT, NOW)
    assert acts(decision) == ["start a"]


def test_a_tie_keeps_what_is_loaded() -> None:
    decision = plan(FORECAST, {"a": 10, "b": 10}, [view("a"), view("b", "ready")], ONE_SLOT, NOW)
    assert decision.actions == ()
    assert decision.target == ("b",)


@pytest.mark.parametrize("mode", ["threshold", "forecast"])
@pytest.mark.parametrize(
    "models",
    [[], [view("a")], [view("a", "ready"), view("b")], [view("a", "ready"), view("b", "ready")]],
)
def test_empty_history_changes_nothing(mode: str, models: list[ModelView]) -> None:
    decision = decide(CONFIGS[mode], Usage(), models, Capacity(80), NOW)
    assert decision.actions == () and decision.deferred == ()
    assert decision.notes


# -- hysteresis --------------------------------------------------------------------------------


def _run(
    config: PolicyConfig, demands: list[dict[str, float]], loaded: str, step_s: float = 300
) -> list[str]:
    """Evaluate every step with the given demand, applying actions at once; the switches."""
    state = {"a": "stopped", "b": "stopped"} | {loaded: "ready"}
    switched: dict[str, datetime | None] = {"a": None, "b": None}
    log: list[str] = []
    for step, demand in enumerate(demands):
        now = NOW + timedelta(seconds=step * step_s)
        models = [view(n, state[n], last_switch=switched[n]) for n in ("a", "b")]
        decision = plan(config, demand, models, ONE_SLOT, now)
        for action in decision.actions:
            state[action.model] = "ready" if action.kind == "start" else "stopped"
            switched[action.model] = now
            log.append(f"{action.kind} {action.model}")
    return log


@pytest.mark.parametrize(
    ("case", "demands", "want"),
    [
        ("alternating small lead", [{"a": 20, "b": 22}, {"a": 22, "b": 20}] * 12, []),
        ("noise around equal", [{"a": 20 + d, "b": 20 - d} for d in (1, -2, 2, -1, 0, 2, -2) * 3], []),
        ("a clear, lasting change", [{"a": 20, "b": 5}] * 2 + [{"a": 5, "b": 40}] * 6, ["stop a", "start b"]),
        ("tiny absolute gain", [{"a": 0.5, "b": 2.0}] * 6, []),
    ],
)
def test_hysteresis_prevents_flapping(case: str, demands: list[dict[str, float]], want: list[str]) -> None:
    assert _run(FORECAST, demands, loaded="a") == want, case


def test_without_hysteresis_the_same_noise_flaps() -> None:
    eager = replace(FORECAST, hysteresis=0.0, min_gain=0.0, cooldown_s=0, default_load_s=0)
    assert len(_run(eager, [{"a": 20, "b": 22}, {"a": 22, "b": 20}] * 4, loaded="a")) == 16


def test_load_time_is_part_of_the_cost() -> None:
    models = [view("a", "ready"), view("b", load_seconds=1500)]  # loads for 25 of the 30 min
    decision = plan(FORECAST, {"a": 10, "b": 40}, models, ONE_SLOT, NOW)
    assert decision.actions == ()  # 40 expected, but only 5 min of them after the load
    assert "kept a (10.0)" in text(decision)
    quick = plan(
        FORECAST, {"a": 10, "b": 40}, [view("a", "ready"), view("b", load_seconds=30)], ONE_SLOT, NOW
    )
    assert acts(quick) == ["stop a", "start b"]


# -- the forecast ------------------------------------------------------------------------------


def _weekly_history(peaks: Mapping[str, int], days: int = 7, level: int = 60) -> Usage:
    """Each model busy (`level` requests) at its peak hour of every weekday, quiet otherwise."""
    hourly: dict[str, dict[datetime, int]] = {name: {} for name in peaks}
    start = NOW.replace(hour=0) - timedelta(days=days)
    for day in range(days):
        midnight = start + timedelta(days=day)
        for name, hour in peaks.items():
            for h in range(24):
                weekday = midnight.weekday() < 5
                hourly[name][midnight + timedelta(hours=h)] = level if (h == hour and weekday) else 1
    return Usage(hourly=hourly)


def test_forecast_loads_the_model_whose_peak_is_coming() -> None:
    usage = _weekly_history({"morning": 11, "afternoon": 15}, level=120)
    usage = replace(usage, recent={"morning": 1, "afternoon": 2})  # now, the afternoon one leads
    models = [view("afternoon", "ready"), view("morning")]
    at = NOW.replace(hour=10, minute=40)
    decision = forecast_policy(FORECAST, usage, models, ONE_SLOT, at)
    assert acts(decision) == ["stop afternoon", "start morning"]
    forecasts = {f.model: f for f in decision.forecasts}
    morning, afternoon = forecasts["morning"].seasonal, forecasts["afternoon"].seasonal
    assert morning is not None and afternoon is not None and morning > 5 * afternoon
    at_noon = forecast_policy(
        FORECAST,
        usage,
        [view("afternoon"), view("morning", "ready")],
        ONE_SLOT,
        at.replace(hour=14, minute=40),
    )
    assert acts(at_noon) == ["stop morning", "start afternoon"]


def test_forecast_follows_a_recent_rise_without_history() -> None:
    usage = Usage(recent={"new": 40, "old": 2})
    decision = forecast_policy(FORECAST, usage, [view("old", "ready"), view("new")], ONE_SLOT, NOW)
    assert acts(decision) == ["stop old", "start new"]


def test_weekends_are_told_apart_by_the_weekly_sample() -> None:
    usage = _weekly_history({"m": 10}, days=7)
    saturday = NOW + timedelta(days=5)  # the Saturday 10:00 after; a week earlier was quiet
    weekday = forecast_demand(FORECAST, usage, NOW.replace(hour=10))["m"].seasonal
    weekend = forecast_demand(FORECAST, replace(usage), saturday, models=())["m"].seasonal
    assert weekday is not None and weekend is not None and weekend < weekday


def test_forecast_blend_and_share() -> None:
    config = replace(FORECAST, horizon_s=3600, recent_window_s=900, seasonal_weight=0.25)
    hourly = {NOW - timedelta(days=6, hours=5): 1, NOW - timedelta(days=1): 40}
    usage = Usage(hourly={"m": hourly}, recent={"m": 10})
    f = forecast_demand(config, usage, NOW, missing={"m": 5, "other": 5})["m"]
    assert f.recent == pytest.approx((10 + 5) * 4)
    assert f.seasonal == pytest.approx(40 / 6)  # six days since it was first seen, none a week ago
    assert f.expected == pytest.approx(0.25 * 40 / 6 + 0.75 * f.recent)
    assert f.window_requests == 46 and f.share == pytest.approx(46 / 51)


@pytest.mark.parametrize(
    ("case", "hourly", "seasonal"),
    [
        ("never used: recent rate only", {}, None),
        ("first used an hour ago: recent rate only", {NOW - timedelta(hours=1): 30}, None),
        ("first used yesterday at this hour", {NOW - timedelta(days=1): 30}, 30 / 2),  # 30 min ahead
        ("quiet yesterday, busy a week ago", {NOW - timedelta(days=7): 30}, (0.6 * 30 + 0.4 * 30 / 7) / 2),
    ],
)
def test_days_before_a_model_was_first_used_do_not_count(
    case: str, hourly: dict[datetime, int], seasonal: float | None
) -> None:
    f = forecast_demand(FORECAST, Usage(hourly={"m": hourly}, recent={"m": 3}), NOW)["m"]
    assert f.seasonal == (pytest.approx(seasonal) if seasonal is not None else None), case
    if seasonal is None:
        assert f.expected == f.recent == pytest.approx(6.0), case


def test_usage_keys_may_be_naive_or_off_the_hour() -> None:
    naive = NOW.replace(tzinfo=None) - timedelta(days=1)
    usage = Usage(hourly={"m": {naive + timedelta(minutes=5): 20, naive + timedelta(minutes=50): 20}})
    aware = Usage(hourly={"m": {NOW - timedelta(days=1): 40}})
    assert forecast_demand(FORECAST, usage, NOW)["m"] == forecast_demand(FORECAST, aware, NOW)["m"]


def test_history_outside_the_window_is_ignored() -> None:
    usage = Usage(hourly={"m": {NOW - timedelta(days=8): 500}})
    assert forecast_demand(FORECAST, usage, NOW)["m"].window_requests == 0


def test_missing_model_demand_counts_for_both_policies() -> None:
    models = [view("a", "ready"), view("b")]
    assert acts(forecast_policy(FORECAST, Usage(), models, ONE_SLOT, NOW, missing={"b": 30})) == [
        "stop a",
        "start b",
    ]
    assert acts(threshold_policy(THRESHOLD, Usage(), models, ONE_SLOT, NOW, missing={"b": 30})) == [
        "stop a",
        "start b",
    ]


# -- inputs and outputs ------------------------------------------------------------------------


def test_engine_state_enum_is_accepted() -> None:
    model = ModelView("a", EngineState.READY, 40)
    decision = plan(FORECAST, {"a": 5}, [model], ONE_SLOT, NOW)
    assert decision.loaded == ("a",)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"mode": "lru"}, "mode must be"),
        ({"window_days": 0}, "window_days must be > 0"),
        ({"min_share": 1.5}, "min_share must be between 0 and 1"),
        ({"cooldown_s": -1}, "cooldown_s must be >= 0"),
        ({"exact_limit": 30}, "exact_limit"),
    ],
)
def test_config_is_validated(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PolicyConfig(**fields)


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (lambda: ModelView("a", "loaded", 1), "unknown state"),
        (lambda: ModelView("a", "ready", -1), "must be >= 0"),
    ],
)
def test_model_view_is_validated(model: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        model()


def test_duplicate_models_are_refused() -> None:
    with pytest.raises(ValueError, match="listed twice"):
        plan(FORECAST, {}, [view("a"), view("a")], ONE_SLOT, NOW)


def test_decision_is_json_ready_and_summarised() -> None:
    usage = Usage(recent={"b": 60})
    decision = forecast_policy(FORECAST, usage, [view("a", "ready"), view("b")], ONE_SLOT, NOW)
    payload = json.loads(json.dumps(decision.as_dict()))
    assert payload["actions"][0]["kind"] == "stop" and payload["target"] == ["b"]
    assert decision.summary.startswith("stop a: make room for b")
    held = forecast_policy(FORECAST, usage, [view("a", "ready", busy=1), view("b")], ONE_SLOT, NOW)
    assert held.summary.startswith("deferred: start b")


def test_many_models_use_the_greedy_tail() -> None:
    config = replace(FORECAST, exact_limit=3)
    models = [view(f"m{i:02d}", cost=10) for i in range(20)]
    demand = {f"m{i:02d}": float(i) for i in range(20)}
    decision = plan(config, demand, models, Capacity(50), NOW)
    assert decision.target == ("m15", "m16", "m17", "m18", "m19")
