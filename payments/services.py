"""Charging orders and subscriptions, exactly once, and taking the provider's webhooks.

A charge is never made inside a transaction. It is claimed first (a committed
`processing` Payment whose idempotency key is unique), then the provider is called
with that stable key, then the outcome is recorded. A redelivery of the same work
finds the claimed row and finishes it with the same key: the provider answers with
the charge it already made instead of making a second one.
"""

import json
import logging
import secrets
from datetime import date, datetime
from typing import TYPE_CHECKING, Any, NamedTuple

from django.db import IntegrityError, transaction
from django.db.models import F, Q
from django.dispatch import Signal
from django.utils import timezone

from core import outbox
from core.db import insert_unless_exists
from core.errors import ApplicationError
from core.transactions import assert_outside_transaction
from integrations import provider

from . import billing, dunning, refunds
from .models import Payment, PaymentMethod, Plan, Subscription, WebhookEvent
from .signatures import WebhookRejected, verify_signature

if TYPE_CHECKING:
    from django.contrib.auth.models import User

logger = logging.getLogger(__name__)


class SubscriptionError(ApplicationError):
    code = "subscription_refused"
    field = "plan"


class CardRefused(ApplicationError):
    """The provider would not tokenise the card: `field` names the part (card_number, exp_month, exp_year, cvc)."""

    code = "invalid_card"

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(message)


class UnknownPaymentMethod(ApplicationError):
    """No such payment method among the owner's (someone else's is no different): 404."""

    code = "not_found"
    field = "payment_method"
    status = 404


class InvalidWebhookEvent(ApplicationError):
    """An event the shop cannot act on: stored as invalid, never retried."""

    code = "invalid_event"
    field = "event"


# A payment that staff must look at (needs_attention): sent after commit (payment=, reason=).
# ops records a dead letter for it, which the dead-letter alert reports.
needs_attention = Signal()
# A payment got its outcome outside its charge task (a webhook): sent in its transaction (payment=).
payment_settled = Signal()
# A subscription period's charge got its outcome: sent in its transaction (payment=, subscription=).
subscription_charged = Signal()


# --- Claim, call, record -------------------------------------------------------------


def new_idempotency_key() -> str:
    """A provider idempotency key: random, so it is unique across databases and deployments sharing one account.

    Made once, when the payment is claimed, and stored on it: every retry sends the same key.
    """
    return f"pay_{secrets.token_hex(16)}"


def _claim(*, natural_key: dict[str, Any], **fields: Any) -> Payment:
    """The Payment for this order or subscription period, created as `processing` if it does not exist yet.

    Under concurrent calls the unique constraint on `natural_key` decides (one INSERT ... ON
    CONFLICT DO NOTHING, no savepoint: it runs under the order's or subscription's row lock); the
    losers read the winner's row. Any other integrity error (an amount that is not positive) is raised.
    """
    payment = Payment(idempotency_key=new_idempotency_key(), **natural_key, **fields)
    if insert_unless_exists(payment, unique=tuple(natural_key), partial=True):
        return payment
    return Payment.objects.get(**natural_key)


Outcome = provider.Charge | provider.CardDeclined | provider.ProviderRejected


def call_provider(payment: Payment, *, counted: bool = False) -> Outcome:
    """Charge with the payment's key (and card, if any); a decline or a refusal is returned, transient errors raise.

    The call is counted on the payment (`attempts`), committed before it is made; `counted`: its caller
    did that already, in the transaction that claimed it (claim_order_payment).
    """
    assert_outside_transaction("a charge")
    if not counted:
        # F(): two deliveries of the same work must not lose a count.
        Payment.objects.filter(pk=payment.pk).update(attempts=F("attempts") + 1, updated_at=timezone.now())
    try:
        return provider.charge(
            amount=payment.amount,
            currency=payment.currency,
            # The reference is the key too, so a webhook leads straight back to its Payment.
            reference=payment.idempotency_key,
            idempotency_key=payment.idempotency_key,
            payment_method=payment.payment_method.provider_token if payment.payment_method else "",
        )
    except provider.ProviderRejected as refused:  # CardDeclined included
        return refused


