"""An OpenAI-compatible server the tests start themselves, standing for an upstream someone runs
outside the gateway (kind openai): started, killed and started again on the same port, stopped
by pid."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from app.store.embedded import free_port
from tests.conftest import eventually_sync


class ExternalServer:
    """`argv` gets `--port N` appended by `port_flag`; health is `health_path` answering 200."""

    def __init__(self, argv: list[str], log: Path, health_path: str, port_flag: str = "--port") -> None:
        self.port = free_port()
        self._argv = [*argv, port_flag, str(self.port)]
        self._log = log
        self._health = f"http://127.0.0.1:{self.port}{health_path}"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 60.0) -> None:
        with self._log.open("ab") as out:
            self.proc = subprocess.Popen(self._argv, stdout=out, stderr=subprocess.STDOUT)
        eventually_sync(self._answers, bool, f"{self._argv[2]} answering {self._health}", timeout_s)

    async def start_async(self, timeout_s: float = 60.0) -> None:
        """`start` off the event loop: a test whose gateway runs in-process must not freeze it
        (health checks, database heartbeats) while the server comes up."""
        await asyncio.to_thread(self.start, timeout_s)

    def _answers(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"{self._argv} exited with {self.proc.returncode}: {self._log.read_text()}")
        try:
            return httpx.get(self._health, timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False

    def kill(self) -> None:
        """SIGKILL: the server is gone at once, connections reset, as when its host dies."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None


def stub_server(log: Path, *args: str) -> ExternalServer:
    """Our stub engine as someone else's server (a process on its own port, not spawned by the gateway)."""
    return ExternalServer([sys.executable, "-m", "app.engines.stub", *args], log, "/health")
