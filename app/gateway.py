"""The running daemon's services and their start/stop order (owned by the HTTP lifespan)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

from app import __version__
from app.audit import AuditLog
from app.auth.api_keys import ApiKeyService
from app.auth.ratelimit import RateLimiter
from app.auth.throttle import LoginThrottle
from app.auth.tokens import TokenService
from app.auth.users import UserService
from app.autoswitch.switcher import Switcher
from app.chat import ChatService
from app.clock import Clock
from app.dispatch.dispatcher import ModelDispatcher
from app.dispatch.workload import DispatchWorkload
from app.engines.crashes import CrashLog
from app.engines.gpus import GIB, GpuInfo, GpuInventory, NvmlInventory, StaticInventory
from app.engines.manager import EngineManager
from app.engines.upstream import auth_headers
from app.history.missing import MissingModels
from app.history.usage import UsageRollup
from app.logs import event
from app.metrics import GatewayState, LoopLagMonitor, Metrics, build_metrics
from app.models import ModelRegistry
from app.ocr.pages import PageStore
from app.ocr.resolution import DefaultResolution
from app.ocr.runner import OcrRunner
from app.ocr.service import OcrService
from app.proxy.client import EngineClient
from app.queue.history import HistoryPruner
from app.queue.jobs import Doc
from app.queue.retry import RetryPolicy
from app.queue.service import JobQueue
from app.queue.stats import OutcomeCounters
from app.queue.store import JobStore
from app.queue.sweeper import Sweeper, make_worker_id
from app.scheduler import Scheduler
from app.settings import EngineDefaults, Settings, check_secret, redact_uri, upstream_environment
from app.store.batch import BatchWriter
from app.store.database import Database, connect, ensure_indexes
from app.store.embedded import EmbeddedDatabase
from app.store.lease import Lease
from app.store.ttl import prune_expired

log = logging.getLogger("gateway")
AUTOSWITCH_JOB = "autoswitch"


@dataclass
class Gateway:
    """Everything create_app(settings) builds; nothing here lives at module level."""

    settings: Settings
    clock: Clock
    registry: ModelRegistry
    tokens: TokenService
    login_throttle: LoginThrottle
    engine_client: EngineClient = field(default_factory=EngineClient)
    worker_id: str = field(default_factory=make_worker_id)
    embedded: EmbeddedDatabase | None = None
    database: Database | None = None
    writer: BatchWriter | None = None
    queue: JobQueue | None = None
    engines: EngineManager | None = None
    dispatchers: dict[str, ModelDispatcher] = field(default_factory=dict)
    sweeper: Sweeper | None = None
    counters: OutcomeCounters | None = None
    scheduler: Scheduler = field(default_factory=Scheduler)
    users: UserService | None = None
    api_keys: ApiKeyService | None = None
    audit: AuditLog | None = None
    rate_limiter: RateLimiter | None = None
    chat: ChatService | None = None
    ocr: OcrService | None = None
    usage: UsageRollup | None = None
    missing: MissingModels | None = None
    switcher: Switcher | None = None
    _history_pruner: HistoryPruner | None = None
    _rollup_lease: Lease | None = None
    metrics: Metrics = field(default_factory=Metrics)  # the no-op unless build() enables them
    loop_lag: LoopLagMonitor | None = None
    upstream_headers: dict[str, dict[str, str]] = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, settings: Settings, clock: Clock) -> Gateway:
        check_secret(settings.auth.jwt_secret)
        auth = settings.auth
        tokens = TokenService(
            auth.jwt_secret,
            auth.issuer,
            auth.audience,
            auth.token_ttl_seconds,
            auth.refresh_ttl_seconds,
            clock,
        )
        throttle = LoginThrottle(clock, auth.login_max_failures, auth.login_window_seconds)
        worker_id = make_worker_id()
        upstream_headers = auth_headers(settings.models, upstream_environment())  # before anything runs
        capacities = {name: (m.max_concurrent, m.max_waiting) for name, m in settings.models.items()}
        return cls(
            settings=settings,
            clock=clock,
            registry=ModelRegistry(settings.models),
            tokens=tokens,
            login_throttle=throttle,
            worker_id=worker_id,
            upstream_headers=upstream_headers,
            metrics=build_metrics(settings.metrics.enabled, clock, capacities, __version__, worker_id),
        )

    async def start(self) -> None:
        s = self.settings
        s.data_dir.mkdir(parents=True, exist_ok=True)
        s.log_dir.mkdir(parents=True, exist_ok=True)
        uri = s.database.uri
        if uri == "embedded":
            embedded = s.database.embedded
            self.embedded = EmbeddedDatabase(
                s.data_dir, embedded.command, embedded.startup_timeout, embedded.port, embedded.sync_on_commit
            )
            uri = await self.embedded.start()
        self.database = db = await connect(uri, s.database.name, s.database.write_concern)
        await ensure_indexes(db)
        self.writer = BatchWriter(db.jobs, s.database.batch_max_ops, self.metrics)
        self.writer.start()
        store = JobStore(
            db.jobs,
            self.writer,
            timedelta(days=s.history.retention_days),
            store_prompts=s.history.store_prompts,
            store_outputs=s.history.store_outputs,
        )
        capacities = {name: m.max_concurrent + m.max_waiting for name, m in s.models.items()}
        self.counters = OutcomeCounters(db.queue_stats)
        self.queue = queue = JobQueue(
            store,
            self.clock,
            self.worker_id,
            capacities,
            s.queue.lease_seconds,
            s.queue.poll_interval_seconds,
            self.counters,
            self.metrics,
        )
        await queue.load_slots()
        self.users = UserService(db.users, self.clock)
        self.api_keys = ApiKeyService(db.api_keys, self.clock)
        self.audit = AuditLog(db.audit, self.clock, s.history.retention_days)
        await self.audit.ensure_indexes()
        limits = s.rate_limit
        self.rate_limiter = RateLimiter(
            db.rate_limits,
            self.clock,
            limits.per_minute,
            limits.window_seconds,
            list(limits.exempt_roles),
            metrics=self.metrics,
        )
        await self.rate_limiter.ensure_indexes()
        self.rate_limiter.start()
        await self.engine_client.start()
        crash_log = CrashLog(db.crash_logs, self.clock, s.history.retention_days)
        await crash_log.ensure_indexes()
        self.missing = MissingModels(db.missing_models, self.clock, s.history.retention_days)
        await self.missing.ensure_indexes()
        self.usage = UsageRollup(
            db.jobs,
            db.usage,
            db.runtime_settings,
            self.clock,
            s.history.retention_days,
            settle_s=s.history.rollup_settle_seconds,
        )
        await self.usage.ensure_indexes()
        self.engines = engines = EngineManager(
            s.models,
            s.engines,
            db.engines,
            crash_log,
            self.engine_client,
            self.clock,
            s.log_dir,
            gpu_inventory(s.engines),
            self.metrics,
            self.upstream_headers,
        )
        retry = RetryPolicy(
            s.queue.max_retries, s.queue.retry_backoff_seconds, s.queue.retry_backoff_max_seconds
        )
        pages = PageStore(db.ocr_pages)
        await pages.ensure_indexes()
        ocr_runner = OcrRunner(pages, self.engine_client, retry)
        for name, cfg in s.models.items():
            dispatcher = ModelDispatcher(
                name,
                cfg,
                queue,
                self.engine_client,
                self._url_of(name),
                engines.get(name).served_name,
                engines.get(name).auth_headers,
                retry,
                s.queue.poll_interval_seconds,
                engine_suspect=lambda job_id, name=name: engines.check_process(name, job_id),  # type: ignore[misc]
                ocr=ocr_runner,
                metrics=self.metrics,
            )
            self.dispatchers[name] = dispatcher
            queue.on_backlog(name, dispatcher.note_backlog)
        engines.on_ready(lambda name: self.dispatchers[name].wake())
        engines.attach(DispatchWorkload(queue, self.dispatchers))
        self.sweeper = sweeper = Sweeper(queue, retry, self._local_running, self._abandon)
        await sweeper.sweep()  # recover what a crashed predecessor left running
        self.switcher = switcher = Switcher(
            s.autoswitch,
            engines,
            store,
            self.usage,
            self.missing,
            db.autoswitch_decisions,
            db.runtime_settings,
            db.leaders,
            self.clock,
            self.worker_id,
            s.history.retention_days,
        )
        await switcher.start()
        self.missing.on_configured_miss(switcher.note_miss)
        scheduler = self.scheduler
        scheduler.every(s.queue.sweep_interval_seconds, "queue-sweep", sweeper.sweep)
        scheduler.every(s.queue.heartbeat_seconds, "lease-heartbeat", sweeper.heartbeat)
        scheduler.every(2.0, "outcome-counters", self.counters.flush, run_at_stop=True)
        self._rollup_lease = Lease(db.leaders, "usage-rollup", self.worker_id, self.clock)
        scheduler.every(s.history.rollup_interval_seconds, "usage-rollup", self.roll_usage)
        scheduler.every(switcher.config.interval_s, AUTOSWITCH_JOB, switcher.run_scheduled)
        prune = s.history.prune
        if prune == "on" or (prune == "auto" and self.embedded is not None):  # see app/store/ttl.py
            self._history_pruner = HistoryPruner(store, self.clock)
            scheduler.every(s.history.prune_interval_seconds, "history-prune", self.prune_expired)
        scheduler.start()
        if self.metrics.enabled:
            self.loop_lag = LoopLagMonitor(self.metrics, self.clock)
            self.loop_lag.start()
        for dispatcher in self.dispatchers.values():
            dispatcher.start()
        await engines.start_all()
        self.chat = ChatService(self.registry, engines, queue, self.dispatchers, self.missing)
        resolution = DefaultResolution(db.runtime_settings, s.ocr.default_resolution)
        self.ocr = OcrService(
            self.registry, engines, queue, self.dispatchers, pages, resolution, s.ocr, self.missing
        )
        event(
            log,
            "gateway.started",
            worker=self.worker_id,
            models=len(s.models),
            database=redact_uri(s.database.uri),
        )

    def _url_of(self, name: str) -> Callable[[], str | None]:
        def url() -> str | None:
            return self.engines.ready_url(name) if self.engines else None

        return url

    async def metrics_state(self) -> GatewayState:
        """What the /metrics gauges show now: the shared queue's depth (one read of the active
        jobs, at most max_concurrent + max_waiting per model), this instance's in-flight calls,
        engine states, and GPUs where the inventory reports them (NVML off the event loop)."""
        depth: dict[tuple[str, str], int] | None = None
        if self.queue is not None:
            try:
                depth = await self.queue.depth()
            except Exception as exc:  # the database being away must not fail the whole scrape
                event(log, "metrics.queue_depth_failed", logging.WARNING, error=repr(exc))
        engines = self.engines
        gpus = await asyncio.to_thread(engines.inventory.snapshot) if engines is not None else []
        return GatewayState(
            queue_depth=depth,
            in_flight={name: d.in_flight for name, d in self.dispatchers.items()},
            engine_states={n: e.state.value for n, e in engines.engines.items()} if engines else {},
            gpus=gpus,
        )

    async def prune_expired(self) -> int:
        """What a TTL monitor would delete (embedded database): jobs in bounded batches, then
        the small history collections."""
        assert self.database is not None and self._history_pruner is not None
        db, now = self.database, self.clock.now()
        deleted = await self._history_pruner.prune()
        for collection in (
            db.crash_logs,
            db.audit,
            db.ocr_pages,
            db.missing_models,
            db.usage,
            db.autoswitch_decisions,
            db.rate_limits,
        ):
            deleted += await prune_expired(collection, now)
        return deleted

    async def roll_usage(self) -> int:
        """The minute's usage rollup, by one instance of the deployment (the lease's holder): the
        rollups are the same whoever computes them, and each pass reads the shared jobs."""
        assert self.usage is not None and self._rollup_lease is not None
        if not await self._rollup_lease.hold(3 * self.settings.history.rollup_interval_seconds + 60):
            return 0
        return await self.usage.roll()

    def _local_running(self) -> list[str]:
        return [job for d in self.dispatchers.values() for job in d.running_ids()]

    def _abandon(self, doc: Doc) -> None:
        """A job taken from this instance: stop its engine call and answer its waiter here."""
        dispatcher = self.dispatchers.get(str(doc["model"]))
        if dispatcher is not None:
            dispatcher.abandon(doc["_id"])
        if self.queue is not None:
            self.queue.ended_elsewhere(doc)

    async def stop(self, grace_s: float = 10.0) -> None:
        for dispatcher in self.dispatchers.values():
            await dispatcher.drain(grace_s)
        for dispatcher in self.dispatchers.values():
            await dispatcher.stop()
        await self.scheduler.stop()
        if self.switcher:
            await self.switcher.stop()
        if self._rollup_lease is not None:
            with contextlib.suppress(Exception):  # a lapsed lease does the same, a minute later
                await self._rollup_lease.release()
        if self.missing:
            await self.missing.drain()
        if self.loop_lag is not None:
            await self.loop_lag.stop()
        if self.rate_limiter:
            await self.rate_limiter.stop()
        if self.writer:
            await self.writer.stop()
        if self.engines:
            await self.engines.stop_all()
        await self.engine_client.stop()
        if self.database:
            await self.database.close()
        if self.embedded:
            await self.embedded.stop()
        event(log, "gateway.stopped", worker=self.worker_id)


def gpu_inventory(engines: EngineDefaults) -> GpuInventory:
    """NVML on a real machine; a configured fake list where tests exercise placement."""
    if engines.fake_gpus is None:
        return NvmlInventory()
    gpus = [
        GpuInfo(
            index=i,
            name=gpu.name,
            total_bytes=int(gpu.total_gib * GIB),
            free_bytes=int(gpu.free_gib * GIB),
            used_bytes=int((gpu.total_gib - gpu.free_gib) * GIB),
            utilization=gpu.utilization,
        )
        for i, gpu in enumerate(engines.fake_gpus)
    ]
    return StaticInventory(gpus)
