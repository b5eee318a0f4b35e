"""Usage, missing models and auto-switch through the admin API, with real stub engines."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import httpx

from app.autoswitch.switcher import Switcher
from tests.conftest import GatewayClient, GatewayFactory, ShiftedClock, eventually, stub

SWITCHING = {
    "enabled": True,
    "slots": 1,
    "models": ["a", "b"],
    "interval_s": 3600,  # the test drives the runs
    "miss_delay_s": 0,
    "cooldown_s": 600,
}


def switcher_of(gw: GatewayClient) -> Switcher:
    assert gw.services.switcher is not None
    return gw.services.switcher


async def state_of(gw: GatewayClient, model: str) -> str:
    body: dict[str, Any] = (await gw.http.get("/health")).json()
    return str(body["engines"][model]["state"])


async def refused(gw: GatewayClient, model: str, times: int) -> None:
    """Requests for a model that is not loaded: 503 each, recorded as demand."""
    for _ in range(times):
        response = await gw.chat(model)
        assert response.status_code == 503, response.text
    missing = gw.services.missing
    assert missing is not None
    await missing.drain()


async def test_switches_only_when_the_loaded_model_is_idle_and_not_again_within_the_cooldown(
    gateway_factory: GatewayFactory,
) -> None:
    clock = ShiftedClock()
    gw = await gateway_factory(
        {"a": stub("--latency-ms", "1500"), "b": stub(autostart=False)}, clock=clock, autoswitch=SWITCHING
    )
    admin = gw.headers(gw.admin_token)
    switcher = switcher_of(gw)
    await refused(gw, "b", 8)
    busy = asyncio.create_task(gw.chat("a"))
    await gw.until_count("a", "running", 1)

    waiting = await switcher.run_scheduled()
    assert waiting is not None and waiting.decision.actions == ()
    (deferred,) = [d for d in waiting.decision.deferred if d.model == "b"]
    assert "waiting for idle" in deferred.reason and "a busy (1 job)" in deferred.reason
    assert await state_of(gw, "a") == "ready"

    assert (await busy).status_code == 200
    switched = await switcher.run_scheduled()
    assert switched is not None
    assert [(a.kind, a.model) for a in switched.decision.actions] == [("stop", "a"), ("start", "b")]
    await eventually(lambda: state_of(gw, "b"), lambda s: s == "ready", "b ready after the switch")
    assert await state_of(gw, "a") == "stopped"

    listed = (await gw.http.get("/admin/autoswitch", headers=admin)).json()
    latest = listed["decisions"][0]
    assert [(a["kind"], a["model"]) for a in latest["actions"]] == [("stop", "a"), ("start", "b")]
    assert all(a["reason"] for a in latest["actions"])
    assert latest["applied"] == [
        {"kind": "stop", "model": "a", "ok": True},
        {"kind": "start", "model": "b", "ok": True},
    ]
    assert listed["decisions"][1]["deferred"], "the deferred evaluation is in the log too"

    await refused(gw, "a", 20)  # demand moves back to a at once: the cooldown holds
    cooling = await switcher.run_scheduled()
    assert cooling is not None and cooling.decision.actions == ()
    assert any("cooldown until" in d.reason for d in cooling.decision.deferred)
    assert await state_of(gw, "b") == "ready"

    clock.advance(601)
    after = await switcher.run_scheduled()
    assert after is not None
    assert [(a.kind, a.model) for a in after.decision.actions] == [("stop", "b"), ("start", "a")]
    await eventually(lambda: state_of(gw, "a"), lambda s: s == "ready", "a ready after the cooldown")


async def test_a_dry_run_decides_without_applying_or_logging(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory({"a": stub(), "b": stub(autostart=False)}, autoswitch=SWITCHING)
    admin = gw.headers(gw.admin_token)
    await refused(gw, "b", 8)
    response = await gw.http.post("/admin/autoswitch/evaluate", headers=admin)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["dry_run"] is True and body["trigger"] == "dry_run"
    assert [(a["kind"], a["model"]) for a in body["actions"]] == [("stop", "a"), ("start", "b")]
    assert {m["name"]: m["state"] for m in body["inputs"]["models"]} == {"a": "ready", "b": "stopped"}
    assert body["inputs"]["missing_requests"] == {"b": 8}
    assert await state_of(gw, "a") == "ready" and await state_of(gw, "b") == "stopped"
    assert (await gw.http.get("/admin/autoswitch", headers=admin)).json()["decisions"] == []


async def test_enabling_survives_a_restart_and_the_scheduler_runs_it(gateway_factory: GatewayFactory) -> None:
    config = {**SWITCHING, "enabled": False, "interval_s": 0.3}
    gw = await gateway_factory({"a": stub(), "b": stub(autostart=False)}, autoswitch=config)
    admin = gw.headers(gw.admin_token)
    off = (await gw.http.get("/admin/autoswitch", headers=admin)).json()
    assert (off["enabled"], off["next_run"], off["models"]) == (False, None, ["a", "b"])
    assert (await gw.http.post("/admin/autoswitch", json={"enabled": True}, headers=admin)).json() == {
        "enabled": True
    }
    status = await eventually(
        lambda: gw.http.get("/admin/autoswitch", headers=admin),
        lambda r: bool(r.json()["decisions"]),
        "a scheduled evaluation",
    )
    assert status.json()["next_run"] is not None
    assert status.json()["decisions"][0]["trigger"] == "interval"
    audit = (await gw.http.get("/admin/audit", headers=admin)).json()
    entries = audit if isinstance(audit, list) else audit.get("entries", audit.get("items", []))
    assert any(e["action"] == "autoswitch.set" for e in entries), audit
    database = gw.gateway.settings.database
    again = await gateway_factory(
        {"a": stub(), "b": stub(autostart=False)}, database=database.model_dump(), autoswitch=config
    )
    assert switcher_of(again).enabled is True  # the operator's choice, not the config's


async def test_usage_and_missing_models_report_what_happened(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory(
        {"a": stub(), "b": stub(autostart=False)}, history={"rollup_interval_seconds": 0.2}
    )
    admin = gw.headers(gw.admin_token)
    for _ in range(3):
        assert (await gw.chat("a")).status_code == 200
    assert (await gw.chat("no-such-model")).status_code == 404
    await refused(gw, "b", 2)

    def counted(r: httpx.Response) -> bool:
        a: dict[str, Any] = r.json()["models"].get("a", {})
        return a.get("succeeded") == 3

    usage = await eventually(
        lambda: gw.http.get("/admin/usage?window=24h", headers=admin), counted, "the rollup of a's jobs"
    )
    a = usage.json()["models"]["a"]
    assert (a["requests"], a["failed"], a["share"]) == (3, 0, 1.0)
    assert a["engine_ms"]["p50"] is not None and sum(map(sum, a["by_hour_of_week"])) == 3
    missing = (await gw.http.get("/admin/missing-models", headers=admin)).json()
    rows = {(m["model_name"], m["configured"]): m["count"] for m in missing}
    assert rows == {("no-such-model", False): 1, ("b", True): 2}
    assert all(m["client_id"] == "tests" and m["timestamp"] for m in missing)


async def test_bad_input_and_roles(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory({"a": stub()})
    admin, client = gw.headers(gw.admin_token), gw.headers()
    for path in ("/admin/usage", "/admin/missing-models", "/admin/autoswitch"):
        response = await gw.http.get(path, headers=client)
        assert response.status_code == 403, path
    assert (await gw.http.post("/admin/autoswitch/evaluate", headers=client)).status_code == 403
    bad = await gw.http.get("/admin/usage?window=forever", headers=admin)
    assert bad.status_code == 400 and "not a duration" in bad.text
    too_long = await gw.http.get("/admin/usage?window=30d", headers=admin)
    assert too_long.status_code == 400 and "15 days" in too_long.text
    unknown = await gw.http.get("/admin/usage?model=nope", headers=admin)
    assert unknown.status_code == 404
    for body in ({"enabled": "maybe"}, {}, {"enabled": True, "extra": 1}):
        response = await gw.http.post("/admin/autoswitch", json=body, headers=admin)
        assert response.status_code in (400, 422), (body, response.text)
        assert "enabled" in response.text or "extra" in response.text


HISTORY_COLLECTIONS = (
    "jobs",
    "crash_logs",
    "audit_log",
    "ocr_pages",
    "missing_model_requests",
    "usage",
    "autoswitch_decisions",
    "rate_limits",
)


async def test_every_history_collection_expires_its_documents(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory({"a": stub()}, history={"prune": "on", "prune_interval_seconds": 0.2})
    database = gw.services.database
    assert database is not None
    past = gw.gateway.clock.now() - timedelta(seconds=1)
    future = gw.gateway.clock.now() + timedelta(days=1)
    for name in HISTORY_COLLECTIONS:
        collection = database.db.get_collection(name)
        indexes = await collection.index_information()
        ttl = [spec for spec in indexes.values() if "expireAfterSeconds" in spec]
        if name == "jobs":  # pruned by the gateway only: no TTL walk of the big one (app/store/database.py)
            assert ttl == [] and indexes["history_expiry"]["key"] == [("expire_at", 1)]
        else:
            assert [(spec["key"], spec["expireAfterSeconds"]) for spec in ttl] == [([("expire_at", 1)], 0)], (
                name
            )
        await collection.insert_many(
            [{"_id": f"old-{name}", "expire_at": past}, {"_id": f"new-{name}", "expire_at": future}]
        )

    async def left() -> dict[str, list[str]]:
        found: dict[str, list[str]] = {}
        for name in HISTORY_COLLECTIONS:
            found[name] = [d["_id"] async for d in database.db.get_collection(name).find({}, {"_id": 1})]
        return found

    remaining = await eventually(
        left, lambda found: all(f"old-{n}" not in ids for n, ids in found.items()), "expired documents pruned"
    )
    assert all(f"new-{name}" in ids for name, ids in remaining.items()), remaining


async def test_capacity_is_gpu_memory_and_gpu_models_without_a_gpu_are_explained(
    gateway_factory: GatewayFactory,
) -> None:
    gpu_models = {
        "big": {"kind": "vllm", "autostart": False, "gpu": {"count": 1, "memory_fraction": 0.8}},
        "small": {"kind": "vllm", "autostart": False, "gpu": {"count": 1, "memory_fraction": 0.25}},
    }
    gw = await gateway_factory(
        gpu_models, engines={"fake_gpus": [{"name": "fake-a", "total_gib": 40, "free_gib": 40}]}
    )
    body = (await gw.http.post("/admin/autoswitch/evaluate", headers=gw.headers(gw.admin_token))).json()
    gib = 1024**3
    assert body["inputs"]["capacity"] == {"budget": 40 * gib, "unit": "bytes"}
    costs = {m["name"]: (m["cost"], m["eligible"]) for m in body["inputs"]["models"]}
    assert costs == {"big": (32 * gib, True), "small": (10 * gib, True)}

    bare = await gateway_factory(gpu_models)  # no NVIDIA driver on this machine
    body = (await bare.http.post("/admin/autoswitch/evaluate", headers=bare.headers(bare.admin_token))).json()
    assert body["notes"][0].startswith("not managed: big, small (needs a GPU;"), body["notes"]
    assert all(not m["eligible"] for m in body["inputs"]["models"])
    assert body["actions"] == []
