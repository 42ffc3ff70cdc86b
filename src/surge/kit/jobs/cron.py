"""Cron expressions for periodic jobs, UTC: croniter's parser and iteration.

Five fields (minute hour day-of-month month day-of-week) plus what croniter adds (names such
as ``MON`` or ``JAN``, ``L``, ``@hourly``/``@daily``/...); when both day fields are
restricted a day matches if either does (Vixie cron, croniter's default). The hand-written
parser this replaces covered a subset of that with the same semantics (ADR 0013).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from croniter import CroniterError, croniter  # type: ignore[import-untyped]


class CronError(ValueError):
    pass


@dataclass(frozen=True)
class Cron:
    expression: str

    @classmethod
    def parse(cls, expression: str) -> Cron:
        text = expression.strip()
        if len(text.split()) != 5 and not text.startswith("@"):
            raise CronError(f"cron needs 5 fields, got {expression!r}")
        try:
            croniter(text)
        except (CroniterError, ValueError, KeyError) as error:
            raise CronError(f"bad cron {expression!r}: {error}") from error
        return cls(text)

    def next_after(self, after: datetime) -> datetime:
        """The first matching minute strictly after ``after`` (same tzinfo)."""
        try:
            moment: datetime = croniter(self.expression, after).get_next(datetime)
        except CroniterError as error:
            raise CronError(f"{self.expression!r} never matches") from error
        return moment
