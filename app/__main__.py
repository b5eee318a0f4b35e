"""`python -m app --config FILE`: run the daemon."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import uvicorn

from app import logs
from app.errors import ConfigError
from app.main import create_app
from app.settings_loader import load_settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app", description="Run the model gateway daemon.")
    default_config = os.environ.get("GATEWAY_CONFIG") or (
        "config/config.yaml" if Path("config/config.yaml").is_file() else None
    )
    parser.add_argument("--config", type=Path, default=Path(default_config) if default_config else None)
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args.config)
        logs.configure(settings.server.log_level, settings.server.log_format)
        app = create_app(settings)
    except ConfigError as exc:
        print(f"gateway: {exc.message}", file=sys.stderr)
        return 2
    uvicorn.run(
        app,
        host=settings.server.host,
        port=settings.server.port,
        log_level="warning",
        log_config=None,  # uvicorn's lines go through ours (text or JSON), not a handler of its own
        access_log=False,
        timeout_graceful_shutdown=15,
        lifespan="on",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
