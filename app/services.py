"""The running daemon's services, as the HTTP routes see them: all started, none optional.

Built by `Gateway.start` (app/gateway.py) in stages; a route gets this object only once every
stage has started, so no route checks for a service that might be missing.
"""

from __future__ import annotations

from dataclasses import dataclass

from app.audit import AuditLog
from app.auth.api_keys import ApiKeyService
from app.auth.ratelimit import RateLimiter
from app.auth.throttle import LoginThrottle
from app.auth.tokens import TokenService
from app.auth.users import UserService
from app.autoswitch.switcher import Switcher
from app.clock import Clock
from app.dispatch.dispatcher import ModelDispatcher
from app.engines.manager import EngineManager
from app.history.missing import MissingModels
from app.history.usage import UsageRollup
from app.metrics import Metrics
from app.models import ModelRegistry
from app.queue.service import JobQueue
from app.queue.stats import OutcomeCounters
from app.scheduler import Scheduler
from app.settings import Settings
from app.store.database import Database
from app.store.health import DatabaseHealth
from app.usecases.chat import ChatService
from app.usecases.ocr import OcrService


@dataclass(frozen=True)
class Services:
    settings: Settings
    clock: Clock
    registry: ModelRegistry
    tokens: TokenService
    login_throttle: LoginThrottle
    metrics: Metrics
    worker_id: str
    database: Database
    database_health: DatabaseHealth
    queue: JobQueue
    counters: OutcomeCounters
    users: UserService
    api_keys: ApiKeyService
    audit: AuditLog
    rate_limiter: RateLimiter
    engines: EngineManager
    dispatchers: dict[str, ModelDispatcher]
    usage: UsageRollup
    missing: MissingModels
    switcher: Switcher
    scheduler: Scheduler
    chat: ChatService
    ocr: OcrService
