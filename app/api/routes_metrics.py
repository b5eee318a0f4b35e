"""GET /metrics: the Prometheus text exposition (the metrics themselves: app/prometheus.py).

Who may scrape is `metrics.auth`: `localhost` lets a Prometheus on the same host in without
credentials (the common single-box set-up) and asks anyone else for admin credentials or the
metrics token; `token` always asks; `open` never does. The token is a separate secret so a
scraper's config never holds an admin credential. Scrapes are not rate-limited: Prometheus
scrapes on a fixed period, and a 429 would only leave holes in the graphs.
"""

from __future__ import annotations

import asyncio
import hmac
import logging

from fastapi import APIRouter, Request, Response

from app.api.deps import ServicesDep, authenticate
from app.errors import NotFound, PermissionDenied
from app.logs import event
from app.prometheus import CONTENT_TYPE, GatewayState, PrometheusMetrics
from app.services import Services

router = APIRouter()
log = logging.getLogger("gateway.api")

_LOOPBACK = frozenset({"127.0.0.1", "::1", "::ffff:127.0.0.1"})


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE: {}}}})
async def metrics(request: Request, svc: ServicesDep) -> Response:
    """Prometheus text format: counters and histograms of this process, gauges read now."""
    if not isinstance(svc.metrics, PrometheusMetrics):
        raise NotFound("metrics are off (metrics.enabled: false)")
    mode = svc.settings.metrics.auth
    local = request.client is not None and request.client.host in _LOOPBACK
    if mode == "token" or (mode == "localhost" and not local):
        await _authorize(request, svc)
    body = svc.metrics.render(await _state(svc))  # the adapter's exposition
    return Response(body, media_type=CONTENT_TYPE)


async def _state(svc: Services) -> GatewayState:
    """What the gauges show now: the shared queue's depth (one read of the active jobs, at most
    max_concurrent + max_waiting per model), this instance's in-flight calls, engine states,
    and GPUs where the inventory reports them (NVML off the event loop)."""
    depth: dict[tuple[str, str], int] | None = None
    try:
        depth = (await svc.queue.store.occupancy()).queued_by_priority()
    except Exception as exc:  # the database being away must not fail the whole scrape
        event(log, "metrics.queue_depth_failed", logging.WARNING, error=repr(exc))
    return GatewayState(
        queue_depth=depth,
        in_flight={name: d.in_flight for name, d in svc.dispatchers.items()},
        engine_states={n: e.state.value for n, e in svc.engines.engines.items()},
        gpus=await asyncio.to_thread(svc.engines.inventory.snapshot),
    )


async def _authorize(request: Request, svc: Services) -> None:
    """The metrics token, or admin credentials (a JWT or an API key of role admin)."""
    token = svc.settings.metrics.token
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if token and scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode()):
        return
    caller = await authenticate(request, svc)
    if not caller.is_admin:
        raise PermissionDenied("GET /metrics needs the admin role or the metrics token")
