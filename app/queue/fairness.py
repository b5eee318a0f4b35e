"""Fair shares between clients of one model (pure).

Priority alone does not keep one client from taking every place of a model: a batch that fires
100 requests at `normal` turns every interactive user of that model into a 429 until it ends.
Two rules, both per model and per client (the `X-Client-ID`, or the caller when a request names
none):

- Admission: a client holds at most `cap` places (running + waiting). The cap is the configured
  share of the model's places, but never fewer than the engine's own places (`max_concurrent`):
  a client alone still keeps the engine fully busy (work-conserving), and what is beyond its cap
  stays free for the others, who therefore never find the queue full because of it.
- Claims: within a priority level, waiting jobs go round-robin between clients, weighted: the
  k-th waiting job of a client with r jobs running is due at (r + k) / weight, FIFO within a
  client (weighted fair queuing, as llm-d's flow control does per band).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

from app.queue.job import Job


@dataclass(frozen=True)
class Share:
    """A share of a model's places: a fraction of them, or a number of places."""

    fraction: float = 0.5
    places: int | None = None

    def of(self, capacity: int) -> int:
        return self.places if self.places is not None else math.ceil(self.fraction * capacity)


@dataclass(frozen=True)
class ClientTerms:
    weight: float = 1.0
    share: Share | None = None  # None: the model's


@dataclass(frozen=True)
class FairShares:
    enabled: bool = True
    share: Share = Share()
    models: dict[str, Share] = field(default_factory=dict)  # a model's own default share
    clients: dict[str, ClientTerms] = field(default_factory=dict)  # by client id or caller

    def terms(self, job_client: str, job_owner: str) -> ClientTerms:
        return self.clients.get(job_client) or self.clients.get(job_owner) or ClientTerms()

    def cap(self, model: str, capacity: int, max_concurrent: int, client: str, owner: str) -> int:
        """The most places this client may hold in the model (its whole capacity when off)."""
        if not self.enabled:
            return capacity
        share = self.terms(client, owner).share or self.models.get(model) or self.share
        return min(capacity, max(share.of(capacity), max_concurrent))

    def weight(self, client: str, owner: str) -> float:
        return self.terms(client, owner).weight


def client_key(owner: str, client_id: str) -> str:
    """Whose place a job takes: the caller and the application it named."""
    return f"{owner}\x1f{client_id}"


def holdings(jobs: Iterable[Job], owner: str, client_id: str) -> set[str]:
    """The ids of the jobs that one client holds."""
    key = client_key(owner, client_id)
    return {job.id for job in jobs if client_key(job.owner, job.client_id) == key}


def fair_order(queued: list[Job], running: list[Job], shares: FairShares) -> list[Job]:
    """The waiting jobs in the order claims take them: priority first; within a priority,
    weighted round-robin between clients; FIFO within a client."""
    by_arrival = sorted(queued, key=lambda job: (job.priority_rank, job.enqueued_at))
    if not shares.enabled:
        return by_arrival
    busy = Counter(client_key(job.owner, job.client_id) for job in running)
    seen: Counter[tuple[int, str]] = Counter()
    due: list[tuple[tuple[int, float, datetime], Job]] = []
    for job in by_arrival:
        key = client_key(job.owner, job.client_id)
        seen[(job.priority_rank, key)] += 1
        turn = (busy[key] + seen[(job.priority_rank, key)]) / shares.weight(job.client_id, job.owner)
        due.append(((job.priority_rank, turn, job.enqueued_at), job))
    due.sort(key=lambda item: item[0])  # stable: equal turns keep arrival order
    return [job for _, job in due]
