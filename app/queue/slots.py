"""Which queue slots of a model this instance believes free (pure).

Admission inserts the job with `slot = "<model>#<n>"` under a unique index, so the database
decides atomically, across instances, who gets each of the model's max_concurrent + max_waiting
places. This book only picks a candidate that is probably free, so the common case costs one
insert; a collision or a full book sends the caller back to the database for the truth.
"""

from __future__ import annotations


def slot_key(model: str, index: int) -> str:
    return f"{model}#{index}"


def slot_index(key: str) -> int:
    return int(key.rsplit("#", 1)[1])


class SlotBook:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._taken: set[int] = set()

    def reserve(self) -> int | None:
        """Mark the lowest slot believed free as taken, or None when all are believed taken."""
        for index in range(self.capacity):
            if index not in self._taken:
                self._taken.add(index)
                return index
        return None

    def release(self, index: int) -> None:
        self._taken.discard(index)

    def reset(self, taken: set[int]) -> None:
        """Replace beliefs with what the database says is occupied."""
        self._taken = {i for i in taken if 0 <= i < self.capacity}

    @property
    def taken(self) -> int:
        return len(self._taken)
