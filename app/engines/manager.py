"""The engine supervisor: the one owner of every engine's state (docs/ARCHITECTURE.md, "Engines").

It places engines on GPUs and starts them, turns what its helpers report into states (a load:
loading.py; the watch: watch.py; adoption: adoption.py; teardown: teardown.py; external upstreams:
upstream.py), restarts crashed engines with capped backoff, and stops them with a drain.

Why the supervisor and not the dispatchers own this: a model's state decides admission
(503 now, or queue while it loads), dispatch (only to a ready engine) and the admin API, and
each of those must see one consistent answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pymongo.asynchronous.collection import AsyncCollection

from app.clock import Clock
from app.engines import process as proc
from app.engines.admission import admission, given_up
from app.engines.adoption import Adoption, AdoptionReview
from app.engines.claims import place_engine
from app.engines.crashes import CrashLog
from app.engines.gpus import GpuInventory
from app.engines.lifecycle import EngineRecord, EngineState, RestartPlan, plan_restart
from app.engines.loading import Loader
from app.engines.model_files import command_for
from app.engines.process import log_file_name
from app.engines.records import EngineRecords
from app.engines.teardown import Teardown
from app.engines.upstream import UpstreamWatch
from app.engines.watch import EngineWatch
from app.engines.workload import NoWorkload, Workload
from app.errors import (
    EngineStartFailed,
    GatewayError,
    ModelBusy,
    ModelUnavailable,
    NotManaged,
    PlacementFailed,
)
from app.logs import event
from app.metrics import Metrics
from app.proxy.client import EngineClient
from app.settings import EngineDefaults, ModelSettings
from app.store.embedded import free_port
from app.tasks import cancel_and_wait

log = logging.getLogger("gateway.engines")
Doc = dict[str, Any]


class EngineManager:
    def __init__(
        self,
        models: dict[str, ModelSettings],
        defaults: EngineDefaults,
        records: AsyncCollection[Doc],
        crashes: CrashLog,
        client: EngineClient,
        clock: Clock,
        log_dir: Path,
        inventory: GpuInventory,
        metrics: Metrics | None = None,
        upstream_headers: Mapping[str, dict[str, str]] | None = None,
    ) -> None:
        self.engines = {name: EngineRecord(name, cfg) for name, cfg in models.items()}
        upstreams = [e for e in self.engines.values() if e.settings.kind == "openai"]
        for upstream in upstreams:  # its API key (app/engines/upstream.py auth_headers)
            upstream.auth_headers = dict((upstream_headers or {}).get(upstream.name, {}))
        # external upstreams (kind openai): watched there, never spawned, adopted or killed here
        self.upstreams = UpstreamWatch(upstreams, client, defaults, clock, self._announce_ready)
        self.crash_log = crashes
        self.inventory = inventory
        self._metrics = metrics or Metrics()
        self._defaults = defaults
        self._records = EngineRecords(records)
        self._teardown = Teardown(defaults, inventory, self._records)
        self._loader = Loader(defaults, client, clock, self._records, self._teardown, self.log_path)
        self._adoption = AdoptionReview(self._records, self._teardown, inventory, client, self._command)
        self._client = client
        self._clock = clock
        self._log_dir = log_dir
        self._python = defaults.python or sys.executable
        self._workload: Workload = NoWorkload()
        self._listeners: list[Callable[[str], None]] = []
        self._watch = EngineWatch(
            self.engines, defaults, client, self.log_path, self.check_process, self._hung
        )
        self._tasks: dict[str, asyncio.Task[None]] = {}  # the load or restart in progress per model
        for engine in self.engines.values():
            engine.listeners.append(self._state_changed)

    def _state_changed(self, engine: EngineRecord, before: EngineState, after: EngineState) -> None:
        """Every state change, logged and counted here, from the one place states change."""
        event(log, "engine.state", logging.DEBUG, model=engine.name, before=before.value, after=after.value)
        if after == EngineState.CRASHED:
            self._metrics.engine_crashed(engine.name)
        elif before == EngineState.CRASHED and after == EngineState.STARTING:
            self._metrics.engine_restarted(engine.name)
        elif after == EngineState.READY and engine.load_seconds is not None and not engine.adopted:
            self._metrics.engine_loaded(engine.name, engine.load_seconds)  # adopted: loaded long ago

    def attach(self, workload: Workload) -> None:
        self._workload = workload

    def on_ready(self, listener: Callable[[str], None]) -> None:
        self._listeners.append(listener)

    def get(self, name: str) -> EngineRecord:
        return self.engines[name]

    def log_path(self, name: str) -> Path:
        return self._log_dir / log_file_name(name)

    def ready_url(self, name: str) -> str | None:
        """Where to send work: a ready engine, or one draining its admitted jobs before a stop."""
        engine = self.engines[name]
        if name in self.upstreams:
            return engine.base_url if self.upstreams.serving(name) else None
        if engine.state == EngineState.READY or (
            engine.state == EngineState.STOPPING and engine.process is not None
        ):
            return engine.base_url
        return None

    # -- admission ---------------------------------------------------------------------------

    def ensure_servable(self, name: str) -> None:
        """Admission asks this first (app/engines/admission.py): queue, start on demand, or 503."""
        engine = self.engines[name]
        if name in self.upstreams:
            refusal = self.upstreams.admission_error(engine)
            if refusal is not None:
                raise refusal
        elif admission(engine) == "start":
            self.begin_start(name)

    # -- start -------------------------------------------------------------------------------

    def begin_start(self, name: str) -> EngineRecord:
        """Start the engine (or join the load in progress) and return without waiting for it.

        Placement and the command line are checked before anything is spawned, so a start
        that cannot work fails now with the reason (PlacementFailed / ConfigError).
        """
        engine = self.engines[name]
        if name in self.upstreams:
            raise NotManaged(name, engine.base_url)
        if engine.state in (EngineState.READY, EngineState.STARTING):
            return engine
        if engine.state == EngineState.STOPPING:
            raise ModelUnavailable(f"model {name!r} is stopping; start it again once it is stopped")
        if engine.gave_up:  # nor the auto-switcher: an operator's start clears it first
            raise given_up(engine)
        task = self._tasks.get(name)
        if engine.state == EngineState.CRASHED and task is not None and not task.done():
            task.cancel()  # an operator start overrides the pending backoff
        port = engine.settings.port or free_port()
        gpus, argv = self._plan(engine, port)
        engine.begin_load(self._clock.now(), port, gpus)
        if self._spawn(engine, argv):  # now, so the caller sees the pid and a second start joins
            self._tasks[name] = asyncio.create_task(
                self._until_ready(engine, argv), name=f"engine-start:{name}"
            )
        return engine

    async def start(self, name: str, *, wait: bool) -> EngineRecord:
        """An operator's start: begin it (or join the load in progress); with `wait`, return
        once the load is over. Returns only a starting or ready engine; any other outcome (the
        spawn failed, the load failed or timed out, a stop cancelled it) raises
        EngineStartFailed with the reason, so no caller reports a start that did not happen.

        An operator's start of a model that is not running is a decision that it should run
        again: its crash history is cleared, so the next crash is counted from zero and not
        given up on at once (the crashes that made it `failed` are still in the window).
        """
        engine = self.engines[name]
        if engine.state in (EngineState.FAILED, EngineState.STOPPED, EngineState.CRASHED):
            engine.crashes.clear()
            engine.gave_up = False
        engine = self.begin_start(name)
        task = self._tasks.get(name)
        if wait and task is not None and engine.state == EngineState.STARTING:
            # wait, not shield: a load cancelled by a stop is an outcome to report, and a caller
            # that goes away leaves the load running
            await asyncio.wait({task})
        if engine.state not in (EngineState.STARTING, EngineState.READY):
            raise EngineStartFailed(name, engine.state.value, engine.reason or engine.last_error or "")
        return engine

    def _plan(self, engine: EngineRecord, port: int) -> tuple[list[int], list[str]]:
        """Place the engine and build its command line, before anything is spawned: a start that
        cannot work is `failed` now with the reason (PlacementFailed / ConfigError, raised)."""
        try:
            placed = place_engine(engine, self.engines.values(), self.inventory)
            argv = self._command(engine, port, [gpu.total_bytes for gpu in placed])
        except GatewayError as exc:
            if engine.state != EngineState.FAILED:
                engine.move(EngineState.FAILED, exc.message)
            engine.reason = engine.last_error = exc.message
            engine.placement_failed = isinstance(exc, PlacementFailed)
            raise
        return [gpu.index for gpu in placed], argv

    def _spawn(self, engine: EngineRecord, argv: list[str]) -> bool:
        problem = self._loader.spawn(engine, argv)
        if problem is not None:
            self._fail(engine, problem)
        return problem is None

    async def _load(self, engine: EngineRecord, argv: list[str]) -> None:
        if self._spawn(engine, argv):
            await self._until_ready(engine, argv)

    async def _until_ready(self, engine: EngineRecord, argv: list[str]) -> None:
        problem = await self._loader.until_healthy(engine, argv)
        if problem is not None:
            self._fail(engine, problem)
            return
        self._ready(engine)
        await self._records.remember_ready(engine)

    def _ready(self, engine: EngineRecord) -> None:
        engine.became_ready(self._clock.now())
        event(log, "engine.ready", model=engine.name, port=engine.port, load_s=engine.load_seconds)
        self._announce_ready(engine)

    def _announce_ready(self, engine: EngineRecord) -> None:
        """Dispatchers waiting for this engine claim its queued jobs now, not at their next poll."""
        for listener in self._listeners:
            listener(engine.name)

    def _count_failure(self, engine: EngineRecord) -> RestartPlan:
        """Add a crash or failed load to the engine's history inside the window, and decide."""
        d = self._defaults
        plan = plan_restart(
            engine.crashes,
            self._clock.monotonic(),
            window_s=d.crash_window_seconds,
            max_crashes=d.max_crashes,
            first_backoff_s=d.restart_backoff_seconds,
            max_backoff_s=d.restart_backoff_max_seconds,
        )
        engine.crashes = plan.crashes
        return plan

    def _fail(self, engine: EngineRecord, reason: str) -> None:
        """A load that failed. It counts with the crashes: an on_demand model is started again
        by the next request, and one whose loads keep failing (each may hold a GPU for minutes
        until its startup timeout) is given up on like a crash loop, until an operator's start."""
        engine.move(EngineState.FAILED, reason)
        engine.last_error = reason
        engine.process = None
        plan = self._count_failure(engine)  # its backoff is unused: a request or an admin starts it
        if plan.gave_up:
            self._give_up(engine, "failed", plan, reason)
            return
        event(log, "engine.failed", logging.ERROR, model=engine.name, reason=reason)

    def _give_up(self, engine: EngineRecord, what: str, plan: RestartPlan, reason: str) -> None:
        """Crashed or failed `max_crashes` times in the window: GET /admin/models and the 503s
        say so, and only an operator's start runs it again."""
        window = self._defaults.crash_window_seconds
        engine.give_up(f"{what} {len(plan.crashes)} times in {window:g} s; last: {reason}")
        event(log, "engine.gave_up", logging.ERROR, model=engine.name, reason=engine.reason)

    # -- stop --------------------------------------------------------------------------------

    async def stop(
        self, name: str, *, force: bool, drain: bool = False, reason: str = "stopped by an operator"
    ) -> Doc:
        """Stop admitting, deal with the model's work, stop the process tree for sure.

        Three ways, because stopping a busy model is a decision an operator must make:
        neither flag refuses a busy model (409); `drain` lets running and queued jobs finish
        for up to `stop_grace_seconds` (what is left then is cancelled); `force` cancels them
        now. Returns what was confirmed (port closed, GPU memory freed).
        """
        engine = self.engines[name]
        if name in self.upstreams:
            raise NotManaged(name, engine.base_url)
        if engine.state in (EngineState.STOPPED, EngineState.FAILED) and engine.process is None:
            if engine.state == EngineState.FAILED:
                engine.move(EngineState.STOPPED, reason)
            return {"stopped": False, "already": True}
        if engine.state == EngineState.STOPPING:
            raise ModelBusy(f"model {name!r} is already stopping")
        running = self._workload.running(name)
        queued = await self._workload.queued(name)
        if not (force or drain) and (running or queued):
            raise ModelBusy(
                f"model {name!r} is busy ({len(running)} running, {queued} queued); stop it with "
                "graceful=true to let them finish, or force=true to cancel them"
            )
        task = self._tasks.pop(name, None)
        if engine.state != EngineState.FAILED:
            # before the load is cancelled: a start waiting on that load then sees the stop,
            # not a load that ended while the model still looked `starting`
            engine.move(EngineState.STOPPING, reason)
        await cancel_and_wait(task)
        if engine.state == EngineState.FAILED:  # a failed start that still holds a process
            engine.move(EngineState.STOPPED, reason)
            await self._teardown.kill(engine)
            return {"stopped": True}
        event(log, "engine.stopping", model=name, force=force, running=len(running), queued=queued)
        if force:
            cancelled = await self._workload.cancel_all(name, f"model {name!r} was stopped (force): {reason}")
        else:
            cancelled = await self._workload.drain(name, self._defaults.stop_grace_seconds)
        confirmed = await self._teardown.kill(engine)
        engine.move(EngineState.STOPPED, reason)
        engine.ready_at = None
        return {"stopped": True, "cancelled_jobs": cancelled, **confirmed}

    # -- whole-gateway start and stop -------------------------------------------------------

    async def start_all(self) -> None:
        """Adopt or kill what a killed gateway left, start autostart models, begin watching.

        Loads are not awaited: a vLLM model takes minutes, and requests for it queue meanwhile.
        """
        for adoption in await self._adoption.review(self.engines, self.upstreams):
            await self._adopt(adoption)
        self.upstreams.start()
        for name, engine in self.engines.items():
            if name in self.upstreams:
                continue
            if engine.settings.autostart and engine.state == EngineState.STOPPED:
                with contextlib.suppress(GatewayError):  # the reason is on the record
                    self.begin_start(name)
        self._watch.start()

    async def wait_loads(self, timeout_s: float) -> None:
        """For callers that want engines ready before they go on (quick start, tests)."""
        tasks = [t for t in self._tasks.values() if not t.done()]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout_s)

    async def stop_all(self) -> None:
        await self.upstreams.stop()
        await self._watch.stop()
        await cancel_and_wait(*self._tasks.values())
        self._tasks.clear()
        await asyncio.gather(
            *(self._teardown.kill(e) for e in self.engines.values() if e.process is not None),
            return_exceptions=True,
        )

    async def _adopt(self, adoption: Adoption) -> None:
        """Take over an engine a killed gateway left (app/engines/adoption.py decided): a ready
        one serves at once; one still loading is watched with what is left of its timeout."""
        engine = adoption.engine
        engine.begin_load(
            adoption.started_at or self._clock.now(), adoption.port, adoption.gpus, adopted=True
        )
        engine.process = adoption.process
        if adoption.loading:
            event(log, "engine.adopted_loading", model=engine.name, pid=engine.pid, port=engine.port)
            self._tasks[engine.name] = asyncio.create_task(
                self._until_ready(engine, adoption.argv), name=f"engine-start:{engine.name}"
            )
            return
        self._ready(engine)
        await self._records.remember_ready(engine)
        event(log, "engine.adopted", model=engine.name, pid=engine.pid, port=engine.port)

    # -- watching (app/engines/watch.py observes, these decide) -----------------------------

    def check_process(self, name: str, failed_job: str | None = None) -> None:
        """Notice at once that a ready engine's process exited (also called by the dispatcher
        with the job whose call failed to connect, so a retry does not go to a dead engine and
        the crash record names that job even if the exit is seen only later). An external
        upstream has no process: its health is checked again at once instead."""
        if name in self.upstreams:
            self.upstreams.suspect(name)
            return
        engine = self.engines[name]
        if engine.state != EngineState.READY or engine.process is None:
            return
        if failed_job is not None:
            engine.suspected_jobs.add(failed_job)
        code = engine.process.exit_code()
        if code is not None:
            self._crashed(engine, code, f"exited with code {code}")

    def _hung(self, engine: EngineRecord, reason: str) -> None:
        self._crashed(engine, None, reason)

    def _crashed(self, engine: EngineRecord, code: int | None, reason: str) -> None:
        engine.move(EngineState.CRASHED, reason)
        engine.last_error = reason
        # the jobs on it now (read before the restart task runs), and those whose calls failed
        # against it before the exit was seen
        affected = sorted(set(self._workload.running(engine.name)) | engine.suspected_jobs)
        engine.suspected_jobs.clear()
        self._tasks[engine.name] = asyncio.create_task(
            self._recover(engine, code, reason, affected), name=f"engine-restart:{engine.name}"
        )

    async def _recover(
        self, engine: EngineRecord, code: int | None, reason: str, affected: list[str]
    ) -> None:
        """Record the crash, kill what is left (a hung engine still runs), restart with backoff."""
        tail = proc.log_tail(self.log_path(engine.name), 30)
        pid = engine.pid
        await self._teardown.kill(engine)  # a hung engine: its in-flight calls fail now and are retried
        plan = self._count_failure(engine)
        restart = "gave up" if plan.gave_up else f"restart in {plan.backoff_s:g} s"
        event(log, "engine.crashed", logging.ERROR, model=engine.name, code=code, reason=reason,
              crashes=len(plan.crashes), jobs=len(affected), restart=restart)  # fmt: skip
        with contextlib.suppress(Exception):  # the database being down must not stop a restart
            await self.crash_log.record(
                engine.name, exit_code=code, reason=reason, log_tail=tail, jobs_affected=affected,
                pid=pid, restart=restart,
            )  # fmt: skip
        if plan.gave_up:
            self._give_up(engine, "crashed", plan, reason)
            return
        await asyncio.sleep(plan.backoff_s)
        if engine.state != EngineState.CRASHED:
            return
        try:
            gpus, argv = self._plan(engine, engine.port)
        except GatewayError:
            return  # failed, with the reason on the record
        engine.begin_load(self._clock.now(), engine.port, gpus)  # a load of ours now
        await self._load(engine, argv)

    def _command(self, engine: EngineRecord, port: int, gpu_total_bytes: list[int]) -> list[str]:
        return command_for(engine.name, engine.settings, port, self._python, gpu_total_bytes)
