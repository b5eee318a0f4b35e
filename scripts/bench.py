"""Request-path benchmark: a stub engine called directly vs the same engine behind the gateway.

Why this exists: docs/ARCHITECTURE.md ("The embedded database") promises that the durable queue
(journaled writes on SecantusDB) costs the request path only a few milliseconds and a few
database round trips, and that the embedded database stays fast with 15 days (here: 100k) of
finished jobs in it. This script measures exactly that, on this machine, with real processes and real sockets:

* its own SecantusDB server (EmbeddedDatabase, temporary data dir), so its CPU time and its
  `serverStatus` opcounters belong to this run alone;
* its own stub engines for the "direct" numbers (the floor the gateway is compared against);
* the gateway as a subprocess (`python -m app --config FILE`), which starts its own stub
  engines with the same latencies;
* an aiohttp load client (one session per scenario, connector limit = concurrency).

A streaming phase (on the empty database) does the same for `stream: true` on
/v1/chat/completions: a stub that paces its tokens (20 ms apart, like a GPU decoding), read as
SSE line by line, so time to first token and tokens/s show what the durable queue adds to a
stream: the admission write, which overlaps the engine's first token (the engine is called while
the insert is in flight), and the outcome write, which the dispatcher makes after it has ended the
client's stream (where it can delay the next admission).

An OCR phase (on the empty database) reads a rendered text page three ways in interleaved rounds:
RapidOCR in the bench's own process (the model alone), the bench's own cpu_ocr engine process over
HTTP (the engine floor), and POST /api/ocr on the gateway (upload, render and resize, page store,
one queued job, the same engine kind); then a 10-page PDF through the gateway vs its pages sent to
the engine one after another, as pages per second.

A metrics phase (on the empty database) measures what Prometheus metrics cost the request path:
two fresh gateways configured alike except `metrics.enabled`, the same 0 ms engine at c=10, in
interleaved rounds (on/off, then off/on, ...) so drift on a shared machine hits both alike; then it
scrapes /metrics once and checks that gateway_requests_total counted every answered request.

Every process it starts is stopped by pid at the end, also on errors and Ctrl-C.

    .venv/bin/python scripts/bench.py                 # full run (about 15 minutes)
    .venv/bin/python scripts/bench.py --quick         # smoke test, about 4 minutes (OCR is most of it)
    .venv/bin/python scripts/bench.py --skip-100k --json /tmp/bench.json
    .venv/bin/python scripts/bench.py --only-streaming    # streaming phase only, about a minute
    .venv/bin/python scripts/bench.py --only-ocr          # OCR phase only, ~3.5 minutes on 2 idle cores
    .venv/bin/python scripts/bench.py --only-metrics      # metrics on vs off only, about 2 minutes
    .venv/bin/python scripts/bench.py --only-real-engine  # llama.cpp direct vs gateway, about 2 minutes
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import io
import json
import math
import os
import platform
import random
import re
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import yaml
from bench_streams import StreamBroken, nearest_rank, read_stream
from PIL import Image, ImageDraw, ImageFont
from prometheus_client.parser import text_string_to_metric_families
from pymongo import MongoClient, monitoring

REPO = Path(__file__).resolve().parent.parent
Doc = dict[str, Any]

FAST_MODEL = "bench-fast"  # stub engine answering at once (0 ms): measures pure overhead
SLOW_MODEL = "bench-slow"  # stub engine answering after 200 ms: measures overlap with work
MODEL_BY_LATENCY = {0: FAST_MODEL, 200: SLOW_MODEL}
STREAM_MODEL = "bench-stream"  # stub engine pacing its streamed tokens like a decoding GPU
STREAM_TOKEN_LATENCY_MS = 20  # between tokens: 50 tokens/s per stream, a typical decode pace
STREAM_MAX_TOKENS = 32
# The stub answers "stub reply to: <prompt words>" cut at max_tokens, so a prompt of at least
# max_tokens words makes every stream exactly STREAM_MAX_TOKENS content chunks long.
STREAM_PROMPT = " ".join(f"word{i}" for i in range(STREAM_MAX_TOKENS))
CAPACITY = {"max_concurrent": 32, "max_waiting": 32}  # so the c=32 scenario is never rejected (429)
OCR_MODEL = "ocr"  # a cpu_ocr engine (RapidOCR); configured only when the OCR phase runs
OCR_CAPACITY = {"max_concurrent": 2, "max_waiting": 10}  # as config/config.yaml ships its ocr model
OCR_PAGE_SIZE = (1000, 1300)  # the test page as uploaded; the gateway's default mode sends 985x1280
OCR_RESOLUTION = "large"  # the gateway's default resolution: longer side <= 1280 px
OCR_TITLE_PX, OCR_FONT_PX, OCR_LINES, OCR_LEADING_PX, OCR_MARGIN_PX = 36, 26, 34, 34, 60
OCR_PDF_PAGES = 10
OCR_PDF_DPI = 144  # the gateway's default ocr.pdf_dpi: a PDF page renders at the PNG page's size
OCR_MIN_RECALL = 0.9  # share of the page's words an answer must contain, else it counts as an error
_OCR_TEXT = (  # the test pages' words, drawn at random: OCR must give them back
    "the of and to in is that for on with as by this be are from at or an it not which have has "
    "gateway queue engine request journal durable page model client latency throughput database "
    "write admission outcome stream token benchmark machine process server worker memory history "
    "index retry lease slot priority document image text scanner report number value result "
    "budget morning evening river mountain garden window letter market table chapter section figure"
)
OCR_WORDS = tuple(_OCR_TEXT.split())
DB_NAME = "gateway"
PASSWORD = "bench-password-" + secrets.token_hex(8)
OPCOUNTER_KEYS = ("insert", "query", "update", "delete", "getmore", "command")


# -- scenarios and results ---------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    """One load shape; run once directly against a stub and once through the gateway."""

    latency_ms: int
    concurrency: int
    requests: int
    warmup: int

    @property
    def label(self) -> str:
        return f"{self.latency_ms} ms, c={self.concurrency}"


def scenarios(quick: bool) -> list[Scenario]:
    """Fixed request counts, so runs are comparable; --quick only shrinks the counts."""
    if quick:
        return [
            Scenario(0, 1, 40, 10),
            Scenario(0, 10, 150, 30),
            Scenario(0, 32, 200, 64),
            Scenario(200, 1, 15, 3),
            Scenario(200, 10, 60, 10),
        ]
    return [
        Scenario(0, 1, 300, 50),
        Scenario(0, 10, 2000, 200),
        Scenario(0, 32, 2000, 320),
        Scenario(200, 1, 300, 10),
        Scenario(200, 10, 1000, 50),
    ]


@dataclass(frozen=True)
class StreamScenario:
    """One streaming load shape (the 20 ms/token stub, 32 tokens a stream), direct then gateway."""

    concurrency: int
    streams: int
    warmup: int

    @property
    def label(self) -> str:
        return f"stream c={self.concurrency}"


def stream_scenarios(quick: bool) -> list[StreamScenario]:
    """c=1 for time to first token, c=10 for throughput: the two the streaming targets name.

    A stream lasts ~0.7 s whatever the machine, so the counts set the run time directly.
    """
    if quick:
        return [StreamScenario(1, 10, 2), StreamScenario(10, 30, 10)]
    return [StreamScenario(1, 40, 5), StreamScenario(10, 100, 10)]


@dataclass
class Batch:
    """What the load client saw for one measured batch of requests."""

    ok: int
    errors: int
    wall_s: float
    latencies_ms: list[float]
    first_error: str | None = None

    @property
    def rps(self) -> float:
        return self.ok / self.wall_s if self.wall_s > 0 else 0.0

    def percentile(self, q: float) -> float:
        return nearest_rank(self.latencies_ms, q)


@dataclass
class StreamBatch:
    """What the load client saw for one measured batch of streams (only complete ones count)."""

    ok: int
    errors: int
    wall_s: float
    ttfts_ms: list[float]  # send -> first chunk with non-empty delta.content
    tokens: list[int]  # usage.completion_tokens of each stream (checked against its content chunks)
    decode_rates: list[float]  # per stream: tokens after the first / (last token - first token)
    done_lags_ms: list[float]  # per stream: last token -> [DONE] (what the gateway adds at the end)
    first_error: str | None = None

    @property
    def total_tokens(self) -> int:
        return sum(self.tokens)

    @property
    def tokens_per_s(self) -> float:
        """Aggregate: every token of the batch over its wall time (what a GPU's users get)."""
        return self.total_tokens / self.wall_s if self.wall_s > 0 else 0.0

    def ttft(self, q: float) -> float:
        return nearest_rank(self.ttfts_ms, q)


@dataclass
class ServerCost:
    """Gateway and database resources spent during one measured window."""

    gateway_cpu_s: float
    db_cpu_s: float
    db_ops: dict[str, int]

    @property
    def db_round_trips(self) -> int:
        return sum(self.db_ops.values())


@dataclass
class Result:
    """One scenario row of the report (also what --json writes)."""

    history: int
    latency_ms: int
    concurrency: int
    requests: int
    direct_p50_ms: float
    direct_p99_ms: float
    gateway_p50_ms: float
    gateway_p99_ms: float
    direct_rps: float
    gateway_rps: float
    direct_errors: int
    gateway_errors: int
    gateway_cpu_ms_per_req: float
    db_cpu_ms_per_req: float
    db_round_trips_per_req: float
    db_round_trips_net_per_req: float  # minus the idle background rate over the same wall time
    db_ops_per_req: dict[str, float]
    foreign_cores: float  # CPU used by processes outside the bench during the scenario
    first_error: str | None = None

    @property
    def added_p50_ms(self) -> float:
        return self.gateway_p50_ms - self.direct_p50_ms

    @property
    def added_p99_ms(self) -> float:
        return self.gateway_p99_ms - self.direct_p99_ms

    @property
    def rps_ratio(self) -> float:
        return self.gateway_rps / self.direct_rps if self.direct_rps else math.nan

    @property
    def label(self) -> str:
        return f"{self.latency_ms} ms c={self.concurrency}"


@dataclass
class StreamResult:
    """One streaming row of the report (also what --json writes under "streaming")."""

    history: int
    concurrency: int
    streams: int
    tokens_per_stream: float
    direct_ttft_p50_ms: float
    direct_ttft_p99_ms: float
    gateway_ttft_p50_ms: float
    gateway_ttft_p99_ms: float
    direct_tokens_per_s: float
    gateway_tokens_per_s: float
    direct_decode_p50: float  # tokens/s of one stream after its first token
    gateway_decode_p50: float
    direct_done_lag_p50_ms: float  # last token -> [DONE]; the client starts its next stream after it
    gateway_done_lag_p50_ms: float
    direct_errors: int
    gateway_errors: int
    gateway_cpu_ms_per_stream: float
    db_round_trips_per_stream: float
    db_round_trips_net_per_stream: float  # minus the idle background rate over the same wall time
    foreign_cores: float
    first_error: str | None = None

    @property
    def added_ttft_p50_ms(self) -> float:
        return self.gateway_ttft_p50_ms - self.direct_ttft_p50_ms

    @property
    def added_ttft_p99_ms(self) -> float:
        return self.gateway_ttft_p99_ms - self.direct_ttft_p99_ms

    @property
    def tokens_ratio(self) -> float:
        return self.gateway_tokens_per_s / self.direct_tokens_per_s if self.direct_tokens_per_s else math.nan

    @property
    def label(self) -> str:
        return f"stream c={self.concurrency}"


@dataclass
class Idle:
    """The gateway's cost with no requests: sweeper, heartbeat, dispatcher polls, driver monitor."""

    history: int
    seconds: float
    db_ops_per_s: float
    gateway_cpu_pct: float
    db_cpu_pct: float
    db_ops: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class OcrScenario:
    """Sequential pages (c=1): OCR on a CPU takes seconds a page, so counts stay small."""

    pages: int  # measured rounds; each round reads the page once on each of the three paths
    warmup: int
    pdf_runs: int  # each run: the PDF's pages direct one after another, then the PDF via the gateway


def ocr_scenario(quick: bool) -> OcrScenario:
    return OcrScenario(3, 1, 1) if quick else OcrScenario(8, 2, 2)


@dataclass
class OcrPath:
    """What one way of reading the page gave over the measured rounds."""

    latencies_ms: list[float] = field(default_factory=list)
    inference_ms: list[float] = field(default_factory=list)  # RapidOCR's own time in each read
    recalls: list[float] = field(default_factory=list)  # of the page's words found in each answer
    errors: int = 0
    first_error: str | None = None

    def fail(self, message: str) -> None:
        self.errors += 1
        if self.first_error is None:
            self.first_error = message[:300]

    def ok(self, elapsed_ms: float, recall: float, inference_ms: float) -> None:
        """A read counts only if the text is there: a fast wrong answer is an error."""
        if recall < OCR_MIN_RECALL:
            self.fail(f"answer holds only {recall:.0%} of the page's words (< {OCR_MIN_RECALL:.0%})")
            return
        self.latencies_ms.append(elapsed_ms)
        self.inference_ms.append(inference_ms)
        self.recalls.append(recall)

    def p50(self) -> float:
        return nearest_rank(self.latencies_ms, 0.50)

    def inference_p50(self) -> float:
        return nearest_rank([ms for ms in self.inference_ms if not math.isnan(ms)], 0.50)

    def outside_p50(self) -> float:
        """Median of (wall - inference) per read: what the path adds, whatever the machine's load."""
        pairs = zip(self.latencies_ms, self.inference_ms, strict=True)
        return nearest_rank([wall - spent for wall, spent in pairs if not math.isnan(spent)], 0.50)


@dataclass
class OcrResult:
    """The OCR rows of the report (also what --json writes under "ocr")."""

    history: int
    pages: int
    warmup: int
    upload: str  # what the gateway gets: "1000x1300 PNG, N bytes"
    engine_page: str  # what the engine gets (from the gateway, and from the bench directly)
    inproc_p50_ms: float  # RapidOCR called in the bench process on the engine's image
    inproc_max_ms: float
    direct_p50_ms: float  # the bench's own cpu_ocr engine over HTTP, the page as a PNG data URL
    direct_max_ms: float
    gateway_p50_ms: float  # POST /api/ocr, multipart upload of the original PNG
    gateway_max_ms: float
    inference_p50_ms: dict[str, float]  # per path: RapidOCR's own time (the engines log it per page)
    outside_p50_ms: dict[str, float]  # per path: p50 of (wall - inference), i.e. what the path adds
    inference_pooled_p50_ms: float  # p50 over every measured read of all three paths (same page)
    gateway_job_p50_ms: float  # timings.total_ms: admitted -> finished (queue + reading the page)
    gateway_run_p50_ms: float  # timings.engine_ms: started -> finished (page load, engine call, record)
    gateway_outside_p50_ms: float  # wall - total_ms: upload, render, page store, admission, answer
    recall_min: dict[str, float]
    errors: dict[str, int]
    gateway_cpu_ms_per_page: float
    db_cpu_ms_per_page: float
    db_round_trips_per_page: float
    db_round_trips_net_per_page: float
    pdf: str  # "10 pages, N bytes"
    pdf_pages: int
    pdf_direct_s: list[float]  # wall time of each run: the 10 pages to the engine, one after another
    pdf_gateway_s: list[float]  # wall time of each run: the PDF through POST /api/ocr
    pdf_direct_inference_s: list[float]  # of each run's wall: the engine's inference, all pages
    pdf_gateway_inference_s: list[float]
    pdf_errors: dict[str, int]
    foreign_cores: float
    first_error: str | None = None

    @property
    def ratio_direct(self) -> float:
        return self.gateway_p50_ms / self.direct_p50_ms if self.direct_p50_ms else math.nan

    @property
    def ratio_inproc(self) -> float:
        return self.gateway_p50_ms / self.inproc_p50_ms if self.inproc_p50_ms else math.nan

    @property
    def pdf_direct_pages_per_s(self) -> float:
        walls = self.pdf_direct_s
        return self.pdf_pages * len(walls) / sum(walls) if walls else math.nan

    @property
    def pdf_gateway_pages_per_s(self) -> float:
        walls = self.pdf_gateway_s
        return self.pdf_pages * len(walls) / sum(walls) if walls else math.nan

    @property
    def pdf_ratio(self) -> float:
        return self.pdf_gateway_pages_per_s / self.pdf_direct_pages_per_s

    def at_equal_inference(self, path: str) -> float:
        """gateway / path if both had read the page in the same (pooled p50) inference time.

        On a shared machine one read's inference time varies several-fold with the neighbours'
        load, so the raw p50 ratio of 8 reads swings far either side of 1; each path's own cost
        (wall - inference, per read) does not, and neither does the pooled p50 of 24 reads.
        """
        t = self.inference_pooled_p50_ms
        return (t + self.outside_p50_ms["gateway"]) / (t + self.outside_p50_ms[path])

    @property
    def added_ms(self) -> float:
        """The gateway's cost per page beyond the direct engine call, net of inference time."""
        return self.outside_p50_ms["gateway"] - self.outside_p50_ms["engine"]

    @property
    def pdf_outside_s_per_page(self) -> dict[str, float]:
        runs = {
            "engine": zip(self.pdf_direct_s, self.pdf_direct_inference_s, strict=True),
            "gateway": zip(self.pdf_gateway_s, self.pdf_gateway_inference_s, strict=True),
        }
        return {
            name: nearest_rank([(wall - spent) / self.pdf_pages for wall, spent in pairs], 0.50)
            for name, pairs in runs.items()
        }

    @property
    def total_errors(self) -> int:
        return sum(self.errors.values()) + sum(self.pdf_errors.values())


@dataclass(frozen=True)
class MetricsScenario:
    """Metrics on vs off: `rounds` interleaved rounds of `requests` per side, 0 ms engine."""

    concurrency: int
    requests: int
    rounds: int
    warmup: int


def metrics_scenario(quick: bool) -> MetricsScenario:
    """c=10 with a 0 ms engine: the gateway's own cost is all there is, so a cost shows most."""
    return MetricsScenario(10, 150, 4, 30) if quick else MetricsScenario(10, 500, 10, 100)


@dataclass
class MetricsResult:
    """The metrics phase (also what --json writes under "metrics")."""

    concurrency: int
    requests: int
    rounds: int
    on_ok: int
    on_wall_s: float
    on_cpu_s: float
    off_ok: int
    off_wall_s: float
    off_cpu_s: float
    round_ratios: list[float]  # per round: rps with metrics / rps without
    errors: int
    answered: int  # 200s the metrics-on gateway gave, warmup included
    counted: float  # its gateway_requests_total{outcome="succeeded"} after the phase
    scrape_ms: float  # GET /metrics on it after the phase, median of 5
    off_status: int  # GET /metrics on the metrics-off gateway (404 expected)
    calls_us_per_req: float  # the metric calls one request makes, timed in the bench's process
    foreign_cores: float
    first_error: str | None = None

    @property
    def on_rps(self) -> float:
        return self.on_ok / self.on_wall_s if self.on_wall_s > 0 else math.nan

    @property
    def off_rps(self) -> float:
        return self.off_ok / self.off_wall_s if self.off_wall_s > 0 else math.nan

    @property
    def ratio(self) -> float:
        return self.on_rps / self.off_rps if self.off_rps else math.nan

    @property
    def median_round_ratio(self) -> float:
        """Robust to one round that a neighbour's burst hit (the machine may be shared)."""
        return statistics.median(self.round_ratios) if self.round_ratios else math.nan

    @property
    def cost_pct(self) -> float:
        return (1 - self.median_round_ratio) * 100

    @property
    def calls_share_pct(self) -> float:
        """The metric calls' CPU as a share of what a request costs the metrics-off gateway."""
        return self.calls_us_per_req / 1000 / self.off_cpu_ms * 100 if self.off_cpu_ms else math.nan

    @property
    def on_cpu_ms(self) -> float:
        return self.on_cpu_s * 1000 / max(1, self.on_ok)

    @property
    def off_cpu_ms(self) -> float:
        return self.off_cpu_s * 1000 / max(1, self.off_ok)


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


def history_document(now: datetime, index: int, model: str) -> Doc:
    """A finished job as app/queue/store.py _finish leaves it: no slot, no lease, expire_at set."""
    finished = now - timedelta(seconds=(index * 0.864) % 86_400)  # spread over the last day
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


async def measure_idle(stack: Stack, history: int, seconds: float) -> Idle:
    """The background rate, so per-request DB numbers at low request rates can be read net of it."""
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
    )


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


