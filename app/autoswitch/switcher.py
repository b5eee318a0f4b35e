"""The auto-switch loop: gather the policy's inputs, decide, apply through the supervisor, log.

The policy (app/autoswitch/policy.py) is pure; this is the only part with I/O. It runs on the
gateway's scheduler every `interval_s`, and also `miss_delay_s` after a request found its
model not loaded (at most one such run pending), so a model asked for in vain does not wait
for the next interval. Runs never overlap (a lock), and on a host with several gateways only
the holder of the host's lease in `leaders` decides (docs/ARCHITECTURE.md, "Several hosts"):
engines belong to a host.

Every applied evaluation is stored in `autoswitch_decisions` (15-day TTL) with its inputs and
reasons; a dry run (`POST /admin/autoswitch/evaluate`) is returned, not stored or applied. The
enabled flag and the time of each model's last switch (the cooldown) live in
`runtime_settings`, so an operator's choice and the cooldown survive a restart.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
from collections import Counter
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from pymongo.asynchronous.collection import AsyncCollection

from app.autoswitch.inputs import Capacity, Decision, ModelView, PolicyConfig, Usage
from app.autoswitch.policy import decide
from app.clock import Clock
from app.engines.commands import engine_needs_gpu
from app.engines.manager import EngineManager
from app.engines.placement import required_bytes
from app.errors import GatewayError
from app.history.missing import MissingModels
from app.history.usage import UsageRollup
from app.logs import event
from app.queue.job import JobState
from app.queue.store import JobStore
from app.settings import AutoSwitchSettings
from app.store.lease import Lease
from app.store.ttl import ensure_ttl_index

Doc = dict[str, Any]
log = logging.getLogger("gateway.autoswitch")
STATE_ID = "autoswitch"


@dataclass(frozen=True)
class Evaluation:
    """A decision with the inputs it was taken on, as stored and shown."""

    decision: Decision
    trigger: str
    inputs: Doc

    def as_dict(self) -> Doc:
        return {**self.decision.as_dict(), "trigger": self.trigger, "inputs": self.inputs}


class Switcher:
    def __init__(
        self,
        settings: AutoSwitchSettings,
        engines: EngineManager,
        jobs: JobStore,
        usage: UsageRollup,
        missing: MissingModels,
        decisions: AsyncCollection[Doc],
        runtime_settings: AsyncCollection[Doc],
        leaders: AsyncCollection[Doc],
        clock: Clock,
        worker_id: str,
        retention_days: float,
    ) -> None:
        self._settings = settings
        self.config: PolicyConfig = settings.policy()
        self._engines = engines
        self._jobs = jobs
        self._usage = usage
        self._missing = missing
        self._decisions = decisions
        self._state = runtime_settings
        self._clock = clock
        self._worker = worker_id
        self._retention = timedelta(days=retention_days)
        self._lease = Lease(leaders, f"autoswitch@{socket.gethostname()}", worker_id, clock)
        self.enabled = settings.enabled
        self.last_run: datetime | None = None
        self._last_switch: dict[str, datetime] = {}
        self._lock = asyncio.Lock()
        self._miss_task: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[Any]] = set()
        self._stopped = False

    @property
    def eligible(self) -> list[str]:
        names = self._settings.models
        if names is not None:
            return list(names)
        return [n for n, e in self._engines.engines.items() if engine_needs_gpu(e.settings.kind)]

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Restore the operator's enabled flag and the cooldown from the last run."""
        await self._decisions.create_index([("at", -1)], name="decisions_recent")
        await ensure_ttl_index(self._decisions, "decisions_ttl")
        state = await self._state.find_one({"_id": STATE_ID})
        if state is not None:
            self.enabled = bool(state.get("enabled", self.enabled))
            self._last_switch = dict(state.get("last_switch", {}))

    async def stop(self) -> None:
        """No new runs; a run in progress finishes (a stop half-applied is worse); lease freed."""
        self._stopped = True
        if self._miss_task is not None and not self._miss_task.done():
            self._miss_task.cancel()
        if self._running:
            await asyncio.wait(list(self._running), timeout=30)
        await self._lease.release()

    async def set_enabled(self, enabled: bool) -> None:
        self.enabled = enabled
        await self._state.update_one({"_id": STATE_ID}, {"$set": {"enabled": enabled}}, upsert=True)
        event(log, "autoswitch.enabled" if enabled else "autoswitch.disabled")

    # -- triggers ----------------------------------------------------------------------------

    async def run_scheduled(self) -> Evaluation | None:
        return await self._run("interval")

    def note_miss(self, model: str) -> None:
        """A request found `model` not loaded: evaluate soon rather than at the next interval."""
        if self._stopped or not self.enabled or self.config.miss_delay_s <= 0:
            return
        if self._miss_task is not None and not self._miss_task.done():
            return
        self._miss_task = asyncio.create_task(self._after_miss(model), name="autoswitch-miss")

    async def _after_miss(self, model: str) -> None:
        await asyncio.sleep(self.config.miss_delay_s)
        try:
            await self._run(f"miss:{model}")
        except Exception as exc:  # a failed pass is logged; the interval run tries again
            event(log, "autoswitch.run_failed", logging.WARNING, error=repr(exc))

    async def _run(self, trigger: str) -> Evaluation | None:
        if self._stopped or not self.enabled:
            return None
        task = asyncio.current_task()
        if task is not None:
            self._running.add(task)
        try:
            async with self._lock:
                if not await self._lead():
                    return None
                evaluation = await self.evaluate(trigger)
                applied = await self._apply(evaluation.decision)
                await self._record(evaluation, applied)
                return evaluation
        finally:
            if task is not None:
                self._running.discard(task)

    async def _lead(self) -> bool:
        """Hold this host's lease (renewed each run) or leave the decision to its holder."""
        return await self._lease.hold(2 * self.config.interval_s + 60)

    # -- evaluation --------------------------------------------------------------------------

    async def evaluate(self, trigger: str = "dry_run") -> Evaluation:
        """Gather inputs and decide; applies nothing (the dry run of the admin API)."""
        now = self._clock.now()
        self.last_run = now
        config = self.config
        since = now - timedelta(days=config.window_days, hours=1)
        hourly = await self._usage.hourly(since)
        recent = await self._usage.recent(now - timedelta(seconds=config.recent_window_s))
        missing = await self._missing.configured_since(now - timedelta(seconds=config.recent_window_s))
        capacity, costs, unplaceable = self._capacity()
        eligible = set(self.eligible) - unplaceable
        live = await self._jobs.occupancy()  # one query, all models
        busy = Counter(
            {
                name: live.of(name, JobState.RUNNING) + live.of(name, JobState.QUEUED)
                for name in self._engines.engines
            }
        )
        views = []
        for name, engine in self._engines.engines.items():
            views.append(
                ModelView(
                    name=name,
                    state=engine.state.value,
                    cost=costs[name],
                    busy=busy[name],
                    eligible=name in eligible,
                    load_seconds=engine.load_seconds,
                    last_switch=self._last_switch.get(name),
                )
            )
        known = set(self._engines.engines)
        decision = decide(
            config,
            Usage(hourly=hourly, recent=recent),
            views,
            capacity,
            now,
            missing={m: n for m, n in missing.items() if m in known},
        )
        if unplaceable:
            names = ", ".join(sorted(unplaceable))
            reason = self._engines.inventory.reason or "no GPU was found on this machine"
            note = f"not managed: {names} (needs a GPU; {reason})"
            decision = replace(decision, notes=(note, *decision.notes))
        inputs = {
            "capacity": {"budget": capacity.budget, "unit": "slots" if self._settings.slots else "bytes"},
            "models": [
                {"name": v.name, "state": v.state, "cost": v.cost, "busy": v.busy, "eligible": v.eligible}
                for v in views
            ],
            "recent_requests": recent,
            "missing_requests": missing,
        }
        return Evaluation(decision, trigger, inputs)

    def _capacity(self) -> tuple[Capacity, dict[str, int], set[str]]:
        """The budget, each model's cost and the GPU models that cannot be placed at all (no
        GPU here): slots when configured, else GPU memory in bytes (what placement would reserve
        on the first GPU the model may use, times its count)."""
        eligible = set(self.eligible)
        engines = self._engines.engines
        if self._settings.slots is not None:
            return Capacity.slots(self._settings.slots), {n: int(n in eligible) for n in engines}, set()
        gpus = self._engines.inventory.snapshot()
        by_index = {g.index: g for g in gpus}
        costs: dict[str, int] = {}
        unplaceable: set[str] = set()
        for name, engine in engines.items():
            needs, kind = engine.settings.gpu, engine.settings.kind
            if not engine_needs_gpu(kind) or not gpus:
                costs[name] = 0
                if engine_needs_gpu(kind) and name in eligible:
                    unplaceable.add(name)
                continue
            first = next((by_index[i] for i in needs.devices or [] if i in by_index), gpus[0])
            costs[name] = needs.count * required_bytes(needs, first)
        return Capacity(sum(g.total_bytes for g in gpus)), costs, unplaceable

    # -- applying ----------------------------------------------------------------------------

    async def _apply(self, decision: Decision) -> list[Doc]:
        """Stops first (each confirmed: port closed, GPU memory freed), then starts. A stop that
        fails (the model got busy since the decision) cancels the starts that needed its room."""
        results: list[Doc] = []
        blocked = ""
        for action in decision.actions:
            outcome: Doc = {"kind": action.kind, "model": action.model}
            if blocked:
                results.append({**outcome, "ok": False, "error": blocked})
                continue
            try:
                if action.kind == "stop":
                    await self._engines.stop(
                        action.model, force=False, reason=f"auto-switch: {action.reason}"
                    )
                else:
                    self._engines.begin_start(action.model)
            except GatewayError as exc:
                results.append({**outcome, "ok": False, "error": exc.message})
                if action.kind == "stop":
                    blocked = f"not started: stopping {action.model} failed ({exc.message})"
                event(log, "autoswitch.action_failed", logging.WARNING, **outcome, error=exc.message)
                continue
            self._last_switch[action.model] = decision.at
            results.append({**outcome, "ok": True})
            event(log, f"autoswitch.{action.kind}", model=action.model, reason=action.reason)
        if any(r["ok"] for r in results):
            await self._state.update_one(
                {"_id": STATE_ID}, {"$set": {"last_switch": self._last_switch}}, upsert=True
            )
        return results

    async def _record(self, evaluation: Evaluation, applied: list[Doc]) -> None:
        at = evaluation.decision.at
        await self._decisions.insert_one(
            {
                "_id": f"dec_{at.strftime('%Y%m%dT%H%M%S')}_{secrets.token_hex(4)}",
                **evaluation.as_dict(),
                "at": at,
                "applied": applied,
                "worker": self._worker,
                "expire_at": at + self._retention,
            }
        )

    async def recent_decisions(self, limit: int = 20) -> list[Doc]:
        cursor = self._decisions.find({}, {"expire_at": 0}).sort("at", -1).limit(limit)
        return [doc async for doc in cursor]
