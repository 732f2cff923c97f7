"""Billing period arithmetic: every period is counted from the subscription's anchor, never from the last one.

Counting from the previous period drifts: 01-31 + 1 month is 02-28, and 02-28 + 1 month is 03-28.
Counting from the anchor keeps the anchor's day wherever the month has it (01-31, 02-28, 03-31,
04-30), as Stripe's billing_cycle_anchor does; yearly periods from Feb 29 fall on Feb 28 in other years.
"""

import re
from datetime import date

from dateutil.relativedelta import relativedelta

from core.errors import ApplicationError

MONTH = "month"
YEAR = "year"
_MONTHS_PER_PERIOD = {MONTH: 1, YEAR: 12}
_BILLING_PERIOD = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


def _months_per_period(interval: str) -> int:
    try:
        return _MONTHS_PER_PERIOD[interval]
    except KeyError:
        raise ValueError(f"unknown billing interval: {interval!r}") from None


def period_start(anchor: date, interval: str, n: int) -> date:
    """The start of the n-th period (0 is the anchor itself): the anchor's day, or the month's last day."""
    if n < 0:
        raise ValueError(f"period number must not be negative, got {n}")
    # relativedelta clamps to the month's last day and never carries into the next month.
    return anchor + relativedelta(months=n * _months_per_period(interval))


def next_period_start(anchor: date, interval: str, current_start: date) -> date:
    """The first period start on the anchor's schedule that is after `current_start` (not before the anchor)."""
    if current_start < anchor:
        raise ValueError(f"{current_start} is before the billing anchor {anchor}")
    months_since_anchor = (current_start.year - anchor.year) * 12 + current_start.month - anchor.month
    n = months_since_anchor // _months_per_period(interval)
    while (start := period_start(anchor, interval, n)) <= current_start:
        n += 1
    return start


class InvalidBillingPeriod(ApplicationError):
    code = "invalid_billing_period"
    field = "billing_period"


def parse_billing_period(value: object) -> date:
    """The date a billing period string names; only `YYYY-MM-DD` is accepted, so a period has one spelling."""
    if not isinstance(value, str) or not _BILLING_PERIOD.fullmatch(value):
        raise InvalidBillingPeriod(f"billing_period must be a YYYY-MM-DD date, got {value!r}")
    try:
        return date.fromisoformat(value)
    except ValueError as exc:
        raise InvalidBillingPeriod(f"billing_period is not a calendar date: {value!r}") from exc
