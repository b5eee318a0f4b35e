"""Login throttling: repeated failed logins for a (username, client address) pair, or from one
address, are refused for the rest of a window, on every instance (counted in the database).

Why not per username: anyone who can reach the login endpoint could then keep any account, the
admin's included, locked forever by failing on purpose. Keyed by the pair, a wrong-password flood
slows the address it comes from and never the owner logging in from elsewhere; keyed by the
address too, one address spraying many usernames is slowed as well. A successful login clears
its pair, not its address. Fixed windows: the first failure opens one of `window_s`, its document
expires with it (TTL), and `max_failures` inside it refuse the key until it ends.
"""

from __future__ import annotations

import math
from datetime import timedelta
from typing import Any

from pymongo.asynchronous.collection import AsyncCollection

from app.clock import Clock
from app.errors import LoginThrottled
from app.store.ttl import ensure_ttl_index

Doc = dict[str, Any]


class LoginThrottle:
    def __init__(
        self, failures: AsyncCollection[Doc], clock: Clock, max_failures: int = 5, window_s: float = 300.0
    ) -> None:
        self._failures = failures
        self._clock = clock
        self._max = max_failures
        self._window = timedelta(seconds=window_s)

    async def ensure_indexes(self) -> None:
        await ensure_ttl_index(self._failures, "login_failures_ttl")

    async def check(self, username: str, address: str) -> None:
        now = self._clock.now()
        keys = _keys(username, address)
        found = {
            d["_id"]: d async for d in self._failures.find({"_id": {"$in": keys}, "expire_at": {"$gt": now}})
        }
        for key in keys:  # the pair first: its message is the one the attacked owner would see
            doc = found.get(key)
            if doc is not None and int(doc["failures"]) >= self._max:
                retry = max(1, math.ceil((doc["expire_at"] - now).total_seconds()))
                what = "this username from this address" if key.startswith("pair:") else "this address"
                raise LoginThrottled(f"too many failed logins for {what}; retry after {retry} s", retry)

    async def failed(self, username: str, address: str) -> None:
        now = self._clock.now()
        for key in _keys(username, address):
            counted = await self._failures.update_one(
                {"_id": key, "expire_at": {"$gt": now}}, {"$inc": {"failures": 1}}
            )
            if counted.matched_count == 0:  # none yet, or its window is over: a new window
                await self._failures.replace_one(
                    {"_id": key}, {"_id": key, "failures": 1, "expire_at": now + self._window}, upsert=True
                )

    async def succeeded(self, username: str, address: str) -> None:
        await self._failures.delete_one({"_id": _keys(username, address)[0]})


def _keys(username: str, address: str) -> list[str]:
    return [f"pair:{username}\n{address}", f"addr:{address}"]
