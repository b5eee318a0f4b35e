"""JWT access and refresh tokens, HS256 pinned.

Decoding accepts only HS256 (never `none` or an asymmetric algorithm an attacker could
swap in) and requires exp, iat, sub, iss and aud, so every malformed, forged or expired token
becomes one AuthenticationFailed, which the API maps to 401, never to a 500.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

import jwt

from app.clock import Clock
from app.errors import AuthenticationFailed

TokenUse = Literal["access", "refresh"]


@dataclass(frozen=True)
class Principal:
    """Who is calling: a user (JWT) or a service (API key, subject `key:<name>`)."""

    subject: str
    role: str
    models: frozenset[str] | None = None  # an API key's scope; None = every model
    rate_limit_per_minute: int | None = None  # an API key's own limit
    key_id: str | None = None
    issued_at: int | None = None  # a token's `iat` (seconds): tokens older than a password change fail

    def may_use(self, model: str) -> bool:
        return self.models is None or model in self.models

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


class TokenService:
    def __init__(
        self, secret: str, issuer: str, audience: str, access_ttl_s: int, refresh_ttl_s: int, clock: Clock
    ):
        self._secret = secret
        self._issuer = issuer
        self._audience = audience
        self.access_ttl_s = access_ttl_s
        self._refresh_ttl_s = refresh_ttl_s
        self._clock = clock

    def issue(self, subject: str, role: str, use: TokenUse = "access") -> str:
        now = self._clock.now()
        ttl = self.access_ttl_s if use == "access" else self._refresh_ttl_s
        claims: dict[str, Any] = {
            "sub": subject,
            "role": role,
            "use": use,
            "iss": self._issuer,
            "aud": self._audience,
            "iat": int(now.timestamp()),
            "exp": int((now + timedelta(seconds=ttl)).timestamp()),
            "jti": secrets.token_hex(12),
        }
        return jwt.encode(claims, self._secret, algorithm="HS256")

    def verify(self, token: str, use: TokenUse = "access") -> Principal:
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=["HS256"],
                audience=self._audience,
                issuer=self._issuer,
                # expiry is checked below against the injected clock, not the machine's
                options={
                    "require": ["exp", "iat", "sub", "iss", "aud"],
                    "verify_iat": False,
                    "verify_exp": False,
                },
            )
        except (jwt.PyJWTError, ValueError):  # ValueError: text that is not UTF-8 (a lone surrogate)
            raise AuthenticationFailed("token is invalid") from None
        if claims.get("use", "access") != use or not isinstance(claims.get("role"), str):
            raise AuthenticationFailed("token is invalid")
        if not isinstance(claims["exp"], int) or not isinstance(claims["iat"], int):
            raise AuthenticationFailed("token is invalid")
        if claims["exp"] <= int(self._clock.now().timestamp()):
            raise AuthenticationFailed("token has expired; request a new one at /auth/token")
        return Principal(subject=str(claims["sub"]), role=claims["role"], issued_at=claims["iat"])
