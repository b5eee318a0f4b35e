"""Turn an uploaded file into page images an OCR engine can take, refusing what would hurt us.

The type comes from magic bytes, never from the file name or the client's Content-Type: both
are whatever the client says. Pixel limits are checked from the header before anything is
decoded, so a small file that claims a huge image (a decompression bomb) costs nothing; Pillow's
own `MAX_IMAGE_PIXELS` only warns below twice its value, so it is not relied on.

Resolution modes follow DeepSeek-OCR (tiny 512, small 640, base 1024, large 1280, gundam):
the gateway only bounds the longer side of what it sends, keeping the aspect ratio and never
upscaling. Padding to a square, the 1024 global view and gundam's 640-pixel tiles are made by
the engine's own image processor (vLLM's DeepSeek-OCR processor runs with crop_mode), so
gundam sends enough pixels for those tiles (up to 3 tiles along the longer side) rather than
tiles of its own.
"""

from __future__ import annotations

import base64
import io
import math
import re
import struct
import threading
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final, cast

import pypdfium2 as pdfium  # type: ignore[import-untyped]
import pypdfium2.raw as pdfium_raw  # type: ignore[import-untyped]
from PIL import Image, ImageOps

from app.errors import DocumentTooLarge, InvalidDocument, InvalidRequest

SUPPORTED: Final = "JPEG, PNG, WebP, BMP, TIFF, PDF"

RESOLUTIONS: Final[Mapping[str, int]] = MappingProxyType(
    {"tiny": 512, "small": 640, "base": 1024, "large": 1280, "gundam": 1920}
)
"""Longest side, in pixels, of the image sent to the engine for each mode."""

GUNDAM_TILE: Final = 640
"""Tile size the engine's processor cuts in gundam mode (its global view is 1024)."""

_PIL_FORMATS: Final = {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP", "bmp": "BMP", "tiff": "TIFF"}
# What Pillow raises on broken input varies by plugin; none of these can come from our own code.
_DECODE_ERRORS: Final = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, zlib.error)
_BMP_DIB_SIZES: Final = frozenset({12, 16, 40, 52, 56, 64, 108, 124})
_PAGE_ITEM = re.compile(r"(\d{1,9})(?:\s*-\s*(\d{0,9}))?")
# PDFium is not thread-safe and the gateway renders in worker threads.
_PDFIUM_LOCK = threading.Lock()
_PDFIUM_ERRORS: Final = {
    pdfium_raw.FPDF_ERR_UNKNOWN: "unknown error",
    pdfium_raw.FPDF_ERR_FILE: "file not found or could not be opened",
    pdfium_raw.FPDF_ERR_FORMAT: "not in PDF format or corrupted",
}


@dataclass(frozen=True)
class PageImage:
    """One page ready for OCR: RGB, upright, with its 1-based number in the document."""

    number: int
    image: Image.Image
    width: int
    height: int

    @classmethod
    def of(cls, number: int, image: Image.Image) -> PageImage:
        return cls(number, image, image.width, image.height)


# -- type --------------------------------------------------------------------------------------


def detect_format(data: bytes) -> str:
    """The document type from its first bytes: jpeg, png, webp, bmp, tiff or pdf."""
    if not data:
        raise InvalidDocument("file is empty")
    head = data[:16]
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    # "BM" alone is too weak (plain text can start with it); the DIB header size pins it down.
    if head.startswith(b"BM") and len(data) >= 18 and struct.unpack("<I", data[14:18])[0] in _BMP_DIB_SIZES:
        return "bmp"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if b"%PDF-" in data[:1024]:  # the PDF spec lets readers accept junk before the header
        return "pdf"
    raise InvalidRequest(
        f"file is not a supported image or PDF (got {_describe(data)}); supported: {SUPPORTED}",
        param="file",
    )


def _describe(data: bytes) -> str:
    """Name common wrong uploads, so the client learns what it actually sent."""
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "a GIF image"
    if data.startswith(b"PK\x03\x04"):
        return "a ZIP archive such as DOCX or XLSX"
    if data[4:8] == b"ftyp":
        return "ISO media such as HEIC, AVIF or MP4"
    sample = data[:1024]
    if b"\x00" not in sample:
        try:
            sample.decode("utf-8")
            return "text"
        except UnicodeDecodeError as exc:
            if exc.start >= len(sample) - 3:  # a character cut at the sample's end
                return "text"
    return "unknown binary content"


# -- page selection and resolution ------------------------------------------------------------