# -- the OCR phase --------------------------------------------------------------------------------

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont
Reader = Callable[[Image.Image], str]


def ocr_page_lines(seed: int, font: Font, width: float) -> list[str]:
    """OCR_LINES lines of words, each filled to the text width like a typeset page (fixed seed)."""
    rng = random.Random(seed)
    lines: list[str] = []
    for _ in range(OCR_LINES):
        words: list[str] = []
        while True:
            word = rng.choice(OCR_WORDS)
            if words and font.getlength(" ".join([*words, word])) > width:
                break
            words.append(word)
        line = " ".join(words)
        lines.append(line[:1].upper() + line[1:])
    return lines


def draw_ocr_page(seed: int) -> tuple[Image.Image, list[str]]:
    """A dense text page (a title, then OCR_LINES lines of 26-px text) and the lines it holds."""
    page = Image.new("RGB", OCR_PAGE_SIZE, "white")
    draw = ImageDraw.Draw(page)
    title = f"Benchmark report {seed + 1}"
    draw.text((OCR_MARGIN_PX, 48), title, fill="black", font=ImageFont.load_default(size=OCR_TITLE_PX))
    body = ImageFont.load_default(size=OCR_FONT_PX)
    lines = ocr_page_lines(seed, body, OCR_PAGE_SIZE[0] - 2 * OCR_MARGIN_PX)
    for index, line in enumerate(lines):
        draw.text((OCR_MARGIN_PX, 110 + index * OCR_LEADING_PX), line, fill=(20, 20, 20), font=body)
    return page, [title, *lines]


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")  # Pillow's default compression, as a client would send it
    return buffer.getvalue()


