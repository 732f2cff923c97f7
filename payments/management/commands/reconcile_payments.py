import re
from datetime import UTC, datetime, timedelta

from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone
from django.utils.dateparse import parse_date, parse_datetime

from integrations.errors import ProviderRejected, ProviderUnavailable
from payments.reconciliation import reconcile_payments

DURATION = re.compile(r"^(\d+)([smhd])$")
UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_since(value: str) -> datetime:
    """An ISO date or datetime (UTC when it has no offset), or a duration back from now: 30m, 12h, 2d."""
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
        raise CommandError(f"--since {value!r}: give an ISO date or datetime (2026-01-31, 2026-01-31T08:00) or 2d/12h")
    return parsed if timezone.is_aware(parsed) else parsed.replace(tzinfo=UTC)


class Command(BaseCommand):
    help = "Compare the shop's payments with the provider's charges and report each new mismatch once."

    def add_arguments(self, parser):
        parser.add_argument("--since", metavar="WHEN", help="payments and charges made at or after WHEN (default 2d)")

    def handle(self, *args, since=None, **options):
        try:
            result = reconcile_payments(since=parse_since(since) if since else None)
        except (ProviderUnavailable, ProviderRejected) as exc:
            raise CommandError(f"the provider's charges could not be read: {exc}") from exc
        for mismatch in result.new:
            self.stdout.write(f"new {mismatch.kind} {mismatch.reference}: {mismatch.details}")
        summary = (
            f"Checked {result.payments_checked} payment(s) and {result.charges_checked} charge(s) since "
            f"{result.since.isoformat()}: {len(result.found)} mismatch(es), {len(result.new)} new."
        )
        self.stdout.write(self.style.WARNING(summary) if result.found else self.style.SUCCESS(summary))