def mismatch(payment: Payment, charge: provider.Charge) -> str:
    """Why the provider's charge is not this payment's (amount, currency, reference), or "" when it is."""
    problems = []
    if charge.amount != payment.amount:
        problems.append(f"amount {charge.amount} != {payment.amount}")
    if charge.currency.upper() != payment.currency.upper():
        problems.append(f"currency {charge.currency} != {payment.currency}")
    if charge.reference != payment.idempotency_key:
        problems.append(f"reference {charge.reference!r} != {payment.idempotency_key!r}")
    return "; ".join(problems)


def record_outcome(payment_id: int, outcome: Outcome) -> Payment:
    """Write the provider's answer onto the payment, checked against it first. Call inside a transaction.

    It takes the payment's row lock; a caller that holds the order's too took that one first, as every
    path that takes both does (orders.services), so two of them never wait on each other in turn.

    A charge whose amount, currency or reference differs from the payment's is never a success:
    the payment needs attention (a dead letter and an alert, through `needs_attention`). So does a
    success for a payment voided meanwhile (the provider took money after the cancellation). A
    payment whose outcome was unknown when it was put in needs_attention (retries spent, a
    refusal, someone else's charge under its reference) still takes the provider's charge when one
    turns up (a late webhook, a lookup); a foreign charge it replaces stays in the dead letters and
    for reconciliation.
    """
    payment = Payment.objects.select_for_update().get(pk=payment_id)
    voided = payment.status == Payment.Status.VOIDED
    if payment.status in Payment.FINAL and not (
        isinstance(outcome, provider.Charge) and (voided or outcome_unknown(payment))
    ):
        return payment
    if isinstance(outcome, provider.CardDeclined):
        status, charge_id, reason = Payment.Status.DECLINED, outcome.charge_id, outcome.reason
    elif isinstance(outcome, provider.ProviderRejected):
        status, charge_id, reason = Payment.Status.NEEDS_ATTENTION, "", f"rejected: {outcome}"
    elif problems := mismatch(payment, outcome):
        reason = f"mismatch: {problems}"
        if voided:
            # Someone else's charge says nothing of ours: the payment stays voided (our own charge,
            # should it turn up, is then a refund for staff); staff hear of the foreign one.
            _alert(payment, f"{reason} (charge {outcome.id})")
            return payment
        status, charge_id = Payment.Status.NEEDS_ATTENTION, outcome.id
    elif outcome.status in ("failed", "declined"):
        status, charge_id, reason = Payment.Status.DECLINED, outcome.id, outcome.status
    elif outcome.status != "succeeded":
        # Not settled at the provider yet (pending): ask again later.
        raise provider.ProviderUnavailable(f"charge {outcome.id} is {outcome.status} at the provider")
    elif voided:
        status, charge_id, reason = Payment.Status.NEEDS_ATTENTION, outcome.id, "charged after it was voided: refund"
    else:
        status, charge_id, reason = Payment.Status.SUCCEEDED, outcome.id, ""
    payment.status, payment.provider_charge_id, payment.failure_reason = status, charge_id, reason[:200]
    payment.save(update_fields=["status", "provider_charge_id", "failure_reason", "updated_at"])
    if status == Payment.Status.NEEDS_ATTENTION:
        _alert(payment, reason)
    return payment


def _alert(payment: Payment, reason: str) -> None:
    """Tell staff, after commit, that this payment needs a look (ops records a dead letter for it)."""
    logger.error("payment %s needs attention: %s", payment.pk, reason)
    transaction.on_commit(lambda: needs_attention.send(sender=Payment, payment=payment, reason=reason))


