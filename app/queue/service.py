"""The queue's public operations: admit, wait, and the transitions dispatchers and sweepers use.

Admission is one journaled insert: the job takes one of the model's max_concurrent +
max_waiting slots under a unique index, so it is atomic across requests and instances and
nothing beyond capacity is ever held. When this instance can start the job at once (engine
ready, a free in-flight place, nothing waiting ahead of it) the job is inserted already
running, which saves the claim round trip on the common path, and its engine call begins
while that insert is in flight: the insert is no longer added to the time to first token.
Nothing reaches the client and nothing else is written for the job before the insert is
journaled (`admitted`); if it fails, the engine call is abandoned and the client gets the
admission's error, as if the call had never begun.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import timedelta

from app.clock import Clock
from app.errors import JobNotFound, QueueFull
from app.logs import event
from app.metrics import Metrics
from app.queue.delivery import Delivery
from app.queue.fairness import FairShares, fair_order
from app.queue.job import Doc, Job, JobState
from app.queue.jobs import Submission, build_job, new_job_id
from app.queue.shares import ShareGate
from app.queue.slots import SlotBook, slot_index, slot_key
from app.queue.stats import OutcomeCounters
from app.queue.store import JobStore
from app.queue.transitions import timed_out
from app.store.batch import DuplicateKey

log = logging.getLogger("gateway.queue")


class DirectStart:
    """A dispatcher's promise to run the job at once: `accept` launches it as the insert begins,
    `cancel` gives the reserved place back when the job never got that far."""

    def __init__(self, accept: Callable[[Job], None], cancel: Callable[[], None]) -> None:
        self.accept = accept
        self.cancel = cancel


class JobQueue:
    def __init__(
        self,
        store: JobStore,
        clock: Clock,
        worker_id: str,
        capacities: dict[str, int],
        lease_seconds: float,
        poll_interval: float,
        counters: OutcomeCounters | None = None,
        metrics: Metrics | None = None,
        *,
        engine_places: dict[str, int] | None = None,
        shares: FairShares | None = None,
    ) -> None:
        self.store = store
        self.share_gate = ShareGate(store, shares or FairShares(enabled=False), engine_places or {}, metrics)
        self.clock = clock
        self.worker_id = worker_id
        self.lease = timedelta(seconds=lease_seconds)
        self._poll_interval = poll_interval
        self._books = {model: SlotBook(capacity) for model, capacity in capacities.items()}
        self.delivery = Delivery()  # who listens here: stream handlers, waiters
        self._listeners: dict[str, Callable[[], None]] = {}
        self.counters = counters
        self._metrics = metrics or Metrics()
        self._local: set[str] = set()  # jobs running in this process: their waiters need no polling
        # direct starts launched before their insert was journaled: True once it was, False if it failed
        self._inserting: dict[str, asyncio.Future[bool]] = {}

    def on_backlog(self, model: str, listener: Callable[[], None]) -> None:
        """Register the model's dispatcher, woken when a job becomes claimable."""
        self._listeners[model] = listener

    async def load_slots(self) -> None:
        """Take the database's word for which slots are occupied (at start and when full)."""
        for model, book in self._books.items():
            await self._refresh(model, book)

    async def _refresh(self, model: str, book: SlotBook) -> None:
        keys = [slot_key(model, i) for i in range(book.capacity)]
        book.reset({slot_index(slot) for slot in await self.store.occupied_slots(keys)})

    # -- admission -------------------------------------------------------------------------

    async def find_existing(self, owner: str, key: str) -> Job | None:
        return await self.store.find_by_idempotency_key(owner, key)

    async def admit(self, sub: Submission, direct: DirectStart | None, job_id: str | None = None) -> Job:
        """Insert the job into a free slot; raises QueueFull when every slot is taken.

        `job_id` is given when something keyed by it (an OCR document's pages) was stored first.
        """
        book = self._books[sub.model]
        job_id = job_id or new_job_id()
        async with self.share_gate.place(sub, job_id, book.capacity, book.taken, direct):
            return await self._admit_within_share(sub, job_id, book, direct)

    async def _admit_within_share(
        self, sub: Submission, job_id: str, book: SlotBook, direct: DirectStart | None
    ) -> Job:
        if sub.pinned_to is not None:
            self.delivery.open_sink(job_id)  # before the insert: a direct start may stream at once
        try:
            return await self._admit(sub, job_id, book, direct)
        except BaseException:
            self.delivery.close_sink(job_id)
            raise

    async def _admit(self, sub: Submission, job_id: str, book: SlotBook, direct: DirectStart | None) -> Job:
        refreshed = False
        job: Job | None = None
        pending: asyncio.Future[bool] | None = None  # set when the job was launched before its insert
        self.delivery.expect(job_id)
        while True:
            index = book.reserve()
            if index is None:
                if refreshed:
                    self._not_admitted(job_id, direct, pending)
                    self._metrics.rejected(sub.model, "queue_full")
                    self._metrics.client_admission(sub.model, sub.client_id, "queue_full")
                    raise QueueFull(sub.model, book.capacity, retry_after_s=1)
                await self._refresh(sub.model, book)
                refreshed = True
                continue
            if job is None:
                now = self.clock.now()
                running_as = (self.worker_id, now + self.lease) if direct else None
                job = build_job(sub, job_id, slot_key(sub.model, index), now, running_as)
                if direct and sub.idempotency_key is None:
                    pending = self._launch(job, direct, before_insert=True)
            else:
                job.slot = slot_key(sub.model, index)  # the job launched already holds this object
            try:
                await self.store.insert(job)
            except DuplicateKey as exc:
                if "slot" in exc.fields:
                    continue  # another instance holds that slot; the book keeps it marked taken
                book.release(index)
                self._not_admitted(job_id, direct, pending)
                raise
            except BaseException:
                book.release(index)
                self._not_admitted(job_id, direct, pending)
                raise
            event(log, "job.admitted", logging.DEBUG, job=job_id, model=sub.model, state=job.state.value)
            self._metrics.client_admission(sub.model, sub.client_id, "admitted")
            if direct:  # started at once: no queue wait (observed only for jobs really admitted)
                self._metrics.queue_wait(sub.model, job.enqueued_at, job.enqueued_at)
            if pending is not None:
                self._inserting.pop(job_id, None)
                pending.set_result(True)
            elif direct:
                self._launch(job, direct, before_insert=False)
            else:
                self._wake(sub.model)
            return job

    def _launch(self, job: Job, direct: DirectStart, *, before_insert: bool) -> asyncio.Future[bool] | None:
        """Hand the job to its dispatcher. Before the insert, its engine call overlaps the disk
        write, and its writes and its client wait for `admitted`. Not for jobs with an
        Idempotency-Key: a concurrent repeat whose insert loses must not have reached the engine
        at all (one inference per key)."""
        pending: asyncio.Future[bool] | None = None
        if before_insert:
            pending = self._inserting[job.id] = asyncio.get_running_loop().create_future()
        self._local.add(job.id)
        direct.accept(job)
        return pending

    def _not_admitted(
        self, job_id: str, direct: DirectStart | None, pending: asyncio.Future[bool] | None
    ) -> None:
        """Admission failed: no waiter; a job launched early learns it was never admitted (the
        answer stays in `_inserting` until the dispatcher lets go of the job)."""
        self.delivery.forget(job_id)
        if pending is not None:
            self._local.discard(job_id)
            pending.set_result(False)
        elif direct is not None:
            direct.cancel()

    async def admitted(self, job_id: str) -> bool:
        """Whether the job's admission insert was journaled (waiting for it if still in flight).

        Every transition asks first, so a job launched before its insert writes nothing until
        the insert is durable, and nothing at all if the insert failed.
        """
        pending = self._inserting.get(job_id)
        if pending is None:
            return True
        return await asyncio.shield(pending)

    async def cancel(self, job_id: str, reason: str) -> bool:
        """End a queued or running job as cancelled (its slot is freed in the same write)."""
        if not await self.admitted(job_id):
            return False
        job = await self.store.get(job_id)
        change = None if job is None else await self.store.cancel(job_id, self.clock.now(), reason)
        if job is None or change is None:
            return False
        change.apply(job)  # what the terminal write stored: a waiter answers with the job's end and timings
        self._ended(job, "cancelled")
        return True

    def left_this_process(self, job_id: str) -> None:
        """The dispatcher is done with the job (whatever the outcome): waiters poll again."""
        self._local.discard(job_id)
        self._inserting.pop(job_id, None)

    def _wake(self, model: str) -> None:
        listener = self._listeners.get(model)
        if listener is not None:
            listener()

    # -- waiting for results ---------------------------------------------------------------

    async def wait(self, job: Job) -> Job:
        """Return the job once it has ended.

        A job finished in this process resolves its future at once; one that runs elsewhere
        (another instance, or admitted before a restart) is read back every poll interval.
        The waiter also enforces the queue-wait deadline itself, so a timeout is exact to
        the moment and not to the sweeper's period.
        """
        job_id = job.id
        future = self.delivery.join(job_id)
        try:
            while True:
                # a job running here resolves the future itself; reading it back is only a
                # safety net (at lease pace), not the way the result arrives
                local = job_id in self._local
                wait_s = self.lease.total_seconds() if local else self._poll_interval
                now = self.clock.now()
                deadline = job.queue_deadline  # re-read: a retry gets a fresh deadline
                if job.state == JobState.QUEUED:
                    wait_s = max(0.0, min(wait_s, (deadline - now).total_seconds()))
                try:
                    return await asyncio.wait_for(asyncio.shield(future), timeout=wait_s)
                except TimeoutError:
                    pass
                current = await self.store.get(job_id)
                if current is None:
                    raise JobNotFound(job_id)
                job = current
                if job.state.terminal:
                    return job
                if job.state == JobState.QUEUED and self.clock.now() >= job.queue_deadline:
                    await self.expire(job_id)
        finally:
            self.delivery.leave(job_id)

    def _ended(self, job: Job, outcome: str) -> None:
        """Bookkeeping after a terminal write: free the slot hint, count, wake the waiter."""
        book = self._books.get(job.model)
        if book is not None and job.slot is not None:
            book.release(slot_index(job.slot))
        self._local.discard(job.id)
        self._metrics.job_finished(job.model, "timeout" if timed_out(job.state, job.error) else outcome)
        self.delivery.deliver(job)

    # -- transitions -----------------------------------------------------------------------

    async def candidates(self, model: str, limit: int) -> list[Job]:
        """The queued jobs a claim of `limit` would look at, in claim order: priority, then
        clients in turn (app/queue/fairness.py). Read only."""
        live = await self.store.live(model)
        queued = [job for job in live if job.state == JobState.QUEUED]
        running = [job for job in live if job.state == JobState.RUNNING]
        return fair_order(queued, running, self.share_gate.shares)[: limit + 10]

    async def claim(
        self, model: str, limit: int, read_ahead: list[Job] | None = None
    ) -> tuple[list[Job], float | None]:
        """Claim up to `limit` queued jobs in priority order.

        Returns the won jobs and, when jobs are waiting out a retry backoff, the seconds
        until the first of them may run. `read_ahead`: candidates read earlier (`candidates`)
        and still current as far as the caller knows; each claim is conditional on the job's
        revision, so one that changed since is lost here and the jobs are read again.
        """
        if read_ahead:
            won, wait, lost = await self._claim_from(model, limit, read_ahead)
            if not lost or len(won) == limit:
                return won, wait
            more, wait, _ = await self._claim_from(
                model, limit - len(won), await self.candidates(model, limit - len(won))
            )
            return won + more, wait
        won, wait, _ = await self._claim_from(model, limit, await self.candidates(model, limit))
        return won, wait

    async def _claim_from(
        self, model: str, limit: int, candidates: list[Job]
    ) -> tuple[list[Job], float | None, int]:
        """Claim from these candidates: (won, seconds until a backed-off one may run, claims lost)."""
        now = self.clock.now()
        began = self._metrics.now()
        ready = [
            j
            for j in candidates
            if (j.not_before is None or j.not_before <= now) and j.pinned_to in (None, self.worker_id)
        ][:limit]
        waits = [
            (j.not_before - now).total_seconds()
            for j in candidates
            if j.not_before is not None and j.not_before > now
        ]
        lease_until = now + self.lease
        won_flags = await asyncio.gather(
            *(self.store.claim(j, self.worker_id, now, lease_until) for j in ready)
        )
        self._metrics.db_operation("claim", began)
        won = []
        for job, ok in zip(ready, won_flags, strict=True):
            if ok:
                self._local.add(job.id)
                if job.attempts == 1:  # the queue wait a client feels: until its first dispatch
                    self._metrics.queue_wait(model, job.enqueued_at, now)
                won.append(job)
        return won, (min(waits) if waits else None), len(ready) - len(won)

    async def succeed(self, job: Job, result: Doc) -> bool:
        if not await self.admitted(job.id):
            return False
        now = self.clock.now()
        if await self.store.succeed(job, now, result, outlast_s=self.lease.total_seconds()):
            self._ended(job, "succeeded")
            return True
        event(log, "job.result_dropped", logging.WARNING, job=job.id, reason="lease lost before completion")
        return False

    async def fail(self, job: Job, error: Doc) -> bool:
        if not await self.admitted(job.id):
            return False
        now = self.clock.now()
        if await self.store.fail(job, now, error, outlast_s=self.lease.total_seconds()):
            self._ended(job, "failed")
            return True
        return False

    async def retry_later(self, job: Job, error: Doc, delay_s: float) -> bool:
        if not await self.admitted(job.id):
            return False
        if await self.store.requeue(job, self.clock.now() + timedelta(seconds=delay_s), error):
            if self.counters is not None:
                self.counters.record_retry(job.model)
            self._metrics.retry(job.model)
            self._wake(job.model)
            return True
        return False

    async def expire(self, job_id: str) -> bool:
        now = self.clock.now()
        error = {"type": "timeout", "message": "the job waited in the queue past its timeout"}
        if not await self.store.expire(job_id, now, error):
            return False
        job = await self.store.get(job_id)
        if job is not None:
            book = self._books.get(job.model)
            # the terminal write removed `slot`; free what this instance believed taken
            if book is not None:
                await self._refresh(job.model, book)
            self._ended(job, "expired")
        event(log, "job.expired", job=job_id)
        return True

    async def taken_over(self, job_ids: list[str]) -> list[Job]:
        """Of the jobs this instance runs, those the database says are no longer its own: cancelled,
        back in the queue, or running under another worker. A job whose insert is still in flight
        is not in the database yet and is not counted; one that just ended here is not either."""
        taken = []
        for job in await self.store.get_many([j for j in job_ids if j not in self._inserting]):
            if job.state in (JobState.CANCELLED, JobState.QUEUED) or (
                job.state == JobState.RUNNING and job.worker != self.worker_id
            ):
                taken.append(job)
        return taken

    def ended_elsewhere(self, job: Job) -> None:
        """A job taken from this instance: its waiter here answers from the job as read at once,
        rather than at lease pace, when the job has ended (cancelled through another instance)."""
        self._local.discard(job.id)
        if job.state.terminal:
            self.delivery.deliver(job)

    async def extend_leases(self, job_ids: list[str]) -> int:
        if not job_ids:
            return 0
        return await self.store.extend_leases(job_ids, self.worker_id, self.clock.now() + self.lease)

    # -- recovery (sweeper) ----------------------------------------------------------------

    async def recover_running(self, job: Job, error: Doc, retry_delay_s: float | None) -> bool:
        """Return a job whose worker is gone to the queue, or fail it when retries are spent.

        Conditional on the rev the sweeper read: if the worker finished after all, nothing changes.
        """
        now = self.clock.now()
        if retry_delay_s is None:
            ok = await self.store.fail(job, now, error)
            if ok:
                self._ended(job, "failed")
            return ok
        ok = await self.store.requeue(job, now + timedelta(seconds=retry_delay_s), error)
        if ok:
            self._metrics.retry(job.model)
            self._wake(job.model)
        return ok