def parse_page_spec(spec: str, page_count: int) -> list[int]:
    """Pages named like "1-3,5" or "4-" (to the end): 1-based, sorted, each once."""
    if not spec.strip():
        raise InvalidRequest("pages is empty; use page numbers and ranges like 1-3,5", param="pages")
    selected: set[int] = set()
    for raw in spec.split(","):
        item = raw.strip()
        match = _PAGE_ITEM.fullmatch(item)
        if match is None:
            raise InvalidRequest(
                f"pages item {item!r} is not a page number or range (use a list like 1-3,5)", param="pages"
            )
        first = int(match[1])
        last = first if match[2] is None else int(match[2]) if match[2] else page_count
        if first < 1:
            raise InvalidRequest("page numbers start at 1", param="pages")
        if last < first:
            raise InvalidRequest(f"pages range {item!r} runs backwards", param="pages")
        if last > page_count:
            raise InvalidRequest(
                f"page {last} is out of range; the document has {page_count} "
                f"page{'s' if page_count != 1 else ''}",
                param="pages",
            )
        selected.update(range(first, last + 1))
    return sorted(selected)


def parse_resolution(value: str) -> str:
    """A resolution mode name, case and spaces forgiven."""
    mode = value.strip().lower()
    if mode not in RESOLUTIONS:
        raise InvalidRequest(
            f"unknown resolution {value!r}; valid: {', '.join(RESOLUTIONS)}", param="X-Resolution"
        )
    return mode


