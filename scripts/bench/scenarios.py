"""The scenarios the bench runs and the results it keeps (constants, dataclasses)."""

from __future__ import annotations

import math
import secrets
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.streams import nearest_rank

REPO = Path(__file__).resolve().parents[2]  # scripts/bench/scenarios.py -> the repository
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
    settled: bool = False  # measured after the per-minute passes over the new history had run


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
