"""The one mapping from the domain's errors to HTTP responses.

`{"detail": ...}` everywhere (FastAPI's convention, which the clients we stay compatible with
parse); never a stack trace or an internal path in a body.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pymongo.errors import PyMongoError
from starlette.exceptions import HTTPException as StarletteHTTPException

from app import errors
from app.logs import event

log = logging.getLogger("gateway.api")

_STATUS: list[tuple[type[errors.GatewayError], int]] = [
    (errors.InvalidRequest, 400),
    (errors.AuthenticationFailed, 401),
    (errors.PermissionDenied, 403),
    (errors.NotFound, 404),
    (errors.QueueFull, 429),
    (errors.ModelUnavailable, 503),
    (errors.DatabaseUnavailable, 503),
    (errors.JobTimedOut, 504),
    (errors.JobCancelled, 409),
    (errors.IdempotencyConflict, 409),
    (errors.ConfigError, 500),
]


# Engine answers that describe the client's own request pass through; an engine 401/403/404
# would make a client blame its token or the model name, so those become 502.
_ENGINE_PASSTHROUGH = frozenset({400, 413, 422})


def status_of(exc: errors.GatewayError) -> int:
    if isinstance(exc, errors.JobFailed):
        return exc.engine_status if exc.engine_status in _ENGINE_PASSTHROUGH else 502
    for kind, status in _STATUS:
        if isinstance(exc, kind):
            return status
    return 500


def error_response(exc: errors.GatewayError) -> JSONResponse:
    status = status_of(exc)
    body: dict[str, object] = {"detail": exc.message, "code": exc.code}
    headers: dict[str, str] = {}
    job_id = getattr(exc, "job_id", None)
    if job_id:
        body["request_id"] = job_id
        headers["X-Request-ID"] = job_id
    if isinstance(exc, errors.QueueFull):
        headers["Retry-After"] = str(exc.retry_after_s)
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(body, status_code=status, headers=headers)


def install(app: FastAPI) -> None:
    @app.exception_handler(errors.GatewayError)
    async def _gateway_error(_: Request, exc: errors.GatewayError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = exc.errors()
        if any(p.get("type") == "json_invalid" for p in problems):
            return JSONResponse(
                {"detail": "request body is not valid JSON", "code": "invalid_json"}, status_code=400
            )
        detail = [
            {"loc": list(p.get("loc", ())), "msg": str(p.get("msg", "")), "type": str(p.get("type", ""))}
            for p in problems
        ]
        return JSONResponse({"detail": detail, "code": "validation_error"}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(
            {"detail": exc.detail, "code": code}, status_code=exc.status_code, headers=exc.headers
        )

    @app.exception_handler(PyMongoError)
    async def _database(_: Request, exc: PyMongoError) -> JSONResponse:
        event(log, "api.database_error", logging.ERROR, error=exc.__class__.__name__)
        return JSONResponse(
            {
                "detail": "database unavailable; retry with the same Idempotency-Key",
                "code": "database_unavailable",
            },
            status_code=503,
            headers={"Retry-After": "1"},
        )

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        event(log, "api.unhandled", logging.ERROR, error=repr(exc))
        log.exception("unhandled error")
        return JSONResponse({"detail": "internal error", "code": "internal_error"}, status_code=500)
