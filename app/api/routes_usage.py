"""Admin endpoints on demand (role admin): usage statistics, missing models, auto-switch."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict

from app.api.deps import AdminDep, GatewayDep
from app.gateway import AUTOSWITCH_JOB
from app.history.usage import parse_window

router = APIRouter(prefix="/admin")


class AutoSwitchToggle(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool


@router.get("/usage")
async def usage(
    gw: GatewayDep,
    _: AdminDep,
    window: Annotated[str, Query(max_length=20, description="e.g. 7d, 24h, 90m")] = "7d",
    model: Annotated[str | None, Query(max_length=128)] = None,
) -> dict[str, Any]:
    """Per model over whole hours of the window, from the hourly rollups (updated every
    `history.rollup_interval_seconds`; `rolled_at` says when)."""
    assert gw.usage is not None
    seconds = parse_window(window, gw.usage.retention_s)
    name = gw.registry.resolve(model) if model else None
    return await gw.usage.report(seconds, name)


@router.get("/missing-models")
async def missing_models(
    gw: GatewayDep,
    _: AdminDep,
    since: datetime | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[dict[str, Any]]:
    """Requests for unknown models (`configured: false`) and for configured models that were
    not loaded (`configured: true`), per model and client, newest first."""
    assert gw.missing is not None
    return await gw.missing.listing(since, limit)


@router.get("/autoswitch")
async def autoswitch(
    gw: GatewayDep, _: AdminDep, limit: Annotated[int, Query(ge=1, le=200)] = 20
) -> dict[str, Any]:
    assert gw.switcher is not None
    switcher = gw.switcher
    return {
        "enabled": switcher.enabled,
        "mode": switcher.config.mode,
        "interval_s": switcher.config.interval_s,
        "cooldown_s": switcher.config.cooldown_s,
        "models": switcher.eligible,
        "next_run": gw.scheduler.next_run(AUTOSWITCH_JOB) if switcher.enabled else None,
        "last_run": switcher.last_run,
        "decisions": await switcher.recent_decisions(limit),
    }


@router.post("/autoswitch")
async def set_autoswitch(body: AutoSwitchToggle, gw: GatewayDep, admin: AdminDep) -> dict[str, Any]:
    assert gw.switcher is not None and gw.audit is not None
    await gw.switcher.set_enabled(body.enabled)
    await gw.audit.record(admin.subject, "autoswitch.set", "autoswitch", enabled=body.enabled)
    return {"enabled": gw.switcher.enabled}


@router.post("/autoswitch/evaluate")
async def evaluate(gw: GatewayDep, _: AdminDep) -> dict[str, Any]:
    """Dry run: what auto-switch would do now, with its inputs and reasons; nothing applied."""
    assert gw.switcher is not None
    evaluation = await gw.switcher.evaluate("dry_run")
    return {"dry_run": True, "enabled": gw.switcher.enabled, **evaluation.as_dict()}
