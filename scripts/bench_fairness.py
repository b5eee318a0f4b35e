#!/usr/bin/env python3
"""Fair shares measured: a batch client keeps 60 requests in flight against one model (10 in
flight + 10 waiting, a stub engine that takes 1 s per answer) while an interactive client sends
one request at a time; run with fair shares on and off, on 127.0.0.1.

    .venv/bin/python scripts/bench_fairness.py --seconds 40

Prints a Markdown table: the interactive client's queue wait (p50, p99, from the jobs' own
timestamps), its 429s, and the batch client's answers per second (what it got of the engine).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from gateway_process import GatewayProcess
from pymongo import AsyncMongoClient

Doc = dict[str, Any]
ENGINE_S = 1.0


async def chat(client: httpx.AsyncClient, gw: GatewayProcess, who: str, text: str) -> httpx.Response:
    return await client.post(
        f"{gw.url}/api/chat",
        json={"model": "m", "messages": [{"role": "user", "content": text}]},
        headers={"Authorization": f"Bearer {gw.token}", "X-Client-ID": who},
        timeout=120,
    )


async def batch_worker(client: httpx.AsyncClient, gw: GatewayProcess, stop: float, index: int) -> None:
    n = 0
    while time.monotonic() < stop:
        n += 1
        answer = await chat(client, gw, "batch", f"batch {index}-{n}")
        if answer.status_code == 429:  # what a polite batch does: wait as told, then again
            await asyncio.sleep(float(answer.headers.get("Retry-After", "1")))


async def interactive(client: httpx.AsyncClient, gw: GatewayProcess, stop: float) -> list[int]:
    statuses = []
    n = 0
    while time.monotonic() < stop:
        n += 1
        answer = await chat(client, gw, "chat-ui", f"question {n}")
        statuses.append(answer.status_code)
        await asyncio.sleep(0.5)  # a person reading the answer
    return statuses


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def run(shares_on: bool, seconds: float) -> Doc:
    tmp = Path(tempfile.mkdtemp(prefix="fairness-"))
    model = {
        "kind": "stub",
        "args": ["--latency-ms", str(int(ENGINE_S * 1000))],
        "max_concurrent": 10,
        "max_waiting": 10,
    }
    gw = GatewayProcess(tmp, {"m": model}, fair_share={"enabled": shares_on})
    gw.start()
    try:
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=200)) as client:
            await gw.wait_ready(client)
            began = time.monotonic()
            stop = began + seconds
            workers = [asyncio.create_task(batch_worker(client, gw, stop, i)) for i in range(60)]
            statuses = await interactive(client, gw, stop)
            await asyncio.gather(*workers)
            wall = time.monotonic() - began
        db: AsyncMongoClient[Doc] = AsyncMongoClient(gw.db_uri())
        try:
            jobs = await db.gateway.jobs.find({"state": "succeeded"}).to_list()
        finally:
            await db.close()
    finally:
        gw.terminate()
    waits = [
        (j["started_at"] - j["enqueued_at"]).total_seconds() for j in jobs if j["client_id"] == "chat-ui"
    ]
    batch_done = sum(1 for j in jobs if j["client_id"] == "batch")
    return {
        "fair_shares": "on" if shares_on else "off",
        "interactive_requests": len(statuses),
        "interactive_429": statuses.count(429),
        "wait_p50_s": statistics.median(waits) if waits else float("nan"),
        "wait_p99_s": percentile(waits, 0.99),
        "batch_answers_per_s": batch_done / wall,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=40.0)
    args = parser.parse_args(argv)
    rows = [asyncio.run(run(on, args.seconds)) for on in (False, True)]
    print("| fair shares | interactive requests | interactive 429 | wait p50 (s) | wait p99 (s) |", end="")
    print(" batch answers/s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['fair_shares']} | {r['interactive_requests']} | {r['interactive_429']} | "
            f"{r['wait_p50_s']:.2f} | {r['wait_p99_s']:.2f} | {r['batch_answers_per_s']:.2f} |"
        )
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
