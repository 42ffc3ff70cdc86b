"""kit.jobs.cron on croniter: the semantics the hand-written parser had are kept."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from surge.kit.jobs.cron import Cron, CronError

NOON = datetime(2026, 12, 6, 12, 0, 30, tzinfo=UTC)  # a Sunday


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("* * * * *", datetime(2026, 12, 6, 12, 1, tzinfo=UTC)),
        ("*/15 * * * *", datetime(2026, 12, 6, 12, 15, tzinfo=UTC)),
        ("0 0 1 1 *", datetime(2027, 1, 1, tzinfo=UTC)),
        ("@daily", datetime(2026, 12, 7, tzinfo=UTC)),
        ("0 6 * * 1-5", datetime(2026, 12, 7, 6, tzinfo=UTC)),  # the next weekday
        ("0 0 * * 7", datetime(2026, 12, 13, tzinfo=UTC)),  # 7 is Sunday too
        # Both day fields restricted: either matches (the 11th is a Friday, before the 13th).
        ("0 0 13 * 5", datetime(2026, 12, 11, tzinfo=UTC)),
    ],
)
def test_next_slot(expression: str, expected: datetime) -> None:
    assert Cron.parse(expression).next_after(NOON) == expected


def test_a_slot_is_strictly_after() -> None:
    on_slot = datetime(2026, 12, 6, 12, 15, tzinfo=UTC)
    assert Cron.parse("*/15 * * * *").next_after(on_slot) == datetime(
        2026, 12, 6, 12, 30, tzinfo=UTC
    )


@pytest.mark.parametrize("expression", ["* * *", "61 * * * *", "a b c d e", "* * * * * *"])
def test_bad_expressions_are_refused(expression: str) -> None:
    with pytest.raises(CronError):
        Cron.parse(expression)
