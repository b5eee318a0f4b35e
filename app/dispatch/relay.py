"""One engine stream relayed to the handler holding the client: chunks go to its sink as they
come (the first content chunk is the time to first token), and the whole answer, tool calls
assembled, is kept for the job's history."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any

from app.proxy.client import EngineClient
from app.queue.delivery import StreamEvent

Doc = dict[str, Any]


class StreamRelay:
    """One engine stream: chunks go to the client's sink as they come, the text is kept for history."""

    def __init__(
        self,
        client: EngineClient,
        headers: Mapping[str, str],
        sink: asyncio.Queue[StreamEvent],
        on_first_token: Callable[[], None],
    ) -> None:
        self._client = client
        self._headers = headers
        self._sink = sink
        self._on_first_token = on_first_token
        self.sent = False  # a chunk reached the sink: the job can no longer be retried
        self._text: list[str] = []
        self._tool_calls: dict[int, Doc] = {}  # by the deltas' index, assembled as they come
        self._usage: Doc = {}
        self._finish: str | None = None
        self._fingerprint: Any = None

    async def run(self, url: str, payload: Doc, timeout_s: float) -> bool:
        first_token = False
        async for chunk in self._client.stream_chat(url, payload, timeout_s, self._headers):
            for choice in chunk.get("choices") or []:
                delta = choice.get("delta") or {}
                self._text.append(delta.get("content") or "")
                for part in delta.get("tool_calls") or []:
                    self._add_tool_call(part)
                self._finish = choice.get("finish_reason") or self._finish
            self._usage = chunk.get("usage") or self._usage
            self._fingerprint = chunk.get("system_fingerprint") or self._fingerprint
            self._sink.put_nowait(StreamEvent("chunk", chunk))
            self.sent = True
            if not first_token and self._text and self._text[-1]:
                first_token = True
                self._on_first_token()
        return True

    def _add_tool_call(self, part: Doc) -> None:
        """Tool-call deltas: the first of an index brings id, type and name, the rest pieces of
        the arguments text (OpenAI's and vLLM's streaming format)."""
        call = self._tool_calls.setdefault(
            int(part.get("index") or 0),
            {"id": None, "type": "function", "function": {"name": "", "arguments": ""}},
        )
        call["id"] = part.get("id") or call["id"]
        call["type"] = part.get("type") or call["type"]
        function = part.get("function") or {}
        call["function"]["name"] += function.get("name") or ""
        call["function"]["arguments"] += function.get("arguments") or ""

    def result(self) -> Doc:
        message: Doc = {"role": "assistant", "content": "".join(self._text)}
        if self._tool_calls:
            message["tool_calls"] = [self._tool_calls[i] for i in sorted(self._tool_calls)]
        return {
            "message": message,
            "finish_reason": self._finish,
            "usage": self._usage,
            "system_fingerprint": self._fingerprint,
        }
