"""Builds the FastAPI application around a Gateway; its lifespan starts and stops the services."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from app import __version__
from app.api import (
    errors,
    routes_access,
    routes_admin,
    routes_chat,
    routes_metrics,
    routes_ocr,
    routes_public,
    routes_ui,
    routes_usage,
    routes_v1,
)
from app.api.hardening import Hardening
from app.gateway import Gateway


def build_http_app(gateway: Gateway) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await gateway.start()
        try:
            yield
        finally:
            await gateway.stop()

    app = FastAPI(title="Model Gateway", version=__version__, lifespan=lifespan)
    app.state.gateway = gateway
    errors.install(app)
    app.include_router(routes_public.router)
    app.include_router(routes_chat.router)
    app.include_router(routes_ocr.router)
    app.include_router(routes_admin.router)
    app.include_router(routes_access.router)
    app.include_router(routes_usage.router)
    app.include_router(routes_v1.router)
    app.include_router(routes_metrics.router)
    app.include_router(routes_ui.router)  # the /ui dashboard: static files, a client of the API above
    server = gateway.settings.server
    if server.cors_origins:  # off unless an operator names the browser origins to allow
        app.add_middleware(
            CORSMiddleware,
            allow_origins=server.cors_origins,
            allow_methods=["GET", "POST", "PATCH", "DELETE"],
            allow_headers=[
                "Authorization",
                "Content-Type",
                "X-API-Key",
                "X-Client-ID",
                "X-Priority",
                "X-Resolution",
                "Idempotency-Key",
            ],
            expose_headers=[
                "X-Request-ID",
                "Retry-After",
                "X-RateLimit-Limit",
                "X-RateLimit-Remaining",
                "X-RateLimit-Reset",
                "Location",
            ],
        )
    app.add_middleware(Hardening, max_body_bytes=server.max_body_bytes)
    return app
