"""Access control end to end: token holders, roles on every admin route, API keys, rate limits,
login throttling, body limits, response headers and the audit log."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import jwt
import pytest

from tests.conftest import ADMIN_PASSWORD, JWT_SECRET, GatewayClient, GatewayFactory, eventually, stub


async def _clock() -> float:
    return datetime.now(UTC).timestamp()


async def _user(gw: GatewayClient, name: str, role: str = "client") -> str:
    assert gw.services.users is not None
    await gw.services.users.create(name, f"{name}-password-long", role)
    return gw.gateway.tokens.issue(name, role)


async def test_disabled_user_and_changed_role_tokens_stop_working(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory({"demo": stub()})
    bob = await _user(gw, "bob")
    assert (await gw.chat("demo", token=bob)).status_code == 200
    admin = gw.headers(gw.admin_token)
    disabled = await gw.http.patch("/admin/users/bob", json={"disabled": True}, headers=admin)
    assert disabled.status_code == 200 and disabled.json()["disabled"] is True
    refused = await gw.chat("demo", token=bob)
    assert refused.status_code == 401 and "disabled" in refused.json()["detail"]
    login = await gw.http.post("/auth/token", data={"username": "bob", "password": "bob-password-long"})
    assert login.status_code == 401

    carol = await _user(gw, "carol")
    await gw.http.patch("/admin/users/carol", json={"role": "admin"}, headers=admin)
    assert (await gw.chat("demo", token=carol)).status_code == 401  # issued for the old role

    no_sub = jwt.encode(
        {"role": "client", "iss": "model-gateway", "aud": "model-gateway-clients", "iat": 1, "exp": 2**31},
        JWT_SECRET,
        algorithm="HS256",
    )
    assert (await gw.chat("demo", token=no_sub)).status_code == 401
    users = (await gw.http.get("/admin/users", headers=admin)).json()
    assert {u["username"]: u["role"] for u in users}["carol"] == "admin"
    assert all("password_hash" not in u for u in users)
    missing = await gw.http.patch("/admin/users/nobody", json={"disabled": True}, headers=admin)
    assert missing.status_code == 404
    nothing = await gw.http.patch("/admin/users/carol", json={}, headers=admin)
    assert nothing.status_code == 400
    short = await gw.http.post("/admin/users", json={"username": "d", "password": "short"}, headers=admin)
    assert short.status_code == 422


async def test_client_gets_403_on_every_admin_route(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory({"demo": stub()})
    assert gw.app is not None
    paths = gw.app.openapi()["paths"]  # every route the app serves, not a list kept by hand
    routes = [(p, m.upper()) for p, ops in paths.items() if p.startswith("/admin") for m in ops]
    assert len(routes) >= 15, routes
    for template, method in routes:
        path = (
            template.replace("{model}", "demo").replace("{username}", "alice").replace("{key_id}", "0" * 16)
        )
        response = await gw.http.request(method, path, headers=gw.headers(), json={})
        assert response.status_code == 403, (method, path, response.text)
        assert response.json()["code"] == "permission_denied"
        anonymous = await gw.http.request(method, path, json={})
        assert anonymous.status_code == 401, (method, path)


async def test_api_keys_scoped_revoked_expired(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory({"a": stub(aliases=["alpha"]), "b": stub()})
    admin = gw.headers(gw.admin_token)
    made = await gw.http.post("/admin/api-keys", json={"name": "svc", "models": ["alpha"]}, headers=admin)
    assert made.status_code == 201, made.text
    key = made.json()["key"]
    assert key.startswith("agw_") and made.json()["models"] == ["a"]
    body = {"messages": [{"role": "user", "content": "hi"}]}
    as_bearer = {"Authorization": f"Bearer {key}", "X-Client-ID": "svc"}
    as_header = {"X-API-Key": key, "X-Client-ID": "svc"}
    ok = await gw.http.post("/api/chat", json={**body, "model": "a"}, headers=as_bearer)
    assert ok.status_code == 200 and ok.json()["message"]["content"] == "stub reply to: hi"
    assert (
        await gw.http.post("/api/chat", json={**body, "model": "a"}, headers=as_header)
    ).status_code == 200
    other = await gw.http.post("/api/chat", json={**body, "model": "b"}, headers=as_header)
    assert other.status_code == 403 and "may not use model 'b'" in other.json()["detail"]
    models = (await gw.http.get("/v1/models", headers=as_header)).json()["data"]
    assert [m["id"] for m in models] == ["a"]
    assert (await gw.http.get("/admin/models", headers=as_header)).status_code == 403

    listed = (await gw.http.get("/admin/api-keys", headers=admin)).json()
    (record,) = listed
    assert "key" not in record and "_id" not in record and record["last_used_at"] is not None
    revoked = await gw.http.delete(f"/admin/api-keys/{record['id']}", headers=admin)
    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
    after = await gw.http.post("/api/chat", json={**body, "model": "a"}, headers=as_header)
    assert after.status_code == 401 and "revoked" in after.json()["detail"]
    again = await gw.http.delete(f"/admin/api-keys/{record['id']}", headers=admin)
    assert again.status_code == 404

    soon = (datetime.now(UTC) + timedelta(seconds=1)).isoformat()
    short = (
        await gw.http.post("/admin/api-keys", json={"name": "brief", "expires_at": soon}, headers=admin)
    ).json()
    brief = {"X-API-Key": short["key"], "X-Client-ID": "svc"}
    assert (await gw.http.post("/api/chat", json={**body, "model": "b"}, headers=brief)).status_code == 200

    async def brief_call() -> int:
        return (await gw.http.post("/api/chat", json={**body, "model": "b"}, headers=brief)).status_code

    await eventually(brief_call, lambda status: status == 401, "the expired key being refused", 10)
    past = await gw.http.post(
        "/admin/api-keys", json={"name": "old", "expires_at": "2001-01-01T00:00:00Z"}, headers=admin
    )
    assert past.status_code == 400 and "in the past" in past.json()["detail"]
    forged = {"X-API-Key": "agw_" + "A" * 43, "X-Client-ID": "svc"}
    assert (await gw.http.post("/api/chat", json={**body, "model": "a"}, headers=forged)).status_code == 401
    junk = {"X-API-Key": "nonsense", "X-Client-ID": "svc"}
    assert (await gw.http.post("/api/chat", json={**body, "model": "a"}, headers=junk)).status_code == 401
    unknown_model = await gw.http.post(
        "/admin/api-keys", json={"name": "x", "models": ["zzz"]}, headers=admin
    )
    assert unknown_model.status_code == 404


async def test_rate_limit_with_headers_and_recovery(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory({"demo": stub()}, rate_limit={"per_minute": 3, "window_seconds": 10})
    # start at the beginning of a window, so all four land in the same one even on a busy machine
    await eventually(_clock, lambda now: now % 10 < 0.5, "the start of a rate-limit window", 15)
    answers = [await gw.chat("demo", f"n{i}") for i in range(4)]
    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    assert [a.headers.get("X-RateLimit-Remaining") for a in answers] == ["2", "1", "0", "0"]
    assert all(a.headers["X-RateLimit-Limit"] == "3" for a in answers)
    limited = answers[3]
    assert int(limited.headers["Retry-After"]) >= 1
    assert "rate limit of 3 requests per 10 s reached for alice" in limited.json()["detail"]
    for _ in range(5):  # admins are exempt by default
        assert (await gw.chat("demo", token=gw.admin_token)).status_code == 200
    # refused until the window ends (a refusal is not counted), then served again
    again = await eventually(
        lambda: gw.chat("demo", "again"), lambda r: r.status_code == 200, "a new rate-limit window", 15
    )
    assert again.headers["X-RateLimit-Remaining"] == "2"
    # the counter is shared through the database: another instance sees the same window
    assert gw.services.rate_limiter is not None
    await gw.services.rate_limiter.sync()
    docs = await gw.services.database.rate_limits.find({}).to_list()
    assert sum(int(d["count"]) for d in docs if d["_id"].startswith("alice|")) >= 4


async def test_api_key_own_rate_limit(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory({"demo": stub()}, rate_limit={"per_minute": 100, "window_seconds": 60})
    admin = gw.headers(gw.admin_token)
    key = (
        await gw.http.post(
            "/admin/api-keys", json={"name": "tight", "rate_limit_per_minute": 1}, headers=admin
        )
    ).json()["key"]
    body = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}
    headers = {"X-API-Key": key, "X-Client-ID": "svc"}
    first = await gw.http.post("/api/chat", json=body, headers=headers)
    second = await gw.http.post("/api/chat", json=body, headers=headers)
    assert (first.status_code, second.status_code) == (200, 429)


async def test_login_throttle(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory({"demo": stub()}, auth={"login_max_failures": 3, "login_window_seconds": 60})
    wrong = {"username": "alice", "password": "not-her-password"}
    statuses = [(await gw.http.post("/auth/token", data=wrong)).status_code for _ in range(3)]
    assert statuses == [401, 401, 401]
    right = await gw.http.post(
        "/auth/token", data={"username": "alice", "password": "client-password-for-tests"}
    )
    assert right.status_code == 429 and int(right.headers["Retry-After"]) > 0
    assert "too many failed logins" in right.json()["detail"]


def _from(gw: GatewayClient, address: str) -> httpx.AsyncClient:
    """A client of the same gateway seen from another address (the ASGI scope's client)."""
    assert gw.app is not None
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=gw.app, client=(address, 40000)), base_url="http://gw"
    )


