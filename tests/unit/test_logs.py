"""Log lines: readable text by default, one JSON object per line for log shippers, secrets never."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest

from app import logs


@pytest.fixture
def root_logging() -> Iterator[None]:
    """configure() replaces the root handlers: put pytest's back after the test."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_lines_carry_the_action_and_fields_as_data(
    root_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    logs.configure("INFO", "json")
    logs.event(logging.getLogger("gateway.test"), "job.retry", job="job_1", delay_s=0.5, api_key="sk-secret")
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("gateway.test").exception("dispatch failed")
    first, second = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert first["action"] == "job.retry" and first["level"] == "INFO" and first["logger"] == "gateway.test"
    assert (first["job"], first["delay_s"], first["api_key"]) == ("job_1", 0.5, "[redacted]")
    assert first["message"] == "job.retry job=job_1 delay_s=0.5 api_key=[redacted]"
    assert first["time"].endswith("Z") and "T" in first["time"]
    assert "sk-secret" not in json.dumps(first)
    assert second["message"] == "dispatch failed" and "ValueError: boom" in second["exc"]


def test_text_lines_stay_one_line_whatever_the_values(
    root_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    logs.configure("INFO", "text")
    logs.event(
        logging.getLogger("gateway.test"), "engine.failed", reason='line one\nfake="line two"', token="t"
    )
    (line,) = capsys.readouterr().err.splitlines()
    assert line.endswith('engine.failed reason="line one\\nfake=\\"line two\\"" token=[redacted]')
    assert " INFO gateway.test " in line
