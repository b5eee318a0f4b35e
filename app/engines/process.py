"""One engine process: spawn in its own process group, wait for health, stop for sure.

Own process group because vLLM spawns an EngineCore child: signalling the group reaches the
children the engine has now. The group is not enough on its own: once the leader is dead its
tree can no longer be walked, and a child that survived it (EngineCore holds the GPU memory)
would be missed. So every spawn also carries a unique id in its environment, which children
inherit, and survivors are found by that id.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import signal
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

import psutil

from app.settings_loader import child_environment

# The environment variable that marks every process of one spawned engine (children inherit it).
ENGINE_ID_ENV = "GATEWAY_ENGINE_ID"


@dataclass
class SpawnedProcess:
    pid: int
    create_time: float
    # the group signalled at a stop; stored (and recorded for adoption) rather than assumed to be
    # the pid, so a stop always reaches the group the engine was started in
    pgid: int
    popen: subprocess.Popen[bytes] | None
    # the ENGINE_ID_ENV value of this spawn; "" for records of gateways that did not set one
    engine_id: str = ""

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


def spawn(argv: list[str], extra_env: dict[str, str], log_path: Path) -> SpawnedProcess:
    """Start the engine in its own session, so its whole tree can be signalled as one group,
    marked with a fresh id, so its processes can be found even after the leader died."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    engine_id = uuid.uuid4().hex
    env = child_environment({**extra_env, ENGINE_ID_ENV: engine_id})
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
    return SpawnedProcess(
        popen.pid, psutil.Process(popen.pid).create_time(), os.getpgid(popen.pid), popen, engine_id
    )


def tree_pids(pid: int) -> list[int]:
    """The process and all its descendants now (vLLM's GPU memory is held by its children)."""
    try:
        root = psutil.Process(pid)
        return [pid, *(child.pid for child in root.children(recursive=True))]
    except psutil.NoSuchProcess:
        return []


def tree_rss_bytes(pid: int | None) -> int | None:
    """Resident memory of the process and its descendants (a CPU engine's model lives there;
    on a GPU box /admin/gpus shows device memory). None without a live process."""
    if pid is None:
        return None
    total = 0
    for member in tree_pids(pid):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            total += psutil.Process(member).memory_info().rss
    return total or None


def marked(engine_id: str) -> list[psutil.Process]:
    """The live processes whose environment carries this engine id: the leader and its
    children, and children that outlived the leader (reparented away from its tree).

    Processes of other users cannot be read and are skipped: an engine runs as the gateway's
    user, and so do its children.
    """
    if not engine_id:
        return []
    found = []
    for candidate in psutil.process_iter():
        try:
            if candidate.environ().get(ENGINE_ID_ENV) == engine_id:
                found.append(candidate)
        except (psutil.AccessDenied, psutil.NoSuchProcess):
            continue
    return found


def stop(process: SpawnedProcess, timeout_s: float) -> list[int]:
    """SIGTERM the group and every marked process, SIGKILL whatever is left after `timeout_s`.

    The members are the leader's tree (while the leader lives) and every process marked with
    the engine id, so a child that outlived a crashed leader is stopped too. Waits for every
    member, not only the leader: a leader that exits on SIGTERM while its EngineCore child
    ignores it would otherwise leave the child holding the GPU. Returns the pids of the
    members, for the GPU-memory check.
    """
    leader_alive = process.exit_code() is None
    pids = dict.fromkeys(tree_pids(process.pid) if leader_alive else [])
    members: list[psutil.Process] = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            members.append(psutil.Process(pid))
    for survivor in marked(process.engine_id):
        if survivor.pid not in pids:
            pids[survivor.pid] = None
            members.append(survivor)
    # a group whose members are all gone may have been handed to an unrelated process since
    signal_group = leader_alive or any(_in_group(member, process.pgid) for member in members)
    if signal_group:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pgid, signal.SIGTERM)
    for member in members:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.terminate()  # a child that left the group still gets the signal
    _, alive = psutil.wait_procs(members, timeout=timeout_s)
    if alive:
        if signal_group:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pgid, signal.SIGKILL)
        for member in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                member.kill()
        psutil.wait_procs(alive, timeout=timeout_s)
    if process.popen is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.popen.wait(timeout=1)  # reap it, so no zombie is left
    return list(pids)


def _in_group(member: psutil.Process, pgid: int) -> bool:
    try:
        return os.getpgid(member.pid) == pgid
    except ProcessLookupError:
        return False


def rotate_log(path: Path, max_bytes: int, backups: int, *, running: bool = False) -> bool:
    """Keep `path` under `max_bytes` with `backups` older files; True if it rotated.

    Before a (re)start the file is moved aside. While the engine runs it holds the file open,
    so the content is copied aside and the file truncated in place (logrotate's copytruncate):
    the engine opened it for appending, so its next write lands at the new start. Lines written
    between the copy and the truncation are lost, a price paid only once per `max_bytes`.
    """
    try:
        if path.stat().st_size < max_bytes:
            return False
    except FileNotFoundError:
        return False
    for index in range(backups - 1, 0, -1):
        older = path.with_name(f"{path.name}.{index}")
        if older.exists():
            older.replace(path.with_name(f"{path.name}.{index + 1}"))
    first = path.with_name(f"{path.name}.1")
    if not running:
        if backups == 0:
            path.unlink(missing_ok=True)
        else:
            path.replace(first)
        return True
    if backups > 0:
        shutil.copyfile(path, first)
    with path.open("r+b") as log_file:
        log_file.truncate(0)
    return True


def log_tail(path: Path, lines: int = 20, max_bytes: int = 8192) -> str:
    """The last `lines` lines of the log, reading at most `max_bytes` from its end."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - max_bytes))
            return "\n".join(fh.read().decode(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def log_file_name(model: str) -> str:
    """One flat file per model in the log directory. Model names may hold `/` and `:` (hub
    ids such as `deepseek-ai/DeepSeek-OCR`); used as they are, `/` would point into a missing
    directory and `..` segments outside the log directory. Such names are flattened, with a
    short hash so that `a/b` and `a_b` do not share a file."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", model).lstrip(".") or "_"
    if safe == model:
        return f"{model}.log"
    return f"{safe}-{hashlib.sha256(model.encode()).hexdigest()[:8]}.log"
