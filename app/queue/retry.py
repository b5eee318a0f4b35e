"""When and how soon a failed attempt is tried again (pure)."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = 3
    base_seconds: float = 0.5
    max_seconds: float = 10.0

    def should_retry(self, *, retryable: bool, attempts_made: int) -> bool:
        """`attempts_made` counts dispatches so far; the first one is not a retry."""
        return retryable and attempts_made <= self.max_retries

    def backoff(self, attempts_made: int, rng: random.Random | None = None) -> float:
        """Exponential backoff with full jitter: uniform in [base/2, base * 2^(n-1)], capped."""
        ceiling = min(self.max_seconds, self.base_seconds * (2 ** max(attempts_made - 1, 0)))
        floor = min(ceiling, self.base_seconds / 2)
        return (rng or random).uniform(floor, ceiling)
