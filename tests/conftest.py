"""Shared fixtures: one real SecantusDB server per test session, one fresh database per test."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import httpx
import psutil
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

from app.clock import Clock, SystemClock
from app.errors import InvalidRequest
from app.gateway import Gateway
from app.main import create_app
from app.queue.job import JobState
from app.services import Services
from app.settings import Settings
from app.settings_loader import parse_settings
from app.store.embedded import EmbeddedDatabase

JWT_SECRET = secrets.token_hex(32)
ADMIN_PASSWORD = "admin-password-for-tests"
CLIENT_PASSWORD = "client-password-for-tests"


@pytest.fixture(scope="session", autouse=True)
def no_process_left_behind() -> Iterator[None]:
    """After the whole session (torn down last): no engine, database or gateway child survives.

    Each test stops what it started; this catches the one that does not (a leaked engine is
    leaked GPU memory in production), kills it by pid and fails the session.
    """
    yield
    me = psutil.Process()
    try:
        eventually_sync(
            lambda: [c for c in me.children(recursive=True) if _alive(c)],
            lambda alive: not alive,
            "every child process ended",
            15,
        )
        return
    except AssertionError:
        left = [c for c in me.children(recursive=True) if _alive(c)]
    described = [f"{c.pid}: {' '.join(c.cmdline())[:120]}" for c in left if _alive(c)]
    for child in left:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    if described:
        pytest.fail("processes left behind by the tests: " + "; ".join(described))


def _alive(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture(scope="session")
async def mongo_uri(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    server = EmbeddedDatabase(tmp_path_factory.mktemp("secantus"), "secantusd-py", 60.0)
    uri = await server.start()
    yield uri
    await server.stop()


def make_settings(mongo_uri: str, data_dir: Path, models: dict[str, Any], **sections: Any) -> Settings:
    raw: dict[str, Any] = {
        "data_dir": str(data_dir),
        "database": {"uri": mongo_uri, "name": "t_" + uuid.uuid4().hex[:12]},
        "auth": {"jwt_secret": JWT_SECRET},
        "queue": {
            "sweep_interval_seconds": 0.2,
            "poll_interval_seconds": 0.2,
            "retry_backoff_seconds": 0.05,
            "retry_backoff_max_seconds": 0.2,
        },
        "models": models,
        "rate_limit": {"per_minute": 0},  # tests poll hard; tests/api/test_security.py sets limits
        # one test client fills whole queues; tests/api/test_fair_shares.py turns shares on
        "fair_share": {"enabled": False},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return parse_settings(raw, env={})


def stub(*args: str, **fields: Any) -> dict[str, Any]:
    """A stub-engine model entry (the stub is a real HTTP process, a test double)."""
    return {"kind": "stub", "args": list(args), **fields}


T = TypeVar("T")


class ShiftedClock(SystemClock):
    """Real time that a test can move forward (cooldowns, windows) while durations, which
    use the monotonic clock, stay real."""

    def __init__(self) -> None:
        self.offset = timedelta(0)

    def now(self) -> datetime:
        return super().now() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += timedelta(seconds=seconds)


async def eventually(
    probe: Callable[[], Awaitable[T]], done: Callable[[T], bool], what: str, timeout_s: float = 20.0
) -> T:
    """Call `probe` until `done` holds for its value, or fail naming `what` and the last value.

    The one polling loop of the tests: they wait for a state, never for a fixed time.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        try:  # a probe that hangs fails here, named, not at the suite's timeout with no trace
            async with asyncio.timeout(max(0.0, deadline - loop.time()) + 30.0):
                value = await probe()
        except TimeoutError:
            raise AssertionError(
                f"{what}: the probe itself did not answer within {timeout_s:g} s + 30 s"
            ) from None
        if done(value):
            return value
        if loop.time() >= deadline:
            raise AssertionError(f"{what} did not happen within {timeout_s:g} s; last saw {value!r}")
        await asyncio.sleep(0.02)


