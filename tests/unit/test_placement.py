"""GPU placement against fake inventories, and NVML's behaviour on a machine without a driver."""

from __future__ import annotations

import sys
import types
from typing import Any

import pytest

from app.engines.gpus import (
    GIB,
    GpuInfo,
    GpuProcess,
    NvmlInventory,
    StaticInventory,
    memory_released,
)
from app.engines.placement import Placement, place, required_bytes
from app.errors import ModelUnavailable, PlacementFailed
from app.settings import EngineKind, GpuNeeds


def gpu(index: int, total_gib: float, free_gib: float, *pids: int) -> GpuInfo:
    total, free = int(total_gib * GIB), int(free_gib * GIB)
    return GpuInfo(
        index=index,
        name=f"Fake GPU {index}",
        total_bytes=total,
        free_bytes=free,
        used_bytes=total - free,
        processes=tuple(GpuProcess(pid, GIB) for pid in pids),
    )


def needs(**fields: Any) -> GpuNeeds:
    return GpuNeeds.model_validate(fields)


H100 = 80.0
ONE = [gpu(0, H100, H100)]
TWO_EMPTY = [gpu(0, H100, H100), gpu(1, H100, H100)]
MIXED = [gpu(0, H100, 50.0), gpu(1, H100, 30.0), gpu(2, H100, 79.0)]


@pytest.mark.parametrize(
    ("case", "kind", "want", "snapshot", "expected"),
    [
        ("fits on the only GPU", "vllm", needs(), ONE, [0]),
        (
            "best fit: least free that still fits",
            "vllm",
            needs(memory_gib=20, memory_fraction=0.1),
            MIXED,
            [1],
        ),
        ("best fit skips GPUs that do not fit", "stub", needs(memory_gib=40), MIXED, [0]),
        ("fraction needs nearly an empty GPU", "vllm", needs(memory_fraction=0.9), MIXED, [2]),
        ("ties go to the lower index", "vllm", needs(), TWO_EMPTY, [0]),
        ("multi-GPU takes the tightest fits", "stub", needs(count=2, memory_gib=25), MIXED, [0, 1]),
        ("multi-GPU, all of them", "deepseek_ocr", needs(count=2), TWO_EMPTY, [0, 1]),
        (
            "pinned GPU is used though another fits tighter",
            "stub",
            needs(memory_gib=20, devices=[2]),
            MIXED,
            [2],
        ),
        ("pinning restricts the candidates", "stub", needs(memory_gib=20, devices=[0, 2]), MIXED, [0]),
        ("count 0 runs on CPU", "vllm", needs(count=0), [], []),
        ("CPU kind gets no GPU whatever it declares", "cpu_ocr", needs(count=2), [], []),
    ],
)
def test_place_fits(
    case: str, kind: EngineKind, want: GpuNeeds, snapshot: list[GpuInfo], expected: list[int]
) -> None:
    assert place("m", want, kind, snapshot, {}) == Placement(expected), case


def test_placement_ignores_an_unusable_inventory_for_cpu_engines() -> None:
    assert place("ocr", needs(), "cpu_ocr", [], {}, unusable_reason="NVML not available: x") == Placement([])


