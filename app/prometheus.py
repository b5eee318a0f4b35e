"""Prometheus metrics of one gateway (the adapter of app/metrics.py's port): the definitions,
the hot-path calls, the scrape-time state.

Why a registry per Gateway and not prometheus_client's default one: create_app(settings) may
build many gateways in one process (the tests do), and each must count only its own requests.

Why two kinds of numbers: what happens (finished jobs, rejections, retries, crashes, durations)
is counted where it happens, a counter increment or a histogram observation on the hot path
(a few microseconds a request, see README "Benchmarks"); what *is* (queue depth, requests in
flight, engine states, GPU memory) is read from the existing state when Prometheus scrapes, so
it is exact and costs the request path nothing.

Several instances: every counter and histogram is this process's own, counted once by the
instance that made the transition (the one whose write finished the job), so a sum over the
scraped targets is the fleet's total and nothing is counted twice; Prometheus' `instance` label
tells the gateways apart and `gateway_build_info{worker}` names the process. The queue depth is
the shared queue's (the same on every instance: aggregate it with max, not sum).

Only the composition root (app/gateway.py) and the /metrics route import this module.
"""

from __future__ import annotations

import asyncio
import platform
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from app.clock import Clock
from app.engines.gpus import GpuInfo
from app.engines.lifecycle import EngineState
from app.metrics import OUTCOMES, Metrics
from app.queue.priority import Priority
from app.tasks import cancel_and_wait

# The classic text format generate_latest writes (prometheus-client >= 0.22 calls 1.0.0 "latest",
# which Prometheus 2.x servers do not know; every server reads this one).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PRIORITIES = tuple(p.value for p in Priority)
ENGINE_STATES = tuple(s.value for s in EngineState)

# Bucket bounds in seconds: each covers the range its operation really spans on this product,
# from a millisecond of database time to a vLLM model that loads for minutes.
_QUEUE_WAIT = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_ENGINE = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_TTFT = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_LOAD = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200)
_DB = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


@dataclass(frozen=True)
class GatewayState:
    """What the gauges show, read from the running gateway at scrape time.

    `queue_depth` is None when the database could not be read: the series are left out of
    that scrape rather than reported as an empty queue.
    """

    queue_depth: dict[tuple[str, str], int] | None  # (model, priority) -> waiting jobs
    in_flight: dict[str, int]  # model -> jobs at this instance's engine calls
    engine_states: dict[str, str]  # model -> EngineState value
    gpus: list[GpuInfo] = field(default_factory=list)


@dataclass
class _ModelSeries:
    """One model's children of every labelled metric, made once: `labels()` on the hot path
    would validate and hash the label values at every call."""

    outcomes: dict[str, Counter]
    queue_full: Counter
    queue_wait: Histogram
    engine: Histogram
    ttft: Histogram
    retries: Counter
    timeouts: Counter
    restarts: Counter
    crashes: Counter
    load: Histogram


