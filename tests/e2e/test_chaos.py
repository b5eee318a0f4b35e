"""scripts/chaos.py in a short bounded form: a load with the gateway, its database and its engine
killed (and the database stalled) at random moments, then the invariants it checks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(420)
def test_chaos_run_keeps_every_invariant(tmp_path: Path) -> None:
    report_path = tmp_path / "chaos.json"
    run = subprocess.run(
        [
            sys.executable,
            "scripts/chaos.py",
            "--duration", "30",
            "--fault-every", "4",
            "--clients", "6",
            "--seed", "11",
            "--report", str(report_path),
        ],
        cwd=ROOT,
        check=False,  # the report says what failed; the exit status is checked after it
        capture_output=True,
        text=True,
        timeout=400,
    )  # fmt: skip
    assert report_path.exists(), run.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert report["violations"] == {
        "lost": [],
        "not_terminal": [],
        "processes_left": [],
        "ran_twice_at_once": [],
        "server_errors": {},
        "unanswered_and_not_admitted": [],
        "totals_off": {},
    }, report
    assert run.returncode == 0, run.stderr[-3000:]
    assert sum(report["faults"].values()) >= 3  # faults really were injected
    assert report["answered"] >= 20 and report["admitted_jobs"] >= report["answered"]
    assert report["job_states"].get("succeeded", 0) >= report["answered"]
