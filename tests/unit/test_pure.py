"""Pure logic: priorities, retry policy, slot book, settings validation, secrets, tokens."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from app.auth.tokens import TokenService
from app.clock import ManualClock
from app.engines.upstream import auth_headers
from app.errors import AuthenticationFailed, ConfigError, InvalidRequest, UnknownModel
from app.models import ModelRegistry
from app.queue.priority import Priority
from app.queue.retry import RetryPolicy
from app.queue.slots import SlotBook, slot_index, slot_key
from app.settings_loader import check_secret, load_settings, parse_settings


def test_priority_parse_and_rank() -> None:
    assert Priority.parse(None) is Priority.NORMAL
    assert Priority.parse(" HIGH ") is Priority.HIGH
    assert [p.rank for p in (Priority.HIGH, Priority.NORMAL, Priority.LOW)] == [0, 1, 2]
    with pytest.raises(InvalidRequest, match="must be one of high, normal, low"):
        Priority.parse("urgent")


def test_retry_policy_counts_retries_not_attempts() -> None:
    policy = RetryPolicy(max_retries=3)
    assert [policy.should_retry(retryable=True, attempts_made=n) for n in (1, 2, 3, 4)] == [
        True,
        True,
        True,
        False,
    ]
    assert not policy.should_retry(retryable=False, attempts_made=1)


def test_backoff_grows_and_is_capped() -> None:
    policy = RetryPolicy(base_seconds=0.5, max_seconds=3.0)
    rng = random.Random(1)
    for attempt, ceiling in [(1, 0.5), (2, 1.0), (3, 2.0), (6, 3.0)]:
        delays = [policy.backoff(attempt, rng) for _ in range(200)]
        assert min(delays) >= 0.25
        assert max(delays) <= ceiling
        assert max(delays) > ceiling * 0.8  # jitter spreads over the range


def test_slot_book_reserves_lowest_free_and_reports_full() -> None:
    book = SlotBook(3)
    assert [book.reserve(), book.reserve(), book.reserve(), book.reserve()] == [0, 1, 2, None]
    book.release(1)
    assert book.reserve() == 1
    book.reset({0, 7})
    assert book.taken == 1
    assert slot_index(slot_key("org/model:v1", 12)) == 12


def test_bad_config_names_the_key() -> None:
    with pytest.raises(
        ConfigError, match=r"models\.demo\.max_concurrent: Input should be greater than or equal to 1"
    ):
        parse_settings({"models": {"demo": {"kind": "stub", "max_concurrent": 0}}})
    with pytest.raises(ConfigError, match=r"queue\.max_retrys: unknown key"):
        parse_settings({"queue": {"max_retrys": 3}})
    with pytest.raises(ConfigError, match=r"models\.x\.kind: Input should be 'stub', 'vllm'"):
        parse_settings({"models": {"x": {"kind": "tensorrt"}}})
    with pytest.raises(ConfigError, match="heartbeat_seconds must be shorter than lease_seconds"):
        parse_settings({"queue": {"lease_seconds": 5, "heartbeat_seconds": 10}})
    with pytest.raises(ConfigError, match="'shared' is used by both 'a' and 'b'"):
        parse_settings(
            {
                "models": {
                    "a": {"kind": "stub", "aliases": ["shared"]},
                    "b": {"kind": "stub", "aliases": ["shared"]},
                }
            }
        )


def test_external_upstream_config_is_checked_and_its_url_normalised() -> None:
    def upstream(**fields: object) -> dict[str, object]:
        return {"models": {"remote": {"kind": "openai", **fields}}}

    for given in ("http://10.0.0.5:11434", "http://10.0.0.5:11434/", "http://10.0.0.5:11434/v1/"):
        assert parse_settings(upstream(url=given)).models["remote"].url == "http://10.0.0.5:11434"
    served = parse_settings(upstream(url="https://llm.example.com/proxy/v1")).models["remote"]
    assert served.url == "https://llm.example.com/proxy" and served.max_concurrent == 10
    with pytest.raises(ConfigError, match=r"models\.remote: Value error, kind openai needs url"):
        parse_settings(upstream())
    for bad in ("localhost:11434", "ftp://host/", "http://user:pw@host/", "http://host/?key=1"):
        with pytest.raises(
            ConfigError, match=r"models\.remote\.url: Value error, .* is not an http\(s\) URL"
        ):
            parse_settings(upstream(url=bad))
    for key, value in [("args", ["--x"]), ("path", "/m.gguf"), ("on_demand", True), ("autostart", False)]:
        with pytest.raises(ConfigError, match=f"{key} does not apply to kind openai: the gateway routes"):
            parse_settings(upstream(url="http://h:1", **{key: value}))
    with pytest.raises(ConfigError, match="url applies to kind openai only"):
        parse_settings({"models": {"local": {"kind": "stub", "url": "http://h:1"}}})
    with pytest.raises(ConfigError, match=r"api_key_env: String should match pattern"):
        parse_settings(upstream(url="http://h:1", api_key_env="not a name"))
    with pytest.raises(ConfigError, match=r"'remote', an external upstream .* cannot start or stop"):
        parse_settings({**upstream(url="http://h:1"), "autoswitch": {"models": ["remote"]}})


def test_upstream_api_keys_come_from_the_environment_and_a_missing_one_is_named() -> None:
    models = parse_settings(
        {
            "models": {
                "keyed": {"kind": "openai", "url": "http://h:1", "api_key_env": "REMOTE_KEY"},
                "open": {"kind": "openai", "url": "http://h:2"},
                "local": {"kind": "stub"},
            }
        }
    ).models
    assert auth_headers(models, {"REMOTE_KEY": "sk-1"}) == {"keyed": {"Authorization": "Bearer sk-1"}}
    with pytest.raises(ConfigError, match=r"models\.keyed\.api_key_env names REMOTE_KEY, which is not set"):
        auth_headers(models, {"REMOTE_KEY": ""})


def test_env_overrides_and_yaml_errors(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("server:\n  port: 9000\n")
    settings = load_settings(config, env={"GATEWAY_PORT": "9100", "MONGODB_URI": "mongodb://db:27017"})
    assert settings.server.port == 9100
    assert settings.database.uri == "mongodb://db:27017"
    config.write_text("server: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(config, env={})
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "missing.yaml", env={})
    with pytest.raises(ConfigError, match=r"server\.port: Input should be a valid integer"):
        load_settings(None, env={"GATEWAY_PORT": "eighty"})


def test_shipped_config_is_valid() -> None:
    settings = load_settings(Path("config/config.yaml"), env={})
    chat = settings.models["chat"]  # a real model by default; the stub is never the default
    assert (chat.kind, chat.aliases, chat.max_concurrent) == ("llama_cpp", ["smollm2", "demo-chat"], 1)
    assert not any(model.kind == "stub" for model in settings.models.values())
    assert settings.queue.max_retries == 3
    assert settings.history.retention_days == 15


@pytest.mark.parametrize(
    ("secret", "problem"),
    [("", "not set"), ("change-me-please-change-me-please-123", "placeholder"), ("short", "shorter than 32")],
)
def test_weak_secrets_are_refused(secret: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        check_secret(secret)


def test_tokens_expire_by_the_injected_clock() -> None:
    clock = ManualClock()
    tokens = TokenService("s" * 40 + "0123456789abcdef", "iss", "aud", 60, 600, clock)
    token = tokens.issue("alice", "client")
    assert tokens.verify(token).subject == "alice"
    clock.advance(61)
    with pytest.raises(AuthenticationFailed, match="expired"):
        tokens.verify(token)


def test_registry_resolves_aliases_and_lists_known_models() -> None:
    settings = parse_settings({"models": {"gemma": {"kind": "vllm", "aliases": ["gemma-3-4b-it"]}}})
    registry = ModelRegistry(settings.models)
    assert registry.resolve("gemma-3-4b-it") == "gemma"
    with pytest.raises(UnknownModel, match="known models: gemma"):
        registry.resolve("llama")
