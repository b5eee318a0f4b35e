"""The pages of an admitted OCR document, stored beside its job until the job ends.

Why in the database and not in memory: an admitted document must survive a gateway crash like
any other job (the job is retried by another instance or after a restart). Pages are stored
once, already rendered and sized for the chosen resolution, so a retry does no rendering; each
page's result is written as soon as it is read, so a retried job only redoes the pages that
had not finished. One document per page keeps each far below the 16 MB document limit.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from bson import Binary
from pymongo import ASCENDING
from pymongo.asynchronous.collection import AsyncCollection

from app.store.ttl import ensure_ttl_index

Doc = dict[str, Any]


@dataclass(frozen=True)
class StoredPage:
    number: int
    png: bytes
    width: int  # of the page as rendered, before resizing for the mode: boxes are scaled to it
    height: int
    result: Doc | None


class PageStore:
    def __init__(self, collection: AsyncCollection[Doc]) -> None:
        self._pages = collection

    async def ensure_indexes(self) -> None:
        await self._pages.create_index([("job", ASCENDING), ("page", ASCENDING)], name="job_pages")
        await ensure_ttl_index(self._pages, "pages_ttl")

    async def save(self, job_id: str, pages: list[tuple[int, bytes, int, int]], expire_at: datetime) -> None:
        await self._pages.insert_many(
            [
                {
                    "_id": f"{job_id}:{number}",
                    "job": job_id,
                    "page": number,
                    "png": Binary(png),
                    "width": width,
                    "height": height,
                    "expire_at": expire_at,
                }
                for number, png, width, height in pages
            ]
        )

    async def load(self, job_id: str) -> list[StoredPage]:
        cursor = self._pages.find({"job": job_id}).sort("page", 1)
        return [
            StoredPage(int(d["page"]), bytes(d["png"]), int(d["width"]), int(d["height"]), d.get("result"))
            async for d in cursor
        ]

    async def record(self, job_id: str, number: int, result: Doc) -> None:
        await self._pages.update_one({"_id": f"{job_id}:{number}"}, {"$set": {"result": result}})

    async def delete(self, job_id: str) -> None:
        await self._pages.delete_many({"job": job_id})
