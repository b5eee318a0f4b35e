"""Request bodies. Unknown fields are refused (422 naming the field) so a typo such as
`max_token` is never silently ignored."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.errors import InvalidRequest


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ContentPart(_Body):
    type: Literal["text", "image_url"]
    text: str | None = Field(None, max_length=1_000_000)
    image_url: dict[str, Any] | None = None


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[ContentPart] | None = Field(None)
    name: str | None = Field(None, max_length=64)
    tool_call_id: str | None = Field(None, max_length=128)
    tool_calls: list[dict[str, Any]] | None = None


class ChatRequest(_Body):
    model: str = Field(..., min_length=1, max_length=128)
    messages: list[ChatMessage] = Field(..., min_length=1, max_length=1000)
    max_tokens: int | None = Field(None, ge=1, le=131072)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    stream: bool = False

    def engine_request(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True, exclude={"stream"})


class JobRequest(ChatRequest):
    """POST /api/jobs: a chat request run in the background (OCR documents join with OCR)."""

    type: Literal["chat"] = "chat"

    def engine_request(self) -> dict[str, Any]:
        if self.stream:
            raise InvalidRequest(
                "stream is not supported for background jobs; poll the job instead", param="stream"
            )
        return self.model_dump(exclude_none=True, exclude={"stream", "type"})
