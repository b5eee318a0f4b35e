"""GET /metrics: the Prometheus text exposition (the metrics themselves: app/metrics.py).

Who may scrape is `metrics.auth`: `localhost` lets a Prometheus on the same host in without
credentials (the common single-box set-up) and asks anyone else for admin credentials or the
metrics token; `token` always asks; `open` never does. The token is a separate secret so a
scraper's config never holds an admin credential. Scrapes are not rate-limited: Prometheus
scrapes on a fixed period, and a 429 would only leave holes in the graphs.
"""

from __future__ import annotations

import hmac

from fastapi import APIRouter, Request, Response

from app.api.deps import GatewayDep, authenticate
from app.errors import NotFound, PermissionDenied
from app.gateway import Gateway
from app.metrics import CONTENT_TYPE

router = APIRouter()

_LOOPBACK = frozenset({"127.0.0.1", "::1", "::ffff:127.0.0.1"})


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE: {}}}})
async def metrics(request: Request, gw: GatewayDep) -> Response:
    """Prometheus text format: counters and histograms of this process, gauges read now."""
    if not gw.metrics.enabled:
        raise NotFound("metrics are off (metrics.enabled: false)")
    mode = gw.settings.metrics.auth
    local = request.client is not None and request.client.host in _LOOPBACK
    if mode == "token" or (mode == "localhost" and not local):
        await _authorize(request, gw)
    body = gw.metrics.render(await gw.metrics_state())
    return Response(body, media_type=CONTENT_TYPE)


async def _authorize(request: Request, gw: Gateway) -> None:
    """The metrics token, or admin credentials (a JWT or an API key of role admin)."""
    token = gw.settings.metrics.token
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if token and scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode()):
        return
    caller = await authenticate(request, gw)
    if not caller.is_admin:
        raise PermissionDenied("GET /metrics needs the admin role or the metrics token")
