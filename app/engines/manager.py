"""The engine supervisor: the one owner of every engine's lifecycle (docs/ARCHITECTURE.md, "Engines").

It places engines on GPUs, starts them in their own process groups, waits for health, watches
them (process exit at once, HTTP health every few seconds for hangs), records crashes and
restarts with capped backoff, stops them with a drain and for sure (group SIGTERM → SIGKILL,
port closed, GPU memory released), and adopts engines a killed gateway left running.

Why the supervisor and not the dispatchers own this: a model's state decides admission
(503 now, or queue while it loads), dispatch (only to a ready engine) and the admin API, and
each of those must see one consistent answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import socket
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import PyMongoError

from app.clock import Clock
from app.engines import process as proc
from app.engines.commands import build_command, build_environment, engine_needs_gpu, health_path
from app.engines.crashes import CrashLog
from app.engines.gpus import GIB, GpuInfo, GpuInventory, memory_released
from app.engines.lifecycle import EngineRecord, EngineState, RestartPlan, plan_restart
from app.engines.model_files import resolve_model_file
from app.engines.placement import place, required_bytes
from app.engines.upstream import UpstreamWatch
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

log = logging.getLogger("gateway.engines")
Doc = dict[str, Any]


class Workload(Protocol):
    """What the supervisor needs to know about a model's requests (the dispatchers know)."""

    def running(self, model: str) -> list[str]: ...

    async def queued(self, model: str) -> int: ...

    async def cancel_all(self, model: str, reason: str) -> int: ...

    async def settle(self, model: str, timeout_s: float) -> None: ...


class _NoWorkload:
    def running(self, model: str) -> list[str]:
        return []

    async def queued(self, model: str) -> int:
        return 0

    async def cancel_all(self, model: str, reason: str) -> int:
        return 0

    async def settle(self, model: str, timeout_s: float) -> None:
        return None


