"""Priorities and their sort rank (pure)."""

from __future__ import annotations

from enum import StrEnum

from app.errors import InvalidRequest


class Priority(StrEnum):
    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"

    @property
    def rank(self) -> int:
        """Lower sorts first: the claim index orders by (rank, enqueued_at)."""
        return _RANK[self]

    @classmethod
    def parse(cls, value: str | None) -> Priority:
        if value is None or value == "":
            return cls.NORMAL
        try:
            return cls(value.strip().lower())
        except ValueError:
            raise InvalidRequest(
                f"X-Priority must be one of high, normal, low (got {value[:40]!r})", param="X-Priority"
            ) from None


_RANK = {Priority.HIGH: 0, Priority.NORMAL: 1, Priority.LOW: 2}
