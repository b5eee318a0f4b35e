"""The metrics phase: two gateways alike but for metrics.enabled, interleaved rounds."""

from __future__ import annotations

import math
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from bench.harness import ForeignLoad, LoadClient, Processes, bench_pids, cpu_seconds, start_gateway
from bench.load import request_body
from bench.report import fmt
from bench.scenarios import CAPACITY, FAST_MODEL, MetricsResult, MetricsScenario

# -- the metrics phase ---------------------------------------------------------------------------


def succeeded_count(text: str, model: str) -> float:
    """gateway_requests_total{model, outcome="succeeded"} in a Prometheus text exposition."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "gateway_requests_total"
        and sample.labels.get("model") == model
        and sample.labels.get("outcome") == "succeeded"
    )


def metric_calls_us(rounds: int = 20_000) -> float:
    """Microseconds of the metric calls one request makes on the direct-start path (queue wait,
    engine call, outcome, and two batched writes counted as if each were its own batch: an
    upper bound), on the gateway's own PrometheusMetrics in this process: a figure that does not
    move with the machine's other load, unlike the throughput ratio."""
    from app.clock import SystemClock
    from app.prometheus import PrometheusMetrics

    metrics = PrometheusMetrics(SystemClock(), {FAST_MODEL: (32, 32)}, "bench", "bench")
    now = datetime.now(UTC)
    began = time.perf_counter()
    for _ in range(rounds):
        metrics.queue_wait(FAST_MODEL, now, now)
        metrics.engine_call(FAST_MODEL, metrics.now())
        metrics.job_finished(FAST_MODEL, "succeeded")
        metrics.db_operation("batch_write", metrics.now())
        metrics.db_operation("batch_write", metrics.now())
    return (time.perf_counter() - began) / rounds * 1e6


async def run_metrics_phase(procs: Processes, tmp: Path, uri: str, sc: MetricsScenario) -> MetricsResult:
    """Two fresh gateways, alike but for `metrics.enabled`, each with its own 0 ms engine and
    database (on the one server); interleaved rounds, the order flipped every round."""
    models = {FAST_MODEL: {"kind": "stub", "args": ["--latency-ms", "0"], **CAPACITY}}
    on = await start_gateway(procs, tmp, uri, "gateway-metrics-on", "bench_metrics_on", models)
    off = await start_gateway(
        procs, tmp, uri, "gateway-metrics-off", "bench_metrics_off", models, {"metrics": {"enabled": False}}
    )
    sides = {"on": on, "off": off}
    body = request_body(FAST_MODEL)
    ok = {"on": 0, "off": 0}
    wall = {"on": 0.0, "off": 0.0}
    cpu = {"on": 0.0, "off": 0.0}
    ratios: list[float] = []
    errors = 0
    first_error: str | None = None
    answered = 0
    foreign = ForeignLoad(bench_pids(procs))
    foreign.start()
    async with LoadClient(sc.concurrency) as on_client, LoadClient(sc.concurrency) as off_client:
        clients = {"on": on_client, "off": off_client}

        def target(side: str) -> tuple[str, dict[str, str]]:
            gw = sides[side]
            return f"{gw.url}/api/chat", {"Authorization": f"Bearer {gw.token}", "X-Client-ID": "bench"}

        for side in ("on", "off"):
            warm = await clients[side].run(*target(side), body, sc.warmup)
            answered += warm.ok if side == "on" else 0
        for index in range(sc.rounds):
            rps: dict[str, float] = {}
            for side in ("on", "off") if index % 2 == 0 else ("off", "on"):
                cpu0 = cpu_seconds(sides[side].pid)
                batch = await clients[side].run(*target(side), body, sc.requests)
                cpu[side] += cpu_seconds(sides[side].pid) - cpu0
                ok[side] += batch.ok
                wall[side] += batch.wall_s
                errors += batch.errors
                first_error = first_error or batch.first_error
                rps[side] = batch.rps
                answered += batch.ok if side == "on" else 0
            ratios.append(rps["on"] / rps["off"] if rps["off"] else math.nan)
    foreign_cores = foreign.stop()
    async with aiohttp.ClientSession() as session:
        scrapes: list[float] = []
        text = ""
        for _ in range(5):  # the first one also loads NVML (or finds it missing): report the median
            began = time.perf_counter()
            async with session.get(f"{on.url}/metrics") as response:  # from 127.0.0.1: no credentials
                text = await response.text()
                if response.status != 200:
                    raise RuntimeError(f"/metrics answered {response.status}: {text[:300]}")
            scrapes.append((time.perf_counter() - began) * 1000)
        scrape_ms = statistics.median(scrapes)
        async with session.get(f"{off.url}/metrics") as response:
            off_status = response.status
    return MetricsResult(
        concurrency=sc.concurrency,
        requests=sc.requests,
        rounds=sc.rounds,
        on_ok=ok["on"],
        on_wall_s=wall["on"],
        on_cpu_s=cpu["on"],
        off_ok=ok["off"],
        off_wall_s=wall["off"],
        off_cpu_s=cpu["off"],
        round_ratios=ratios,
        errors=errors,
        answered=answered,
        counted=succeeded_count(text, FAST_MODEL),
        scrape_ms=scrape_ms,
        off_status=off_status,
        calls_us_per_req=metric_calls_us(),
        foreign_cores=foreign_cores,
        first_error=first_error,
    )