def make_pdf(pages: list[Image.Image]) -> bytes:
    """A scan-like PDF: one JPEG image a page (Pillow's PDF writer), at the gateway's render dpi."""
    buffer = io.BytesIO()
    pages[0].save(buffer, format="PDF", save_all=True, append_images=pages[1:], resolution=OCR_PDF_DPI)
    return buffer.getvalue()


def word_recall(expected: list[str], text: str) -> float:
    """The share of the page's words (repeats counted) found in an answer, whatever their order."""
    want = Counter(re.findall(r"[a-z0-9]+", " ".join(expected).lower()))
    got = Counter(re.findall(r"[a-z0-9]+", text.lower()))
    total = sum(want.values())
    return sum(min(count, got[word]) for word, count in want.items()) / total if total else 0.0


def engine_pages(document: bytes) -> list[Image.Image]:
    """The pages as the gateway hands them to its engine, made by the gateway's own functions:
    loaded (a PDF rendered at the default dpi) and resized for the default resolution."""
    from app.ocr.documents import load_pages, resize_for_mode
    from app.settings import OcrSettings

    ocr = OcrSettings()
    loaded = load_pages(
        document, pages=None, max_pages=ocr.max_pages, max_pixels=ocr.max_pixels, dpi=ocr.pdf_dpi
    )
    return [resize_for_mode(page.image, ocr.default_resolution) for page in loaded]


