"""401/403 paths and bad input: always a clear 4xx, never a 500, and nothing admitted."""

from __future__ import annotations

import time

import jwt
import pytest

from tests.conftest import ADMIN_PASSWORD, JWT_SECRET, GatewayClient, GatewayFactory, stub


@pytest.fixture
async def gw(gateway_factory: GatewayFactory) -> GatewayClient:
    return await gateway_factory({"demo": stub(aliases=["demo-chat"])})


def _claims(**overrides: object) -> dict[str, object]:
    now = int(time.time())
    claims: dict[str, object] = {
        "sub": "alice",
        "role": "client",
        "iss": "model-gateway",
        "aud": "model-gateway-clients",
        "iat": now,
        "exp": now + 600,
    }
    claims.update(overrides)
    return claims


BODY = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}


async def test_token_endpoint_issues_working_tokens(gw: GatewayClient) -> None:
    response = await gw.http.post("/auth/token", data={"username": "admin", "password": ADMIN_PASSWORD})
    assert response.status_code == 200
    body = response.json()
    assert body["token_type"] == "bearer"
    assert body["expires_in"] == 3600
    queue = await gw.http.get(
        "/admin/queue/demo", headers={"Authorization": f"Bearer {body['access_token']}"}
    )
    assert queue.status_code == 200
    refreshed = await gw.http.post("/auth/refresh", json={"refresh_token": body["refresh_token"]})
    assert refreshed.status_code == 200
    assert refreshed.json()["access_token"] != body["access_token"]


@pytest.mark.parametrize(
    ("username", "password"), [("admin", "wrong-password"), ("nobody", "whatever-it-is")]
)
async def test_bad_credentials_are_401(gw: GatewayClient, username: str, password: str) -> None:
    response = await gw.http.post("/auth/token", data={"username": username, "password": password})
    assert response.status_code == 401
    assert response.json()["detail"] == "incorrect username or password"


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (None, "missing credentials"),
        ("Token abc", "must be: Bearer"),
        ("Bearer not-a-jwt", "token is invalid"),
        (
            "Bearer "
            + jwt.encode(_claims(), "another-secret-that-is-long-enough-to-sign", algorithm="HS256"),
            "token is invalid",
        ),
        ("Bearer " + jwt.encode(_claims(exp=int(time.time()) - 5), JWT_SECRET, algorithm="HS256"), "expired"),
        (
            "Bearer " + jwt.encode(_claims(aud="someone-else"), JWT_SECRET, algorithm="HS256"),
            "token is invalid",
        ),
        ("Bearer " + jwt.encode(_claims(), key="", algorithm="none"), "token is invalid"),
        ("Bearer " + jwt.encode(_claims(), JWT_SECRET, algorithm="HS512"), "token is invalid"),
    ],
    ids=[
        "missing",
        "wrong-scheme",
        "garbage",
        "forged",
        "expired",
        "wrong-audience",
        "alg-none",
        "alg-hs512",
    ],
)
async def test_bad_tokens_are_401_never_500(gw: GatewayClient, header: str | None, message: str) -> None:
    headers = {"X-Client-ID": "tests"} | ({"Authorization": header} if header else {})
    response = await gw.http.post("/api/chat", json=BODY, headers=headers)
    assert response.status_code == 401, response.text
    assert message in response.json()["detail"]
    assert response.headers["WWW-Authenticate"] == "Bearer"


async def test_refresh_token_is_not_an_access_token(gw: GatewayClient) -> None:
    refresh = gw.gateway.tokens.issue("alice", "client", "refresh")
    response = await gw.http.post("/api/chat", json=BODY, headers=gw.headers(refresh))
    assert response.status_code == 401


async def test_client_role_cannot_use_admin_endpoints(gw: GatewayClient) -> None:
    for path in ("/admin/queue/demo", "/admin/models"):
        response = await gw.http.get(path, headers=gw.headers())
        assert response.status_code == 403
        assert "admin role" in response.json()["detail"]


async def test_jobs_are_visible_to_owner_and_admin_only(gw: GatewayClient) -> None:
    job_id = (await gw.chat("demo", token=gw.admin_token)).json()["id"]
    assert (await gw.http.get(f"/api/jobs/{job_id}", headers=gw.headers(gw.admin_token))).status_code == 200
    hidden = await gw.http.get(f"/api/jobs/{job_id}", headers=gw.headers())
    assert hidden.status_code == 404


@pytest.mark.parametrize(
    ("headers", "body", "status", "message"),
    [
        ({"X-Priority": "urgent"}, BODY, 400, "X-Priority must be one of high, normal, low"),
        ({"X-Client-ID": ""}, BODY, 400, "X-Client-ID header is required"),
        ({"X-Client-ID": "bad client id!"}, BODY, 400, "X-Client-ID must be"),
        ({}, {**BODY, "model": "gpt-99"}, 404, "known models: demo"),
        ({}, {**BODY, "messages": []}, 422, "at least 1 item"),
        ({}, {**BODY, "max_token": 5}, 422, "Extra inputs are not permitted"),
        ({}, {**BODY, "max_tokens": 0}, 422, "greater than or equal to 1"),
        ({}, {**BODY, "temperature": 9}, 422, "less than or equal to 2"),
        ({}, {**BODY, "messages": [{"role": "wizard", "content": "x"}]}, 422, "Input should be"),
        ({}, {"messages": BODY["messages"]}, 422, "Field required"),
        ({}, {**BODY, "stream": True}, 400, "use POST /v1/chat/completions"),
        ({"Idempotency-Key": "k" * 200}, BODY, 400, "Idempotency-Key must be"),
    ],
    ids=[
        "priority",
        "no-client-id",
        "client-id-charset",
        "unknown-model",
        "empty-messages",
        "unknown-field",
        "max-tokens-0",
        "temperature",
        "bad-role",
        "no-model",
        "stream",
        "long-idempotency-key",
    ],
)
async def test_bad_input_is_a_clear_4xx_and_admits_nothing(
    gw: GatewayClient, headers: dict[str, str], body: dict[str, object], status: int, message: str
) -> None:
    response = await gw.http.post("/api/chat", json=body, headers={**gw.headers(), **headers})
    assert response.status_code == status, response.text
    assert message in str(response.json()["detail"])
    assert await gw.count("demo", "queued") + await gw.count("demo", "running") == 0
    database = gw.services.database
    assert database is not None
    assert await database.jobs.count_documents({}) == 0


async def test_body_that_is_not_json_is_400(gw: GatewayClient) -> None:
    headers = {**gw.headers(), "Content-Type": "application/json"}
    response = await gw.http.post("/api/chat", content=b"{not json", headers=headers)
    assert response.status_code == 400
    assert response.json()["detail"] == "request body is not valid JSON"


async def test_unknown_job_is_404(gw: GatewayClient) -> None:
    response = await gw.http.get("/api/jobs/job_nope", headers=gw.headers())
    assert response.status_code == 404
    assert "job_nope" in response.json()["detail"]


async def test_health_needs_no_auth_and_says_healthy(gw: GatewayClient) -> None:
    body = (await gw.http.get("/health")).json()
    assert body["status"] == "healthy"
    assert body["database"] == "ok"
    assert body["engines"]["demo"]["state"] == "ready"
    assert "timestamp" in body
