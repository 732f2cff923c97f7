"""Giving money back, exactly once: claim -> call -> record, as charges are.

A refund is claimed first: a committed `requested` Refund with its own random idempotency key,
written under the payment's row lock after checking that the refunds of the payment that are
not `failed` stay within its amount. Its `refund_payment` task (an outbox item of the same
commit) asks the provider outside any transaction with that key, and records the answer. A
redelivery, a retry after a lost answer, or the provider's `refund.succeeded` webhook all
meet the same key, so the provider gives back once.

Payments never calls orders: which order lines a refund gives back, and what happens to the
order, is decided by orders (orders/services.py `refund_order`, orders/pipeline.py).
"""

import logging
import secrets
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING

from django.db import transaction
from django.db.models import F, Sum
from django.dispatch import Signal
from django.utils import timezone

from core import outbox
from core.errors import ApplicationError
from core.transactions import assert_outside_transaction
from integrations import provider

from .models import Payment, Refund, WebhookEvent

if TYPE_CHECKING:
    from django.contrib.auth.models import User

logger = logging.getLogger(__name__)

CENT = Decimal("0.01")

# A refund was claimed: sent in its transaction (refund=). Emails follow it.
refund_requested = Signal()
# A refund got its final outcome (succeeded or failed): sent in its transaction (refund=).
refund_settled = Signal()
# The provider refused a refund: staff must look (ops records a dead letter). Sent after commit (refund=, reason=).
refund_failed = Signal()


class RefundError(ApplicationError):
    code = "refund_refused"
    field = "amount"
    status = 409


class NotRefundable(RefundError):
    """No succeeded payment to give back from (not paid, or paid nothing)."""

    code = "not_refundable"
    field = "status"


class InvalidRefundAmount(RefundError):
    code = "invalid_amount"
    status = 422


class RefundTooLarge(RefundError):
    """More than what is left of the charge once the refunds before it are counted."""

    code = "amount_too_large"
    status = 422

    def __init__(self, amount: Decimal, left: Decimal, currency: str):
        self.left = left
        super().__init__(f"{amount} {currency} is more than the {left} {currency} left to refund")


def new_refund_key() -> str:
    """The refund's provider idempotency key (and reference): random, made once when it is claimed."""
    return f"ref_{secrets.token_hex(16)}"


def clean_amount(value: object) -> Decimal:
    """A positive amount of money with at most two decimals; InvalidRefundAmount otherwise."""
    try:
        amount = Decimal(str(value).strip())
    except (InvalidOperation, ValueError):
        raise InvalidRefundAmount(f"not an amount: {str(value)[:40]!r}") from None
    if not amount.is_finite() or amount <= 0 or amount != amount.quantize(CENT) or amount >= Decimal("1e10"):
        raise InvalidRefundAmount(f"the amount must be positive, with at most two decimals: {str(value)[:40]!r}")
    return amount.quantize(CENT)


def refunded(
    payment: Payment, *, statuses: tuple[str, ...] = (Refund.Status.REQUESTED, Refund.Status.SUCCEEDED)
) -> Decimal:
    """The sum of the payment's refunds in `statuses` (by default those that are or may be given back)."""
    total = Refund.objects.filter(payment=payment, status__in=statuses).aggregate(total=Sum("amount"))["total"]
    return total or Decimal("0.00")


def refundable(payment: Payment) -> Decimal:
    """What is left of a succeeded payment to give back: its amount less every refund not failed."""
    if payment.status != Payment.Status.SUCCEEDED:
        return Decimal("0.00")
    return payment.amount - refunded(payment)


def claim_refund(
    *,
    payment_id: int,
    amount: Decimal | None,
    reason: str = Refund.Reason.STAFF,
    lines: dict[str, int] | None = None,
    note: str = "",
    requested_by: "User | None" = None,
    submission: str = "",
) -> tuple[Refund, bool]:
    """Claim a refund of `amount` (None: all that is left) of a succeeded payment; its task is an outbox item.

    Returns the refund and whether it is new: the same `submission` (a form's one-time token, a
    client's Idempotency-Key) returns the refund it made. Decided under the payment's row lock,
    so concurrent claims never add up to more than the payment's amount. Call inside a transaction.
    Raises NotRefundable, InvalidRefundAmount or RefundTooLarge.
    """
    payment = Payment.objects.select_for_update().get(pk=payment_id)
    if submission and (existing := Refund.objects.filter(payment=payment, submission=submission).first()):
        return existing, False
    if payment.status != Payment.Status.SUCCEEDED:
        raise NotRefundable(f"payment {payment.pk} is {payment.status}: nothing was taken to give back")
    left = refundable(payment)
    amount = left if amount is None else clean_amount(amount)
    if amount <= 0:
        raise RefundTooLarge(amount, left, payment.currency) if left <= 0 else InvalidRefundAmount("nothing to refund")
    if amount > left:
        raise RefundTooLarge(amount, left, payment.currency)
    refund = Refund.objects.create(
        payment=payment,
        amount=amount,
        currency=payment.currency,
        reason=reason,
        lines=lines or {},
        note=note[:255],
        idempotency_key=new_refund_key(),
        requested_by=requested_by,
        submission=submission[:100],
    )
    outbox.enqueue("payments.tasks.refund_payment", refund.pk)
    refund_requested.send(sender=Refund, refund=refund)
    logger.info(
        "refund %s of %s %s claimed for payment %s (%s)", refund.pk, amount, refund.currency, payment.pk, reason
    )
    return refund, True


