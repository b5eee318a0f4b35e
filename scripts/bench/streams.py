"""What the bench's load clients share: reading one streamed completion, and percentiles.

scripts/bench.py (the stub streaming phase) and scripts/bench/real_engine.py (llama.cpp) read
streams the same way, so their numbers compare.
"""

from __future__ import annotations

import json
import math
import time

import aiohttp


def nearest_rank(values: list[float], q: float) -> float:
    """Nearest-rank percentile: no interpolation, so p99 is a latency that really happened."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


class StreamBroken(Exception):
    """A stream that did not end as the OpenAI protocol says (status, error event, no [DONE])."""


async def read_stream(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str], body: bytes
) -> tuple[float, int, float, float]:
    """One streamed completion: (time to first token ms, tokens, decode tokens/s, last token ->
    [DONE] ms).

    Comment lines (`: keep-alive`, sent by the gateway while the job is queued) and the role
    chunk with empty content are not tokens. The count comes from the final usage chunk and must
    match the content chunks seen, so a chunk lost on the way is an error, not a faster stream.
    """
    began = time.perf_counter()
    first: float | None = None
    last = began
    chunks = 0
    usage_tokens: int | None = None
    done_at: float | None = None
    async with session.post(url, data=body, headers=headers) as response:
        if response.status != 200:
            text = (await response.read())[:300].decode(errors="replace")
            raise StreamBroken(f"HTTP {response.status}: {text}")
        async for raw in response.content:
            arrived = time.perf_counter()
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue  # blank separators, `: keep-alive` comments, other SSE fields
            data = line[5:].strip()
            if done_at is not None:
                raise StreamBroken(f"data after [DONE]: {data[:200].decode(errors='replace')}")
            if data == b"[DONE]":
                done_at = arrived
                continue
            chunk = json.loads(data)
            if "error" in chunk:
                raise StreamBroken(f"error event: {json.dumps(chunk['error'])[:300]}")
            choices = chunk.get("choices") or []
            if choices and (choices[0].get("delta") or {}).get("content"):
                first = arrived if first is None else first
                last = arrived
                chunks += 1
            usage = chunk.get("usage")
            if usage:
                usage_tokens = int(usage["completion_tokens"])
    if done_at is None:
        raise StreamBroken(f"stream ended without data: [DONE] after {chunks} content chunks")
    if first is None:
        raise StreamBroken("stream had no content chunk")
    if usage_tokens is not None and usage_tokens != chunks:
        raise StreamBroken(f"usage says {usage_tokens} completion tokens, {chunks} content chunks arrived")
    rate = (chunks - 1) / (last - first) if chunks > 1 and last > first else math.nan
    return (first - began) * 1000, chunks, rate, (done_at - last) * 1000
