"""Admin endpoints (role admin): engines (start, stop, logs, crashes, GPUs) and queues."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query

from app.api.deps import AdminDep, ServicesDep
from app.api.engine_views import gpus_view
from app.engines.lifecycle import EngineRecord, EngineState
from app.engines.process import log_tail, tree_rss_bytes
from app.queue.job import Job, JobState
from app.services import Services

router = APIRouter(prefix="/admin")


def _model_view(
    svc: Services, engine: EngineRecord, processing: int, waiting: int, resolution: str
) -> dict[str, Any]:
    now = svc.clock.now()
    ready = engine.state == EngineState.READY
    return {
        "name": engine.name,
        "kind": engine.settings.kind,
        "status": engine.state.value,
        "state": engine.state.value,
        "reason": engine.reason or None,
        "last_error": engine.last_error,
        "aliases": engine.settings.aliases,
        "served_name": engine.served_name,
        "port": (engine.port or None) if engine.process is not None else None,  # no process, no port
        # external upstreams (kind openai): where requests go, and when its health was last seen
        "url": engine.settings.url,
        "last_check_at": engine.last_check_at.isoformat() if engine.last_check_at else None,
        "pid": engine.pid,
        "gpus": engine.gpus,
        "adopted": engine.adopted,
        "on_demand": engine.settings.on_demand,
        "started_at": engine.started_at.isoformat() if engine.started_at else None,
        "uptime_seconds": round((now - engine.ready_at).total_seconds(), 1)
        if ready and engine.ready_at
        else 0,
        "load_seconds": engine.load_seconds,
        "memory_rss_bytes": tree_rss_bytes(engine.pid),
        "loading_seconds": engine.loading_seconds(now),
        "is_healthy": ready,
        "processing": processing,
        "waiting": waiting,
        # OCR engines: the resolution a request without X-Resolution gets (older clients read it)
        "resolution": resolution if engine.settings.kind in ("cpu_ocr", "deepseek_ocr") else None,
        "max_concurrent": engine.settings.max_concurrent,
        "max_waiting": engine.settings.max_waiting,
    }


async def _occupancy(svc: Services) -> dict[str, tuple[int, int]]:
    """Model -> (running, queued) jobs now."""
    live = await svc.queue.store.occupancy()
    return {
        name: (live.of(name, JobState.RUNNING), live.of(name, JobState.QUEUED))
        for name in svc.registry.models
    }


async def _default_resolution(svc: Services) -> str:
    return await svc.ocr.default_resolution.get()


@router.get("/models")
async def models(svc: ServicesDep, _: AdminDep) -> dict[str, Any]:
    """Keyed by model name (the shape clients of the system we re-implement read)."""
    counts = await _occupancy(svc)
    resolution = await _default_resolution(svc)
    return {
        name: _model_view(svc, engine, *counts.get(name, (0, 0)), resolution)
        for name, engine in svc.engines.engines.items()
    }


@router.post("/models/{model:path}/start", status_code=202)
async def start_model(model: str, svc: ServicesDep, admin: AdminDep, wait: bool = False) -> dict[str, Any]:
    """202 at once (a vLLM load takes minutes; poll GET /admin/models/{m}); `wait=true` blocks
    until ready, and a load that fails answers 503 engine_start_failed with the reason. A start
    of a loading model joins it; of a ready one is a no-op."""
    name = svc.registry.resolve(model)
    try:
        engine = await svc.engines.start(name, wait=wait)
    finally:
        state = svc.engines.get(name).state.value
        await svc.audit.record(admin.subject, "model.start", name, state=state)
    return {
        "status": "started",
        "model": name,
        "state": engine.state.value,
        "reason": engine.reason or None,
        "gpus": engine.gpus,
        "port": engine.port or None,
        "pid": engine.pid,
    }


@router.post("/models/{model:path}/stop")
async def stop_model(
    model: str,
    svc: ServicesDep,
    user: AdminDep,
    force: bool = False,
    graceful: bool | None = None,
) -> dict[str, Any]:
    """A busy model is refused (409) unless `graceful=true` (let its jobs finish, up to the
    grace period) or `force=true` / `graceful=false` (cancel them now)."""
    name = svc.registry.resolve(model)
    forced = force or graceful is False
    outcome = await svc.engines.stop(
        name, force=forced, drain=graceful is True, reason=f"stopped by {user.subject}"
    )
    await svc.audit.record(user.subject, "model.stop", name, force=forced, drain=graceful is True)
    return {"status": "stopped", "model": name, "force": forced, **outcome}


@router.get("/models/{model:path}/logs")
async def model_logs(
    model: str, svc: ServicesDep, _: AdminDep, lines: Annotated[int, Query(ge=1, le=5000)] = 100
) -> dict[str, Any]:
    name = svc.registry.resolve(model)
    path = svc.engines.log_path(name)
    text = await asyncio.to_thread(log_tail, path, lines, 4 * 1024 * 1024)
    return {"model": name, "lines": text.splitlines(), "path": str(path)}


# `{model:path}`: names and aliases may hold '/' (hub ids such as deepseek-ai/DeepSeek-OCR, which
# clients of the system we re-implement put in these paths). The generic GET comes after
# /logs, or it would take ".../logs" for a model name.
@router.get("/models/{model:path}")
async def model(model: str, svc: ServicesDep, _: AdminDep) -> dict[str, Any]:
    name = svc.registry.resolve(model)
    counts = (await _occupancy(svc)).get(name, (0, 0))
    return _model_view(svc, svc.engines.get(name), *counts, await _default_resolution(svc))


@router.get("/crashes")
async def crashes(
    svc: ServicesDep,
    _: AdminDep,
    model: str | None = None,
    since: datetime | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[dict[str, Any]]:
    """Newest first; `timestamp`, `error`, `request_id`, `stack_trace` are the older clients' names."""
    name = svc.registry.resolve(model) if model else None
    docs = await svc.engines.crash_log.recent(name, since, limit)
    return [
        {
            "id": str(doc["_id"]),
            "timestamp": doc["at"].isoformat(),
            "model": doc["model"],
            "error": doc["reason"],
            "exit_code": doc.get("exit_code"),
            "signal": doc.get("signal"),
            "pid": doc.get("pid"),
            "jobs_affected": doc.get("jobs_affected", []),
            "request_id": (doc.get("jobs_affected") or [None])[0],
            "restart": doc.get("restart"),
            "stack_trace": doc.get("log_tail", ""),
        }
        for doc in docs
    ]