def engine_body(image: Image.Image) -> bytes:
    """The gateway's engine request for one page (PNG data URL, app/ocr/requests.py), pre-encoded."""
    from app.ocr.documents import encode_data_url
    from app.ocr.requests import DEFAULT_MAX_TOKENS, page_request

    request = page_request(OCR_MODEL, encode_data_url(image), "text", DEFAULT_MAX_TOKENS)
    return json.dumps(request).encode()


def load_inprocess_ocr() -> Reader:
    """RapidOCR in this process, built as app/engines/cpu_ocr.py load_rapidocr builds it, with
    the engine's own defaults (the gateway starts it with no further args): det_unclip_ratio,
    onnxruntime threads, and the angle classifier off."""
    from rapidocr_onnxruntime import RapidOCR  # type: ignore[import-untyped]

    from app.engines.cpu_ocr import parse_args

    engine = parse_args(["--port", "0"])
    options: dict[str, Any] = {"det_unclip_ratio": engine.unclip_ratio}
    if engine.threads > 0:
        options["intra_op_num_threads"] = engine.threads
    model = RapidOCR(**options)
    use_cls = bool(engine.angle_cls)

    def read(image: Image.Image) -> str:
        result, _elapsed = model(image, use_cls=use_cls)
        return "\n".join(str(text) for _box, text, _score in result or [])

    return read


class EngineLog:
    """The inference time a cpu_ocr engine logs for each page (`cpu_ocr.done ... ms=N`), read as
    its log grows. Pages go one at a time, so the lines new since the last look are the call's.

    Wall time minus this is what a path adds to RapidOCR itself, a figure that holds on a busy
    machine where the inference time of one page varies several-fold from read to read.
    """

    _DONE = re.compile(rb"cpu_ocr\.done .*?\bms=(\d+)")

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = path.stat().st_size if path.exists() else 0

    def take(self) -> list[float]:
        """Inference ms of each page logged since the last call (complete lines only)."""
        try:
            with self.path.open("rb") as log:
                log.seek(self.offset)
                data = log.read()
        except OSError:
            return []
        data = data[: data.rfind(b"\n") + 1]
        self.offset += len(data)
        return [float(ms) for ms in self._DONE.findall(data)]

    def last(self) -> float:
        taken = self.take()
        return taken[-1] if taken else math.nan


def timed_read(read: Reader, image: Image.Image) -> tuple[float, str]:
    began = time.perf_counter()
    text = read(image)
    return (time.perf_counter() - began) * 1000, text


class OcrFailed(Exception):
    """An OCR call that did not answer 200 with a usable body."""


OCR_CALL_ERRORS = (OcrFailed, aiohttp.ClientError, TimeoutError, ValueError, LookupError, TypeError)


def describe(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, OcrFailed) else repr(exc)


async def ocr_engine_call(session: aiohttp.ClientSession, url: str, body: bytes) -> tuple[float, str]:
    """One page straight to a cpu_ocr engine: (ms, the answer's text)."""
    began = time.perf_counter()
    async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as response:
        payload = await response.read()
        status = response.status
    elapsed_ms = (time.perf_counter() - began) * 1000
    if status != 200:
        raise OcrFailed(f"engine HTTP {status}: {payload[:300].decode(errors='replace')}")
    return elapsed_ms, str(json.loads(payload)["choices"][0]["message"]["content"])


async def ocr_gateway_call(
    session: aiohttp.ClientSession, stack: Stack, document: bytes, filename: str, content_type: str
) -> tuple[float, Doc]:
    """One document through POST /api/ocr as multipart: (ms, the answer)."""
    form = aiohttp.FormData()
    form.add_field("file", document, filename=filename, content_type=content_type)
    form.add_field("model", OCR_MODEL)
    headers = {"Authorization": f"Bearer {stack.token}", "X-Client-ID": "bench"}
    began = time.perf_counter()
    async with session.post(f"{stack.gateway_url}/api/ocr", data=form, headers=headers) as response:
        payload = await response.read()
        status = response.status
    elapsed_ms = (time.perf_counter() - began) * 1000
    if status != 200:
        raise OcrFailed(f"gateway HTTP {status}: {payload[:300].decode(errors='replace')}")
    answer: Doc = json.loads(payload)
    return elapsed_ms, answer