async def test_a_password_flood_slows_its_address_not_the_owner_elsewhere(
    gateway_factory: GatewayFactory,
) -> None:
    throttled = {"login_max_failures": 3, "login_window_seconds": 60}
    database = "t_throttle_" + secrets.token_hex(4)
    gw = await gateway_factory({"demo": stub()}, auth=throttled, database={"name": database})
    other = await gateway_factory({"demo": stub()}, auth=throttled, database={"name": database})
    wrong = {"username": "admin", "password": "guess"}
    right = {"username": "admin", "password": ADMIN_PASSWORD}
    async with _from(gw, "203.0.113.9") as attacker, _from(gw, "198.51.100.7") as owner:
        assert [(await attacker.post("/auth/token", data=wrong)).status_code for _ in range(3)] == [401] * 3
        refused = await attacker.post("/auth/token", data=right)  # even the right password, from there
        assert (
            refused.status_code == 429 and "for this username from this address" in refused.json()["detail"]
        )
        assert (await owner.post("/auth/token", data=right)).status_code == 200  # the owner, elsewhere
        assert (await owner.post("/auth/token", data=wrong)).status_code == 401  # counted, not locked
        sprayed = await attacker.post("/auth/token", data={"username": "alice", "password": "guess"})
        assert sprayed.status_code == 429 and "for this address" in sprayed.json()["detail"]
    async with _from(other, "203.0.113.9") as attacker_elsewhere:  # another instance, same database
        again = await attacker_elsewhere.post("/auth/token", data=right)
    assert again.status_code == 429 and int(again.headers["Retry-After"]) > 0