@router.get("/gpus")
async def gpus(svc: ServicesDep, _: AdminDep) -> dict[str, Any]:
    return await asyncio.to_thread(gpus_view, svc.engines)


@router.get("/queue/{model:path}")
async def queue_stats(model: str, svc: ServicesDep, _: AdminDep) -> dict[str, Any]:
    name = svc.registry.resolve(model)
    cfg = svc.registry.models[name]
    active = await svc.queue.store.active(name)
    processing = sum(1 for j in active if j.state == JobState.RUNNING)
    waiting = [j for j in active if j.state == JobState.QUEUED]
    by_priority = {p: sum(1 for j in waiting if j.priority == p) for p in ("high", "normal", "low")}
    totals = await svc.counters.totals(name)
    return {
        "model": name,
        "processing": processing,
        "waiting": len(waiting),
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
        "clients": _clients_view(svc, name, active),
    }


def _clients_view(svc: Services, model: str, active: list[Job], top: int = 10) -> list[dict[str, Any]]:
    """Who holds the queue: each client's running and waiting jobs and its fair-share cap, the
    largest holders first (top N)."""
    cfg = svc.registry.models[model]
    capacity = cfg.max_concurrent + cfg.max_waiting
    held: dict[tuple[str, str], list[int]] = {}
    for job in active:
        counts = held.setdefault((job.owner, job.client_id), [0, 0])
        counts[0 if job.state == JobState.RUNNING else 1] += 1
    ranked = sorted(held.items(), key=lambda item: (-sum(item[1]), item[0]))[:top]
    return [
        {
            "client_id": client,
            "owner": owner,
            "processing": running,
            "waiting": waiting,
            "max_places": svc.queue.share_gate.cap(model, capacity, client, owner),
        }
        for (owner, client), (running, waiting) in ranked
    ]
