"""Grounding tags: parsing DeepSeek-OCR's output, and the CPU engine writing the same format.

The parser must never raise on model output, however it was cut off, so part of this file
feeds it every prefix of a real answer and random junk.
"""

from __future__ import annotations

import random

import pytest

from app.engines.cpu_ocr import OcrRequest, render_answer
from app.ocr.grounding import Box, parse_grounding
from app.ocr.layout import Segment, grounding_text, group_lines, plain_text

EOS = "<\uff5cend\u2581of\u2581sentence\uff5c>"
DEEPSEEK_ANSWER = (
    "<|ref|>title<|/ref|><|det|>[[100, 50, 899, 99]]<|/det|>\n# Quarterly Report\n\n"
    "<|ref|>text<|/ref|><|det|>[[100, 120, 899, 300]]<|/det|>\nRevenue grew by 12 percent.\n"
    "Costs stayed flat.\n\n"
    "<|ref|>image<|/ref|><|det|>[[0, 400, 999, 999]]<|/det|>\n\n\n"
    "<|ref|>table<|/ref|><|det|>[[10, 20, 30, 40], [50, 60, 70, 80]]<|/det|>\n"
    "<table><tr><td>a</td></tr></table>" + EOS
)


def test_parses_deepseek_blocks_into_page_pixels() -> None:
    text, boxes = parse_grounding(DEEPSEEK_ANSWER, 1998, 999)
    assert text == (
        "# Quarterly Report\n\nRevenue grew by 12 percent.\nCosts stayed flat.\n\n"
        "<table><tr><td>a</td></tr></table>"
    )
    assert boxes[0] == Box("title", "# Quarterly Report", 200, 50, 1798, 99)
    assert boxes[1].text == "Revenue grew by 12 percent.\nCosts stayed flat."
    assert boxes[2] == Box("image", None, 0, 400, 1998, 999)
    # Several boxes in one det tag: one Box each, sharing the block's text.
    assert [(b.label, b.x1, b.y1) for b in boxes[3:]] == [("table", 20, 20), ("table", 100, 60)]
    assert {b.text for b in boxes[3:]} == {"<table><tr><td>a</td></tr></table>"}


def test_plain_text_passes_through() -> None:
    assert parse_grounding("Free OCR output\nsecond line" + EOS, 100, 100) == (
        "Free OCR output\nsecond line",
        [],
    )
    assert parse_grounding("", 100, 100) == ("", [])


def test_coordinates_are_clamped_and_ordered() -> None:
    _, boxes = parse_grounding("<|ref|>text<|/ref|><|det|>[[1200, -5, 500.5, 999]]<|/det|>\nx", 1000, 500)
    assert boxes == [Box("text", "x", 501, 0, 1000, 500)]


@pytest.mark.parametrize(
    ("answer", "text", "boxes"),
    [
        ("Intro\n<|ref|>text<|/ref|><|det|>[[1, 2, 3]]<|/det|>\nkept", "Intro\nkept", 0),
        ("<|ref|>text<|/ref|>\nno det tag", "no det tag", 0),
        ("<|det|>[[0, 0, 999, 999]]<|/det|>\nlone det", "lone det", 1),
        ("stray <|/ref|>closer and <|/det|>another", "stray closer and another", 0),
        (
            "<|ref|>broken\nreal words <|ref|>text<|/ref|><|det|>[[0,0,9,9]]<|/det|>\nend",
            "broken\nreal words end",
            1,
        ),
    ],
)
def test_malformed_tags_keep_the_words(answer: str, text: str, boxes: int) -> None:
    got_text, got_boxes = parse_grounding(answer, 100, 100)
    assert (got_text, len(got_boxes)) == (text, boxes)


@pytest.mark.parametrize(
    "tail",
    ["<|ref|>te", "<|ref|>text<|/ref|><|det|>[[1, 2", "<|ref|>text<|/r", "<|re", "<|", "<|/de"],
)
def test_output_cut_off_inside_a_tag_drops_only_the_tag(tail: str) -> None:
    answer = "<|ref|>text<|/ref|><|det|>[[0, 0, 999, 999]]<|/det|>\nfirst block\n\n" + tail
    text, boxes = parse_grounding(answer, 1000, 1000)
    assert text == "first block"
    assert boxes == [Box("text", "first block", 0, 0, 1000, 1000)]


