"""Fair shares (app/queue/fairness.py): the cap a client may hold, and the claim order."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from app.queue.fairness import ClientTerms, FairShares, Share, fair_order, holdings
from app.queue.job import Job, JobState

T0 = datetime(2026, 12, 7, tzinfo=UTC)


def _job(n: int, client: str, state: JobState = JobState.QUEUED, priority: str = "normal") -> Job:
    rank = {"high": 0, "normal": 1, "low": 2}[priority]
    return Job.from_document(
        {
            "_id": f"job_{n}",
            "model": "m",
            "kind": "chat",
            "state": state.value,
            "priority": priority,
            "priority_rank": rank,
            "slot": f"m#{n}",
            "owner": "alice",
            "client_id": client,
            "request": {"messages": [{"role": "user", "content": str(n)}]},
            "enqueued_at": T0 + timedelta(seconds=n),
            "queue_deadline": T0 + timedelta(seconds=n + 300),
            "queue_timeout_s": 300.0,
            "attempts": 0,
            "rev": f"r{n}",
        }
    )


def test_a_client_holds_its_share_but_never_fewer_places_than_the_engine_has() -> None:
    shares = FairShares()
    assert shares.cap("m", capacity=20, max_concurrent=10, client="batch", owner="alice") == 10
    assert shares.cap("m", capacity=20, max_concurrent=4, client="batch", owner="alice") == 10
    assert (
        shares.cap("m", capacity=8, max_concurrent=6, client="batch", owner="alice") == 6
    )  # work-conserving
    assert shares.cap("m", capacity=7, max_concurrent=1, client="batch", owner="alice") == 4  # rounded up


def test_overrides_by_model_by_client_and_by_caller_and_off() -> None:
    shares = FairShares(
        share=Share(0.5),
        models={"m": Share(places=12)},
        clients={"nightly": ClientTerms(share=Share(1.0)), "key:ci": ClientTerms(share=Share(places=3))},
    )
    assert shares.cap("m", 20, 2, "web", "alice") == 12  # the model's own share
    assert shares.cap("other", 20, 2, "web", "alice") == 10
    assert shares.cap("m", 20, 2, "nightly", "alice") == 20  # the client's, by X-Client-ID
    assert shares.cap("m", 20, 2, "default", "key:ci") == 3  # the caller's (an API key)
    assert FairShares(enabled=False).cap("m", 20, 2, "web", "alice") == 20


def test_claims_go_round_robin_between_clients_fifo_within_each() -> None:
    batch = [_job(n, "batch") for n in range(6)]
    interactive = [_job(10, "chat-ui"), _job(11, "chat-ui")]
    order = fair_order(batch + interactive, running=[], shares=FairShares())
    clients = [job.client_id for job in order]
    assert clients[:4] == ["batch", "chat-ui", "batch", "chat-ui"]
    assert [job.id for job in order if job.client_id == "batch"] == [f"job_{n}" for n in range(6)]


def test_a_client_with_jobs_running_waits_its_turn_behind_one_without() -> None:
    running = [_job(n, "batch", JobState.RUNNING) for n in range(20, 24)]
    order = fair_order([_job(0, "batch"), _job(30, "chat-ui")], running=running, shares=FairShares())
    assert [job.client_id for job in order] == ["chat-ui", "batch"]  # arrived later, served first


def test_priority_comes_before_turns_and_weights_give_more_turns() -> None:
    queued = [
        _job(0, "batch"),
        _job(1, "batch"),
        _job(2, "batch"),
        _job(5, "ui"),
        _job(6, "ui", priority="high"),
    ]
    order = fair_order(queued, running=[], shares=FairShares(clients={"batch": ClientTerms(weight=2.0)}))
    assert order[0].id == "job_6"  # high first, whoever sends it
    assert [job.client_id for job in order[1:]] == ["batch", "batch", "ui", "batch"]  # 2 turns per 1
    plain = fair_order(queued, running=[], shares=FairShares(enabled=False))
    assert [job.id for job in plain] == ["job_6", "job_0", "job_1", "job_2", "job_5"]  # priority, FIFO


def test_holdings_are_one_client_of_one_caller() -> None:
    jobs = [_job(0, "batch"), _job(1, "batch", JobState.RUNNING), _job(2, "ui")]
    assert len(holdings(jobs, "alice", "batch")) == 2 and len(holdings(jobs, "bob", "batch")) == 0