def settle_payment(*, payment_id: int) -> Payment:
    """Finish a claimed payment with its stored key: call the provider unless its outcome is known, record it.

    Raises integrations.errors.ProviderUnavailable when the provider could not answer; retrying is safe.
    """
    payment = Payment.objects.select_related("payment_method").get(pk=payment_id)
    if payment.status in Payment.FINAL:
        return payment
    outcome = call_provider(payment)
    with transaction.atomic():
        return record_outcome(payment.pk, outcome)


def mark_needs_attention(
    *, reason: str, order_id: int | None = None, subscription_id: int | None = None, billing_period: str = ""
) -> Payment | None:
    """The charge of this order (or subscription period) failed for good: its processing payment needs attention."""
    lookup: dict[str, Any]
    if order_id is not None:
        lookup = {"order_id": order_id}
    else:
        lookup = {"subscription_id": subscription_id, "billing_period": billing_period}
    with transaction.atomic():
        payment = Payment.objects.select_for_update().filter(**lookup).first()
        if payment is None or payment.status != Payment.Status.PROCESSING:
            return payment
        payment.status = Payment.Status.NEEDS_ATTENTION
        payment.failure_reason = f"unfinished: {reason}"[:200]
        payment.save(update_fields=["status", "failure_reason", "updated_at"])
    needs_attention.send(sender=Payment, payment=payment, reason=payment.failure_reason)
    return payment


# Why a payment was put in needs_attention without its own outcome learnt: retries spent, a refusal,
# or a charge under its reference that was not its own (someone else's, of another amount).
OUTCOME_UNKNOWN_REASONS = ("unfinished:", "rejected:", "mismatch:")


def mismatched(payment: Payment) -> bool:
    """A payment in needs_attention because a charge under its reference was not its own (amount, currency)."""
    return payment.status == Payment.Status.NEEDS_ATTENTION and payment.failure_reason.startswith("mismatch:")


def outcome_unknown(payment: Payment) -> bool:
    """A payment in needs_attention whose own outcome was never learnt (not money taken after a void)."""
    return payment.status == Payment.Status.NEEDS_ATTENTION and payment.failure_reason.startswith(
        OUTCOME_UNKNOWN_REASONS
    )


def look_up_at_provider(*, payment_id: int) -> Payment:
    """Ask the provider what it did under the payment's key and record a charge it made; call outside a transaction.

    For a payment whose own outcome is unknown (processing, or needs_attention without it, a
    mismatch included) before staff act on it. Others can reuse our reference, never our key, so
    the charge made under the payment's own key is the answer. Raises ProviderUnavailable when
    the provider cannot be asked.
    """
    assert_outside_transaction("a provider lookup")
    payment = Payment.objects.get(pk=payment_id)
    if payment.status != Payment.Status.PROCESSING and not outcome_unknown(payment):
        return payment
    charges = list(provider.list_charges(reference=payment.idempotency_key))
    if any(charge.idempotency_key for charge in charges):
        made = next((charge for charge in charges if charge.idempotency_key == payment.idempotency_key), None)
    elif mismatched(payment):
        made = None  # which of them is ours cannot be told
    else:
        # A provider that does not say under which key: a success first, else whatever it made.
        made = next((charge for charge in charges if charge.status == "succeeded"), None) or next(iter(charges), None)
    if made is None:
        return payment
    with transaction.atomic():
        return record_outcome(payment.pk, made)


def reopen_payment(*, order_id: int) -> Payment | None:
    """Staff retry a charge that needs attention: processing again, with the same key unless the provider refused it.

    The same key makes a retry safe when the first outcome is unknown (the provider may have
    charged: it answers with that charge instead of making another). Only a key the provider
    refused as reused (`idempotency_key_reused`) is replaced. Call after `look_up_at_provider`,
    holding the order's row lock.
    """
    payment = Payment.objects.select_for_update().filter(order_id=order_id).first()
    if payment is None or not outcome_unknown(payment):
        return payment
    fields = ["status", "failure_reason", "updated_at"]
    if "idempotency_key_reused" in payment.failure_reason:
        payment.idempotency_key = new_idempotency_key()
        fields.append("idempotency_key")
    payment.status = Payment.Status.PROCESSING
    payment.failure_reason = ""
    payment.save(update_fields=fields)
    return payment


