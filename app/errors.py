"""One error hierarchy for the whole daemon.

Domain code raises these; app/api/errors.py is the single place that turns them into HTTP
responses, so status codes never leak into the queue, engines or store.
"""

from __future__ import annotations


class GatewayError(Exception):
    """Base of every error the gateway reports to a client or an operator."""

    code = "gateway_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigError(GatewayError):
    """The configuration cannot be used; the message names the key and the problem."""

    code = "config_error"


class InvalidRequest(GatewayError):
    """The client sent something the gateway cannot accept as it is."""

    code = "invalid_request"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class InvalidJson(InvalidRequest):
    """A body that should be JSON does not parse as JSON."""

    code = "invalid_json"

    def __init__(self, message: str = "request body is not valid JSON") -> None:
        super().__init__(message)


class AuthenticationFailed(GatewayError):
    """Credentials are missing, malformed, forged, expired or wrong."""

    code = "invalid_credentials"


class PermissionDenied(GatewayError):
    """The caller is authenticated but its role does not allow this."""

    code = "permission_denied"


class NotFound(GatewayError):
    """The named resource does not exist (or is not visible to the caller)."""

    code = "not_found"


class UnknownModel(NotFound):
    """No configured model has this name or alias."""

    code = "model_not_found"
    param = "model"

    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(f"unknown model {name!r}; known models: {', '.join(sorted(known)) or 'none'}")
        self.name = name
        self.known = known


class JobNotFound(NotFound):
    """No job with this id is visible to the caller."""

    code = "job_not_found"

    def __init__(self, job_id: str) -> None:
        super().__init__(f"no job with id {job_id!r}")


class JobAlreadyFinished(GatewayError):
    """The job reached a terminal state before it could be cancelled."""

    code = "job_already_finished"

    def __init__(self, job_id: str, state: str) -> None:
        super().__init__(
            f"job {job_id} already ended ({state}); only queued or running jobs can be cancelled"
        )
        self.job_id = job_id
        self.state = state


class IdempotencyConflict(GatewayError):
    """The Idempotency-Key was already used for a different request by the same caller."""

    code = "idempotency_key_reused"

    def __init__(self, job_id: str) -> None:
        super().__init__(
            f"Idempotency-Key was already used for a different request (job {job_id}); use a new key"
        )
        self.job_id = job_id


class QueueFull(GatewayError):
    """Both the in-flight and the waiting capacity of the model are taken; nothing is held."""

    code = "queue_full"

    def __init__(self, model: str, capacity: int, retry_after_s: int) -> None:
        super().__init__(
            f"queue for model {model!r} is full ({capacity} requests in flight or waiting); "
            f"retry after {retry_after_s} s"
        )
        self.retry_after_s = retry_after_s


class ClientShareFull(GatewayError):
    """The client already holds its fair share of the model's places; the queue has room for
    other clients (app/queue/fairness.py). Nothing is held."""

    code = "client_share_exceeded"

    def __init__(
        self, model: str, client: str, held: int, cap: int, capacity: int, retry_after_s: int
    ) -> None:
        super().__init__(
            f"client {client!r} already holds {held} of the {capacity} places of model {model!r}, its "
            f"fair share (at most {cap}); the places left are kept for other clients. Retry after "
            f"{retry_after_s} s, or when one of your requests has ended"
        )
        self.retry_after_s = retry_after_s


class BodyTooLarge(GatewayError):
    """The request body is over the configured size."""

    code = "body_too_large"


class RateLimited(GatewayError):
    """The client used up its requests for the current window."""

    code = "rate_limited"

    def __init__(self, subject: str, limit: int, window_s: float, retry_after_s: int) -> None:
        super().__init__(
            f"rate limit of {limit} requests per {window_s:g} s reached for {subject}; "
            f"retry after {retry_after_s} s"
        )
        self.limit = limit
        self.retry_after_s = retry_after_s


