"""Reading the configuration: the YAML file, the `.env` file and the environment overrides,
into validated Settings (app/settings.py holds the schema); and what engine processes may see
of the environment.

A bad config stops the daemon with a message that names the key and the problem, because an
operator reading a stack trace at 3 a.m. should not have to guess which line was wrong.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from app.errors import ConfigError
from app.settings import Settings

_PLACEHOLDER_SECRETS = {"change-me", "changeme", "your-secret-key", "your-secure-secret-key", "secret"}


ENV_OVERRIDES: dict[str, tuple[str, ...]] = {
    "GATEWAY_HOST": ("server", "host"),
    "GATEWAY_PORT": ("server", "port"),
    "GATEWAY_DATA_DIR": ("data_dir",),
    "GATEWAY_LOG_LEVEL": ("server", "log_level"),
    "GATEWAY_LOG_FORMAT": ("server", "log_format"),
    "MONGODB_URI": ("database", "uri"),
    "GATEWAY_JWT_SECRET": ("auth", "jwt_secret"),
    "GATEWAY_METRICS_TOKEN": ("metrics", "token"),
}


def redact_uri(uri: str) -> str:
    """mongodb://user:secret@host -> mongodb://***@host, for logs."""
    return re.sub(r"//[^@/]*@", "//***@", uri)


SECRET_ENV = (
    "GATEWAY_JWT_SECRET",
    "MONGODB_URI",
    "GATEWAY_ADMIN_PASSWORD",
    "GATEWAY_USER_PASSWORD",
    "GATEWAY_METRICS_TOKEN",
)


def child_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for engine and database processes: ours minus every secret."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in SECRET_ENV and not k.endswith(("_PASSWORD", "_SECRET", "_TOKEN", "_API_KEY"))
    }
    env.update(extra or {})
    return env


def read_env_file(path: Path) -> dict[str, str]:
    """Parse a dotenv file (KEY=VALUE lines); quickstart writes the JWT secret there."""
    values: dict[str, str] = {}
    if not path.is_file():
        return values
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        values[key.strip().removeprefix("export ").strip()] = value.strip().strip("'\"")
    return values


def environment(overrides: Mapping[str, str] | None = None) -> dict[str, str]:
    """The variables the gateway reads its secrets from: the process environment (or
    `overrides`) over the `.env` file. The settings' overrides and external upstreams' API keys
    (models.<m>.api_key_env) both come from here."""
    return {**read_env_file(Path(".env")), **(os.environ if overrides is None else overrides)}


def _set_path(tree: dict[str, Any], path: tuple[str, ...], value: str) -> None:
    node = tree
    for key in path[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config key {key!r} must be a mapping")
        node = child
    node[path[-1]] = value


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        msg = item["msg"]
        if item["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling against config/config.yaml)"
        lines.append(f"{key}: {msg}")
    return "invalid configuration: " + "; ".join(lines)


def parse_settings(raw: dict[str, Any], env: dict[str, str] | None = None) -> Settings:
    """Validate a config tree after applying environment overrides."""
    tree: dict[str, Any] = dict(raw)
    for name, path in ENV_OVERRIDES.items():
        if env and env.get(name):
            _set_path(tree, path, env[name])
    try:
        return Settings.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None


def load_settings(config_path: Path | None, env: dict[str, str] | None = None) -> Settings:
    """Read the YAML file (if any), the `.env` file and the process environment."""
    merged_env = environment(env)
    raw: dict[str, Any] = {}
    if config_path is not None:
        if not config_path.is_file():
            raise ConfigError(f"config file {config_path} does not exist")
        try:
            loaded = yaml.safe_load(config_path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {config_path} is not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {config_path} must contain a mapping at the top level")
        raw = loaded
    return parse_settings(raw, merged_env)


def check_secret(secret: str) -> None:
    """Refuse to run with a secret an attacker could guess."""
    if not secret:
        raise ConfigError("auth.jwt_secret is not set (set GATEWAY_JWT_SECRET or run ./quickstart.sh)")
    if secret.lower() in _PLACEHOLDER_SECRETS or "change" in secret.lower():
        raise ConfigError("auth.jwt_secret is a placeholder; generate one with `openssl rand -hex 32`")
    if len(secret.encode()) < 32:
        raise ConfigError("auth.jwt_secret is shorter than 32 bytes")