def claim_order_payment(*, order: Any) -> Payment:  # an orders.Order: payments does not import orders
    """The order's payment, claimed as processing for its total. Call while holding the order's row lock.

    Its first provider call is counted in the claim (`attempts=1`): the caller makes it next, with
    `call_provider(payment, counted=True)`, so the count commits with the claim instead of on its own.
    The card comes from the order as loaded (select_related("payment_method") saves a read).
    """
    return _claim(
        natural_key={"order": order},
        amount=order.total,
        currency=order.currency,
        payment_method=order.payment_method,
        attempts=1,
    )


# --- Cards ----------------------------------------------------------------------------

CARD_FIELDS = {"number": "card_number", "exp_month": "exp_month", "exp_year": "exp_year", "cvc": "cvc"}


def add_card(*, owner: "User", number: str, exp_month: int, exp_year: int, cvc: str) -> PaymentMethod:
    """Tokenise a card at the provider and keep the token, brand, last four digits and expiry for the owner.

    The number and CVC are passed on and forgotten: never stored, never logged. Raises
    CardRefused for a card the provider refuses, ProviderUnavailable when it cannot answer.
    """
    assert_outside_transaction("tokenising a card")
    try:
        card = provider.tokenize_card(number=number, exp_month=exp_month, exp_year=exp_year, cvc=cvc)
    except provider.InvalidCard as refused:
        raise CardRefused(CARD_FIELDS.get(refused.field, "card_number"), refused.message) from None
    return PaymentMethod.objects.create(
        owner=owner,
        provider_token=card.token,
        brand=card.brand[:20],
        last4=card.last4[-4:],
        exp_month=card.exp_month,
        exp_year=card.exp_year,
    )


def remove_payment_method(*, owner: "User", payment_method_id: int) -> None:
    """Hide a card from its owner; what was paid with it keeps it. Raises UnknownPaymentMethod."""
    removed = PaymentMethod.objects.filter(pk=payment_method_id, owner=owner, removed_at__isnull=True).update(
        removed_at=timezone.now()
    )
    if not removed:
        raise UnknownPaymentMethod("no such payment method")


# --- Subscriptions --------------------------------------------------------------------


def subscribe(*, owner: "User", plan_code: str) -> Subscription:
    """Start a subscription whose first period is due now; its first charge is an outbox item of the same commit.

    One live subscription per owner and plan (a conditional unique constraint decides): a second
    call, a double-submitted form included, returns the live one and charges nothing more.
    """
    plan = Plan.objects.filter(code=plan_code, active=True).first()
    if plan is None:
        raise SubscriptionError(f"unknown plan: {plan_code}")
    today = timezone.localdate()
    live = Subscription.objects.filter(owner=owner, plan=plan).exclude(status=Subscription.Status.CANCELLED)
    try:
        with transaction.atomic():
            if existing := live.first():
                return existing
            subscription = Subscription.objects.create(
                owner=owner, plan=plan, current_period_start=today, current_period_end=today, billing_anchor=today
            )
            outbox.enqueue("payments.tasks.charge_subscription", subscription.pk, today.isoformat())
    except IntegrityError:
        # A concurrent submit won the constraint: its subscription is the answer.
        existing = live.first()
        if existing is None:
            raise
        return existing
    return subscription


class CancelOutcome(NamedTuple):
    subscription: Subscription
    # A charge was in flight when the owner cancelled: it was voided (never sent again).
    voided_charge: bool


