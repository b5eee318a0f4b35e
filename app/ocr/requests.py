"""What the gateway sends an OCR engine for one page, and what it makes of the answer (pure).

One request shape for both OCR kinds: DeepSeek-OCR on vLLM needs its n-gram logits processor
arguments and `skip_special_tokens: false` (the grounding tags are special tokens), and our
cpu_ocr engine accepts and ignores them, so the runner never branches on the engine kind.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, Literal

from app.ocr.grounding import Box, parse_grounding

Output = Literal["text", "markdown"]
PROMPTS: Final[dict[str, str]] = {
    "text": "Free OCR.",
    "markdown": "<|grounding|>Convert the document to markdown.",
}
# docs/ARCHITECTURE.md, "vLLM and DeepSeek-OCR": stops the runaway repetition DeepSeek-OCR is prone
# to; the whitelisted ids are the table-cell tokens <td> and </td>, which legitimately repeat.
VLLM_XARGS: Final[dict[str, Any]] = {
    "ngram_size": 30,
    "window_size": 90,
    "whitelist_token_ids": [128821, 128822],
}
DEFAULT_MAX_TOKENS: Final = 8192


def output_for_prompt(prompt: str | None) -> Output:
    """Older clients say what they want in the prompt text, not in a field."""
    if prompt and ("<|grounding|>" in prompt or "markdown" in prompt.lower()):
        return "markdown"
    return "text"


def page_request(served_name: str, data_url: str, output: Output, max_tokens: int) -> dict[str, Any]:
    return {
        "model": served_name,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": data_url}},
                    {"type": "text", "text": PROMPTS[output]},
                ],
            }
        ],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "skip_special_tokens": False,
        "vllm_xargs": VLLM_XARGS,
    }


@dataclass(frozen=True)
class PageResult:
    page: int
    text: str
    width: int
    height: int
    boxes: list[Box]
    truncated: bool
    finish_reason: str | None
    usage: dict[str, int]

    def view(self) -> dict[str, Any]:
        view: dict[str, Any] = {
            "page": self.page,
            "text": self.text,
            "width": self.width,
            "height": self.height,
            "truncated": self.truncated,
            "finish_reason": self.finish_reason,
        }
        if self.boxes:
            view["boxes"] = [
                {"label": b.label, "text": b.text, "x1": b.x1, "y1": b.y1, "x2": b.x2, "y2": b.y2}
                for b in self.boxes
            ]
        return view


def read_answer(answer: dict[str, Any], page: int, width: int, height: int) -> PageResult:
    """Tags become boxes (in the page's pixels); an answer cut by max_tokens is flagged.

    `finish_reason: length` from DeepSeek-OCR usually means it fell into repeating itself
    until the token limit: the text is kept but marked truncated, never passed off as clean.
    """
    choice = (answer.get("choices") or [{}])[0]
    content = str((choice.get("message") or {}).get("content") or "")
    text, boxes = parse_grounding(content, width, height)
    finish = choice.get("finish_reason")
    usage = {k: int(v) for k, v in (answer.get("usage") or {}).items() if isinstance(v, int)}
    return PageResult(page, text, width, height, boxes, finish == "length", finish, usage)
