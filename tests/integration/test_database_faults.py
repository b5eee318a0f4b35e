"""A database server that dies or stalls under the gateway's store layer (its own SecantusDB
process per test, killed and stopped for real): the health loop knows at once and revives an
embedded server; a job's outcome waits out the outage, an admission does not."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import pytest
from pymongo.errors import ConnectionFailure

from app.clock import SystemClock
from app.errors import DatabaseUnavailable
from app.store.batch import BatchWriter
from app.store.database import Database, connect
from app.store.embedded import EmbeddedDatabase
from app.store.health import DatabaseHealth
from tests.conftest import eventually


class Server:
    def __init__(self, tmp: Path) -> None:
        self.embedded = EmbeddedDatabase(tmp, "secantusd-py", 60.0)

    @property
    def pid(self) -> int:
        pid = self.embedded.pid
        assert pid is not None
        return pid

    def signal(self, sig: signal.Signals) -> None:
        os.kill(self.pid, sig)

    async def stopped(self) -> None:
        """SIGSTOP, and return once the process really is stopped: a signal is delivered
        asynchronously, and a server still running for a moment answers the next ping."""
        self.signal(signal.SIGSTOP)
        await eventually(
            lambda: asyncio.to_thread(lambda: psutil.Process(self.pid).status()),
            lambda status: status == psutil.STATUS_STOPPED,
            "the server stopped",
        )

    async def killed(self) -> None:
        """SIGKILL, and return once the process is gone (reaped, not a zombie)."""
        self.signal(signal.SIGKILL)
        await eventually(
            lambda: asyncio.to_thread(self.embedded.exit_code), lambda code: code is not None, "dead"
        )


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    running = Server(tmp_path)
    await running.embedded.start()
    yield running
    await running.embedded.stop()


@pytest.fixture
async def database(server: Server) -> AsyncIterator[Database]:
    db = await connect(server.embedded.uri, "faults", "auto", operation_timeout_s=2.0, connect_timeout_s=1.0)
    yield db
    await db.close()


def _health(server: Server, database: Database) -> DatabaseHealth:
    return DatabaseHealth(
        lambda: database.ping(1.0), SystemClock(), interval_s=0.2, revive=server.embedded.revive
    )


async def test_a_killed_embedded_server_is_restarted_on_its_port_with_its_journaled_data(
    server: Server, database: Database
) -> None:
    await database.jobs.insert_one({"_id": "kept", "state": "queued"})
    health = _health(server, database)
    killed = server.pid
    uri = server.embedded.uri
    await server.killed()

    assert await health.check()  # the pass revives it before it pings
    assert server.pid != killed and server.embedded.restarts == 1
    assert server.embedded.uri == uri  # same port: the driver's client needs no new address
    assert await database.jobs.find_one({"_id": "kept"}) == {"_id": "kept", "state": "queued"}


async def test_a_stalled_server_is_reported_down_with_the_reason_then_back(
    server: Server, database: Database
) -> None:
    health = _health(server, database)
    assert await health.check() and health.up
    health.require()  # up: nothing raised
    await server.stopped()
    try:
        began = time.monotonic()
        assert not await health.check()
        assert time.monotonic() - began < 3.0  # the ping's own timeout, not the driver's 30 s
        assert not health.up and health.reason is not None and "Timeout" in health.reason
        assert "127.0.0.1" not in health.reason  # public on /health: no address of the database
        with pytest.raises(DatabaseUnavailable) as refused:
            health.require()
        assert "the database is unavailable" in refused.value.message
        assert health.reason in refused.value.message
        assert refused.value.retry_after_s >= 1
        assert server.embedded.restarts == 0  # stalled is alive: never restarted under itself
    finally:
        server.signal(signal.SIGCONT)
    await eventually(health.check, lambda ok: ok, "back after SIGCONT", 15)
    assert health.up and health.reason is None
    health.require()


async def test_a_failed_request_marks_the_database_down_at_once(server: Server, database: Database) -> None:
    health = _health(server, database)
    await server.stopped()
    try:
        with pytest.raises(ConnectionFailure) as failed:
            await database.jobs.find_one({"_id": "x"})
    finally:
        server.signal(signal.SIGCONT)
    assert health.up  # no ping yet
    health.saw_failure(failed.value)
    assert not health.up
    health.saw_failure(ValueError("not the database's fault"))  # other errors say nothing
    await eventually(health.check, lambda ok: ok, "back", 15)


async def test_an_outcome_waits_out_an_outage_and_an_admission_does_not(
    server: Server, database: Database
) -> None:
    writer = BatchWriter(database.jobs)
    writer.start()
    try:
        await writer.insert({"_id": "job", "state": "running", "rev": "r1"})
        await server.killed()
        outcome = asyncio.create_task(
            writer.update("job", {"rev": "r1"}, {"$set": {"state": "succeeded"}}, retry_for_s=30)
        )
        began = time.monotonic()
        with pytest.raises(ConnectionFailure):  # an admission is refused, not held
            await writer.insert({"_id": "new", "state": "queued"})
        assert time.monotonic() - began < 5.0
        assert not outcome.done()  # still waiting for the database
        await server.embedded.revive()
        rev = await asyncio.wait_for(outcome, 30)
        assert rev is not None
        stored = await database.jobs.find_one({"_id": "job"})
        assert stored == {"_id": "job", "state": "succeeded", "rev": rev}
        assert await database.jobs.find_one({"_id": "new"}) is None
    finally:
        await writer.stop()


async def test_a_data_directory_that_cannot_be_written_is_named_at_start(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the data directory should be")
    with pytest.raises(DatabaseUnavailable) as refused:
        await EmbeddedDatabase(blocker / "data", "secantusd-py", 10.0).start()
    assert str(blocker / "data" / "db") in refused.value.message
    assert "cannot write" in refused.value.message


async def test_a_disk_running_low_is_reported_and_the_server_restarted_once_space_is_back(
    server: Server, database: Database
) -> None:
    """The threshold is raised above what the disk has, as a disk filling up would do, then
    lowered again; a SecantusDB whose disk filled fails every operation until it restarts."""
    await database.jobs.insert_one({"_id": "before", "state": "queued"})
    health = _health(server, database)
    server.embedded.min_free_mb = 10**9
    assert not await health.check()
    assert health.reason is not None and "data directory" in health.reason and "MiB free" in health.reason
    with pytest.raises(DatabaseUnavailable) as refused:
        health.require()
    assert "min_free_mb" in refused.value.message
    before = server.pid

    server.embedded.min_free_mb = 0
    await eventually(health.check, lambda ok: ok, "back once space returned", 30)
    assert server.pid != before  # restarted, with its data
    assert await database.jobs.find_one({"_id": "before"}) == {"_id": "before", "state": "queued"}
