"""Whether the database answers, known before a request has to find out by waiting.

Without this every request made while the database is down waited the driver's whole
server-selection timeout (5 s) before its 503, and /health said 200. A small loop pings the
database every `interval_s` (and, when the gateway runs it, revives the embedded server first);
a request that needs the database is refused at once with the reason while the last verdict is
"down", and a failed operation on the request path marks it down without waiting for the next
ping. A verdict of "down" lasts at most one interval past the database's return.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from datetime import datetime

from pymongo.errors import ConnectionFailure

from app.clock import Clock
from app.errors import DatabaseUnavailable
from app.logs import event
from app.tasks import cancel_and_wait

log = logging.getLogger("gateway.database")


class DatabaseHealth:
    def __init__(
        self,
        ping: Callable[[], Awaitable[None]],
        clock: Clock,
        interval_s: float,
        revive: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._ping = ping  # raises when the database does not answer in time
        self._revive = revive  # restarts an embedded server that exited
        self._clock = clock
        self._interval_s = interval_s
        self.up = True
        self.reason: str | None = None
        self.since: datetime = clock.now()
        self._task: asyncio.Task[None] | None = None

    def require(self) -> None:
        """Raise the 503 a request gets while the database is known to be down."""
        if not self.up:
            raise DatabaseUnavailable(
                f"the database is unavailable (since {self.since.isoformat(timespec='seconds')}: "
                f"{self.reason}); nothing was admitted, retry with the same Idempotency-Key",
                retry_after_s=max(1, round(self._interval_s)),
            )

    def saw_failure(self, exc: Exception) -> None:
        """A request's operation failed: a lost connection or a timeout means the database is
        down for every request, not only this one (the next ping says when it is back)."""
        if isinstance(exc, ConnectionFailure):
            self._down(_describe(exc))

    async def check(self) -> bool:
        """One pass: revive the embedded server if it exited, then ping."""
        try:
            if self._revive is not None:
                await self._revive()
            await self._ping()
        except Exception as exc:
            self._down(_describe(exc))
            return False
        if not self.up:
            event(log, "database.back", down_since=self.since.isoformat(), reason=self.reason)
            self.up, self.reason, self.since = True, None, self._clock.now()
        return True

    def _down(self, reason: str) -> None:
        if self.up:
            event(log, "database.down", logging.ERROR, reason=reason)
            self.up, self.since = False, self._clock.now()
        self.reason = reason

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="database-health")

    async def _run(self) -> None:
        while True:
            await self.check()
            await asyncio.sleep(self._interval_s)

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None


_ADDRESS = re.compile(r"[\w.\[\]:-]+:\d+: |\('[^']*', \d+\)")


def _describe(exc: Exception) -> str:
    """The driver's message in one line an operator can read: without its topology dump, and
    without the database's address (public /health shows the reason)."""
    text = str(exc).split(", Timeout:")[0].split(" (configured timeouts")[0]
    return f"{exc.__class__.__name__}: {_ADDRESS.sub('', text).strip()[:200]}"
