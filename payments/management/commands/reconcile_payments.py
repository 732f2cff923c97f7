from argparse import ArgumentParser
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from core.cli import parse_since
from integrations.errors import ProviderRejected, ProviderUnavailable
from payments.reconciliation import reconcile_payments


class Command(BaseCommand):
    help = "Compare the shop's payments with the provider's charges and report each new mismatch once."

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("--since", metavar="WHEN", help="payments and charges made at or after WHEN (default 2d)")

    def handle(self, *args: Any, since: str | None = None, **options: Any) -> None:
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