class PrometheusMetrics(Metrics):
    """The metric definitions (names are a contract: a Grafana dashboard reads them)."""

    enabled = True

    def __init__(
        self,
        clock: Clock,
        capacities: dict[str, tuple[int, int]],
        version: str,
        worker: str,
        clients: frozenset[str] = frozenset(),
    ) -> None:
        """`capacities`: model -> (max_concurrent, max_waiting), for every configured model;
        `clients`: the client ids counted under their own label (any other is `other`, so the
        number of series stays bounded whatever ids callers send)."""
        self._clock = clock
        self._clients = clients
        self.registry = registry = CollectorRegistry()
        self._requests = Counter(
            "gateway_requests",
            "Finished jobs by outcome, counted by the instance that finished them",
            ["model", "outcome"],
            registry=registry,
        )
        self._rejected = Counter(
            "gateway_admissions_rejected",
            "Requests refused at admission (429)",
            ["model", "reason"],
            registry=registry,
        )
        self._client_admissions = Counter(
            "gateway_client_admissions",
            "Admission decisions per client (metrics.clients; any other client is `other`)",
            ["model", "client", "result"],
            registry=registry,
        )
        self._queue_wait = Histogram(
            "gateway_queue_wait_seconds",
            "Enqueue to first dispatch of a job",
            ["model"],
            buckets=_QUEUE_WAIT,
            registry=registry,
        )
        self._engine = Histogram(
            "gateway_engine_seconds",
            "Duration of one engine call (answer or error)",
            ["model"],
            buckets=_ENGINE,
            registry=registry,
        )
        self._ttft = Histogram(
            "gateway_time_to_first_token_seconds",
            "Streams: enqueue to the first content chunk",
            ["model"],
            buckets=_TTFT,
            registry=registry,
        )
        self._retries = Counter(
            "gateway_retries", "Jobs sent back to the queue for another attempt", ["model"], registry=registry
        )
        self._timeouts = Counter(
            "gateway_timeouts", "Engine calls that ran past request_timeout", ["model"], registry=registry
        )
        self._restarts = Counter(
            "gateway_engine_restarts", "Automatic engine restarts after a crash", ["model"], registry=registry
        )
        self._crashes = Counter(
            "gateway_engine_crashes", "Ready engines that exited or hung", ["model"], registry=registry
        )
        self._load = Histogram(
            "gateway_engine_load_seconds",
            "Engine start to ready",
            ["model"],
            buckets=_LOAD,
            registry=registry,
        )
        self._db = Histogram(
            "gateway_db_operation_seconds",
            "Store operations: batched job writes, queue claims",
            ["operation"],
            buckets=_DB,
            registry=registry,
        )
        self._db_children = {op: self._db.labels(operation=op) for op in ("batch_write", "claim")}
        self._lag = Gauge(
            "gateway_event_loop_lag_seconds",
            "How late the event loop ran a 0.5 s timer (last sample)",
            registry=registry,
        )
        Gauge(
            "gateway_build_info",
            "Always 1; the labels say what runs",
            ["version", "python", "worker"],
            registry=registry,
        ).labels(version=version, python=platform.python_version(), worker=worker).set(1)
        self._series = {name: self._make_series(name) for name in capacities}
        self._state = _StateCollector(capacities)
        registry.register(self._state)

    def _make_series(self, model: str) -> _ModelSeries:
        return _ModelSeries(
            outcomes={o: self._requests.labels(model=model, outcome=o) for o in OUTCOMES},
            queue_full=self._rejected.labels(model=model, reason="queue_full"),
            queue_wait=self._queue_wait.labels(model=model),
            engine=self._engine.labels(model=model),
            ttft=self._ttft.labels(model=model),
            retries=self._retries.labels(model=model),
            timeouts=self._timeouts.labels(model=model),
            restarts=self._restarts.labels(model=model),
            crashes=self._crashes.labels(model=model),
            load=self._load.labels(model=model),
        )

    def _of(self, model: str) -> _ModelSeries:
        series = self._series.get(model)
        if series is None:  # not configured at start: a job of a model removed since
            series = self._series[model] = self._make_series(model)
        return series

    def now(self) -> float:
        return self._clock.monotonic()

    def job_finished(self, model: str, outcome: str) -> None:
        counter = self._of(model).outcomes.get(outcome)
        if counter is None:
            counter = self._requests.labels(model=model, outcome=outcome)
        counter.inc()

    def rejected(self, model: str, reason: str) -> None:
        if reason == "queue_full" and model:
            self._of(model).queue_full.inc()
        else:
            self._rejected.labels(model=model, reason=reason).inc()

    def client_admission(self, model: str, client: str, result: str) -> None:
        label = client if client in self._clients else "other"
        self._client_admissions.labels(model=model, client=label, result=result).inc()

    def queue_wait(self, model: str, enqueued_at: datetime, started_at: datetime) -> None:
        self._of(model).queue_wait.observe(max(0.0, (started_at - enqueued_at).total_seconds()))

    def engine_call(self, model: str, began: float) -> None:
        self._of(model).engine.observe(max(0.0, self._clock.monotonic() - began))

    def first_token(self, model: str, enqueued_at: datetime) -> None:
        self._of(model).ttft.observe(max(0.0, (self._clock.now() - enqueued_at).total_seconds()))

    def retry(self, model: str) -> None:
        self._of(model).retries.inc()

    def timeout(self, model: str) -> None:
        self._of(model).timeouts.inc()

    def engine_crashed(self, model: str) -> None:
        self._of(model).crashes.inc()

    def engine_restarted(self, model: str) -> None:
        self._of(model).restarts.inc()

    def engine_loaded(self, model: str, seconds: float) -> None:
        self._of(model).load.observe(max(0.0, seconds))

    def db_operation(self, operation: str, began: float) -> None:
        child = self._db_children.get(operation) or self._db.labels(operation=operation)
        child.observe(max(0.0, self._clock.monotonic() - began))

    def loop_lag(self, seconds: float) -> None:
        self._lag.set(seconds)

    def render(self, state: GatewayState) -> bytes:
        # One event-loop thread: nothing runs between setting the state and the collect that
        # generate_latest makes, so a scrape never mixes two snapshots.
        self._state.state = state
        return generate_latest(self.registry)


