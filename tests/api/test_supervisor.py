"""The engine supervisor through the admin API: real stub engine processes, real database."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import psutil

from tests.conftest import GatewayClient, GatewayFactory, eventually, stub

FAST_HEALTH = {
    "health_interval": 0.05,
    "health_check_interval": 0.2,
    "health_check_timeout": 0.3,
    "health_check_failures": 2,
    "stop_timeout": 2,
}


async def _admin(gw: GatewayClient, method: str, path: str, **params: Any) -> Any:
    response = await gw.http.request(method, path, params=params, headers=gw.headers(gw.admin_token))
    return response


async def _model(gw: GatewayClient, name: str) -> dict[str, Any]:
    response = await _admin(gw, "GET", f"/admin/models/{name}")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def _until_model(gw: GatewayClient, name: str, check: Any, timeout_s: float = 20.0) -> dict[str, Any]:
    return await eventually(lambda: _model(gw, name), check, f"model {name} state change", timeout_s)


def _alive(pid: int) -> bool:
    return psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE


async def test_on_demand_start_queues_requests_while_loading(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory(
        {"lazy": stub("--startup-s", "1.5", autostart=False, on_demand=True)}, engines=FAST_HEALTH
    )
    assert (await _model(gw, "lazy"))["state"] == "stopped"
    requests = [asyncio.create_task(gw.chat("lazy", f"q{i}")) for i in range(3)]
    loading = await _until_model(gw, "lazy", lambda m: m["state"] == "starting")
    assert loading["loading_seconds"] is not None
    health = (await gw.http.get("/health")).json()["engines"]["lazy"]
    assert health["state"] == "starting" and "loading_seconds" in health
    answers = await asyncio.gather(*requests)
    assert [a.status_code for a in answers] == [200, 200, 200], [a.text for a in answers]
    assert answers[2].json()["message"]["content"] == "stub reply to: q2"
    ready = await _model(gw, "lazy")
    assert ready["state"] == "ready" and ready["load_seconds"] >= 1.4


async def test_stopped_model_without_on_demand_is_503_with_how_to_start(
    gateway_factory: GatewayFactory,
) -> None:
    gw = await gateway_factory({"manual": stub(autostart=False)})
    response = await gw.chat("manual")
    assert response.status_code == 503
    assert "POST /admin/models/manual/start" in response.json()["detail"]


async def test_start_timeout_fails_with_reason_and_log(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory(
        {"slowload": stub("--startup-s", "60", autostart=False, startup_timeout=1)}, engines=FAST_HEALTH
    )
    response = await _admin(gw, "POST", "/admin/models/slowload/start", wait="true")
    assert response.status_code == 503, response.text  # not "started": it did not start
    assert response.json()["code"] == "engine_start_failed"
    detail = response.json()["detail"]
    assert detail.startswith("model 'slowload' failed to start: not healthy within 1 s (startup_timeout)")
    model = await _model(gw, "slowload")
    assert model["state"] == "failed" and model["pid"] is None
    assert model["last_error"] in detail
    chat = await gw.chat("slowload")
    assert chat.status_code == 503 and "not healthy within 1 s" in chat.json()["detail"]


async def test_start_whose_spawn_fails_is_an_error_not_started(
    gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    missing = tmp_path / "no-such-python"
    gw = await gateway_factory({"m": stub(autostart=False)}, engines={**FAST_HEALTH, "python": str(missing)})
    response = await _admin(gw, "POST", "/admin/models/m/start")  # without wait: it failed at once
    assert response.status_code == 503, response.text
    assert response.json()["code"] == "engine_start_failed"
    assert response.json()["detail"].startswith(f"model 'm' failed to start: could not run {missing}")
    assert (await _model(gw, "m"))["state"] == "failed"


async def test_start_waiting_on_a_load_that_a_stop_cancels_says_so(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory({"slowload": stub("--startup-s", "60", autostart=False)}, engines=FAST_HEALTH)
    waiting = asyncio.create_task(_admin(gw, "POST", "/admin/models/slowload/start", wait="true"))
    pid = (await _until_model(gw, "slowload", lambda m: m["state"] == "starting" and m["pid"]))["pid"]
    stopped = await _admin(gw, "POST", "/admin/models/slowload/stop")
    assert stopped.status_code == 200, stopped.text
    answer = await waiting
    assert answer.status_code == 503, answer.text
    assert answer.json()["code"] == "engine_start_failed"
    assert answer.json()["detail"] == "model 'slowload' did not start: it is stopping (stopped by admin)"
    assert (await _model(gw, "slowload"))["state"] == "stopped" and not _alive(pid)


async def test_concurrent_starts_join_one_load(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory({"m": stub("--startup-s", "0.5", autostart=False)}, engines=FAST_HEALTH)
    answers = await asyncio.gather(*(_admin(gw, "POST", "/admin/models/m/start") for _ in range(5)))
    assert {a.status_code for a in answers} == {202}
    pids = {a.json()["pid"] for a in answers}
    assert len(pids) == 1 and None not in pids, pids
    ready = await _until_model(gw, "m", lambda m: m["state"] == "ready")
    assert ready["pid"] in pids
    children = [
        c for c in psutil.Process().children(recursive=True) if "app.engines.stub" in " ".join(c.cmdline())
    ]
    assert [c.pid for c in children] == [ready["pid"]]
    again = await _admin(gw, "POST", "/admin/models/m/start")
    assert again.json()["state"] == "ready" and again.json()["pid"] == ready["pid"]  # no-op


async def test_engine_kill9_while_serving_is_logged_restarted_and_jobs_succeed(
    gateway_factory: GatewayFactory,
) -> None:
    gw = await gateway_factory({"crashy": stub("--latency-ms", "1500")}, engines=FAST_HEALTH)
    before = await _model(gw, "crashy")
    requests = [asyncio.create_task(gw.chat("crashy", f"r{i}")) for i in range(3)]
    await gw.until_count("crashy", "running", 3)
    os.kill(before["pid"], signal.SIGKILL)
    answers = await asyncio.gather(*requests)
    assert [a.status_code for a in answers] == [200] * 3, [a.text for a in answers]
    assert {a.json()["attempts"] for a in answers} == {2}
    after = await _model(gw, "crashy")
    assert after["state"] == "ready" and after["pid"] != before["pid"]
    crashes = (await _admin(gw, "GET", "/admin/crashes", model="crashy")).json()
    assert len(crashes) == 1
    crash = crashes[0]
    assert crash["exit_code"] == -9 and crash["signal"] == 9
    assert sorted(crash["jobs_affected"]) == sorted(a.json()["id"] for a in answers)
    assert "listening on" in crash["stack_trace"]
    assert crash["restart"].startswith("restart in")


async def test_crash_loop_backs_off_then_gives_up_with_the_reason(gateway_factory: GatewayFactory) -> None:
    """Crashes inside the window wait longer each time (capped), and the 4th gives up: the model
    is failed, last_error says why, no process is left, and requests get a 503 with the reason."""
    engines = {
        **FAST_HEALTH,
        "max_crashes": 4,
        "crash_window_seconds": 120,
        "restart_backoff_seconds": 0.05,
        "restart_backoff_max_seconds": 0.1,
    }
    gw = await gateway_factory({"flaky": stub()}, engines=engines)
    pids: list[int] = []
    for _ in range(4):
        model = await _until_model(gw, "flaky", lambda m: m["state"] == "ready" and m["pid"] not in pids)
        pids.append(model["pid"])
        os.kill(model["pid"], signal.SIGKILL)
    failed = await _until_model(gw, "flaky", lambda m: m["state"] == "failed")
    assert failed["last_error"] == "crashed 4 times in 120 s; last: exited with code -9", failed
    assert failed["reason"] == failed["last_error"] and failed["pid"] is None
    assert [p for p in pids if _alive(p)] == []
    crashes = (await _admin(gw, "GET", "/admin/crashes", model="flaky")).json()
    assert [c["restart"] for c in reversed(crashes)] == [
        "restart in 0.05 s",
        "restart in 0.1 s",
        "restart in 0.1 s",  # 0.2 s, capped
        "gave up",
    ]
    assert [c["pid"] for c in reversed(crashes)] == pids
    refused = await gw.chat("flaky")
    assert refused.status_code == 503 and "crashed 4 times in 120 s" in refused.json()["detail"]


async def test_a_child_that_outlives_its_crashed_engine_is_killed_before_the_restart(
    gateway_factory: GatewayFactory,
) -> None:
    """vLLM's EngineCore child holds the GPU memory and can outlive its leader (kill -9 of the
    leader reparents it, out of the leader's tree; the stub's child ignores SIGTERM, so the
    group's SIGTERM does not end it). The crash recovery finds it by the engine id in its
    environment and SIGKILLs it before the engine starts again."""
    gw = await gateway_factory({"core": stub("--spawn-child")}, engines=FAST_HEALTH)
    before = await _model(gw, "core")
    (child,) = psutil.Process(before["pid"]).children()
    seen: list[tuple[str, int | None, bool]] = []

    async def observe() -> tuple[str, int | None, bool]:
        model = await _model(gw, "core")
        seen.append((model["state"], model["pid"], _alive(child.pid)))
        return seen[-1]

    try:
        os.kill(before["pid"], signal.SIGKILL)
        await eventually(
            observe,
            lambda s: s[0] == "ready" and s[1] != before["pid"] and not s[2],
            "the engine restarted and its old child gone",
        )
    finally:
        if _alive(child.pid):
            child.kill()
    # never a new engine while the old child lived (it would still hold the GPU memory)
    assert [s for s in seen if s[1] not in (before["pid"], None) and s[2]] == [], seen
    crashes = (await _admin(gw, "GET", "/admin/crashes", model="core")).json()
    assert [(c["pid"], c["exit_code"]) for c in crashes] == [(before["pid"], -9)]
    after = await _model(gw, "core")
    assert [c.pid for c in psutil.Process(after["pid"]).children()] != [child.pid]


async def test_a_load_whose_leader_dies_fails_and_leaves_no_child(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory(
        {"core": stub("--spawn-child", "--startup-s", "60", autostart=False)}, engines=FAST_HEALTH
    )
    started = await _admin(gw, "POST", "/admin/models/core/start")
    leader = psutil.Process(started.json()["pid"])
    child = await eventually(lambda: asyncio.to_thread(leader.children), bool, "the stub's child started")
    try:
        leader.kill()
        failed = await _until_model(gw, "core", lambda m: m["state"] == "failed")
        assert failed["last_error"].startswith("exited with code -9 while starting"), failed
        assert not _alive(child[0].pid)
    finally:
        if _alive(child[0].pid):
            child[0].kill()


GIVES_UP_AT_2 = {
    **FAST_HEALTH,
    "max_crashes": 2,
    "crash_window_seconds": 120,
    "restart_backoff_seconds": 0.05,
    "restart_backoff_max_seconds": 0.1,
}


async def _crash_until_given_up(gw: GatewayClient, name: str) -> dict[str, Any]:
    """kill -9 the engine each time it is ready until the supervisor gives up (max_crashes 2)."""
    pids: list[int] = []
    for _ in range(2):
        model = await _until_model(gw, name, lambda m: m["state"] == "ready" and m["pid"] not in pids)
        pids.append(model["pid"])
        os.kill(model["pid"], signal.SIGKILL)
    return await _until_model(gw, name, lambda m: m["state"] == "failed")


async def test_an_operator_start_after_giving_up_clears_the_crash_history(
    gateway_factory: GatewayFactory,
) -> None:
    """The crashes that made the model `failed` are still inside the window when an operator
    starts it again; counted, the next single crash would give up at once."""
    gw = await gateway_factory({"flaky": stub()}, engines=GIVES_UP_AT_2)
    failed = await _crash_until_given_up(gw, "flaky")
    assert failed["reason"].startswith("crashed 2 times in 120 s"), failed
    started = await _admin(gw, "POST", "/admin/models/flaky/start", wait="true")
    assert started.status_code == 202 and started.json()["state"] == "ready", started.text
    pid = started.json()["pid"]
    os.kill(pid, signal.SIGKILL)
    after = await _until_model(gw, "flaky", lambda m: m["state"] in ("ready", "failed") and m["pid"] != pid)
    assert after["state"] == "ready", after  # restarted, not given up on
    restarts = [c["restart"] for c in (await _admin(gw, "GET", "/admin/crashes", model="flaky")).json()]
    assert restarts == ["restart in 0.05 s", "gave up", "restart in 0.05 s"]  # newest first


async def test_requests_do_not_restart_an_on_demand_model_the_supervisor_gave_up_on(
    gateway_factory: GatewayFactory,
) -> None:
    """on_demand starts a stopped or failed model for a request, but not a crash loop: that would
    restart it forever. Requests get a 503 with the verdict until an operator starts it."""
    gw = await gateway_factory({"lazy": stub(autostart=False, on_demand=True)}, engines=GIVES_UP_AT_2)
    assert (await gw.chat("lazy", "first")).status_code == 200  # started on demand
    await _crash_until_given_up(gw, "lazy")
    for _ in range(2):
        refused = await gw.chat("lazy")
        assert refused.status_code == 503, refused.text
        detail = refused.json()["detail"]
        assert "crashed 2 times in 120 s" in detail and "POST /admin/models/lazy/start" in detail, detail
    model = await _model(gw, "lazy")
    assert (model["state"], model["pid"]) == ("failed", None)
    assert (await _admin(gw, "POST", "/admin/models/lazy/start", wait="true")).status_code == 202
    assert (await gw.chat("lazy", "back")).json()["message"]["content"] == "stub reply to: back"


async def test_hung_engine_is_detected_by_health_checks_and_replaced(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory({"hangs": stub()}, engines=FAST_HEALTH)
    before = await _model(gw, "hangs")
    psutil.Process(before["pid"]).suspend()
    try:
        after = await _until_model(
            gw, "hangs", lambda m: m["state"] == "ready" and m["pid"] != before["pid"], timeout_s=20
        )
    finally:
        if _alive(before["pid"]):
            psutil.Process(before["pid"]).kill()
    assert not _alive(before["pid"])
    crash = (await _admin(gw, "GET", "/admin/crashes")).json()[0]
    assert "health check failed 2 times in a row" in crash["error"]
    assert crash["exit_code"] is None
    assert (await gw.chat("hangs", "after")).json()["message"]["content"] == "stub reply to: after"
    assert after["last_error"].startswith("health check failed")


async def test_stop_busy_model_needs_graceful_or_force(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory({"busy": stub("--latency-ms", "1000")}, engines=FAST_HEALTH)
    pid = (await _model(gw, "busy"))["pid"]
    running = asyncio.create_task(gw.chat("busy", "finish me"))
    await gw.until_count("busy", "running", 1)
    refused = await _admin(gw, "POST", "/admin/models/busy/stop")
    assert refused.status_code == 409
    assert "busy (1 running, 0 queued)" in refused.json()["detail"]

    drained = await _admin(gw, "POST", "/admin/models/busy/stop", graceful="true")
    assert drained.status_code == 200, drained.text
    assert drained.json()["port_closed"] is True and drained.json()["cancelled_jobs"] == 0
    answer = await running
    assert answer.status_code == 200 and answer.json()["message"]["content"] == "stub reply to: finish me"
    assert not _alive(pid)
    after = await _model(gw, "busy")
    assert (after["state"], after["pid"], after["port"], after["gpus"]) == ("stopped", None, None, [])
    assert (await gw.chat("busy")).status_code == 503
    again = await _admin(gw, "POST", "/admin/models/busy/stop")
    assert again.status_code == 200 and again.json()["already"] is True


async def test_force_stop_cancels_running_and_queued(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory(
        {"busy": stub("--latency-ms", "30000", max_concurrent=1, max_waiting=2)}, engines=FAST_HEALTH
    )
    pid = (await _model(gw, "busy"))["pid"]
    running = asyncio.create_task(gw.chat("busy", "long"))
    await gw.until_count("busy", "running", 1)
    waiting = asyncio.create_task(gw.chat("busy", "waits"))
    await gw.until_count("busy", "queued", 1)
    stopped = await _admin(gw, "POST", "/admin/models/busy/stop", force="true")
    assert stopped.status_code == 200, stopped.text
    assert stopped.json()["cancelled_jobs"] == 2
    for task in (running, waiting):
        answer = await task
        assert answer.status_code == 409 and "was cancelled" in answer.json()["detail"]
    assert not _alive(pid)
    jobs = (await gw.http.get("/api/jobs", headers=gw.headers())).json()["data"]
    assert {j["state"] for j in jobs} == {"cancelled"}
    assert all("stopped (force)" in j["error"]["message"] for j in jobs)
    restarted = await _admin(gw, "POST", "/admin/models/busy/start", wait="true")
    assert restarted.json()["state"] == "ready" and restarted.json()["pid"] != pid


async def test_placement_on_fake_gpus(gateway_factory: GatewayFactory) -> None:
    engines = {**FAST_HEALTH, "fake_gpus": [{"name": "fake-a", "total_gib": 24, "free_gib": 20}]}
    gpu = {"count": 1}
    gw = await gateway_factory(
        {
            "small": stub(autostart=False, gpu={**gpu, "memory_gib": 12}),
            "second": stub(autostart=False, gpu={**gpu, "memory_gib": 12}),
            "huge": stub(autostart=False, gpu={**gpu, "memory_gib": 40}),
            "cpu": stub(),
        },
        engines=engines,
    )
    started = await _admin(gw, "POST", "/admin/models/small/start", wait="true")
    assert started.json()["state"] == "ready" and started.json()["gpus"] == [0]
    env = psutil.Process(started.json()["pid"]).environ()
    assert env["CUDA_VISIBLE_DEVICES"] == "0"
    assert psutil.Process((await _model(gw, "cpu"))["pid"]).environ()["CUDA_VISIBLE_DEVICES"] == ""

    refused = await _admin(gw, "POST", "/admin/models/second/start")
    assert refused.status_code == 503
    detail = refused.json()["detail"]
    assert "'second' needs" in detail and "12" in detail and "small" in detail, detail
    assert refused.json()["code"] == "insufficient_gpu"
    huge = await _admin(gw, "POST", "/admin/models/huge/start")
    assert huge.status_code == 503 and "40" in huge.json()["detail"]

    gpus = (await _admin(gw, "GET", "/admin/gpus")).json()
    assert gpus["available"] is True
    assert gpus["gpus"][0]["models"] == ["small"] and gpus["gpus"][0]["total_gib"] == 24

    stopped = await _admin(gw, "POST", "/admin/models/small/stop")
    assert stopped.json()["gpu_memory_released"] is True
    second = await _admin(gw, "POST", "/admin/models/second/start", wait="true")
    assert second.json()["state"] == "ready" and second.json()["gpus"] == [0]


async def test_vllm_memory_gib_becomes_its_share_of_the_placed_gpu(
    gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    """Two vLLM models of 30 GiB each share one fake 80 GiB GPU: each is started with
    --gpu-memory-utilization 0.375 (memory_gib / the placed GPU's total), where memory_fraction's
    default 0.9 would have made the second one unplaceable. No vLLM here: `engines.python` is a
    stand-in interpreter that keeps the command line and never gets healthy."""
    interpreter = tmp_path / "vllm-python"
    interpreter.write_text("#!/bin/sh\nsleep 60\n")
    interpreter.chmod(0o755)
    engines = {
        **FAST_HEALTH,
        "python": str(interpreter),
        "fake_gpus": [{"name": "fake-80g", "total_gib": 80, "free_gib": 80}],
    }
    gpu = {"count": 1, "memory_gib": 30}
    gw = await gateway_factory(
        {
            "a": {"kind": "vllm", "autostart": False, "gpu": gpu},
            "b": {"kind": "vllm", "autostart": False, "gpu": gpu},
        },
        engines=engines,
    )
    pids = []
    for name in ("a", "b"):
        started = await _admin(gw, "POST", f"/admin/models/{name}/start")
        assert started.status_code == 202, started.text
        assert started.json()["gpus"] == [0]
        pids.append(started.json()["pid"])
        argv = psutil.Process(started.json()["pid"]).cmdline()
        assert argv[argv.index("--gpu-memory-utilization") + 1] == "0.375", argv
    for name in ("a", "b"):
        assert (await _admin(gw, "POST", f"/admin/models/{name}/stop", force="true")).status_code == 200
    assert [p for p in pids if _alive(p)] == []


async def test_gpus_without_a_driver_and_logs_and_unknown_models(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory({"demo": stub(), "gpu": {"kind": "vllm", "autostart": False}})
    gpus = (await _admin(gw, "GET", "/admin/gpus")).json()
    assert gpus["available"] is False and "NVML not available" in gpus["reason"]
    refused = await _admin(gw, "POST", "/admin/models/gpu/start")
    assert refused.status_code == 503
    assert "needs a GPU but none is usable: NVML not available" in refused.json()["detail"]
    assert (await _model(gw, "gpu"))["state"] == "failed"
    chat = await gw.chat("gpu")  # a request for it gets placement's reason and code, once
    assert (chat.status_code, chat.json()["code"]) == (503, "insufficient_gpu"), chat.text
    assert chat.json()["detail"] == refused.json()["detail"]

    logs = await _admin(gw, "GET", "/admin/models/demo/logs", lines=5)
    assert logs.status_code == 200
    assert any("listening on" in line for line in logs.json()["lines"])
    assert len(logs.json()["lines"]) <= 5
    assert (await _admin(gw, "GET", "/admin/models/demo/logs", lines=0)).status_code == 422
    for method, path in [
        ("POST", "/admin/models/nope/start"),
        ("POST", "/admin/models/nope/stop"),
        ("GET", "/admin/models/nope/logs"),
        ("GET", "/admin/models/nope"),
    ]:
        response = await _admin(gw, method, path)
        assert response.status_code == 404, (path, response.text)
        assert "unknown model 'nope'" in response.json()["detail"]
    for method, path, params in [("GET", "/admin/crashes", {"model": "nope"})]:
        response = await _admin(gw, method, path, **params)
        assert response.status_code == 404, (path, response.text)
        assert "unknown model 'nope'" in response.json()["detail"]
    client = await gw.http.post("/admin/models/demo/stop", headers=gw.headers())
    assert client.status_code == 403
    assert (await _admin(gw, "GET", "/admin/crashes", since="not-a-time")).status_code == 422


async def test_models_whose_names_hold_a_slash_are_addressable_in_admin_paths(
    gateway_factory: GatewayFactory,
) -> None:
    gw = await gateway_factory({"org/chat": stub(aliases=["deepseek-ai/DeepSeek-OCR"]), "plain": stub()})
    admin = gw.headers(gw.admin_token)
    for path in (
        "/admin/models/org/chat",
        "/admin/models/org%2Fchat",
        "/admin/models/deepseek-ai/DeepSeek-OCR",
    ):
        response = await gw.http.get(path, headers=admin)
        assert (response.status_code, response.json()["name"]) == (200, "org/chat"), path
    queue = await gw.http.get("/admin/queue/deepseek-ai/DeepSeek-OCR", headers=admin)
    assert queue.json()["model"] == "org/chat"
    logs = await gw.http.get("/admin/models/org/chat/logs", params={"lines": 5}, headers=admin)
    assert logs.json()["model"] == "org/chat" and logs.json()["lines"]
    stopped = await gw.http.post("/admin/models/org/chat/stop", headers=admin)
    assert (stopped.json()["model"], (await _model(gw, "plain"))["state"]) == ("org/chat", "ready")
    started = await gw.http.post("/admin/models/org/chat/start", params={"wait": "true"}, headers=admin)
    assert (started.json()["model"], started.json()["state"]) == ("org/chat", "ready")
    assert (await gw.http.get("/admin/models/org/nope", headers=admin)).status_code == 404


async def test_a_running_engines_log_is_rotated_by_the_watch_loop(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory(
        {"chatty": stub("--log-requests")}, engines={**FAST_HEALTH, "log_max_bytes": 1024}
    )
    assert gw.services.engines is not None
    log = gw.services.engines.log_path("chatty")
    pid = (await _model(gw, "chatty"))["pid"]

    async def rotated() -> bool:
        assert (await gw.chat("chatty")).status_code == 200  # a log line per request
        return log.with_name(log.name + ".1").exists()

    await eventually(rotated, bool, "the engine's log rotated while it runs", 30)
    assert (await _model(gw, "chatty"))["pid"] == pid  # cut in place, no restart
    assert log.stat().st_size < log.with_name(log.name + ".1").stat().st_size


async def test_an_on_demand_model_whose_loads_keep_failing_is_given_up_on(
    gateway_factory: GatewayFactory,
) -> None:
    """Each request would otherwise start another load that fails (on a GPU: minutes each, up to
    the startup timeout): failed loads count with crashes, and after max_crashes the model waits
    for an operator, as a crash loop does."""
    never_loads = stub("--no-such-flag", autostart=False, on_demand=True, timeout=1)
    gw = await gateway_factory({"never": never_loads}, engines=GIVES_UP_AT_2)
    for _ in range(2):  # each request starts a load, which exits at once (argparse refuses the flag)
        # its job waits out its queue timeout: another instance's engine might still serve it
        assert (await gw.chat("never", "load please")).status_code == 504
        await _until_model(gw, "never", lambda m: m["state"] == "failed")
    refused = await gw.chat("never", "again")
    assert refused.status_code == 503, refused.text
    detail = refused.json()["detail"]
    assert "failed 2 times in 120 s" in detail and "POST /admin/models/never/start" in detail, detail
    assert (await _model(gw, "never"))["pid"] is None  # no third load was spawned
