"""Admin endpoints on demand (role admin): usage statistics, missing models, auto-switch."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict

from app.api.deps import AdminDep, ServicesDep
from app.gateway import AUTOSWITCH_JOB
from app.history.usage import parse_window

router = APIRouter(prefix="/admin")


class AutoSwitchToggle(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool


@router.get("/usage")
async def usage(
    svc: ServicesDep,
    _: AdminDep,
    window: Annotated[str, Query(max_length=20, description="e.g. 7d, 24h, 90m")] = "7d",
    model: Annotated[str | None, Query(max_length=128)] = None,
) -> dict[str, Any]:
    """Per model over whole hours of the window, from the hourly rollups (updated every
    `history.rollup_interval_seconds`; `rolled_at` says when)."""
    seconds = parse_window(window, svc.usage.retention_s)
    name = svc.registry.resolve(model) if model else None
    return await svc.usage.report(seconds, name)


@router.get("/missing-models")
async def missing_models(
    svc: ServicesDep,
    _: AdminDep,
    since: datetime | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[dict[str, Any]]:
    """Requests for unknown models (`configured: false`) and for configured models that were
    not loaded (`configured: true`), per model and client, newest first."""
    return await svc.missing.listing(since, limit)


@router.get("/autoswitch")
async def autoswitch(
    svc: ServicesDep, _: AdminDep, limit: Annotated[int, Query(ge=1, le=200)] = 20
) -> dict[str, Any]:
    switcher = svc.switcher
    return {
        "enabled": switcher.enabled,
        "mode": switcher.config.mode,
        "interval_s": switcher.config.interval_s,
        "cooldown_s": switcher.config.cooldown_s,
        "models": switcher.eligible,
        "next_run": svc.scheduler.next_run(AUTOSWITCH_JOB) if switcher.enabled else None,
        "last_run": switcher.last_run,
        "decisions": await switcher.recent_decisions(limit),
    }


@router.post("/autoswitch")
async def set_autoswitch(body: AutoSwitchToggle, svc: ServicesDep, admin: AdminDep) -> dict[str, Any]:
    await svc.switcher.set_enabled(body.enabled)
    await svc.audit.record(admin.subject, "autoswitch.set", "autoswitch", enabled=body.enabled)
    return {"enabled": svc.switcher.enabled}


@router.post("/autoswitch/evaluate")
async def evaluate(svc: ServicesDep, _: AdminDep) -> dict[str, Any]:
    """Dry run: what auto-switch would do now, with its inputs and reasons; nothing applied."""
    evaluation = await svc.switcher.evaluate("dry_run")
    return {"dry_run": True, "enabled": svc.switcher.enabled, **evaluation.as_dict()}
