"""The gateway as a real daemon: `python -m app` in a subprocess, stopped by pid."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import yaml
from pymongo import AsyncMongoClient

from app.auth.tokens import TokenService
from app.clock import SystemClock
from app.store.embedded import free_port
from tests.conftest import eventually

ROOT = Path(__file__).resolve().parents[2]


class Daemon:
    """One gateway configuration that can be started, killed and started again."""

    def __init__(self, tmp: Path, models: dict[str, Any], **sections: Any) -> None:
        self.data_dir = tmp / "data"
        self.port = free_port()
        self.secret = secrets.token_hex(32)
        config: dict[str, Any] = {
            "server": {"port": self.port, "log_level": "INFO"},
            "data_dir": str(self.data_dir),
            "queue": {
                "sweep_interval_seconds": 0.2,
                "poll_interval_seconds": 0.2,
                "lease_seconds": 5,
                "heartbeat_seconds": 1,
                "retry_backoff_seconds": 0.05,
            },
            "models": models,
            "rate_limit": {"per_minute": 0},  # load tests of the queue, not of the rate limit
            "fair_share": {"enabled": False},  # nor of fair shares (one client fills the queue)
        }
        config.update(sections)
        self._config = config
        self.config = tmp / "config.yaml"
        self.config.write_text(yaml.safe_dump(config))
        self.log = tmp / "gateway.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.seen: set[int] = set()  # every child pid observed, so cleanup never leaks one
        self.url = f"http://127.0.0.1:{self.port}"
        tokens = TokenService(
            self.secret, "model-gateway", "model-gateway-clients", 3600, 3600, SystemClock()
        )
        self.token = tokens.issue("alice", "client")
        self.admin_token = tokens.issue("root", "admin")

    def reconfigure(self, models: dict[str, Any]) -> None:
        """Change the configured models for the next start (as an operator editing the file)."""
        self._config["models"] = models
        self.config.write_text(yaml.safe_dump(self._config))

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "MONGODB_"))}
        env["GATEWAY_JWT_SECRET"] = self.secret
        return env

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "app", "--config", str(self.config)],
                cwd=ROOT,
                env=self.env(),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    async def wait_healthy(self, timeout_s: float = 60.0) -> dict[str, Any]:
        return await self.wait_health(
            lambda engines: all(m["state"] == "ready" for m in engines.values()),
            "every engine ready",
            timeout_s,
        )

    async def wait_health(
        self, engines_done: Callable[[dict[str, Any]], bool], what: str, timeout_s: float = 60.0
    ) -> dict[str, Any]:
        """Poll /health until the gateway is healthy and its engines pass `engines_done`; fail at
        once (with the log) if the gateway process exits. The users behind the tokens are
        ensured before returning."""
        async with httpx.AsyncClient() as client:

            async def health() -> dict[str, Any] | None:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise AssertionError(
                        f"gateway exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}"
                    )
                try:
                    body: dict[str, Any] = (await client.get(f"{self.url}/health")).json()
                    return body
                except httpx.HTTPError:
                    return None  # not listening yet

            def done(body: dict[str, Any] | None) -> bool:
                return body is not None and body["status"] == "healthy" and engines_done(body["engines"])

            try:
                body = await eventually(health, done, what, timeout_s)
            except AssertionError as exc:
                raise AssertionError(f"{exc}\n{self.log.read_text()[-3000:]}") from None
        assert body is not None
        await self._ensure_token_holders()
        return body

    async def _ensure_token_holders(self) -> None:
        """The tokens minted above are honoured only while their users exist and are enabled."""
        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(self.db_uri())
        try:
            for name, role in (("alice", "client"), ("root", "admin")):
                await client.gateway.users.update_one(
                    {"_id": name},
                    {"$setOnInsert": {"role": role, "disabled": False, "password_hash": "!unusable"}},
                    upsert=True,
                )
        finally:
            await client.close()

    async def job(self, job_id: str) -> dict[str, Any]:
        """The job's document as the database has it now."""
        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(self.db_uri())
        try:
            doc = await client.gateway.jobs.find_one({"_id": job_id})
            assert doc is not None, f"no job {job_id}"
            return doc
        finally:
            await client.close()

    def db_pid(self) -> int:
        return int(json.loads((self.data_dir / "db.pid").read_text())["pid"])

    def db_uri(self) -> str:
        port = json.loads((self.data_dir / "db.pid").read_text())["port"]
        return f"mongodb://127.0.0.1:{port}/?directConnection=true"

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def terminate(self, timeout_s: float = 60.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout_s)

    def children_pids(self) -> list[int]:
        assert self.proc is not None
        try:
            pids = [c.pid for c in psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            pids = []
        self.seen.update(pids)
        return pids


def stop_quietly(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(os.getpgid(pid), signal.SIGKILL)


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    """Started daemons; whatever they leave running is stopped by pid after the test."""
    started: list[Daemon] = []
    yield started
    for daemon in started:
        pids = [*daemon.children_pids(), *daemon.seen]
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.terminate()
        with contextlib.suppress(OSError, ValueError):
            pids.append(daemon.db_pid())
        stop_quietly([p for p in pids if psutil.pid_exists(p)])
