"""The store against the real SecantusDB server: group commit, conditional updates, recovery."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import psutil
import pytest

from app.auth.ratelimit import RateLimiter
from app.auth.tokens import Principal
from app.clock import ManualClock
from app.errors import RateLimited
from app.queue.jobs import ListingCursor, Submission, build_job
from app.queue.priority import Priority
from app.queue.retry import RetryPolicy
from app.queue.service import JobQueue
from app.queue.stats import OutcomeCounters
from app.queue.store import JobStore
from app.queue.sweeper import Sweeper, worker_is_dead
from app.queue.transitions import UNCOUNTED
from app.store.batch import BatchWriter, DuplicateKey
from app.store.database import Database
from app.store.embedded import EmbeddedDatabase, ping


@pytest.fixture
async def writer(database: Database) -> AsyncIterator[BatchWriter]:
    batch = BatchWriter(database.jobs, max_ops=64)
    batch.start()
    yield batch
    await batch.stop()


async def test_concurrent_writes_are_coalesced_into_batches(writer: BatchWriter, database: Database) -> None:
    await asyncio.gather(*(writer.insert({"_id": f"j{i}", "n": i}) for i in range(50)))
    assert await database.jobs.count_documents({}) == 50
    assert writer.stats.operations == 50
    assert writer.stats.batches < 10, writer.stats  # 50 journaled writes, few round trips


async def test_each_caller_learns_its_own_outcome(writer: BatchWriter, database: Database) -> None:
    await writer.insert({"_id": "a", "slot": "m#0", "state": "queued"})
    await writer.insert({"_id": "b", "slot": "m#1", "state": "running"})
    results = await asyncio.gather(
        writer.insert({"_id": "c", "slot": "m#0"}),  # slot taken
        writer.insert({"_id": "d", "slot": "m#2"}),
        writer.update("a", {"state": "queued"}, {"$set": {"state": "running"}}),
        writer.update("b", {"state": "queued"}, {"$set": {"state": "running"}}),  # condition fails
        return_exceptions=True,
    )
    assert isinstance(results[0], DuplicateKey)
    assert results[0].fields == ("slot",)
    assert results[1] is None  # an insert that went in
    applied = await database.jobs.find_one({"_id": "a"})
    assert applied is not None and results[2] == applied["rev"]  # the update reports the rev it stamped
    assert results[3] is None  # condition failed: not applied
    assert (await database.jobs.find_one({"_id": "d"})) is not None


def _submission(model: str = "m", priority: Priority = Priority.NORMAL) -> Submission:
    return Submission(
        model=model,
        kind="chat",
        request={"messages": []},
        owner="alice",
        client_id="t",
        priority=priority,
        idempotency_key=None,
        queue_timeout_s=30,
    )


async def test_claim_is_in_priority_order_and_fifo(writer: BatchWriter, database: Database) -> None:
    clock = ManualClock()
    queue = JobQueue(JobStore(database.jobs, writer, timedelta(days=15)), clock, "w1", {"m": 20}, 30, 1)
    order = [Priority.LOW, Priority.NORMAL, Priority.HIGH, Priority.LOW, Priority.HIGH]
    admitted = []
    for priority in order:
        admitted.append((await queue.admit(_submission(priority=priority), None)).id)
        clock.advance(0.001)
    won, _ = await queue.claim("m", 10)
    assert [j.id for j in won] == [admitted[i] for i in (2, 4, 1, 0, 3)]
    assert all(j.attempts == 1 and j.worker == "w1" for j in won)
    again, _ = await queue.claim("m", 10)
    assert again == []  # nothing claimed twice


async def test_the_job_in_memory_is_the_job_in_the_database_after_each_transition(
    writer: BatchWriter, database: Database
) -> None:
    clock = ManualClock()
    store = JobStore(database.jobs, writer, timedelta(days=15))
    queue = JobQueue(store, clock, "w1", {"m": 20}, 30, 1)
    admitted = await queue.admit(_submission(), None)
    assert await database.jobs.find_one({"_id": admitted.id}) == admitted.to_document()
    (job,), _ = await queue.claim("m", 1)
    assert await store.get(job.id) == job
    assert await queue.retry_later(job, {"type": "engine_error", "message": "boom"}, 2.0)
    assert await store.get(job.id) == job
    clock.advance(3)
    (job,), _ = await queue.claim("m", 1)
    assert await queue.succeed(job, {"message": {"role": "assistant", "content": "hi"}})
    # on purpose: the job in memory keeps its slot (this instance frees its hint from it) and its
    # lease and backoff; only the database's copy takes the history retention
    expire_at = clock.now() + timedelta(days=15)
    kept = replace(job, slot=None, lease_until=None, not_before=None, expire_at=expire_at)
    assert await store.get(job.id) == kept


async def test_sweeper_requeues_expired_lease_and_fails_when_retries_are_spent(
    writer: BatchWriter, database: Database
) -> None:
    clock = ManualClock()
    store = JobStore(database.jobs, writer, timedelta(days=15))
    queue = JobQueue(store, clock, "w1", {"m": 20}, 30, 1)
    sweeper = Sweeper(queue, RetryPolicy(max_retries=3, base_seconds=0.0), lambda: [])
    now = clock.now()
    for job_id, attempts in (("lost", 1), ("spent", 4)):
        job = build_job(
            _submission(), job_id, f"m#{attempts}", now, ("otherhost/1/1", now + timedelta(seconds=30))
        )
        job.attempts = attempts
        await store.insert(job)
    assert await sweeper.sweep() == {"requeued": 0, "failed": 0, "expired": 0}  # leases still valid
    clock.advance(31)
    assert await sweeper.sweep() == {"requeued": 1, "failed": 1, "expired": 0}
    lost = await store.get("lost")
    spent = await store.get("spent")
    assert lost is not None and spent is not None
    assert (
        lost.state == "queued" and lost.last_error is not None and lost.last_error["type"] == "lease_expired"
    )
    assert spent.state == "failed" and spent.slot is None
    won, _ = await queue.claim("m", 1)
    assert [j.id for j in won] == ["lost"]
    assert won[0].attempts == 2


async def test_sweeper_expires_jobs_past_their_queue_deadline(
    writer: BatchWriter, database: Database
) -> None:
    clock = ManualClock()
    queue = JobQueue(JobStore(database.jobs, writer, timedelta(days=15)), clock, "w1", {"m": 2}, 30, 1)
    sweeper = Sweeper(queue, RetryPolicy(), lambda: [])
    job = await queue.admit(_submission(), None)
    await queue.admit(_submission(), None)
    clock.advance(31)
    assert (await sweeper.sweep())["expired"] == 2
    expired = await queue.store.get(job.id)
    assert expired is not None and expired.state == "expired"
    assert expired.expire_at == clock.now() + timedelta(days=15)
    await queue.admit(_submission(), None)  # the slots were freed


async def test_worker_death_is_seen_on_the_same_host() -> None:
    me = psutil.Process()
    import socket

    host = socket.gethostname()
    assert not worker_is_dead(f"{host}/{me.pid}/{int(me.create_time())}")
    assert worker_is_dead(f"{host}/{me.pid}/{int(me.create_time()) - 100}")  # pid reused
    assert not worker_is_dead("elsewhere/1/1")  # cannot tell for another host: wait for the lease


async def test_embedded_database_left_behind_is_reused_then_replaced(tmp_path: Path) -> None:
    first = EmbeddedDatabase(tmp_path, "secantusd-py", 60.0)
    uri = await first.start()
    # the server's own TTL sweeper (a full-collection scan under its lock) is off
    assert "ttl_sweep_seconds = 0" in (tmp_path / "secantusd.toml").read_text()
    second = EmbeddedDatabase(tmp_path, "secantusd-py", 60.0)
    assert await second.start() == uri  # the first was "left behind" by a killed gateway
    assert second.reused
    pid = second._pid
    assert pid is not None
    psutil.Process(pid).suspend()  # alive but not answering: must be replaced, not reused
    try:
        third = EmbeddedDatabase(tmp_path, "secantusd-py", 60.0)
        new_uri = await third.start()
        assert not third.reused
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        assert await ping(new_uri)
    finally:
        await third.stop()


async def test_history_pruner_deletes_only_expired_history(writer: BatchWriter, database: Database) -> None:
    from app.queue.history import HistoryPruner

    clock = ManualClock()
    store = JobStore(database.jobs, writer, timedelta(days=15))
    now = clock.now()
    await database.jobs.insert_many(
        [{"_id": f"old{i}", "expire_at": now - timedelta(seconds=1)} for i in range(7)]
        + [{"_id": "fresh", "expire_at": now + timedelta(days=1)}, {"_id": "active", "slot": "m#0"}]
    )
    assert await HistoryPruner(store, clock, batch=3).prune() == 7
    assert sorted(await database.jobs.distinct("_id")) == ["active", "fresh"]


async def _ended_jobs(writer: BatchWriter, database: Database, counters: OutcomeCounters) -> None:
    """Three jobs end through the queue: two succeed, one fails by the processing timeout; a
    fourth is retried once and still waits."""
    queue = JobQueue(
        JobStore(database.jobs, writer, timedelta(days=15)), ManualClock(), "w1", {"m": 20}, 30, 1, counters
    )
    for _ in range(4):
        await queue.admit(_submission(), None)
    jobs, _ = await queue.claim("m", 4)
    await queue.succeed(jobs[0], {"message": {"content": "a"}})
    await queue.succeed(jobs[1], {"message": {"content": "b"}})
    await queue.fail(jobs[2], {"type": "timeout", "message": "the engine took too long"})
    await queue.retry_later(jobs[3], {"type": "engine_error", "message": "500"}, 0.0)
    await writer.drain()


def _books(totals: dict[str, int]) -> tuple[int, ...]:
    return tuple(totals[k] for k in ("succeeded", "failed", "timeouts", "expired", "retries"))


async def test_totals_are_exact_at_once_and_after_the_tally_on_every_instance(
    writer: BatchWriter, database: Database
) -> None:
    counters = OutcomeCounters(database.queue_stats, database.jobs)
    await _ended_jobs(writer, database, counters)
    assert _books(await counters.totals("m")) == (2, 1, 1, 0, 1)  # nothing tallied yet
    assert await database.jobs.count_documents({UNCOUNTED: {"$exists": True}}) == 3

    await counters.flush()
    assert await database.jobs.count_documents({UNCOUNTED: {"$exists": True}}) == 0
    assert _books(await counters.totals("m")) == (2, 1, 1, 0, 1)
    another = OutcomeCounters(database.queue_stats, database.jobs)  # another instance, same books
    assert _books(await another.totals("m")) == (2, 1, 1, 0, 1)
    assert await another.tally() == 0  # nothing counted twice
    assert _books(await another.totals("m")) == (2, 1, 1, 0, 1)


async def test_a_tally_that_died_half_way_is_finished_without_counting_twice(
    writer: BatchWriter, database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    counters = OutcomeCounters(database.queue_stats, database.jobs)
    await _ended_jobs(writer, database, counters)

    async def crash(*_: object) -> None:
        raise ConnectionError("the gateway died right after the totals took the batch")

    monkeypatch.setattr(counters, "_unmark", crash)
    with pytest.raises(ConnectionError):
        await counters.tally()
    stats = await database.queue_stats.find_one({"_id": "m"})
    assert stats is not None and stats["counts"]["succeeded"] == 2 and len(stats["pending"]) == 3
    assert await database.jobs.count_documents({UNCOUNTED: {"$exists": True}}) == 3  # still marked

    restarted = OutcomeCounters(database.queue_stats, database.jobs)  # after the restart
    assert _books(await restarted.totals("m"))[:3] == (2, 1, 1)  # the marks in `pending` not added
    assert await restarted.tally() == 0
    assert await database.jobs.count_documents({UNCOUNTED: {"$exists": True}}) == 0
    assert _books(await restarted.totals("m"))[:3] == (2, 1, 1)


async def test_a_worker_that_lost_its_lease_cannot_finish_the_job(
    writer: BatchWriter, database: Database
) -> None:
    clock = ManualClock()
    queue = JobQueue(JobStore(database.jobs, writer, timedelta(days=15)), clock, "w1", {"m": 20}, 30, 1)
    other = JobQueue(JobStore(database.jobs, writer, timedelta(days=15)), clock, "w2", {"m": 20}, 30, 1)
    await queue.admit(_submission(), None)
    (mine,), _ = await queue.claim("m", 1)
    clock.advance(31)  # w1 stalls past its lease
    sweeper = Sweeper(other, RetryPolicy(base_seconds=0.0), lambda: [])
    assert (await sweeper.sweep())["requeued"] == 1
    (theirs,), _ = await other.claim("m", 1)
    assert theirs.attempts == 2
    assert not await queue.succeed(mine, {"message": {"role": "assistant", "content": "late"}})
    assert await other.succeed(theirs, {"message": {"role": "assistant", "content": "fresh"}})
    final = await queue.store.get(mine.id)
    assert final is not None
    assert final.state == "succeeded"
    assert final.result is not None and final.result["message"]["content"] == "fresh"


async def test_rate_limit_counts_requests_made_while_a_sync_is_in_flight(database: Database) -> None:
    """Regression: the sync zeroed the local count before its round trip, so a request made
    during it saw an empty window and passed a limit of 1 (CI failure, test_api_key_own_rate_limit)."""
    clock = ManualClock()
    limiter = RateLimiter(database.rate_limits, clock, 1, 60, [])
    caller = Principal(subject="svc", role="client")
    limiter.hit(caller)
    sync = asyncio.create_task(limiter.sync())
    await asyncio.sleep(0)  # the sync's update is now on the wire
    with pytest.raises(RateLimited):
        limiter.hit(caller)
    await sync
    with pytest.raises(RateLimited):
        limiter.hit(caller)
    other = RateLimiter(database.rate_limits, clock, 1, 60, [])  # another instance
    other.hit(caller)  # the documented overshoot: it has not synced yet
    await other.sync()
    with pytest.raises(RateLimited):  # now it knows both instances' requests
        other.hit(caller)


async def test_the_listing_reads_windows_into_the_past_and_pages_through_all_of_time(
    writer: BatchWriter, database: Database
) -> None:
    """Jobs an hour, days and months old, one in the future (another instance's clock): every
    page is newest first and the pages together are every job once (app/queue/store.py)."""
    clock = ManualClock()
    now = clock.now()
    ages_h = [-0.5, 0.1, 0.5, 0.9, 2, 3, 10, 30, 70, 200, 300, 2000]
    for n, age in enumerate(ages_h):
        job = build_job(_submission(), f"job_{n:02d}", f"m#{n}", now - timedelta(hours=age), None)
        await database.jobs.insert_one({**job.to_document(), "owner": "alice" if n % 2 else "bob"})
    store = JobStore(database.jobs, writer, timedelta(days=15), clock=clock)
    expected = [f"job_{n:02d}" for n in range(len(ages_h))]  # youngest first, as ages grow

    seen: list[str] = []
    cursor = None
    while True:
        page = await store.listing(owner=None, state=None, model=None, before=None, limit=5, after=cursor)
        seen += [job.id for job in page]
        if len(page) < 5:
            break
        cursor = ListingCursor.after(page[-1])
    assert seen == expected
    alices = await store.listing(owner="alice", state=None, model=None, before=None, limit=50)
    assert [job.id for job in alices] == [j for n, j in enumerate(expected) if n % 2]
    older = await store.listing(owner=None, state=None, model=None, before=now - timedelta(hours=5), limit=3)
    assert [job.id for job in older] == ["job_06", "job_07", "job_08"]
