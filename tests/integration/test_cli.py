"""The operator CLI against a real database: create, disable, enable, reset a password."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import yaml
from pymongo import AsyncMongoClient

from app import cli


async def test_users_lifecycle_from_the_cli(
    mongo_uri: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "config.yaml"
    name = "cli_" + tmp_path.name[-8:].replace("-", "_")
    config.write_text(
        yaml.safe_dump(
            {
                "data_dir": str(tmp_path),
                "database": {"uri": mongo_uri, "name": name},
                "auth": {"jwt_secret": "x" * 40},
            }
        )
    )
    base = ["--config", str(config), "users"]

    async def run(*args: str) -> int:
        return await asyncio.to_thread(cli.main, [*base, *args])  # it runs its own event loop

    assert await run("create", "ops", "--role", "admin", "--password", "ops-password-long") == 0
    assert await run("disable", "ops") == 0
    assert await run("reset-password", "ops", "--password", "new-password-long") == 0
    assert await run("create", "ops", "--password", "ops-password-long") == 2  # exists: clear error, no trace
    assert await run("disable", "ghost") == 2
    assert await run("reset-password", "ops", "--password", "short") == 2
    output = capsys.readouterr()
    assert "disabled user ops" in output.out
    assert "error: user 'ops' already exists" in output.err
    assert "error: no user 'ghost'" in output.err
    assert "at least 12 characters" in output.err
    client: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(mongo_uri)
    try:
        doc = await client[name].users.find_one({"_id": "ops"})
    finally:
        await client.close()
    assert doc is not None and doc["disabled"] is True and doc["role"] == "admin"
    assert await run("enable", "ops") == 0
