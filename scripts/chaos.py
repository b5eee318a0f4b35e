#!/usr/bin/env python3
"""Chaos run: a mixed chat load against one gateway on 127.0.0.1 while the gateway, its embedded
database and its engine are killed (and the database stalled) at random moments; then the
invariants are checked against the database and the engine's own journal.

    .venv/bin/python scripts/chaos.py --duration 60 --seed 7

Clients behave as the API documentation tells them to: each request carries an Idempotency-Key,
and after a 503 or a lost connection the same request is sent again with the same key; a 429
(the queue is full) is a refusal, and the client goes on with its next request. Invariants:
every admitted job ends terminal, no answered job is missing or different in the database, no
job ran twice at the same time at the engine, no answer was a 500, no process is left behind.
Exit status 0 when every invariant holds; the report (JSON) says what was injected and seen.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
from gateway_process import GatewayProcess
from pymongo import AsyncMongoClient

Doc = dict[str, Any]
MODEL = "chaos"
TERMINAL = {"succeeded", "failed", "cancelled", "expired"}
FAULTS = ("kill_gateway", "kill_database", "kill_engine", "stall_database")


@dataclass
class Seen:
    """What the clients saw."""

    statuses: Counter[str] = field(default_factory=Counter)
    answered: dict[str, Doc] = field(default_factory=dict)  # key -> the 200 body
    refused: set[str] = field(default_factory=set)  # 429: never admitted
    unanswered: set[str] = field(default_factory=set)  # still retrying when the run ended
    faults: Counter[str] = field(default_factory=Counter)


async def one_request(
    client: httpx.AsyncClient, gw: GatewayProcess, key: str, seen: Seen, stop_retrying: asyncio.Event
) -> None:
    """Send until answered (200), refused (429), or the run's retry window closed."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": key}]}
    headers = {
        "Authorization": f"Bearer {gw.token}",
        "X-Client-ID": key.split("-", maxsplit=1)[0],
        "X-Priority": random.choice(["high", "normal", "low"]),
        "Idempotency-Key": key,
    }
    while True:
        try:
            answer = await client.post(f"{gw.url}/api/chat", json=body, headers=headers, timeout=60)
            seen.statuses[str(answer.status_code)] += 1
            if answer.status_code == 200:
                seen.answered[key] = answer.json()
                return
            if answer.status_code == 429:
                seen.refused.add(key)
                return
        except httpx.HTTPError as exc:
            seen.statuses[type(exc).__name__] += 1
        if stop_retrying.is_set():
            seen.unanswered.add(key)
            return
        await asyncio.sleep(0.3)  # 503 or no connection: the same request again, same key


async def clients(
    gw: GatewayProcess, count: int, stop_sending: asyncio.Event, stop_retrying: asyncio.Event, seen: Seen
) -> None:
    async def one_client(index: int) -> None:
        async with httpx.AsyncClient() as client:
            sent = 0
            while not stop_sending.is_set():
                sent += 1
                await one_request(client, gw, f"c{index}-{sent}", seen, stop_retrying)

    await asyncio.gather(*(one_client(i) for i in range(count)))


async def faults(
    gw: GatewayProcess, rng: random.Random, stop: asyncio.Event, seen: Seen, every_s: float
) -> None:
    upcoming: list[str] = []
    async with httpx.AsyncClient() as client:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=rng.uniform(0.5 * every_s, 1.5 * every_s))
                return
            except TimeoutError:
                pass
            if not upcoming:  # every kind in each round, in a random order
                upcoming = rng.sample(FAULTS, len(FAULTS))
            fault = upcoming.pop()
            try:
                await inject(fault, gw, rng, client)
            except ProcessLookupError:  # it had just died (a previous fault): nothing injected
                continue
            seen.faults[fault] += 1
            print(f"# fault: {fault}", file=sys.stderr, flush=True)


async def inject(fault: str, gw: GatewayProcess, rng: random.Random, client: httpx.AsyncClient) -> None:
    if fault == "kill_gateway":
        gw.kill9()
        await asyncio.sleep(rng.uniform(0.2, 2.0))
        gw.start()
        await gw.wait_ready(client)
    elif fault in ("kill_database", "stall_database"):
        pid = gw.db_pid()
        if pid is None or not alive(pid):
            raise ProcessLookupError(pid)
        gw.pids.add(pid)
        if fault == "kill_database":
            os.kill(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGSTOP)
            await asyncio.sleep(rng.uniform(1.0, 3.0))
            os.kill(pid, signal.SIGCONT)
    else:
        pid = await gw.engine_pid(client, MODEL)
        if pid is None or not alive(pid):
            raise ProcessLookupError(pid)
        os.killpg(os.getpgid(pid), signal.SIGKILL)


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def ran_twice_at_once(journal: Path) -> list[str]:
    """Keys of which two engine calls overlapped. A call with no end was cut by an engine kill:
    it overlaps only a later call of the same key on that same engine process."""
    calls: dict[str, Doc] = {}
    for line in journal.read_text().splitlines():
        entry = json.loads(line)
        call = calls.setdefault(entry["call"], {"key": entry["content"], "pid": entry["pid"]})
        call[entry["event"]] = entry["t"]
    by_key: dict[str, list[Doc]] = {}
    for call in calls.values():
        by_key.setdefault(call["key"], []).append(call)
    overlapping = []
    for key, runs in by_key.items():
        runs.sort(key=lambda c: c["start"])
        for earlier, later in itertools.pairwise(runs):
            end = earlier.get("end")
            if (end is None and earlier["pid"] == later["pid"]) or (end is not None and end > later["start"]):
                overlapping.append(key)
                break
    return overlapping


