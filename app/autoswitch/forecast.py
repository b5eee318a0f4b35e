"""Expected requests per model over the next horizon: the hour-of-week / hour-of-day pattern
blended with the recent rate (pure: no I/O, no clock; `now` is an input).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta

from app.autoswitch.inputs import DAY, HOUR, Forecast, ModelView, PolicyConfig, Usage


def forecast_demand(
    config: PolicyConfig,
    usage: Usage,
    now: datetime,
    *,
    missing: Mapping[str, int] | None = None,
    models: Sequence[ModelView] = (),
) -> dict[str, Forecast]:
    """Expected requests per model over the next `horizon_s` (sorted by model name)."""
    now = utc(now)
    missing = missing or {}
    names = sorted(set(usage.hourly) | set(usage.recent) | set(missing) | {m.name for m in models})
    first_hour = floor_hour(now - timedelta(days=config.window_days))
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
        hour = floor_hour(moment)
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
        hour = floor_hour(utc(moment))
        merged[hour] = merged.get(hour, 0) + count
    return merged, sum(c for hour, c in merged.items() if first_hour <= hour <= now)


def floor_hour(moment: datetime) -> datetime:
    return moment.replace(minute=0, second=0, microsecond=0)


def utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment
