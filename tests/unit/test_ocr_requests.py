"""The request the gateway sends an OCR engine per page, and how it reads the answer (pure).

docs/ARCHITECTURE.md fixes DeepSeek-OCR's per-request fields; vLLM ignores none of them, so a typo here
would silently bring back the runaway repetition or strip the grounding tags. Both OCR kinds
(deepseek_ocr on vLLM, cpu_ocr) get this one request: the builder takes no engine kind.
"""

from __future__ import annotations

import base64
import io
from typing import Any

import pytest
from PIL import Image

from app.ocr.documents import encode_data_url
from app.ocr.grounding import Box
from app.ocr.requests import output_for_prompt, page_request, read_answer
from tests.documents import page

GROUNDED = "<|ref|>title<|/ref|><|det|>[[0, 0, 499, 99]]<|/det|>\n# Report\n\n"


def _parts(request: dict[str, Any]) -> tuple[str, str]:
    (message,) = request["messages"]
    assert message["role"] == "user"
    image, text = message["content"]
    assert (image["type"], text["type"]) == ("image_url", "text")
    return image["image_url"]["url"], text["text"]


@pytest.mark.parametrize(
    ("output", "prompt"),
    [("text", "Free OCR."), ("markdown", "<|grounding|>Convert the document to markdown.")],
)
def test_page_request_carries_the_deepseek_ocr_fields(output: Any, prompt: str) -> None:
    image = page()
    request = page_request("deepseek-ai/DeepSeek-OCR", encode_data_url(image), output, 1234)
    assert request["model"] == "deepseek-ai/DeepSeek-OCR"
    assert request["vllm_xargs"] == {
        "ngram_size": 30,
        "window_size": 90,
        "whitelist_token_ids": [128821, 128822],
    }
    assert request["skip_special_tokens"] is False  # the grounding tags are special tokens
    assert (request["max_tokens"], request["temperature"]) == (1234, 0.0)
    assert "stream" not in request  # pages are read whole: finish_reason comes with the text
    url, text = _parts(request)
    assert text == prompt
    prefix = "data:image/png;base64,"
    assert url.startswith(prefix)
    sent = Image.open(io.BytesIO(base64.b64decode(url[len(prefix) :], validate=True)))
    assert sent.size == image.size and sent.convert("RGB").tobytes() == image.tobytes()


@pytest.mark.parametrize(
    ("prompt", "output"),
    [
        ("Free OCR.", "text"),
        ("<|grounding|>Convert the document to markdown.", "markdown"),
        ("Convert to Markdown please", "markdown"),
        ("", "text"),
        (None, "text"),
    ],
)
def test_output_for_older_clients_prompt(prompt: str | None, output: str) -> None:
    assert output_for_prompt(prompt) == output


def _answer(content: str, finish: str | None, **usage: int) -> dict[str, Any]:
    return {
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish}
        ],
        "usage": usage,
    }


def test_answer_cut_by_length_is_flagged_truncated() -> None:
    """DeepSeek-OCR repeating itself until max_tokens: the text is kept, marked as cut."""
    repeated = "Total 12\n" * 40
    result = read_answer(_answer(repeated, "length", completion_tokens=120), 2, 1000, 800)
    assert result.truncated is True and result.finish_reason == "length"
    assert result.text == repeated.strip() and result.page == 2
    assert result.usage == {"completion_tokens": 120}
    view = result.view()
    assert (view["truncated"], view["finish_reason"]) == (True, "length")


def test_grounded_answer_cut_inside_a_tag_is_truncated_and_keeps_its_boxes() -> None:
    cut = GROUNDED + "<|ref|>text<|/ref|><|det|>[[0, 10"
    result = read_answer(_answer(cut, "length"), 1, 1000, 500)
    assert result.truncated is True
    assert result.text == "# Report"
    assert result.boxes == [Box("title", "# Report", 0, 0, 499, 50)]
    assert result.view()["boxes"][0]["label"] == "title"


@pytest.mark.parametrize("finish", ["stop", None])
def test_clean_answer_is_not_truncated(finish: str | None) -> None:
    result = read_answer(_answer("Hello world", finish), 1, 10, 10)
    assert (result.truncated, result.finish_reason, result.text) == (False, finish, "Hello world")
    assert "boxes" not in result.view()


def test_answer_without_choices_is_empty_not_truncated() -> None:
    result = read_answer({}, 1, 10, 10)
    assert (result.text, result.truncated, result.boxes, result.usage) == ("", False, [], {})
