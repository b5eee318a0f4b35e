"""API keys for services: `agw_` + 32 random bytes, stored only as a SHA-256 hash, shown once.

SHA-256 rather than argon2: a key has 256 bits of entropy, so a fast hash is not brute-forced,
and a service sends its key on every request (argon2 would cost ~50 ms each). Keys carry a
role, an optional list of models and an optional rate limit of their own; a revoked or
expired key stops working within the verification cache's lifetime (a few seconds).
"""

from __future__ import annotations

import hashlib
import re
import secrets
from datetime import datetime
from typing import Any

from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import DuplicateKeyError

from app.auth.tokens import Principal
from app.clock import Clock
from app.errors import AuthenticationFailed, InvalidRequest, NotFound

Doc = dict[str, Any]
PREFIX = "agw_"
_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
_SHAPE = re.compile(r"^agw_[A-Za-z0-9_-]{43}$")
CACHE_SECONDS = 5.0
LAST_USED_EVERY_SECONDS = 60.0


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class ApiKeyService:
    def __init__(self, keys: AsyncCollection[Doc], clock: Clock) -> None:
        self._keys = keys
        self._clock = clock
        self._cache: dict[str, tuple[float, Principal | None, datetime | None]] = {}
        self._last_used: dict[str, float] = {}

    async def create(
        self,
        name: str,
        role: str,
        created_by: str,
        models: list[str] | None = None,
        expires_at: datetime | None = None,
        rate_limit_per_minute: int | None = None,
    ) -> tuple[str, Doc]:
        """The key itself (shown once, never stored) and its stored record."""
        if not _NAME.match(name):
            raise InvalidRequest("key name must be 1-64 characters of letters, digits, _ . @ -", param="name")
        if role not in ("admin", "client"):
            raise InvalidRequest("role must be admin or client", param="role")
        now = self._clock.now()
        if expires_at is not None and expires_at <= now:
            raise InvalidRequest("expires_at is in the past", param="expires_at")
        # The name is the key's identity (subject `key:<name>`): its jobs and its rate-limit
        # counter. Two usable keys of one name would share both, so a name is taken until its
        # key is revoked or expires.
        taken = await self._keys.find_one(
            {
                "name": name,
                "revoked_at": None,
                "$or": [{"expires_at": None}, {"expires_at": {"$gt": now}}],
            },
            {"_id": 1},
        )
        if taken is not None:
            raise InvalidRequest(
                f"an active API key is named {name!r} (id {taken['_id'][:16]}); "
                "revoke it or pick another name",
                param="name",
            )
        key = PREFIX + secrets.token_urlsafe(32)
        doc: Doc = {
            "_id": key_hash(key),
            "name": name,
            "prefix": key[:10],
            "role": role,
            "models": models,
            "rate_limit_per_minute": rate_limit_per_minute,
            "expires_at": expires_at,
            "created_at": self._clock.now(),
            "created_by": created_by,
            "revoked_at": None,
            "last_used_at": None,
        }
        try:
            await self._keys.insert_one(doc)
        except DuplicateKeyError:  # pragma: no cover - 256 random bits
            raise InvalidRequest("key collision; try again", param="name") from None
        return key, public(doc)

    async def verify(self, key: str) -> Principal:
        if not _SHAPE.match(key):
            raise AuthenticationFailed("API key is invalid")
        digest = key_hash(key)
        now = self._clock.monotonic()
        cached = self._cache.get(digest)
        if cached is None or now - cached[0] >= CACHE_SECONDS:
            doc = await self._keys.find_one({"_id": digest})
            cached = (now, self._principal(doc), doc.get("expires_at") if doc else None)
            self._cache[digest] = cached
        _, principal, expires = cached
        if principal is None or (expires is not None and expires <= self._clock.now()):
            raise AuthenticationFailed("API key is invalid, revoked or expired")
        if now - self._last_used.get(digest, -LAST_USED_EVERY_SECONDS) >= LAST_USED_EVERY_SECONDS:
            self._last_used[digest] = now
            await self._keys.update_one({"_id": digest}, {"$set": {"last_used_at": self._clock.now()}})
        return principal

    def _principal(self, doc: Doc | None) -> Principal | None:
        if doc is None or doc.get("revoked_at") is not None:
            return None
        expires = doc.get("expires_at")
        if expires is not None and expires <= self._clock.now():
            return None
        models = doc.get("models")
        return Principal(
            subject=f"key:{doc['name']}",
            role=doc["role"],
            models=frozenset(models) if models else None,
            rate_limit_per_minute=doc.get("rate_limit_per_minute"),
            key_id=doc["_id"][:16],
        )

    async def list(self) -> list[Doc]:
        return [public(doc) async for doc in self._keys.find({}).sort("created_at", -1)]

    async def revoke(self, key_id: str) -> Doc:
        """By the id shown in the listing (the first 16 hex digits of the hash)."""
        if not re.fullmatch(r"[0-9a-f]{16}", key_id):
            raise InvalidRequest("key id is 16 hex digits (see GET /admin/api-keys)", param="key_id")
        doc = await self._keys.find_one_and_update(
            {"_id": {"$regex": f"^{key_id}"}, "revoked_at": None},
            {"$set": {"revoked_at": self._clock.now()}},
            return_document=True,
        )
        if doc is None:
            raise NotFound(f"no active API key with id {key_id!r}")
        self._cache = {k: v for k, v in self._cache.items() if not k.startswith(key_id)}
        return public(doc)


def public(doc: Doc) -> Doc:
    """What an admin may see of a key: never the hash."""
    view = {k: v for k, v in doc.items() if k != "_id"}
    view["id"] = doc["_id"][:16]
    return view
