"""Arguments the management commands share."""

import re
from datetime import UTC, datetime, timedelta

from django.core.management.base import CommandError
from django.utils import timezone
from django.utils.dateparse import parse_date, parse_datetime

DURATION = re.compile(r"^(\d+)([smhd])$")
UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_since(value: str) -> datetime:
    """`--since`: an ISO date or datetime (UTC without an offset), or a duration back from now: 45s, 30m, 12h, 2d."""
    value = value.strip()
    if match := DURATION.match(value):
        return timezone.now() - timedelta(**{UNITS[match.group(2)]: int(match.group(1))})
    try:
        parsed = parse_datetime(value)
        if parsed is None and (day := parse_date(value)) is not None:
            parsed = datetime(day.year, day.month, day.day)
    except ValueError:
        parsed = None
    if parsed is None:
        raise CommandError(
            f"--since {value!r}: give an ISO date or datetime (2026-01-31, 2026-01-31T08:00) or a duration (30m, 2h)"
        )
    return parsed if timezone.is_aware(parsed) else parsed.replace(tzinfo=UTC)
