"""Uploads to page images: type sniffing, every kind of bad file, page selection, resolution modes.

Every fixture is made here with Pillow or by hand, so the tests need no files and no network.
"""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image, ImageDraw

from app.errors import DocumentTooLarge, InvalidDocument, InvalidRequest
from app.ocr.documents import (
    RESOLUTIONS,
    detect_format,
    encode_data_url,
    iter_pages,
    load_pages,
    parse_page_spec,
    parse_resolution,
    resize_for_mode,
)
from tests.documents import CATALOG, ENCRYPTED, ONE_PAGE, encode, hand_pdf, page, png_claiming

# -- format ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "expected"),
    [("JPEG", "jpeg"), ("PNG", "png"), ("WEBP", "webp"), ("BMP", "bmp"), ("TIFF", "tiff"), ("PDF", "pdf")],
)
def test_detect_format_by_content(fmt: str, expected: str) -> None:
    assert detect_format(encode(page(), fmt)) == expected


def test_detect_format_ignores_what_the_name_would_say() -> None:
    with pytest.raises(InvalidRequest, match=r"not a supported image or PDF \(got text\)") as caught:
        detect_format(b"this is a text file someone named scan.png\n")
    assert caught.value.param == "file"
    assert "JPEG, PNG, WebP, BMP, TIFF, PDF" in caught.value.message
    # "BM" alone does not make a bitmap.
    with pytest.raises(InvalidRequest, match="got text"):
        detect_format(b"BMW service report, page one")


@pytest.mark.parametrize(
    ("data", "described"),
    [
        (encode(page(), "GIF"), "a GIF image"),
        (b"PK\x03\x04" + b"\x00" * 40, "ZIP archive"),
        (b"\x00\x01\x02\xff" * 10, "unknown binary content"),
    ],
)
def test_detect_format_names_common_wrong_uploads(data: bytes, described: str) -> None:
    with pytest.raises(InvalidRequest, match=described):
        detect_format(data)


def test_empty_file() -> None:
    with pytest.raises(InvalidDocument, match="file is empty") as caught:
        load_pages(b"", pages=None, max_pages=5, max_pixels=10**6)
    assert caught.value.code == "invalid_document"
    assert caught.value.param == "file"


