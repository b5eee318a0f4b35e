"""Who may call: users, API keys, and the audit log of admin actions (role admin)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from app.api.deps import AdminDep, ServicesDep
from app.errors import InvalidRequest

router = APIRouter(prefix="/admin")


def _user_view(doc: dict[str, Any]) -> dict[str, Any]:
    return {
        "username": doc["_id"],
        "role": doc["role"],
        "disabled": bool(doc.get("disabled")),
        "created_at": doc["created_at"].isoformat() if doc.get("created_at") else None,
    }


class NewUser(BaseModel):
    model_config = ConfigDict(extra="forbid")
    username: str = Field(..., min_length=1, max_length=64)
    password: str = Field(..., min_length=12, max_length=1024)
    role: Literal["admin", "client"] = "client"


class UserChange(BaseModel):
    model_config = ConfigDict(extra="forbid")
    disabled: bool | None = None
    role: Literal["admin", "client"] | None = None
    password: str | None = Field(None, min_length=12, max_length=1024)


@router.get("/users")
async def list_users(svc: ServicesDep, _: AdminDep) -> list[dict[str, Any]]:
    return [_user_view(doc) for doc in await svc.users.list()]


@router.post("/users", status_code=201)
async def create_user(body: NewUser, svc: ServicesDep, admin: AdminDep) -> dict[str, Any]:
    doc = await svc.users.create(body.username, body.password, body.role)
    await svc.audit.record(admin.subject, "user.create", body.username, role=body.role)
    return _user_view(doc)


@router.patch("/users/{username}")
async def change_user(username: str, body: UserChange, svc: ServicesDep, admin: AdminDep) -> dict[str, Any]:
    """Disable or enable, change the role, reset the password. Tokens of a disabled user, or
    issued for the old role, stop working (within seconds on other instances)."""
    doc = None
    if body.password is not None:
        doc = await svc.users.reset_password(username, body.password)
        await svc.audit.record(admin.subject, "user.reset_password", username)
    if body.disabled is not None or body.role is not None:
        doc = await svc.users.update(username, disabled=body.disabled, role=body.role)
        await svc.audit.record(admin.subject, "user.update", username, disabled=body.disabled, role=body.role)
    if doc is None:
        raise InvalidRequest("nothing to change: send disabled, role and/or password", param="disabled")
    return _user_view(doc)


class NewKey(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(..., min_length=1, max_length=64)
    role: Literal["admin", "client"] = "client"
    models: list[str] | None = Field(None, description="model names or aliases; none = all models")
    expires_at: AwareDatetime | None = Field(None, description="with a time zone, e.g. 2030-01-01T00:00:00Z")
    rate_limit_per_minute: int | None = Field(None, ge=1, le=1_000_000)


@router.post("/api-keys", status_code=201)
async def create_key(body: NewKey, svc: ServicesDep, admin: AdminDep) -> dict[str, Any]:
    """The key is in this answer only; the gateway keeps its hash."""
    models = sorted({svc.registry.resolve(m) for m in body.models}) if body.models else None
    key, record = await svc.api_keys.create(
        body.name, body.role, admin.subject, models, body.expires_at, body.rate_limit_per_minute
    )
    await svc.audit.record(admin.subject, "api_key.create", body.name, role=body.role, models=models)
    return {**record, "key": key}


@router.get("/api-keys")
async def list_keys(svc: ServicesDep, _: AdminDep) -> list[dict[str, Any]]:
    return await svc.api_keys.list()


@router.delete("/api-keys/{key_id}")
async def revoke_key(key_id: str, svc: ServicesDep, admin: AdminDep) -> dict[str, Any]:
    record = await svc.api_keys.revoke(key_id)
    await svc.audit.record(admin.subject, "api_key.revoke", record["name"], id=key_id)
    return record


@router.get("/audit")
async def audit(
    svc: ServicesDep,
    _: AdminDep,
    actor: Annotated[str | None, Query(max_length=64)] = None,
    action: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[dict[str, Any]]:
    return await svc.audit.recent(actor=actor, action=action, limit=limit)
