"""Usage per model and hour, rolled up from the job history by aggregation pipelines.

Why rollups rather than aggregating the history per question: on SecantusDB a $group over jobs
costs about 50 µs per document (measured: 2,000 jobs in ~100 ms), so 7 days at 100k jobs a day
would take ~35 s per `GET /admin/usage` or auto-switch evaluation. One document per model and
hour (requests, outcomes, histograms of queue wait and engine time) makes both read at most
24 x days x models small documents.

A pass re-aggregates hours and overwrites their rollups (`$set`, so a pass is idempotent and a
crash mid-pass loses nothing). Hours older than `settle_s` are frozen: a job enqueued in an
hour has ended within it plus its timeouts, so its outcome is final; no pass reads those hours
again. Between, a pass (every minute) re-reads only the current hour; every `full_every_s` and
when the hour turns it re-reads every unsettled hour, where late outcomes land. Measured
(scripts/bench_usage.py) that is what keeps it cheap: the scan costs ~0.1-0.25 ms per job on
SecantusDB, so re-reading 3 unsettled hours every minute at 100k jobs a day would keep the
database busy ~5-20 % of the time. The first pass over an existing history backfills it
`backfill_hours` at a time, oldest first, so that one pass never holds the database for long.
Rollups expire with the history (TTL on `expire_at`).

Percentiles come from fixed log-spaced buckets (like Prometheus histograms): exact counts,
quantiles interpolated within a bucket.
"""

from __future__ import annotations

import bisect
import logging
import re
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from pymongo import ASCENDING, UpdateOne
from pymongo.asynchronous.collection import AsyncCollection

from app.clock import Clock
from app.errors import InvalidRequest
from app.logs import event
from app.store.ttl import ensure_ttl_index

Doc = dict[str, Any]
log = logging.getLogger("gateway.usage")

HOUR = timedelta(hours=1)
# upper bounds in milliseconds; one more bucket counts what is above the last
BOUNDS_MS: tuple[float, ...] = (
    5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 30_000, 60_000, 120_000, 300_000, 600_000
)  # fmt: skip
OUTCOMES = ("succeeded", "failed", "cancelled", "expired")
STATE_ID = "usage_rollup"
_WINDOW = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_window(text: str, limit_s: float) -> float:
    """`7d`, `24h`, `90m`, `3600` (seconds) → seconds, at most the history's retention."""
    match = _WINDOW.match(text)
    if not match or float(match.group(1)) <= 0:
        raise InvalidRequest(
            f"window {text[:40]!r} is not a duration; use a number with s, m, h, d or w (e.g. 7d)",
            param="window",
        )
    seconds = float(match.group(1)) * _UNIT_S[match.group(2)]
    if seconds > limit_s:
        raise InvalidRequest(
            f"window {text[:40]!r} is longer than the history kept ({limit_s / 86400:g} days)",
            param="window",
        )
    return seconds


def bucket_counts(values: Sequence[float | None]) -> list[int]:
    counts = [0] * (len(BOUNDS_MS) + 1)
    for value in values:
        if value is not None:
            counts[bisect.bisect_left(BOUNDS_MS, value)] += 1
    return counts


def quantile(counts: Sequence[int], q: float) -> float | None:
    """The q-quantile (ms) of a bucketed distribution, interpolated within its bucket; None if
    empty. Values in the overflow bucket are reported as its lower bound."""
    total = sum(counts)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for index, count in enumerate(counts):
        if count and seen + count >= rank:
            if index == len(BOUNDS_MS):
                return BOUNDS_MS[-1]
            low = BOUNDS_MS[index - 1] if index else 0.0
            return round(low + (BOUNDS_MS[index] - low) * max(0.0, rank - seen) / count, 1)
        seen += count
    return BOUNDS_MS[-1]


def _floor_hour(moment: datetime) -> datetime:
    return moment.replace(minute=0, second=0, microsecond=0)


