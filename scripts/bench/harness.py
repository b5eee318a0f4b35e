"""The bench's environment: the processes it starts and stops by pid, database probes, the load
client, the gateway and stub stack."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import psutil
import yaml
from pymongo import MongoClient, monitoring

from bench.scenarios import (
    CAPACITY,
    DB_NAME,
    FAST_MODEL,
    MODEL_BY_LATENCY,
    OCR_CAPACITY,
    OCR_MODEL,
    OPCOUNTER_KEYS,
    PASSWORD,
    REPO,
    SLOW_MODEL,
    STREAM_MODEL,
    STREAM_TOKEN_LATENCY_MS,
    Batch,
    Doc,
    ServerCost,
    StreamBatch,
)
from bench.streams import StreamBroken, read_stream

# -- processes ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop_pid(pid: int, name: str, timeout_s: float = 20.0) -> None:
    """SIGTERM one process by pid (never by name), SIGKILL it if it does not exit in time."""
    try:
        proc = psutil.Process(pid)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=timeout_s)
    except psutil.NoSuchProcess:
        return
    except psutil.TimeoutExpired:
        print(f"# {name} (pid {pid}) ignored SIGTERM for {timeout_s:g} s; killing it", file=sys.stderr)
        try:
            proc.kill()
            proc.wait(timeout=5)
        except psutil.NoSuchProcess:
            pass


class Processes:
    """Every child this bench starts, so that the finally block can stop each one by its pid."""

    def __init__(self) -> None:
        self._started: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.extra_pids: list[tuple[str, int]] = []  # grandchildren (the gateway's engines)

    def spawn(
        self, name: str, argv: list[str], env: dict[str, str], log_path: Path
    ) -> subprocess.Popen[bytes]:
        with log_path.open("ab") as log_out:
            popen = subprocess.Popen(
                argv,
                cwd=REPO,
                env=env,
                stdout=log_out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # a Ctrl-C in the terminal reaches the bench only
            )
        self._started.append((name, popen))
        return popen

    def pids(self) -> list[int]:
        return [popen.pid for _, popen in self._started]

    def stop_all(self) -> None:
        """Newest first: the gateway stops before the stubs and the database it talks to."""
        for name, popen in reversed(self._started):
            if popen.poll() is None:
                stop_pid(popen.pid, name)
            else:
                popen.wait()
        for name, pid in self.extra_pids:  # only if the gateway did not stop its engines itself
            stop_pid(pid, name, timeout_s=5.0)
        self._started.clear()
        self.extra_pids.clear()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process (not its children: the gateway's engines are not it)."""
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


# -- database probes ------------------------------------------------------------------------------


class _OwnCommands(monitoring.CommandListener):
    """Counts the commands this bench sends, so they can be taken out of the server's opcounters."""

    def __init__(self) -> None:
        self.count = 0

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        self.count += 1

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


class DbProbe:
    """A synchronous client for serverStatus and the history insert.

    Its heartbeat is set to an hour so its own monitoring does not show up in the opcounters;
    the remaining bench commands (serverStatus itself) are counted by a listener and subtracted.
    SecantusDB counts opcounters per command (one `insert` of 32 documents = 1), so the sum of
    the opcounters is the number of round trips the server answered.
    """

    def __init__(self, uri: str, pid: int) -> None:
        self.pid = pid
        self.own = _OwnCommands()
        self.client: MongoClient[Doc] = MongoClient(
            uri, heartbeatFrequencyMS=3_600_000, event_listeners=[self.own], tz_aware=True
        )

    def close(self) -> None:
        self.client.close()

    def opcounters(self) -> dict[str, int]:
        status = self.client.admin.command("serverStatus")
        counters = status.get("opcounters") or {}
        return {key: int(counters.get(key, 0)) for key in OPCOUNTER_KEYS}

    def version(self) -> str:
        info = self.client.admin.command("buildInfo")
        return str(info.get("secantusVersion") or info.get("version") or "unknown")


class CostMeter:
    """Gateway CPU, database CPU and database operations between start() and stop()."""

    def __init__(self, gateway_pid: int, db: DbProbe) -> None:
        self._gateway_pid = gateway_pid
        self._db = db
        self._start: tuple[float, float, dict[str, int], int] | None = None

    def start(self) -> None:
        ops = self._db.opcounters()
        own = self._db.own.count  # includes the serverStatus just sent, which `ops` already counted
        self._start = (cpu_seconds(self._gateway_pid), cpu_seconds(self._db.pid), ops, own)

    def stop(self) -> ServerCost:
        assert self._start is not None, "CostMeter.stop() before start()"
        gw_cpu = cpu_seconds(self._gateway_pid)
        db_cpu = cpu_seconds(self._db.pid)
        ops = self._db.opcounters()
        gw0, db0, ops0, own0 = self._start
        delta = {key: ops[key] - ops0[key] for key in OPCOUNTER_KEYS}
        delta["command"] -= self._db.own.count - own0  # our serverStatus calls are commands
        return ServerCost(gw_cpu - gw0, db_cpu - db0, delta)