def resize_for_mode(image: Image.Image, mode: str) -> Image.Image:
    """Bound the longer side by the mode's size; smaller images pass through untouched.

    Upscaling adds no detail for an OCR model and only costs tokens, so it is never done.
    """
    limit = RESOLUTIONS[parse_resolution(mode)]
    width, height = image.size
    if max(width, height) <= limit:
        return image
    scale = limit / max(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def encode_data_url(image: Image.Image) -> str:
    """A PNG data URL: lossless, because JPEG artefacts around glyphs hurt OCR."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=3)  # level 3: most of the size win, fast
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


# -- loading -----------------------------------------------------------------------------------


def load_pages(
    data: bytes, *, pages: str | None, max_pages: int, max_pixels: int, dpi: int = 144
) -> list[PageImage]:
    """Every selected page as an upright RGB image, or a clear error (see iter_pages)."""
    return list(iter_pages(data, pages=pages, max_pages=max_pages, max_pixels=max_pixels, dpi=dpi))


def iter_pages(
    data: bytes, *, pages: str | None, max_pages: int, max_pixels: int, dpi: int = 144
) -> Iterator[PageImage]:
    """The selected pages one at a time, each checked before it is decoded.

    Multi-frame TIFFs give one page per frame; other images are one page. PDF pages are
    rendered at `dpi`, lower for large-format pages that would exceed `max_pixels` (a poster
    is not an attack, and the image is downscaled for the engine anyway). One at a time because
    a caller that shrinks each page before asking for the next holds one full-size page in
    memory, not `max_pages` of them (20 blank 50-megapixel TIFF frames took ~4 GB at once).
    """
    kind = detect_format(data)
    if kind == "pdf":
        yield from _load_pdf(data, pages=pages, max_pages=max_pages, max_pixels=max_pixels, dpi=dpi)
    else:
        yield from _load_image(data, kind, pages=pages, max_pages=max_pages, max_pixels=max_pixels)


def _select(pages: str | None, count: int, max_pages: int, what: str) -> list[int]:
    numbers = parse_page_spec(pages, count) if pages is not None else list(range(1, count + 1))
    if len(numbers) > max_pages:
        if len(numbers) == count:
            raise DocumentTooLarge(f"{what} has {count} pages; the limit is {max_pages}")
        raise DocumentTooLarge(
            f"{len(numbers)} pages selected from a {what} of {count} pages; the limit is {max_pages}"
        )
    return numbers


def _load_image(
    data: bytes, kind: str, *, pages: str | None, max_pages: int, max_pixels: int
) -> Iterator[PageImage]:
    try:
        # Only the detected format's plugin may parse it: less attack surface, clearer errors.
        source = Image.open(io.BytesIO(data), formats=[_PIL_FORMATS[kind]])
    except Image.DecompressionBombError as exc:
        raise DocumentTooLarge(
            f"image is far too large to decode; the limit is {max_pixels:,} pixels"
        ) from exc
    except _DECODE_ERRORS as exc:
        raise InvalidDocument("image is truncated or corrupt") from exc
    with source:
        frames = _frame_count(source) if kind == "tiff" else 1
        numbers = _select(pages, frames, max_pages, "TIFF")
        for number in numbers:
            prefix = f"page {number}: " if frames > 1 else ""
            try:
                source.seek(number - 1)
            except _DECODE_ERRORS as exc:
                raise InvalidDocument(f"{prefix}image is truncated or corrupt") from exc
            width, height = source.size
            if width * height > max_pixels:
                raise DocumentTooLarge(
                    f"{prefix}image is {width}x{height} = {width * height:,} pixels; "
                    f"the limit is {max_pixels:,}"
                )
            try:
                source.load()  # decode fully now: a truncated file must fail here, not in the engine
            except _DECODE_ERRORS as exc:
                raise InvalidDocument(f"{prefix}image is truncated or corrupt") from exc
            yield PageImage.of(number, _to_rgb(_upright(source), prefix))


def _frame_count(image: Image.Image) -> int:
    try:
        return int(getattr(image, "n_frames", 1))
    except _DECODE_ERRORS as exc:
        raise InvalidDocument("TIFF is truncated or corrupt") from exc


def _upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation: phone photos of documents are often stored sideways."""
    try:
        upright = ImageOps.exif_transpose(image)
    except (*_DECODE_ERRORS, KeyError, TypeError):
        upright = image  # a broken EXIF block should not cost the text
    # Always a copy: the source is closed with its file once the pages are read.
    return image.copy() if upright is image else upright


def _to_rgb(image: Image.Image, prefix: str = "") -> Image.Image:
    """RGB with transparency flattened onto white, since text drawn on a transparent
    background would otherwise turn black-on-black."""
    mode = image.mode
    try:
        if mode == "RGB":
            return image
        if mode in ("I", "F") or mode.startswith("I;16"):
            image = _stretch_to_8bit(image)
        if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
            rgba = image.convert("RGBA")
            flat = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            flat.alpha_composite(rgba)
            return flat.convert("RGB")
        return image.convert("RGB")
    except _DECODE_ERRORS as exc:
        raise InvalidDocument(f"{prefix}image mode {mode} is not supported") from exc


def _stretch_to_8bit(image: Image.Image) -> Image.Image:
    """Map 16-bit and float scans onto 0-255; a plain conversion clips them to near-white."""
    wide = image if image.mode == "F" else image.convert("I")
    low, high = cast(tuple[float, float], wide.getextrema())
    scale = 255.0 / (high - low) if high > low else 1.0
    return wide.point(lambda value: value * scale - low * scale).convert("L")


def _load_pdf(
    data: bytes, *, pages: str | None, max_pages: int, max_pixels: int, dpi: int
) -> Iterator[PageImage]:
    with _PDFIUM_LOCK:
        pdf = _open_pdf(data)
        try:
            count = len(pdf)
            if count == 0:
                raise InvalidDocument("PDF has no pages")
            numbers = _select(pages, count, max_pages, "PDF")
            pdf.init_forms()  # so filled-in form fields are rendered, and so read
            for number in numbers:
                yield PageImage.of(number, _render(pdf, number, dpi, max_pixels))
        finally:
            pdf.close()


def _open_pdf(data: bytes) -> Any:
    """Open through the raw API: pypdfium2's own loader refuses page-less documents and then
    reports PDFium's last error, which is stale from an earlier failure (even another file's)."""
    handle = pdfium_raw.FPDF_LoadMemDocument64(data, len(data), None)  # `data` outlives the doc
    if not handle:
        code = pdfium_raw.FPDF_GetLastError()
        if code in (pdfium_raw.FPDF_ERR_PASSWORD, pdfium_raw.FPDF_ERR_SECURITY):
            raise InvalidDocument("PDF is encrypted; upload it without a password")
        reason = _PDFIUM_ERRORS.get(code, f"PDFium error {code}")
        raise InvalidDocument(f"PDF is damaged or unreadable ({reason})")
    return pdfium.PdfDocument(handle)


def _render(pdf: Any, number: int, dpi: int, max_pixels: int) -> Image.Image:
    page = None
    try:
        page = pdf[number - 1]
        width_pt, height_pt = page.get_size()
        if width_pt <= 0 or height_pt <= 0:
            raise InvalidDocument(f"PDF page {number} has no area")
        scale = dpi / 72
        if width_pt * height_pt * scale * scale > max_pixels:
            scale = math.sqrt(max_pixels / (width_pt * height_pt)) * 0.999  # margin for rounding up
        bitmap = page.render(scale=scale)
        try:
            rendered: Image.Image = bitmap.to_pil()
            # to_pil() may share the bitmap's buffer, which close() frees: copy out first.
            return rendered.convert("RGB") if rendered.mode != "RGB" else rendered.copy()
        finally:
            bitmap.close()
    except pdfium.PdfiumError as exc:
        raise InvalidDocument(f"PDF page {number} cannot be rendered ({exc})") from exc
    finally:
        if page is not None:
            page.close()
