"""Response hardening and the request-body cap, as one small ASGI middleware.

Security headers on every answer (the API serves JSON and event streams, never pages a
browser should render or frame), and JSON bodies capped at `server.max_body_bytes`: refused
from Content-Length before a byte is read, or with 413 the moment a chunked body passes it.
Document uploads have their own, larger limit (checked by the OCR routes while reading).
The caller's X-RateLimit-* headers, left in the request state by authentication, go on every
answer that does not carry its own (a 429 does), whatever the route returned.
"""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import BodyTooLarge

RATE_LIMIT_STATE = "rate_limit_headers"  # request.state attribute: {header: value}

SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'"),
    (b"cross-origin-resource-policy", b"same-origin"),
]


class Hardening:
    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        limited = not _is_upload(scope["path"], headers.get(b"content-type", b""))
        declared = headers.get(b"content-length", b"")
        if limited and declared.isdigit() and int(declared) > self.max_body_bytes:
            await _refuse(send, self.max_body_bytes, int(declared))
            return

        state: dict[str, object] = scope.setdefault("state", {})

        async def send_hardened(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {name.lower() for name, _ in message.get("headers", [])}
                extra = [(n, v) for n, v in SECURITY_HEADERS if n not in names]
                if b"cache-control" not in names:
                    extra.append((b"cache-control", b"no-store"))
                rate = state.get(RATE_LIMIT_STATE)
                if isinstance(rate, dict) and b"x-ratelimit-limit" not in names:
                    extra += [(str(n).lower().encode(), str(v).encode()) for n, v in rate.items()]
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        seen = 0

        async def receive_counted() -> Message:
            nonlocal seen
            message = await receive()
            if limited and message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:
                    raise BodyTooLarge(f"request body is over the limit of {self.max_body_bytes} bytes")
            return message

        await self.app(scope, receive_counted, send_hardened)


def _is_upload(path: str, content_type: bytes) -> bool:
    return path == "/api/ocr" or content_type.lower().startswith(b"multipart/form-data")


async def _refuse(send: Send, limit: int, declared: int) -> None:
    body = json.dumps(
        {"detail": f"request body is {declared} bytes; the limit is {limit}", "code": "body_too_large"}
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *SECURITY_HEADERS,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