class LoginThrottled(GatewayError):
    """Too many failed logins for a username or from an address."""

    code = "login_throttled"

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ModelUnavailable(GatewayError):
    """The model is configured but cannot serve now (engine stopped, failed or not startable)."""

    code = "model_unavailable"


class UpstreamUnavailable(ModelUnavailable):
    """An external upstream (kind openai) fails its health check; it is served again as soon as
    a check passes, so the client is told when to look again."""

    code = "upstream_unavailable"

    def __init__(self, model: str, reason: str, retry_after_s: int) -> None:
        super().__init__(
            f"model {model!r} is unavailable: its upstream {reason}; it is served again once "
            f"its health check passes (checked every {retry_after_s} s)"
        )
        self.retry_after_s = retry_after_s


class EngineStartFailed(ModelUnavailable):
    """An admin start did not lead to a serving engine: the spawn or the load failed, or the
    model was stopped while it loaded. Raised instead of a "started" answer, so a caller that
    asked to wait learns the outcome and its reason without polling GET /admin/models."""

    code = "engine_start_failed"

    def __init__(self, model: str, state: str, reason: str) -> None:
        if state == "failed":
            super().__init__(f"model {model!r} failed to start: {reason}")
        else:
            super().__init__(f"model {model!r} did not start: it is {state} ({reason})")
        self.model = model
        self.state = state


class ModelBusy(GatewayError):
    """The model has work in flight and the operation would cut it; repeat with force."""

    code = "model_busy"


class NotManaged(GatewayError):
    """An admin start or stop of an external upstream (kind openai): the gateway routes to it but
    does not run it, so there is nothing to start or stop here."""

    code = "model_not_managed"

    def __init__(self, model: str, url: str) -> None:
        super().__init__(
            f"model {model!r} is an external upstream ({url}): the gateway routes requests to it but "
            "does not start or stop it; start or stop that server where it runs (it is served "
            "while its health check passes)"
        )
        self.model = model


class JobTimedOut(GatewayError):
    """The job waited in the queue, or ran at the engine, longer than allowed."""

    code = "timeout"

    def __init__(self, message: str, job_id: str) -> None:
        super().__init__(message)
        self.job_id = job_id


class JobFailed(GatewayError):
    """The engine could not produce an answer; status is the engine's own when it gave one."""

    code = "engine_error"

    def __init__(self, message: str, job_id: str, engine_status: int | None) -> None:
        super().__init__(message)
        self.job_id = job_id
        self.engine_status = engine_status


class JobCancelled(GatewayError):
    """The job was cancelled before it produced a result."""

    code = "cancelled"

    def __init__(self, job_id: str) -> None:
        super().__init__(f"job {job_id} was cancelled")
        self.job_id = job_id


class EngineCallError(GatewayError):
    """One call to an engine failed; `retryable` says whether another attempt may succeed."""

    code = "engine_call_failed"

    def __init__(self, message: str, *, retryable: bool, status: int | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.status = status


class NotRunning(GatewayError):
    """A request reached the gateway while its services were not running (starting, stopping)."""

    code = "not_running"

    def __init__(self) -> None:
        super().__init__("the gateway is starting or stopping; retry in a moment")


class DatabaseUnavailable(GatewayError):
    """The database cannot be reached; nothing was admitted."""

    code = "database_unavailable"

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class PlacementFailed(ModelUnavailable):
    """No GPU set can hold the engine now; the message names what is missing and who holds it,
    so an operator can free or add exactly that instead of guessing from a vLLM traceback."""

    code = "insufficient_gpu"

    def __init__(self, model: str, message: str) -> None:
        super().__init__(message)
        self.model = model


class InvalidDocument(InvalidRequest):
    """An uploaded file has a supported type but cannot be read (empty, corrupt, encrypted)."""

    code = "invalid_document"

    def __init__(self, message: str, param: str | None = "file") -> None:
        super().__init__(message, param)


class DocumentTooLarge(GatewayError):
    """A document exceeds a size limit (pixels, pages); refused before it costs memory or time."""

    code = "document_too_large"