async def run_ocr_phase(stack: Stack, sc: OcrScenario, history: int, idle: Idle) -> OcrResult:
    """One page three ways in rounds, then the PDF; one page in flight at a time throughout.

    Each round reads the page once on every path, in an order that rotates from round to round,
    so a busy neighbour on a shared machine slows all three alike instead of whichever ran last.
    """
    assert stack.ocr_url is not None, "the stack was started without the OCR engine"
    page, lines = draw_ocr_page(0)
    upload = png_bytes(page)
    image = engine_pages(upload)[0]
    body = engine_body(image)
    read = await asyncio.to_thread(load_inprocess_ocr)
    engine_url = f"{stack.ocr_url}/v1/chat/completions"
    direct_log = EngineLog(stack.tmp / "direct-cpu-ocr.log")
    gateway_log = EngineLog(stack.tmp / "gateway-data" / "logs" / f"{OCR_MODEL}.log")
    paths = {"in-process": OcrPath(), "engine": OcrPath(), "gateway": OcrPath()}
    job_ms: list[float] = []
    run_ms: list[float] = []
    outside_ms: list[float] = []
    costs: list[ServerCost] = []
    metered_s = 0.0
    meter = CostMeter(stack.gateway_pid, stack.db)
    foreign = ForeignLoad(stack.own_pids)
    foreign.start()

    async def in_process(sink: OcrPath, measured: bool) -> None:
        elapsed, text = await asyncio.to_thread(timed_read, read, image)
        sink.ok(elapsed, word_recall(lines, text), elapsed)

    async def engine(sink: OcrPath, measured: bool) -> None:
        direct_log.take()
        try:
            elapsed, text = await ocr_engine_call(session, engine_url, body)
        except OCR_CALL_ERRORS as exc:
            sink.fail(describe(exc))
            return
        sink.ok(elapsed, word_recall(lines, text), direct_log.last())

    async def gateway(sink: OcrPath, measured: bool) -> None:
        nonlocal metered_s
        gateway_log.take()
        began = time.perf_counter()
        meter.start()
        try:
            elapsed, answer = await ocr_gateway_call(session, stack, upload, "page.png", "image/png")
        except OCR_CALL_ERRORS as exc:
            sink.fail(describe(exc))
            return
        finally:
            cost = meter.stop()
            if measured:
                costs.append(cost)
                metered_s += time.perf_counter() - began
        sink.ok(elapsed, word_recall(lines, str(answer.get("text") or "")), gateway_log.last())
        spent = answer.get("timings") or {}
        if measured and isinstance(spent.get("total_ms"), int | float):
            job_ms.append(float(spent["total_ms"]))
            run_ms.append(float(spent.get("engine_ms") or math.nan))
            outside_ms.append(elapsed - float(spent["total_ms"]))

    steps = [(name, step) for name, step in zip(paths, (in_process, engine, gateway), strict=True)]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900)) as session:
        for round_ in range(sc.warmup + sc.pages):
            measured = round_ >= sc.warmup
            shift = round_ % len(steps)
            for name, step in steps[shift:] + steps[:shift]:
                await step(paths[name] if measured else OcrPath(), measured)

        pdf_pages = [draw_ocr_page(seed) for seed in range(1, OCR_PDF_PAGES + 1)]
        pdf = make_pdf([p for p, _ in pdf_pages])
        bodies = [engine_body(im) for im in engine_pages(pdf)]
        pdf_paths = {"engine": OcrPath(), "gateway": OcrPath()}
        for _ in range(sc.pdf_runs):
            direct_log.take()
            began = time.perf_counter()
            worst = 1.0
            try:
                for page_body, (_, expected) in zip(bodies, pdf_pages, strict=True):
                    _, text = await ocr_engine_call(session, engine_url, page_body)
                    worst = min(worst, word_recall(expected, text))
                elapsed = (time.perf_counter() - began) * 1000
                pdf_paths["engine"].ok(elapsed, worst, sum(direct_log.take()))
            except OCR_CALL_ERRORS as exc:
                pdf_paths["engine"].fail(describe(exc))
            gateway_log.take()
            try:
                elapsed, answer = await ocr_gateway_call(session, stack, pdf, "report.pdf", "application/pdf")
                read_pages = answer.get("pages") or []
                if len(read_pages) != OCR_PDF_PAGES:
                    raise OcrFailed(f"gateway answered {len(read_pages)} pages of {OCR_PDF_PAGES}")
                worst = min(
                    word_recall(expected, str(got.get("text") or ""))
                    for got, (_, expected) in zip(read_pages, pdf_pages, strict=True)
                )
                pdf_paths["gateway"].ok(elapsed, worst, sum(gateway_log.take()))
            except OCR_CALL_ERRORS as exc:
                pdf_paths["gateway"].fail(describe(exc))
    foreign_cores = foreign.stop()

    gw = paths["gateway"]
    done = max(1, len(gw.latencies_ms))
    trips = sum(c.db_round_trips for c in costs)
    background = idle.db_ops_per_s * metered_s
    every = [*paths.values(), *pdf_paths.values()]
    return OcrResult(
        history=history,
        pages=sc.pages,
        warmup=sc.warmup,
        upload=f"{page.width}x{page.height} PNG, {len(upload):,} bytes",
        engine_page=f"{image.width}x{image.height} PNG data URL, {len(body):,} bytes of JSON",
        inproc_p50_ms=paths["in-process"].p50(),
        inproc_max_ms=max(paths["in-process"].latencies_ms, default=math.nan),
        direct_p50_ms=paths["engine"].p50(),
        direct_max_ms=max(paths["engine"].latencies_ms, default=math.nan),
        gateway_p50_ms=gw.p50(),
        gateway_max_ms=max(gw.latencies_ms, default=math.nan),
        inference_p50_ms={name: path.inference_p50() for name, path in paths.items()},
        outside_p50_ms={name: path.outside_p50() for name, path in paths.items()},
        inference_pooled_p50_ms=nearest_rank(
            [ms for path in paths.values() for ms in path.inference_ms if not math.isnan(ms)], 0.50
        ),
        gateway_job_p50_ms=nearest_rank(job_ms, 0.50),
        gateway_run_p50_ms=nearest_rank(run_ms, 0.50),
        gateway_outside_p50_ms=nearest_rank(outside_ms, 0.50),
        recall_min={name: min(path.recalls, default=math.nan) for name, path in paths.items()},
        errors={name: path.errors for name, path in paths.items()},
        gateway_cpu_ms_per_page=sum(c.gateway_cpu_s for c in costs) * 1000 / done,
        db_cpu_ms_per_page=sum(c.db_cpu_s for c in costs) * 1000 / done,
        db_round_trips_per_page=trips / done,
        db_round_trips_net_per_page=max(0.0, trips - background) / done,
        pdf=(
            f"{OCR_PDF_PAGES} pages of {OCR_PAGE_SIZE[0]}x{OCR_PAGE_SIZE[1]} px, one JPEG each "
            f"at {OCR_PDF_DPI} dpi, {len(pdf):,} bytes"
        ),
        pdf_pages=OCR_PDF_PAGES,
        pdf_direct_s=[ms / 1000 for ms in pdf_paths["engine"].latencies_ms],
        pdf_gateway_s=[ms / 1000 for ms in pdf_paths["gateway"].latencies_ms],
        pdf_direct_inference_s=[ms / 1000 for ms in pdf_paths["engine"].inference_ms],
        pdf_gateway_inference_s=[ms / 1000 for ms in pdf_paths["gateway"].inference_ms],
        pdf_errors={name: path.errors for name, path in pdf_paths.items()},
        foreign_cores=foreign_cores,
        first_error=next((path.first_error for path in every if path.first_error), None),
    )


# -- report ---------------------------------------------------------------------------------------


def machine_line(db_version: str) -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram_gib = psutil.virtual_memory().total / 2**30
    return (
        f"Machine: {os.cpu_count()} cores, {ram_gib:.1f} GiB RAM, {model}; "
        f"Python {platform.python_version()}; "
        f"SecantusDB {db_version}; capacity per model max_concurrent={CAPACITY['max_concurrent']}, "
        f"max_waiting={CAPACITY['max_waiting']}"
    )


def fmt(value: float, digits: int = 1) -> str:
    return "n/a" if math.isnan(value) else f"{value:.{digits}f}"


def table(results: list[Result]) -> Iterator[str]:
    yield (
        "| history | engine | c | n | p50 direct | p50 gw | added p50 | p99 direct | p99 gw | added p99 "
        "| rps direct | rps gw | gw/direct | errors d/g | gw CPU ms/req | DB CPU ms/req "
        "| DB rt/req | DB rt/req net | ins/upd/qry/cmd per req | other load |"
    )
    yield "|" + "---|" * 20
    for r in results:
        ops = r.db_ops_per_req
        mix = "/".join(fmt(ops.get(k, 0.0), 2) for k in ("insert", "update", "query", "command"))
        yield (
            f"| {r.history:,} | {r.latency_ms} ms | {r.concurrency} | {r.requests} "
            f"| {fmt(r.direct_p50_ms)} | {fmt(r.gateway_p50_ms)} | {fmt(r.added_p50_ms)} "
            f"| {fmt(r.direct_p99_ms)} | {fmt(r.gateway_p99_ms)} | {fmt(r.added_p99_ms)} "
            f"| {fmt(r.direct_rps, 0)} | {fmt(r.gateway_rps, 0)} | {fmt(r.rps_ratio, 2)} "
            f"| {r.direct_errors}/{r.gateway_errors} | {fmt(r.gateway_cpu_ms_per_req, 2)} "
            f"| {fmt(r.db_cpu_ms_per_req, 2)} | {fmt(r.db_round_trips_per_req, 2)} "
            f"| {fmt(r.db_round_trips_net_per_req, 2)} | {mix} | {fmt(r.foreign_cores, 2)} |"
        )


def stream_table(results: list[StreamResult]) -> Iterator[str]:
    yield (
        "| c | n | TTFT p50 direct | TTFT p50 gw | added p50 | TTFT p99 direct | TTFT p99 gw | added p99 "
        "| tok/s direct | tok/s gw | gw/direct | decode tok/s p50 d/g | last token→[DONE] ms p50 d/g "
        "| tokens/stream | errors d/g "
        "| gw CPU ms/stream | DB rt/stream (net) | other load |"
    )
    yield "|" + "---|" * 18
    for r in results:
        yield (
            f"| {r.concurrency} | {r.streams} "
            f"| {fmt(r.direct_ttft_p50_ms)} | {fmt(r.gateway_ttft_p50_ms)} | {fmt(r.added_ttft_p50_ms)} "
            f"| {fmt(r.direct_ttft_p99_ms)} | {fmt(r.gateway_ttft_p99_ms)} | {fmt(r.added_ttft_p99_ms)} "
            f"| {fmt(r.direct_tokens_per_s, 0)} | {fmt(r.gateway_tokens_per_s, 0)} "
            f"| {fmt(r.tokens_ratio, 3)} "
            f"| {fmt(r.direct_decode_p50)}/{fmt(r.gateway_decode_p50)} "
            f"| {fmt(r.direct_done_lag_p50_ms)}/{fmt(r.gateway_done_lag_p50_ms)} "
            f"| {fmt(r.tokens_per_stream)} "
            f"| {r.direct_errors}/{r.gateway_errors} | {fmt(r.gateway_cpu_ms_per_stream, 2)} "
            f"| {fmt(r.db_round_trips_per_stream, 2)} ({fmt(r.db_round_trips_net_per_stream, 2)}) "
            f"| {fmt(r.foreign_cores, 2)} |"
        )