class UsageRollup:
    def __init__(
        self,
        jobs: AsyncCollection[Doc],
        usage: AsyncCollection[Doc],
        runtime_settings: AsyncCollection[Doc],
        clock: Clock,
        retention_days: float,
        *,
        settle_s: float = 7200.0,
        backfill_hours: int = 24,
        full_every_s: float = 600.0,
    ) -> None:
        self._jobs = jobs
        self._usage = usage
        self._state = runtime_settings
        self._clock = clock
        self._retention = timedelta(days=retention_days)
        self._settle = timedelta(seconds=settle_s)
        self._backfill_hours = backfill_hours
        self._full_every = timedelta(seconds=full_every_s)
        self._last_full: datetime | None = None  # when every unsettled hour was last re-read

    @property
    def retention_s(self) -> float:
        return self._retention.total_seconds()

    async def ensure_indexes(self) -> None:
        await ensure_ttl_index(self._usage, "usage_ttl")
        await self._usage.create_index([("hour", ASCENDING)], name="usage_hour")

    # -- rolling up --------------------------------------------------------------------------

    async def roll(self) -> int:
        """One pass (scheduled every minute); returns how many model-hours it wrote."""
        now = self._clock.now()
        current = _floor_hour(now)
        state = await self._state.find_one({"_id": STATE_ID})
        oldest = _floor_hour(now - self._retention)
        start = max(state["final_through"] if state else await self._first_hour(oldest, current), oldest)
        end = min(current + HOUR, start + self._backfill_hours * HOUR)
        last_full = self._last_full
        full = last_full is None or now - last_full >= self._full_every or _floor_hour(last_full) < current
        if full or end < current + HOUR:
            self._last_full = now if end == current + HOUR else None
        else:
            start = max(start, current)
        written = 0
        if start < end:
            written = await self._roll_span(start, end)
        frozen = min(end, _floor_hour(now - self._settle))
        done: Doc = {"rolled_at": now}  # for every instance's report, not only the one rolling
        if state is None or frozen > state["final_through"]:
            done["final_through"] = max(frozen, start)
        await self._state.update_one({"_id": STATE_ID}, {"$set": done}, upsert=True)
        if end < current + HOUR:
            event(log, "usage.backfilling", through=end.isoformat(), written=written)
        return written

    async def _first_hour(self, oldest: datetime, current: datetime) -> datetime:
        """Where a first pass starts: the hour of the oldest job within the retention, searched
        forward in bounded windows (SecantusDB reads the whole index range of a sorted, limited
        query: one read over 150,000 jobs took 5.6 s; a day's window costs what the day holds)."""
        lower, step = oldest, timedelta(days=1)
        while lower < current + HOUR:
            upper = min(lower + step, current + HOUR)
            window = {"enqueued_at": {"$gte": lower, "$lt": upper}}
            cursor = self._jobs.find(window, {"enqueued_at": 1}).sort("enqueued_at", 1).limit(1)
            first = await cursor.to_list()
            if first:
                return _floor_hour(first[0]["enqueued_at"])
            lower, step = upper, min(step * 3, timedelta(days=30))
        return current

    async def _roll_span(self, start: datetime, end: datetime) -> int:
        pipeline: list[Doc] = [
            {"$match": {"enqueued_at": {"$gte": start, "$lt": end}}},
            {
                "$project": {
                    "model": 1,
                    "state": 1,
                    "hour": {"$dateTrunc": {"date": "$enqueued_at", "unit": "hour"}},
                    "wait": {"$subtract": ["$started_at", "$enqueued_at"]},
                    "engine": {"$subtract": ["$finished_at", "$started_at"]},
                }
            },
            {
                "$group": {
                    "_id": {"model": "$model", "hour": "$hour"},
                    "requests": {"$sum": 1},
                    **{
                        outcome: {"$sum": {"$cond": [{"$eq": ["$state", outcome]}, 1, 0]}}
                        for outcome in OUTCOMES
                    },
                    "waits": {"$push": "$wait"},
                    "engines": {"$push": "$engine"},
                }
            },
        ]
        rows = await (await self._jobs.aggregate(pipeline)).to_list()
        writes = []
        for row in rows:
            model, hour = row["_id"]["model"], row["_id"]["hour"]
            finished = sum(row[o] for o in OUTCOMES)
            writes.append(
                UpdateOne(
                    {"_id": f"{model}|{hour.isoformat()}"},
                    {
                        "$set": {
                            "model": model,
                            "hour": hour,
                            "requests": row["requests"],
                            **{o: row[o] for o in OUTCOMES},
                            "in_progress": row["requests"] - finished,
                            "queue_wait_ms": bucket_counts([_ms(v) for v in row["waits"]]),
                            "engine_ms": bucket_counts([_ms(v) for v in row["engines"]]),
                            "expire_at": hour + self._retention + HOUR,
                        }
                    },
                    upsert=True,
                )
            )
        if writes:
            await self._usage.bulk_write(writes, ordered=False)
        return len(writes)

    # -- reading -----------------------------------------------------------------------------

    async def rollups(self, since: datetime, model: str | None = None) -> list[Doc]:
        query: Doc = {"hour": {"$gte": _floor_hour(since)}}
        if model is not None:
            query["model"] = model
        return await self._usage.find(query).to_list()

    async def hourly(self, since: datetime) -> dict[str, dict[datetime, int]]:
        """Requests per model and hour (auto-switch's `Usage.hourly`)."""
        counts: dict[str, dict[datetime, int]] = {}
        for doc in await self.rollups(since):
            counts.setdefault(doc["model"], {})[doc["hour"]] = int(doc["requests"])
        return counts

    async def recent(self, since: datetime) -> dict[str, int]:
        """Requests per model enqueued since `since`, from the jobs themselves (minutes of
        history through the `recent` index: exact and cheap, unlike rollups a minute old)."""
        pipeline: list[Doc] = [
            {"$match": {"enqueued_at": {"$gte": since}}},
            {"$group": {"_id": "$model", "n": {"$sum": 1}}},
        ]
        rows = await (await self._jobs.aggregate(pipeline)).to_list()
        return {row["_id"]: int(row["n"]) for row in rows}

    async def report(self, window_s: float, model: str | None = None) -> Doc:
        """`GET /admin/usage`: per model counts, share, outcomes, latency percentiles and an
        hour-of-day x day-of-week histogram (UTC, Monday first) over the window."""
        now = self._clock.now()
        since = now - timedelta(seconds=window_s)
        docs = await self.rollups(since, model)
        per_model: dict[str, Doc] = {}
        for doc in docs:
            entry = per_model.setdefault(
                doc["model"],
                {
                    "requests": 0,
                    "in_progress": 0,
                    **dict.fromkeys(OUTCOMES, 0),
                    "_wait": [0] * (len(BOUNDS_MS) + 1),
                    "_engine": [0] * (len(BOUNDS_MS) + 1),
                    "by_hour_of_week": [[0] * 24 for _ in range(7)],
                },
            )
            entry["requests"] += doc["requests"]
            entry["in_progress"] += doc.get("in_progress", 0)
            for outcome in OUTCOMES:
                entry[outcome] += doc.get(outcome, 0)
            for key, field in (("_wait", "queue_wait_ms"), ("_engine", "engine_ms")):
                entry[key] = [a + b for a, b in zip(entry[key], doc[field], strict=True)]
            hour: datetime = doc["hour"]
            entry["by_hour_of_week"][hour.weekday()][hour.hour] += doc["requests"]
        total = sum(e["requests"] for e in per_model.values())
        models = {}
        for name in sorted(per_model):
            entry = per_model[name]
            wait, engine = entry.pop("_wait"), entry.pop("_engine")
            models[name] = {
                **entry,
                "share": round(entry["requests"] / total, 4) if total else 0.0,
                "queue_wait_ms": {"p50": quantile(wait, 0.5), "p95": quantile(wait, 0.95)},
                "engine_ms": {"p50": quantile(engine, 0.5), "p95": quantile(engine, 0.95)},
            }
        return {
            "window_seconds": window_s,
            "since": since,
            "until": now,
            "rolled_at": (await self._state.find_one({"_id": STATE_ID}) or {}).get("rolled_at"),
            "total_requests": total,
            "hour_of_week_axes": {"rows": "day of week, Monday first (UTC)", "columns": "hour 0-23"},
            "models": models,
        }


def _ms(value: object) -> float | None:
    """$subtract of two dates is milliseconds; a missing date gives null."""
    return float(value) if isinstance(value, int | float) else None
