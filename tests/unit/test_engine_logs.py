"""Engine log files: where they live and how they are kept small."""

from __future__ import annotations

from pathlib import Path

from app.engines.process import log_file_name, rotate_log


def test_log_files_stay_flat_inside_the_log_directory() -> None:
    assert log_file_name("demo") == "demo.log"
    assert log_file_name("gemma-3.4b_it") == "gemma-3.4b_it.log"
    hub = log_file_name("deepseek-ai/DeepSeek-OCR")
    assert hub.startswith("deepseek-ai_DeepSeek-OCR-") and hub.endswith(".log") and "/" not in hub
    sneaky = log_file_name("a/../../etc/cron.d/x")
    assert "/" not in sneaky and not sneaky.startswith(".")
    assert log_file_name("a/b") != log_file_name("a_b")


def test_a_running_engines_log_is_copied_aside_and_cut_in_place(tmp_path: Path) -> None:
    log = tmp_path / "m.log"
    log.write_bytes(b"old line\n" * 200)
    (tmp_path / "m.log.1").write_bytes(b"older\n")
    with log.open("ab") as engine:  # the engine's own handle, opened for appending
        assert rotate_log(log, 1000, 3, running=True)
        engine.write(b"after the cut\n")
        engine.flush()
        assert log.read_bytes() == b"after the cut\n"  # written at the new start, no hole
    assert (tmp_path / "m.log.1").read_bytes() == b"old line\n" * 200
    assert (tmp_path / "m.log.2").read_bytes() == b"older\n"
    assert not rotate_log(log, 1000, 3, running=True)  # under the limit: left alone


def test_before_a_start_the_log_is_moved_aside_or_dropped(tmp_path: Path) -> None:
    log = tmp_path / "m.log"
    log.write_bytes(b"x" * 2000)
    assert rotate_log(log, 1000, 2)
    assert not log.exists() and (tmp_path / "m.log.1").stat().st_size == 2000
    log.write_bytes(b"y" * 2000)
    assert rotate_log(log, 1000, 0, running=True)  # no backups kept: cut only
    assert log.read_bytes() == b"" and (tmp_path / "m.log.1").read_bytes() == b"x" * 2000