def stream_targets(results: list[StreamResult]) -> list[tuple[str, bool | None, str]]:
    """The issue's two streaming targets (None: that concurrency was not measured)."""
    c1 = [r for r in results if r.concurrency == 1]
    c10 = [r for r in results if r.concurrency == 10]
    return [
        (
            "stream: added TTFT p50 <= 5 ms at c=1",
            None if not c1 else all(r.added_ttft_p50_ms <= 5 for r in c1),
            "; ".join(
                f"{r.gateway_ttft_p50_ms:.1f} vs {r.direct_ttft_p50_ms:.1f} ms "
                f"= {r.added_ttft_p50_ms:+.1f} ms (p99 {r.added_ttft_p99_ms:+.1f})"
                for r in c1
            ),
        ),
        (
            "stream: >= 0.95 of direct tokens/s at c=10",
            None if not c10 else all(r.tokens_ratio >= 0.95 for r in c10),
            "; ".join(
                f"{r.gateway_tokens_per_s:.0f} vs {r.direct_tokens_per_s:.0f} tok/s = {r.tokens_ratio:.3f}"
                for r in c10
            ),
        ),
    ]


def ocr_table(r: OcrResult) -> Iterator[str]:
    yield (
        "| path | p50 ms/page | max ms | gateway ÷ this (p50) | inference p50 ms "
        "| outside inference p50 ms | min word recall | errors |"
    )
    yield "|---|---|---|---|---|---|---|---|"
    rows = [
        ("RapidOCR in the bench process", "in-process", r.inproc_p50_ms, r.inproc_max_ms, r.ratio_inproc),
        ("cpu_ocr engine over HTTP", "engine", r.direct_p50_ms, r.direct_max_ms, r.ratio_direct),
        ("gateway POST /api/ocr", "gateway", r.gateway_p50_ms, r.gateway_max_ms, 1.0),
    ]
    for label, key, p50, worst, ratio in rows:
        yield (
            f"| {label} | {fmt(p50, 0)} | {fmt(worst, 0)} | {fmt(ratio, 3)} "
            f"| {fmt(r.inference_p50_ms[key], 0)} | {fmt(r.outside_p50_ms[key], 1)} "
            f"| {fmt(r.recall_min[key], 3)} | {r.errors[key]} |"
        )
    yield ""
    yield (
        f"Inference p50 over the {3 * r.pages} measured reads of all three paths: "
        f"{fmt(r.inference_pooled_p50_ms, 0)} ms; at that inference time gateway ÷ engine = "
        f"{fmt(r.at_equal_inference('engine'), 3)}, gateway ÷ in-process = "
        f"{fmt(r.at_equal_inference('in-process'), 3)}. "
        f"Gateway beyond the direct engine call, net of inference: {fmt(r.added_ms, 1)} ms/page "
        f"(p50 outside inference, gateway minus engine). "
        f"Gateway, p50 a page: job {fmt(r.gateway_job_p50_ms, 0)} ms from admission to finish "
        f"({fmt(r.gateway_run_p50_ms, 0)} ms running: page load, engine call, result write); "
        f"{fmt(r.gateway_outside_p50_ms, 1)} ms outside the job (upload, render and resize, page store, "
        f"admission, answer); gateway CPU {fmt(r.gateway_cpu_ms_per_page, 1)} ms/page, "
        f"DB CPU {fmt(r.db_cpu_ms_per_page, 1)} ms/page; "
        f"DB round trips {fmt(r.db_round_trips_per_page, 1)}/page "
        f"({fmt(r.db_round_trips_net_per_page, 1)} net); other load {fmt(r.foreign_cores, 2)} cores."
    )
    yield ""
    yield (
        "| PDF | runs | wall s direct | wall s gw | pages/s direct | pages/s gw | gw/direct "
        "| outside inference s/page d/g | errors d/g |"
    )
    yield "|---|---|---|---|---|---|---|---|---|"
    outside = r.pdf_outside_s_per_page
    walls_d = ", ".join(f"{w:.1f}" for w in r.pdf_direct_s) or "n/a"
    walls_g = ", ".join(f"{w:.1f}" for w in r.pdf_gateway_s) or "n/a"
    yield (
        f"| {r.pdf_pages} pages | {max(len(r.pdf_direct_s), len(r.pdf_gateway_s))} | {walls_d} | {walls_g} "
        f"| {fmt(r.pdf_direct_pages_per_s, 3)} | {fmt(r.pdf_gateway_pages_per_s, 3)} "
        f"| {fmt(r.pdf_ratio, 3)} "
        f"| {fmt(outside['engine'], 3)}/{fmt(outside['gateway'], 3)} "
        f"| {r.pdf_errors['engine']}/{r.pdf_errors['gateway']} |"
    )


def ocr_targets(r: OcrResult | None) -> list[tuple[str, bool | None, str]]:
    """The OCR target against both floors (None: not measured in this run).

    Judged at equal inference time (see OcrResult.at_equal_inference): the raw p50 ratio is
    shown too, but on a shared machine it measures the neighbours more than the gateway.
    """
    if r is None:
        return [("OCR page <= 1.2x direct", None, "skipped")]
    checks: list[tuple[str, bool | None, str]] = []
    for path, label, raw, direct_ms in (
        ("engine", "cpu_ocr engine over HTTP", r.ratio_direct, r.direct_p50_ms),
        ("in-process", "RapidOCR in-process", r.ratio_inproc, r.inproc_p50_ms),
    ):
        equal = r.at_equal_inference(path)
        checks.append(
            (
                f"OCR page <= 1.2x direct ({label}), at equal inference",
                None if math.isnan(equal) else equal <= 1.2,
                f"{equal:.3f}x = ({r.inference_pooled_p50_ms:.0f} + {r.outside_p50_ms['gateway']:.0f}) / "
                f"({r.inference_pooled_p50_ms:.0f} + {r.outside_p50_ms[path]:.0f}) ms; "
                f"raw p50 {r.gateway_p50_ms:.0f} vs {direct_ms:.0f} ms = {raw:.3f}x",
            )
        )
    return checks


def targets(results: list[Result]) -> list[tuple[str, bool | None, str]]:
    """The project's targets, judged on the measured numbers only (None: not measured in this run)."""
    empty = [r for r in results if r.history == 0]
    big = [r for r in results if r.history > 0]
    checks: list[tuple[str, bool | None, str]] = []

    c1 = [r for r in empty if r.concurrency == 1]
    worst = max(c1, key=lambda r: r.added_p50_ms, default=None)
    checks.append(
        (
            "added p50 <= 5 ms at c=1",
            None if worst is None else worst.added_p50_ms <= 5,
            "; ".join(f"{r.latency_ms} ms engine: +{r.added_p50_ms:.1f} ms" for r in c1),
        )
    )
    slow10 = [r for r in empty if r.latency_ms == 200 and r.concurrency == 10]
    checks.append(
        (
            ">= 0.95 of direct throughput, 200 ms engine, c=10",
            None if not slow10 else all(r.rps_ratio >= 0.95 for r in slow10),
            "; ".join(f"{r.gateway_rps:.1f} vs {r.direct_rps:.1f} req/s = {r.rps_ratio:.3f}" for r in slow10),
        )
    )
    fast32 = [r for r in empty if r.latency_ms == 0 and r.concurrency == 32]
    checks.append(
        (
            ">= 250 req/s at c=32, 0 ms engine",
            None if not fast32 else all(r.gateway_rps >= 250 for r in fast32),
            "; ".join(f"{r.gateway_rps:.0f} req/s (direct {r.direct_rps:.0f})" for r in fast32),
        )
    )
    loaded = [r for r in empty if r.latency_ms == 0 and r.concurrency > 1] or empty
    cpu = max(loaded, key=lambda r: r.gateway_cpu_ms_per_req, default=None)
    checks.append(
        (
            "gateway CPU <= 2 ms/req (0 ms engine, c>1)",
            None if cpu is None else cpu.gateway_cpu_ms_per_req <= 2,
            "; ".join(f"{r.label}: {r.gateway_cpu_ms_per_req:.2f}" for r in empty),
        )
    )
    trips = max(empty, key=lambda r: r.db_round_trips_per_req, default=None)
    checks.append(
        (
            "<= 3 DB round trips per completed request",
            None if trips is None else trips.db_round_trips_per_req <= 3,
            "; ".join(
                f"{r.label}: {r.db_round_trips_per_req:.2f} ({r.db_round_trips_net_per_req:.2f} net)"
                for r in empty
            ),
        )
    )
    pairs = [(e, b) for e in empty for b in big if e.label == b.label]
    if pairs:
        ratios = [(b.gateway_p50_ms / e.gateway_p50_ms, e.gateway_rps / b.gateway_rps, e) for e, b in pairs]
        ok = all(lat <= 1.5 and thr <= 1.5 for lat, thr, _ in ratios)
        detail = "; ".join(f"{e.label}: p50 x{lat:.2f}, rps /{thr:.2f}" for lat, thr, e in ratios)
        name = f"with {big[0].history:,} finished jobs, request path <= 1.5x the empty case"
        checks.append((name, ok, detail))
    else:
        checks.append(("with 100k finished jobs, request path <= 1.5x the empty case", None, "skipped"))
    return checks