async def test_body_limit_headers_and_cors_off(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory({"demo": stub()}, server={"max_body_bytes": 4096})
    big = {"model": "demo", "messages": [{"role": "user", "content": "x" * 10_000}]}
    response = await gw.http.post("/api/chat", json=big, headers=gw.headers())
    assert response.status_code == 413 and "the limit is 4096" in response.json()["detail"]
    health = await gw.http.get("/health", headers={"Origin": "https://evil.example"})
    assert health.headers["X-Content-Type-Options"] == "nosniff"
    assert health.headers["X-Frame-Options"] == "DENY"
    assert health.headers["Cache-Control"] == "no-store"
    assert "access-control-allow-origin" not in health.headers


async def test_admin_actions_are_audited(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory({"demo": stub()})
    admin = gw.headers(gw.admin_token)
    await gw.http.post("/admin/api-keys", json={"name": "audited"}, headers=admin)
    await gw.http.post("/admin/models/demo/stop", headers=admin)
    await gw.http.post("/admin/models/demo/start", params={"wait": "true"}, headers=admin)
    entries: list[dict[str, Any]] = (await gw.http.get("/admin/audit", headers=admin)).json()
    actions = [(e["actor"], e["action"], e["target"]) for e in entries]
    assert actions[:3] == [
        ("admin", "model.start", "demo"),
        ("admin", "model.stop", "demo"),
        ("admin", "api_key.create", "audited"),
    ]
    only = (await gw.http.get("/admin/audit", params={"action": "model.stop"}, headers=admin)).json()
    assert [e["action"] for e in only] == ["model.stop"]


@pytest.mark.parametrize("role", ["client"])
async def test_jobs_of_others_stay_hidden(gateway_factory: GatewayFactory, role: str) -> None:
    gw = await gateway_factory({"demo": stub()})
    bob = await _user(gw, "bob", role)
    job = (await gw.chat("demo")).json()["id"]
    assert (await gw.http.get(f"/api/jobs/{job}", headers=gw.headers(bob))).status_code == 404
    assert (await gw.http.get(f"/api/jobs/{job}", headers=gw.headers(gw.admin_token))).status_code == 200


async def test_password_reset_ends_existing_sessions(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory({"demo": stub()})
    await _user(gw, "dan")
    now = int(datetime.now(UTC).timestamp())

    def old_token(use: str) -> str:
        claims = {
            "sub": "dan",
            "role": "client",
            "use": use,
            "iss": "model-gateway",
            "aud": "model-gateway-clients",
            "iat": now - 60,  # issued before the reset below
            "exp": now + 3600,
        }
        return jwt.encode(claims, JWT_SECRET, algorithm="HS256")

    stolen, stolen_refresh = old_token("access"), old_token("refresh")
    assert (await gw.chat("demo", token=stolen)).status_code == 200
    reset = await gw.http.patch(
        "/admin/users/dan", json={"password": "dan-new-password-2"}, headers=gw.headers(gw.admin_token)
    )
    assert reset.status_code == 200 and "tokens_after" not in reset.json()
    refused = await gw.chat("demo", token=stolen)
    assert refused.status_code == 401 and "password was changed" in refused.json()["detail"]
    again = await gw.http.post("/auth/refresh", json={"refresh_token": stolen_refresh})
    assert again.status_code == 401
    login = await gw.http.post("/auth/token", data={"username": "dan", "password": "dan-new-password-2"})
    assert login.status_code == 200
    assert (await gw.chat("demo", token=login.json()["access_token"])).status_code == 200
    nothing = await gw.http.patch("/admin/users/dan", json={}, headers=gw.headers(gw.admin_token))
    assert nothing.status_code == 400 and "disabled, role and/or password" in nothing.json()["detail"]


async def test_an_api_key_name_is_one_identity(gateway_factory: GatewayFactory) -> None:
    """Jobs and the rate-limit counter belong to `key:<name>`: two usable keys may not share it."""
    gw = await gateway_factory({"demo": stub()})
    admin = gw.headers(gw.admin_token)
    first = await gw.http.post("/admin/api-keys", json={"name": "svc"}, headers=admin)
    assert first.status_code == 201
    second = await gw.http.post("/admin/api-keys", json={"name": "svc"}, headers=admin)
    assert second.status_code == 400 and "an active API key is named 'svc'" in second.json()["detail"]
    assert first.json()["id"] in second.json()["detail"]
    await gw.http.delete(f"/admin/api-keys/{first.json()['id']}", headers=admin)
    rotated = await gw.http.post("/admin/api-keys", json={"name": "svc"}, headers=admin)
    assert rotated.status_code == 201  # the name is free again once its key is revoked
