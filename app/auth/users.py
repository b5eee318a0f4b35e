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
from app.errors import AuthenticationFailed, InvalidRequest

Doc = dict[str, Any]
ROLES = ("admin", "client")
_USERNAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")


class UserService:
    def __init__(self, users: AsyncCollection[Doc], clock: Clock) -> None:
        self._users = users
        self._clock = clock
        self._hasher = PasswordHash.recommended()
        # Verified against when the user does not exist, so timing does not reveal usernames.
        self._dummy_hash = self._hasher.hash("not-a-real-password-" + "x" * 16)

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

    async def active_principal(self, username: str) -> Principal:
        doc = await self._users.find_one({"_id": username}, {"role": 1, "disabled": 1})
        if not doc or doc.get("disabled"):
            raise AuthenticationFailed("token is invalid")
        return Principal(subject=username, role=doc["role"])