class _StateCollector(Collector):
    """The gauges computed at scrape time from a GatewayState (and the configured capacities)."""

    def __init__(self, capacities: dict[str, tuple[int, int]]) -> None:
        self._capacities = capacities
        self.state: GatewayState | None = None

    def describe(self) -> Iterable[Metric]:
        return list(self._families(None))

    def collect(self) -> Iterable[Metric]:
        return list(self._families(self.state))

    def _families(self, state: GatewayState | None) -> Iterator[Metric]:
        capacity = GaugeMetricFamily(
            "gateway_queue_capacity",
            "Configured places: primary = max_concurrent, secondary = max_waiting",
            labels=["model", "tier"],
        )
        depth = GaugeMetricFamily(
            "gateway_queue_depth",
            "Jobs waiting in the shared queue (the same on every instance)",
            labels=["model", "priority"],
        )
        in_flight = GaugeMetricFamily(
            "gateway_in_flight", "Jobs at this instance's engine calls now", labels=["model"]
        )
        engine = GaugeMetricFamily(
            "gateway_engine_state",
            "1 for the engine's current state, 0 for the others",
            labels=["model", "state"],
        )
        used = GaugeMetricFamily("gateway_gpu_memory_used_bytes", "GPU memory in use", labels=["gpu", "name"])
        total = GaugeMetricFamily("gateway_gpu_memory_total_bytes", "GPU memory", labels=["gpu", "name"])
        utilization = GaugeMetricFamily(
            "gateway_gpu_utilization_ratio",
            "Share of time the GPU was busy (0..1), where the driver says",
            labels=["gpu", "name"],
        )
        if state is not None:
            for model, (primary, secondary) in self._capacities.items():
                capacity.add_metric([model, "primary"], primary)
                capacity.add_metric([model, "secondary"], secondary)
            if state.queue_depth is not None:
                for model in self._capacities:
                    for priority in PRIORITIES:
                        depth.add_metric([model, priority], state.queue_depth.get((model, priority), 0))
            for model, count in state.in_flight.items():
                in_flight.add_metric([model], count)
            for model, current in state.engine_states.items():
                for name in ENGINE_STATES:
                    engine.add_metric([model, name], 1 if name == current else 0)
            for gpu in state.gpus:
                labels = [str(gpu.index), gpu.name]
                used.add_metric(labels, gpu.used_bytes)
                total.add_metric(labels, gpu.total_bytes)
                if gpu.utilization is not None:
                    utilization.add_metric(labels, gpu.utilization)
        yield from (capacity, depth, in_flight, engine, used, total, utilization)


class LoopLagMonitor:
    """Samples how late the event loop runs a timer: a blocked loop delays every request.

    A task sleeps `interval_s` and measures how much longer it took than asked; start/stop are
    owned by the gateway's lifespan like every background loop.
    """

    def __init__(self, metrics: Metrics, clock: Clock, interval_s: float = 0.5) -> None:
        self._metrics = metrics
        self._clock = clock
        self._interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="event-loop-lag")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def _run(self) -> None:
        while True:
            began = self._clock.monotonic()
            await asyncio.sleep(self._interval_s)
            self._metrics.loop_lag(max(0.0, self._clock.monotonic() - began - self._interval_s))


def build_metrics(
    enabled: bool,
    clock: Clock,
    capacities: dict[str, tuple[int, int]],
    version: str,
    worker: str,
    clients: frozenset[str] = frozenset(),
) -> Metrics:
    """The gateway's metrics: Prometheus when enabled, the no-op otherwise."""
    if not enabled:
        return Metrics()
    return PrometheusMetrics(clock, capacities, version, worker, clients)