# -- images ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "TIFF"])
def test_each_image_format_loads_as_one_rgb_page(fmt: str) -> None:
    (only,) = load_pages(encode(page(120, 80), fmt), pages=None, max_pages=5, max_pixels=10_000)
    assert (only.number, only.width, only.height, only.image.mode) == (1, 120, 80, "RGB")
    assert only.image.getpixel((20, 20)) == pytest.approx((0, 0, 0), abs=40)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_image_is_refused(fmt: str) -> None:
    noisy = Image.effect_noise((400, 400), 80).convert("RGB")
    data = encode(noisy, fmt)
    with pytest.raises(InvalidDocument, match="image is truncated or corrupt"):
        load_pages(data[: len(data) // 2], pages=None, max_pages=5, max_pixels=10_000_000)


def test_corrupt_image_with_valid_magic_is_refused() -> None:
    with pytest.raises(InvalidDocument, match="truncated or corrupt"):
        load_pages(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10, pages=None, max_pages=5, max_pixels=10_000)


def test_decompression_bomb_header_is_refused_before_decoding() -> None:
    with pytest.raises(DocumentTooLarge, match="limit is 40,000,000 pixels") as caught:
        load_pages(png_claiming(100_000, 100_000), pages=None, max_pages=5, max_pixels=40_000_000)
    assert caught.value.code == "document_too_large"


def test_image_over_the_pixel_limit_names_its_size() -> None:
    data = png_claiming(3000, 2000)  # under Pillow's own bomb limit, over ours
    with pytest.raises(DocumentTooLarge, match=r"3000x2000 = 6,000,000 pixels; the limit is 1,000,000"):
        load_pages(data, pages=None, max_pages=5, max_pixels=1_000_000)
    real = encode(Image.new("L", (1100, 1000), 255), "PNG")  # a genuine, tiny-on-disk image
    with pytest.raises(DocumentTooLarge, match="1100x1000"):
        load_pages(real, pages=None, max_pages=5, max_pixels=1_000_000)


def test_multi_frame_tiff_gives_one_page_per_frame() -> None:
    frames = [page(100 + 10 * i, 50) for i in range(3)]
    data = encode(frames[0], "TIFF", save_all=True, append_images=frames[1:])
    loaded = load_pages(data, pages=None, max_pages=5, max_pixels=1_000_000)
    assert [(p.number, p.width) for p in loaded] == [(1, 100), (2, 110), (3, 120)]
    assert [p.number for p in load_pages(data, pages="2-", max_pages=5, max_pixels=10**6)] == [2, 3]
    with pytest.raises(DocumentTooLarge, match="TIFF has 3 pages; the limit is 2"):
        load_pages(data, pages=None, max_pages=2, max_pixels=1_000_000)
    with pytest.raises(InvalidRequest, match="page 4 is out of range; the document has 3 pages"):
        load_pages(data, pages="4", max_pages=5, max_pixels=1_000_000)


def test_tiff_frame_over_the_pixel_limit_is_named() -> None:
    frames = [page(100, 100), page(400, 400)]
    data = encode(frames[0], "TIFF", save_all=True, append_images=frames[1:])
    with pytest.raises(DocumentTooLarge, match=r"page 2: image is 400x400"):
        load_pages(data, pages=None, max_pages=5, max_pixels=50_000)


def test_pages_are_decoded_one_at_a_time() -> None:
    """A caller that shrinks each page before asking for the next holds one full-size page, not
    all of them (20 blank 50-megapixel TIFF frames once took ~4 GB): page 1 is handed over
    before page 2 is even looked at."""
    frames = [page(100, 100), page(400, 400)]
    data = encode(frames[0], "TIFF", save_all=True, append_images=frames[1:])
    pages = iter_pages(data, pages=None, max_pages=5, max_pixels=50_000)
    assert next(pages).number == 1
    with pytest.raises(DocumentTooLarge, match=r"page 2: image is 400x400"):
        next(pages)


def test_transparent_background_becomes_white_not_black() -> None:
    image = Image.new("RGBA", (60, 40), (0, 0, 0, 0))
    ImageDraw.Draw(image).rectangle((5, 5, 15, 15), fill=(0, 0, 0, 255))
    (only,) = load_pages(encode(image, "PNG"), pages=None, max_pages=1, max_pixels=10_000)
    assert only.image.getpixel((50, 30)) == (255, 255, 255)
    assert only.image.getpixel((10, 10)) == (0, 0, 0)


def test_sixteen_bit_scan_is_stretched_not_clipped_to_white() -> None:
    image = Image.new("I;16", (60, 40), 60000)
    ImageDraw.Draw(image).rectangle((5, 5, 15, 15), fill=1000)
    (only,) = load_pages(encode(image, "PNG"), pages=None, max_pages=1, max_pixels=10_000)
    assert only.image.getpixel((50, 30)) == (255, 255, 255)
    assert only.image.getpixel((10, 10)) == (0, 0, 0)


def test_cmyk_jpeg_and_exif_rotation() -> None:
    (cmyk,) = load_pages(encode(page().convert("CMYK"), "JPEG"), pages=None, max_pages=1, max_pixels=10**6)
    assert cmyk.image.mode == "RGB"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to view
    (upright,) = load_pages(
        encode(page(120, 80), "JPEG", exif=exif.tobytes()), pages=None, max_pages=1, max_pixels=10**6
    )
    assert (upright.width, upright.height) == (80, 120)


# -- PDF ---------------------------------------------------------------------------------------


def three_page_pdf() -> bytes:
    pages = [page(100, 200), page(300, 100), page(50, 50)]  # Pillow: 1 pixel = 1 point at 72 DPI
    return encode(pages[0], "PDF", save_all=True, append_images=pages[1:], resolution=72.0)


def test_pdf_pages_render_at_the_requested_dpi() -> None:
    loaded = load_pages(three_page_pdf(), pages=None, max_pages=5, max_pixels=10**6, dpi=144)
    assert [(p.number, p.width, p.height) for p in loaded] == [(1, 200, 400), (2, 600, 200), (3, 100, 100)]
    first = loaded[0].image
    assert first.mode == "RGB"
    assert first.getpixel((40, 40)) == pytest.approx((0, 0, 0), abs=40)  # the square, 2x scaled
    assert first.getpixel((150, 300)) == (255, 255, 255)


def test_pdf_page_selection_and_page_limit() -> None:
    data = three_page_pdf()
    assert [p.number for p in load_pages(data, pages="3,1", max_pages=5, max_pixels=10**6)] == [1, 3]
    with pytest.raises(DocumentTooLarge, match="PDF has 3 pages; the limit is 2"):
        load_pages(data, pages=None, max_pages=2, max_pixels=10**6)
    with pytest.raises(DocumentTooLarge, match="2 pages selected from a PDF of 3 pages; the limit is 1"):
        load_pages(data, pages="2-3", max_pages=1, max_pixels=10**6)
    assert len(load_pages(data, pages="2", max_pages=1, max_pixels=10**6)) == 1


def test_large_format_pdf_page_is_rendered_smaller_not_refused() -> None:
    poster = hand_pdf(
        [
            CATALOG,
            b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 5000 5000] >>",
        ]
    )
    (only,) = load_pages(poster, pages=None, max_pages=1, max_pixels=1_000_000, dpi=144)
    assert only.width * only.height <= 1_000_000
    assert only.width == only.height > 900


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (ENCRYPTED, "PDF is encrypted"),
        (hand_pdf([CATALOG, b"<< /Type /Pages /Kids [] /Count 0 >>"]), "PDF has no pages"),
        (b"%PDF-1.7\nthis is not really a PDF\n", "PDF is damaged or unreadable"),
        (hand_pdf(ONE_PAGE)[:60], "PDF is damaged or unreadable"),
        (
            hand_pdf([CATALOG, b"<< /Type /Pages /Kids [] /Count 1 >>"]),
            "PDF page 1 cannot be rendered",
        ),
    ],
    ids=["encrypted", "no-pages", "garbage", "truncated", "missing-page"],
)
def test_bad_pdfs_are_refused_clearly(data: bytes, message: str) -> None:
    with pytest.raises(InvalidDocument, match=message) as caught:
        load_pages(data, pages=None, max_pages=5, max_pixels=10**6)
    assert caught.value.param == "file"