def cancel_subscription(*, subscription_id: int, owner: "User") -> CancelOutcome:
    """Cancel the owner's subscription: nothing more is billed; a charge claimed but unfinished is voided.

    Decided under the subscription's row lock, which charge_subscription takes before it claims
    or retries a charge, so the two never both proceed.
    """
    with transaction.atomic():
        subscription = Subscription.objects.select_for_update().get(pk=subscription_id, owner=owner)
        if not subscription.can_cancel:
            raise SubscriptionError("this subscription is already cancelled")
        subscription.status = Subscription.Status.CANCELLED
        subscription.cancelled_at = timezone.now()
        subscription.save(update_fields=["status", "cancelled_at"])
        # In flight: claimed and unfinished, or in needs_attention with its own outcome never learnt.
        in_flight = Q(status=Payment.Status.PROCESSING)
        for reason in OUTCOME_UNKNOWN_REASONS:
            in_flight |= Q(status=Payment.Status.NEEDS_ATTENTION, failure_reason__startswith=reason)
        voided = Payment.objects.filter(in_flight, subscription=subscription).update(
            status=Payment.Status.VOIDED, failure_reason="voided: subscription cancelled", updated_at=timezone.now()
        )
    return CancelOutcome(subscription, bool(voided))


def _parse_period(billing_period: str) -> date:
    # Only `period_start.isoformat()` is accepted: the string is part of the idempotency key,
    # so a second spelling of the same period (`20260301`) would charge it twice.
    return billing.parse_billing_period(billing_period)


CHARGE_SUBSCRIPTION = "payments.tasks.charge_subscription"

# A subscription was cancelled because its period's last try was declined (dunning): sent in its
# transaction, once per subscription (subscription=, payment= the last declined one).
subscription_cancelled_unpaid = Signal()


class UnknownSubscription(ApplicationError):
    """No such subscription among the owner's (someone else's is no different): 404."""

    code = "not_found"
    field = "subscription"
    status = 404


class SubscriptionCancelled(ApplicationError):
    """The subscription is cancelled: its card cannot be changed any more."""

    code = "subscription_cancelled"
    field = "subscription"
    status = 409


def _is_next_attempt(subscription: Subscription, period_start: date, attempt: int) -> bool:
    """Whether `attempt` may be claimed for the period now: the first, or the retry that follows the last decline.

    A retry for an attempt that is no longer the next one (tried already, the period paid, the
    subscription cancelled) claims nothing.
    """
    if attempt == 1:
        return True
    return (
        subscription.status == Subscription.Status.PAST_DUE
        and subscription.current_period_end == period_start
        and subscription.failed_attempts == attempt - 1
    )


def charge_subscription(*, subscription_id: int, billing_period: str, attempt: int = 1) -> Payment | None:
    """Charge one try (`attempt`) of a billing period once, however often it is delivered, while it is live.

    Whether to charge is decided under the subscription's row lock (cancel_subscription takes
    it too): a cancelled subscription claims nothing and voids a claimed, unfinished charge
    instead of retrying it; a retry (attempt 2, ...) is claimed only while it is the next try of
    the past-due period (payments/dunning.py). Each try is its own Payment with its own key.
    Success moves the period forward; a decline makes it past_due, or cancels it after the last try.
    """
    period_start = _parse_period(billing_period)
    if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 1:
        raise SubscriptionError(f"attempt must be a positive integer, got {attempt!r}")
    with transaction.atomic():
        subscription = (
            Subscription.objects.select_for_update().select_related("plan").filter(pk=subscription_id).first()
        )
        if subscription is None:
            logger.warning("charge_subscription: subscription %s does not exist", subscription_id)
            return None
        payment = Payment.objects.filter(
            subscription=subscription, billing_period=billing_period, attempt=attempt
        ).first()
        cancelled = subscription.status == Subscription.Status.CANCELLED
        if payment is None:
            if cancelled or not _is_next_attempt(subscription, period_start, attempt):
                return None
            payment = _claim(
                natural_key={"subscription": subscription, "billing_period": billing_period, "attempt": attempt},
                amount=subscription.plan.price,
                currency=subscription.plan.currency,
                payment_method_id=subscription.payment_method_id,
            )
        elif cancelled and payment.status == Payment.Status.PROCESSING:
            payment.status = Payment.Status.VOIDED
            payment.failure_reason = "voided: subscription cancelled"
            payment.save(update_fields=["status", "failure_reason", "updated_at"])
            return payment
    if payment.status not in Payment.FINAL:
        payment = settle_payment(payment_id=payment.pk)
    # Also for an outcome recorded before: its worker may have died before applying it.
    with transaction.atomic():
        _apply_to_subscription(subscription.pk, payment, period_start)
    return payment