def eventually_sync(
    probe: Callable[[], T], done: Callable[[T], bool], what: str, timeout_s: float = 20.0
) -> T:
    """`eventually` for code outside an event loop (sync fixtures, threads)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if done(value):
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what} did not happen within {timeout_s:g} s; last saw {value!r}")
        time.sleep(0.02)


class GatewayClient:
    """An httpx client on the ASGI app, plus tokens for an admin and a client user."""

    def __init__(self, http: httpx.AsyncClient, gateway: Gateway) -> None:
        self.http = http
        self.gateway = gateway
        self.admin_token = ""
        self.client_token = ""
        self.app: FastAPI | None = None

    @property
    def services(self) -> Services:
        """The started gateway's services (app/services.py)."""
        assert self.gateway.services is not None, "the gateway is not running"
        return self.gateway.services

    def headers(self, token: str | None = None, **extra: str) -> dict[str, str]:
        base = {"Authorization": f"Bearer {token or self.client_token}", "X-Client-ID": "tests"}
        base.update({k.replace("_", "-"): v for k, v in extra.items()})
        return base

    async def chat(
        self, model: str, content: str = "hello", token: str | None = None, **headers: str
    ) -> httpx.Response:
        body = {"model": model, "messages": [{"role": "user", "content": content}]}
        return await self.http.post("/api/chat", json=body, headers=self.headers(token, **headers))

    async def count(self, model: str, state: str) -> int:
        """Jobs of the model in that state right now, read from the database."""
        return (await self.services.queue.store.occupancy(model)).of(model, JobState(state))

    async def until_count(self, model: str, state: str, expected: int, timeout_s: float = 10.0) -> None:
        await eventually(
            lambda: self.count(model, state),
            lambda n: n == expected,
            f"{expected} {state} jobs for {model}",
            timeout_s,
        )

    async def wait_ready(self, timeout_s: float = 30.0) -> None:
        async def engines() -> dict[str, Any]:
            summary: dict[str, Any] = (await self.http.get("/health")).json()["engines"]
            return summary

        await eventually(
            engines,
            lambda summary: all(
                m["state"] in ("ready", "failed", "stopped", "unavailable") for m in summary.values()
            ),
            "engines settled (ready, failed, stopped or unavailable)",
            timeout_s,
        )


GatewayFactory = Callable[..., Awaitable[GatewayClient]]


@pytest.fixture
def external_servers() -> Iterator[list[Any]]:
    """Upstream servers a test starts itself (tests/upstream.py ExternalServer), stopped after it."""
    servers: list[Any] = []
    yield servers
    for server in servers:
        with contextlib.suppress(Exception):
            server.stop()


@pytest.fixture
async def gateway_factory(mongo_uri: str, tmp_path: Path) -> AsyncIterator[GatewayFactory]:
    managers: list[tuple[LifespanManager, httpx.AsyncClient]] = []

    async def factory(models: dict[str, Any], clock: Clock | None = None, **sections: Any) -> GatewayClient:
        settings = make_settings(mongo_uri, tmp_path / f"data{len(managers)}", models, **sections)
        app = create_app(settings, clock)
        manager = LifespanManager(app, startup_timeout=60, shutdown_timeout=60)
        await manager.__aenter__()
        http = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=manager.app), base_url="http://gw", timeout=60
        )
        managers.append((manager, http))
        gw: Gateway = app.state.gateway
        client = GatewayClient(http, gw)
        client.app = app
        for name, password, role in [
            ("admin", ADMIN_PASSWORD, "admin"),
            ("alice", CLIENT_PASSWORD, "client"),
        ]:
            with contextlib.suppress(InvalidRequest):  # a second gateway on the same database
                await client.services.users.create(name, password, role)
        client.admin_token = gw.tokens.issue("admin", "admin")
        client.client_token = gw.tokens.issue("alice", "client")
        await client.wait_ready()
        return client

    yield factory
    for manager, http in reversed(managers):
        await http.aclose()
        await manager.__aexit__(None, None, None)