# -- main -----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="small counts and a 5k history: a smoke test")
    parser.add_argument("--skip-100k", action="store_true", help="only the empty-database phase")
    parser.add_argument("--history", type=int, default=None, help="finished jobs for phase 2 (default 100k)")
    parser.add_argument("--skip-streaming", action="store_true", help="no streaming phase")
    parser.add_argument(
        "--only-streaming",
        action="store_true",
        help="only the streaming phase (no request scenarios, no history phase): about a minute",
    )
    parser.add_argument("--skip-ocr", action="store_true", help="no OCR phase")
    parser.add_argument(
        "--only-ocr",
        action="store_true",
        help="only the OCR phase (no request scenarios, no streaming, no history phase)",
    )
    parser.add_argument("--skip-metrics", action="store_true", help="no metrics on/off phase")
    parser.add_argument(
        "--only-metrics",
        action="store_true",
        help="only the metrics on/off phase (two fresh gateways and the database): about 2 minutes",
    )
    parser.add_argument(
        "--only-real-engine",
        action="store_true",
        help="only the real-engine phase (llama.cpp + SmolLM2, direct vs gateway, model switch): ~2 minutes",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (gateway and engine logs)")
    args = parser.parse_args(argv)
    clashes = [
        ("--only-streaming", "--skip-streaming"),
        ("--only-streaming", "--only-ocr"),
        ("--only-ocr", "--skip-ocr"),
        ("--only-metrics", "--skip-metrics"),
        ("--only-metrics", "--only-streaming"),
        ("--only-metrics", "--only-ocr"),
        ("--only-real-engine", "--only-metrics"),
        ("--only-real-engine", "--only-streaming"),
        ("--only-real-engine", "--only-ocr"),
    ]
    for first, second in clashes:
        if getattr(args, first[2:].replace("-", "_")) and getattr(args, second[2:].replace("-", "_")):
            parser.error(f"{first} and {second} cannot be used together")
    return args


def print_report(lines: list[str], checks: list[tuple[str, bool | None, str]]) -> None:
    """A phase's table, then its targets as a table of their own."""
    print()
    for line in lines:
        print(line)
    print()
    print("| target | met | measured |")
    print("|---|---|---|")
    for name, met, detail in checks:
        print(f"| {name} | {'n/a' if met is None else ('yes' if met else 'NO')} | {detail} |")


async def bench_metrics_only(args: argparse.Namespace, procs: Processes, tmp: Path) -> int:
    """--only-metrics: the database and the two gateways of the metrics phase, nothing else."""
    uri, db_pid = await start_database(procs, tmp)
    db = DbProbe(uri, db_pid)
    try:
        print(machine_line(db.version()), flush=True)
        sc = metrics_scenario(args.quick)
        print(f"# metrics on vs off: {sc.rounds} rounds x {sc.requests} requests ...", file=sys.stderr)
        result = await run_metrics_phase(procs, tmp, uri, sc)
        checks = metrics_targets(result)
        print_report(metrics_report(result), checks)
        if result.errors:
            print(f"# errors in the metrics phase: {result.first_error}", file=sys.stderr)
        if args.json is not None:
            payload = {
                **asdict(result),
                "ratio": result.ratio,
                "median_round_ratio": result.median_round_ratio,
                "calls_share_pct": result.calls_share_pct,
                "cost_pct": result.cost_pct,
                "on_cpu_ms": result.on_cpu_ms,
                "off_cpu_ms": result.off_cpu_ms,
            }
            targets_json = [{"target": n, "met": m, "measured": d} for n, m, d in checks]
            args.json.write_text(json.dumps({"metrics": payload, "targets": targets_json}, indent=2))
        return 1 if result.errors else 0
    finally:
        db.close()


async def bench_real_engine_only(args: argparse.Namespace, procs: Processes, tmp: Path) -> int:
    """--only-real-engine: the database and one gateway running llama.cpp (scripts/bench_real_engine.py)."""
    from bench_real_engine import real_engine_report, real_engine_targets, run_real_engine_phase

    uri, db_pid = await start_database(procs, tmp)
    db = DbProbe(uri, db_pid)
    try:
        print(machine_line(db.version()), flush=True)
        print("# real engine: llama.cpp direct vs through the gateway ...", file=sys.stderr)
        result = await run_real_engine_phase(start_gateway, procs, tmp, uri, args.quick)
        checks = real_engine_targets(result)
        print_report(real_engine_report(result), checks)
        errors = [side.first_error for pair in result.concurrency.values() for side in pair if side.errors]
        for error in errors:
            print(f"# error in the real-engine phase: {error}", file=sys.stderr)
        if args.json is not None:
            payload = {"real_engine": asdict(result), "targets": [list(c) for c in checks]}
            args.json.write_text(json.dumps(payload, indent=2, default=str))
        return 1 if errors else 0
    finally:
        db.close()


async def bench(args: argparse.Namespace, procs: Processes, tmp: Path) -> int:
    if args.only_metrics:
        return await bench_metrics_only(args, procs, tmp)
    if args.only_real_engine:
        return await bench_real_engine_only(args, procs, tmp)
    chat = not (args.only_streaming or args.only_ocr)
    streaming = not (args.skip_streaming or args.only_ocr)
    ocr = not (args.skip_ocr or args.only_streaming)
    # --only-streaming keeps the two chat models configured, as it always has, so that its figures
    # compare with earlier runs (their dispatchers are part of the gateway's background load).
    stack = await start_stack(procs, tmp, chat=not args.only_ocr, streaming=streaming, ocr=ocr)
    try:
        header = machine_line(stack.db_version)
        print(header, flush=True)
        history_size = args.history if args.history is not None else (5_000 if args.quick else 100_000)
        one_phase = not chat or args.skip_100k or history_size <= 0
        phases = [0] if one_phase else [0, history_size]
        idle_s = 2.0 if args.quick else 5.0
        results: list[Result] = []
        stream_results: list[StreamResult] = []
        idles: list[Idle] = []
        ocr_result: OcrResult | None = None
        inserted_s = 0.0
        for history in phases:
            if history:
                print(f"# inserting {history:,} finished jobs ...", file=sys.stderr, flush=True)
                inserted_s = await asyncio.to_thread(insert_history, stack.db, history)
                print(f"# inserted in {inserted_s:.1f} s", file=sys.stderr, flush=True)
            idle = await measure_idle(stack, history, idle_s)
            idles.append(idle)
            for sc in scenarios(args.quick) if chat else []:
                print(f"# history {history:,}: {sc.label} ...", file=sys.stderr, flush=True)
                results.append(await run_scenario(stack, sc, history, idle))
            if streaming and history == 0:  # the streaming targets are about the empty database
                for ssc in stream_scenarios(args.quick):
                    print(f"# history {history:,}: {ssc.label} ...", file=sys.stderr, flush=True)
                    stream_results.append(await run_stream_scenario(stack, ssc, history, idle))
            if ocr and history == 0:  # like streaming: about the request path, not the history
                osc = ocr_scenario(args.quick)
                print(
                    f"# history {history:,}: OCR, {osc.pages} pages x 3 paths + {osc.warmup} warmup, "
                    f"then a {OCR_PDF_PAGES}-page PDF x {osc.pdf_runs} ...",
                    file=sys.stderr,
                    flush=True,
                )
                ocr_result = await run_ocr_phase(stack, osc, history, idle)
        metrics_result: MetricsResult | None = None
        if chat and not args.skip_metrics:  # last: its two gateways must not idle through the rest
            msc = metrics_scenario(args.quick)
            print(f"# metrics on vs off: {msc.rounds} rounds x {msc.requests} requests ...", file=sys.stderr)
            metrics_result = await run_metrics_phase(stack.procs, stack.tmp, stack.db_uri, msc)
        if results:
            print()
            for line in table(results):
                print(line)
        if stream_results:
            print()
            print(
                f"Streaming (history 0): /v1/chat/completions with stream: true, {STREAM_MAX_TOKENS} tokens "
                f"a stream from a stub pacing them {STREAM_TOKEN_LATENCY_MS} ms apart. TTFT = send -> first "
                "chunk with non-empty delta.content; tok/s = all tokens of the batch / its wall time; "
                "decode = one stream's tokens after its first / the time they took (p50 over streams); "
                "last token→[DONE] = what the gateway adds at the end of a stream (its outcome write "
                "comes after [DONE], so at c=10 it delays the next stream's admission instead)."
            )
            print()
            for line in stream_table(stream_results):
                print(line)
        if ocr_result is not None:
            o = ocr_result
            print()
            print(
                f"OCR (history {o.history}): one page ({o.upload}; a title and {OCR_LINES} lines of "
                f"{OCR_FONT_PX}-px text) read {o.pages} times on each path after {o.warmup} warmup, "
                "sequentially (c=1), in rounds whose order rotates. The gateway gets the PNG as a "
                f"multipart upload and sends its engine {o.engine_page}; the bench sends its own "
                "cpu_ocr engine that same request, and RapidOCR in-process reads the same image "
                "(the engine's settings). An answer missing more than "
                f"{1 - OCR_MIN_RECALL:.0%} of the page's words is an error. PDF: {o.pdf}; "
                "direct = its pages (rendered and resized by the gateway's code beforehand) to the "
                "engine one after another; gw = the PDF through POST /api/ocr, rendering included."
            )
            print()
            for line in ocr_table(o):
                print(line)
        if metrics_result is not None:
            print()
            for line in metrics_report(metrics_result):
                print(line)
        print()
        print(
            "Idle gateway (no requests): "
            + "; ".join(
                f"history {i.history:,}: {i.db_ops_per_s:.1f} DB ops/s, "
                f"gateway CPU {i.gateway_cpu_pct:.1f}%, DB CPU {i.db_cpu_pct:.1f}%"
                for i in idles
            )
        )
        if inserted_s:
            print(f"History insert: {phases[-1]:,} docs in {inserted_s:.1f} s (insert_many of 1000)")
        print(
            "DB rt = SecantusDB serverStatus opcounters (counted per command, i.e. per round trip), "
            "minus the bench's own serverStatus calls; 'net' also subtracts the idle background rate. "
            "'other load' = CPU cores used by processes outside the bench during the scenario "
            "(a shared machine makes such rows unreliable)."
        )
        rows: list[Result | StreamResult] = [*results, *stream_results]
        busy = [
            f"{r.label} (history {r.history:,}): {r.foreign_cores:.2f}"
            for r in rows
            if r.foreign_cores > 0.25
        ]
        if ocr_result is not None and ocr_result.foreign_cores > 0.25:
            busy.append(f"OCR (history {ocr_result.history:,}): {ocr_result.foreign_cores:.2f}")
        if busy:
            print("WARNING: other processes used > 0.25 cores during: " + "; ".join(busy))
        print()
        print("| target | met | measured |")
        print("|---|---|---|")
        checks = targets(results) if chat else []
        if streaming:
            checks += stream_targets(stream_results)
        if ocr:
            checks += ocr_targets(ocr_result)
        if chat:
            checks += metrics_targets(metrics_result)
        for name, met, detail in checks:
            print(f"| {name} | {'n/a' if met is None else ('yes' if met else 'NO')} | {detail} |")
        errors = [r for r in rows if r.gateway_errors or r.direct_errors]
        for r in errors:
            print(f"# errors in {r.label} (history {r.history}): {r.first_error}", file=sys.stderr)
        if ocr_result is not None and ocr_result.total_errors:
            print(f"# errors in OCR: {ocr_result.first_error}", file=sys.stderr)
        if args.json is not None:
            args.json.write_text(
                json.dumps(
                    {
                        "machine": header,
                        "results": [
                            {
                                **asdict(r),
                                "added_p50_ms": r.added_p50_ms,
                                "added_p99_ms": r.added_p99_ms,
                                "rps_ratio": r.rps_ratio,
                            }
                            for r in results
                        ],
                        "streaming": [
                            {
                                **asdict(r),
                                "added_ttft_p50_ms": r.added_ttft_p50_ms,
                                "added_ttft_p99_ms": r.added_ttft_p99_ms,
                                "tokens_ratio": r.tokens_ratio,
                            }
                            for r in stream_results
                        ],
                        "ocr": None
                        if ocr_result is None
                        else {
                            **asdict(ocr_result),
                            "ratio_direct": ocr_result.ratio_direct,
                            "ratio_inproc": ocr_result.ratio_inproc,
                            "pdf_direct_pages_per_s": ocr_result.pdf_direct_pages_per_s,
                            "pdf_gateway_pages_per_s": ocr_result.pdf_gateway_pages_per_s,
                            "pdf_ratio": ocr_result.pdf_ratio,
                            "added_ms": ocr_result.added_ms,
                            "at_equal_inference": {
                                path: ocr_result.at_equal_inference(path) for path in ("engine", "in-process")
                            },
                            "pdf_outside_s_per_page": ocr_result.pdf_outside_s_per_page,
                        },
                        "metrics": None
                        if metrics_result is None
                        else {
                            **asdict(metrics_result),
                            "ratio": metrics_result.ratio,
                            "median_round_ratio": metrics_result.median_round_ratio,
                            "calls_share_pct": metrics_result.calls_share_pct,
                            "cost_pct": metrics_result.cost_pct,
                            "on_cpu_ms": metrics_result.on_cpu_ms,
                            "off_cpu_ms": metrics_result.off_cpu_ms,
                        },
                        "idle": [asdict(i) for i in idles],
                        "targets": [{"target": n, "met": m, "measured": d} for n, m, d in checks],
                    },
                    indent=2,
                )
            )
        if metrics_result is not None and metrics_result.errors:
            print(f"# errors in the metrics phase: {metrics_result.first_error}", file=sys.stderr)
        failed = errors or (ocr_result is not None and ocr_result.total_errors)
        return 1 if failed or (metrics_result is not None and metrics_result.errors) else 0
    finally:
        stack.db.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))  # `python scripts/bench.py` puts scripts/ first, not the repo
    procs = Processes()
    tmp = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    try:
        if importlib.util.find_spec("uvloop") is not None:
            import uvloop  # the gateway runs on uvloop too (uvicorn picks it); it keeps the client cheap

            return uvloop.run(bench(args, procs, tmp))
        return asyncio.run(bench(args, procs, tmp))
    except KeyboardInterrupt:
        print("# interrupted", file=sys.stderr)
        return 130
    finally:
        procs.stop_all()
        if args.keep_tmp:
            print(f"# logs kept in {tmp}", file=sys.stderr)
        else:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
