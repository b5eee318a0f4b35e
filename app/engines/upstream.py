"""External upstreams (kind `openai`): OpenAI-compatible servers the gateway routes to but does
not run (an Ollama on localhost:11434, a vLLM on another host, a llama-server started by hand).

Why a watch of their own and not the supervisor's: there is no process to spawn, adopt, kill or
restart, so nothing can crash; what the gateway can know is whether the server answers. Its
health is polled; a server that stops answering is `unavailable` with the reason (new requests
get 503 at once with Retry-After, admitted ones wait in the queue), and it is served again as
soon as a check passes, without an operator (docs/ARCHITECTURE.md, "External upstreams").

A ready upstream that refuses connections (nothing listens, unknown host) is unavailable at
the first check that sees it; one that answers slowly or with an error is declared so after
`engines.health_check_failures` such checks in a row, as a hung engine is: one slow answer from
a busy server must not turn its traffic away. A call that failed to connect holds the model's
jobs and makes the checks come at once (every `engines.health_interval`), so the verdict takes
milliseconds and retries wait in the queue instead of spending their attempts against a server
that is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping

from app.clock import Clock
from app.engines.lifecycle import EngineRecord, EngineState
from app.engines.watch import health_url
from app.errors import ConfigError, UpstreamUnavailable
from app.logs import event
from app.proxy.client import EngineClient
from app.settings import EngineDefaults, ModelSettings
from app.tasks import cancel_and_wait

log = logging.getLogger("gateway.upstreams")


def auth_headers(
    models: Mapping[str, ModelSettings], environ: Mapping[str, str]
) -> dict[str, dict[str, str]]:
    """Each external upstream's API key as a bearer header, read from the environment once, before
    anything starts: a named variable that is unset is a configuration error now, not a stream
    of 401s later."""
    headers: dict[str, dict[str, str]] = {}
    for name, model in models.items():
        if model.kind != "openai" or model.api_key_env is None:
            continue
        key = environ.get(model.api_key_env, "")
        if not key:
            raise ConfigError(
                f"models.{name}.api_key_env names {model.api_key_env}, which is not set in the environment"
            )
        headers[name] = {"Authorization": f"Bearer {key}"}
    return headers


class UpstreamWatch:
    """Polls each external upstream's health and moves its record: starting (first check) →
    ready ⇄ unavailable. Start/stop like every background loop (nothing to drain: it runs no job)."""

    def __init__(
        self,
        upstreams: list[EngineRecord],
        client: EngineClient,
        defaults: EngineDefaults,
        clock: Clock,
        on_ready: Callable[[EngineRecord], None],
    ) -> None:
        self._upstreams = {u.name: u for u in upstreams}
        self._client = client
        self._defaults = defaults
        self._clock = clock
        self._on_ready = on_ready
        self._urgent: set[str] = set()  # check at the next turn of the loop, not at their time
        # a call to it failed to connect: no job is sent to it until a check says it answers
        # (then it serves on) or it is declared unavailable (then its jobs wait in the queue);
        # without this, retries could spend every attempt in the moment before the verdict
        self._confirming: set[str] = set()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def __contains__(self, name: object) -> bool:
        return name in self._upstreams

    def start(self) -> None:
        for upstream in self._upstreams.values():
            upstream.move(EngineState.STARTING, "checking the upstream's health")
            upstream.started_at = self._clock.now()
        if self._upstreams:
            self._task = asyncio.create_task(self._run(), name="upstream-watch")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    def serving(self, name: str) -> bool:
        """Jobs may be sent to it now."""
        return self._upstreams[name].state == EngineState.READY and name not in self._confirming

    def suspect(self, name: str) -> None:
        """A call to this upstream failed to connect: hold its jobs and check it now."""
        if self._upstreams[name].state == EngineState.READY:
            self._confirming.add(name)
        self._urgent.add(name)
        self._wakeup.set()

    def admission_error(self, upstream: EngineRecord) -> UpstreamUnavailable | None:
        """The 503 for an upstream known to be down; None while it is ready or being checked
        (requests queue during the first check, as they do while an engine loads)."""
        if upstream.state != EngineState.UNAVAILABLE:
            return None
        return UpstreamUnavailable(
            upstream.name, upstream.reason, max(1, round(self._defaults.health_check_interval))
        )

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        due = {name: 0.0 for name in self._upstreams}
        while True:
            now = loop.time()
            self._wakeup.clear()  # before taking the names: a suspicion raised from here on wakes the wait
            urgent, self._urgent = self._urgent, set()
            checks = [u for n, u in self._upstreams.items() if n in urgent or due[n] <= now]
            if checks:
                await asyncio.gather(*(self.check(u) for u in checks))
            now = loop.time()
            for upstream in checks:
                # one on the way down (failed, not yet declared) is looked at again soon
                pending = upstream.name in self._confirming or upstream.health_failures > 0
                pause = self._defaults.health_interval if pending else self._defaults.health_check_interval
                due[upstream.name] = now + pause
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), max(0.0, min(due.values()) - now))

    async def check(self, upstream: EngineRecord) -> None:
        problem = await self._client.health_problem(
            health_url(upstream),
            self._defaults.health_check_timeout,
            upstream.auth_headers,
        )
        upstream.last_check_at = self._clock.now()
        if problem is None:
            self._answered(upstream)
            return
        upstream.last_error = problem.reason
        if upstream.state == EngineState.READY and not problem.unreachable:
            upstream.health_failures += 1
            event(
                log,
                "upstream.unhealthy",
                logging.WARNING,
                model=upstream.name,
                failures=upstream.health_failures,
                problem=problem.reason,
            )
            if upstream.health_failures < self._defaults.health_check_failures:
                return
        self._confirming.discard(upstream.name)
        if upstream.state == EngineState.UNAVAILABLE:
            upstream.reason = problem.reason  # the latest: refused, then timing out, then a 401...
            return
        upstream.move(EngineState.UNAVAILABLE, problem.reason)
        upstream.ready_at = None
        upstream.health_failures = 0
        event(log, "upstream.unavailable", logging.ERROR, model=upstream.name, reason=problem.reason)

    def _answered(self, upstream: EngineRecord) -> None:
        upstream.health_failures = 0
        held = upstream.name in self._confirming
        self._confirming.discard(upstream.name)
        if upstream.state == EngineState.READY:
            if held:
                self._on_ready(upstream)  # its held jobs may go now
            return
        upstream.move(EngineState.READY)
        upstream.ready_at = self._clock.now()
        event(log, "upstream.ready", model=upstream.name, url=upstream.base_url)
        self._on_ready(upstream)
