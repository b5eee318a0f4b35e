"""Structured log lines keyed by action (`job.admitted`, `engine.started`, ...).

Each line is readable (`action key=value ...`) and also carries its fields as data (the
record's `action` and `fields`), so `server.log_format: json` writes one JSON object per line
that Loki, ELK or `jq` take as they are, without parsing the text.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

_REDACTED_KEYS = frozenset({"password", "token", "authorization", "secret", "api_key"})


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the event's action and fields
    (redacted as in the text), or the exception's traceback as `exc`."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        action = getattr(record, "action", None)
        if action is not None:
            line["action"] = action
            line.update(getattr(record, "fields", {}))
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure(level: str = "INFO", log_format: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        formatter: logging.Formatter = JsonFormatter()
        formatter.converter = time.gmtime
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s")
    handler.setFormatter(formatter)
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
    safe = {key: "[redacted]" if key.lower() in _REDACTED_KEYS else value for key, value in fields.items()}
    text = " ".join([action, *(f"{key}={_fmt(value)}" for key, value in safe.items())])
    # reserved LogRecord attributes (message, args, ...) cannot be extras: the fields go as one
    logger.log(level, text, extra={"action": action, "fields": safe})
