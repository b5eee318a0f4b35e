"""The one mapping from the domain's errors to HTTP responses.

Two body shapes, chosen by path: OpenAI's envelope `{"error": {"message", "type", "param",
"code"}}` under /v1 (so the OpenAI SDK raises the right exception class), and
`{"detail": ..., "code": ...}` everywhere else (FastAPI's convention, which the clients of the
system we re-implement parse). Never a stack trace or an internal path in a body.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pymongo.errors import PyMongoError
from starlette.exceptions import HTTPException as StarletteHTTPException

from app import errors
from app.logs import event

log = logging.getLogger("gateway.api")

_STATUS: list[tuple[type[errors.GatewayError], int]] = [
    (errors.DocumentTooLarge, 413),
    (errors.BodyTooLarge, 413),
    (errors.InvalidRequest, 400),
    (errors.AuthenticationFailed, 401),
    (errors.PermissionDenied, 403),
    (errors.NotFound, 404),
    (errors.QueueFull, 429),
    (errors.RateLimited, 429),
    (errors.LoginThrottled, 429),
    (errors.ModelUnavailable, 503),
    (errors.DatabaseUnavailable, 503),
    (errors.ClientShareFull, 429),
    (errors.NotRunning, 503),
    (errors.JobTimedOut, 504),
    (errors.JobCancelled, 409),
    (errors.IdempotencyConflict, 409),
    (errors.JobAlreadyFinished, 409),
    (errors.ModelBusy, 409),
    (errors.NotManaged, 409),
    (errors.ConfigError, 500),
]

# Codes for errors the framework raises itself (Starlette's HTTPException), by status.
_HTTP_CODES = {
    400: errors.InvalidRequest.code,
    401: errors.AuthenticationFailed.code,
    403: errors.PermissionDenied.code,
    404: errors.NotFound.code,
    405: "method_not_allowed",
    413: errors.BodyTooLarge.code,
    429: errors.RateLimited.code,
}

# Engine answers that describe the client's own request pass through; an engine 401/403/404
# would make a client blame its token or the model name, so those become 502.
_ENGINE_PASSTHROUGH = frozenset({400, 413, 422})

# OpenAI's `error.type` for each status (the SDK picks its exception class by status).
_OPENAI_TYPE = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "server_error",
    503: "service_unavailable",
    504: "timeout_error",
}


def status_of(exc: errors.GatewayError) -> int:
    if isinstance(exc, errors.JobFailed):
        return exc.engine_status if exc.engine_status in _ENGINE_PASSTHROUGH else 502
    for kind, status in _STATUS:
        if isinstance(exc, kind):
            return status
    return 500


def render(
    request: Request,
    status: int,
    detail: Any,
    code: str,
    *,
    param: str | None = None,
    headers: Mapping[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> JSONResponse:
    headers = dict(headers or {})
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    if request.url.path.startswith("/v1/") or request.url.path == "/v1":
        message = (
            detail
            if isinstance(detail, str)
            else "; ".join(f"{'.'.join(str(p) for p in d['loc'])}: {d['msg']}" for d in detail)
        )
        envelope = {
            "message": message,
            "type": _OPENAI_TYPE.get(status, "server_error"),
            "param": param,
            "code": code,
        }
        return JSONResponse({"error": envelope}, status_code=status, headers=headers)
    return JSONResponse(
        {"detail": detail, "code": code, **(extra or {})}, status_code=status, headers=headers
    )


def error_response(request: Request, exc: errors.GatewayError) -> JSONResponse:
    headers: dict[str, str] = {}
    extra: dict[str, Any] = {}
    job_id = getattr(exc, "job_id", None)
    if job_id:
        extra["request_id"] = job_id
        headers["X-Request-ID"] = job_id
    if isinstance(
        exc,
        errors.QueueFull
        | errors.ClientShareFull
        | errors.LoginThrottled
        | errors.UpstreamUnavailable
        | errors.DatabaseUnavailable,
    ):
        headers["Retry-After"] = str(exc.retry_after_s)
    if isinstance(exc, errors.RateLimited):
        headers["Retry-After"] = str(exc.retry_after_s)
        headers["X-RateLimit-Limit"] = str(exc.limit)
        headers["X-RateLimit-Remaining"] = "0"
        headers["X-RateLimit-Reset"] = str(exc.retry_after_s)
    return render(
        request,
        status_of(exc),
        exc.message,
        exc.code,
        param=getattr(exc, "param", None),
        headers=headers,
        extra=extra,
    )


def install(app: FastAPI) -> None:
    @app.exception_handler(errors.GatewayError)
    async def _gateway_error(request: Request, exc: errors.GatewayError) -> JSONResponse:
        return error_response(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = exc.errors()
        if any(p.get("type") == "json_invalid" for p in problems):
            return error_response(request, errors.InvalidJson())
        detail = [
            {"loc": list(p.get("loc", ())), "msg": str(p.get("msg", "")), "type": str(p.get("type", ""))}
            for p in problems
        ]
        first = detail[0]["loc"] if detail else []
        param = ".".join(str(p) for p in first[1:]) if first[:1] == ["body"] else None
        return render(request, 422, detail, "validation_error", param=param or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """The framework's own refusals (no such route, wrong method, a form it cannot parse)
        carry the same codes as the gateway's errors of the same status."""
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        return render(request, exc.status_code, exc.detail, code, headers=exc.headers)

    @app.exception_handler(PyMongoError)
    async def _database(request: Request, exc: PyMongoError) -> JSONResponse:
        event(log, "api.database_error", logging.ERROR, error=exc.__class__.__name__)
        services = getattr(request.app.state.gateway, "services", None)
        if services is not None:  # the next request is refused at once, not after a timeout
            services.database_health.saw_failure(exc)
        return render(
            request,
            503,
            "database unavailable; retry with the same Idempotency-Key",
            "database_unavailable",
            headers={"Retry-After": "1"},
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        event(log, "api.unhandled", logging.ERROR, error=repr(exc))
        log.exception("unhandled error")
        return render(request, 500, "internal error", "internal_error")
