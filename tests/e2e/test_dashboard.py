"""The /ui dashboard in a real browser (Debian's Chromium driven by Playwright) against the
gateway as a real daemon with stub engines: login, models, start/stop, queue bars, errors.

Screenshots of every step go to test-artifacts/dashboard/ (git-ignored) so a reviewer can see
what the page looked like. The browser is the system's /usr/bin/chromium (scripts/test.sh
installs it); Playwright's own browser downloads are never used.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from playwright.async_api import Browser, ConsoleMessage, Error, Page, async_playwright, expect

from tests.e2e.conftest import ROOT, Daemon, stop_quietly

pytestmark = pytest.mark.e2e

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
STATIC = ROOT / "app" / "ui" / "static"
ARTIFACTS = ROOT / "test-artifacts" / "dashboard"
ADMIN = ("ops", "ops-password-for-the-dashboard")
VIEWER = ("viewer", "viewer-password-for-the-dashboard")
MARKUP = "<img src=x onerror=window.injected=1><b id=injected>bold</b>"
WAIT_MS = 30_000
# what the browser does when the tab goes to the background (or comes back)
COUNT_POLLS = """() => {
    window.polls = 0;
    const original = window.fetch;
    window.fetch = (url, ...rest) => {
        if (String(url).endsWith("/admin/models")) window.polls += 1;
        return original(url, ...rest);
    };
}"""
HIDE_TAB = """hidden => {
    Object.defineProperty(document, "hidden", {configurable: true, get: () => hidden});
    document.dispatchEvent(new Event("visibilitychange"));
}"""  # longest any expectation below waits; the page polls every 2 s

MODELS: dict[str, Any] = {
    "demo": {"kind": "stub", "args": ["--latency-ms", "20"]},
    # stopped at start; loads for 3 s, so the page shows it `starting` with its loading time
    "lazy": {"kind": "stub", "args": ["--startup-s", "3"], "autostart": False},
    # 2 run at once, 3 may wait; each call takes 60 s, so a full queue stays full while looked at
    "slow": {"kind": "stub", "args": ["--latency-ms", "60000"], "max_concurrent": 2, "max_waiting": 3},
    # answers one request, dies (exit code 3) on the next, and is restarted
    "crashy": {"kind": "stub", "args": ["--crash-after", "1"]},
    # fails to start; its reason quotes the engine's log, which quotes this markup: API text that
    # the page must show as text
    "broken": {"kind": "stub", "args": ["--latency-ms", MARKUP]},
}


async def _until_serving(daemon: Daemon, timeout_s: float = 60.0) -> None:
    """Healthy with the models in their starting states (not all ready, so not wait_healthy)."""
    starting = {"demo": "ready", "lazy": "stopped", "slow": "ready", "broken": "failed", "crashy": "ready"}
    await daemon.wait_health(
        lambda engines: {name: m["state"] for name, m in engines.items()} == starting,
        f"engines in their starting states {starting}",
        timeout_s,
    )


@pytest.fixture(scope="module")
async def daemon(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Daemon]:
    """One gateway for the module (a daemon start is the slow part); each test leaves its
    models as it found them. Users with real passwords are created through the admin API."""
    gateway = Daemon(tmp_path_factory.mktemp("dashboard"), MODELS)
    gateway.start()
    try:
        await _until_serving(gateway)
        async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
            for (name, password), role in ((ADMIN, "admin"), (VIEWER, "client")):
                answer = await client.post(
                    "/admin/users",
                    json={"username": name, "password": password, "role": role},
                    headers={"Authorization": f"Bearer {gateway.admin_token}"},
                )
                assert answer.status_code == 201, answer.text
        yield gateway
    finally:
        pids = [*gateway.children_pids(), *gateway.seen]
        if gateway.proc is not None and gateway.proc.poll() is None:
            gateway.terminate()
        with contextlib.suppress(OSError, ValueError):
            pids.append(gateway.db_pid())
        stop_quietly([p for p in pids if psutil.pid_exists(p)])


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(f"the dashboard tests need Debian's chromium at {CHROMIUM} (scripts/test.sh installs it)")
    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            await chromium.close()


@dataclass
class Ui:
    """One fresh browser context (empty sessionStorage) on the daemon's dashboard."""

    page: Page
    daemon: Daemon
    name: str
    problems: list[str] = field(default_factory=list)

    async def open(self) -> None:
        await self.page.goto(f"{self.daemon.url}/ui")
        await expect(self.page.locator("#login-view")).to_be_visible()

    async def login(self, user: tuple[str, str]) -> None:
        await self.page.get_by_label("Username").fill(user[0])
        await self.page.get_by_label("Password").fill(user[1])
        await self.page.get_by_role("button", name="Sign in").click()

    async def shot(self, step: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{self.name}-{step}.png"
        await self.page.screenshot(path=str(path), full_page=True)
        print(f"screenshot: {path}")
        return path

    def watch(self) -> None:
        """Record what would mean the page is broken: a CSP refusal or an uncaught error."""

        def console(message: ConsoleMessage) -> None:
            if "Content Security Policy" in message.text or "Refused to" in message.text:
                self.problems.append(f"console: {message.text}")

        def page_error(error: Error) -> None:
            self.problems.append(f"uncaught: {error}")

        self.page.on("console", console)
        self.page.on("pageerror", page_error)


@pytest.fixture
async def ui(browser: Browser, daemon: Daemon, request: pytest.FixtureRequest) -> AsyncIterator[Ui]:
    context = await browser.new_context(viewport={"width": 1400, "height": 1000})
    context.set_default_timeout(WAIT_MS)
    page = await context.new_page()
    name = request.node.name.removeprefix("test_")
    view = Ui(page, daemon, name)
    view.watch()
    try:
        yield view
        assert not view.problems, view.problems
    finally:
        with contextlib.suppress(Error):  # a screenshot of the last state, also when the test failed
            await view.shot("last")
        await context.close()


def _admin(daemon: Daemon) -> dict[str, str]:
    return {"Authorization": f"Bearer {daemon.admin_token}"}


# -- the files ------------------------------------------------------------------------------


async def test_ui_is_served_as_static_files_under_its_own_csp(daemon: Daemon) -> None:
    async with httpx.AsyncClient(base_url=daemon.url) as client:
        for path in ("/ui", "/ui/"):
            page = await client.get(path)
            assert page.status_code == 200
            assert page.headers["content-type"] == "text/html; charset=utf-8"
            csp = page.headers["content-security-policy"]
            assert "script-src 'self'" in csp and "style-src 'self'" in csp and "connect-src 'self'" in csp
            assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
            assert "frame-ancestors 'none'" in csp
            assert page.headers["x-content-type-options"] == "nosniff"
            assert page.headers["x-frame-options"] == "DENY"
            assert '<script type="module" src="/ui/app.js">' in page.text
            head = await client.head(path)
            assert head.status_code == 200 and head.headers["content-type"] == "text/html; charset=utf-8"
        for name, media_type in [
            ("app.js", "text/javascript; charset=utf-8"),
            ("api.js", "text/javascript; charset=utf-8"),
            ("style.css", "text/css; charset=utf-8"),
            ("favicon.svg", "image/svg+xml"),
        ]:
            answer = await client.get(f"/ui/{name}")
            assert answer.status_code == 200, name
            assert answer.headers["content-type"] == media_type
            assert answer.content == (STATIC / name).read_bytes()
        for missing in ("/ui/nothing.js", "/ui/..%2Fapi%2Froutes_ui.py", "/ui/../app/settings.py"):
            answer = await client.get(missing)
            assert answer.status_code == 404, missing
            assert answer.json()["code"] == "not_found"
        # the API keeps its own, closed policy
        health = await client.get("/health")
        assert health.headers["content-security-policy"] == "default-src 'none'; frame-ancestors 'none'"


def test_dashboard_code_never_turns_text_into_markup() -> None:
    """A guard, not a parser: the page's code builds the DOM from text only (textContent,
    append), so nothing the API returns (model names, error messages, engine log lines) can
    become markup or script. index.html carries no inline script, style or handler (the CSP
    would refuse them anyway)."""
    forbidden = re.compile(
        r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|\beval\s*\(|new\s+Function|"
        r"createContextualFragment|DOMParser|setAttribute\(\s*[\"'](?:on|style|href|src)|\.(?:href|src)\s*="
    )
    scripts = sorted(STATIC.glob("*.js"))
    assert scripts
    for script in scripts:
        for number, line in enumerate(script.read_text().splitlines(), 1):
            assert not forbidden.search(line), f"{script.name}:{number}: {line.strip()}"
    html = (STATIC / "index.html").read_text()
    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html), "inline <script>"
    assert not re.search(r"<style|\sstyle=|\son[a-z]+=", html), "inline style or event handler"


# -- in the browser -------------------------------------------------------------------------


async def test_bad_password_shows_the_error(ui: Ui) -> None:
    await ui.open()
    await ui.login((ADMIN[0], "not-the-password"))
    error = ui.page.get_by_test_id("login-error")
    await expect(error).to_be_visible()
    await expect(error).to_contain_text("incorrect username or password")
    await expect(ui.page.locator("#dashboard-view")).to_be_hidden()
    assert await ui.page.evaluate("sessionStorage.length") == 0
    await ui.shot("error")


async def test_admin_starts_and_stops_a_model(ui: Ui, daemon: Daemon) -> None:
    page = ui.page
    await ui.open()
    await ui.login(ADMIN)
    await expect(page.get_by_test_id("who")).to_have_text("ops (admin)")
    await expect(page.get_by_test_id("state-demo")).to_have_text("ready")
    await expect(page.get_by_test_id("state-slow")).to_have_text("ready")
    await expect(page.get_by_test_id("state-lazy")).to_have_text("stopped")
    await expect(page.get_by_test_id("start-lazy")).to_be_enabled()
    await expect(page.get_by_test_id("stop-lazy")).to_be_disabled()
    await expect(page.get_by_test_id("uptime-demo")).to_contain_text(" s")
    await expect(page.get_by_test_id("queue-counts-demo")).to_contain_text(
        "0 processing · 0 waiting · capacity 20 (10 concurrent + 10 waiting)"
    )
    async with httpx.AsyncClient(base_url=daemon.url) as client:
        autoswitch = await client.get("/admin/autoswitch", headers=_admin(daemon))
    panel = page.get_by_test_id("autoswitch")
    if autoswitch.status_code == 404:  # not built on this gateway: the panel stays away
        await expect(panel).to_be_hidden()
    else:
        await expect(panel).to_be_visible()
    await ui.shot("models")

    await page.get_by_test_id("start-lazy").click()
    await expect(page.get_by_test_id("state-lazy")).to_have_text("starting")
    await expect(page.get_by_test_id("loading-lazy")).to_contain_text("loading")
    await ui.shot("starting")
    await expect(page.get_by_test_id("state-lazy")).to_have_text("ready", timeout=WAIT_MS)
    await expect(page.get_by_test_id("loading-lazy")).to_contain_text("loaded in")
    await expect(page.get_by_test_id("stop-lazy")).to_be_enabled()
    await ui.shot("started")

    await page.get_by_test_id("stop-lazy").click()
    await expect(page.get_by_test_id("state-lazy")).to_have_text("stopped", timeout=WAIT_MS)
    await expect(page.get_by_test_id("start-lazy")).to_be_enabled()
    await expect(page.get_by_test_id("banner")).to_be_hidden()
    await ui.shot("stopped")


async def test_admin_turns_auto_switch_on_and_off(ui: Ui, daemon: Daemon) -> None:
    page = ui.page
    await ui.open()
    await ui.login(ADMIN)
    toggle = page.get_by_test_id("autoswitch-toggle")
    status = page.locator("#autoswitch-status")
    await expect(toggle).to_have_text("Enable")
    await expect(status).to_contain_text("disabled")
    await toggle.click()
    await expect(status).to_contain_text("enabled")
    await expect(status).to_contain_text("next run")
    await expect(toggle).to_have_text("Disable")
    async with httpx.AsyncClient(base_url=daemon.url) as client:
        state = (await client.get("/admin/autoswitch", headers=_admin(daemon))).json()
        assert state["enabled"] is True
        await ui.shot("enabled")
        await toggle.click()
        await expect(toggle).to_have_text("Enable")
        assert (await client.get("/admin/autoswitch", headers=_admin(daemon))).json()["enabled"] is False
    await expect(page.get_by_test_id("banner")).to_be_hidden()


async def _chat(client: httpx.AsyncClient, daemon: Daemon, i: int, model: str = "slow") -> httpx.Response:
    return await client.post(
        "/api/chat",
        json={"model": model, "messages": [{"role": "user", "content": f"dashboard {i}"}]},
        headers={"Authorization": f"Bearer {daemon.token}", "X-Client-ID": f"dashboard-{model}"},
    )


async def _cancel_all(client: httpx.AsyncClient, daemon: Daemon, model: str) -> None:
    for state in ("queued", "running"):
        query = {"model": model, "state": state}
        listed = await client.get("/api/jobs", params=query, headers=_admin(daemon))
        for job in listed.json()["data"]:
            await client.delete(f"/api/jobs/{job['id']}", headers=_admin(daemon))


async def test_queue_bar_shows_processing_and_waiting(ui: Ui, daemon: Daemon) -> None:
    page = ui.page
    await ui.open()
    await ui.login(ADMIN)
    counts = page.get_by_test_id("queue-counts-slow")
    await expect(counts).to_contain_text("0 processing · 0 waiting · capacity 5 (2 concurrent + 3 waiting)")
    async with httpx.AsyncClient(base_url=daemon.url, timeout=120) as client:
        chats = [asyncio.create_task(_chat(client, daemon, i)) for i in range(4)]
        try:
            await expect(counts).to_contain_text("2 processing · 2 waiting")
            await expect(counts).to_contain_text("held by dashboard-slow 2+2")  # who holds the queue
            await expect(page.get_by_test_id("queue-processing-slow")).to_have_attribute("data-count", "2")
            await expect(page.get_by_test_id("queue-waiting-slow")).to_have_attribute("data-count", "2")
            jobs = page.get_by_test_id("job").filter(has_text="dashboard-slow")
            await expect(jobs).to_have_count(4)
            await expect(jobs.filter(has_text="running")).to_have_count(2)
            await expect(jobs.filter(has_text="queued")).to_have_count(2)
            await ui.shot("full")

            # A stop of a busy model: 409 model_busy; the page offers a graceful stop in a
            # confirm dialog, which Playwright dismisses, so the API's message is shown.
            await page.get_by_test_id("stop-slow").click()
            banner = page.get_by_test_id("banner")
            await expect(banner).to_contain_text("stop slow: model 'slow' is busy (2 running, 2 queued)")
            await expect(page.get_by_test_id("state-slow")).to_have_text("ready")
            await ui.shot("busy")
            await banner.get_by_role("button", name="Dismiss").click()
            await expect(banner).to_be_hidden()
        finally:
            await _cancel_all(client, daemon, "slow")
            answers = await asyncio.gather(*chats, return_exceptions=True)
        assert [getattr(a, "status_code", a) for a in answers] == [409] * 4  # cancelled
    await expect(counts).to_contain_text("0 processing · 0 waiting")
    cancelled = page.get_by_test_id("job").filter(has_text="dashboard-slow").filter(has_text="cancelled")
    await expect(cancelled).to_have_count(4)
    await ui.shot("drained")


async def test_text_from_the_api_stays_text(ui: Ui) -> None:
    page = ui.page
    await ui.open()
    await ui.login(ADMIN)
    await expect(page.get_by_test_id("state-broken")).to_have_text("failed")
    await expect(page.get_by_test_id("reason-broken")).to_contain_text(MARKUP)
    await expect(page.locator("#injected")).to_have_count(0)
    await expect(page.get_by_test_id("models").locator("img")).to_have_count(0)
    assert await page.evaluate("window.injected") is None
    await ui.shot("escaped")


async def test_engine_crash_is_listed_with_its_log(ui: Ui, daemon: Daemon) -> None:
    page = ui.page
    await ui.open()
    await ui.login(ADMIN)
    await expect(page.locator("#crashes-empty")).to_be_visible()
    async with httpx.AsyncClient(base_url=daemon.url, timeout=60) as client:
        for i in range(2):  # the second call kills the engine; its job is retried after the restart
            answer = await _chat(client, daemon, i, model="crashy")
            assert answer.status_code == 200, answer.text
    crash = page.get_by_test_id("crash")
    await expect(crash).to_have_count(1)
    await expect(crash).to_contain_text("crashy")
    await expect(crash).to_contain_text("exited with code 3")
    log = crash.locator("pre")
    await expect(log).to_be_hidden()
    await crash.locator("summary").click()
    await expect(log).to_contain_text("crashy listening on")
    updated = page.get_by_test_id("refresh-state")
    await expect(updated).not_to_have_text(await updated.inner_text())  # a poll later ...
    await expect(log).to_be_visible()  # ... the record is still open
    await ui.shot("crash")


async def test_polling_pauses_while_the_tab_is_hidden(ui: Ui) -> None:
    """Timers run on Playwright's clock, so 10 s of hidden tab take no real time; the page's
    own fetch calls are counted in the page (a poll calls fetch as its timer fires)."""
    page = ui.page
    await page.clock.install()
    await ui.open()
    await ui.login(ADMIN)
    await expect(page.get_by_test_id("state-demo")).to_have_text("ready")
    await page.evaluate(COUNT_POLLS)
    await page.evaluate(HIDE_TAB, True)
    await expect(page.get_by_test_id("refresh-state")).to_have_text("paused while the tab is hidden")
    await page.evaluate("window.polls = 0")
    await page.clock.run_for(10_000)
    assert await page.evaluate("window.polls") == 0
    await page.evaluate(HIDE_TAB, False)
    assert await page.evaluate("window.polls") == 1  # at once, not at the next tick
    await expect(page.get_by_test_id("refresh-state")).to_contain_text("updated")
    await page.clock.run_for(2_000)
    assert await page.evaluate("window.polls") == 2  # and 2 s after that poll ended, the next


async def test_client_role_sees_admin_role_required(ui: Ui) -> None:
    page = ui.page
    await ui.open()
    await ui.login(VIEWER)
    await expect(page.get_by_test_id("forbidden")).to_have_text("admin role required")
    await expect(page.get_by_test_id("models")).to_be_hidden()
    await expect(page.get_by_test_id("queues")).to_be_hidden()
    await expect(page.get_by_test_id("jobs")).to_be_visible()  # /api/jobs is for every role
    await expect(page.get_by_test_id("banner")).to_be_hidden()
    await ui.shot("forbidden")


async def test_invalid_token_and_logout_return_to_login(ui: Ui) -> None:
    page = ui.page
    await ui.open()
    await ui.login(ADMIN)
    await expect(page.get_by_test_id("state-demo")).to_have_text("ready")
    token_key = "model-gateway.dashboard.token"
    await page.evaluate("key => sessionStorage.setItem(key, 'forged.token.value')", token_key)
    await page.reload()
    await expect(page.locator("#login-view")).to_be_visible()
    await expect(page.get_by_test_id("login-error")).to_contain_text("Sign in again")
    assert await page.evaluate("key => sessionStorage.getItem(key)", token_key) is None
    await ui.shot("expired")

    await ui.login(ADMIN)
    await expect(page.get_by_test_id("state-demo")).to_have_text("ready")
    await page.get_by_test_id("logout").click()
    await expect(page.locator("#login-view")).to_be_visible()
    await expect(page.get_by_test_id("login-error")).to_be_hidden()
    assert await page.evaluate("sessionStorage.length") == 0
    await page.reload()  # nothing kept: the login form again
    await expect(page.locator("#login-view")).to_be_visible()
