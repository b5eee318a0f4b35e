"""Running the request and streaming scenarios against the stack, and the idle measurement."""

from __future__ import annotations

import asyncio
import json
import math

from bench.harness import CostMeter, ForeignLoad, LoadClient, Stack
from bench.scenarios import (
    MODEL_BY_LATENCY,
    STREAM_MAX_TOKENS,
    STREAM_MODEL,
    STREAM_PROMPT,
    Idle,
    Result,
    Scenario,
    StreamResult,
    StreamScenario,
)
from bench.streams import nearest_rank

# -- running scenarios ----------------------------------------------------------------------------


def request_body(model: str) -> bytes:
    return json.dumps(
        {"model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8}
    ).encode()


async def run_scenario(stack: Stack, sc: Scenario, history: int, idle: Idle) -> Result:
    """Direct first, then through the gateway, back to back so both see the same machine state."""
    model = MODEL_BY_LATENCY[sc.latency_ms]
    direct_url = f"{stack.direct_urls[sc.latency_ms]}/v1/chat/completions"
    foreign = ForeignLoad(stack.own_pids)
    foreign.start()
    async with LoadClient(sc.concurrency) as client:
        await client.run(direct_url, {}, request_body(model), sc.warmup)
        direct = await client.run(direct_url, {}, request_body(model), sc.requests)

    headers = {"Authorization": f"Bearer {stack.token}", "X-Client-ID": "bench"}
    gateway_url = f"{stack.gateway_url}/api/chat"
    meter = CostMeter(stack.gateway_pid, stack.db)
    async with LoadClient(sc.concurrency) as client:
        await client.run(gateway_url, headers, request_body(model), sc.warmup)
        meter.start()
        through = await client.run(gateway_url, headers, request_body(model), sc.requests)
        cost = meter.stop()
    foreign_cores = foreign.stop()

    done = max(1, through.ok)
    background = idle.db_ops_per_s * through.wall_s
    return Result(
        history=history,
        latency_ms=sc.latency_ms,
        concurrency=sc.concurrency,
        requests=sc.requests,
        direct_p50_ms=direct.percentile(0.50),
        direct_p99_ms=direct.percentile(0.99),
        gateway_p50_ms=through.percentile(0.50),
        gateway_p99_ms=through.percentile(0.99),
        direct_rps=direct.rps,
        gateway_rps=through.rps,
        direct_errors=direct.errors,
        gateway_errors=through.errors,
        gateway_cpu_ms_per_req=cost.gateway_cpu_s * 1000 / done,
        db_cpu_ms_per_req=cost.db_cpu_s * 1000 / done,
        db_round_trips_per_req=cost.db_round_trips / done,
        db_round_trips_net_per_req=max(0.0, cost.db_round_trips - background) / done,
        db_ops_per_req={key: value / done for key, value in cost.db_ops.items()},
        foreign_cores=foreign_cores,
        first_error=through.first_error or direct.first_error,
    )


def stream_body() -> bytes:
    return json.dumps(
        {
            "model": STREAM_MODEL,
            "messages": [{"role": "user", "content": STREAM_PROMPT}],
            "max_tokens": STREAM_MAX_TOKENS,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ).encode()


async def run_stream_scenario(stack: Stack, sc: StreamScenario, history: int, idle: Idle) -> StreamResult:
    """Direct first, then through /v1 on the gateway, back to back like run_scenario."""
    assert stack.stream_url is not None, "the stack was started without the streaming stub"
    body = stream_body()
    direct_url = f"{stack.stream_url}/v1/chat/completions"
    foreign = ForeignLoad(stack.own_pids)
    foreign.start()
    async with LoadClient(sc.concurrency) as client:
        await client.stream(direct_url, {}, body, sc.warmup)
        direct = await client.stream(direct_url, {}, body, sc.streams)

    headers = {"Authorization": f"Bearer {stack.token}", "X-Client-ID": "bench"}
    gateway_url = f"{stack.gateway_url}/v1/chat/completions"
    meter = CostMeter(stack.gateway_pid, stack.db)
    async with LoadClient(sc.concurrency) as client:
        await client.stream(gateway_url, headers, body, sc.warmup)
        meter.start()
        through = await client.stream(gateway_url, headers, body, sc.streams)
        cost = meter.stop()
    foreign_cores = foreign.stop()

    done = max(1, through.ok)
    background = idle.db_ops_per_s * through.wall_s
    all_tokens = direct.tokens + through.tokens
    return StreamResult(
        history=history,
        concurrency=sc.concurrency,
        streams=sc.streams,
        tokens_per_stream=sum(all_tokens) / len(all_tokens) if all_tokens else math.nan,
        direct_ttft_p50_ms=direct.ttft(0.50),
        direct_ttft_p99_ms=direct.ttft(0.99),
        gateway_ttft_p50_ms=through.ttft(0.50),
        gateway_ttft_p99_ms=through.ttft(0.99),
        direct_tokens_per_s=direct.tokens_per_s,
        gateway_tokens_per_s=through.tokens_per_s,
        direct_decode_p50=nearest_rank(direct.decode_rates, 0.50),
        gateway_decode_p50=nearest_rank(through.decode_rates, 0.50),
        direct_done_lag_p50_ms=nearest_rank(direct.done_lags_ms, 0.50),
        gateway_done_lag_p50_ms=nearest_rank(through.done_lags_ms, 0.50),
        direct_errors=direct.errors,
        gateway_errors=through.errors,
        gateway_cpu_ms_per_stream=cost.gateway_cpu_s * 1000 / done,
        db_round_trips_per_stream=cost.db_round_trips / done,
        db_round_trips_net_per_stream=max(0.0, cost.db_round_trips - background) / done,
        foreign_cores=foreign_cores,
        first_error=through.first_error or direct.first_error,
    )


async def measure_idle(stack: Stack, history: int, seconds: float, *, settled: bool = False) -> Idle:
    """The background rate, so per-request DB numbers at low request rates can be read net of it;
    `settled`: the idle cost itself, measured once the history's per-minute passes have run."""
    meter = CostMeter(stack.gateway_pid, stack.db)
    meter.start()
    await asyncio.sleep(seconds)
    cost = meter.stop()
    return Idle(
        history=history,
        seconds=seconds,
        db_ops_per_s=cost.db_round_trips / seconds,
        gateway_cpu_pct=cost.gateway_cpu_s / seconds * 100,
        db_cpu_pct=cost.db_cpu_s / seconds * 100,
        db_ops=cost.db_ops,
        settled=settled,
    )
