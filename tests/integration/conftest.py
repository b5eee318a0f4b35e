"""A fresh database on the session's SecantusDB server for each store-level test."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from app.store.database import Database, connect, ensure_indexes


@pytest.fixture
async def database(mongo_uri: str) -> AsyncIterator[Database]:
    db = await connect(mongo_uri, "t_" + uuid.uuid4().hex[:12], "auto")
    await ensure_indexes(db)
    yield db
    await db.client.drop_database(db.db.name)
    await db.close()