RefundOutcome = provider.Refund | provider.ProviderRejected


def settle_refund(*, refund_id: int) -> Refund:
    """Ask the provider for a claimed refund with its stored key, unless its outcome is known; record the answer.

    Raises ProviderUnavailable when the provider could not answer (or has not finished): retrying is safe.
    """
    refund = Refund.objects.select_related("payment").get(pk=refund_id)
    if refund.status in Refund.FINAL:
        return refund
    assert_outside_transaction("a refund")
    Refund.objects.filter(pk=refund.pk).update(attempts=F("attempts") + 1, updated_at=timezone.now())
    outcome: RefundOutcome
    try:
        outcome = provider.refund(
            charge_id=refund.payment.provider_charge_id,
            amount=refund.amount,
            currency=refund.currency,
            reference=refund.idempotency_key,
            idempotency_key=refund.idempotency_key,
        )
    except provider.ProviderRejected as refused:
        outcome = refused
    with transaction.atomic():
        return record_refund(refund.pk, outcome)


def _mismatch(refund: Refund, answer: provider.Refund) -> str:
    problems = []
    if answer.amount != refund.amount:
        problems.append(f"amount {answer.amount} != {refund.amount}")
    if answer.currency.upper() != refund.currency.upper():
        problems.append(f"currency {answer.currency} != {refund.currency}")
    if answer.reference != refund.idempotency_key:
        problems.append(f"reference {answer.reference!r} != {refund.idempotency_key!r}")
    if refund.payment.provider_charge_id and answer.charge_id != refund.payment.provider_charge_id:
        problems.append(f"charge {answer.charge_id!r} != {refund.payment.provider_charge_id!r}")
    return "; ".join(problems)


def record_refund(refund_id: int, outcome: RefundOutcome) -> Refund:
    """Write the provider's answer onto a requested refund, checked against it. Call inside a transaction.

    A refusal (or an answer that is not this refund's) fails it, and staff are told; a refund
    the provider has not finished raises ProviderUnavailable (ask again later). Once final, a
    refund changes no more: a late webhook or a redelivery records nothing twice.
    """
    # Only the refund's row: the payment's is taken by claims, after the order's (orders.services).
    refund = Refund.objects.select_for_update(of=("self",)).select_related("payment").get(pk=refund_id)
    if refund.status in Refund.FINAL:
        return refund
    if isinstance(outcome, provider.ProviderRejected):
        status, refund_id_at_provider, reason = Refund.Status.FAILED, "", f"refused: {outcome}"
    elif problems := _mismatch(refund, outcome):
        status, refund_id_at_provider, reason = Refund.Status.FAILED, outcome.id, f"mismatch: {problems}"
    elif outcome.status == "pending":
        raise provider.ProviderUnavailable(f"refund {outcome.id} is pending at the provider")
    elif outcome.status != "succeeded":
        status, refund_id_at_provider, reason = Refund.Status.FAILED, outcome.id, f"refund {outcome.status}"
    else:
        status, refund_id_at_provider, reason = Refund.Status.SUCCEEDED, outcome.id, ""
    refund.status, refund.provider_refund_id, refund.failure_reason = status, refund_id_at_provider, reason[:200]
    refund.save(update_fields=["status", "provider_refund_id", "failure_reason", "updated_at"])
    refund_settled.send(sender=Refund, refund=refund)
    if status == Refund.Status.FAILED:
        logger.error("refund %s failed: %s", refund.pk, reason)
        transaction.on_commit(lambda: refund_failed.send(sender=Refund, refund=refund, reason=reason))
    return refund


# --- The provider's refund events -----------------------------------------------------

REFUND_EVENTS = ("refund.succeeded", "refund.failed")


def process_refund_event(event: WebhookEvent) -> None:
    """Record the refund a provider event names, as the provider reports it; an unknown one is left to reconciliation.

    Raises ApplicationError subclasses for an event without a refund id (the caller stores it
    invalid) and ProviderUnavailable when the provider cannot be asked.
    """
    data = event.payload.get("data")
    named = data.get("refund") if isinstance(data, dict) else None
    refund_id = named.get("id") if isinstance(named, dict) else None
    if not isinstance(refund_id, str) or not refund_id or len(refund_id) > 100:
        raise ApplicationError("event has no data.refund.id")
    try:
        answer = provider.retrieve_refund(refund_id=refund_id)
    except provider.ProviderRejected as unknown:  # no such refund there (404): never worth a retry
        raise ApplicationError(f"refund {refund_id[:100]!r} is not the provider's: {unknown}") from unknown
    # Ours by the key it was made under: anyone may use our reference for a refund of their own.
    refund = Refund.objects.filter(idempotency_key=answer.idempotency_key or answer.reference).first()
    if refund is None or (answer.idempotency_key and answer.idempotency_key != refund.idempotency_key):
        logger.warning("refund event %s: refund %s is not one of ours", event.provider_event_id, answer.id)
        return
    with transaction.atomic():
        record_refund(refund.pk, answer)
