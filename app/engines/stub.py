"""Stub engine: a TEST DOUBLE for GPU engines, not a model.

A real process speaking the same OpenAI-compatible HTTP API as vLLM (`/health`,
`/v1/models`, `/v1/chat/completions`, non-streaming and SSE), with knobs that make it slow,
failing, crashing, hanging or cutting a stream short, so the gateway's queue, retries and
recovery are tested against real sockets and real process deaths. Every answer says what it
is in `system_fingerprint`.

    python -m app.engines.stub --port 9001 --latency-ms 50
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import time
import uuid
from typing import Any

from aiohttp import web

FINGERPRINT = "stub-engine (test double, not a model)"


class StubEngine:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.model = args.model_name
        self.requests = 0
        self.failed_first = 0
        self.rng = random.Random(args.seed)
        self.ready_at = time.monotonic() + args.startup_s

    # -- handlers --------------------------------------------------------------------------

    async def health(self, _: web.Request) -> web.Response:
        if time.monotonic() < self.ready_at:
            return web.json_response({"status": "loading"}, status=503)
        return web.json_response({"status": "ok", "engine": FINGERPRINT})

    async def models(self, _: web.Request) -> web.Response:
        return web.json_response(
            {"object": "list", "data": [{"id": self.model, "object": "model", "owned_by": "stub"}]}
        )

    async def chat(self, request: web.Request) -> web.StreamResponse:
        """With --journal, each call is written down as it begins and ends (ended: cancelled
        too), so a test can check that no job was ever run twice at the same time."""
        if not self.args.journal:
            return await self._answer(request)
        call = uuid.uuid4().hex
        try:
            messages = (await request.json()).get("messages") or [{}]
            content = _text(messages[-1])
        except (ValueError, AttributeError, TypeError):
            content = ""
        self._journal({"event": "start", "call": call, "content": content})
        try:
            return await self._answer(request)
        finally:
            self._journal({"event": "end", "call": call, "content": content})

    def _journal(self, entry: dict[str, Any]) -> None:
        line = json.dumps({**entry, "pid": os.getpid(), "t": time.time()}) + "\n"
        with open(self.args.journal, "a", encoding="utf-8") as journal:
            journal.write(line)

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "request body is not valid JSON")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return _error(400, "messages must be a non-empty list")
        self.requests += 1
        if self.args.log_requests:  # like vLLM's request log lines: a log that keeps growing
            # the sampling fields as received, so tests can check what the gateway sent
            sampling = {k: v for k, v in body.items() if k not in ("messages", "model")}
            print(
                f"request {self.requests}: {len(messages)} messages {json.dumps(sampling, sort_keys=True)}",
                flush=True,
            )
        if self.args.crash_after and self.requests > self.args.crash_after:
            os._exit(3)  # a crash, on purpose: no cleanup, connections reset
        if self.args.hang:
            await asyncio.Event().wait()
        if self.failed_first < self.args.fail_first:
            self.failed_first += 1
            return _error(500, f"stub failure {self.failed_first} of {self.args.fail_first} (--fail-first)")
        if self.args.fail_rate and self.rng.random() < self.args.fail_rate:
            return _error(500, "stub failure (--fail-rate)")
        prompt_tokens = sum(len(_text(m).split()) for m in messages)
        if prompt_tokens > self.args.max_model_len:
            if body.get("stream") and self.args.late_stream_refusals:
                # llama.cpp's Python server: the stream has begun (200) when the check fails
                refused = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
                await refused.prepare(request)
                await refused.write_eof()
                return refused
            return _error(
                400,
                f"This model's maximum context length is {self.args.max_model_len} tokens. "
                f"However, you requested {prompt_tokens} tokens in the messages.",
            )
        max_tokens = int(body.get("max_completion_tokens") or body.get("max_tokens") or self.args.max_tokens)
        words = _reply_words(_text(messages[-1]), max_tokens)
        finish = "length" if len(words) >= max_tokens else "stop"
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(words),
            "total_tokens": prompt_tokens + len(words),
        }
        called = _forced_tool(body)  # like a model told to call a tool: the call, no text
        arguments = json.dumps({"text": _text(messages[-1])})
        if body.get("stream"):
            # llama.cpp's server ignores stream_options: its streams never carry usage
            asked = bool((body.get("stream_options") or {}).get("include_usage"))
            include_usage = asked and not self.args.no_stream_usage
            forced = (called, arguments) if called is not None else None
            return await self._stream(request, words, finish, usage if include_usage else None, forced)
        if self.args.latency_ms:
            await asyncio.sleep(self.args.latency_ms / 1000)
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": " ".join(words)},
            "finish_reason": finish,
        }
        if called is not None:
            call = {
                "id": "call_" + uuid.uuid4().hex[:12],
                "type": "function",
                "function": {"name": called, "arguments": arguments},
            }
            choice.update(
                message={"role": "assistant", "content": None, "tool_calls": [call]},
                finish_reason="tool_calls",
            )
        if body.get("logprobs"):  # one entry per word, as vLLM answers (values made up, deterministic)
            top = int(body.get("top_logprobs") or 0)
            choice["logprobs"] = {
                "content": [
                    {
                        "token": w,
                        "logprob": -0.5,
                        "bytes": list(w.encode()),
                        "top_logprobs": [{"token": w, "logprob": -0.5, "bytes": list(w.encode())}]
                        * min(top, 1),
                    }
                    for w in words
                ]
            }
        return web.json_response(
            {
                "id": "chatcmpl-" + uuid.uuid4().hex,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": self.model,
                "system_fingerprint": FINGERPRINT,
                "choices": [choice],
                "usage": usage,
            }
        )

    async def _stream(
        self,
        request: web.Request,
        words: list[str],
        finish: str,
        usage: dict[str, int] | None,
        call: tuple[str, str] | None = None,
    ) -> web.StreamResponse:
        """Word by word, or a tool call (name, then its arguments in two pieces) as vLLM streams one."""
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        chunk_id, created = "chatcmpl-" + uuid.uuid4().hex, int(time.time())

        def chunk(delta: dict[str, Any], finish_reason: str | None) -> bytes:
            data = {
                "id": chunk_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": self.model,
                "system_fingerprint": FINGERPRINT,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
            }
            return f"data: {json.dumps(data)}\n\n".encode()

        sent = 0

        async def send(data: bytes) -> bool:
            """Write one chunk, or stop where chunk N+1 would go: cut the connection
            (--break-stream-after) or end the body cleanly without [DONE] (--end-stream-after)."""
            nonlocal sent
            if self.args.break_stream_after and sent >= self.args.break_stream_after:
                assert request.transport is not None
                request.transport.abort()  # no terminating chunk: the reader sees a broken body
                return False
            if self.args.end_stream_after and sent >= self.args.end_stream_after:
                await response.write_eof()  # a well-formed body that simply stops: no finish, no [DONE]
                return False
            await response.write(data)
            sent += 1
            return True

        if self.args.latency_ms:
            await asyncio.sleep(self.args.latency_ms / 1000)
        if not await send(chunk({"role": "assistant", "content": ""}, None)):
            return response
        if call is not None:
            name, arguments = call
            half = len(arguments) // 2
            head = {"index": 0, "id": "call_" + uuid.uuid4().hex[:12], "type": "function"}
            pieces = [
                {**head, "function": {"name": name, "arguments": arguments[:half]}},
                {"index": 0, "function": {"arguments": arguments[half:]}},
            ]
            for piece in pieces:
                if not await send(chunk({"tool_calls": [piece]}, None)):
                    return response
            finish = "tool_calls"
            words = []
        for i, word in enumerate(words):
            if self.args.token_latency_ms:
                await asyncio.sleep(self.args.token_latency_ms / 1000)
            if not await send(chunk({"content": word if i == 0 else " " + word}, None)):
                return response
        await response.write(chunk({}, finish))
        if usage is not None:
            data = {
                "id": chunk_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": self.model,
                "choices": [],
                "usage": usage,
            }
            await response.write(f"data: {json.dumps(data)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


def _forced_tool(body: dict[str, Any]) -> str | None:
    """The tool the request makes the model call: `tool_choice` names one, or says "required"
    (then the first tool). The stub does not decide to call tools on its own."""
    tools = body.get("tools") or []
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        return str((choice.get("function") or {}).get("name"))
    if choice == "required" and tools:
        return str(tools[0]["function"]["name"])
    return None


def _text(message: Any) -> str:
    if not isinstance(message, dict):
        return ""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def _reply_words(prompt: str, max_tokens: int) -> list[str]:
    """A deterministic answer that depends on the prompt, so tests can check it was routed right."""
    words = ["stub", "reply", "to:", *prompt.split()]
    return words[: max(1, max_tokens)]


def _error(status: int, message: str) -> web.Response:
    kind = "BadRequestError" if status < 500 else "InternalServerError"
    return web.json_response({"error": {"message": message, "type": kind, "code": status}}, status=status)


def _api_key_check(api_key: str) -> Any:
    """vLLM's --api-key: every /v1 route needs `Authorization: Bearer <key>`, else 401 with
    `{"error": "Unauthorized"}`; /health stays open (so does llama.cpp's server with --api_key)."""

    @web.middleware
    async def check(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path.startswith("/v1") and request.headers.get("Authorization") != f"Bearer {api_key}":
            return web.json_response({"error": "Unauthorized"}, status=401)
        response: web.StreamResponse = await handler(request)
        return response

    return check


def build_app(args: argparse.Namespace) -> web.Application:
    engine = StubEngine(args)
    middlewares = [_api_key_check(args.api_key)] if args.api_key else []
    app = web.Application(client_max_size=64 * 1024 * 1024, middlewares=middlewares)
    app.router.add_get("/health", engine.health)
    app.router.add_get("/v1/models", engine.models)
    app.router.add_post("/v1/chat/completions", engine.chat)
    return app


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Stub OpenAI-compatible engine (a test double, not a model)."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model-name", default="stub")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="delay before the answer (first token)")
    parser.add_argument("--token-latency-ms", type=float, default=0.0, help="delay between streamed tokens")
    parser.add_argument("--startup-s", type=float, default=0.0, help="seconds /health answers 503 (loading)")
    parser.add_argument("--fail-rate", type=float, default=0.0, help="share of requests answered with 500")
    parser.add_argument("--fail-first", type=int, default=0, help="answer the first N requests with 500")
    parser.add_argument("--crash-after", type=int, default=0, help="exit abruptly on request N+1")
    parser.add_argument("--hang", action="store_true", help="accept chat requests and never answer")
    parser.add_argument(
        "--break-stream-after",
        type=int,
        default=0,
        help="cut the connection after N streamed chunks (the first is the role chunk)",
    )
    parser.add_argument(
        "--end-stream-after",
        type=int,
        default=0,
        help="end the streamed body cleanly after N chunks, without a finish chunk or [DONE]",
    )
    parser.add_argument("--max-model-len", type=int, default=4096, help="longer prompts get a 400, like vLLM")
    parser.add_argument(
        "--late-stream-refusals",
        action="store_true",
        help="a streamed prompt over --max-model-len gets a 200 and an empty body, like llama.cpp",
    )
    parser.add_argument(
        "--no-stream-usage",
        action="store_true",
        help="streams carry no usage chunk even when asked (stream_options), like llama.cpp",
    )
    parser.add_argument("--max-tokens", type=int, default=16, help="default completion length")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-requests", action="store_true", help="print a line per chat request")
    parser.add_argument("--journal", default="", help="append a JSON line as each chat call begins and ends")
    parser.add_argument("--api-key", default="", help="/v1 routes need this bearer token (vLLM's --api-key)")
    parser.add_argument(
        "--spawn-child",
        action="store_true",
        help="start a long-sleeping child that ignores SIGTERM (models vLLM's EngineCore)",
    )
    return parser.parse_args(argv)


# Ignores SIGTERM, like an EngineCore busy in a CUDA call: only SIGKILL stops it, so a test
# sees whether the supervisor escalates to every process of the engine, not only its group.
_CHILD = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(3600)"


def spawn_child() -> subprocess.Popen[bytes]:
    """A child in the stub's process group with its environment (the engine id included), like
    the EngineCore process vLLM starts, which holds the GPU memory and can outlive its parent."""
    return subprocess.Popen([sys.executable, "-c", _CHILD], stdin=subprocess.DEVNULL)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.spawn_child:
        print(f"stub engine child pid {spawn_child().pid}", flush=True)
    print(f"stub engine (test double) {args.model_name} listening on {args.host}:{args.port}", flush=True)
    web.run_app(build_app(args), host=args.host, port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
