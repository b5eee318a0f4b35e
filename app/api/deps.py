"""Request-scoped dependencies: the services, the caller's identity, validated headers.

All `async def`: FastAPI runs plain `def` dependencies in a thread pool, which cost four
thread hops per request here for work that never blocks.
"""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import Depends, Header, Request

from app.auth.tokens import Principal
from app.errors import AuthenticationFailed, InvalidRequest, PermissionDenied
from app.gateway import Gateway

_CLIENT_ID = re.compile(r"^[A-Za-z0-9._:@-]{1,64}$")
_IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,128}$")


async def gateway(request: Request) -> Gateway:
    gw: Gateway = request.app.state.gateway
    return gw


GatewayDep = Annotated[Gateway, Depends(gateway)]


async def principal(request: Request, gw: GatewayDep) -> Principal:
    header = request.headers.get("authorization")
    if not header:
        raise AuthenticationFailed("missing Authorization header (expected: Bearer <token>)")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationFailed("Authorization header must be: Bearer <token>")
    return gw.tokens.verify(token.strip())


PrincipalDep = Annotated[Principal, Depends(principal)]


async def admin(user: PrincipalDep) -> Principal:
    if not user.is_admin:
        raise PermissionDenied("this endpoint needs the admin role")
    return user


AdminDep = Annotated[Principal, Depends(admin)]


async def client_id(x_client_id: Annotated[str | None, Header()] = None) -> str:
    if x_client_id is None or not x_client_id.strip():
        raise InvalidRequest("X-Client-ID header is required (your application's name)", param="X-Client-ID")
    if not _CLIENT_ID.match(x_client_id):
        raise InvalidRequest(
            "X-Client-ID must be 1-64 characters of letters, digits and . _ : @ -", param="X-Client-ID"
        )
    return x_client_id


async def optional_client_id(x_client_id: Annotated[str | None, Header()] = None) -> str | None:
    """/v1 clients (the OpenAI SDK) do not send X-Client-ID; when one is sent it is checked."""
    return None if x_client_id is None else await client_id(x_client_id)


async def idempotency_key(idempotency_key: Annotated[str | None, Header()] = None) -> str | None:
    if idempotency_key is None:
        return None
    if not _IDEMPOTENCY_KEY.match(idempotency_key):
        raise InvalidRequest(
            "Idempotency-Key must be 1-128 printable ASCII characters", param="Idempotency-Key"
        )
    return idempotency_key
