"""Admin endpoints (role admin): models and queues."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from app.api.deps import AdminDep, GatewayDep
from app.queue.jobs import JobState

router = APIRouter(prefix="/admin")


@router.get("/models")
async def models(gw: GatewayDep, _: AdminDep) -> dict[str, Any]:
    assert gw.engines is not None
    now = gw.clock.now()
    answer: dict[str, Any] = {}
    for name, engine in gw.engines.engines.items():
        ready = engine.state.value == "ready"
        answer[name] = {
            "name": name,
            "kind": engine.settings.kind,
            "status": engine.state.value,
            "reason": engine.reason or None,
            "aliases": engine.settings.aliases,
            "served_name": engine.served_name,
            "port": engine.port or None,
            "pid": engine.process.pid if engine.process else None,
            "started_at": engine.started_at.isoformat() if engine.started_at else None,
            "uptime_seconds": round((now - engine.ready_at).total_seconds(), 1)
            if ready and engine.ready_at
            else 0,
            "is_healthy": ready,
            "resolution": None,  # OCR models report their default resolution (OCR issue)
            "max_concurrent": engine.settings.max_concurrent,
            "max_waiting": engine.settings.max_waiting,
        }
    return answer


@router.get("/queue/{model}")
async def queue_stats(model: str, gw: GatewayDep, _: AdminDep) -> dict[str, Any]:
    assert gw.queue is not None
    name = gw.registry.resolve(model)
    cfg = gw.registry.models[name]
    active = await gw.queue.store.active(name)
    processing = sum(1 for d in active if d["state"] == JobState.RUNNING.value)
    waiting_docs = [d for d in active if d["state"] == JobState.QUEUED.value]
    by_priority = {
        p: sum(1 for d in waiting_docs if d.get("priority") == p) for p in ("high", "normal", "low")
    }
    assert gw.counters is not None
    totals = await gw.counters.totals(name)
    return {
        "model": name,
        "processing": processing,
        "waiting": len(waiting_docs),
        "waiting_by_priority": by_priority,
        "max_concurrent": cfg.max_concurrent,
        "max_waiting": cfg.max_waiting,
        "capacity": {"primary": cfg.max_concurrent, "secondary": cfg.max_waiting},
        "utilization": round(processing / cfg.max_concurrent, 4),
        # totals since the model's counters were created (all instances), not only 15 days
        "total_processed": totals["succeeded"],
        "total_failed": totals["failed"],
        "total_timeout": totals["expired"] + totals["timeouts"],
        "failed": totals["failed"],
        "expired": totals["expired"],
        "cancelled": totals["cancelled"],
        "retries": totals["retries"],
    }
