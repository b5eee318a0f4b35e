"""The seed-style curl scripts run against a real daemon, as an operator would run them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import ROOT, Daemon

pytestmark = pytest.mark.e2e
PASSWORD = "shell-script-admin-password"


async def test_curl_scripts_pass_against_a_running_gateway(tmp_path: Path, daemons: list[Daemon]) -> None:
    daemon = Daemon(
        tmp_path,
        {"demo": {"kind": "stub", "aliases": ["demo-chat"]}, "ocr": {"kind": "cpu_ocr", "max_concurrent": 2}},
    )
    daemons.append(daemon)
    create = subprocess.run(
        [
            sys.executable,
            "-m",
            "app.cli",
            "--config",
            str(daemon.config),
            "users",
            "create",
            "ops",
            "--role",
            "admin",
            "--password",
            PASSWORD,
        ],
        cwd=ROOT,
        env=daemon.env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert create.returncode == 0, create.stderr
    daemon.start()
    await daemon.wait_healthy()
    env = {
        **os.environ,
        "GATEWAY_URL": daemon.url,
        "GATEWAY_USER": "ops",
        "GATEWAY_PASSWORD": PASSWORD,
        "GATEWAY_MODEL": "demo",
        "GATEWAY_MODEL_ALIAS": "demo-chat",
        "PYTHON": sys.executable,
    }
    for script in ("scripts/test_gateway.sh", "scripts/test_complete_api.sh", "scripts/test_ocr.sh"):
        run = subprocess.run(
            ["bash", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False
        )
        assert run.returncode == 0, f"{script} failed:\n{run.stdout}\n{run.stderr}"
        assert "FAIL" not in run.stdout
        assert "PASS" in run.stdout
    # the scripts must be able to fail: a wrong password stops them at once
    bad = subprocess.run(
        ["bash", "scripts/test_gateway.sh"],
        cwd=ROOT,
        env={**env, "GATEWAY_PASSWORD": "nope"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert bad.returncode == 1
    assert "FAIL" in bad.stdout + bad.stderr