@pytest.mark.parametrize(
    ("want", "snapshot", "owners", "message"),
    [
        (
            needs(memory_gib=40, memory_fraction=0.1),
            [gpu(0, H100, 12.0)],
            {0: ["gemma"]},
            "model 'big' needs 1 GPU with 40.0 GiB free; GPU0 has 12.0 GiB free (used by gemma)",
        ),
        (
            needs(count=2),
            ONE,
            {},
            "model 'big' needs 2 GPUs; this machine has 1",
        ),
        (
            needs(devices=[3]),
            TWO_EMPTY,
            {},
            "model 'big' is pinned to GPU 3, which does not exist (this machine has GPU0, GPU1)",
        ),
        (
            needs(count=2, devices=[1]),
            TWO_EMPTY,
            {},
            "model 'big' needs 2 GPUs but gpu.devices pins it to 1 (1)",
        ),
        (
            needs(count=2, memory_gib=40, memory_fraction=0.5),
            [gpu(0, H100, 12.0), gpu(1, H100, 60.0)],
            {0: ["gemma", "qwen"]},
            "model 'big' needs 2 GPUs with 40.0 GiB free each; GPU0 has 12.0 GiB free (used by gemma, qwen); "
            "only GPU1 has enough",
        ),
        (
            needs(),
            [gpu(0, H100, 60.0, 4242)],
            {},
            "model 'big' needs 1 GPU with 72.0 GiB free (gpu.memory_fraction 0.9 of the whole GPU); "
            "GPU0 has 60.0 GiB free (used by pid 4242, not started by the gateway)",
        ),
        (
            needs(memory_fraction=0.5),
            [gpu(0, H100, 30.0), gpu(1, 24.0, 10.0)],
            {1: ["small"]},
            "model 'big' needs 1 GPU with 50% of memory free (gpu.memory_fraction 0.5); "
            "GPU0 has 30.0 GiB free of 80.0 GiB, needs 40.0 GiB; "
            "GPU1 has 10.0 GiB free of 24.0 GiB, needs 12.0 GiB (used by small)",
        ),
        (
            needs(),
            [],
            {},
            "model 'big' needs a GPU but none is usable: no GPU was found on this machine",
        ),
    ],
)
def test_place_refuses_with_a_message_naming_what_is_missing(
    want: GpuNeeds, snapshot: list[GpuInfo], owners: dict[int, list[str]], message: str
) -> None:
    with pytest.raises(PlacementFailed) as caught:
        place("big", want, "vllm", snapshot, owners)
    assert caught.value.message == message
    assert caught.value.model == "big"


def test_no_nvml_message_carries_the_inventory_reason() -> None:
    reason = "NVML not available: libnvidia-ml.so.1 not found (no NVIDIA driver)"
    with pytest.raises(PlacementFailed) as caught:
        place("x", needs(), "vllm", [], {}, unusable_reason=reason)
    assert caught.value.message == f"model 'x' needs a GPU but none is usable: {reason}"


def test_placement_failure_is_a_503_model_unavailable_with_its_own_code() -> None:
    error = PlacementFailed("m", "no room")
    assert isinstance(error, ModelUnavailable)
    assert error.code == "insufficient_gpu"


def test_memory_gib_is_the_whole_need_and_memory_fraction_applies_without_it() -> None:
    """vLLM is started with memory_gib's share of the GPU when memory_gib is set (see
    commands.gpu_memory_utilization), so a small model fits beside others on a big card."""
    small = needs(memory_gib=10, memory_fraction=0.9)
    card = gpu(0, H100, 40.0)
    assert required_bytes(small, card) == 10 * GIB
    assert required_bytes(needs(memory_gib=75), card) == 75 * GIB
    assert required_bytes(needs(memory_fraction=0.9), card) == int(0.9 * H100 * GIB)
    assert place("m", small, "vllm", [card], {}) == Placement([0])
    with pytest.raises(PlacementFailed, match=r"72\.0 GiB free \(gpu\.memory_fraction 0\.9"):
        place("m", needs(), "vllm", [card], {})


def test_placement_is_deterministic() -> None:
    shuffled = [MIXED[2], MIXED[0], MIXED[1]]
    want = needs(memory_gib=20, memory_fraction=0.1)
    assert place("m", want, "vllm", shuffled, {}) == place("m", want, "vllm", MIXED, {}) == Placement([1])


# -- inventories -----------------------------------------------------------------------------


def test_nvml_on_a_machine_without_a_driver_reports_why_and_does_not_raise() -> None:
    inventory = NvmlInventory()
    assert inventory.snapshot() == []
    assert inventory.available is False
    assert inventory.reason.startswith("NVML not available: ")
    assert "libnvidia-ml.so.1" in inventory.reason or "nvidia-ml-py" in inventory.reason
    assert memory_released(inventory, [0], [1234]), "nothing to wait for without NVML"
    inventory.close()


