"""One engine process: spawn in its own process group, wait for health, stop for sure.

Own process group because vLLM spawns an EngineCore child: signalling the group is the only
way to be sure no child keeps GPU memory after a stop.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import psutil

from app.settings import ModelSettings, child_environment
from app.store.embedded import terminate_group


def stub_command(port: int, served_name: str, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "app.engines.stub", "--port", str(port), "--model-name", served_name, *args]


@dataclass
class SpawnedProcess:
    pid: int
    create_time: float
    popen: subprocess.Popen[bytes] | None

    def exit_code(self) -> int | None:
        """None while running; the code (negative: killed by that signal) once it exited."""
        if self.popen is not None:
            return self.popen.poll()
        try:
            proc = psutil.Process(self.pid)
            if abs(proc.create_time() - self.create_time) < 1.0 and proc.status() != psutil.STATUS_ZOMBIE:
                return None
        except psutil.NoSuchProcess:
            pass
        return -1


def spawn(argv: list[str], model: ModelSettings, log_path: Path) -> SpawnedProcess:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = child_environment(model.env)
    with log_path.open("ab") as log_out:
        popen = subprocess.Popen(
            argv,
            stdout=log_out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=env,
            cwd=os.getcwd(),
        )
    return SpawnedProcess(popen.pid, psutil.Process(popen.pid).create_time(), popen)


def stop(process: SpawnedProcess, timeout_s: float) -> None:
    terminate_group(process.pid, timeout_s)
    if process.popen is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.popen.wait(timeout=1)  # reap it, so no zombie is left


def is_same_process(pid: int, create_time: float) -> bool:
    try:
        return abs(psutil.Process(pid).create_time() - create_time) < 1.0
    except psutil.NoSuchProcess:
        return False


def log_tail(path: Path, lines: int = 20) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 8192))
            return "\n".join(fh.read().decode(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
