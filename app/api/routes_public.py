"""Health and authentication: the endpoints a client calls before anything else."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Form, Request, Response
from pydantic import BaseModel, ConfigDict

from app.api.deps import ServicesDep
from app.api.engine_views import engines_summary
from app.errors import AuthenticationFailed

router = APIRouter()


@router.get("/health")
async def health(svc: ServicesDep, response: Response) -> dict[str, Any]:
    """503 while the database is down, so a load balancer sends traffic elsewhere; the verdict
    is the health loop's (at most `database.health_check_seconds` old), so this never waits."""
    state = svc.database_health
    body: dict[str, Any] = {
        "status": "healthy" if state.up else "unhealthy",
        "timestamp": svc.clock.now().isoformat(),
        "database": "ok" if state.up else "unreachable",
        "engines": engines_summary(svc.engines, svc.clock.now()),
    }
    if not state.up:
        response.status_code = 503
        body["database_error"] = {"reason": state.reason, "since": state.since.isoformat()}
    return body


def _token_answer(svc: ServicesDep, subject: str, role: str) -> dict[str, Any]:
    return {
        "access_token": svc.tokens.issue(subject, role),
        "token_type": "bearer",
        "expires_in": svc.tokens.access_ttl_s,
        "refresh_token": svc.tokens.issue(subject, role, "refresh"),
        "role": role,
    }


@router.post("/auth/token")
async def token(
    request: Request,
    svc: ServicesDep,
    username: Annotated[str, Form(min_length=1, max_length=64)],
    password: Annotated[str, Form(min_length=1, max_length=1024)],
) -> dict[str, Any]:
    """Throttled per (username, client address) and per address after repeated failures (429):
    a flood of wrong passwords slows its own address, not the owner logging in from elsewhere."""
    svc.database_health.require()
    address = request.client.host if request.client else "unknown"
    await svc.login_throttle.check(username, address)
    try:
        user = await svc.users.authenticate(username, password)
    except AuthenticationFailed:
        await svc.login_throttle.failed(username, address)
        raise
    await svc.login_throttle.succeeded(username, address)
    return _token_answer(svc, user.subject, user.role)


class RefreshRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    refresh_token: str


@router.post("/auth/refresh")
async def refresh(svc: ServicesDep, body: Annotated[RefreshRequest, Body()]) -> dict[str, Any]:
    claimed = svc.tokens.verify(body.refresh_token, use="refresh")
    svc.database_health.require()
    user = await svc.users.active_principal(claimed)
    if user.role != claimed.role:
        raise AuthenticationFailed("token is invalid")
    return _token_answer(svc, user.subject, user.role)
