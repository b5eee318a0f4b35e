"""Group commit for journaled writes.

Journaled writes do not scale with concurrency on SecantusDB, but batches do
(docs/ARCHITECTURE.md, "The embedded database": 32 concurrent journaled inserts run at 167/s,
one `insert_many` of 32 at ~15,000 docs/s). So every job write goes through one writer task per
collection: callers enqueue an operation and await its own outcome; whatever arrives while a
batch is in flight goes out in the next one. A lone caller pays no timer, only one event-loop tick.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass
from typing import Any

from pymongo import InsertOne, UpdateOne
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import BulkWriteError, ConnectionFailure

from app.logs import event
from app.metrics import Metrics
from app.tasks import cancel_and_wait

log = logging.getLogger("gateway.store")
Doc = dict[str, Any]


class DuplicateKey(Exception):
    """An insert collided with a unique index; `fields` are that index's key fields."""

    def __init__(self, fields: tuple[str, ...], key_value: Doc) -> None:
        super().__init__(f"duplicate key on {', '.join(fields)}: {key_value}")
        self.fields = fields
        self.key_value = key_value


@dataclass
class _Op:
    request: InsertOne[Doc] | UpdateOne
    future: asyncio.Future[str | None]
    doc_id: Any = None
    rev: str | None = None
    retry_until: float | None = None  # loop time until which a lost connection is waited out


# between two tries of a batch whose operations wait out a database outage
RETRY_PAUSE_S = 0.5


@dataclass
class BatchStats:
    """Counts the tests and the bench read to see that writes were really coalesced."""

    batches: int = 0
    operations: int = 0


class BatchWriter:
    """Coalesces inserts and conditional updates on one collection into `bulk_write` calls."""

    def __init__(
        self, collection: AsyncCollection[Doc], max_ops: int = 64, metrics: Metrics | None = None
    ) -> None:
        self._collection = collection
        self._max_ops = max_ops
        self._metrics = metrics or Metrics()
        self._pending: list[_Op] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.stats = BatchStats()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"batch-writer:{self._collection.name}")

    async def drain(self) -> None:
        """Wait until everything enqueued so far is written."""
        futures = [op.future for op in self._pending]
        if futures:
            await asyncio.wait(futures)

    async def stop(self) -> None:
        self._stopping = True  # what waits out an outage is given up: the lease recovers those jobs
        await self.drain()
        await cancel_and_wait(self._task)
        self._task = None

    async def insert(self, doc: Doc) -> None:
        """Insert durably; raises DuplicateKey when a unique index refuses it."""
        await self._submit(_Op(InsertOne(doc), self._new_future(), doc_id=doc["_id"], rev=doc.get("rev")))

    async def update(
        self, doc_id: Any, conditions: Doc, update: Doc, *, retry_for_s: float = 0.0
    ) -> str | None:
        """Apply `update` to the document if it still matches `conditions`.

        `retry_for_s`: while the database cannot be reached, try again for that long instead of
        failing (a job's outcome, which its engine already produced, waits out an outage this
        way). A try that was applied but whose answer was lost is found by its rev, below.

        Returns the fresh `rev` the update stamped when it took effect, None when the document
        no longer matched. The rev is the document's version: callers make their next update
        conditional on it (optimistic concurrency, one indexed field to match), and when a
        batch matched fewer documents than it carried, one read of the revs tells exactly which
        of its updates took effect.
        """
        rev = uuid.uuid4().hex
        stamped = {**update, "$set": {**update.get("$set", {}), "rev": rev}}
        retry_until = asyncio.get_running_loop().time() + retry_for_s if retry_for_s > 0 else None
        op = _Op(
            UpdateOne({"_id": doc_id, **conditions}, stamped),
            self._new_future(),
            doc_id=doc_id,
            rev=rev,
            retry_until=retry_until,
        )
        return await self._submit(op)

    @staticmethod
    def _new_future() -> asyncio.Future[str | None]:
        return asyncio.get_running_loop().create_future()

    async def _submit(self, op: _Op) -> str | None:
        if self._task is None:
            raise RuntimeError("batch writer is not started")
        self._pending.append(op)
        self._wakeup.set()
        return await op.future

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            await asyncio.sleep(0)  # let writers of the same tick join this batch
            batch, self._pending = self._pending[: self._max_ops], self._pending[self._max_ops :]
            if not self._pending:
                self._wakeup.clear()
            if batch:
                try:
                    await self._write(batch)
                except Exception as exc:  # never leave a caller waiting on a writer that died
                    event(log, "store.batch_unresolved", logging.ERROR, size=len(batch), error=repr(exc))
                    for op in batch:
                        if not op.future.done():
                            op.future.set_exception(exc)

    async def _write(self, batch: list[_Op]) -> None:
        self.stats.batches += 1
        self.stats.operations += len(batch)
        failed: dict[int, Exception] = {}
        matched = 0
        began = self._metrics.now()
        try:
            result = await self._collection.bulk_write([op.request for op in batch], ordered=False)
            matched = result.matched_count
            self._metrics.db_operation("batch_write", began)
        except BulkWriteError as exc:
            self._metrics.db_operation("batch_write", began)
            matched = int(exc.details.get("nMatched", 0))
            for err in exc.details.get("writeErrors", []):
                index = int(err["index"])
                if err.get("code") == 11000:
                    fields = tuple(err.get("keyPattern") or {})
                    failed[index] = DuplicateKey(fields, err.get("keyValue") or {})
                else:
                    failed[index] = RuntimeError(f"write failed: {err.get('errmsg')}")
        except Exception as exc:
            event(log, "store.batch_failed", level=logging.WARNING, size=len(batch), error=repr(exc))
            await self._retry_or_fail(batch, exc)
            return
        updates = [op for i, op in enumerate(batch) if isinstance(op.request, UpdateOne) and i not in failed]
        applied: set[Any] | None = None
        if updates and matched < len(updates):
            applied = await self._applied(updates)
        for index, op in enumerate(batch):
            if op.future.done():
                continue
            if index in failed:
                op.future.set_exception(failed[index])
            elif isinstance(op.request, UpdateOne):
                op.future.set_result(op.rev if applied is None or op.rev in applied else None)
            else:
                op.future.set_result(op.rev)

    async def _retry_or_fail(self, batch: list[_Op], exc: Exception) -> None:
        """Operations that may wait out a lost connection go into the next batch after a pause;
        the others fail now (an admission is answered 503 at once, never held)."""
        now = asyncio.get_running_loop().time()
        waiting = [
            op
            for op in batch
            if isinstance(exc, ConnectionFailure)
            and not self._stopping
            and op.retry_until is not None
            and now < op.retry_until
            and not op.future.done()
        ]
        for op in batch:
            if op not in waiting and not op.future.done():
                op.future.set_exception(exc)
        if waiting:
            await asyncio.sleep(RETRY_PAUSE_S)
            self._pending[:0] = waiting
            self._wakeup.set()

    async def _applied(self, updates: list[_Op]) -> set[Any]:
        cursor = self._collection.find({"_id": {"$in": [op.doc_id for op in updates]}}, {"rev": 1})
        return {doc.get("rev") async for doc in cursor}
