"""Login throttling: repeated failed logins for a username or from an address are slowed.

In this process's memory: a password-guessing attacker has to come through some instance,
and each instance refuses after `max_failures` in `window_s`. Successful logins clear the
username's record; the address's failures expire with the window.
"""

from __future__ import annotations

import math

from app.clock import Clock
from app.errors import LoginThrottled


class LoginThrottle:
    def __init__(self, clock: Clock, max_failures: int = 5, window_s: float = 300.0) -> None:
        self._clock = clock
        self._max = max_failures
        self._window_s = window_s
        self._failures: dict[str, list[float]] = {}

    def check(self, username: str, address: str) -> None:
        now = self._clock.monotonic()
        for key in (f"user:{username}", f"addr:{address}"):
            recent = [t for t in self._failures.get(key, []) if now - t < self._window_s]
            self._failures[key] = recent
            if len(recent) >= self._max:
                retry = max(1, math.ceil(self._window_s - (now - recent[0])))
                what = "this username" if key.startswith("user:") else "this address"
                raise LoginThrottled(f"too many failed logins for {what}; retry after {retry} s", retry)

    def failed(self, username: str, address: str) -> None:
        now = self._clock.monotonic()
        for key in (f"user:{username}", f"addr:{address}"):
            self._failures.setdefault(key, []).append(now)
        if len(self._failures) > 100_000:  # bounded memory under a spraying attack
            self._failures = {k: v for k, v in self._failures.items() if v and now - v[-1] < self._window_s}

    def succeeded(self, username: str) -> None:
        self._failures.pop(f"user:{username}", None)
