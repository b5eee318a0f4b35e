"""Read DeepSeek-OCR grounding tags into page-pixel boxes and clean text.

In markdown mode DeepSeek-OCR writes each block as
`<|ref|>label<|/ref|><|det|>[[x1, y1, x2, y2], ...]<|/det|>` followed by the block's text, with
coordinates normalised to 0-999 of the image it saw. The cpu_ocr engine writes the same, so one
parser serves both engines. Model output is cut off by max_tokens or comes out malformed, and a
parse failure must never cost the client its text, so nothing here raises: what cannot be read
as a box is dropped and the words are kept.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

NORMALISED_MAX: Final = 999
"""DeepSeek-OCR's coordinate scale: 0 is the left/top edge, 999 the right/bottom edge."""

# With skip_special_tokens off (needed to keep the tags) the end-of-sentence token shows up too.
_SPECIAL: Final = ("<\uff5cend\u2581of\u2581sentence\uff5c>", "<|end_of_sentence|>")  # fullwidth bars
_MARKERS: Final = ("<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>")
_NOT_A_TAG = r"(?:(?!<\|).)*"  # tag contents never contain another tag's opening
_BLOCK = re.compile(
    rf"<\|ref\|>(?P<label>{_NOT_A_TAG})<\|/ref\|>[ \t]*(?:<\|det\|>(?P<det>{_NOT_A_TAG})<\|/det\|>)?"
    rf"|<\|det\|>(?P<lone>{_NOT_A_TAG})<\|/det\|>",
    re.DOTALL,
)
_NUMBER = r"\s*(-?\d+(?:\.\d+)?)\s*"
_COORDS = re.compile(rf"\[{_NUMBER},{_NUMBER},{_NUMBER},{_NUMBER}\]")
_STRAY = re.compile(r"<\|/?(?:ref|det)\|>")
_BLANK_RUNS = re.compile(r"\n{3,}")


@dataclass(frozen=True)
class Box:
    """One region the model located, in pixels of the page it was given.

    `label` is DeepSeek-OCR's block kind (text, title, table, image, ...); `text` is what the
    model wrote for the block, None for blocks without words such as images.
    """

    label: str
    text: str | None
    x1: int
    y1: int
    x2: int
    y2: int


def parse_grounding(text: str, width: int, height: int) -> tuple[str, list[Box]]:
    """The text with every tag removed, and the boxes scaled to a `width` x `height` page."""
    for token in _SPECIAL:
        text = text.replace(token, "")
    boxes: list[Box] = []
    pieces: list[str] = []
    label: str | None = None
    coords: list[tuple[float, float, float, float]] = []
    position = 0
    for match in _BLOCK.finditer(text):
        _close_block(text[position : match.start()], label, coords, width, height, boxes, pieces)
        if match["lone"] is not None:
            label, coords = "", _coords(match["lone"])
        else:
            label, coords = match["label"].strip(), _coords(match["det"] or "")
        position = match.end()
    _close_block(_cut_truncated(text[position:]), label, coords, width, height, boxes, pieces)
    clean = _BLANK_RUNS.sub("\n\n", "".join(pieces)).strip()
    return clean, boxes


def _close_block(
    content: str,
    label: str | None,
    coords: list[tuple[float, float, float, float]],
    width: int,
    height: int,
    boxes: list[Box],
    pieces: list[str],
) -> None:
    """Record the words that followed a tag, and the tag's boxes carrying those words."""
    content = _STRAY.sub("", content)
    if label is not None and content.startswith("\n"):
        content = content[1:]  # the newline that ends the tag line belongs to the tag
    pieces.append(content)
    if label is None:
        return
    words = content.strip() or None
    for x1, y1, x2, y2 in coords:
        left, right = sorted((_scale(x1, width), _scale(x2, width)))
        top, bottom = sorted((_scale(y1, height), _scale(y2, height)))
        boxes.append(Box(label, words, left, top, right, bottom))


def _coords(det: str) -> list[tuple[float, float, float, float]]:
    return [(float(a), float(b), float(c), float(d)) for a, b, c, d in _COORDS.findall(det)]


def _scale(value: float, size: int) -> int:
    clamped = min(max(value, 0.0), float(NORMALISED_MAX))
    return round(clamped / NORMALISED_MAX * max(size, 0))


def _cut_truncated(tail: str) -> str:
    """Drop a tag that output was cut off inside; its label and numbers are not text."""
    openings = [i for i in (tail.rfind("<|ref|>"), tail.rfind("<|det|>")) if i >= 0]
    if openings:
        tail = tail[: min(openings)]
    for marker in _MARKERS:
        for length in range(len(marker) - 1, 1, -1):  # at least "<|", so a lone "<" stays
            if tail.endswith(marker[:length]):
                return tail[:-length]
    return tail
