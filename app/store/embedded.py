"""Runs SecantusDB as a child process when `database.uri` is `embedded`.

SecantusDB is GPL-2.0, so it is only ever a separate process speaking the MongoDB wire
protocol. A gateway killed with -9 leaves its database behind; the pid file lets the next
gateway reuse it when healthy or replace it when not, so two servers never share a data dir.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import psutil
from pymongo import AsyncMongoClient

from app.errors import DatabaseUnavailable
from app.logs import event
from app.settings_loader import child_environment

log = logging.getLogger("gateway.embedded_db")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def ping(uri: str, timeout_s: float = 1.0) -> bool:
    client: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(
        uri, serverSelectionTimeoutMS=int(timeout_s * 1000), connectTimeoutMS=int(timeout_s * 1000)
    )
    try:
        await client.admin.command("ping")
        return True
    except Exception:
        return False
    finally:
        await client.close()


@dataclass(frozen=True)
class _Recorded:
    pid: int
    port: int
    create_time: float


def terminate_group(pid: int, timeout_s: float) -> None:
    """SIGTERM the process group, SIGKILL it if it does not exit in time.

    SIGCONT first, so a stopped (SIGSTOP) server can act on the SIGTERM; and SIGTERM once more
    after a second, because SecantusDB ignores a SIGTERM that comes right after a SIGCONT (it
    then exits 2 s after the second one instead of being killed at the deadline)."""
    try:
        pgid = os.getpgid(pid)
        os.killpg(pgid, signal.SIGCONT)
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        process = psutil.Process(pid)
        try:
            process.wait(timeout=min(1.0, timeout_s))
            return
        except psutil.TimeoutExpired:
            os.killpg(pgid, signal.SIGTERM)
        process.wait(timeout=timeout_s)
    except psutil.TimeoutExpired:
        event(log, "process.kill", pid=pid, reason="did not exit after SIGTERM")
        try:
            os.killpg(pgid, signal.SIGKILL)
            psutil.Process(pid).wait(timeout=timeout_s)
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass
    except (ProcessLookupError, psutil.NoSuchProcess):
        pass


def resolve_command(command: str) -> list[str]:
    """Find the server next to this interpreter first: a venv's bin is often not on PATH."""
    argv = shlex.split(command)
    if argv and "/" not in argv[0]:
        beside = Path(sys.executable).parent / argv[0]
        found = str(beside) if beside.is_file() else shutil.which(argv[0])
        if found is None:
            raise DatabaseUnavailable(
                f"embedded database command {argv[0]!r} not found; install requirements.txt "
                "(or set database.uri / MONGODB_URI to a MongoDB server)"
            )
        argv[0] = found
    return argv