def _first_decline_at(subscription: Subscription, payment: Payment) -> datetime:
    """When the period's first try was declined: the time its decline was recorded (a declined payment is final,
    never written again)."""
    if payment.attempt == 1:
        return payment.updated_at
    first = Payment.objects.filter(
        subscription=subscription, billing_period=payment.billing_period, attempt=1
    ).values_list("updated_at", flat=True)
    return first.first() or payment.updated_at


def _apply_to_subscription(subscription_id: int, payment: Payment, period_start: date) -> None:
    """Move the subscription on by its payment's outcome, once per try. Call inside a transaction.

    A success for the period that is due moves the period forward, makes the subscription active
    and clears the dunning count. A decline of try n for it makes it past_due with the next try's
    time (payments/dunning.py), or, after the last try, cancels it (and tells the owner, once).
    An outcome applied before changes nothing.
    """
    if payment.status not in (Payment.Status.SUCCEEDED, Payment.Status.DECLINED):
        return
    subscription = Subscription.objects.select_for_update().select_related("plan").get(pk=subscription_id)
    if subscription.status == Subscription.Status.CANCELLED or subscription.current_period_end > period_start:
        return  # cancelled, or this period's outcome was applied already
    fields = ["status", "failed_attempts", "next_retry_at"]
    gave_up = False
    if payment.status == Payment.Status.SUCCEEDED:
        # A subscription from before billing_anchor existed is anchored on the period it was last billed for.
        subscription.billing_anchor = subscription.billing_anchor or subscription.current_period_start
        subscription.current_period_start = period_start
        subscription.current_period_end = subscription.plan.period_after(
            period_start, anchor=subscription.billing_anchor
        )
        subscription.status = Subscription.Status.ACTIVE
        subscription.failed_attempts, subscription.next_retry_at = 0, None
        fields += ["current_period_start", "current_period_end", "billing_anchor"]
    elif payment.attempt <= subscription.failed_attempts:
        return  # this try's decline was applied already
    else:
        subscription.failed_attempts = payment.attempt
        subscription.next_retry_at = dunning.next_retry_at(
            first_decline_at=_first_decline_at(subscription, payment), failed_attempts=payment.attempt
        )
        if payment.payment_method_id != subscription.payment_method_id:
            # The owner changed the card while this try was charging the old one: the new card is
            # tried at once, also after what would have been the last try (its change found the
            # try's item still open, so it could not enqueue one of its own).
            subscription.next_retry_at = timezone.now()
            subscription.status = Subscription.Status.PAST_DUE
            _enqueue_next_attempt(subscription)
        elif subscription.next_retry_at is None:
            gave_up = True
            subscription.status = Subscription.Status.CANCELLED
            subscription.cancelled_at = timezone.now()
            fields.append("cancelled_at")
        else:
            subscription.status = Subscription.Status.PAST_DUE
    subscription.save(update_fields=fields)
    subscription_charged.send(sender=Payment, payment=payment, subscription=subscription)
    if gave_up:
        logger.info("subscription %s cancelled: its renewal was declined %s times", subscription.pk, payment.attempt)
        subscription_cancelled_unpaid.send(sender=Subscription, subscription=subscription, payment=payment)


