"""Schemathesis over the gateway's own OpenAPI schema: every operation, valid and invalid data,
as an admin and as a client; no answer may be a 5xx, and every documented answer must match
its schema.

The gateway runs in-process (gateway_factory: a real lifespan, a real database, stub engines)
on the test's event loop. Hypothesis is synchronous, so it runs in a worker thread and hands
each request to the loop; requests are serialised by `requests` (what Schemathesis itself
sends) and delivered through httpx's ASGI transport, so nothing leaves the process.
Bounded and deterministic: a fixed number of examples per operation and mode, derandomized.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import httpx
import hypothesis
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import response_schema_conformance

from app.errors import InvalidRequest
from app.queue.jobs import Submission
from app.queue.priority import Priority
from tests.conftest import GatewayClient, GatewayFactory, stub

# per operation and generation mode; FUZZ_EXAMPLES and FUZZ_SEED widen a run by hand
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "25"))
SEED = os.environ.get("FUZZ_SEED")
SLOW_EXAMPLES = 2  # operations that start or stop an engine process
ENGINE_CONTROL = {"/admin/models/{model}/start", "/admin/models/{model}/stop"}
# Engines are started and stopped only on this stub, which nothing else uses.
SPARE = "spare"
MODELS = ["demo", "ocr", "nope"]  # served, served (OCR stand-in), unknown
# Turning auto-switch on lets it stop the models the rest of the run uses; only `false` is sent.
FIXED_BODIES = {("POST", "/admin/autoswitch"): {"enabled": False}}
SEND_TIMEOUT_S = 30.0


def _send(gw: GatewayClient, loop: asyncio.AbstractEventLoop, kwargs: dict[str, Any]) -> httpx.Response:
    """Serialise as Schemathesis would (requests), send through the app on the test's loop."""
    prepared = requests.Request(
        method=kwargs["method"],
        url=kwargs["url"],
        headers=kwargs.get("headers"),
        params=kwargs.get("params"),
        cookies=kwargs.get("cookies"),
        json=kwargs.get("json"),
        data=kwargs.get("data"),
        files=kwargs.get("files"),
    ).prepare()
    assert prepared.method is not None and prepared.url is not None
    try:
        headers = [(_raw(k), _raw(v)) for k, v in prepared.headers.items()]
    except UnicodeEncodeError:
        hypothesis.reject()  # no client can put this on the wire
    body = prepared.body
    if isinstance(body, str):
        body = body.encode()
    assert body is None or isinstance(body, bytes), type(body)
    call = gw.http.request(prepared.method, prepared.url, headers=headers, content=body)
    return asyncio.run_coroutine_threadsafe(call, loop).result(SEND_TIMEOUT_S)


