"""The running daemon's services and their start/stop order (owned by the HTTP lifespan).

`start` builds the services in stages; each stage registers its own stop on an exit stack as it
starts, so shutdown runs in the reverse of start order, and a start that fails half-way stops
exactly what had started (no engine process, database server or task is left running).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from app import __version__
from app.audit import AuditLog
from app.auth.api_keys import ApiKeyService
from app.auth.ratelimit import RateLimiter
from app.auth.throttle import LoginThrottle
from app.auth.tokens import TokenService
from app.auth.users import UserService
from app.autoswitch.switcher import Switcher
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
from app.metrics import Metrics
from app.models import ModelRegistry
from app.ocr.pages import PageStore
from app.ocr.resolution import DefaultResolution
from app.ocr.runner import OcrRunner
from app.prometheus import LoopLagMonitor, build_metrics
from app.proxy.client import EngineClient
from app.queue.fairness import ClientTerms, FairShares, Share
from app.queue.history import HistoryPruner
from app.queue.job import Job
from app.queue.retry import RetryPolicy
from app.queue.service import JobQueue
from app.queue.stats import OutcomeCounters
from app.queue.store import JobStore
from app.queue.sweeper import Sweeper, make_worker_id
from app.scheduler import Scheduler
from app.services import Services
from app.settings import EngineDefaults, Settings, ShareSettings
from app.settings_loader import check_secret, environment, redact_uri
from app.store.batch import BatchWriter
from app.store.database import MAINTENANCE_TIMEOUT_S, Database, connect, ensure_indexes, within
from app.store.embedded import EmbeddedDatabase
from app.store.health import DatabaseHealth
from app.store.lease import Lease
from app.store.ttl import prune_expired
from app.usecases.chat import ChatService
from app.usecases.ocr import OcrService

log = logging.getLogger("gateway")
AUTOSWITCH_JOB = "autoswitch"
SHUTDOWN_DATABASE_BUDGET_S = 30.0


@dataclass
class Gateway:
    """What create_app(settings) builds before anything runs; `services` once started."""

    settings: Settings
    clock: Clock
    registry: ModelRegistry
    tokens: TokenService
    metrics: Metrics
    worker_id: str
    upstream_headers: dict[str, dict[str, str]] = field(default_factory=dict, repr=False)
    engine_client: EngineClient = field(default_factory=EngineClient)
    services: Services | None = None
    _stack: contextlib.AsyncExitStack | None = None
    _grace_s: float = 10.0

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
        worker_id = make_worker_id()
        upstream_headers = auth_headers(settings.models, environment())  # before anything runs
        capacities = {name: (m.max_concurrent, m.max_waiting) for name, m in settings.models.items()}
        return cls(
            settings=settings,
            clock=clock,
            registry=ModelRegistry(settings.models),
            tokens=tokens,
            metrics=build_metrics(
                settings.metrics.enabled,
                clock,
                capacities,
                __version__,
                worker_id,
                frozenset(settings.metrics.clients),
            ),
            worker_id=worker_id,
            upstream_headers=upstream_headers,
        )

    async def start(self) -> None:
        async with contextlib.AsyncExitStack() as stack:
            self.services = await self._start(stack)
            self._stack = stack.pop_all()  # started: the stack now closes at stop(), not here
        event(
            log,
            "gateway.started",
            worker=self.worker_id,
            models=len(self.settings.models),
            database=redact_uri(self.settings.database.uri),
        )

    async def stop(self, grace_s: float = 10.0) -> None:
        """Every stage's stop runs, whatever an earlier one raised, and the database work of the
        whole shutdown has one budget: with the database down each final write (counters,
        leases, engine records) would otherwise wait its own timeout, and an orchestrator's
        stop timeout would kill the gateway before its engines were stopped."""
        self._grace_s = grace_s
        services, stack = self.services, self._stack
        self._stack = None
        if stack is not None:
            database_up = services is None or services.database_health.up
            try:
                with within(SHUTDOWN_DATABASE_BUDGET_S if database_up else 1.0):
                    await stack.aclose()
            except Exception as exc:  # each stop ran; this one failed: say so, stop the rest
                event(log, "gateway.stop_incomplete", logging.ERROR, error=repr(exc)[:300])
        self.services = None
        event(log, "gateway.stopped", worker=self.worker_id)

    async def _start(self, stack: contextlib.AsyncExitStack) -> Services:
        """Each stage pushes its stop before (or as) it starts, so a failure anywhere after it
        stops it too; the order of the pushes is the reverse of the shutdown order."""
        s = self.settings
        s.data_dir.mkdir(parents=True, exist_ok=True)
        s.log_dir.mkdir(parents=True, exist_ok=True)
        db, database_health = await self._start_database(stack)
        writer = BatchWriter(db.jobs, s.database.batch_max_ops, self.metrics)
        stack.push_async_callback(writer.stop)
        writer.start()
        store = JobStore(
            db.jobs,
            writer,
            timedelta(days=s.history.retention_days),
            store_prompts=s.history.store_prompts,
            store_outputs=s.history.store_outputs,
            clock=self.clock,
        )
        tally_lease = Lease(db.leaders, "outcome-totals", self.worker_id, self.clock)
        counters = OutcomeCounters(db.queue_stats, db.jobs, tally_lease)
        stack.push_async_callback(release_quietly, tally_lease)  # after the last tally, at stop
        queue = JobQueue(
            store,
            self.clock,
            self.worker_id,
            {name: m.max_concurrent + m.max_waiting for name, m in s.models.items()},
            s.queue.lease_seconds,
            s.queue.poll_interval_seconds,
            counters,
            self.metrics,
            engine_places={name: m.max_concurrent for name, m in s.models.items()},
            shares=fair_shares(s),
        )
        await queue.load_slots()
        users = UserService(db.users, self.clock)
        api_keys = ApiKeyService(db.api_keys, self.clock)
        audit = AuditLog(db.audit, self.clock, s.history.retention_days)
        await audit.ensure_indexes()
        limits = s.rate_limit
        rate_limiter = RateLimiter(
            db.rate_limits,
            self.clock,
            limits.per_minute,
            limits.window_seconds,
            list(limits.exempt_roles),
            metrics=self.metrics,
        )
        await rate_limiter.ensure_indexes()
        auth = s.auth
        login_throttle = LoginThrottle(
            db.login_failures, self.clock, auth.login_max_failures, auth.login_window_seconds
        )
        await login_throttle.ensure_indexes()
        stack.push_async_callback(rate_limiter.stop)
        rate_limiter.start()
        stack.push_async_callback(self.engine_client.stop)
        await self.engine_client.start()
        crash_log = CrashLog(db.crash_logs, self.clock, s.history.retention_days)
        await crash_log.ensure_indexes()
        missing = MissingModels(db.missing_models, self.clock, s.history.retention_days)
        await missing.ensure_indexes()
        stack.push_async_callback(missing.drain)
        usage = UsageRollup(
            db.jobs, db.usage, db.runtime_settings, self.clock, s.history.retention_days,
            settle_s=s.history.rollup_settle_seconds,
        )  # fmt: skip
        await usage.ensure_indexes()
        engines = EngineManager(
            s.models, s.engines, db.engines, crash_log, self.engine_client, self.clock, s.log_dir,
            gpu_inventory(s.engines), self.metrics, self.upstream_headers,
        )  # fmt: skip
        stack.push_async_callback(engines.stop_all)  # kills what a failed start_all spawned, too
        retry = RetryPolicy(
            s.queue.max_retries, s.queue.retry_backoff_seconds, s.queue.retry_backoff_max_seconds
        )
        pages = PageStore(db.ocr_pages)
        await pages.ensure_indexes()
        dispatchers = self._dispatchers(queue, engines, retry, OcrRunner(pages, self.engine_client, retry))

        def abandon(job: Job) -> None:
            """A job taken from this instance: stop its engine call and answer its waiter here."""
            dispatcher = dispatchers.get(job.model)
            if dispatcher is not None:
                dispatcher.abandon(job.id)
            queue.ended_elsewhere(job)

        sweeper = Sweeper(
            queue, retry, lambda: [j for d in dispatchers.values() for j in d.running_ids()], abandon
        )
        await sweeper.sweep()  # recover what a crashed predecessor left running
        switcher = Switcher(
            s.autoswitch, engines, store, usage, missing, db.autoswitch_decisions, db.runtime_settings,
            db.leaders, self.clock, self.worker_id, s.history.retention_days,
        )  # fmt: skip
        stack.push_async_callback(switcher.stop)
        await switcher.start()
        missing.on_configured_miss(switcher.note_miss)
        scheduler = self._schedule(stack, db, store, counters, usage, sweeper, switcher)
        if self.metrics.enabled:
            loop_lag = LoopLagMonitor(self.metrics, self.clock)
            stack.push_async_callback(loop_lag.stop)
            loop_lag.start()
        for dispatcher in dispatchers.values():
            stack.push_async_callback(dispatcher.stop)
            dispatcher.start()
        await engines.start_all()
        stack.push_async_callback(self._quiesce, dispatchers)  # first at shutdown: let jobs finish
        resolution = DefaultResolution(db.runtime_settings, s.ocr.default_resolution)
        return Services(
            settings=s, clock=self.clock, registry=self.registry, tokens=self.tokens,
            login_throttle=login_throttle, metrics=self.metrics, worker_id=self.worker_id,
            database=db, database_health=database_health, queue=queue, counters=counters, users=users,
            api_keys=api_keys, audit=audit,
            rate_limiter=rate_limiter, engines=engines, dispatchers=dispatchers, usage=usage,
            missing=missing, switcher=switcher, scheduler=scheduler,
            chat=ChatService(self.registry, engines, queue, dispatchers, missing),
            ocr=OcrService(self.registry, engines, queue, dispatchers, pages, resolution, s.ocr, missing),
        )  # fmt: skip

    async def _start_database(self, stack: contextlib.AsyncExitStack) -> tuple[Database, DatabaseHealth]:
        s, options = self.settings, self.settings.database
        uri, embedded = options.uri, None
        if uri == "embedded":
            embedded = EmbeddedDatabase(
                s.data_dir,
                options.embedded.command,
                options.embedded.startup_timeout,
                options.embedded.port,
                options.embedded.sync_on_commit,
                options.embedded.min_free_mb,
            )
            stack.push_async_callback(embedded.stop)
            uri = await embedded.start()
        db = await connect(
            uri,
            options.name,
            options.write_concern,
            options.operation_timeout_seconds,
            options.connect_timeout_seconds,
        )
        stack.push_async_callback(db.close)
        await ensure_indexes(db, ttl=not self._prunes_history(db))
        health = DatabaseHealth(
            lambda: db.ping(options.connect_timeout_seconds),
            self.clock,
            options.health_check_seconds,
            revive=embedded.revive if embedded is not None else None,
        )
        stack.push_async_callback(health.stop)
        health.start()
        return db, health

    def _dispatchers(
        self, queue: JobQueue, engines: EngineManager, retry: RetryPolicy, ocr: OcrRunner
    ) -> dict[str, ModelDispatcher]:
        dispatchers: dict[str, ModelDispatcher] = {}
        for name, cfg in self.settings.models.items():
            engine = engines.get(name)
            dispatchers[name] = dispatcher = ModelDispatcher(
                name,
                cfg,
                queue,
                self.engine_client,
                _url_of(engines, name),
                engine.served_name,
                engine.auth_headers,
                retry,
                self.settings.queue.poll_interval_seconds,
                engine_suspect=lambda job_id, name=name: engines.check_process(name, job_id),  # type: ignore[misc]
                ocr=ocr,
                metrics=self.metrics,
            )
            queue.on_backlog(name, dispatcher.note_backlog)
        engines.on_ready(lambda name: dispatchers[name].wake())
        engines.attach(DispatchWorkload(queue, dispatchers))
        return dispatchers

    def _schedule(
        self,
        stack: contextlib.AsyncExitStack,
        db: Database,
        store: JobStore,
        counters: OutcomeCounters,
        usage: UsageRollup,
        sweeper: Sweeper,
        switcher: Switcher,
    ) -> Scheduler:
        """The periodic jobs: recovery sweeps, lease heartbeats, counters, rollups, auto-switch,
        and history pruning where no TTL monitor does it (SecantusDB)."""
        s, scheduler = self.settings, Scheduler()
        scheduler.every(s.queue.sweep_interval_seconds, "queue-sweep", sweeper.sweep)
        scheduler.every(s.queue.heartbeat_seconds, "lease-heartbeat", sweeper.heartbeat)
        scheduler.every(2.0, "outcome-counters", counters.flush, run_at_stop=True)
        rollup_lease = Lease(db.leaders, "usage-rollup", self.worker_id, self.clock)

        async def roll_usage() -> int:
            """By one instance of the deployment (the lease's holder): the rollups are the same
            whoever computes them, and each pass reads the shared jobs."""
            if not await rollup_lease.hold(3 * s.history.rollup_interval_seconds + 60):
                return 0
            with within(MAINTENANCE_TIMEOUT_S):  # reads the history in bulk
                return await usage.roll()

        stack.push_async_callback(release_quietly, rollup_lease)
        scheduler.every(s.history.rollup_interval_seconds, "usage-rollup", roll_usage)
        scheduler.every(switcher.config.interval_s, AUTOSWITCH_JOB, switcher.run_scheduled)
        if self._prunes_history(db):  # see app/store/ttl.py
            pruner = HistoryPruner(store, self.clock)
            scheduler.every(
                s.history.prune_interval_seconds, "history-prune", lambda: _prune(db, pruner, self.clock)
            )
        stack.push_async_callback(scheduler.stop)
        scheduler.start()
        return scheduler

    def _prunes_history(self, db: Database) -> bool:
        """Whether the gateway deletes expired history itself: on SecantusDB (embedded or
        not), whose TTL monitor walks whole collections (app/queue/history.py)."""
        prune = self.settings.history.prune
        return prune == "on" or (prune == "auto" and db.secantus)

    async def _quiesce(self, dispatchers: dict[str, ModelDispatcher]) -> None:
        """Shutdown's first step: no new claims, running jobs get the grace period, then stop."""
        for dispatcher in dispatchers.values():
            await dispatcher.drain(self._grace_s)
        for dispatcher in dispatchers.values():
            await dispatcher.stop()


async def release_quietly(lease: Lease) -> None:
    """At stop: the next instance need not wait for the lease to lapse (it does the same later)."""
    with contextlib.suppress(Exception):
        await lease.release()


def _url_of(engines: EngineManager, name: str) -> Callable[[], str | None]:
    return lambda: engines.ready_url(name)


async def _prune(db: Database, pruner: HistoryPruner, clock: Clock) -> int:
    """What a TTL monitor would delete (embedded database): jobs in bounded batches, then the
    small history collections."""
    now = clock.now()
    with within(MAINTENANCE_TIMEOUT_S):
        return await _prune_all(db, pruner, now)


async def _prune_all(db: Database, pruner: HistoryPruner, now: datetime) -> int:
    deleted = await pruner.prune()
    for collection in (
        db.crash_logs,
        db.audit,
        db.ocr_pages,
        db.missing_models,
        db.usage,
        db.autoswitch_decisions,
        db.rate_limits,
        db.login_failures,
    ):
        deleted += await prune_expired(collection, now)
    return deleted


def fair_shares(settings: Settings) -> FairShares:
    def share(given: ShareSettings) -> Share:
        return Share(given.max_share, given.max_places)

    configured = settings.fair_share
    clients = {
        name: ClientTerms(
            terms.weight,
            None
            if terms.max_share is None and terms.max_places is None
            else Share(terms.max_share or 1.0, terms.max_places),
        )
        for name, terms in configured.clients.items()
    }
    models = {name: share(m.fair_share) for name, m in settings.models.items() if m.fair_share is not None}
    return FairShares(configured.enabled, share(configured), models, clients)


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