def system_busy_s() -> float:
    """Non-idle CPU seconds of the whole machine, all cores together."""
    times = psutil.cpu_times()
    fields = ("user", "nice", "system", "irq", "softirq", "steal")
    return float(sum(getattr(times, name, 0.0) for name in fields))


class ForeignLoad:
    """CPU used during a window by processes that are not part of this bench, in cores.

    The machine may be shared (a test suite, a build); a number measured next to a busy
    neighbour on 2 cores is not comparable, so every row says how busy the rest was.
    """

    def __init__(self, own_pids: list[int]) -> None:
        self._own_pids = own_pids
        self._start: tuple[float, float, float] | None = None

    def _own_cpu(self) -> float:
        total = 0.0
        for pid in self._own_pids:
            with contextlib.suppress(psutil.NoSuchProcess):
                total += cpu_seconds(pid)
        return total

    def start(self) -> None:
        self._start = (time.perf_counter(), system_busy_s(), self._own_cpu())

    def stop(self) -> float:
        assert self._start is not None, "ForeignLoad.stop() before start()"
        began, busy0, own0 = self._start
        wall = time.perf_counter() - began
        foreign = (system_busy_s() - busy0) - (self._own_cpu() - own0)
        return max(0.0, foreign / wall) if wall > 0 else 0.0


HISTORY_SPAN_S = 15 * 86_400  # the history retention: 100k jobs are ~6,700 a day


def history_document(now: datetime, index: int, model: str) -> Doc:
    """A finished job as app/queue/store.py _finish leaves it: no slot, no lease, expire_at set."""
    finished = now - timedelta(seconds=(index * 12.96) % HISTORY_SPAN_S)  # over 15 days, evenly
    enqueued = finished - timedelta(milliseconds=230)
    started = enqueued + timedelta(milliseconds=3)
    return {
        "_id": "job_" + secrets.token_hex(12),
        "model": model,
        "kind": "chat",
        "state": "succeeded",
        "priority": "normal",
        "priority_rank": 1,
        "owner": "bench",
        "client_id": "bench-history",
        "request": {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 8},
        "enqueued_at": enqueued,
        "queue_deadline": enqueued + timedelta(seconds=300),
        "attempts": 1,
        "worker": "bench-history/0/0",
        "started_at": started,
        "finished_at": finished,
        "expire_at": finished + timedelta(days=15),
        "rev": uuid.uuid4().hex,
        "result": {
            "message": {"role": "assistant", "content": "stub reply to: hello"},
            "finish_reason": "stop",
            "usage": {"prompt_tokens": 1, "completion_tokens": 4, "total_tokens": 5},
            "engine_response_id": "chatcmpl-" + uuid.uuid4().hex,
            "system_fingerprint": "stub-engine (test double, not a model)",
        },
    }


def insert_history(db: DbProbe, count: int) -> float:
    """Put `count` finished jobs into the gateway's `jobs` collection; returns the seconds it took."""
    jobs = db.client.get_database(DB_NAME).get_collection("jobs")
    now = datetime.now(UTC)
    models = [FAST_MODEL, SLOW_MODEL]
    began = time.perf_counter()
    for start in range(0, count, 1000):
        docs = [history_document(now, i, models[i % 2]) for i in range(start, min(count, start + 1000))]
        jobs.insert_many(docs, ordered=False)
    elapsed = time.perf_counter() - began
    # Checkpoint the bulk load now: otherwise the first storage checkpoints after it (which
    # write every new page) land inside the measured scenarios. Steady-state history grows a
    # few jobs at a time and never makes such a checkpoint; this keeps the rows comparable.
    db.client.admin.command("fsync")
    return elapsed


# -- load client ----------------------------------------------------------------------------------


