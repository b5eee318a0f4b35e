"""What GPUs this machine has and who uses them, behind one small interface.

Placement and the stop check read a snapshot instead of calling NVML themselves, so they run
(and are tested) on machines without a driver, and so API tests can describe fake GPUs.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

GIB = 1024**3


class GpuProcess(NamedTuple):
    """A process holding memory on a GPU; used_bytes is None where the driver will not say
    (NVML reports N/A for other containers' processes and on some drivers)."""

    pid: int
    used_bytes: int | None


@dataclass(frozen=True)
class GpuInfo:
    """One GPU at one moment. `index` is NVML's (PCI bus order), which the engine's
    CUDA_VISIBLE_DEVICES uses too (commands.build_environment sets CUDA_DEVICE_ORDER)."""

    index: int
    name: str
    total_bytes: int
    free_bytes: int
    used_bytes: int
    processes: tuple[GpuProcess, ...] = ()
    utilization: float | None = None  # share of the last sample period the GPU was busy; None: unknown


class GpuInventory(Protocol):
    """Where GPU facts come from: NVML on a real machine, a fixed list in tests."""

    @property
    def available(self) -> bool:
        """False when GPU facts cannot be had at all; `reason` then says why."""
        ...

    @property
    def reason(self) -> str:
        """Why `available` is False ("" when it is True), worded for an operator."""
        ...

    def snapshot(self) -> list[GpuInfo]:
        """Every GPU now; [] when not available. Never raises."""
        ...


@dataclass
class StaticInventory:
    """A fixed inventory: for tests, and for `gpus: fake` configs that exercise placement
    through the API on machines without GPUs."""

    gpus: list[GpuInfo] = field(default_factory=list)
    available: bool = True
    reason: str = ""

    def snapshot(self) -> list[GpuInfo]:
        return list(self.gpus) if self.available else []


_NO_LIBRARY = "NVML not available: libnvidia-ml.so.1 not found (no NVIDIA driver)"


class NvmlInventory:
    """GPUs as NVML (nvidia-ml-py's `pynvml`) reports them.

    NVML is loaded on first use, not at import, so the gateway starts and serves CPU kinds on
    a machine without a driver; every NVML failure becomes `available = False` plus a reason
    instead of an exception, because "no GPU" is a state to report, not a crash.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._nvml: Any = None
        self._tried = False
        self._reason = ""

    @property
    def available(self) -> bool:
        self._init()
        return self._nvml is not None and not self._reason

    @property
    def reason(self) -> str:
        self._init()
        return self._reason

    def _init(self) -> None:
        with self._lock:
            if self._tried:
                return
            self._tried = True
            try:
                import pynvml  # type: ignore[import-untyped, import-not-found, unused-ignore]
            except ImportError:
                self._reason = "NVML not available: the nvidia-ml-py package is not installed"
                return
            try:
                pynvml.nvmlInit()
            except pynvml.NVMLError_LibraryNotFound:
                self._reason = _NO_LIBRARY
                return
            except pynvml.NVMLError as exc:
                self._reason = f"NVML not available: {exc}"
                return
            self._nvml = pynvml

    def snapshot(self) -> list[GpuInfo]:
        self._init()
        nvml = self._nvml
        if nvml is None:
            return []
        try:
            gpus = [_read_gpu(nvml, index) for index in range(nvml.nvmlDeviceGetCount())]
        except nvml.NVMLError as exc:
            # A GPU that fell off the bus or a driver reload: report it, and try again next time.
            self._reason = f"NVML query failed: {exc}"
            return []
        self._reason = ""
        return gpus

    def close(self) -> None:
        """Release NVML (optional; the process exit does it too)."""
        with self._lock:
            if self._nvml is not None:
                with contextlib.suppress(self._nvml.NVMLError):
                    self._nvml.nvmlShutdown()
            self._nvml, self._tried, self._reason = None, False, ""


def _read_gpu(nvml: Any, index: int) -> GpuInfo:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
    try:
        running = nvml.nvmlDeviceGetComputeRunningProcesses(handle)
    except nvml.NVMLError:
        running = []  # not supported on this GPU or driver: memory numbers still hold
    name = nvml.nvmlDeviceGetName(handle)
    try:
        utilization: float | None = nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100
    except nvml.NVMLError:
        utilization = None  # not supported on this GPU (some vGPU and MIG set-ups)
    return GpuInfo(
        index=index,
        name=name.decode() if isinstance(name, bytes) else str(name),
        total_bytes=int(memory.total),
        free_bytes=int(memory.free),
        used_bytes=int(memory.used),
        processes=tuple(_processes(running)),
        utilization=utilization,
    )


def _processes(running: Iterable[Any]) -> Iterable[GpuProcess]:
    for proc in running:
        used = proc.usedGpuMemory
        yield GpuProcess(int(proc.pid), None if used is None else int(used))


def memory_released(inventory: GpuInventory, gpus: list[int], pids: Iterable[int]) -> bool:
    """True when none of `pids` still holds memory on any of `gpus`.

    Pass every pid of the stopped engine's process tree, collected before the stop: vLLM's
    memory is held by its EngineCore and worker children, not by the pid we spawned. Without
    NVML this is True, because then no GPU engine can have been started; False when NVML
    worked before but fails now, because then nothing is confirmed. NVML shows host pids;
    inside a container without the host pid namespace the pids differ, so a caller there should
    also compare free memory against the snapshot taken before the start.
    """
    if not inventory.available:
        return True
    snapshot = inventory.snapshot()
    if not inventory.available:
        return False  # NVML worked before but this query failed: nothing is confirmed
    ours = set(pids)
    wanted = set(gpus)
    for gpu in snapshot:
        if gpu.index in wanted and any(proc.pid in ours for proc in gpu.processes):
            return False
    return True
