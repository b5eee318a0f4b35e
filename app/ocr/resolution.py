"""The default OCR resolution: an admin setting that survives restarts (runtime_settings)."""

from __future__ import annotations

from typing import Any

from pymongo.asynchronous.collection import AsyncCollection

from app.ocr.documents import parse_resolution

Doc = dict[str, Any]
_KEY = "ocr"


class DefaultResolution:
    """Read from the database on every use, so every gateway instance applies a change at once."""

    def __init__(self, collection: AsyncCollection[Doc], initial: str) -> None:
        self._settings = collection
        self._initial = parse_resolution(initial)

    async def get(self) -> str:
        doc = await self._settings.find_one({"_id": _KEY})
        return str(doc["resolution"]) if doc and doc.get("resolution") else self._initial

    async def set(self, value: str, changed_by: str) -> str:
        mode = parse_resolution(value)
        await self._settings.update_one(
            {"_id": _KEY}, {"$set": {"resolution": mode, "changed_by": changed_by}}, upsert=True
        )
        return mode