def test_a_lone_less_than_sign_at_the_end_is_text() -> None:
    assert parse_grounding("a <", 10, 10)[0] == "a <"


def test_never_raises_on_any_prefix_or_junk() -> None:
    for end in range(len(DEEPSEEK_ANSWER) + 1):
        text, boxes = parse_grounding(DEEPSEEK_ANSWER[:end], 640, 480)
        assert "<|ref|>" not in text and "<|det|>" not in text
        assert all(0 <= b.x1 <= b.x2 <= 640 and 0 <= b.y1 <= b.y2 <= 480 for b in boxes)
    rng = random.Random(7)
    alphabet = [
        "<|ref|>",
        "<|/ref|>",
        "<|det|>",
        "<|/det|>",
        "[[",
        "]]",
        ",",
        "1",
        "99",
        "\n",
        "x",
        "<|",
        "[",
    ]
    for _ in range(500):
        junk = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        parse_grounding(junk, rng.randint(0, 50), rng.randint(0, 50))


# -- reading order and the CPU engine's own grounding output ----------------------------------


def seg(text: str, x1: float, y1: float, x2: float, y2: float) -> Segment:
    return Segment(text, x1, y1, x2, y2)


def test_segments_group_into_lines_in_reading_order() -> None:
    segments = [
        seg("world", 300, 12, 400, 48),  # same line as "Hello", a little lower
        seg("third", 10, 210, 120, 250),
        seg("Hello", 10, 10, 120, 45),
        seg("second", 10, 110, 150, 150),
        seg("  ", 500, 500, 510, 510),  # blank: dropped
        seg("line", 200, 108, 260, 148),
    ]
    lines = group_lines(segments)
    assert plain_text(lines) == "Hello world\nsecond line\nthird"
    assert lines[0].box == (10, 10, 400, 48)


def test_slightly_overlapping_lines_stay_apart() -> None:
    lines = group_lines([seg("upper", 0, 0, 100, 40), seg("lower", 0, 32, 100, 72)])  # 8 px shared
    assert plain_text(lines) == "upper\nlower"


def test_segment_from_a_rotated_quad_takes_the_enclosing_box() -> None:
    assert Segment.from_quad([[10, 5], [50, 8], [49, 30], [9, 27]], "t") == seg("t", 9, 5, 50, 30)


def test_cpu_engine_grounding_round_trips_through_the_parser() -> None:
    lines = group_lines([seg("Invoice 4711", 60, 70, 515, 111), seg("Total due", 61, 218, 439, 263)])
    answer = grounding_text(lines, 1280, 900)
    assert answer.startswith("<|ref|>text<|/ref|><|det|>[[47, 78, 402, 123]]<|/det|>\nInvoice 4711\n\n")
    text, boxes = parse_grounding(answer, 1280, 900)
    assert text == "Invoice 4711\n\nTotal due"
    assert [b.text for b in boxes] == ["Invoice 4711", "Total due"]
    for box, line in zip(boxes, lines, strict=True):
        for got, want in zip((box.x1, box.y1, box.x2, box.y2), line.box, strict=True):
            assert abs(got - want) <= 2  # 0-999 quantisation


def request(prompt: str, max_tokens: int | None = None) -> OcrRequest:
    return OcrRequest(image_url="", prompt=prompt, max_tokens=max_tokens, stream=False, include_usage=False)


def test_engine_answer_modes_and_max_tokens() -> None:
    segments = [seg("one two", 0, 0, 50, 10), seg("three four", 0, 20, 50, 30), seg("five", 0, 40, 50, 50)]
    assert render_answer(request("Free OCR."), segments, 100, 100) == ("one two\nthree four\nfive", "stop")
    # Cut at whole lines only: the second line would pass 3 words.
    assert render_answer(request("Free OCR.", 3), segments, 100, 100) == ("one two", "length")
    assert render_answer(request("Free OCR.", 5), segments, 100, 100) == ("one two\nthree four\nfive", "stop")
    grounded, finish = render_answer(
        request("<|grounding|>Convert the document to markdown."), segments, 100, 100
    )
    assert finish == "stop"
    assert grounded.count("<|ref|>text<|/ref|>") == 3
    assert parse_grounding(grounded, 100, 100)[0] == "one two\n\nthree four\n\nfive"
    assert render_answer(request("Free OCR."), [], 100, 100) == ("", "stop")