def test_static_inventory_snapshot_and_unavailable_state() -> None:
    assert StaticInventory(list(MIXED)).snapshot() == MIXED
    off = StaticInventory(list(MIXED), available=False, reason="gpus: off")
    assert off.snapshot() == []
    assert off.reason == "gpus: off"


def test_memory_released_checks_only_our_pids_on_our_gpus() -> None:
    inventory = StaticInventory([gpu(0, H100, 10.0, 100, 101), gpu(1, H100, 70.0, 555)])
    assert not memory_released(inventory, [0], [101])
    assert memory_released(inventory, [1], [101]), "our pid is not on the GPU we asked about"
    assert memory_released(inventory, [0, 1], [999]), "other people's processes do not count"
    assert not memory_released(inventory, [1], [555, 7])


class FlakyInventory:
    """NVML that worked at start but fails on this query."""

    def __init__(self) -> None:
        self.available = True
        self.reason = ""

    def snapshot(self) -> list[GpuInfo]:
        self.available, self.reason = False, "NVML query failed: GPU is lost"
        return []


def test_memory_released_is_not_confirmed_when_the_query_fails() -> None:
    assert not memory_released(FlakyInventory(), [0], [1])


class FakeNvml(types.ModuleType):
    """Just enough of pynvml to drive NvmlInventory's reading path without a driver."""

    class NVMLError(Exception):
        pass

    class NVMLError_LibraryNotFound(NVMLError):
        pass

    def __init__(self) -> None:
        super().__init__("pynvml")
        self.shut = False

    def nvmlInit(self) -> None:
        pass

    def nvmlShutdown(self) -> None:
        self.shut = True

    def nvmlDeviceGetCount(self) -> int:
        return 2

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetName(self, handle: int) -> str | bytes:
        return b"NVIDIA H100" if handle == 0 else "NVIDIA L4"

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> types.SimpleNamespace:
        return types.SimpleNamespace(total=80 * GIB, free=(10 + handle) * GIB, used=(70 - handle) * GIB)

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> types.SimpleNamespace:
        if handle == 1:
            raise self.NVMLError("Not Supported")
        return types.SimpleNamespace(gpu=37, memory=12)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> list[types.SimpleNamespace]:
        if handle == 1:
            raise self.NVMLError("Not Supported")
        return [
            types.SimpleNamespace(pid=11, usedGpuMemory=5 * GIB),
            types.SimpleNamespace(pid=12, usedGpuMemory=None),
        ]


def test_nvml_inventory_reads_gpus_and_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    inventory = NvmlInventory()
    assert inventory.available, inventory.reason
    first, second = inventory.snapshot()
    assert first == GpuInfo(
        0,
        "NVIDIA H100",
        80 * GIB,
        10 * GIB,
        70 * GIB,
        (GpuProcess(11, 5 * GIB), GpuProcess(12, None)),
        utilization=0.37,
    )
    assert (second.index, second.name, second.free_bytes, second.processes) == (1, "NVIDIA L4", 11 * GIB, ())
    assert second.utilization is None  # not supported there: unknown, not 0
    assert not memory_released(inventory, [0], [12])
    assert memory_released(inventory, [1], [12])
    inventory.close()
    assert fake.shut


def test_nvml_inventory_reports_a_failed_query_and_recovers(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    inventory = NvmlInventory()

    def lost() -> int:
        raise fake.NVMLError("GPU is lost")

    monkeypatch.setattr(fake, "nvmlDeviceGetCount", lost)
    assert inventory.snapshot() == []
    assert not inventory.available
    assert inventory.reason == "NVML query failed: GPU is lost"
    monkeypatch.setattr(fake, "nvmlDeviceGetCount", lambda: 1)
    assert len(inventory.snapshot()) == 1
    assert inventory.available


def test_nvml_init_failure_other_than_a_missing_library_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeNvml()

    def no_driver() -> None:
        raise fake.NVMLError("Driver Not Loaded")

    monkeypatch.setattr(fake, "nvmlInit", no_driver)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    inventory = NvmlInventory()
    assert inventory.snapshot() == []
    assert (inventory.available, inventory.reason) == (False, "NVML not available: Driver Not Loaded")
