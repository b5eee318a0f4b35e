"""How engines and GPUs are shown: the public summary on /health and the /admin/gpus view."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from app.engines.claims import holdings
from app.engines.gpus import GIB
from app.engines.lifecycle import EngineState
from app.engines.manager import EngineManager
from app.engines.placement import gpu_owners


def engines_summary(engines: EngineManager, now: datetime) -> dict[str, dict[str, Any]]:
    """Public (unauthenticated /health): states only, no log lines, pids or URLs."""
    return {
        name: {
            "state": e.state.value,
            "kind": e.settings.kind,
            **({"loading_seconds": e.loading_seconds(now)} if e.state == EngineState.STARTING else {}),
        }
        for name, e in engines.engines.items()
    }


def gpus_view(engines: EngineManager) -> dict[str, Any]:
    """Each GPU with its memory, the models placed on it and its processes (blocking: NVML)."""
    owners = gpu_owners(holdings(engines.engines.values()))
    pids = {e.pid: e.name for e in engines.engines.values() if e.pid is not None}
    inventory = engines.inventory
    gpus = [
        {
            "index": gpu.index,
            "name": gpu.name,
            "total_gib": round(gpu.total_bytes / GIB, 2),
            "free_gib": round(gpu.free_bytes / GIB, 2),
            "used_gib": round(gpu.used_bytes / GIB, 2),
            "models": owners.get(gpu.index, []),
            "processes": [
                {
                    "pid": p.pid,
                    "used_gib": None if p.used_bytes is None else round(p.used_bytes / GIB, 2),
                    "model": pids.get(p.pid),
                }
                for p in gpu.processes
            ],
        }
        for gpu in inventory.snapshot()
    ]
    return {"available": inventory.available, "reason": inventory.reason or None, "gpus": gpus}
