"""Which GPUs an engine gets, decided from a snapshot before anything is spawned (pure).

A start that cannot fit must fail here, with a message that names what is missing and who
holds it, rather than minutes later inside vLLM with "Free memory on device ... is less than
desired GPU memory utilization".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from app.engines.commands import engine_needs_gpu
from app.engines.gpus import GIB, GpuInfo
from app.errors import PlacementFailed
from app.settings import EngineKind, GpuNeeds, ModelSettings


def uses_gpu(settings: ModelSettings) -> bool:
    """GPU kinds always; any other kind only if its config asks for GPUs (tests emulate that)."""
    if engine_needs_gpu(settings.kind):
        return settings.gpu.count > 0
    return "gpu" in settings.model_fields_set and settings.gpu.count > 0


@dataclass(frozen=True)
class Placement:
    """The GPU indices (NVML order, ascending) the engine will see; [] for a CPU engine."""

    gpus: list[int]


def place(
    model_name: str,
    needs: GpuNeeds,
    kind: EngineKind,
    inventory_snapshot: list[GpuInfo],
    owners: dict[int, list[str]],
    *,
    unusable_reason: str = "",
) -> Placement:
    """Choose `needs.count` GPUs for the model, or raise PlacementFailed saying why not.

    `owners` maps a GPU index to the gateway models running on it, so the message can say
    whose engine to stop. `unusable_reason` is the inventory's reason (pass it always; it is
    "" when GPUs are readable). Best fit: of the GPUs that fit, the ones with the least free
    memory, so GPUs with room stay free for the big models; ties go to the lower index, so the
    same state always gives the same answer. `needs.devices` restricts the candidates.

    CPU kinds and `count: 0` get no GPUs. A stub is placed like the GPU engine it stands in
    for; whether to place stubs at all (e.g. only with a fake inventory) is the caller's
    choice, since stubs must keep running on machines without GPUs.
    """
    if needs.count == 0 or not (engine_needs_gpu(kind) or kind == "stub"):
        return Placement([])
    if unusable_reason:
        raise PlacementFailed(
            model_name,
            f"model {model_name!r} needs {_some(needs.count)} but none is usable: {unusable_reason}",
        )
    by_index = {gpu.index: gpu for gpu in inventory_snapshot}
    candidates = _candidates(model_name, needs, by_index)
    fitting = [gpu for gpu in candidates if gpu.free_bytes >= required_bytes(needs, gpu)]
    if len(fitting) < needs.count:
        message = _memory_message(model_name, needs, candidates, fitting, owners)
        raise PlacementFailed(model_name, message)
    chosen = sorted(fitting, key=lambda gpu: (gpu.free_bytes, gpu.index))[: needs.count]
    return Placement(sorted(gpu.index for gpu in chosen))


@dataclass(frozen=True)
class Holding:
    """One of the gateway's engines on GPUs: what placement counts as taken besides the snapshot.

    `pids` is its process tree now: the memory those processes hold is already in the snapshot's
    numbers, the rest of its reservation is not yet (a vLLM engine still loading).
    """

    name: str
    gpus: list[int]
    needs: GpuNeeds
    pids: frozenset[int] = frozenset()


def gpu_owners(holdings: list[Holding], exclude: str | None = None) -> dict[int, list[str]]:
    """GPU index -> the models running on it (named in placement's refusals and /admin/gpus)."""
    owners: dict[int, list[str]] = {}
    for holding in holdings:
        if holding.name != exclude:
            for index in holding.gpus:
                owners.setdefault(index, []).append(holding.name)
    return owners


def effective_inventory(
    snapshot: list[GpuInfo], holdings: list[Holding], exclude: str | None = None
) -> list[GpuInfo]:
    """The snapshot's free memory, less what our engines reserved but do not hold yet.

    A vLLM engine that is still loading holds little memory yet; without this, two starts
    a second apart would both see the GPU free and the second would fail to load. Memory
    the engine's processes already hold is in the snapshot's numbers, so only the rest
    of its reservation is taken off.
    """
    pending: dict[int, int] = {}
    for holding in holdings:
        if holding.name == exclude:
            continue
        for gpu in snapshot:
            if gpu.index in holding.gpus:
                held = sum(p.used_bytes or 0 for p in gpu.processes if p.pid in holding.pids)
                need = required_bytes(holding.needs, gpu)
                pending[gpu.index] = pending.get(gpu.index, 0) + max(0, need - held)
    adjusted = []
    for gpu in snapshot:
        free = max(0, gpu.free_bytes - pending.get(gpu.index, 0))
        adjusted.append(
            GpuInfo(gpu.index, gpu.name, gpu.total_bytes, free, gpu.total_bytes - free, gpu.processes)
        )
    return adjusted


def required_bytes(needs: GpuNeeds, gpu: GpuInfo) -> int:
    """Free memory the engine needs on `gpu` before it starts: memory_gib when set, else
    memory_fraction of the GPU's total.

    For vLLM kinds this is what its --gpu-memory-utilization asks for (vLLM refuses to start
    unless that share of the total is free, and pre-allocates it): the command line derives the
    share from memory_gib when it is set (commands.gpu_memory_utilization), so the two agree.
    """
    if needs.memory_gib is None:
        return math.ceil(needs.memory_fraction * gpu.total_bytes)
    return math.ceil(needs.memory_gib * GIB)


def _candidates(model_name: str, needs: GpuNeeds, by_index: dict[int, GpuInfo]) -> list[GpuInfo]:
    if not by_index:
        raise PlacementFailed(
            model_name,
            f"model {model_name!r} needs {_some(needs.count)} but none is usable: "
            "no GPU was found on this machine",
        )
    if needs.devices is None:
        if len(by_index) < needs.count:
            raise PlacementFailed(
                model_name,
                f"model {model_name!r} needs {_count(needs.count)}; this machine has {len(by_index)}",
            )
        return [by_index[index] for index in sorted(by_index)]
    pinned = list(dict.fromkeys(needs.devices))
    missing = [index for index in pinned if index not in by_index]
    if missing:
        which = "GPU" if len(missing) == 1 else "GPUs"
        verb = "does" if len(missing) == 1 else "do"
        raise PlacementFailed(
            model_name,
            f"model {model_name!r} is pinned to {which} {_indices(missing)}, which {verb} not exist "
            f"(this machine has {_inventory_names(by_index)})",
        )
    if len(pinned) < needs.count:
        raise PlacementFailed(
            model_name,
            f"model {model_name!r} needs {_count(needs.count)} but gpu.devices pins it to "
            f"{len(pinned)} ({_indices(pinned)})",
        )
    return [by_index[index] for index in pinned]


def _memory_message(
    model_name: str,
    needs: GpuNeeds,
    candidates: list[GpuInfo],
    fitting: list[GpuInfo],
    owners: dict[int, list[str]],
) -> str:
    wants = {required_bytes(needs, gpu) for gpu in candidates}
    each = " each" if needs.count > 1 else ""
    if len(wants) == 1:
        (want,) = wants
        need = f"{_count(needs.count)} with {_gib(want)} free{each}"
        if needs.memory_gib is None:
            need += f" (gpu.memory_fraction {needs.memory_fraction:g} of the whole GPU)"
    else:
        need = (
            f"{_count(needs.count)} with {needs.memory_fraction:.0%} of memory free{each} "
            f"(gpu.memory_fraction {needs.memory_fraction:g})"
        )
    short = [
        _describe(gpu, required_bytes(needs, gpu), owners, show_need=len(wants) > 1)
        for gpu in candidates
        if gpu not in fitting
    ]
    message = f"model {model_name!r} needs {need}; " + "; ".join(short)
    if fitting:
        names = ", ".join(f"GPU{gpu.index}" for gpu in fitting)
        message += f"; only {names} {'has' if len(fitting) == 1 else 'have'} enough"
    return message


def _describe(gpu: GpuInfo, want: int, owners: dict[int, list[str]], *, show_need: bool) -> str:
    text = f"GPU{gpu.index} has {_gib(gpu.free_bytes)} free"
    if show_need:
        text += f" of {_gib(gpu.total_bytes)}, needs {_gib(want)}"
    users = owners.get(gpu.index, [])
    if users:
        text += f" (used by {', '.join(users)})"
    elif gpu.processes:
        pids = ", ".join(str(proc.pid) for proc in gpu.processes)
        text += f" (used by pid {pids}, not started by the gateway)"
    return text


def _gib(size: int) -> str:
    return f"{size / GIB:.1f} GiB"


def _count(count: int) -> str:
    return f"{count} GPU" if count == 1 else f"{count} GPUs"


def _some(count: int) -> str:
    return "a GPU" if count == 1 else f"{count} GPUs"


def _indices(indices: list[int]) -> str:
    return ", ".join(str(index) for index in indices)


def _inventory_names(by_index: dict[int, GpuInfo]) -> str:
    return ", ".join(f"GPU{index}" for index in sorted(by_index))