def uses_gpu(settings: ModelSettings) -> bool:
    """GPU kinds always; any other kind only if its config asks for GPUs (tests emulate that)."""
    if engine_needs_gpu(settings.kind):
        return settings.gpu.count > 0
    return "gpu" in settings.model_fields_set and settings.gpu.count > 0


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
        self._records = records
        self._client = client
        self._clock = clock
        self._log_dir = log_dir
        self._python = defaults.python or sys.executable
        self._host = socket.gethostname()
        self._workload: Workload = _NoWorkload()
        self._listeners: list[Callable[[str], None]] = []
        self._watch_task: asyncio.Task[None] | None = None
        self._tasks: dict[str, asyncio.Task[None]] = {}  # the load or restart in progress per model
        self._last_health_round = 0.0

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
        """Admission asks this first: queue for a model that is (or will be) loading, else 503.

        A stopped or failed model with `on_demand` starts here; placement runs now, so a model
        that cannot fit is refused at once with the reason instead of timing out in the queue.
        Not one the supervisor gave up on after too many crashes: traffic must not restart a
        crash loop forever, so that waits for an operator's start.
        """
        engine = self.engines[name]
        if name in self.upstreams:
            refusal = self.upstreams.admission_error(engine)
            if refusal is not None:
                raise refusal
            return
        if engine.state in (EngineState.READY, EngineState.STARTING, EngineState.CRASHED):
            return
        if engine.state == EngineState.STOPPING:
            raise ModelUnavailable(f"model {name!r} is stopping")
        if engine.gave_up:
            raise _given_up(engine)
        if engine.settings.on_demand:
            self.begin_start(name)
            return
        if engine.state == EngineState.FAILED:
            if engine.placement_failed:  # its reason names the model, the GPUs and who holds them
                raise PlacementFailed(name, engine.reason)
            raise ModelUnavailable(f"model {name!r} cannot be served now: {engine.reason}")
        raise ModelUnavailable(
            f"model {name!r} is stopped; an admin can start it (POST /admin/models/{name}/start)"
        )

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
            raise _given_up(engine)
        task = self._tasks.get(name)
        if engine.state == EngineState.CRASHED and task is not None and not task.done():
            task.cancel()  # an operator start overrides the pending backoff
        try:
            placed = self._place(engine)
            port = engine.settings.port or free_port()
            totals = [gpu.total_bytes for gpu in placed]
            argv = self._command(engine, port, totals)
        except GatewayError as exc:
            if engine.state != EngineState.FAILED:
                engine.move(EngineState.FAILED, exc.message)
            engine.reason = engine.last_error = exc.message
            engine.placement_failed = isinstance(exc, PlacementFailed)
            raise
        engine.move(EngineState.STARTING)
        engine.placement_failed = False
        engine.port, engine.gpus, engine.adopted = port, [gpu.index for gpu in placed], False
        engine.started_at, engine.ready_at, engine.load_seconds = self._clock.now(), None, None
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
        if name in self.upstreams:
            raise NotManaged(name, engine.base_url)
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

    def _place(self, engine: EngineRecord) -> list[GpuInfo]:
        """The GPUs the engine gets (their sizes too: the vLLM command line needs them)."""
        if not uses_gpu(engine.settings):
            return []
        snapshot = self._effective_inventory(exclude=engine.name)
        owners = self._gpu_owners(exclude=engine.name)
        placement = place(
            engine.name,
            engine.settings.gpu,
            engine.settings.kind,
            snapshot,
            owners,
            unusable_reason="" if self.inventory.available else self.inventory.reason,
        )
        return [gpu for gpu in snapshot if gpu.index in placement.gpus]

    def _gpu_owners(self, exclude: str | None = None) -> dict[int, list[str]]:
        owners: dict[int, list[str]] = {}
        for other in self.engines.values():
            if other.name != exclude and other.gpus and other.process is not None:
                for index in other.gpus:
                    owners.setdefault(index, []).append(other.name)
        return owners

    def _effective_inventory(self, exclude: str | None = None) -> list[GpuInfo]:
        """The inventory's free memory, less what our engines reserved but do not hold yet.

        A vLLM engine that is still loading holds little memory yet; without this, two starts
        a second apart would both see the GPU free and the second would fail to load. Memory
        the engine's processes already hold is in the inventory's numbers, so only the rest
        of its reservation is taken off.
        """
        snapshot = self.inventory.snapshot()
        pending: dict[int, int] = {}
        for other in self.engines.values():
            if other.name == exclude or not other.gpus or other.pid is None:
                continue
            tree = set(proc.tree_pids(other.pid))
            for gpu in snapshot:
                if gpu.index in other.gpus:
                    held = sum(p.used_bytes or 0 for p in gpu.processes if p.pid in tree)
                    need = required_bytes(other.settings.gpu, gpu)
                    pending[gpu.index] = pending.get(gpu.index, 0) + max(0, need - held)
        adjusted = []
        for gpu in snapshot:
            free = max(0, gpu.free_bytes - pending.get(gpu.index, 0))
            adjusted.append(
                GpuInfo(gpu.index, gpu.name, gpu.total_bytes, free, gpu.total_bytes - free, gpu.processes)
            )
        return adjusted

    def _spawn(self, engine: EngineRecord, argv: list[str]) -> bool:
        log_path = self.log_path(engine.name)
        try:
            proc.rotate_log(log_path, self._defaults.log_max_bytes, self._defaults.log_backups)
            engine.process = proc.spawn(argv, build_environment(engine.settings, engine.gpus), log_path)
        except OSError as exc:
            self._fail(engine, f"could not run {argv[0]}: {exc.strerror or exc}")
            return False
        event(log, "engine.starting", model=engine.name, pid=engine.pid, port=engine.port, gpus=engine.gpus)
        return True

    async def _load(self, engine: EngineRecord, argv: list[str]) -> None:
        if self._spawn(engine, argv):
            await self._until_ready(engine, argv)

    async def _until_ready(self, engine: EngineRecord, argv: list[str]) -> None:
        """Record the engine, then poll health until ready, the process exits, or the startup
        timeout (then kill it).

        The timeout counts from `started_at` by the injected clock, not from this call: a load
        adopted from a killed gateway gets only what is left of it. Health is polled at least
        once, so an adopted engine that finished loading while no gateway watched is taken.
        """
        assert engine.process is not None
        await self._remember(engine, argv)
        log_path = self.log_path(engine.name)
        timeout = engine.settings.startup_timeout or self._defaults.startup_timeout
        elapsed = (self._clock.now() - engine.started_at).total_seconds() if engine.started_at else 0.0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout - elapsed
        while True:
            code = engine.process.exit_code()
            if code is not None:
                tail = proc.log_tail(log_path, 5)
                await self._kill(engine)  # children it started may outlive it, holding the GPU
                self._fail(engine, f"exited with code {code} while starting; log: {tail}")
                return
            if await self._client.healthy(self._health_url(engine), timeout_s=1.0):
                self._ready(engine)
                await self._remember_ready(engine)
                return
            if loop.time() >= deadline:
                break
            await asyncio.sleep(self._defaults.health_interval)
        await self._kill(engine)
        self._fail(
            engine,
            f"not healthy within {timeout:g} s (startup_timeout); log: {proc.log_tail(log_path, 5)}",
        )

    def _ready(self, engine: EngineRecord) -> None:
        engine.move(EngineState.READY)
        engine.ready_at = self._clock.now()
        engine.health_failures = 0
        engine.suspected_jobs.clear()
        if engine.started_at is not None:
            engine.load_seconds = round((engine.ready_at - engine.started_at).total_seconds(), 3)
            if not engine.adopted:  # an adopted engine was loaded by another gateway, long ago
                self._metrics.engine_loaded(engine.name, engine.load_seconds)
        event(log, "engine.ready", model=engine.name, port=engine.port, load_s=engine.load_seconds)
        self._announce_ready(engine)

    def _announce_ready(self, engine: EngineRecord) -> None:
        """Dispatchers waiting for this engine claim its queued jobs now, not at their next poll."""
        for listener in self._listeners:
            listener(engine.name)

    def _count_failure(self, engine: EngineRecord) -> RestartPlan:
        """Add a crash or failed load to the engine's history inside the window, and decide."""
        plan = plan_restart(
            engine.crashes,
            self._clock.monotonic(),
            window_s=self._defaults.crash_window_seconds,
            max_crashes=self._defaults.max_crashes,
            first_backoff_s=self._defaults.restart_backoff_seconds,
            max_backoff_s=self._defaults.restart_backoff_max_seconds,
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
            window = self._defaults.crash_window_seconds
            verdict = f"failed {len(engine.crashes)} times in {window:g} s; last: {reason}"
            engine.reason = engine.last_error = verdict
            engine.gave_up = True
            event(log, "engine.gave_up", logging.ERROR, model=engine.name, reason=verdict)
            return
        event(log, "engine.failed", logging.ERROR, model=engine.name, reason=reason)

    async def _remember(self, engine: EngineRecord, argv: list[str]) -> None:
        """Persist what a restarted gateway needs to adopt this engine or kill it.

        Written as soon as the process exists (state `starting`), not once it is healthy: a
        vLLM load takes minutes, and a gateway killed during it must leave a record, or the
        next one would never know of an engine that goes on to hold the GPU.
        """
        assert engine.process is not None
        await self._records.replace_one(
            {"_id": engine.name},
            {
                "_id": engine.name,
                "host": self._host,
                "state": EngineState.STARTING.value,
                "pid": engine.process.pid,
                "pgid": engine.process.pgid,
                "create_time": engine.process.create_time,
                "engine_id": engine.process.engine_id,  # finds children that outlive the leader
                "port": engine.port,
                "gpus": engine.gpus,
                "argv": argv,
                "kind": engine.settings.kind,
                "started_at": engine.started_at,
            },
            upsert=True,
        )

    async def _remember_ready(self, engine: EngineRecord) -> None:
        """Mark the record ready (for the adoption log and operators reading the collection).

        The engine serves whether or not this lands, and adoption checks health itself, so a
        database error here is logged, not raised into the load.
        """
        try:
            await self._records.update_one(
                {"_id": engine.name, "host": self._host, "pid": engine.pid},
                {"$set": {"state": EngineState.READY.value}},
            )
        except PyMongoError as exc:
            event(log, "engine.record_failed", logging.WARNING, model=engine.name, error=repr(exc))

    async def _forget(self, engine: EngineRecord) -> None:
        await self._records.delete_one({"_id": engine.name, "host": self._host})

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
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if engine.state == EngineState.FAILED:  # a failed start that still holds a process
            engine.move(EngineState.STOPPED, reason)
            await self._kill(engine)
            return {"stopped": True}
        event(log, "engine.stopping", model=name, force=force, running=len(running), queued=queued)
        if force:
            cancelled = await self._workload.cancel_all(name, f"model {name!r} was stopped (force): {reason}")
        else:
            cancelled = await self._drain(name)
        confirmed = await self._kill(engine)
        engine.move(EngineState.STOPPED, reason)
        engine.ready_at = None
        return {"stopped": True, "cancelled_jobs": cancelled, **confirmed}

    async def _drain(self, name: str) -> int:
        """Let running and queued jobs finish (up to the grace period); cancel what is left."""
        grace = self._defaults.stop_grace_seconds
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while True:
            await self._workload.settle(name, max(0.0, deadline - loop.time()))
            busy = self._workload.running(name) or await self._workload.queued(name)
            if not busy or loop.time() >= deadline:
                break
            await asyncio.sleep(0.05)  # queued jobs are being claimed
        return await self._workload.cancel_all(name, f"model {name!r} was stopped after a {grace:g} s drain")

    async def _kill(self, engine: EngineRecord) -> Doc:
        """Stop the process tree for sure, then confirm the port closed and GPU memory freed."""
        process, engine.process = engine.process, None
        confirmed: Doc = {"pid": process.pid if process else None}
        if process is not None:
            pids = await asyncio.to_thread(proc.stop, process, self._defaults.stop_timeout)
            event(log, "engine.stopped", model=engine.name, pid=process.pid)
            confirmed["port_closed"] = await self._port_closed(engine.port)
            if engine.gpus and self.inventory.available:
                released = await self._gpu_released(engine.gpus, pids or [process.pid])
                confirmed["gpu_memory_released"] = released
                if not released:
                    engine.last_error = (
                        f"GPU memory on GPU(s) {engine.gpus} still held by pids {pids} "
                        f"{self._defaults.gpu_release_timeout:g} s after the stop"
                    )
                    event(log, "engine.gpu_not_released", logging.ERROR, model=engine.name, pids=pids)
        await self._forget(engine)
        engine.gpus = []
        return confirmed

    async def _port_closed(self, port: int, timeout_s: float = 5.0) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            try:
                _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 1.0)
            except (OSError, TimeoutError):
                return True
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            if loop.time() > deadline:
                return False
            await asyncio.sleep(0.1)

    async def _gpu_released(self, gpus: list[int], pids: list[int]) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._defaults.gpu_release_timeout
        while True:
            if await asyncio.to_thread(memory_released, self.inventory, gpus, pids):
                return True
            if loop.time() > deadline:
                return False
            await asyncio.sleep(0.5)

    # -- whole-gateway start and stop -------------------------------------------------------

    async def start_all(self) -> None:
        """Adopt or kill what a killed gateway left, start autostart models, begin watching.

        Loads are not awaited: a vLLM model takes minutes, and requests for it queue meanwhile.
        """
        await self._adopt_or_kill()
        self.upstreams.start()
        for name, engine in self.engines.items():
            if name in self.upstreams:
                continue
            if engine.settings.autostart and engine.state == EngineState.STOPPED:
                with contextlib.suppress(GatewayError):  # the reason is on the record
                    self.begin_start(name)
        self._watch_task = asyncio.create_task(self._watch(), name="engine-watch")

    async def wait_loads(self, timeout_s: float) -> None:
        """For callers that want engines ready before they go on (quick start, tests)."""
        tasks = [t for t in self._tasks.values() if not t.done()]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout_s)

    async def stop_all(self) -> None:
        await self.upstreams.stop()
        if self._watch_task is not None:
            self._watch_task.cancel()
            await asyncio.gather(self._watch_task, return_exceptions=True)
            self._watch_task = None
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        self._tasks.clear()
        await asyncio.gather(
            *(self._kill(e) for e in self.engines.values() if e.process is not None), return_exceptions=True
        )

    async def _adopt_or_kill(self) -> None:
        """Engines recorded on this host by a gateway that did not stop them.

        Adopted: still the same process (pid and start time) and still configured with the same
        command line; then one that was ready must answer health now, and one that was still
        loading is watched as a load in progress (a vLLM load takes minutes; killing it would
        throw them away), with what is left of its startup timeout. Everything else is an
        orphan holding memory: killed (its recorded process group, and every process marked
        with its engine id, so a child that outlived a dead leader is killed too).
        """
        async for doc in self._records.find({"host": self._host}):
            name = str(doc["_id"])
            # records of gateways before pgid was stored: the engine led its own group
            pgid = int(doc["pgid"] if "pgid" in doc else doc["pid"])
            left = proc.SpawnedProcess(
                int(doc["pid"]), float(doc["create_time"]), pgid, None, str(doc.get("engine_id") or "")
            )
            alive = left.exit_code() is None  # the same process, and not a zombie nobody reaps
            engine = self.engines.get(name)
            loading = doc.get("state") == EngineState.STARTING.value
            reason = await self._adoption_refusal(engine, doc, alive, loading)
            if reason is None and engine is not None:
                engine.move(EngineState.STARTING)
                engine.process, engine.port, engine.gpus = left, int(doc["port"]), list(doc.get("gpus") or [])
                engine.started_at, engine.adopted = doc.get("started_at") or self._clock.now(), True
                if loading:
                    event(log, "engine.adopted_loading", model=name, pid=left.pid, port=engine.port)
                    self._tasks[name] = asyncio.create_task(
                        self._until_ready(engine, list(doc["argv"])), name=f"engine-start:{name}"
                    )
                    continue
                self._ready(engine)
                await self._remember_ready(engine)
                event(log, "engine.adopted", model=name, pid=left.pid, port=engine.port)
                continue
            pids = await asyncio.to_thread(proc.stop, left, self._defaults.stop_timeout)
            if pids:  # the leader, or what survived it
                event(
                    log,
                    "engine.orphan_stopped",
                    logging.WARNING,
                    model=name,
                    pid=left.pid,
                    pids=pids,
                    reason=reason,
                )
            await self._records.delete_one({"_id": name})

    async def _adoption_refusal(
        self, engine: EngineRecord | None, doc: Doc, alive: bool, loading: bool
    ) -> str | None:
        if not alive:
            return "process is gone"
        if engine is None:
            return "model is no longer configured"
        if engine.name in self.upstreams:
            return "model is now an external upstream (kind openai)"
        sizes = {gpu.index: gpu.total_bytes for gpu in self.inventory.snapshot()}
        totals = [sizes[index] for index in doc.get("gpus") or [] if index in sizes]
        try:
            wanted = self._command(engine, int(doc["port"]), totals)
        except GatewayError as exc:
            return exc.message
        if wanted != doc.get("argv"):
            return "configuration changed since it was started"
        if loading:
            return None  # not healthy yet, as expected: the load watch polls its health
        url = f"http://127.0.0.1:{int(doc['port'])}{health_path(engine.settings.kind)}"
        for _ in range(3):  # a busy machine can be slow to answer; a hung engine never answers
            if await self._client.healthy(url, timeout_s=2.0):
                return None
            await asyncio.sleep(0.5)
        return "not healthy"

    # -- watching ----------------------------------------------------------------------------

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self._defaults.health_interval)
            for engine in self.engines.values():
                self.check_process(engine.name)
            if loop.time() - self._last_health_round >= self._defaults.health_check_interval:
                self._last_health_round = loop.time()
                ready = [
                    e for e in self.engines.values() if e.state == EngineState.READY and e.process is not None
                ]
                await asyncio.gather(*(self._check_health(e) for e in ready))
                await self._rotate_logs()

    async def _rotate_logs(self) -> None:
        """Engines that run for weeks write without end (vLLM logs every few seconds): their logs
        are cut while they run, not only at a restart."""
        for engine in self.engines.values():
            if engine.process is None:
                continue
            path = self.log_path(engine.name)
            limit, backups = self._defaults.log_max_bytes, self._defaults.log_backups
            try:
                if await asyncio.to_thread(proc.rotate_log, path, limit, backups, running=True):
                    event(log, "engine.log_rotated", model=engine.name, path=str(path))
            except OSError as exc:  # a full disk must not stop the watch loop
                event(log, "engine.log_rotate_failed", logging.WARNING, model=engine.name, error=repr(exc))

    async def _check_health(self, engine: EngineRecord) -> None:
        healthy = await self._client.healthy(
            self._health_url(engine), timeout_s=self._defaults.health_check_timeout
        )
        if engine.state != EngineState.READY:
            return
        if healthy:
            engine.health_failures = 0
            return
        engine.health_failures += 1
        event(log, "engine.unhealthy", logging.WARNING, model=engine.name, failures=engine.health_failures)
        if engine.health_failures >= self._defaults.health_check_failures:
            reason = f"health check failed {engine.health_failures} times in a row (hung)"
            self._crashed(engine, None, reason)

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

    def _crashed(self, engine: EngineRecord, code: int | None, reason: str) -> None:
        engine.move(EngineState.CRASHED, reason)
        engine.last_error = reason
        self._metrics.engine_crashed(engine.name)
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
        await self._kill(engine)  # a hung engine: its in-flight calls fail now and are retried
        window = self._defaults.crash_window_seconds
        plan = self._count_failure(engine)
        restart = "gave up" if plan.gave_up else f"restart in {plan.backoff_s:g} s"
        event(
            log,
            "engine.crashed",
            logging.ERROR,
            model=engine.name,
            code=code,
            reason=reason,
            crashes=len(plan.crashes),
            jobs=len(affected),
            restart=restart,
        )
        with contextlib.suppress(Exception):  # the database being down must not stop a restart
            await self.crash_log.record(
                engine.name,
                exit_code=code,
                reason=reason,
                log_tail=tail,
                jobs_affected=affected,
                pid=pid,
                restart=restart,
            )
        if plan.gave_up:
            verdict = f"crashed {len(plan.crashes)} times in {window:g} s; last: {reason}"
            engine.move(EngineState.FAILED, verdict)
            engine.last_error = verdict  # GET /admin/models shows why it is no longer restarted
            engine.gave_up = True
            event(log, "engine.gave_up", logging.ERROR, model=engine.name, reason=verdict)
            return
        await asyncio.sleep(plan.backoff_s)
        if engine.state != EngineState.CRASHED:
            return
        try:
            placed = self._place(engine)
            totals = [gpu.total_bytes for gpu in placed]
            argv = self._command(engine, engine.port, totals)
        except GatewayError as exc:
            engine.move(EngineState.FAILED, exc.message)
            return
        engine.move(EngineState.STARTING)
        engine.gpus, engine.started_at = [gpu.index for gpu in placed], self._clock.now()
        engine.adopted, engine.ready_at, engine.load_seconds = False, None, None  # a load of ours now
        self._metrics.engine_restarted(engine.name)
        await self._load(engine, argv)

    def _command(self, engine: EngineRecord, port: int, gpu_total_bytes: list[int]) -> list[str]:
        """The engine's argv on `port` (ConfigError, a GatewayError, when its config cannot run)."""
        model_file = None
        if engine.settings.kind == "llama_cpp":
            model_file = resolve_model_file(engine.name, engine.settings.path)
        return build_command(
            engine.name,
            engine.settings,
            port=port,
            python=self._python,
            gpu_total_bytes=gpu_total_bytes,
            model_file=model_file,
        )

    @staticmethod
    def _health_url(engine: EngineRecord) -> str:
        return engine.base_url + health_path(engine.settings.kind)

    # -- views -------------------------------------------------------------------------------

    def summary(self) -> dict[str, Doc]:
        """Public view (unauthenticated /health): states only, no log lines or pids."""
        return {
            name: {
                "state": e.state.value,
                "kind": e.settings.kind,
                **({"loading_seconds": self.loading_seconds(e)} if e.state == EngineState.STARTING else {}),
            }
            for name, e in self.engines.items()
        }

    def loading_seconds(self, engine: EngineRecord) -> float | None:
        if engine.state != EngineState.STARTING or engine.started_at is None:
            return None
        return round((self._clock.now() - engine.started_at).total_seconds(), 1)

    def gpus_view(self) -> Doc:
        owners = self._gpu_owners()
        pids = {e.pid: e.name for e in self.engines.values() if e.pid is not None}
        gpus = []
        for gpu in self.inventory.snapshot():
            gpus.append(
                {
                    "index": gpu.index,
                    "name": gpu.name,
                    "total_gib": round(gpu.total_bytes / GIB, 2),
                    "free_gib": round(gpu.free_bytes / GIB, 2),
                    "used_gib": round(gpu.used_bytes / GIB, 2),
                    "models": owners.get(gpu.index, []),
                    "processes": [
                        {
                            "pid": p.pid,
                            "used_gib": None if p.used_bytes is None else round(p.used_bytes / GIB, 2),
                            "model": pids.get(p.pid),
                        }
                        for p in gpu.processes
                    ],
                }
            )
        return {"available": self.inventory.available, "reason": self.inventory.reason or None, "gpus": gpus}


def _given_up(engine: EngineRecord) -> ModelUnavailable:
    """The 503 for a model the supervisor gave up on: the crash verdict, and the way out."""
    return ModelUnavailable(
        f"model {engine.name!r} cannot be served now: {engine.reason}; an admin can start it "
        f"again (POST /admin/models/{engine.name}/start)"
    )


def log_file_name(model: str) -> str:
    """One flat file per model in the log directory. Model names may hold `/` and `:` (hub
    ids such as `deepseek-ai/DeepSeek-OCR`); used as they are, `/` would point into a missing
    directory and `..` segments outside the log directory. Such names are flattened, with a
    short hash so that `a/b` and `a_b` do not share a file."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", model).lstrip(".") or "_"
    if safe == model:
        return f"{model}.log"
    return f"{safe}-{hashlib.sha256(model.encode()).hexdigest()[:8]}.log"
