"""Health and authentication: the endpoints a client calls before anything else."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Form, Request
from pydantic import BaseModel, ConfigDict

from app.api.deps import GatewayDep
from app.api.engine_views import engines_summary
from app.errors import AuthenticationFailed

router = APIRouter()


@router.get("/health")
async def health(gw: GatewayDep) -> dict[str, Any]:
    database_ok = gw.database is not None and await gw.database.ping()
    return {
        "status": "healthy" if database_ok else "unhealthy",
        "timestamp": gw.clock.now().isoformat(),
        "database": "ok" if database_ok else "unreachable",
        "engines": engines_summary(gw.engines, gw.clock.now()) if gw.engines else {},
    }


def _token_answer(gw: GatewayDep, subject: str, role: str) -> dict[str, Any]:
    return {
        "access_token": gw.tokens.issue(subject, role),
        "token_type": "bearer",
        "expires_in": gw.tokens.access_ttl_s,
        "refresh_token": gw.tokens.issue(subject, role, "refresh"),
        "role": role,
    }


@router.post("/auth/token")
async def token(
    request: Request,
    gw: GatewayDep,
    username: Annotated[str, Form(min_length=1, max_length=64)],
    password: Annotated[str, Form(min_length=1, max_length=1024)],
) -> dict[str, Any]:
    """Throttled per username and per client address after repeated failures (429)."""
    assert gw.users is not None
    address = request.client.host if request.client else "unknown"
    gw.login_throttle.check(username, address)
    try:
        user = await gw.users.authenticate(username, password)
    except AuthenticationFailed:
        gw.login_throttle.failed(username, address)
        raise
    gw.login_throttle.succeeded(username)
    return _token_answer(gw, user.subject, user.role)


class RefreshRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    refresh_token: str


@router.post("/auth/refresh")
async def refresh(gw: GatewayDep, body: Annotated[RefreshRequest, Body()]) -> dict[str, Any]:
    assert gw.users is not None
    claimed = gw.tokens.verify(body.refresh_token, use="refresh")
    user = await gw.users.active_principal(claimed)
    if user.role != claimed.role:
        raise AuthenticationFailed("token is invalid")
    return _token_answer(gw, user.subject, user.role)