class LoadClient:
    """One aiohttp session with `concurrency` workers pulling from a shared request budget."""

    def __init__(self, concurrency: int) -> None:
        self.concurrency = concurrency
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> LoadClient:
        connector = aiohttp.TCPConnector(limit=self.concurrency, keepalive_timeout=60)
        self._session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def run(self, url: str, headers: dict[str, str], body: bytes, total: int) -> Batch:
        """Send `total` POSTs with at most `concurrency` in flight; body is pre-encoded JSON so
        the client spends the same (small) CPU per request on both paths."""
        assert self._session is not None
        session = self._session
        remaining = total
        latencies: list[float] = []
        errors = 0
        first_error: str | None = None
        headers = {**headers, "Content-Type": "application/json"}

        async def worker() -> None:
            nonlocal remaining, errors, first_error
            while remaining > 0:
                remaining -= 1
                began = time.perf_counter()
                try:
                    async with session.post(url, data=body, headers=headers) as response:
                        payload = await response.read()
                        status = response.status
                except (aiohttp.ClientError, TimeoutError) as exc:
                    status, payload = -1, repr(exc).encode()
                elapsed_ms = (time.perf_counter() - began) * 1000
                if status == 200:
                    latencies.append(elapsed_ms)
                else:
                    errors += 1
                    if first_error is None:
                        first_error = f"HTTP {status}: {payload[:300].decode(errors='replace')}"

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(min(self.concurrency, total))))
        return Batch(len(latencies), errors, time.perf_counter() - began, latencies, first_error)

    async def stream(self, url: str, headers: dict[str, str], body: bytes, total: int) -> StreamBatch:
        """Like run(), for SSE streams: each is read line by line as it arrives, so the first
        token is timed when its line comes off the socket, not when the stream ends."""
        assert self._session is not None
        session = self._session
        remaining = total
        ttfts: list[float] = []
        tokens: list[int] = []
        rates: list[float] = []
        lags: list[float] = []
        errors = 0
        first_error: str | None = None
        headers = {**headers, "Content-Type": "application/json", "Accept": "text/event-stream"}

        async def worker() -> None:
            nonlocal remaining, errors, first_error
            while remaining > 0:
                remaining -= 1
                try:
                    ttft_ms, count, rate, lag_ms = await read_stream(session, url, headers, body)
                except (StreamBroken, aiohttp.ClientError, TimeoutError, ValueError, LookupError) as exc:
                    errors += 1
                    if first_error is None:
                        first_error = str(exc) if isinstance(exc, StreamBroken) else repr(exc)
                    continue
                ttfts.append(ttft_ms)
                tokens.append(count)
                rates.append(rate)
                lags.append(lag_ms)

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(min(self.concurrency, total))))
        wall_s = time.perf_counter() - began
        return StreamBatch(len(ttfts), errors, wall_s, ttfts, tokens, rates, lags, first_error)


# -- the environment: database, stubs, gateway ----------------------------------------------------


@dataclass
class Stack:
    """Everything the scenarios need, started once per bench run."""

    tmp: Path
    procs: Processes
    db: DbProbe
    db_version: str
    gateway_pid: int
    gateway_url: str
    token: str
    direct_urls: dict[int, str]  # engine latency ms -> base URL of the bench's own stub
    stream_url: str | None  # the bench's own token-paced stub; None when streaming is skipped
    ocr_url: str | None  # the bench's own cpu_ocr engine; None when the OCR phase is skipped
    own_pids: list[int]  # the bench, its stubs, the database, the gateway and the gateway's engines
    db_uri: str


def python_env(extra: dict[str, str]) -> dict[str, str]:
    env = {**os.environ, **extra}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def log_tail(path: Path, chars: int = 2000) -> str:
    """The end of a child's log, for an error message that says why it died."""
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


async def wait_http(url: str, deadline_s: float, proc: subprocess.Popen[bytes], log_path: Path) -> Doc:
    """Poll a health URL until it answers 200 with JSON; fail fast if the process died."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + deadline_s
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        while loop.time() < deadline:
            if proc.poll() is not None:
                tail = await asyncio.to_thread(log_tail, log_path)
                raise RuntimeError(f"{url}: process exited with {proc.returncode}\n{tail}")
            try:
                async with session.get(url) as response:
                    if response.status == 200:
                        data: Doc = await response.json()
                        return data
            except (aiohttp.ClientError, TimeoutError):
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} did not become healthy within {deadline_s:g} s")


async def start_stub(
    procs: Processes, tmp: Path, name: str, args: list[str], module: str = "app.engines.stub"
) -> str:
    """One of the bench's own engines (the "direct" floor); returns its base URL."""
    port = free_port()
    log_path = tmp / f"direct-{name}.log"
    argv = [sys.executable, "-m", module, "--port", str(port), *args]
    proc = procs.spawn(f"direct {name}", argv, python_env({}), log_path)
    await wait_http(f"http://127.0.0.1:{port}/health", 120, proc, log_path)  # cpu_ocr loads its model
    return f"http://127.0.0.1:{port}"


@dataclass(frozen=True)
class GatewayProcess:
    """One gateway the bench started: `python -m app` with its own config file and database."""

    pid: int
    url: str
    token: str


async def start_database(procs: Processes, tmp: Path) -> tuple[str, int]:
    """The SecantusDB server, under the bench's control so its CPU and opcounters are ours to read."""
    from app.store.embedded import EmbeddedDatabase  # the repo root is on sys.path (see main)

    embedded = EmbeddedDatabase(tmp / "secantus", "secantusd-py", 60.0)
    uri = await embedded.start()
    assert embedded._pid is not None
    procs.extra_pids.append(("secantusd", embedded._pid))  # stopped last, after the gateways
    return uri, embedded._pid


