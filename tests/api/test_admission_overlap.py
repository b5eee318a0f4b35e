"""A job that can start at once calls its engine while its admission insert is in flight.

What must hold: the engine call overlaps the insert (so the disk write is not added to the
time to first token), yet nothing reaches the client and nothing else is written before the
insert is journaled, and a job whose insert fails leaves no trace: no answer, no document, no
in-flight place held.
"""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from typing import Any

import pytest

from app.queue.job import Job
from app.queue.jobs import Submission, build_job
from app.queue.priority import Priority
from app.queue.slots import slot_key
from app.queue.store import JobStore
from tests.api.test_metrics import scrape, value
from tests.conftest import GatewayClient, GatewayFactory, eventually, stub

# The dispatcher's slow poll marks a possible backlog until its claim comes back empty, and a
# request admitted inside that window is queued rather than started at once (and its held insert
# would then never reach the engine). Without the poll, and once the start-up claim is back
# (`direct_starts_open`), every request here is a direct start.
DIRECT_STARTS = {"poll_interval_seconds": 600}


async def direct_starts_open(gw: GatewayClient, model: str) -> None:
    """Wait until a request for `model` would start at once.

    The engine's readiness wakes the dispatcher for a first claim (jobs a predecessor left may be
    waiting), and until that claim is back every admission is queued. `wait_ready` sees the engine
    ready, not the claim: on a loaded machine the request used to arrive first, was queued, and its
    insert, held by the test until the engine call it then never got, deadlocked the test.
    """
    dispatcher = gw.services.dispatchers[model]
    await eventually(
        lambda: asyncio.sleep(0, dispatcher.starts_at_once()), bool, what=f"direct starts for {model}"
    )


async def engine_requests(gw: GatewayClient, model: str) -> int:
    """Chat requests the stub engine has logged so far (it prints a line per request)."""
    logs = await gw.http.get(f"/admin/models/{model}/logs?lines=200", headers=gw.headers(gw.admin_token))
    assert logs.status_code == 200, logs.text
    return sum(1 for line in logs.json()["lines"] if line.startswith("request "))


def hold_inserts(monkeypatch: pytest.MonkeyPatch, gw: GatewayClient) -> asyncio.Event:
    """Make every job insert wait for the returned event, as a slow disk would."""
    store = gw.services.queue.store
    real_insert = store.insert
    release = asyncio.Event()

    async def held(job: Job) -> None:
        await release.wait()
        await real_insert(job)

    monkeypatch.setattr(store, "insert", held)
    return release


