"""POST /api/ocr (multipart upload or the older clients' JSON data-URL form) and the admin
default resolution. Uploads are counted while they are read: a body over the limit is
refused with 413 at the limit, not after it was all spooled to disk."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Request
from pydantic import BaseModel, ConfigDict
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.types import Message

from app.api.deps import AdminDep, PrincipalDep, ServicesDep, client_id, idempotency_key
from app.api.schemas import inline_schema, parse_json_body
from app.api.views import ocr_answer
from app.errors import DocumentTooLarge, InvalidRequest
from app.ocr.documents import RESOLUTIONS
from app.ocr.requests import Output, output_for_prompt
from app.queue.priority import Priority
from app.usecases.ocr import OcrAsk

router = APIRouter()
MULTIPART_OVERHEAD = 64 * 1024  # boundaries and the small form fields around the file


async def read_ocr_request(request: Request, limit: int, resolution: str | None) -> OcrAsk:
    """Either form, read under the size limit; every missing or wrong field is a 400."""
    content_type = request.headers.get("content-type", "").lower()
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit * 4 // 3 + MULTIPART_OVERHEAD:
        raise DocumentTooLarge(f"request body is {declared} bytes; files may be at most {limit} bytes")
    limited = Request(request.scope, _counting(request.receive, limit * 4 // 3 + MULTIPART_OVERHEAD, limit))
    if content_type.startswith("multipart/form-data"):
        return await _multipart(limited, limit, resolution)
    if content_type.startswith("application/json"):
        return await _json_form(limited, limit, resolution)
    raise InvalidRequest(
        "send the document as multipart/form-data (field 'file') or as JSON with an image_url data URL",
        param="file",
    )


def _counting(
    receive: Callable[[], Awaitable[Message]], body_limit: int, file_limit: int
) -> Callable[[], Awaitable[Message]]:
    seen = 0

    async def counted() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > body_limit:
                raise DocumentTooLarge(
                    f"request body is over the limit; files may be at most {file_limit} bytes"
                )
        return message

    return counted


async def _multipart(request: Request, limit: int, resolution: str | None) -> OcrAsk:
    try:
        form = await request.form(max_files=1, max_fields=16)
    except HTTPException as exc:  # Starlette's refusal of a malformed or oversized form
        raise InvalidRequest(
            f"multipart body not accepted: {exc.detail} Send one file per request, in field 'file'.",
            param="file",
        ) from None
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise InvalidRequest("multipart field 'file' is required (the image or PDF to read)", param="file")
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise DocumentTooLarge(f"file is over the limit of {limit} bytes")
    fields = {k: v for k, v in form.items() if isinstance(v, str)}
    unknown = set(fields) - {"model", "output", "pages", "resolution", "max_tokens"}
    if unknown:
        raise InvalidRequest(f"unknown form field(s): {', '.join(sorted(unknown))}", param=sorted(unknown)[0])
    return OcrAsk(
        document=data,
        model=fields.get("model") or None,
        output=_output(fields.get("output", "text")),
        pages=fields.get("pages") or None,
        resolution=resolution or fields.get("resolution") or None,
        max_tokens=_max_tokens(fields.get("max_tokens")),
        filename=upload.filename,
    )


class _ImageUrl(BaseModel):
    model_config = ConfigDict(extra="allow")
    url: str


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: str
    text: str | None = None
    image_url: _ImageUrl | None = None


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: str
    content: list[_Part] | str


class OcrJsonRequest(BaseModel):
    """The form clients of the system we re-implement send (docs/ARCHITECTURE.md, "The HTTP contract")."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    messages: list[_Message]
    max_tokens: int | None = None
    output: Output | None = None
    pages: str | None = None
    temperature: float | None = None


async def _json_form(request: Request, limit: int, resolution: str | None) -> OcrAsk:
    body = parse_json_body(OcrJsonRequest, await request.body())
    urls = [
        p.image_url.url
        for m in body.messages
        if isinstance(m.content, list)
        for p in m.content
        if p.image_url
    ]
    texts = [p.text for m in body.messages if isinstance(m.content, list) for p in m.content if p.text]
    if len(urls) != 1:
        raise InvalidRequest(
            f"the request must carry exactly one image_url part (got {len(urls)})", param="messages"
        )
    data = _decode_data_url(urls[0], limit)
    return OcrAsk(
        document=data,
        model=body.model,
        output=body.output or output_for_prompt(" ".join(t for t in texts if t)),
        pages=body.pages,
        resolution=resolution,
        max_tokens=_max_tokens(str(body.max_tokens) if body.max_tokens is not None else None),
        filename=None,
    )


