"""Payment reconciliation: the shop's payments against the provider's ledger, each mismatch reported once.

Charges are matched to payments by reference (the payment's idempotency key is the charge's
reference). The rules, for every payment made since `since` and every charge listed since then:

- a `succeeded` payment has a provider charge with its reference (the one whose id it recorded,
  else a succeeded one) of the same amount, the same currency and status `succeeded`; else
  payment_without_provider_charge, amount_mismatch, currency_mismatch or status_mismatch;
- a `succeeded` provider charge is accounted for by a `succeeded` payment with its reference; a
  second succeeded charge for one payment, or one whose reference is no payment's, is
  provider_charge_without_payment; one whose payment is `declined`, `voided` or still
  `processing` past in_flight_grace() is status_mismatch (the provider took money the shop does
  not know of);
- skipped: a `processing` payment touched within in_flight_grace() (its charge is in flight), and a
  payment in `needs_attention`, which staff already see as a dead letter with an alert;
- not a mismatch: a declined charge without a payment (no money moved), and a `processing`
  payment without a charge (stuck work, which the outbox relay and the dead letters report);
- refunds: the charge of a `succeeded` payment has given back (its `amount_refunded`) what the
  payment's `succeeded` refunds add up to; more is provider_refund_without_refund, less is
  refund_without_provider_refund. Skipped while one of its refunds is `requested` and touched
  within in_flight_grace() (its answer is on its way). Payments with a refund touched since
  `since` are checked however old they are.

A charge is made only after its payment is committed, so a charge listed first always finds its
payment. A candidate is checked again with a fresh read of the payment and of the charges under its
reference before it is recorded, so a payment settled during the run is not reported. A mismatch is
stored once per (kind, reference, provider charge id): a later run adds nothing, and one that staff
resolved stays resolved. The provider account is taken to be this shop's alone: a charge that
another system made under it is reported as provider_charge_without_payment.
"""

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal

from django.conf import settings
from django.db.models import Q
from django.utils import timezone

from integrations import provider

from .models import Payment, PaymentMismatch, Refund

# A daily run looks back two days, so a day it missed (beat down, provider unreachable) is still covered.
DEFAULT_LOOKBACK = timedelta(days=2)
# Charges are listed from this long before `since`: the provider's clock is not the database's.
CLOCK_SKEW = timedelta(minutes=5)

Kind = PaymentMismatch.Kind


def in_flight_grace() -> timedelta:
    """How long a processing payment is taken to be in flight, its charge not yet recorded.

    Charge tasks retry for about 3 minutes and the provider's webhook settles a charge within
    seconds; a backlog or a broker outage can hold the work longer (RECONCILIATION_GRACE_SECONDS, 3 h).
    """
    return timedelta(seconds=settings.RECONCILIATION_GRACE_SECONDS)


@dataclass(frozen=True)
class Finding:
    kind: str
    reference: str
    provider_charge_id: str
    details: str
    payment: Payment | None = None


@dataclass(frozen=True)
class Reconciliation:
    since: datetime
    payments_checked: int
    charges_checked: int
    # Every mismatch this run found, and the ones it reported first.
    found: list[PaymentMismatch] = field(default_factory=list)
    new: list[PaymentMismatch] = field(default_factory=list)


def reconcile_payments(*, since: datetime | None = None, now: datetime | None = None) -> Reconciliation:
    """Compare payments and provider charges made since `since` (default: two days ago); store new mismatches.

    Raises ProviderUnavailable (transient) or ProviderRejected when the provider cannot be read; nothing is stored.
    """
    now = now or timezone.now()
    since = since or now - DEFAULT_LOOKBACK
    # Charges first: every charge's payment was committed before the charge was made.
    charges_by_reference: dict[str, list[provider.Charge]] = defaultdict(list)
    charges_checked = 0
    for charge in provider.list_charges(created_gte=since - CLOCK_SKEW, page_size=1000):
        charges_by_reference[charge.reference].append(charge)
        charges_checked += 1
    payments = {
        payment.idempotency_key: payment
        for payment in Payment.objects.filter(
            Q(created_at__gte=since)
            | Q(idempotency_key__in=list(charges_by_reference))
            | Q(pk__in=Refund.objects.filter(updated_at__gte=since).values("payment_id"))
        )
    }
    suspects = [
        reference
        for reference in sorted(payments.keys() | charges_by_reference.keys())
        if find_mismatches(
            reference=reference,
            payment=payments.get(reference),
            charges=charges_by_reference.get(reference, []),
            now=now,
        )
    ]
    findings = [finding for reference in suspects for finding in _confirmed_mismatches(reference=reference, now=now)]
    found, new = _record_mismatches(findings=findings)
    return Reconciliation(
        since=since, payments_checked=len(payments), charges_checked=charges_checked, found=found, new=new
    )


