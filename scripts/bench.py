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
import importlib.util
import json
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from bench.harness import DbProbe, Processes, insert_history, start_database, start_gateway, start_stack
from bench.load import measure_idle, run_scenario, run_stream_scenario
from bench.metrics_phase import metrics_report, metrics_targets, run_metrics_phase
from bench.ocr_phase import run_ocr_phase
from bench.report import machine_line, ocr_table, ocr_targets, stream_table, stream_targets, table, targets
from bench.scenarios import (
    OCR_FONT_PX,
    OCR_LINES,
    OCR_MIN_RECALL,
    OCR_PDF_PAGES,
    REPO,
    STREAM_MAX_TOKENS,
    STREAM_TOKEN_LATENCY_MS,
    Idle,
    MetricsResult,
    OcrResult,
    Result,
    StreamResult,
    metrics_scenario,
    ocr_scenario,
    scenarios,
    stream_scenarios,
)

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
    """--only-real-engine: the database and one gateway running llama.cpp (scripts/bench/real_engine.py)."""
    from bench.real_engine import real_engine_report, real_engine_targets, run_real_engine_phase

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
        if phases[-1]:  # what an idle gateway costs with that history, once it has settled
            settle_s, idle_row_s = (5.0, 10.0) if args.quick else (65.0, 120.0)
            print(
                f"# idle: {settle_s:.0f} s to settle, then {idle_row_s:.0f} s measured ...", file=sys.stderr
            )
            await asyncio.sleep(settle_s)
            idles.append(await measure_idle(stack, phases[-1], idle_row_s, settled=True))
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
                f"history {i.history:,}{f' settled, {i.seconds:.0f} s' if i.settled else ''}: "
                f"{i.db_ops_per_s:.1f} DB ops/s, "
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
