"""Usage rollups and missing-model requests against the real SecantusDB server."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from app.clock import ManualClock
from app.history.missing import MissingModels
from app.history.usage import STATE_ID, UsageRollup
from app.store.database import Database
from app.store.lease import Lease
from tests.conftest import eventually

START = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)  # a Monday


def job(
    model: str, enqueued: datetime, state: str, wait_ms: float | None, engine_ms: float | None
) -> dict[str, Any]:
    doc: dict[str, Any] = {"_id": uuid.uuid4().hex, "model": model, "state": state, "enqueued_at": enqueued}
    if wait_ms is not None:
        doc["started_at"] = enqueued + timedelta(milliseconds=wait_ms)
        if engine_ms is not None:
            doc["finished_at"] = doc["started_at"] + timedelta(milliseconds=engine_ms)
    return doc


async def test_rollups_count_requests_outcomes_and_latencies_per_model_and_hour(database: Database) -> None:
    clock = ManualClock(START + timedelta(hours=2, minutes=30))
    docs = [
        *(job("a", START + timedelta(minutes=i), "succeeded", 40, 800) for i in range(10)),
        job("a", START + timedelta(minutes=20), "failed", 40, 3000),
        job("b", START + timedelta(hours=1, minutes=5), "expired", None, None),
        job("b", START + timedelta(hours=2, minutes=10), "running", 20, None),
    ]
    await database.jobs.insert_many(docs)
    usage = UsageRollup(database.jobs, database.usage, database.runtime_settings, clock, 15)
    await usage.ensure_indexes()
    assert await usage.roll() == 3  # (a, 9h), (b, 10h), (b, 11h)
    report = await usage.report(86400)
    a, b = report["models"]["a"], report["models"]["b"]
    assert (a["requests"], a["succeeded"], a["failed"], a["in_progress"]) == (11, 10, 1, 0)
    assert (b["requests"], b["expired"], b["in_progress"]) == (2, 1, 1)
    assert report["total_requests"] == 13
    assert a["share"] == round(11 / 13, 4)
    assert a["queue_wait_ms"]["p50"] is not None and 25 < a["queue_wait_ms"]["p50"] <= 50
    assert 500 < a["engine_ms"]["p50"] <= 1000
    assert 2500 < a["engine_ms"]["p95"] <= 5000  # the one slow failure
    assert a["by_hour_of_week"][0][9] == 11  # Monday, 09:00 UTC
    assert b["by_hour_of_week"][0][10] == 1 and b["by_hour_of_week"][0][11] == 1
    assert await usage.hourly(START) == {
        "a": {START: 11},
        "b": {START + timedelta(hours=1): 1, START + timedelta(hours=2): 1},
    }
    only_b = await usage.report(86400, "b")
    assert list(only_b["models"]) == ["b"]


async def test_a_pass_is_idempotent_and_picks_up_outcomes_that_changed(database: Database) -> None:
    clock = ManualClock(START + timedelta(minutes=30))
    running = job("a", START + timedelta(minutes=1), "running", 10, None)
    await database.jobs.insert_one(running)
    usage = UsageRollup(database.jobs, database.usage, database.runtime_settings, clock, 15)
    await usage.roll()
    await usage.roll()
    first = (await usage.report(3600))["models"]["a"]
    assert (first["requests"], first["in_progress"], first["succeeded"]) == (1, 1, 0)
    await database.jobs.update_one({"_id": running["_id"]}, {"$set": {"state": "succeeded"}})
    clock.advance(60)
    await usage.roll()
    second = (await usage.report(3600))["models"]["a"]
    assert (second["requests"], second["in_progress"], second["succeeded"]) == (1, 0, 1)


async def test_settled_hours_are_frozen_and_a_long_history_is_backfilled_a_day_at_a_time(
    database: Database,
) -> None:
    clock = ManualClock(START + timedelta(days=3))
    old = [job("a", START + timedelta(hours=h), "succeeded", 5, 5) for h in range(0, 72, 6)]
    await database.jobs.insert_many(old)
    usage = UsageRollup(
        database.jobs, database.usage, database.runtime_settings, clock, 15, settle_s=7200, backfill_hours=24
    )
    passes = 0
    while True:  # from the oldest job (3 days ago), a day per pass
        passes += 1
        await usage.roll()
        state = await database.runtime_settings.find_one({"_id": STATE_ID})
        assert state is not None
        if state["final_through"] >= clock.now() - timedelta(hours=3):
            break
        assert passes < 30
    assert passes >= 3
    assert (await usage.report(15 * 86400))["models"]["a"]["requests"] == 12
    # a job appearing in a frozen hour (it cannot, normally) is not read again: the hour is final
    await database.jobs.insert_one(job("a", START + timedelta(hours=1), "succeeded", 5, 5))
    await usage.roll()
    assert (await usage.report(15 * 86400))["models"]["a"]["requests"] == 12


async def test_missing_models_are_counted_per_model_client_and_hour(database: Database) -> None:
    clock = ManualClock(START)
    missing = MissingModels(database.missing_models, clock, 15)
    await missing.ensure_indexes()
    heard: list[str] = []
    missing.on_configured_miss(heard.append)
    for _ in range(3):
        missing.record("gpt-9", "app-1", configured=False)
    missing.record("gpt-9", "app-2", configured=False)
    clock.advance(3600)
    missing.record("gemma", "app-1", configured=True)
    missing.record("gemma", "app-1", configured=True)
    await missing.drain()
    assert heard == ["gemma", "gemma"]
    listing = await missing.listing()
    rows = {(r["model_name"], r["client_id"]): r for r in listing}
    assert rows[("gpt-9", "app-1")]["count"] == 3
    assert rows[("gpt-9", "app-2")]["count"] == 1
    assert rows[("gemma", "app-1")]["configured"] is True
    assert listing[0]["model_name"] == "gemma"  # newest first
    assert listing[0]["timestamp"] == listing[0]["last_seen"]
    assert await missing.configured_since(clock.now() - timedelta(minutes=15)) == {"gemma": 2}
    assert await missing.configured_since(clock.now() + timedelta(hours=1)) == {}


async def test_a_flood_of_missing_names_is_bounded(database: Database) -> None:
    missing = MissingModels(database.missing_models, ManualClock(START), 15)
    for i in range(2000):  # more than may be in flight: the excess is logged, not queued
        missing.record(f"random-{i}", "attacker", configured=False)
    assert len(missing._pending) <= 256
    await missing.drain()
    await eventually(  # exactly the writes that were let through, nothing queued beyond them
        lambda: database.missing_models.count_documents({}), lambda n: n == 256, "256 missing writes landed"
    )
    assert await database.missing_models.count_documents({}) == 256


async def test_minute_passes_read_the_current_hour_and_full_passes_the_unsettled_ones(
    database: Database,
) -> None:
    clock = ManualClock(START + timedelta(hours=1, minutes=30))
    late = job("a", START + timedelta(minutes=50), "running", 10, None)  # previous hour, unsettled
    await database.jobs.insert_one(late)
    usage = UsageRollup(
        database.jobs, database.usage, database.runtime_settings, clock, 15, settle_s=7200, full_every_s=600
    )
    await usage.roll()  # the first pass is full
    await database.jobs.update_one({"_id": late["_id"]}, {"$set": {"state": "failed"}})
    await database.jobs.insert_one(job("a", START + timedelta(hours=1, minutes=31), "succeeded", 5, 5))
    clock.advance(60)
    await usage.roll()  # a minute pass: the current hour only
    minute = (await usage.report(7200))["models"]["a"]
    assert (minute["requests"], minute["failed"], minute["in_progress"]) == (2, 0, 1)
    clock.advance(600)
    await usage.roll()  # full: the late outcome lands
    full = (await usage.report(7200))["models"]["a"]
    assert (full["requests"], full["failed"], full["in_progress"], full["succeeded"]) == (2, 1, 0, 1)


async def test_one_lease_holder_at_a_time_until_it_lapses_or_is_released(database: Database) -> None:
    """The usage rollups (one per deployment) and auto-switch (one per host) run where the
    lease is held: a second instance is refused while the holder renews, takes over once the
    holder stops renewing for ttl, and at once after a clean release."""
    clock = ManualClock(START)
    first = Lease(database.leaders, "usage-rollup", "host-a/1/1", clock)
    second = Lease(database.leaders, "usage-rollup", "host-b/2/2", clock)
    assert await first.hold(ttl_s=60)
    assert not await second.hold(ttl_s=60)
    clock.advance(50)
    assert await first.hold(ttl_s=60)  # renewed: until START + 110 s
    clock.advance(50)
    assert not await second.hold(ttl_s=60)
    clock.advance(61)  # the first holder was killed: nothing renewed it
    assert await second.hold(ttl_s=60)
    assert not await first.hold(ttl_s=60)
    await second.release()
    assert await first.hold(ttl_s=60)


async def test_rollups_record_when_they_ran_for_every_instance(database: Database) -> None:
    """Only the lease holder rolls; the others' reports must still say when the rollups ran."""
    clock = ManualClock(START + timedelta(minutes=30))
    await database.jobs.insert_one(job("a", START, "succeeded", 10, 20))
    roller = UsageRollup(database.jobs, database.usage, database.runtime_settings, clock, 15)
    reader = UsageRollup(database.jobs, database.usage, database.runtime_settings, clock, 15)
    await roller.roll()
    report = await reader.report(3600)
    assert report["rolled_at"] == START + timedelta(minutes=30)
    assert report["models"]["a"]["requests"] == 1