def _decode_data_url(url: str, limit: int) -> bytes:
    if not url.startswith("data:") or ";base64," not in url[:100]:
        raise InvalidRequest(
            "image_url.url must be a base64 data URL (data:image/png;base64,...)", param="messages"
        )
    encoded = url.split(",", 1)[1]
    if len(encoded) > limit * 4 // 3 + 4:
        raise DocumentTooLarge(f"image is over the limit of {limit} bytes")
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest("image_url data URL is not valid base64", param="messages") from None


def _output(value: str) -> Output:
    if value == "text":
        return "text"
    if value == "markdown":
        return "markdown"
    raise InvalidRequest(f"unknown output {value[:40]!r}; valid: text, markdown", param="output")


def _max_tokens(value: str | None) -> int | None:
    if value is None or value == "":
        return None
    if not value.isdigit() or not 1 <= int(value) <= 131072:
        raise InvalidRequest("max_tokens must be an integer from 1 to 131072", param="max_tokens")
    return int(value)


OCR_FORM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["file"],
    "additionalProperties": False,
    "properties": {
        "file": {"type": "string", "format": "binary", "description": "the image or PDF"},
        "model": {"type": "string", "maxLength": 128},
        "output": {"type": "string", "enum": ["text", "markdown"]},
        "pages": {"type": "string", "description": "e.g. 1-3,5 (PDF pages)"},
        "resolution": {"type": "string", "enum": list(RESOLUTIONS)},
        "max_tokens": {"type": "integer", "minimum": 1, "maximum": 131072},
    },
}
# documented here because the route reads its body itself (two forms, and a size counted as it is read)
OCR_REQUEST_BODY: dict[str, Any] = {
    "required": True,
    "content": {
        "multipart/form-data": {"schema": OCR_FORM_SCHEMA},
        "application/json": {"schema": inline_schema(OcrJsonRequest)},
    },
}


@router.post("/api/ocr", openapi_extra={"requestBody": OCR_REQUEST_BODY})
async def ocr(
    request: Request,
    svc: ServicesDep,
    user: PrincipalDep,
    client: Annotated[str, Depends(client_id)],
    key: Annotated[str | None, Depends(idempotency_key)],
    x_priority: Annotated[str | None, Header()] = None,
    x_resolution: Annotated[str | None, Header()] = None,
) -> dict[str, Any]:
    """The whole document is one job in the model's queue; the answer has every page."""
    ask = await read_ocr_request(request, svc.settings.ocr.max_upload_bytes, x_resolution)
    job = await svc.ocr.submit(user, ask, client, Priority.parse(x_priority), key, wait=True)
    return ocr_answer(job)


# -- admin: default resolution ---------------------------------------------------------------


class ResolutionBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mode: str | None = None
    resolution: str | None = None


@router.get("/admin/ocr/resolution")
async def get_resolution(svc: ServicesDep, _: AdminDep) -> dict[str, Any]:
    return {"resolution": await svc.ocr.default_resolution.get(), "modes": dict(RESOLUTIONS)}


@router.post(
    "/admin/ocr/resolution",
    openapi_extra={
        "requestBody": {
            "required": False,
            "content": {"application/json": {"schema": inline_schema(ResolutionBody)}},
        }
    },
)
async def set_resolution(
    request: Request, svc: ServicesDep, user: AdminDep, resolution: str | None = None
) -> dict[str, Any]:
    """`?resolution=gundam` (older clients) or a JSON body `{"mode": "gundam"}`."""
    value = resolution
    if value is None and (await request.body()).strip():
        body = parse_json_body(ResolutionBody, await request.body())
        value = body.mode or body.resolution
    if not value:
        raise InvalidRequest(
            f'say which resolution: ?resolution=... or {{"mode": ...}}; valid: {", ".join(RESOLUTIONS)}',
            param="mode",
        )
    mode = await svc.ocr.default_resolution.set(value, user.subject)
    if svc.audit is not None:
        await svc.audit.record(user.subject, "ocr.resolution", mode)
    return {
        "status": "switched",
        "resolution": mode,
        "mode": mode,
        "message": f"default OCR resolution is now {mode} ({RESOLUTIONS[mode]} px)",
    }
