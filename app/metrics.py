"""The metrics port: what the services report (finished jobs, rejections, retries, durations,
engine crashes and loads), as calls that do nothing here.

Why a port: the queue, the store, the engines and auth report on their hot paths without knowing
how the numbers are kept, and without importing anything above them. The Prometheus adapter
(app/prometheus.py) implements it and is imported only by the composition root and the
/metrics route (import-linter contract); `Metrics` itself is the "metrics off" implementation,
so services call it unconditionally and the bench compares the two (README "Benchmarks").
"""

from __future__ import annotations

from datetime import datetime

OUTCOMES = ("succeeded", "failed", "timeout", "cancelled", "expired")


class Metrics:
    """Metrics off: every call is a no-op (what `metrics.enabled: false` builds)."""

    enabled = False

    def now(self) -> float:
        """A start time for `engine_call` / `db_operation` (monotonic seconds)."""
        return 0.0

    def job_finished(self, model: str, outcome: str) -> None:
        """A terminal transition this instance wrote (outcome: one of OUTCOMES)."""

    def rejected(self, model: str, reason: str) -> None:
        """An admission refused at once (queue_full; rate_limited has no model: "")."""

    def client_admission(self, model: str, client: str, result: str) -> None:
        """What admission did with a client's request (admitted, client_share, queue_full)."""

    def queue_wait(self, model: str, enqueued_at: datetime, started_at: datetime) -> None:
        """A job's first dispatch (enqueue → the engine call begins)."""

    def engine_call(self, model: str, began: float) -> None:
        """One engine call ended (answer or error) after starting at `began`."""

    def first_token(self, model: str, enqueued_at: datetime) -> None:
        """A stream's first content chunk reached the client's handler."""

    def retry(self, model: str) -> None:
        """A job went back to the queue for another attempt."""

    def timeout(self, model: str) -> None:
        """An engine call ran past the model's request_timeout."""

    def engine_crashed(self, model: str) -> None:
        """A ready engine exited or stopped answering its health checks."""

    def engine_restarted(self, model: str) -> None:
        """The supervisor started a crashed engine again."""

    def engine_loaded(self, model: str, seconds: float) -> None:
        """An engine became ready `seconds` after its start."""

    def db_operation(self, operation: str, began: float) -> None:
        """A timed store operation (batch_write, claim) ended."""

    def loop_lag(self, seconds: float) -> None:
        """How late the event loop ran a timer (the lag monitor's last sample)."""
