"""One dispatcher per model: at most max_concurrent jobs in flight at its engine.

It claims in priority order when places free up, wakes when a job is admitted, a job ends,
the engine becomes ready or a retry's backoff runs out, and polls at a slow pace for work
admitted by other instances. Outcomes go back to the queue, which notifies the waiting handler.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, TypeVar

from app.dispatch.relay import StreamRelay
from app.errors import EngineCallError
from app.logs import event
from app.metrics import Metrics
from app.ocr.runner import OcrRunner
from app.proxy.client import EngineClient, EngineTimeout
from app.queue.delivery import StreamEvent
from app.queue.job import Doc, Job
from app.queue.retry import RetryPolicy
from app.queue.service import DirectStart, JobQueue
from app.settings import ModelSettings
from app.tasks import cancel_and_wait

IDLE_POLL_FACTOR = 4

log = logging.getLogger("gateway.dispatch")

T = TypeVar("T")


class ModelDispatcher:
    def __init__(
        self,
        name: str,
        settings: ModelSettings,
        queue: JobQueue,
        client: EngineClient,
        engine_url: Callable[[], str | None],
        served_name: str,
        engine_headers: Mapping[str, str],
        retry: RetryPolicy,
        poll_interval: float,
        engine_suspect: Callable[[str], None] = lambda job_id: None,
        ocr: OcrRunner | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.name = name
        self.settings = settings
        self._queue = queue
        self._client = client
        self._engine_url = engine_url  # callable: () -> base URL when ready, else None
        self._engine_suspect = engine_suspect  # a call could not connect: is the engine still alive?
        self._served_name = served_name
        self._engine_headers = engine_headers  # on every call: an external upstream's API key
        self._ocr = ocr  # documents: page by page (app/ocr/runner.py)
        self._retry = retry
        self._metrics = metrics or Metrics()
        self._poll_interval = poll_interval
        self.in_flight = 0  # engine places taken: jobs whose engine call has not ended
        self._engine_done: set[str] = set()  # running jobs that gave their engine place back
        self._backlog = True  # until a claim finds nothing, assume jobs may be waiting
        # queued jobs read while every engine place was taken: the backlog count they saw, when
        self._ahead: tuple[int, float, list[Job]] | None = None
        self._backlog_seen = 0  # jobs queued here since start (note_backlog calls)
        self._wakeup = asyncio.Event()
        self._running: dict[str, asyncio.Task[None]] = {}
        # jobs stopped on purpose (not a shutdown) -> why they were cancelled, or None for a job
        # taken from this instance, which is stopped without a write
        self._cancelled: dict[str, str | None] = {}
        self._loop_task: asyncio.Task[None] | None = None
        self._stopping = False

    # -- control ---------------------------------------------------------------------------

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._run(), name=f"dispatcher:{self.name}")

    def wake(self) -> None:
        self._wakeup.set()

    def note_backlog(self) -> None:
        self._backlog = True
        self._backlog_seen += 1  # a read-ahead from before this job no longer holds
        self._wakeup.set()

    async def drain(self, timeout_s: float) -> None:
        """Stop claiming and let in-flight jobs finish (up to the grace period)."""
        self._stopping = True
        tasks = list(self._running.values())
        if tasks:
            await asyncio.wait(tasks, timeout=timeout_s)

    async def settle(self, timeout_s: float) -> None:
        """Wait for the jobs running now to end (after cancelling them) without stopping."""
        tasks = list(self._running.values())
        if tasks:
            await asyncio.wait(tasks, timeout=timeout_s)

    async def stop(self) -> None:
        self._stopping = True
        await cancel_and_wait(*self._running.values(), self._loop_task)
        self._loop_task = None

    def cancel(self, job_id: str, reason: str) -> bool:
        """Stop the engine call of a job running here and end it cancelled; False if it does
        not run here."""
        return self._stop(job_id, reason)

    def abandon(self, job_id: str) -> bool:
        """Stop the engine call of a job this instance no longer owns, writing nothing: the job
        was ended or moved by whoever took it."""
        return self._stop(job_id, None)

    def _stop(self, job_id: str, reason: str | None) -> bool:
        task = self._running.get(job_id)
        if task is None:
            return False
        self._cancelled[job_id] = reason
        task.cancel()
        return True

    def running_ids(self) -> list[str]:
        return list(self._running)

    def starts_at_once(self) -> bool:
        """Whether a job admitted now would start at once instead of being queued.

        Not while a claim may still find waiting jobs (`_backlog`: from the start until the
        first claim comes back short, and after every slow poll): they go first. A request that
        arrives in that window is queued and claimed right after its insert; it loses nothing
        but the overlap of its engine call with the insert.
        """
        return (
            not self._stopping
            and not self._backlog
            and self.in_flight < self.settings.max_concurrent
            and self._engine_url() is not None
        )

    def direct_start(self) -> DirectStart | None:
        """Reserve an in-flight place for a job about to be admitted, if it can start at once."""
        if not self.starts_at_once():
            return None
        self.in_flight += 1
        return DirectStart(accept=self._launch, cancel=self._unreserve)

    def _unreserve(self) -> None:
        self.in_flight -= 1
        self._wakeup.set()

    def _launch(self, job: Job) -> None:
        self._running[job.id] = asyncio.create_task(self._execute(job), name=f"job:{job.id}")

    # -- loop --------------------------------------------------------------------------------

    async def _run(self) -> None:
        next_wait: float | None = None
        quiet = 0  # polls in a row that found nothing to claim
        while not self._stopping:
            # An idle model polls less often, up to IDLE_POLL_FACTOR intervals apart: what this
            # instance admits wakes it at once anyway; the poll only finds jobs admitted by other
            # instances (and sweeps them up no later than that) and costs a read each time.
            idle_wait = self._poll_interval * min(IDLE_POLL_FACTOR, 2**quiet)
            try:
                await asyncio.wait_for(
                    self._wakeup.wait(), timeout=idle_wait if next_wait is None else next_wait
                )
            except TimeoutError:
                self._backlog = True
                quiet += 1
            self._wakeup.clear()
            next_wait = None
            free = self.settings.max_concurrent - self.in_flight
            if not self._backlog or self._engine_url() is None:
                continue
            if free <= 0:
                await self._read_ahead()
                continue
            try:
                won, backoff_wait = await self._queue.claim(self.name, free, self._take_ahead())
            except Exception as exc:
                event(log, "dispatch.claim_failed", logging.WARNING, model=self.name, error=repr(exc))
                continue
            if len(won) < free and backoff_wait is None:
                self._backlog = False
            if won or backoff_wait is not None:
                quiet = 0
            next_wait = backoff_wait
            for job in won:
                self.in_flight += 1
                self._launch(job)

    async def _read_ahead(self) -> None:
        """Every engine place is taken and jobs wait: read the next ones now, so that the place
        freed first goes to them with one conditional write instead of a read and then a write.
        On a one-place engine (llama.cpp) each handoff is time the engine idles (measured: 7 ms
        a handoff, 2 % of its tokens/s with short answers). A job queued after the read makes
        it void (note_backlog), so priority order holds for what this instance admits; jobs
        admitted elsewhere are seen at the next read, once a poll interval, as with any claim."""
        now = asyncio.get_running_loop().time()
        ahead = self._ahead
        if ahead is not None and ahead[0] == self._backlog_seen and now - ahead[1] < self._poll_interval:
            return
        seen = self._backlog_seen
        try:
            jobs = await self._queue.candidates(self.name, self.settings.max_concurrent)
        except Exception as exc:  # the claim reads them itself then
            event(log, "dispatch.read_ahead_failed", logging.WARNING, model=self.name, error=repr(exc))
            return
        self._ahead = (seen, now, jobs)

    def _take_ahead(self) -> list[Job] | None:
        """The read-ahead, if nothing was queued here since and it is not older than two polls."""
        ahead, self._ahead = self._ahead, None
        if ahead is None or ahead[0] != self._backlog_seen:
            return None
        if asyncio.get_running_loop().time() - ahead[1] >= 2 * self._poll_interval:
            return None
        return ahead[2]

    async def _execute(self, job: Job) -> None:
        job_id = job.id
        try:
            await self._attempt(job)
        except asyncio.CancelledError:
            if job_id not in self._cancelled:
                raise  # shutdown: the lease lapses and another attempt recovers the job
            reason = self._cancelled.pop(job_id)
            if reason is not None:  # None: whoever took the job wrote its state
                await self._queue.cancel(job_id, reason)
        except Exception as exc:  # never let one job take the dispatcher down
            event(log, "dispatch.job_error", logging.ERROR, job=job_id, error=repr(exc))
        finally:
            self._cancelled.pop(job_id, None)  # a stop that came as the job was ending anyway
            self._running.pop(job_id, None)
            self._queue.left_this_process(job_id)
            self._release_engine(job_id)
            self._engine_done.discard(job_id)

    def _release_engine(self, job_id: str) -> None:
        """The job's engine call is over: its place at the engine is free for the next job now,
        while the job's outcome is still being journaled. With one place (llama.cpp) the next
        request would otherwise wait for that write and then a claim (measured: ~45 ms between
        two streams, 3-4 % of a real engine's tokens/s). Once per job."""
        if job_id in self._engine_done:
            return
        self._engine_done.add(job_id)
        self.in_flight -= 1
        self._wakeup.set()

    async def _attempt(self, job: Job) -> None:
        if job.kind == "ocr":
            if await self._queue.admitted(job.id):  # pages are written as they are read
                await self._attempt_ocr(job)
            return
        url = self._engine_url()
        if url is None:
            await self._failed(job, EngineCallError(f"engine for {self.name!r} is not ready", retryable=True))
            return
        payload = {**job.request_to_run(), "model": self._served_name}
        if job.stream:
            await self._attempt_stream(job, url, payload)
            return
        began = self._metrics.now()
        try:
            answer = await self._once_admitted(
                job,
                self._client.chat_completion(
                    url, payload, self.settings.request_timeout, headers=self._engine_headers
                ),
            )
        except EngineCallError as exc:
            self._metrics.engine_call(self.name, began)
            await self._failed(job, exc)
            return
        if answer is None:
            return  # never admitted: the client got the admission's error
        self._release_engine(job.id)
        self._metrics.engine_call(self.name, began)
        choice = answer["choices"][0]
        result = {
            "message": choice.get("message") or {"role": "assistant", "content": ""},
            "finish_reason": choice.get("finish_reason"),
            "usage": answer.get("usage") or {},
            "logprobs": choice.get("logprobs"),
            "engine_response_id": answer.get("id"),
            "system_fingerprint": answer.get("system_fingerprint"),
        }
        await self._queue.succeed(job, result)

    async def _once_admitted(self, job: Job, call: Coroutine[Any, Any, T]) -> T | None:
        """Run the engine call while the job's admission insert may still be in flight.

        The call's outcome is used only once the insert is journaled; if the insert failed the
        call is abandoned and None returned. Either way it began without waiting for the disk.
        """
        task = asyncio.ensure_future(call)
        try:
            admitted = await self._queue.admitted(job.id)
        except BaseException:  # cancelled (client gone, shutdown): the call goes with it
            task.cancel()
            raise
        if admitted:
            return await task
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return None

    async def _attempt_ocr(self, job: Job) -> None:
        if self._ocr is None:
            await self._failed(
                job, EngineCallError(f"model {self.name!r} does not read documents", retryable=False)
            )
            return
        began = self._metrics.now()
        try:
            result = await self._ocr.run(
                job, self._engine_url, self._served_name, self.settings.request_timeout
            )
        except EngineCallError as exc:
            self._metrics.engine_call(self.name, began)
            await self._failed(job, exc)
            return
        self._metrics.engine_call(self.name, began)
        if await self._queue.succeed(job, result):
            await self._ocr.pages.delete(job.id)

    async def _attempt_stream(self, job: Job, url: str, payload: Doc) -> None:
        """Relay engine chunks to the handler holding the client; the full text goes to history.

        Before the first chunk a failure is retried like any other; once a chunk reached the
        client the job is never retried (the client already has part of an answer). Chunks
        that arrive before the admission insert is journaled wait in the sink: the handler
        reads it only after admission returned.
        """
        sink = self._queue.delivery.sink(job.id)
        if sink is None:  # the client is gone already
            if job.idempotency_key is None:
                await self._queue.cancel(job.id, "the client closed the connection")
                return
            sink = asyncio.Queue()  # its key's repeat replays the stored answer: run to the end
        relay = StreamRelay(
            self._client,
            self._engine_headers,
            sink,
            lambda: self._metrics.first_token(self.name, job.enqueued_at),
        )
        began = self._metrics.now()
        try:
            if not await self._once_admitted(job, relay.run(url, payload, self.settings.request_timeout)):
                return  # never admitted: the client got the admission's error
        except EngineCallError as exc:
            self._metrics.engine_call(self.name, began)
            if relay.sent:
                exc = EngineCallError(f"stream broken after the first chunk: {exc.message}", retryable=False)
            await self._failed(job, exc)
            return
        self._release_engine(job.id)
        self._metrics.engine_call(self.name, began)
        # The client has the whole answer: end its stream now and write the history after,
        # so the journaled write is not on the client's critical path (it cannot change the
        # answer; if it fails, the job's record says so, not the client's answer).
        sink.put_nowait(StreamEvent("done", {}))
        await self._queue.succeed(job, relay.result())

    async def _failed(self, job: Job, exc: EngineCallError) -> None:
        error = {
            "type": "timeout" if isinstance(exc, EngineTimeout) else "engine_error",
            "message": exc.message,
            "engine_status": exc.status,
            "retryable": exc.retryable,
            "attempt": job.attempts,
        }
        if isinstance(exc, EngineTimeout):
            self._metrics.timeout(self.name)
        if exc.retryable and exc.status is None:
            self._engine_suspect(job.id)
        if self._retry.should_retry(retryable=exc.retryable, attempts_made=job.attempts):
            delay = self._retry.backoff(job.attempts)
            event(
                log,
                "job.retry",
                job=job.id,
                attempt=job.attempts,
                delay_s=round(delay, 3),
                error=exc.message,
            )
            if await self._queue.retry_later(job, error, delay):
                self._backlog = True
            return
        event(log, "job.failed", job=job.id, attempts=job.attempts, error=exc.message)
        await self._queue.fail(job, error)