def metrics_report(m: MetricsResult) -> list[str]:
    ratios = [r for r in m.round_ratios if not math.isnan(r)]
    spread = f"{min(ratios):.3f} to {max(ratios):.3f}" if ratios else "n/a"
    return [
        f"Metrics (history 0): two gateways alike but for metrics.enabled, 0 ms engine, c={m.concurrency}, "
        f"{m.rounds} interleaved rounds of {m.requests} requests per side.",
        "",
        "| metrics | requests | req/s | gateway CPU ms/req |",
        "|---|---|---|---|",
        f"| on | {m.on_ok} | {fmt(m.on_rps, 1)} | {fmt(m.on_cpu_ms, 3)} |",
        f"| off | {m.off_ok} | {fmt(m.off_rps, 1)} | {fmt(m.off_cpu_ms, 3)} |",
        "",
        f"on/off req/s: median of rounds {fmt(m.median_round_ratio, 3)} (cost {fmt(m.cost_pct, 1)} %; "
        f"rounds {spread}), all rounds pooled {fmt(m.ratio, 3)}; gateway CPU per request "
        f"{m.on_cpu_ms - m.off_cpu_ms:+.3f} ms; the metric calls of one request take "
        f"{fmt(m.calls_us_per_req, 1)} µs ({fmt(m.calls_share_pct, 2)} % of the CPU a request costs); "
        f"/metrics counted {m.counted:.0f} of {m.answered} answered requests; "
        f"a scrape takes {m.scrape_ms:.1f} ms (median of 5); the metrics-off gateway answers "
        f"/metrics with {m.off_status}; other load {m.foreign_cores:.2f} cores.",
    ]


def metrics_targets(m: MetricsResult | None) -> list[tuple[str, bool | None, str]]:
    if m is None:
        return [("metrics cost < 2 % of throughput (0 ms engine, c=10)", None, "skipped")]
    return [
        (
            "metrics cost < 2 % of throughput (0 ms engine, c=10)",
            m.cost_pct < 2,
            f"median round ratio {m.median_round_ratio:.3f} "
            f"(pooled {m.on_rps:.1f} vs {m.off_rps:.1f} req/s); CPU {m.on_cpu_ms:.3f} vs "
            f"{m.off_cpu_ms:.3f} ms/req; metric calls {m.calls_us_per_req:.1f} µs/req",
        ),
        (
            "/metrics counts every answered request exactly",
            m.counted == m.answered and m.off_status == 404,
            f"{m.counted:.0f} counted, {m.answered} answered; metrics off: {m.off_status}",
        ),
    ]
