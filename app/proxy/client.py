"""Calls engines over their OpenAI-compatible HTTP API and classifies what went wrong.

aiohttp rather than httpx: measured on 2 cores, a FastAPI+aiohttp proxy served 3,826 rps
against 488 rps with httpx (docs/ARCHITECTURE.md, "The engine HTTP client"). One session for
the whole process keeps connections to every engine alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from app.errors import EngineCallError

Doc = dict[str, Any]
ENGINE_KEEPALIVE_S = 4.0  # below uvicorn's 5 s keep-alive (vLLM, llama.cpp's Python server)


@dataclass(frozen=True)
class HealthProblem:
    """Why a health check failed. `unreachable`: no connection could be made at all (refused,
    unknown host), a verdict one check can give; a slow or error answer may pass next time."""

    reason: str
    unreachable: bool = False


class EngineTimeout(EngineCallError):
    """The engine did not answer within the model's request timeout."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"engine did not answer within {seconds:g} s", retryable=False)


def _engine_message(body: bytes) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        return body.decode(errors="replace")[:500]
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and "message" in err:
            return str(err["message"])
        if isinstance(err, str):
            return err
        if "detail" in data:
            return str(data["detail"])
        if "message" in data:
            return str(data["message"])
    return body.decode(errors="replace")[:500]


def _status_error(status: int, body: bytes) -> EngineCallError:
    """An engine's error answer: 5xx, 408 and 429 may pass on another try; other 4xx will not."""
    if status >= 500 or status in (408, 429):
        return EngineCallError(
            f"engine error {status}: {_engine_message(body)}", retryable=True, status=status
        )
    return EngineCallError(_engine_message(body), retryable=False, status=status)


@contextlib.asynccontextmanager
async def _engine_call(timeout_s: float) -> AsyncIterator[None]:
    """Turn a timeout or a broken connection inside the block into the matching EngineCallError."""
    try:
        async with asyncio.timeout(timeout_s):
            yield
    except TimeoutError:
        raise EngineTimeout(timeout_s) from None
    except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
        raise EngineCallError(
            f"engine connection failed: {exc.__class__.__name__}: {exc}", retryable=True
        ) from None


class EngineClient:
    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        # Idle connections are dropped before the engine drops them: vLLM and llama.cpp serve
        # with uvicorn, which closes a connection idle for 5 s; a request sent on one it is
        # closing fails (ServerDisconnectedError) and spends a retry attempt for nothing.
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=ENGINE_KEEPALIVE_S)
        self._session = aiohttp.ClientSession(connector=connector, raise_for_status=False)

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("engine client is not started")
        return self._session

    async def chat_completion(
        self,
        base_url: str,
        payload: Doc,
        timeout_s: float,
        session: aiohttp.ClientSession | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Doc:
        """POST /v1/chat/completions; raises EngineCallError saying whether a retry may help.

        `headers`: what the engine needs on every call (an external upstream's API key)."""
        url = f"{base_url}/v1/chat/completions"
        post = (session or self.session).post(url, json=payload, headers=headers)
        async with _engine_call(timeout_s), post as response:
            body = await response.read()
        if response.status >= 400:
            raise _status_error(response.status, body)
        try:
            data = json.loads(body)
        except ValueError:
            raise EngineCallError("engine answered with invalid JSON", retryable=True) from None
        if not isinstance(data, dict) or not data.get("choices"):
            raise EngineCallError("engine answer has no choices", retryable=True)
        return data

    async def stream_chat(
        self, base_url: str, payload: Doc, timeout_s: float, headers: Mapping[str, str] | None = None
    ) -> AsyncIterator[Doc]:
        """POST with `stream: true` and yield each SSE `data:` chunk as a dict until [DONE].

        Failures before the first chunk raise EngineCallError like chat_completion; failures
        after it raise EngineCallError too, and the caller must not retry those. A body that
        ends without [DONE] is such a failure: the answer may be cut anywhere, so it must not
        be stored as a complete one.
        """
        url = f"{base_url}/v1/chat/completions"
        received = False
        post = self.session.post(url, json=payload, headers=headers)
        async with _engine_call(timeout_s), post as response:
            if response.status >= 400:
                raise _status_error(response.status, await response.read())
            async for raw in response.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    return
                try:
                    chunk = json.loads(data)
                except ValueError:
                    raise EngineCallError("engine sent an invalid stream chunk", retryable=True) from None
                received = True
                yield chunk
        if not received:
            await self._why_empty(base_url, payload, timeout_s, headers)
        raise EngineCallError("engine stream ended without data: [DONE]", retryable=True)

    async def _why_empty(
        self, base_url: str, payload: Doc, timeout_s: float, headers: Mapping[str, str] | None
    ) -> None:
        """A 200 stream that closed before its first chunk: ask once without `stream` and raise
        the engine's own refusal, if that is what it was.

        llama.cpp's Python server checks a prompt against the context only once its stream has
        begun: a prompt over the context is a 200 with an empty body there, where the same
        request without `stream` is a 400 `context_length_exceeded` with a message. Without
        this it would be retried as a broken stream and end as a 502 that names nothing. The
        probe is the same request (same limits), so the answer is the one the client would
        have had; a probe that succeeds leaves the stream failure as it was (retryable).

        The probe goes out on a connection of its own: the server closes the broken stream's
        connection as it ends it, and a pooled connection may be that one, closing under the
        probe (seen as ServerDisconnectedError on most tries).
        """
        probe = {k: v for k, v in payload.items() if k != "stream_options"}  # vLLM: stream only
        async with aiohttp.ClientSession() as fresh:
            try:
                await self.chat_completion(base_url, {**probe, "stream": False}, timeout_s, fresh, headers)
            except EngineCallError as exc:
                if not exc.retryable:
                    raise

    async def healthy(self, url: str, timeout_s: float = 2.0) -> bool:
        """GET `url` (the kind's health endpoint, commands.health_path) answers 200."""
        return await self.health_problem(url, timeout_s) is None

    async def health_problem(
        self, url: str, timeout_s: float = 2.0, headers: Mapping[str, str] | None = None
    ) -> HealthProblem | None:
        """None when GET `url` answers 200, else what went wrong, in words an operator can act on
        (shown as an external upstream's reason: refused, timed out, 401...)."""
        try:
            async with asyncio.timeout(timeout_s):
                async with self.session.get(url, headers=headers) as response:
                    if response.status == 200:
                        return None
                    body = await response.read()
                    message = _engine_message(body)[:200]
                    return HealthProblem(f"answered {response.status} to GET {url}: {message}")
        except TimeoutError:
            return HealthProblem(f"did not answer GET {url} within {timeout_s:g} s")
        except aiohttp.ClientConnectorError as exc:  # refused, unknown host, no route
            return HealthProblem(f"cannot be reached at {url}: {exc}", unreachable=True)
        except (aiohttp.ClientError, OSError) as exc:
            return HealthProblem(f"failed GET {url}: {exc.__class__.__name__}: {exc}")
