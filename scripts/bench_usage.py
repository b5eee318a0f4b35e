"""Usage statistics at history scale: rollups vs aggregating the raw history.

Why this exists: issue 7 asks whether `GET /admin/usage` and the auto-switch evaluation stay
fast with 15 days x 100k jobs a day in the embedded database, and whether hourly rollups are
what keeps them fast. This script fills its own SecantusDB server with synthetic finished jobs
(`--days` x `--per-day`, spread over the hours with a diurnal shape, 4 models) and times, on
that data:

* `raw_7d`: one aggregation over 7 days of jobs (what every request would cost without rollups);
* `backfill`: the rollup passes that catch up with the whole history (first start), and their
  count (a day per pass);
* `minute_pass` / `full_pass`: once caught up, a pass that re-reads the current hour and one
  that re-reads every unsettled hour (every 10 min), and their average over a 60 s schedule;
* `report_7d` / `report_15d`: `GET /admin/usage`'s work, from the rollups;
* `policy_inputs`: what one auto-switch evaluation reads (hourly rollups + recent jobs).

The raw scan's per-job cost is reported too, so a run at a smaller scale extrapolates to 100k jobs
a day; the passes' cost depends on the jobs per hour, so measure them at the real density
(`--days 1 --per-day 100000`).

    .venv/bin/python scripts/bench_usage.py                       # 15 days x 10k jobs/day
    .venv/bin/python scripts/bench_usage.py --days 15 --per-day 100000   # the full size (slow)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.clock import ManualClock
from app.history.usage import UsageRollup
from app.store.database import connect, ensure_indexes
from app.store.embedded import EmbeddedDatabase

T = TypeVar("T")
MODELS = ("gemma", "llama", "qwen", "ocr")
WEIGHTS = (0.5, 0.25, 0.15, 0.1)


def synthetic_jobs(days: int, per_day: int, now: datetime, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    start = now - timedelta(days=days)
    jobs = []
    for i in range(days * per_day):
        day = i // per_day
        hour = rng.choices(range(24), weights=[1 + math.sin((h - 9) / 24 * 2 * math.pi) for h in range(24)])[
            0
        ]
        enqueued = start + timedelta(days=day, hours=hour, seconds=rng.random() * 3600)
        if enqueued >= now:
            continue
        started = enqueued + timedelta(milliseconds=rng.expovariate(1 / 40))
        finished = started + timedelta(milliseconds=rng.expovariate(1 / 900))
        jobs.append(
            {
                "_id": f"job_{i:09d}",
                "model": rng.choices(MODELS, weights=WEIGHTS)[0],
                "kind": "chat",
                "state": "succeeded" if rng.random() > 0.03 else "failed",
                "owner": "bench",
                "client_id": "bench",
                "enqueued_at": enqueued,
                "started_at": started,
                "finished_at": finished,
                "expire_at": finished + timedelta(days=15),
                "request": {"messages": [{"role": "user", "content": "x" * 200}]},
                "result": {"message": {"role": "assistant", "content": "y" * 200}},
            }
        )
    return jobs


async def timed(fn: Callable[[], Awaitable[T]]) -> tuple[float, T]:
    started = time.perf_counter()
    value = await fn()
    return time.perf_counter() - started, value


async def run(days: int, per_day: int, seed: int) -> dict[str, Any]:
    now = datetime(2026, 11, 26, 12, 30, tzinfo=UTC)
    with tempfile.TemporaryDirectory(prefix="bench-usage-") as tmp:
        server = EmbeddedDatabase(Path(tmp), "secantusd-py", 60.0, sync_on_commit=False)
        uri = await server.start()
        try:
            db = await connect(uri, "bench", "auto")
            await ensure_indexes(db)
            jobs = synthetic_jobs(days, per_day, now, seed)
            t0 = time.perf_counter()
            for i in range(0, len(jobs), 2000):
                await db.jobs.insert_many(jobs[i : i + 2000], ordered=False)
            insert_s = time.perf_counter() - t0
            week = now - timedelta(days=7)
            hour = {"$dateTrunc": {"date": "$enqueued_at", "unit": "hour"}}
            raw_pipeline: list[dict[str, Any]] = [
                {"$match": {"enqueued_at": {"$gte": week}}},
                {"$group": {"_id": {"m": "$model", "h": hour}, "n": {"$sum": 1}}},
            ]
            raw_s, _ = await timed(lambda: _aggregate(db.jobs, raw_pipeline))
            in_week = await db.jobs.count_documents({"enqueued_at": {"$gte": week}})
            clock = ManualClock(now)
            usage = UsageRollup(db.jobs, db.usage, db.runtime_settings, clock, 15)
            await usage.ensure_indexes()
            passes, backfill_s = 0, 0.0
            while True:
                passes += 1
                seconds, _ = await timed(usage.roll)
                backfill_s += seconds
                state = await db.runtime_settings.find_one({"_id": "usage_rollup"})
                if state and state["final_through"] >= now - timedelta(hours=3):
                    break
            clock.advance(60)
            await usage.roll()  # caught up: the first pass that reaches now is a full one
            clock.advance(60)
            minute_s, written = await timed(usage.roll)  # the current hour only
            clock.advance(600)
            full_s, _ = await timed(usage.roll)  # every unsettled hour (every 10 min)
            steady_s = (full_s + 9 * minute_s) / 10  # the average pass of a 60 s schedule
            report7_s, report = await timed(lambda: usage.report(7 * 86400))
            report15_s, _ = await timed(lambda: usage.report(15 * 86400))

            async def policy_inputs() -> None:
                await usage.hourly(now - timedelta(days=7, hours=1))
                await usage.recent(now - timedelta(seconds=900))

            inputs_s, _ = await timed(policy_inputs)
            rollup_docs = await db.usage.count_documents({})
            current_hour = clock.now().replace(minute=0, second=0, microsecond=0)
            current_jobs = await db.jobs.count_documents({"enqueued_at": {"$gte": current_hour}})
            await db.close()
        finally:
            await server.stop()
    per_job_raw_ms = raw_s * 1000 / max(in_week, 1)
    return {
        "days": days,
        "jobs_per_day": per_day,
        "jobs": len(jobs),
        "insert_s": round(insert_s, 1),
        "raw_7d_s": round(raw_s, 3),
        "raw_7d_jobs": in_week,
        "raw_ms_per_job": round(per_job_raw_ms, 4),
        "raw_7d_at_100k_per_day_s": round(per_job_raw_ms * 7 * 100_000 / 1000, 1),
        "backfill_s": round(backfill_s, 2),
        "backfill_passes": passes,
        "minute_pass_s": round(minute_s, 3),
        "full_pass_s": round(full_s, 3),
        "minute_pass_rollups_written": written,
        "average_pass_s": round(steady_s, 3),
        "current_hour_jobs": current_jobs,
        "report_7d_ms": round(report7_s * 1000, 1),
        "report_15d_ms": round(report15_s * 1000, 1),
        "policy_inputs_ms": round(inputs_s * 1000, 1),
        "rollup_documents": rollup_docs,
        "report_total_requests_7d": report["total_requests"],
    }


async def _aggregate(collection: Any, pipeline: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return list(await (await collection.aggregate(pipeline)).to_list())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--days", type=int, default=15)
    parser.add_argument("--per-day", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    result = asyncio.run(run(args.days, args.per_day, args.seed))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