def bill_due_subscriptions(*, today: date | None = None) -> list[tuple[int, str]]:
    """An outbox item charging each active subscription whose next period has started, unless one is open already.

    Only the first try (attempt 1, the two-argument message): a past-due period's retries are
    retry_due_renewals' (payments/dunning.py), so the two never charge the same try.
    """
    today = today or timezone.localdate()
    due = list(
        Subscription.objects.filter(status=Subscription.Status.ACTIVE, current_period_end__lte=today)
        .order_by("id")
        .values_list("id", "current_period_end")
    )
    # A period whose payment ended without its outcome being applied (needs attention, voided) is left to staff.
    settled = set(
        Payment.objects.filter(subscription_id__in=[pk for pk, _ in due])
        .exclude(status=Payment.Status.PROCESSING)
        .values_list("subscription_id", "billing_period")
    )
    dispatched = []
    with transaction.atomic():
        for subscription_id, period_start in due:
            if (subscription_id, period_start.isoformat()) in settled:
                continue
            if outbox.enqueue_once(CHARGE_SUBSCRIPTION, subscription_id, period_start.isoformat()):
                dispatched.append((subscription_id, period_start.isoformat()))
    return dispatched


def _enqueue_next_attempt(subscription: Subscription) -> tuple[int, str, int] | None:
    """The outbox item of the past-due period's next try, unless one is open already. Call holding the row lock."""
    args = (subscription.pk, subscription.current_period_end.isoformat(), subscription.failed_attempts + 1)
    return args if outbox.enqueue_once(CHARGE_SUBSCRIPTION, *args) else None


def retry_due_renewals(*, now: datetime | None = None) -> list[tuple[int, str, int]]:
    """An outbox item for the next try of each past-due subscription whose retry time has come (beat).

    One item per try: a sweep that runs again while it is open adds nothing. A try whose payment
    ended without a decline (needs attention) is left to staff, as bill_due_subscriptions leaves it.
    """
    now = now or timezone.now()
    due = Subscription.objects.filter(
        status=Subscription.Status.PAST_DUE, next_retry_at__lte=now, failed_attempts__gte=1
    ).order_by("id")
    dispatched = []
    for subscription_id in due.values_list("id", flat=True):
        with transaction.atomic():
            subscription = (
                Subscription.objects.select_for_update()
                .filter(pk=subscription_id, status=Subscription.Status.PAST_DUE, next_retry_at__lte=now)
                .first()
            )
            if subscription is None:
                continue  # paid, cancelled or tried meanwhile
            tried = Payment.objects.filter(
                subscription=subscription,
                billing_period=subscription.current_period_end.isoformat(),
                attempt=subscription.failed_attempts + 1,
            ).exclude(status=Payment.Status.PROCESSING)
            if tried.exists():
                continue
            if args := _enqueue_next_attempt(subscription):
                dispatched.append(args)
    return dispatched


def set_subscription_payment_method(*, owner: "User", subscription_id: int, payment_method_id: int) -> Subscription:
    """Charge the owner's subscription to another of their cards; a past-due one is tried again at once with it.

    The retry is the period's next try (payments/dunning.py), an outbox item of the same commit,
    decided under the subscription's row lock: a second submit while it is open adds nothing.
    Raises UnknownSubscription or UnknownPaymentMethod (another owner's, a removed card: 404),
    SubscriptionCancelled.
    """
    with transaction.atomic():
        subscription = (
            Subscription.objects.select_for_update().select_related("plan").filter(pk=subscription_id, owner=owner)
        ).first()
        if subscription is None:
            raise UnknownSubscription("no such subscription")
        payment_method = PaymentMethod.objects.filter(
            pk=payment_method_id, owner=owner, removed_at__isnull=True
        ).first()
        if payment_method is None:
            raise UnknownPaymentMethod("no such payment method")
        if subscription.status == Subscription.Status.CANCELLED:
            raise SubscriptionCancelled("this subscription is cancelled")
        subscription.payment_method = payment_method
        subscription.save(update_fields=["payment_method"])
        if subscription.retries_on_card_change:
            _enqueue_next_attempt(subscription)
    return subscription


# --- Webhooks -------------------------------------------------------------------------