async def start_gateway(
    procs: Processes, tmp: Path, uri: str, label: str, database: str, models: Doc, extra: Doc | None = None
) -> GatewayProcess:
    """A gateway configured as an operator would (plus `extra` config sections), an admin user
    made with the CLI, its engines ready, and a token for that user."""
    port = free_port()
    config: Doc = {
        "server": {"host": "127.0.0.1", "port": port, "log_level": "WARNING"},
        "data_dir": str(tmp / f"{label}-data"),
        "database": {"name": database},
        "models": models,
        **(extra or {}),
    }
    config_path = tmp / f"{label}.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    gw_env = python_env({"MONGODB_URI": uri, "GATEWAY_JWT_SECRET": secrets.token_hex(32)})
    cli = [
        sys.executable,
        "-m",
        "app.cli",
        "--config",
        str(config_path),
        "users",
        "create",
        "bench",
        "--role",
        "admin",
        "--password",
        PASSWORD,
    ]
    made = await asyncio.create_subprocess_exec(
        *cli, cwd=REPO, env=gw_env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    output, _ = await asyncio.wait_for(made.communicate(), timeout=120)
    if made.returncode != 0:
        raise RuntimeError(f"creating the bench user failed: {output.decode(errors='replace')}")
    log_path = tmp / f"{label}.log"
    argv = [sys.executable, "-m", "app", "--config", str(config_path)]
    gateway = procs.spawn(label, argv, gw_env, log_path)
    base = f"http://127.0.0.1:{port}"
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 180  # a cpu_ocr engine loads its model before it answers
    while True:
        health = await wait_http(f"{base}/health", 90, gateway, log_path)
        states = {name: m.get("state") for name, m in (health.get("engines") or {}).items()}
        if states and all(state == "ready" for state in states.values()):
            break
        if loop.time() > deadline:
            raise RuntimeError(f"gateway engines not ready: {health}")
        await asyncio.sleep(0.2)
    for child in psutil.Process(gateway.pid).children(recursive=True):
        procs.extra_pids.insert(0, (f"{label} engine pid {child.pid}", child.pid))

    async with aiohttp.ClientSession() as session:
        form = {"username": "bench", "password": PASSWORD}
        async with session.post(f"{base}/auth/token", data=form) as response:
            if response.status != 200:
                raise RuntimeError(f"/auth/token answered {response.status}: {await response.text()}")
            token = str((await response.json())["access_token"])
    return GatewayProcess(gateway.pid, base, token)


def bench_pids(procs: Processes) -> list[int]:
    """The bench, its stubs, the database, the gateways and the gateways' engines."""
    return sorted({os.getpid(), *procs.pids(), *(pid for _, pid in procs.extra_pids)})


async def start_stack(procs: Processes, tmp: Path, *, chat: bool, streaming: bool, ocr: bool) -> Stack:
    # 1. the database
    uri, db_pid = await start_database(procs, tmp)
    db = DbProbe(uri, db_pid)

    # 2. the bench's own engines, the "direct" floor (the OCR one as the gateway starts its own)
    direct_urls: dict[int, str] = {}
    for latency in MODEL_BY_LATENCY if chat else ():
        direct_urls[latency] = await start_stub(
            procs, tmp, f"stub-{latency}ms", ["--latency-ms", str(latency)]
        )
    stream_args = ["--token-latency-ms", str(STREAM_TOKEN_LATENCY_MS)]
    stream_url = await start_stub(procs, tmp, "stub-stream", stream_args) if streaming else None
    ocr_args = ["--model-name", OCR_MODEL]
    ocr_url = await start_stub(procs, tmp, "cpu-ocr", ocr_args, "app.engines.cpu_ocr") if ocr else None

    # 3. the gateway, configured as an operator would, plus an admin user made with the CLI
    models: Doc = {
        name: {"kind": "stub", "args": ["--latency-ms", str(latency)], **CAPACITY}
        for latency, name in (MODEL_BY_LATENCY.items() if chat else ())
    }
    # Each further model only when its phase runs: its dispatcher adds to the idle DB rate.
    if streaming:
        models[STREAM_MODEL] = {"kind": "stub", "args": stream_args, **CAPACITY}
    if ocr:
        models[OCR_MODEL] = {"kind": "cpu_ocr", **OCR_CAPACITY}
    gateway = await start_gateway(procs, tmp, uri, "gateway", DB_NAME, models)
    return Stack(
        tmp,
        procs,
        db,
        db.version(),
        gateway.pid,
        gateway.url,
        gateway.token,
        direct_urls,
        stream_url,
        ocr_url,
        bench_pids(procs),
        uri,
    )
