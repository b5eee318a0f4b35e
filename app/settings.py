"""Configuration: one YAML file plus a few environment overrides, validated at start.

A bad config stops the daemon with a message that names the key and the problem, because an
operator reading a stack trace at 3 a.m. should not have to guess which line was wrong.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from app.autoswitch.inputs import PolicyConfig

EngineKind = Literal["stub", "vllm", "deepseek_ocr", "cpu_ocr", "llama_cpp", "openai"]
# Requests one engine of the kind really runs at once, when the model does not say: llama.cpp's
# Python server runs one completion at a time (a lock), so 10 "in flight" would be 9 queued there,
# out of reach of the gateway's priorities.
KIND_MAX_CONCURRENT: dict[str, int] = {"llama_cpp": 1}
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")
_UPSTREAM_URL = re.compile(r"^https?://[^\s/?#@]+(/[^\s?#]*)?$")
# Keys that describe a process the gateway spawns: an external upstream (kind openai) has none,
# and a value there would be silently ignored, so it is refused with the reason.
_SPAWN_ONLY_KEYS = (
    "path",
    "gpu",
    "max_model_len",
    "max_num_seqs",
    "threads",
    "chat_format",
    "on_demand",
    "startup_timeout",
    "port",
    "args",
    "env",
    "autostart",
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerSettings(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=1, le=65535)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = Field(
        "text", description="json: one JSON object per line (time, level, logger, message, action, fields)"
    )
    max_body_bytes: int = Field(
        2 * 1024 * 1024, ge=1024, description="JSON bodies; 413 beyond (uploads: ocr)"
    )
    cors_origins: list[str] = Field(
        [], description="browser origins allowed to call the API; none by default"
    )
    stream_keepalive_seconds: float = Field(
        10.0,
        gt=0,
        le=300,
        description="SSE comment interval while a stream waits; below any proxy's read timeout",
    )


class EmbeddedDatabaseSettings(_Strict):
    command: str = "secantusd-py"
    startup_timeout: float = Field(30.0, gt=0)
    port: int = Field(0, ge=0, le=65535)
    sync_on_commit: bool = False
    min_free_mb: float = Field(
        64.0, ge=0, description="below this much free space in data_dir the database is reported down (503)"
    )


class DatabaseSettings(_Strict):
    uri: str = "embedded"
    name: str = Field("gateway", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    embedded: EmbeddedDatabaseSettings = EmbeddedDatabaseSettings()
    write_concern: Literal["auto", "journaled", "majority"] = "auto"
    batch_max_ops: int = Field(64, ge=1, le=1000)
    operation_timeout_seconds: float = Field(
        5.0, gt=0, le=300, description="the most one database operation on the request path may take"
    )
    connect_timeout_seconds: float = Field(
        2.0, gt=0, le=60, description="how long an operation waits for an unreachable database"
    )
    health_check_seconds: float = Field(
        1.0, gt=0, le=60, description="how often the gateway pings the database (and revives an embedded one)"
    )


class AuthSettings(_Strict):
    jwt_secret: str = ""
    token_ttl_seconds: int = Field(3600, ge=60)
    refresh_ttl_seconds: int = Field(7 * 24 * 3600, ge=60)
    issuer: str = "model-gateway"
    audience: str = "model-gateway-clients"
    login_max_failures: int = Field(5, ge=1, description="failed logins per username or address ...")
    login_window_seconds: float = Field(300.0, gt=0, description="... inside this window, then 429")


class RateLimitSettings(_Strict):
    per_minute: int = Field(60, ge=0, description="requests per client per window; 0 = no limit")
    window_seconds: float = Field(60.0, gt=0)
    exempt_roles: list[Literal["admin", "client"]] = ["admin"]


class QueueSettings(_Strict):
    lease_seconds: float = Field(30.0, gt=0)
    heartbeat_seconds: float = Field(10.0, gt=0)
    sweep_interval_seconds: float = Field(1.0, gt=0)
    poll_interval_seconds: float = Field(1.0, gt=0)
    max_retries: int = Field(3, ge=0, le=10)
    retry_backoff_seconds: float = Field(0.5, ge=0)
    retry_backoff_max_seconds: float = Field(10.0, ge=0)

    @model_validator(mode="after")
    def _heartbeat_inside_lease(self) -> QueueSettings:
        if self.heartbeat_seconds >= self.lease_seconds:
            raise ValueError("heartbeat_seconds must be shorter than lease_seconds")
        return self


class HistorySettings(_Strict):
    retention_days: float = Field(15, gt=0)
    store_prompts: bool = True
    store_outputs: bool = True
    rollup_interval_seconds: float = Field(60.0, gt=0, description="how often usage rollups are updated")
    prune: Literal["auto", "on", "off"] = Field(
        "auto",
        description="the gateway deletes expired history itself; auto = on SecantusDB, embedded or not",
    )
    prune_interval_seconds: float = Field(60.0, gt=0, description="how often, when it does")
    rollup_settle_seconds: float = Field(
        7200.0, gt=0, description="hours older than this are final in the rollups (jobs have ended)"
    )


class AutoSwitchSettings(_Strict):
    """Auto-switch (docs/ARCHITECTURE.md, "Auto-switch"). The policy's thresholds are
    app.autoswitch.inputs.PolicyConfig's fields, validated by it; the defaults of the threshold
    mode match the system we re-implement."""

    enabled: bool = Field(False, description="at start; POST /admin/autoswitch changes it at run time")
    models: list[str] | None = Field(
        None, description="models auto-switch may start and stop; default every GPU-kind model"
    )
    slots: int | None = Field(
        None, ge=1, description="capacity as a number of models at once instead of GPU memory"
    )
    mode: Literal["forecast", "threshold"] = "forecast"
    interval_s: float = 300.0
    miss_delay_s: float = 30.0
    cooldown_s: float = 300.0
    window_days: int = 7
    min_requests: int = 10
    min_share: float = 0.6
    horizon_s: float = 1800.0
    recent_window_s: float = 900.0
    seasonal_weight: float = 0.5
    weekly_weight: float = 0.6
    hysteresis: float = 0.25
    min_gain: float = 4.0
    waiting_weight: float = 1.0
    min_free_start: float = 0.5
    default_load_s: float = 60.0
    exact_limit: int = 12

    @model_validator(mode="after")
    def _valid_policy(self) -> AutoSwitchSettings:
        self.policy()  # raises ValueError with the field's name
        return self

    def policy(self) -> PolicyConfig:
        fields = self.model_dump(exclude={"enabled", "models", "slots"})
        return PolicyConfig(**fields)


class FakeGpu(_Strict):
    """A GPU that exists only in configuration: exercises placement on machines without one."""

    name: str = "fake-gpu"
    total_gib: float = Field(..., gt=0)
    free_gib: float = Field(..., ge=0)
    utilization: float | None = Field(None, ge=0, le=1, description="busy share shown by /metrics")


class EngineDefaults(_Strict):
    startup_timeout: float = Field(120.0, gt=0, description="seconds an engine may take to get healthy")
    stop_timeout: float = Field(10.0, gt=0, description="SIGTERM to SIGKILL, seconds")
    stop_grace_seconds: float = Field(30.0, ge=0, description="drain of in-flight requests at stop")
    health_interval: float = Field(0.2, gt=0, description="process-exit and startup health polling")
    health_check_interval: float = Field(5.0, gt=0, description="HTTP health of ready engines")
    health_check_timeout: float = Field(3.0, gt=0)
    health_check_failures: int = Field(3, ge=1, description="failed checks in a row = hung")
    max_crashes: int = Field(5, ge=1, description="crashes inside crash_window_seconds before failed")
    crash_window_seconds: float = Field(300.0, gt=0)
    restart_backoff_seconds: float = Field(
        0.5, ge=0, description="wait before the first restart; doubles with each crash in the window"
    )
    restart_backoff_max_seconds: float = Field(30.0, ge=0)
    gpu_release_timeout: float = Field(30.0, ge=0, description="wait for GPU memory to be freed")
    log_max_bytes: int = Field(10 * 1024 * 1024, ge=1024)
    log_backups: int = Field(3, ge=0, le=100)
    python: str | None = Field(None, description="interpreter with vLLM installed; default ours")
    fake_gpus: list[FakeGpu] | None = Field(None, description="tests and demos only: replaces NVML")


class GpuNeeds(_Strict):
    """What a GPU engine needs to start; placement refuses a start that cannot get it."""

    count: int = Field(1, ge=0, le=16)
    memory_gib: float | None = Field(
        None, gt=0, description="free GiB needed on each GPU; vLLM's share = this / the placed GPU's total"
    )
    memory_fraction: float = Field(
        0.9, gt=0, le=1, description="vLLM --gpu-memory-utilization (share of each GPU) without memory_gib"
    )
    devices: list[int] | None = Field(None, description="pin to these GPU indices")


class ShareSettings(_Strict):
    max_share: float = Field(
        0.5, gt=0, le=1, description="a client's most places of a model (running + waiting), as a share"
    )
    max_places: int | None = Field(
        None, ge=1, description="... or as a number of places (wins over max_share)"
    )


class ClientShareSettings(_Strict):
    weight: float = Field(1.0, gt=0, le=1000, description="its turns against other clients' (default 1)")
    max_share: float | None = Field(None, gt=0, le=1)
    max_places: int | None = Field(None, ge=1)


class FairShareSettings(ShareSettings):
    """Fair shares between clients of a model (app/queue/fairness.py)."""

    enabled: bool = True
    # by X-Client-ID, or by the caller: a user name, or `key:<name>` for an API key
    clients: dict[str, ClientShareSettings] = {}


class ModelSettings(_Strict):
    kind: EngineKind
    aliases: list[str] = []
    served_name: str | None = None
    path: str | None = Field(
        None,
        description="weights: local path or hub id passed to `vllm serve`; llama_cpp: a GGUF file, "
        "or package:<python package>/<file> for one shipped inside an installed package",
    )
    gpu: GpuNeeds = GpuNeeds()  # applies to GPU kinds, and to any kind that sets it explicitly
    max_model_len: int | None = Field(None, ge=16, description="vLLM --max-model-len; llama_cpp --n_ctx")
    max_num_seqs: int | None = Field(None, ge=1)
    threads: int | None = Field(None, ge=1, le=512, description="llama_cpp: CPU threads (default: its own)")
    chat_format: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9._-]{1,64}$",
        description="llama_cpp: a named chat format when the GGUF's own template is not enough",
    )
    url: str | None = Field(
        None, description="kind openai only: the upstream's base URL (http://host:port, with or without /v1)"
    )
    api_key_env: str | None = Field(
        None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$",
        description="kind openai: the environment variable that holds the upstream's API key",
    )
    health_path: str | None = Field(
        None,
        pattern=r"^/[^\s?#]*(\?[^\s#]*)?$",
        description="kind openai: the GET that answers 200 while the upstream serves (default /v1/models)",
    )
    on_demand: bool = False
    startup_timeout: float | None = Field(None, gt=0, description="overrides engines.startup_timeout")
    max_concurrent: int = Field(10, ge=1, le=1024)
    max_waiting: int = Field(10, ge=0, le=10000)
    fair_share: ShareSettings | None = None  # this model's own default share per client
    timeout: float = Field(300.0, gt=0, description="seconds a request may wait in the queue")
    request_timeout: float = Field(600.0, gt=0, description="seconds one engine call may take")
    port: int = Field(0, ge=0, le=65535)
    args: list[str] = []
    env: dict[str, str] = {}
    autostart: bool = True

    @model_validator(mode="before")
    @classmethod
    def _kind_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and "max_concurrent" not in data:
            kind_default = KIND_MAX_CONCURRENT.get(str(data.get("kind")))
            if kind_default is not None:
                return {**data, "max_concurrent": kind_default}
        return data

    @field_validator("url")
    @classmethod
    def _upstream_url(cls, url: str | None) -> str | None:
        """Stored without a trailing `/` or `/v1`: the relay appends `/v1/chat/completions`, and
        operators paste either form (OpenAI SDK base URLs end in /v1, Ollama's docs omit it)."""
        if url is None:
            return None
        if not _UPSTREAM_URL.match(url):
            raise ValueError(
                f"{url!r} is not an http(s) URL such as http://127.0.0.1:11434 (no query, no user:pass@)"
            )
        url = url.rstrip("/")
        return url.removesuffix("/v1").rstrip("/")

    @model_validator(mode="after")
    def _upstream_keys(self) -> ModelSettings:
        upstream_only = [k for k in ("url", "api_key_env", "health_path") if k in self.model_fields_set]
        if self.kind != "openai":
            if upstream_only:
                raise ValueError(f"{upstream_only[0]} applies to kind openai only (an external upstream)")
            return self
        if self.url is None:
            raise ValueError("kind openai needs url: the upstream's base URL, e.g. http://127.0.0.1:11434")
        for key in _SPAWN_ONLY_KEYS:
            if key in self.model_fields_set:
                raise ValueError(
                    f"{key} does not apply to kind openai: the gateway routes to that upstream but "
                    "does not start it"
                )
        return self

    @field_validator("aliases")
    @classmethod
    def _alias_names(cls, aliases: list[str]) -> list[str]:
        for alias in aliases:
            if not _MODEL_NAME.match(alias):
                raise ValueError(f"alias {alias!r} is not a valid model name")
        return aliases


class OcrSettings(_Strict):
    max_upload_bytes: int = Field(10 * 1024 * 1024, ge=1024, description="413 beyond this")
    max_pages: int = Field(20, ge=1, le=1000, description="pages per document (413 beyond)")
    max_pixels: int = Field(50_000_000, ge=10_000, description="per page; decompression bombs are 413")
    pdf_dpi: int = Field(144, ge=36, le=600)
    default_resolution: Literal["tiny", "small", "base", "large", "gundam"] = "large"
    default_model: str | None = Field(None, description="used when a request names none")


class MetricsSettings(_Strict):
    """GET /metrics. Who may scrape: `localhost` = clients on 127.0.0.1 / ::1 without
    credentials, anyone else with admin credentials or the metrics token; `token` = always
    admin credentials or the token; `open` = anyone (only behind a network that limits it)."""

    enabled: bool = True
    auth: Literal["localhost", "token", "open"] = "localhost"
    token: str = Field("", description="bearer token for scrapers (GATEWAY_METRICS_TOKEN); empty = none")
    clients: list[str] = Field(
        [], max_length=100, description="client ids counted per client in /metrics; any other is `other`"
    )

    @field_validator("token")
    @classmethod
    def _token_strength(cls, token: str) -> str:
        if token and len(token) < 16:
            raise ValueError("must be at least 16 characters (generate one with `openssl rand -hex 24`)")
        return token


class Settings(_Strict):
    server: ServerSettings = ServerSettings()
    data_dir: Path = Path("data")
    database: DatabaseSettings = DatabaseSettings()
    auth: AuthSettings = AuthSettings()
    rate_limit: RateLimitSettings = RateLimitSettings()
    queue: QueueSettings = QueueSettings()
    history: HistorySettings = HistorySettings()
    engines: EngineDefaults = EngineDefaults()
    ocr: OcrSettings = OcrSettings()
    metrics: MetricsSettings = MetricsSettings()
    autoswitch: AutoSwitchSettings = AutoSwitchSettings()
    fair_share: FairShareSettings = FairShareSettings()
    models: dict[str, ModelSettings] = {}

    @model_validator(mode="after")
    def _names_unique(self) -> Settings:
        seen: dict[str, str] = {}
        for name, model in self.models.items():
            if not _MODEL_NAME.match(name):
                raise ValueError(f"model name {name!r} is not valid (letters, digits, . _ : / -)")
            for label in [name, *model.aliases]:
                if label in seen and seen[label] != name:
                    raise ValueError(f"name {label!r} is used by both {seen[label]!r} and {name!r}")
                seen[label] = name
        return self

    @model_validator(mode="after")
    def _autoswitch_models_known(self) -> Settings:
        for name in self.autoswitch.models or []:
            if name not in self.models:
                raise ValueError(f"autoswitch.models names {name!r}, which is not a configured model")
            if self.models[name].kind == "openai":
                raise ValueError(
                    f"autoswitch.models names {name!r}, an external upstream (kind openai) the gateway "
                    "cannot start or stop"
                )
        return self

    @property
    def log_dir(self) -> Path:
        return self.data_dir / "logs"
