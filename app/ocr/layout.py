"""Reading order for text boxes from a detector, and the two ways the CPU engine writes them.

RapidOCR returns text boxes in detection order, which is not reading order, and splits a line
wherever the gap between words is wide. Clients expect lines top to bottom and words left to
right, so boxes are grouped into lines by vertical overlap first. Side-by-side columns end up on
shared lines; telling columns apart is layout analysis, which this engine does not attempt.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from app.ocr.grounding import NORMALISED_MAX

SAME_LINE_OVERLAP = 0.5
"""Share of the shorter box's height two boxes must overlap vertically to be one line."""


@dataclass(frozen=True)
class Segment:
    """One recognised run of text and its axis-aligned box in image pixels."""

    text: str
    x1: float
    y1: float
    x2: float
    y2: float

    @classmethod
    def from_quad(cls, points: Iterable[Sequence[float]], text: str) -> Segment:
        """Detectors give four corners (rotated text); lines only need the enclosing box."""
        xs, ys = zip(*((float(p[0]), float(p[1])) for p in points), strict=True)
        return cls(text, min(xs), min(ys), max(xs), max(ys))


@dataclass(frozen=True)
class Line:
    """Segments read as one line, left to right."""

    segments: tuple[Segment, ...]

    @property
    def text(self) -> str:
        return " ".join(s.text for s in self.segments)

    @property
    def box(self) -> tuple[float, float, float, float]:
        return (
            min(s.x1 for s in self.segments),
            min(s.y1 for s in self.segments),
            max(s.x2 for s in self.segments),
            max(s.y2 for s in self.segments),
        )


def group_lines(segments: Iterable[Segment]) -> list[Line]:
    """Lines top to bottom, each read left to right; blank segments are dropped."""
    rows: list[list[Segment]] = []
    for segment in sorted((s for s in segments if s.text.strip()), key=lambda s: (s.y1 + s.y2, s.x1)):
        best, best_overlap = None, 0.0
        for row in rows:
            overlap = _overlap(segment, row)
            if overlap > best_overlap:
                best, best_overlap = row, overlap
        if best is not None and best_overlap >= SAME_LINE_OVERLAP:
            best.append(segment)
        else:
            rows.append([segment])
    lines = [Line(tuple(sorted(row, key=lambda s: s.x1))) for row in rows]
    return sorted(lines, key=lambda line: (line.box[1] + line.box[3], line.box[0]))


def _overlap(segment: Segment, row: list[Segment]) -> float:
    """Vertical overlap with the row's band, as a share of the shorter height."""
    top = sum(s.y1 for s in row) / len(row)  # the mean band follows the row without drifting
    bottom = sum(s.y2 for s in row) / len(row)
    shared = min(bottom, segment.y2) - max(top, segment.y1)
    shorter = min(bottom - top, segment.y2 - segment.y1)
    return shared / shorter if shorter > 0 else 0.0


def plain_text(lines: Sequence[Line]) -> str:
    return "\n".join(line.text for line in lines)


def grounding_block(line: Line, width: int, height: int) -> str:
    """One line in DeepSeek-OCR's markdown-mode form, coordinates on its 0-999 scale."""
    x1, y1, x2, y2 = line.box
    coords = ", ".join(
        str(_normalise(value, size)) for value, size in ((x1, width), (y1, height), (x2, width), (y2, height))
    )
    return f"<|ref|>text<|/ref|><|det|>[[{coords}]]<|/det|>\n{line.text}"


def grounding_text(lines: Sequence[Line], width: int, height: int) -> str:
    """Blocks separated by a blank line, as DeepSeek-OCR separates its blocks."""
    return "\n\n".join(grounding_block(line, width, height) for line in lines)


def _normalise(value: float, size: int) -> int:
    if size <= 0:
        return 0
    return min(NORMALISED_MAX, max(0, round(value / size * NORMALISED_MAX)))
