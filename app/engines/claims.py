"""The GPUs our engines hold or are taking, and the placement of a new one against them.

Apart from the pure placement (app/engines/placement.py) because this part reads the live
process trees (psutil) to tell memory an engine already holds from memory it reserved.
"""

from __future__ import annotations

from collections.abc import Iterable

from app.engines import process as proc
from app.engines.gpus import GpuInfo, GpuInventory
from app.engines.lifecycle import EngineRecord
from app.engines.placement import Holding, effective_inventory, gpu_owners, place, uses_gpu


def holdings(engines: Iterable[EngineRecord], *, with_pids: bool = False) -> list[Holding]:
    """Our engines with a process on GPUs (`with_pids`: their process trees, for placement)."""
    return [
        Holding(
            e.name, e.gpus, e.settings.gpu, frozenset(proc.tree_pids(e.pid)) if with_pids else frozenset()
        )
        for e in engines
        if e.gpus and e.pid is not None
    ]


def place_engine(
    engine: EngineRecord, engines: Iterable[EngineRecord], inventory: GpuInventory
) -> list[GpuInfo]:
    """The GPUs the engine gets (their sizes too: the vLLM command line needs them), or
    PlacementFailed naming what is missing and who holds it."""
    if not uses_gpu(engine.settings):
        return []
    held = holdings(engines, with_pids=True)
    snapshot = effective_inventory(inventory.snapshot(), held, exclude=engine.name)
    placement = place(
        engine.name,
        engine.settings.gpu,
        engine.settings.kind,
        snapshot,
        gpu_owners(held, exclude=engine.name),
        unusable_reason="" if inventory.available else inventory.reason,
    )
    return [gpu for gpu in snapshot if gpu.index in placement.gpus]
