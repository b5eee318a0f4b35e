"""A gateway daemon for the scripts that drive one (chaos, fairness): `python -m app` on a
config of their own, on 127.0.0.1, with tokens for a client and an admin; stopped by pid only."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import yaml
from pymongo import AsyncMongoClient

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.auth.tokens import TokenService  # noqa: E402 - after the path is set
from app.clock import SystemClock  # noqa: E402
from app.store.embedded import free_port  # noqa: E402

Doc = dict[str, Any]


class GatewayProcess:
    """One gateway process and its configuration; stopped by pid only."""

    def __init__(self, tmp: Path, models: dict[str, Doc], **sections: Doc) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data_dir = tmp / "data"
        self.secret = secrets.token_hex(32)
        self.log = tmp / "gateway.log"
        config: Doc = {
            "server": {"port": self.port, "log_level": "INFO"},
            "data_dir": str(self.data_dir),
            "rate_limit": {"per_minute": 0},
            "models": models,
            **sections,
        }
        self.config = tmp / "config.yaml"
        self.config.write_text(yaml.safe_dump(config))
        tokens = TokenService(
            self.secret, "model-gateway", "model-gateway-clients", 3600, 3600, SystemClock()
        )
        self.token = tokens.issue("chaos", "client")
        self.admin_token = tokens.issue("chaos-admin", "admin")
        self.proc: subprocess.Popen[bytes] | None = None
        self.pids: set[int] = set()  # every engine and database pid seen, checked at the end

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "MONGODB_"))}
        env["GATEWAY_JWT_SECRET"] = self.secret
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "app", "--config", str(self.config)],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def db_pid(self) -> int | None:
        try:
            return int(json.loads((self.data_dir / "db.pid").read_text())["pid"])
        except (OSError, ValueError, KeyError):
            return None

    def db_uri(self) -> str:
        port = json.loads((self.data_dir / "db.pid").read_text())["port"]
        return f"mongodb://127.0.0.1:{port}/?directConnection=true"

    async def wait_ready(self, client: httpx.AsyncClient, timeout_s: float = 90.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode}; see {self.log}")
            try:
                body = (await client.get(f"{self.url}/health", timeout=5)).json()
                if body["status"] == "healthy" and all(
                    e["state"] == "ready" for e in body["engines"].values()
                ):
                    await self._ensure_users()
                    return
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            await asyncio.sleep(0.2)
        raise RuntimeError(f"gateway not ready within {timeout_s} s; see {self.log}")

    async def _ensure_users(self) -> None:
        db: AsyncMongoClient[Doc] = AsyncMongoClient(self.db_uri())
        try:
            for name, role in (("chaos", "client"), ("chaos-admin", "admin")):
                await db.gateway.users.update_one(
                    {"_id": name},
                    {"$setOnInsert": {"role": role, "disabled": False, "password_hash": "!unusable"}},
                    upsert=True,
                )
        finally:
            await db.close()

    async def engine_pid(self, client: httpx.AsyncClient, model: str) -> int | None:
        """The model's engine pid now (remembered, so the end can check it is gone)."""
        answer = await client.get(
            f"{self.url}/admin/models/{model}",
            headers={"Authorization": f"Bearer {self.admin_token}"},
            timeout=5,
        )
        pid = answer.json().get("pid") if answer.status_code == 200 else None
        if pid:
            self.pids.add(int(pid))
        return int(pid) if pid else None

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def terminate(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=90)
