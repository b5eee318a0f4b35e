"""Idempotency-Key: admit a request once, or hand back the job its key already made.

One path for chat and OCR. A replay is recognised by the request's fingerprint, stored with
the job as `request_hash` when it is admitted: it outlives the request itself, which
`history.store_prompts: false` drops when the job ends.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from app.errors import IdempotencyConflict
from app.queue.job import Job
from app.queue.service import JobQueue
from app.store.batch import DuplicateKey


def same_request(existing: Job, fingerprint: str) -> Job:
    """The job a repeated key made, if it was made for this very request."""
    if existing.request_hash != fingerprint:
        raise IdempotencyConflict(existing.id)
    return existing


async def admit_or_reuse(
    queue: JobQueue,
    owner: str,
    key: str | None,
    fingerprint: str,
    admit: Callable[[], Awaitable[Job]],
) -> tuple[Job, bool]:
    """The job for this request: newly admitted by `admit` (True), or the one its key made.

    `admit` must store `fingerprint` as the job's `request_hash` and undo whatever it prepared
    when the insert fails. A concurrent request with the same key that wins the insert makes
    this one's `admit` fail on the unique key; that request's job is returned instead.
    """
    if key is not None:
        existing = await queue.find_existing(owner, key)
        if existing is not None:
            return same_request(existing, fingerprint), False
    try:
        return await admit(), True
    except DuplicateKey:
        existing = await queue.find_existing(owner, key) if key is not None else None
        if existing is None:
            raise
        return same_request(existing, fingerprint), False