async def check(gw: GatewayProcess, seen: Seen, journal: Path, queue: Doc) -> Doc:
    db: AsyncMongoClient[Doc] = AsyncMongoClient(gw.db_uri(), tz_aware=True)
    try:
        jobs = {
            d["idempotency_key"]: d
            async for d in db.gateway.jobs.find(
                {}, {"state": 1, "result": 1, "idempotency_key": 1, "attempts": 1}
            )
        }
    finally:
        await db.close()
    not_terminal = sorted(k for k, d in jobs.items() if d["state"] not in TERMINAL)
    lost = sorted(
        key
        for key, answer in seen.answered.items()
        if key not in jobs
        or jobs[key]["state"] != "succeeded"
        or (jobs[key].get("result") or {}).get("message", {}).get("content") != answer.get("response")
    )
    states = Counter(d["state"] for d in jobs.values())
    server_errors = {
        s: n for s, n in seen.statuses.items() if s.isdigit() and int(s) >= 500 and s not in ("503",)
    }
    return {
        "faults": dict(seen.faults),
        "requests": sum(seen.statuses.values()),
        "statuses": dict(seen.statuses),
        "answered": len(seen.answered),
        "refused_429": len(seen.refused),
        "unanswered_at_end": len(seen.unanswered),
        "admitted_jobs": len(jobs),
        "job_states": dict(states),
        "retried_jobs": sum(1 for d in jobs.values() if d.get("attempts", 0) > 1),
        # the admin view's totals, which must match the jobs exactly whatever was killed
        "totals": {k: queue.get(k) for k in ("total_processed", "total_failed", "expired", "cancelled")},
        "violations": {
            "not_terminal": not_terminal,
            "lost": lost,
            "ran_twice_at_once": ran_twice_at_once(journal),
            "server_errors": server_errors,
            "unanswered_and_not_admitted": sorted(k for k in seen.unanswered if k not in jobs),
            "totals_off": {
                name: [queue.get(name), states.get(state, 0)]
                for name, state in (
                    ("total_processed", "succeeded"),
                    ("total_failed", "failed"),
                    ("expired", "expired"),
                    ("cancelled", "cancelled"),
                )
                if queue.get(name) != states.get(state, 0)
            },
        },
    }


async def until_settled(gw: GatewayProcess, timeout_s: float) -> None:
    """Every admitted job terminal (or the deadline: the check then names what is not)."""
    deadline = time.monotonic() + timeout_s
    db: AsyncMongoClient[Doc] = AsyncMongoClient(gw.db_uri())
    try:
        while time.monotonic() < deadline:
            if await db.gateway.jobs.count_documents({"slot": {"$exists": True}}) == 0:
                return
            await asyncio.sleep(0.5)
    finally:
        await db.close()


async def run(args: argparse.Namespace) -> Doc:
    rng = random.Random(args.seed)
    random.seed(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="chaos-"))
    journal = tmp / "engine-journal.jsonl"
    journal.touch()
    engine = {
        "kind": "stub",
        "args": ["--latency-ms", str(args.latency_ms), "--journal", str(journal)],
        "max_concurrent": 4,
        "max_waiting": 8,
    }
    gw = GatewayProcess(
        tmp,
        {MODEL: engine},
        queue={
            "lease_seconds": 3,
            "heartbeat_seconds": 1,
            "sweep_interval_seconds": 0.5,
            "poll_interval_seconds": 0.5,
            "retry_backoff_seconds": 0.1,
            "max_retries": 5,
        },
        engines={"health_interval": 0.5},
    )
    seen = Seen()
    gw.start()
    try:
        async with httpx.AsyncClient() as client:
            await gw.wait_ready(client)
            gw.pids.add(gw.db_pid() or 0)
            await gw.engine_pid(client, MODEL)
        stop_sending, stop_retrying = asyncio.Event(), asyncio.Event()
        load = asyncio.create_task(clients(gw, args.clients, stop_sending, stop_retrying, seen))
        chaos = asyncio.create_task(faults(gw, rng, stop_sending, seen, args.fault_every))
        await asyncio.sleep(args.duration)
        stop_sending.set()
        await chaos
        async with httpx.AsyncClient() as client:
            await gw.wait_ready(client)  # the last fault may have left it restarting
            await gw.engine_pid(client, MODEL)
        retry_window = asyncio.get_running_loop().call_later(60, stop_retrying.set)
        await load
        retry_window.cancel()
        await until_settled(gw, 60)
        async with httpx.AsyncClient() as client:
            queue = await client.get(
                f"{gw.url}/admin/queue/{MODEL}", headers={"Authorization": f"Bearer {gw.admin_token}"}
            )
        report = await check(gw, seen, journal, queue.json())
    finally:
        exit_code = gw.terminate() if gw.proc is not None else None
        left = [pid for pid in gw.pids if pid and alive(pid)]
        for pid in left:  # a leak is reported, and still not left running
            os.kill(pid, signal.SIGKILL)
    report["violations"]["processes_left"] = left
    report["gateway_exit"] = exit_code
    report["log"] = str(gw.log)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load with faults")
    parser.add_argument("--fault-every", type=float, default=6.0, help="mean seconds between faults")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--latency-ms", type=int, default=300, help="the stub engine's time per answer")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--report", type=Path, help="also write the report (JSON) here")
    args = parser.parse_args(argv)
    report = asyncio.run(run(args))
    text = json.dumps(report, indent=2, sort_keys=True)
    print(text)
    if args.report:
        args.report.write_text(text + "\n")
    return 0 if not any(report["violations"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
