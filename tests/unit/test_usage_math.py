"""The pure parts of usage statistics: windows, buckets and quantiles."""

from __future__ import annotations

import pytest

from app.errors import InvalidRequest
from app.history.usage import BOUNDS_MS, bucket_counts, parse_window, quantile

DAY = 86400.0


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("7d", 7 * DAY), ("24h", 86400), ("90m", 5400), ("3600", 3600), ("1w", 7 * DAY), (" 2.5h ", 9000)],
)
def test_windows_parse(text: str, seconds: float) -> None:
    assert parse_window(text, 15 * DAY) == seconds


@pytest.mark.parametrize(
    ("text", "says"),
    [("", "not a duration"), ("7x", "not a duration"), ("-1d", "not a duration"), ("0h", "not a duration"),
     ("16d", "longer than the history kept (15 days)")],
)  # fmt: skip
def test_bad_windows_say_what_is_wrong(text: str, says: str) -> None:
    with pytest.raises(InvalidRequest, match=r".*") as caught:
        parse_window(text, 15 * DAY)
    assert says in caught.value.message
    assert caught.value.param == "window"


def test_values_land_in_the_bucket_whose_upper_bound_holds_them() -> None:
    counts = bucket_counts([0, 5, 5.1, 10, None, 600_000, 600_001])
    assert sum(counts) == 6  # None (no start yet) is not a value
    assert counts[0] == 2  # 0 and 5 are <= 5
    assert counts[1] == 2  # 5.1 and 10
    assert counts[len(BOUNDS_MS) - 1] == 1  # 600000 in the last bounded bucket
    assert counts[len(BOUNDS_MS)] == 1  # above every bound


def test_quantiles_interpolate_within_a_bucket() -> None:
    counts = [0] * (len(BOUNDS_MS) + 1)
    counts[BOUNDS_MS.index(1_000)] = 10  # ten values in (500, 1000]
    assert quantile(counts, 0.5) == 750.0
    assert quantile(counts, 1.0) == 1_000.0
    assert quantile([0] * (len(BOUNDS_MS) + 1), 0.5) is None


def test_quantile_in_the_overflow_bucket_reports_its_lower_bound() -> None:
    counts = [0] * (len(BOUNDS_MS) + 1)
    counts[0], counts[-1] = 1, 9
    assert quantile(counts, 0.05) == 2.5
    assert quantile(counts, 0.95) == BOUNDS_MS[-1]
