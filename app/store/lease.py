"""A lease in `leaders`: which gateway instance runs a loop that must run once.

Auto-switch holds one per host (engines belong to a host); the usage rollups hold one for the
whole deployment (every instance would otherwise aggregate the same jobs into the same
documents). The holder renews it on each run; it lapses when the holder stops renewing (killed),
so another instance takes over after `ttl_s` without any coordination.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import DuplicateKeyError

from app.clock import Clock


class Lease:
    def __init__(
        self, leaders: AsyncCollection[dict[str, Any]], lease_id: str, holder: str, clock: Clock
    ) -> None:
        self._leaders = leaders
        self.lease_id = lease_id
        self._holder = holder
        self._clock = clock

    async def hold(self, ttl_s: float) -> bool:
        """Take or renew the lease for `ttl_s`; False while another live holder has it."""
        now = self._clock.now()
        try:
            await self._leaders.update_one(
                {"_id": self.lease_id, "$or": [{"holder": self._holder}, {"until": {"$lt": now}}]},
                {"$set": {"holder": self._holder, "until": now + timedelta(seconds=ttl_s)}},
                upsert=True,
            )
        except DuplicateKeyError:  # the upsert lost to the live holder's document
            return False
        return True

    async def release(self) -> None:
        """At a clean stop: the next instance need not wait for the lease to lapse."""
        await self._leaders.delete_one({"_id": self.lease_id, "holder": self._holder})