async def test_engine_is_called_while_the_insert_is_in_flight_and_answers_after_it(
    gateway_factory: GatewayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    gw = await gateway_factory({"demo": stub("--log-requests")}, queue=DIRECT_STARTS)
    await direct_starts_open(gw, "demo")
    release = hold_inserts(monkeypatch, gw)
    answer = asyncio.create_task(gw.chat("demo", "overlap please"))

    await eventually(lambda: engine_requests(gw, "demo"), lambda n: n == 1, what="the engine call")
    assert not answer.done(), "the client was answered before its job was durable"
    assert await gw.count("demo", "running") == 0  # not yet in the database
    assert await gw.count("demo", "succeeded") == 0

    release.set()
    response = await answer
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["message"]["content"] == "stub reply to: overlap please"
    job = await gw.http.get(f"/api/jobs/{body['id']}", headers=gw.headers())
    assert job.json()["state"] == "succeeded"
    assert job.json()["result"]["message"]["content"] == body["message"]["content"]


async def test_a_stream_reaches_its_client_only_after_the_insert(
    gateway_factory: GatewayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    gw = await gateway_factory({"demo": stub("--log-requests")}, queue=DIRECT_STARTS)
    await direct_starts_open(gw, "demo")
    release = hold_inserts(monkeypatch, gw)
    body = {
        "model": "demo",
        "messages": [{"role": "user", "content": "stream after the insert"}],
        "stream": True,
    }
    streamed = asyncio.create_task(gw.http.post("/v1/chat/completions", json=body, headers=gw.headers()))

    await eventually(lambda: engine_requests(gw, "demo"), lambda n: n == 1, what="the engine call")
    assert not streamed.done(), "the stream began before its job was durable"

    release.set()
    response = await streamed
    assert response.status_code == 200, response.text
    events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "stub reply to: stream after the insert"
    job_id = response.headers["X-Request-ID"]

    async def state() -> Any:
        return (await gw.http.get(f"/api/jobs/{job_id}", headers=gw.headers())).json()["state"]

    await eventually(state, lambda s: s == "succeeded", what="the stream's history write")


async def test_a_request_admitted_while_the_start_up_claim_is_in_flight_is_queued_and_answered(
    gateway_factory: GatewayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The window `direct_starts_open` waits out, held open on purpose: the request is not
    started before jobs the claim may find, and is not lost either; once its insert is
    journaled the dispatcher claims it without waiting for the (600 s) poll."""
    store = JobStore  # the claim's read of waiting jobs, held as a slow database would
    real_candidates = store.live
    claim_in_flight, release_claim = asyncio.Event(), asyncio.Event()

    async def held(self: JobStore, model: str) -> list[Job]:
        claim_in_flight.set()
        await release_claim.wait()
        return await real_candidates(self, model)

    monkeypatch.setattr(store, "live", held)
    gw = await gateway_factory({"demo": stub("--log-requests")}, queue=DIRECT_STARTS)
    await asyncio.wait_for(claim_in_flight.wait(), timeout=20)
    assert not gw.services.dispatchers["demo"].starts_at_once()
    answer = asyncio.create_task(gw.chat("demo", "in the window"))
    await gw.until_count("demo", "queued", 1)  # queued behind the claim, not started at once
    assert await engine_requests(gw, "demo") == 0
    release_claim.set()
    response = await asyncio.wait_for(answer, timeout=20)
    assert response.status_code == 200, response.text
    assert response.json()["message"]["content"] == "stub reply to: in the window"
    assert await engine_requests(gw, "demo") == 1


async def test_an_insert_that_fails_after_the_engine_call_began_leaves_nothing(
    gateway_factory: GatewayFactory,
) -> None:
    """Another instance holds both slots, which this instance's book does not know yet: the
    request is launched, its inserts collide, the refreshed book says full → 429, and the
    early engine call is abandoned without a document or a held in-flight place."""
    gw = await gateway_factory({"m": stub("--latency-ms", "2000", max_concurrent=1, max_waiting=1)})
    queue = gw.services.queue
    assert queue is not None
    now = queue.clock.now()
    for index in range(2):
        sub = Submission(
            model="m",
            kind="chat",
            request={"messages": [{"role": "user", "content": "elsewhere"}]},
            owner="someone",
            client_id="other",
            priority=Priority.NORMAL,
            idempotency_key=None,
            queue_timeout_s=600,
        )
        running_elsewhere = ("other-host/1/1", now + timedelta(hours=1))
        await queue.store.insert(
            build_job(sub, f"foreign-{index}", slot_key("m", index), now, running_elsewhere)
        )

    response = await gw.chat("m", "no room")
    assert response.status_code == 429, response.text
    assert "full" in response.json()["detail"]

    dispatcher = gw.services.dispatchers["m"]
    await eventually(
        lambda: asyncio.sleep(0, (dispatcher.in_flight, dispatcher.running_ids())),
        lambda seen: seen == (0, []),
        what="the abandoned engine call to give its place back",
    )
    assert sorted(j.id for j in await queue.store.active("m")) == ["foreign-0", "foreign-1"]
    samples = await scrape(gw)  # a request that was never admitted waited in no queue
    assert value(samples, "gateway_queue_wait_seconds_count", model="m") in (None, 0.0)
    assert value(samples, "gateway_admissions_rejected_total", model="m", reason="queue_full") == 1.0