def receive_webhook(*, body: bytes, signature_header: str, secret: str, tolerance: int) -> tuple[WebhookEvent, bool]:
    """Verify and store a provider event once; dispatch its processing after commit.

    Returns the event and whether it was new. A replayed event id is a no-op.
    """
    if not signature_header:
        raise WebhookRejected("missing signature header")
    verify_signature(secret=secret, body=body, header=signature_header, tolerance=tolerance)
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise WebhookRejected("body is not JSON") from exc
    if (
        not isinstance(payload, dict)
        or not isinstance(payload.get("id"), str)
        or not isinstance(payload.get("type"), str)
    ):
        raise WebhookRejected("body must be an object with string id and type")
    if not 0 < len(payload["id"]) <= 100 or len(payload["type"]) > 100:
        raise WebhookRejected("id or type has an invalid length")
    with transaction.atomic():
        event, created = WebhookEvent.objects.get_or_create(
            provider_event_id=payload["id"], defaults={"type": payload["type"], "payload": payload}
        )
        if created:
            outbox.enqueue("payments.tasks.process_webhook", event.pk)
    return event, created


HANDLED_EVENTS = ("charge.succeeded", "charge.declined")


def process_webhook(*, event_id: int) -> WebhookEvent | None:
    """Reconcile our Payment with the charge the event names, as the provider reports it.

    Raises InvalidWebhookEvent for an event we cannot act on (never worth a retry) and
    provider.ProviderUnavailable when the provider cannot be asked (retry).
    """
    event = WebhookEvent.objects.filter(pk=event_id).first()
    if event is None or event.status == WebhookEvent.Status.PROCESSED:
        return event
    if event.type in refunds.REFUND_EVENTS:
        return _process_refund_event(event)
    try:
        charge_id = _validated_charge_id(event)
    except InvalidWebhookEvent as exc:
        WebhookEvent.objects.filter(pk=event.pk).update(status=WebhookEvent.Status.INVALID, error=str(exc)[:500])
        raise
    charge = provider.retrieve_charge(charge_id=charge_id)
    payment = Payment.objects.filter(provider_charge_id=charge.id).first()
    if payment is None:
        payment = Payment.objects.filter(idempotency_key=charge.reference).first()
    with transaction.atomic():
        if payment is not None and (
            payment.status in (Payment.Status.PROCESSING, Payment.Status.VOIDED) or outcome_unknown(payment)
        ):
            # Our own task crashed between the provider's answer and our commit: finish it, checked as
            # every outcome is (amount, currency, reference).
            payment = record_outcome(payment.pk, charge)
            if payment.subscription_id:
                _apply_to_subscription(payment.subscription_id, payment, date.fromisoformat(payment.billing_period))
            # The order's side follows its payment (orders.pipeline listens): payments never calls orders.
            payment_settled.send(sender=Payment, payment=payment)
        WebhookEvent.objects.filter(pk=event.pk).update(
            status=WebhookEvent.Status.PROCESSED, processed_at=timezone.now()
        )
    event.refresh_from_db()
    return event


def _process_refund_event(event: WebhookEvent) -> WebhookEvent:
    try:
        refunds.process_refund_event(event)
    except ApplicationError as exc:
        WebhookEvent.objects.filter(pk=event.pk).update(status=WebhookEvent.Status.INVALID, error=str(exc)[:500])
        raise InvalidWebhookEvent(str(exc)) from exc
    WebhookEvent.objects.filter(pk=event.pk).update(status=WebhookEvent.Status.PROCESSED, processed_at=timezone.now())
    event.refresh_from_db()
    return event


def _validated_charge_id(event: WebhookEvent) -> str:
    if event.type not in HANDLED_EVENTS:
        raise InvalidWebhookEvent(f"unhandled event type {event.type!r}")
    data = event.payload.get("data")
    charge = data.get("charge") if isinstance(data, dict) else None
    charge_id = charge.get("id") if isinstance(charge, dict) else None
    if not isinstance(charge_id, str) or not charge_id or len(charge_id) > 100:
        raise InvalidWebhookEvent("event has no data.charge.id")
    return charge_id