def test_hand_written_pdf_without_problems_loads() -> None:
    (only,) = load_pages(hand_pdf(ONE_PAGE), pages=None, max_pages=1, max_pixels=10**6, dpi=72)
    assert (only.width, only.height) == (200, 100)


# -- page specs ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [("1-3,5", [1, 2, 3, 5]), (" 5 , 1-2 ,2", [1, 2, 5]), ("4-", [4, 5, 6]), ("6", [6]), ("2 - 3", [2, 3])],
)
def test_parse_page_spec(spec: str, expected: list[int]) -> None:
    assert parse_page_spec(spec, 6) == expected


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "pages is empty"),
        ("1,,2", "'' is not a page number or range"),
        ("a-b", "'a-b' is not a page number or range"),
        ("1-2-3", "'1-2-3' is not a page number"),
        ("-3", "'-3' is not a page number"),
        ("0", "page numbers start at 1"),
        ("5-2", "'5-2' runs backwards"),
        ("7", "page 7 is out of range; the document has 6 pages"),
        ("2-9", "page 9 is out of range"),
        ("9" * 50, "is not a page number"),
    ],
)
def test_parse_page_spec_errors_name_the_problem(spec: str, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message) as caught:
        parse_page_spec(spec, 6)
    assert caught.value.param == "pages"


def test_parse_page_spec_singular_page_count() -> None:
    with pytest.raises(InvalidRequest, match=r"the document has 1 page$"):
        parse_page_spec("2", 1)


# -- resolution ----------------------------------------------------------------------------------


def test_parse_resolution() -> None:
    assert parse_resolution(" Gundam ") == "gundam"
    assert set(RESOLUTIONS) == {"tiny", "small", "base", "large", "gundam"}
    with pytest.raises(
        InvalidRequest, match="unknown resolution 'huge'; valid: tiny, small, base, large, gundam"
    ) as c:
        parse_resolution("huge")
    assert c.value.param == "X-Resolution"


def test_resize_for_mode_bounds_the_longer_side_and_never_upscales() -> None:
    tall = Image.new("RGB", (1000, 2000), "white")
    assert resize_for_mode(tall, "small").size == (320, 640)
    assert resize_for_mode(tall, "large").size == (640, 1280)
    assert resize_for_mode(tall, "gundam").size == (960, 1920)
    small = Image.new("RGB", (300, 200), "white")
    assert resize_for_mode(small, "base") is small
    with pytest.raises(InvalidRequest):
        resize_for_mode(small, "huge")


def test_encode_data_url_round_trips_losslessly() -> None:
    image = page()
    url = encode_data_url(image)
    assert url.startswith("data:image/png;base64,")
    decoded = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert decoded.tobytes() == image.tobytes()


def test_pageless_pdf_after_an_encrypted_one_is_not_called_encrypted() -> None:
    """PDFium keeps its last error across documents; a stale one must not leak into the next."""
    with pytest.raises(InvalidDocument, match="encrypted"):
        load_pages(ENCRYPTED, pages=None, max_pages=5, max_pixels=10**6)
    with pytest.raises(InvalidDocument, match="PDF has no pages"):
        load_pages(
            hand_pdf([CATALOG, b"<< /Type /Pages /Kids [] /Count 0 >>"]),
            pages=None,
            max_pages=5,
            max_pixels=10**6,
        )
