"""Composition root: create_app(settings) builds every service and hands them to the HTTP layer."""

from __future__ import annotations

from typing import Any

from app.api.http import build_http_app
from app.clock import Clock, SystemClock
from app.gateway import Gateway
from app.settings import Settings


def create_app(settings: Settings, clock: Clock | None = None) -> Any:
    """Return the ASGI application; services start and stop with its lifespan."""
    return build_http_app(Gateway.build(settings, clock or SystemClock()))