def find_mismatches(
    *, reference: str, payment: Payment | None, charges: list[provider.Charge], now: datetime
) -> list[Finding]:
    """The mismatches between one reference's payment (or None) and the provider's charges under it."""
    succeeded = [charge for charge in charges if charge.status == "succeeded"]
    if payment is None:
        return [
            Finding(
                Kind.PROVIDER_CHARGE_WITHOUT_PAYMENT,
                reference,
                charge.id,
                f"provider charge {charge.id} succeeded for {charge.amount} {charge.currency}; no shop payment",
            )
            for charge in succeeded
        ]
    status = payment.status
    if status == Payment.Status.NEEDS_ATTENTION:
        return []
    # updated_at: a payment staff reopened is in flight again, however old it is.
    if status == Payment.Status.PROCESSING and payment.updated_at > now - in_flight_grace():
        return []
    if status != Payment.Status.SUCCEEDED:
        return [
            Finding(
                Kind.STATUS_MISMATCH,
                reference,
                charge.id,
                f"provider charge {charge.id} succeeded for {charge.amount} {charge.currency}; shop payment {status}",
                payment,
            )
            for charge in succeeded
        ]
    charge = _charge_of(payment, charges)
    findings = []
    if charge is None:
        recorded = payment.provider_charge_id or "none recorded"
        details = (
            f"shop payment succeeded for {payment.amount} {payment.currency} (charge {recorded}); "
            "the provider has no such charge"
        )
        findings.append(
            Finding(Kind.PAYMENT_WITHOUT_PROVIDER_CHARGE, reference, payment.provider_charge_id, details, payment)
        )
    else:
        shop, theirs = f"shop {payment.amount} {payment.currency}", f"provider {charge.amount} {charge.currency}"
        if charge.amount != payment.amount:
            findings.append(Finding(Kind.AMOUNT_MISMATCH, reference, charge.id, f"{shop}, {theirs}", payment))
        if charge.currency.upper() != payment.currency.upper():
            findings.append(Finding(Kind.CURRENCY_MISMATCH, reference, charge.id, f"{shop}, {theirs}", payment))
        if charge.status != "succeeded":
            details = f"shop payment succeeded, provider charge {charge.status}"
            findings.append(Finding(Kind.STATUS_MISMATCH, reference, charge.id, details, payment))
        findings += _refund_mismatches(payment, charge, now=now)
    # Money the provider took for this reference beyond the charge that settled the payment.
    findings += [
        Finding(
            Kind.PROVIDER_CHARGE_WITHOUT_PAYMENT,
            reference,
            extra.id,
            f"provider charge {extra.id} succeeded for {extra.amount} {extra.currency}; "
            f"the shop payment is settled by {charge.id if charge else 'no charge the provider has'}",
            payment,
        )
        for extra in succeeded
        if charge is None or extra.id != charge.id
    ]
    return findings


def _refund_mismatches(payment: Payment, charge: provider.Charge, *, now: datetime) -> list[Finding]:
    """The charge's refunded total against the payment's succeeded refunds (none while one is in flight)."""
    refunds = list(payment.refunds.all())
    in_flight = [
        refund
        for refund in refunds
        if refund.status == Refund.Status.REQUESTED and refund.updated_at > now - in_flight_grace()
    ]
    if in_flight:
        return []
    ours = sum((refund.amount for refund in refunds if refund.status == Refund.Status.SUCCEEDED), Decimal("0.00"))
    theirs = charge.amount_refunded
    if theirs == ours:
        return []
    kind = Kind.PROVIDER_REFUND_WITHOUT_REFUND if theirs > ours else Kind.REFUND_WITHOUT_PROVIDER_REFUND
    details = f"provider charge {charge.id} refunded {theirs} {charge.currency}; shop refunds add up to {ours}"
    return [Finding(kind, payment.idempotency_key, charge.id, details, payment)]


def resolve_mismatches(*, mismatch_ids: Iterable[int]) -> int:
    """Mark these mismatches resolved (staff handled them); returns how many were still open."""
    return PaymentMismatch.objects.filter(pk__in=list(mismatch_ids), resolved=False).update(resolved=True)


def _charge_of(payment: Payment, charges: list[provider.Charge]) -> provider.Charge | None:
    """The charge that settled this payment: the one whose id it recorded, else the first succeeded one."""
    if payment.provider_charge_id:
        return next((charge for charge in charges if charge.id == payment.provider_charge_id), None)
    return next((charge for charge in charges if charge.status == "succeeded"), None)


def _confirmed_mismatches(*, reference: str, now: datetime) -> list[Finding]:
    """The mismatches of one reference on a fresh read of both sides (it may have settled during the run)."""
    return find_mismatches(
        reference=reference,
        payment=Payment.objects.filter(idempotency_key=reference).first(),
        charges=list(provider.list_charges(reference=reference)),
        now=now,
    )


def _record_mismatches(*, findings: list[Finding]) -> tuple[list[PaymentMismatch], list[PaymentMismatch]]:
    """Store each finding once by (kind, reference, provider charge id); returns (all found, first reported now)."""
    found, new = [], []
    for finding in findings:
        mismatch, created = PaymentMismatch.objects.get_or_create(
            kind=finding.kind,
            reference=finding.reference,
            provider_charge_id=finding.provider_charge_id,
            defaults={"payment": finding.payment, "details": finding.details},
        )
        found.append(mismatch)
        if created:
            new.append(mismatch)
    return found, new
