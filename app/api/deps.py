"""Request-scoped dependencies: the services, the caller's identity, validated headers.

All `async def`: FastAPI runs plain `def` dependencies in a thread pool, which cost four
thread hops per request here for work that never blocks.
"""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import Depends, Header, Request

from app.api.hardening import RATE_LIMIT_STATE
from app.auth.api_keys import PREFIX as API_KEY_PREFIX
from app.auth.tokens import Principal
from app.errors import AuthenticationFailed, InvalidRequest, NotRunning, PermissionDenied
from app.gateway import Gateway
from app.services import Services

_CLIENT_ID = re.compile(r"^[A-Za-z0-9._:@-]{1,64}$")
_IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,128}$")


async def services(request: Request) -> Services:
    """The started services (app/services.py); 503 in the moments before start or after stop."""
    gateway: Gateway = request.app.state.gateway
    if gateway.services is None:
        raise NotRunning()
    return gateway.services


ServicesDep = Annotated[Services, Depends(services)]


async def principal(request: Request, svc: ServicesDep) -> Principal:
    """The caller, from a JWT or an API key (`Bearer agw_...` or `X-API-Key`), then counted
    against its rate limit. The X-RateLimit-* headers are left in the request's state for the
    Hardening middleware, which puts them on whatever answer the request gets: a JSON body, a
    Response a route builds itself (an event stream), or an error raised after this point."""
    caller = await authenticate(request, svc)
    state = svc.rate_limiter.hit(caller)
    if state is not None:
        setattr(request.state, RATE_LIMIT_STATE, state.headers())
    return caller


async def authenticate(request: Request, svc: Services) -> Principal:
    """Who the credentials name, without counting a request against a rate limit.

    Every caller is looked up in the database (the user or key may have been disabled), so a
    request is refused here, at once, while the database is known to be down."""
    svc.database_health.require()
    api_key = request.headers.get("x-api-key")
    header = request.headers.get("authorization")
    if api_key is not None:
        return await svc.api_keys.verify(api_key.strip())
    if not header:
        raise AuthenticationFailed(
            "missing credentials (expected: Authorization: Bearer <token or API key>, or X-API-Key)"
        )
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AuthenticationFailed("Authorization header must be: Bearer <token>")
    if token.startswith(API_KEY_PREFIX):
        return await svc.api_keys.verify(token)
    return await svc.users.check_token_holder(svc.tokens.verify(token))


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
