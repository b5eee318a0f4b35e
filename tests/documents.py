"""Documents made in tests: images with known words, PDFs, and files that are wrong on purpose.

Generated, never checked in: each test says exactly what its input is.
"""

from __future__ import annotations

import io
import struct
import zlib

from PIL import Image, ImageDraw, ImageFont


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def page(width: int = 120, height: int = 80, colour: str = "white") -> Image.Image:
    image = Image.new("RGB", (width, height), colour)
    ImageDraw.Draw(image).rectangle((10, 10, 30, 30), fill="black")
    return image


def hand_pdf(objects: list[bytes], trailer_extra: bytes = b"") -> bytes:
    """A PDF written byte by byte, for shapes no library writes (encrypted, pageless)."""
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R %s>>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1,
        trailer_extra,
        xref,
    )
    return bytes(out)


CATALOG = b"<< /Type /Catalog /Pages 2 0 R >>"
ONE_PAGE = [
    CATALOG,
    b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
    b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 200 100] >>",
]
# Standard security handler whose /U does not match the empty password: a reader must ask for one.
ENCRYPTED = hand_pdf(
    [*ONE_PAGE, b"<< /Filter /Standard /V 1 /R 2 /O <" + b"11" * 32 + b"> /U <" + b"22" * 32 + b"> /P -4 >>"],
    b"/Encrypt 4 0 R /ID [<" + b"33" * 16 + b"> <" + b"33" * 16 + b">] ",
)


def png_claiming(width: int, height: int) -> bytes:
    """A valid PNG header that claims a huge image, with no pixel data at all."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (
        b"\x89PNG\r\n\x1a\n"
        + struct.pack(">I", len(ihdr))
        + chunk
        + struct.pack(">I", zlib.crc32(chunk))
        + b"\x00\x00\x00\x00IEND\xaeB`\x82"
    )


def text_image(lines: list[str], size: tuple[int, int] = (1000, 400)) -> Image.Image:
    """Black words on white in Pillow's bundled TrueType font (no system fonts needed)."""
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=48)
    for row, text in enumerate(lines):
        draw.text((40, 40 + row * 90), text, fill="black", font=font)
    return image


def text_pdf(pages: list[list[str]]) -> bytes:
    images = [text_image(lines, (1000, 400)) for lines in pages]
    return encode(images[0], "PDF", save_all=True, append_images=images[1:], resolution=144.0)
