"""Users in the `users` collection with argon2 password hashes (pwdlib)."""

from __future__ import annotations

import asyncio
import re
from typing import Any

from pwdlib import PasswordHash
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import DuplicateKeyError

from app.auth.tokens import Principal
from app.clock import Clock
from app.errors import AuthenticationFailed, InvalidRequest, NotFound

Doc = dict[str, Any]
ROLES = ("admin", "client")
_USERNAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
STATUS_CACHE_SECONDS = 5.0


class UserService:
    def __init__(self, users: AsyncCollection[Doc], clock: Clock) -> None:
        self._users = users
        self._clock = clock
        self._hasher = PasswordHash.recommended()
        # Verified against when the user does not exist, so timing does not reveal usernames.
        self._dummy_hash = self._hasher.hash("not-a-real-password-" + "x" * 16)
        # user -> (checked at, role or None, tokens issued before this second are void)
        self._status: dict[str, tuple[float, str | None, int]] = {}

    async def create(self, username: str, password: str, role: str) -> Doc:
        if not _USERNAME.match(username):
            raise InvalidRequest(
                "username must be 1-64 characters of letters, digits, _ . @ -", param="username"
            )
        if role not in ROLES:
            raise InvalidRequest(f"role must be one of {', '.join(ROLES)}", param="role")
        if len(password) < 12:
            raise InvalidRequest("password must be at least 12 characters", param="password")
        doc = {
            "_id": username,
            "role": role,
            "disabled": False,
            "created_at": self._clock.now(),
            "password_hash": await asyncio.to_thread(self._hasher.hash, password),
        }
        try:
            await self._users.insert_one(doc)
        except DuplicateKeyError:
            raise InvalidRequest(f"user {username!r} already exists", param="username") from None
        return {k: v for k, v in doc.items() if k != "password_hash"}

    async def authenticate(self, username: str, password: str) -> Principal:
        doc = await self._users.find_one({"_id": username}) if _USERNAME.match(username) else None
        stored = doc["password_hash"] if doc else self._dummy_hash
        valid = await asyncio.to_thread(self._hasher.verify, password, stored)
        if not doc or not valid or doc.get("disabled"):
            raise AuthenticationFailed("incorrect username or password")
        return Principal(subject=username, role=doc["role"])

    async def active_principal(self, claimed: Principal) -> Principal:
        """The user a refresh token names, read now: it must exist, be enabled, and not have
        changed its password since the token was issued."""
        doc = await self._users.find_one(
            {"_id": claimed.subject}, {"role": 1, "disabled": 1, "tokens_after": 1}
        )
        if not doc or doc.get("disabled") or _predates(claimed, int(doc.get("tokens_after", 0))):
            raise AuthenticationFailed("token is invalid")
        return Principal(subject=claimed.subject, role=doc["role"])

    async def check_token_holder(self, claimed: Principal) -> Principal:
        """A token stays valid only while its user exists, is enabled and keeps that role.

        Cached for a few seconds per user so a request costs no extra round trip; a change
        made through this instance applies at once, one made elsewhere within the cache time.
        """
        now = self._clock.monotonic()
        cached = self._status.get(claimed.subject)
        if cached is None or now - cached[0] >= STATUS_CACHE_SECONDS:
            doc = await self._users.find_one(
                {"_id": claimed.subject}, {"role": 1, "disabled": 1, "tokens_after": 1}
            )
            role = None if doc is None or doc.get("disabled") else str(doc["role"])
            cached = (now, role, int(doc.get("tokens_after", 0)) if doc else 0)
            self._status[claimed.subject] = cached
        if cached[1] is None:
            raise AuthenticationFailed("token is invalid: the user is disabled or deleted")
        if cached[1] != claimed.role:
            raise AuthenticationFailed("token is invalid: the user's role changed; log in again")
        if _predates(claimed, cached[2]):
            raise AuthenticationFailed("token is invalid: the password was changed; log in again")
        return claimed

    async def list(self) -> list[Doc]:
        return [doc async for doc in self._users.find({}, {"password_hash": 0}).sort("_id", 1)]

    async def update(self, username: str, *, disabled: bool | None = None, role: str | None = None) -> Doc:
        changes: Doc = {}
        if disabled is not None:
            changes["disabled"] = disabled
        if role is not None:
            if role not in ROLES:
                raise InvalidRequest(f"role must be one of {', '.join(ROLES)}", param="role")
            changes["role"] = role
        if not changes:
            raise InvalidRequest("nothing to change: send disabled and/or role", param="disabled")
        return await self._change(username, changes)

    async def reset_password(self, username: str, password: str) -> Doc:
        if len(password) < 12:
            raise InvalidRequest("password must be at least 12 characters", param="password")
        # every token issued before now stops working (sessions of whoever knew the old password)
        return await self._change(
            username,
            {
                "password_hash": await asyncio.to_thread(self._hasher.hash, password),
                "tokens_after": int(self._clock.now().timestamp()),
            },
        )

    async def _change(self, username: str, changes: Doc) -> Doc:
        doc = await self._users.find_one_and_update(
            {"_id": username},
            {"$set": changes},
            projection={"password_hash": 0, "tokens_after": 0},
            return_document=True,
        )
        if doc is None:
            raise NotFound(f"no user {username!r}")
        self._status.pop(username, None)
        return doc


def _predates(claimed: Principal, tokens_after: int) -> bool:
    """Issued in a second before the user's last password change (API keys carry no `iat`)."""
    return claimed.issued_at is not None and claimed.issued_at < tokens_after