def _raw(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode("latin-1")


def _steer(case: schemathesis.Case[Any], model: str) -> None:
    """Point generated model names at configured models some of the time, so valid requests
    reach the queue and the engines instead of stopping at 404."""
    if isinstance(case.body, dict) and "model" in case.body and model != "nope":
        case.body["model"] = model
    if case.path_parameters and "model" in case.path_parameters:
        case.path_parameters["model"] = SPARE if case.operation.path in ENGINE_CONTROL else model


def _run_operation(
    operation: Any,
    mode: GenerationMode,
    tokens: list[str],
    send: Callable[[dict[str, Any]], httpx.Response],
    seen: Counter[tuple[str, int]],
) -> None:
    label = (operation.method.upper(), operation.path)
    fixed: dict[str, Any] = {}
    if label in FIXED_BODIES:
        fixed["body"] = FIXED_BODIES[label]
    if mode is GenerationMode.POSITIVE:  # a valid client id, so valid requests get past it
        headers = {p.name: "fuzz" for p in operation.headers if p.name.lower() == "x-client-id"}
        if headers:
            fixed["headers"] = headers
    strategy = operation.as_strategy(generation_mode=mode, **fixed)

    @hypothesis.settings(
        max_examples=SLOW_EXAMPLES if operation.path in ENGINE_CONTROL else EXAMPLES,
        derandomize=SEED is None,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
        print_blob=False,
    )
    @given(case=strategy, token=st.sampled_from(tokens), model=st.sampled_from(MODELS))
    def check(case: schemathesis.Case[Any], token: str, model: str) -> None:
        _steer(case, model)
        auth = {"Authorization": f"Bearer {token}"}
        kwargs = case.as_transport_kwargs(base_url="http://gw", headers=auth)
        hypothesis.note(case.as_curl_command(headers=auth))
        response = send(kwargs)
        seen[(operation.label, response.status_code)] += 1
        case.validate_response(response, checks=[not_a_server_error, response_schema_conformance])

    if SEED is not None:
        check = hypothesis.seed(int(SEED))(check)
    check()


def _describe(exc: BaseException) -> str:
    """Each distinct failure Hypothesis found, with the falsifying example (its notes)."""
    if isinstance(exc, BaseExceptionGroup):
        return "\n".join(_describe(sub) for sub in exc.exceptions)
    notes = "\n".join(getattr(exc, "__notes__", []))
    return f"{type(exc).__name__}: {str(exc)[:3000]}\n{notes[:3000]}"


async def test_schemathesis_finds_no_server_error(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory({"demo": stub(), "ocr": stub(), SPARE: stub()})
    assert gw.app is not None
    schema = schemathesis.openapi.from_dict(gw.app.openapi())
    operations = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result  # the schema itself is valid OpenAPI
        operations.append(result.ok())
    assert len(operations) >= 30, [op.label for op in operations]
    loop = asyncio.get_running_loop()
    tokens = [gw.admin_token, gw.client_token]
    seen: Counter[tuple[str, int]] = Counter()

    def run_all() -> tuple[list[str], dict[str, float]]:
        failures: list[str] = []
        spent: dict[str, float] = {}
        for operation in operations:
            began = time.monotonic()
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                try:
                    _run_operation(operation, mode, tokens, lambda kw: _send(gw, loop, kw), seen)
                except hypothesis.errors.Unsatisfiable:
                    continue  # nothing invalid to say to an operation without inputs
                except Exception as exc:
                    failures.append(f"{operation.label} ({mode.value}):\n{_describe(exc)}")
            spent[operation.label] = round(time.monotonic() - began, 2)
        return failures, spent

    failures, spent = await asyncio.to_thread(run_all)
    print(sorted(seen.items()), spent)  # shown with -s: what the run reached
    assert not failures, "\n\n".join(failures) + f"\n\ntime per operation: {spent}"


# -- what the fuzzer (and probing around its findings) found: each was a 500 -----------------

CHAT = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}


async def test_unstorable_requests_are_refused_with_a_4xx(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory({"demo": stub()})
    json_headers = {**gw.headers(), "Content-Type": "application/json"}
    assistant = {"role": "assistant", "content": None}
    refused = {
        # free-form objects reached the database: a NUL in a key, an integer over 64 bits
        "tool_calls NUL key": {**CHAT, "messages": [{**assistant, "tool_calls": [{"\u0000": None}]}]},
        "tool_calls big int": {**CHAT, "messages": [{**assistant, "tool_calls": [{"": 2**63}]}]},
        "image_url NUL key": {
            **CHAT,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"\u0000": 1}}]}],
        },
        "seed over 64 bits": {**CHAT, "seed": 2**64},
    }
    for what, body in refused.items():
        for path in ("/api/chat", "/v1/chat/completions"):
            response = await gw.http.post(path, json=body, headers=gw.headers())
            assert response.status_code == 422, (what, path, response.text)
    streamed = await gw.http.post(
        "/v1/chat/completions",
        json={**CHAT, "stream": True, "stream_options": {"\u0000": 2**70}},
        headers=gw.headers(),
    )
    assert streamed.status_code == 422, streamed.text
    # a lone surrogate (valid JSON escape, not encodable text) in a message
    surrogate = b'{"model": "demo", "messages": [{"role": "user", "content": "\\ud800"}]}'
    for path in ("/api/chat", "/v1/chat/completions"):
        response = await gw.http.post(path, content=surrogate, headers=json_headers)
        assert response.status_code == 400, (path, response.text)
        assert "not valid Unicode" in response.text
    # the well-formed OpenAI shapes still pass
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    fine = {
        **CHAT,
        "seed": 2**63 - 1,
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": "data:,", "detail": "low"}}],
            },
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": "42"},
        ],
    }
    accepted = await gw.http.post("/api/chat", json=fine, headers=gw.headers())
    assert accepted.status_code == 200, accepted.text


def test_a_request_the_database_cannot_store_is_refused_before_admission() -> None:
    for request in ({"x": {"\u0000": 1}}, {"x": 2**64}, {"x": "\ud800"}):
        with pytest.raises(InvalidRequest, match=r"cannot be stored|not valid Unicode"):
            Submission("m", "chat", request, "alice", "tests", Priority.NORMAL, None, 1.0)


async def test_naive_key_expiry_and_undecodable_refresh_token(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory({"demo": stub()})
    naive = await gw.http.post(
        "/admin/api-keys",
        json={"name": "n", "expires_at": "2030-01-01T00:00:00"},
        headers=gw.headers(gw.admin_token),
    )
    assert naive.status_code == 422 and "timezone" in naive.text, naive.text
    refresh = await gw.http.post(
        "/auth/refresh",
        content=b'{"refresh_token": "\\ud800"}',
        headers={"Content-Type": "application/json"},
    )
    assert refresh.status_code == 401 and refresh.json()["detail"] == "token is invalid", refresh.text