class EmbeddedDatabase:
    """Owns one SecantusDB server process for this data directory."""

    def __init__(
        self,
        data_dir: Path,
        command: str,
        startup_timeout: float,
        port: int = 0,
        sync_on_commit: bool = False,
        min_free_mb: float = 0.0,
    ) -> None:
        self._storage = data_dir / "db"
        self.min_free_mb = min_free_mb
        self._starved = False  # the disk ran low while this server ran
        self._pid_file = data_dir / "db.pid"
        self._log_file = data_dir / "logs" / "secantusd.log"
        self._config_file = data_dir / "secantusd.toml"
        self._sync_on_commit = sync_on_commit
        self._command = command
        self._startup_timeout = startup_timeout
        self._port = port
        self._pid: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None  # the server this gateway started
        self._recorded: _Recorded | None = None  # the one it took over from a killed gateway
        self._serving_port = 0  # the port the server listens on: a restart keeps it
        self._next_restart_at = 0.0
        self.restarts = 0
        self.uri = ""
        self.reused = False  # True when a server left behind by an earlier gateway was taken over

    @property
    def pid(self) -> int | None:
        """The server's pid while this gateway owns one."""
        return self._pid

    def _read_pid_file(self) -> _Recorded | None:
        try:
            data = json.loads(self._pid_file.read_text())
            return _Recorded(int(data["pid"]), int(data["port"]), float(data["create_time"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    @staticmethod
    def _alive(rec: _Recorded) -> bool:
        try:
            proc = psutil.Process(rec.pid)
            return abs(proc.create_time() - rec.create_time) < 1.0 and proc.is_running()
        except psutil.NoSuchProcess:
            return False

    async def start(self) -> str:
        left_behind = self._read_pid_file()
        if left_behind and self._alive(left_behind):
            uri = f"mongodb://127.0.0.1:{left_behind.port}/?directConnection=true"
            if await ping(uri):
                event(log, "embedded_db.reused", pid=left_behind.pid, port=left_behind.port)
                self._pid, self.uri, self.reused = left_behind.pid, uri, True
                self._recorded, self._serving_port = left_behind, left_behind.port
                return uri
            event(log, "embedded_db.replaced", pid=left_behind.pid, reason="left behind and not answering")
            await asyncio.to_thread(terminate_group, left_behind.pid, 10.0)
        port = self._port or free_port()
        await self._spawn(port)
        return self.uri

    def _check_writable(self) -> None:
        """A data directory the server cannot write is named at start, not found out at the
        first job (SecantusDB's own message is a traceback in its log file)."""
        for path in (self._storage, self._log_file.parent):
            try:
                path.mkdir(parents=True, exist_ok=True)
                probe = path / ".write-probe"
                probe.write_bytes(b"x")
                probe.unlink()
            except OSError as exc:
                raise DatabaseUnavailable(
                    f"the embedded database cannot write to {path}: {exc.strerror or exc}; "
                    "give the gateway's user write access there, or set data_dir"
                ) from None

    async def revive(self) -> None:
        """Restart the server if it exited (killed, crashed) while the gateway runs: same port,
        so the driver's connections come back by themselves, and same storage, so every
        journaled write is there. A stalled (SIGSTOP) server is alive and left alone.

        A disk that runs low is reported (DatabaseUnavailable with the path and what is free)
        before it is full: a SecantusDB whose disk filled answers every later operation with
        "internal server error", even once space is back, until it is restarted (measured: its
        journaled writes are then all there). So once space is back, it is restarted."""
        if self._pid is None:
            return
        await self._check_space()
        if self.exit_code() is None:
            return
        now = asyncio.get_running_loop().time()
        if now < self._next_restart_at:
            return
        code = self.exit_code()
        self.restarts += 1
        self._next_restart_at = now + min(30.0, 2.0 ** min(self.restarts, 5))
        event(log, "embedded_db.exited", logging.ERROR, pid=self._pid, code=code, restarts=self.restarts)
        await self._spawn(self._serving_port)

    async def _check_space(self) -> None:
        try:
            free_mb = shutil.disk_usage(self._storage).free / 2**20
        except OSError:
            return
        if free_mb < self.min_free_mb:
            self._starved = True
            raise DatabaseUnavailable(
                f"the database's data directory {self._storage} has {free_mb:.0f} MiB free, under "
                f"database.embedded.min_free_mb ({self.min_free_mb:g}); free some space"
            )
        if self._starved and self.exit_code() is None:
            self._starved = False
            event(log, "embedded_db.restart", pid=self._pid, reason="disk space is back")
            assert self._pid is not None
            await asyncio.to_thread(terminate_group, self._pid, 15.0)
            if self._proc is not None:
                self._proc.poll()  # reaped: exit_code() now says it exited, revive restarts it

    def exit_code(self) -> int | str | None:
        """The exit code of a server that is gone (`gone` for one this gateway did not start),
        None while it runs."""
        if self._proc is not None:
            return self._proc.poll()
        if self._recorded is not None and not self._alive(self._recorded):
            return "gone"
        return None

    async def _spawn(self, port: int) -> None:
        self._check_writable()
        # Our own config file (an explicit --config also stops it from picking up a stray
        # ./secantusd.toml): TTL sweeper off, the gateway prunes history itself; fsync on
        # commit only when asked (journaled writes already survive a kill -9 of the server).
        self._config_file.write_text(
            "[storage]\nttl_sweep_seconds = 0\n"
            f"sync_on_commit = {'true' if self._sync_on_commit else 'false'}\n"
        )
        argv = [
            *resolve_command(self._command),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--config",
            str(self._config_file),
            "--storage-path",
            str(self._storage),
            "--log-level",
            "WARNING",
        ]
        with self._log_file.open("ab") as log_out:
            proc = subprocess.Popen(  # noqa: ASYNC220 - returns at once, the wait below is async
                argv,
                stdout=log_out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env=child_environment(),
            )
        self._proc, self._pid, self._recorded, self._serving_port = proc, proc.pid, None, port
        self._pid_file.write_text(
            json.dumps({"pid": proc.pid, "port": port, "create_time": psutil.Process(proc.pid).create_time()})
        )
        self.uri = f"mongodb://127.0.0.1:{port}/?directConnection=true"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._startup_timeout
        while loop.time() < deadline:
            if proc.poll() is not None:
                raise DatabaseUnavailable(
                    f"embedded database exited with code {proc.returncode} at start; see {self._log_file}"
                )
            if await ping(self.uri, timeout_s=0.5):
                event(log, "embedded_db.started", pid=proc.pid, port=port, storage=self._storage)
                return
            await asyncio.sleep(0.1)
        await asyncio.to_thread(terminate_group, proc.pid, 5.0)
        raise DatabaseUnavailable(f"embedded database did not answer within {self._startup_timeout} s")

    async def stop(self) -> None:
        if self._pid is None:
            return
        await asyncio.to_thread(terminate_group, self._pid, 15.0)
        if self._proc is not None:
            self._proc.poll()  # reap it
        event(log, "embedded_db.stopped", pid=self._pid)
        self._pid = self._proc = self._recorded = None
        self._pid_file.unlink(missing_ok=True)
