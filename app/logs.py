"""Structured log lines keyed by action (`job.admitted`, `engine.started`, ...)."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

_REDACTED_KEYS = frozenset({"password", "token", "authorization", "secret", "api_key"})


def configure(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # APScheduler logs two INFO lines per run of every job (the sweeper runs each second): the
    # gateway's own lines say what those jobs did; the scheduler's warnings and errors still show
    if logging.getLevelName(level.upper()) != logging.DEBUG:
        logging.getLogger("apscheduler").setLevel(logging.WARNING)


def _fmt(value: Any) -> str:
    """Quote values with spaces, quotes or newlines, so no value can forge another log line."""
    text = str(value)
    if not text or any(c in text for c in ' "=\n\r\t\\'):
        return json.dumps(text)
    return text


def event(logger: logging.Logger, action: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log `action key=value ...`; secrets are never written even if a caller passes them."""
    if not logger.isEnabledFor(level):
        return
    parts = [action]
    for key, value in fields.items():
        shown = "[redacted]" if key.lower() in _REDACTED_KEYS else _fmt(value)
        parts.append(f"{key}={shown}")
    logger.log(level, " ".join(parts))
