"""Request bodies. Unknown fields are refused (422 naming the field) so a typo such as
`max_token` is never silently ignored."""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.errors import InvalidRequest

Body = TypeVar("Body", bound=BaseModel)


def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON schema with every `$ref` resolved in place: for the OpenAPI request
    bodies of routes that read their body themselves (`openapi_extra`), where `#/$defs/...`
    would point into the wrong document."""
    schema = model.model_json_schema()
    defs: dict[str, Any] = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                rest = {k: v for k, v in node.items() if k != "$ref"}
                return resolve({**defs[ref.removeprefix("#/$defs/")], **rest})
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(value) for value in node]
        return node

    resolved: dict[str, Any] = resolve(schema)
    return resolved


def parse_json_body(model: type[Body], raw: bytes) -> Body:
    """A body a route reads itself (it also takes other content types), checked exactly as
    FastAPI checks a declared body: not JSON → 400 `invalid_json`; missing or of the wrong
    shape → 422 `validation_error` with every `loc` starting at "body"."""
    if not raw.strip():
        raise RequestValidationError([{"type": "missing", "loc": ("body",), "msg": "Field required"}])
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise RequestValidationError(
            [{**problem, "loc": ("body", *problem["loc"])} for problem in exc.errors()]
        ) from None


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImageUrl(_Body):
    url: str = Field(..., min_length=1, description="https URL or data URL of the image")
    detail: Literal["auto", "low", "high"] | None = None


class ContentPart(_Body):
    type: Literal["text", "image_url"]
    text: str | None = Field(None, max_length=1_000_000)
    image_url: ImageUrl | None = None


class ToolCallFunction(_Body):
    name: str = Field(..., min_length=1, max_length=128)
    arguments: str = Field(..., description="the arguments as a JSON text")


class ToolCall(_Body):
    """A tool call of an earlier assistant message, as the OpenAI API returned it."""

    id: str = Field(..., min_length=1, max_length=128)
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[ContentPart] | None = Field(None)
    name: str | None = Field(None, max_length=64)
    tool_call_id: str | None = Field(None, max_length=128)
    tool_calls: list[ToolCall] | None = Field(None, max_length=128)


class FunctionDefinition(_Body):
    name: str = Field(..., min_length=1, max_length=128)
    description: str | None = Field(None, max_length=100_000)
    parameters: dict[str, Any] | None = Field(None, description="a JSON Schema, passed to the engine as is")
    strict: bool | None = None


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Body):
    name: str = Field(..., min_length=1, max_length=128)


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: NamedFunction


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = Field(
        None, description='{"name", "schema", "strict"?}: passed to the engine as is'
    )


LogitBias = Annotated[float, Field(ge=-100, le=100)]


class ChatRequest(_Body):
    """OpenAI's chat fields that vLLM implements, plus vLLM's own sampling extensions (the SDK
    sends those through `extra_body`). What the engine does with them is the engine's: they
    are checked for shape here and passed on unchanged."""

    model: str = Field(..., min_length=1, max_length=128)
    messages: list[ChatMessage] = Field(..., min_length=1, max_length=1000)
    max_tokens: int | None = Field(None, ge=1, le=131072)
    max_completion_tokens: int | None = Field(None, ge=1, le=131072)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    logit_bias: dict[str, LogitBias] | None = Field(None, max_length=1024, description="token id → bias")
    top_k: int | None = Field(None, ge=-1, le=1_000_000, description="vLLM: -1 = all tokens")
    min_p: float | None = Field(None, ge=0, le=1, description="vLLM")
    repetition_penalty: float | None = Field(None, gt=0, le=2, description="vLLM")
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
