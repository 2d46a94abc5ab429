"""`recfunnel bench api`'s own helpers: filters of a chosen selectivity, and its summaries."""

from __future__ import annotations

import pytest

from bench.api import case_summary, year_filter
from bench.harness import LoadResult, Sample
from recdata.attributes import ItemAttributes


@pytest.mark.parametrize("share", [0.5, 0.05, 0.01])
def test_the_year_range_passes_about_the_asked_share(share: float) -> None:
    catalogue = [ItemAttributes(properties={"year": float(1900 + n % 100)}) for n in range(1000)]
    item_filter, passing = year_filter(catalogue + [ItemAttributes()], share)
    assert abs(passing - share) < 0.01
    assert passing == sum(item_filter.passes(a) for a in catalogue) / 1001


def test_a_case_says_how_many_answers_filled_k() -> None:
    result = LoadResult(10.0, [Sample(0.1, 5.0, "Recommend", "OK", False)] * 4, wall_s=1.0)
    assert case_summary(result, [True, True, False, True])["filled_k_share"] == 0.75
    assert case_summary(result, [])["filled_k_share"] is None
