"""Charging orders and subscriptions, exactly once, and taking the provider's webhooks.

A charge is never made inside a transaction. It is claimed first (a committed
`processing` Payment whose idempotency key is unique), then the provider is called
with that stable key, then the outcome is recorded. A redelivery of the same work
finds the claimed row and finishes it with the same key: the provider answers with
the charge it already made instead of making a second one.
"""

import hashlib
import hmac
import json
import logging
import time
from datetime import date

from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.db.models import F
from django.utils import timezone

from orders import services as order_services
from orders.models import Order

from . import gateway
from .models import Payment, Plan, Subscription, WebhookEvent

logger = logging.getLogger(__name__)


class SubscriptionError(Exception):
    pass


class WebhookRejected(Exception):
    """The webhook request is not from the provider or not well-formed; nothing is stored."""


# --- Claim, call, record -------------------------------------------------------------


def _claim(*, key: str, **fields) -> Payment:
    """The Payment for this idempotency key, created as `processing` if it does not exist yet.

    Under concurrent calls the unique constraint decides; the losers read the winner's row.
    """
    try:
        with transaction.atomic():
            return Payment.objects.create(idempotency_key=key, **fields)
    except IntegrityError:
        return Payment.objects.get(idempotency_key=key)


def _call_provider(payment: Payment) -> gateway.Charge | gateway.CardDeclined:
    """Charge through the provider with the payment's key; a decline is returned, transient errors raise."""
    # F(): two deliveries of the same work (a retry and a sweep re-dispatch) must not lose a count.
    Payment.objects.filter(pk=payment.pk).update(attempts=F("attempts") + 1, updated_at=timezone.now())
    try:
        return gateway.charge(
            amount=payment.amount,
            currency=payment.currency,
            # The reference is the key too, so a webhook leads straight back to its Payment.
            reference=payment.idempotency_key,
            idempotency_key=payment.idempotency_key,
        )
    except gateway.CardDeclined as declined:
        return declined


def _record(payment_id: int, outcome: gateway.Charge | gateway.CardDeclined) -> Payment:
    """Write the provider's answer onto the payment. Call inside a transaction."""
    payment = Payment.objects.select_for_update().get(pk=payment_id)
    if payment.status in Payment.FINAL:
        return payment
    if isinstance(outcome, gateway.CardDeclined):
        payment.status = Payment.Status.DECLINED
        payment.provider_charge_id = outcome.charge_id
        payment.failure_reason = outcome.reason
    else:
        payment.status = Payment.Status.SUCCEEDED
        payment.provider_charge_id = outcome.id
    payment.save(update_fields=["status", "provider_charge_id", "failure_reason", "updated_at"])
    return payment


# --- Orders ---------------------------------------------------------------------------


def charge_order(*, order_id: int) -> Payment | None:
    """Charge a confirmed order once (key `order-<id>`): -> paid, or -> payment_failed with stock released.

    Raises gateway.ProviderUnavailable when the provider could not answer; retrying is safe.
    """
    with transaction.atomic():
        # Claim under the order's lock: cancel_order takes the same lock and refuses once a payment exists.
        order = Order.objects.select_for_update().filter(pk=order_id).first()
        if order is None:
            logger.warning("charge_order: order %s does not exist", order_id)
            return None
        payment = Payment.objects.filter(order=order).first()
        if payment is None:
            if order.status != Order.Status.CONFIRMED:
                return None
            payment = _claim(key=f"order-{order.pk}", order=order, amount=order.total, currency=order.currency)
    if payment.status not in Payment.FINAL:
        outcome = _call_provider(payment)
        with transaction.atomic():
            payment = _record(payment.pk, outcome)
    if payment.status == Payment.Status.SUCCEEDED:
        order_services.mark_paid(order_id=order.pk)
    else:
        order_services.fail_payment(order_id=order.pk, reason=payment.failure_reason)
    return payment


# --- Subscriptions --------------------------------------------------------------------


def subscribe(*, owner, plan_code: str) -> Subscription:
    """Start a subscription whose first period is due now; its first charge is dispatched after commit."""
    from . import tasks

    plan = Plan.objects.filter(code=plan_code, active=True).first()
    if plan is None:
        raise SubscriptionError(f"unknown plan: {plan_code}")
    today = timezone.localdate()
    with transaction.atomic():
        if Subscription.objects.filter(owner=owner, plan=plan).exclude(status=Subscription.Status.CANCELLED).exists():
            raise SubscriptionError(f"already subscribed to {plan.name}")
        subscription = Subscription.objects.create(
            owner=owner, plan=plan, current_period_start=today, current_period_end=today
        )
        tasks.charge_subscription.delay_on_commit(subscription.pk, today.isoformat())
    return subscription


def cancel_subscription(*, subscription_id: int, owner) -> Subscription:
    """Cancel the owner's subscription: nothing more is billed."""
    with transaction.atomic():
        subscription = Subscription.objects.select_for_update().get(pk=subscription_id, owner=owner)
        if not subscription.can_cancel:
            raise SubscriptionError("this subscription is already cancelled")
        subscription.status = Subscription.Status.CANCELLED
        subscription.cancelled_at = timezone.now()
        subscription.save(update_fields=["status", "cancelled_at"])
    return subscription


def _parse_period(billing_period: str) -> date:
    try:
        return date.fromisoformat(billing_period)
    except (TypeError, ValueError) as exc:
        raise ValidationError(f"billing_period must be an ISO date, got {billing_period!r}") from exc


def charge_subscription(*, subscription_id: int, billing_period: str) -> Payment | None:
    """Charge one billing period once (key `sub-<id>-<period>`), however often it is delivered.

    Success moves the subscription's period forward; a decline makes it past_due.
    """
    period_start = _parse_period(billing_period)
    subscription = Subscription.objects.select_related("plan").filter(pk=subscription_id).first()
    if subscription is None:
        logger.warning("charge_subscription: subscription %s does not exist", subscription_id)
        return None
    # Check before act: a finished payment for this period ends the work.
    payment = Payment.objects.filter(subscription=subscription, billing_period=billing_period).first()
    if payment is None:
        if subscription.status == Subscription.Status.CANCELLED:
            return None
        payment = _claim(
            key=f"sub-{subscription.pk}-{billing_period}",
            subscription=subscription,
            billing_period=billing_period,
            amount=subscription.plan.price,
            currency=subscription.plan.currency,
        )
    if payment.status not in Payment.FINAL:
        outcome = _call_provider(payment)
        with transaction.atomic():
            payment = _record(payment.pk, outcome)
            _apply_to_subscription(subscription.pk, payment, period_start)
    return payment


def _apply_to_subscription(subscription_id: int, payment: Payment, period_start: date) -> None:
    subscription = Subscription.objects.select_for_update().select_related("plan").get(pk=subscription_id)
    if subscription.status == Subscription.Status.CANCELLED:
        return
    if payment.status == Payment.Status.SUCCEEDED:
        if subscription.current_period_end <= period_start:
            subscription.current_period_start = period_start
            subscription.current_period_end = subscription.plan.period_after(period_start)
        subscription.status = Subscription.Status.ACTIVE
    else:
        subscription.status = Subscription.Status.PAST_DUE
    subscription.save(update_fields=["status", "current_period_start", "current_period_end"])
    from notifications import services as notifications

    kind = notifications.SUBSCRIPTION_PAYMENT_KINDS.get(payment.status)
    if kind:
        notifications.notify(kind=kind, object_type="payment", object_id=payment.pk, recipient_id=subscription.owner_id)


def bill_due_subscriptions(*, today: date | None = None) -> list[tuple[int, str]]:
    """Dispatch charge_subscription for every active subscription whose next period has started."""
    from . import tasks

    today = today or timezone.localdate()
    due = list(
        Subscription.objects.filter(status=Subscription.Status.ACTIVE, current_period_end__lte=today)
        .order_by("id")
        .values_list("id", "current_period_end")
    )
    for subscription_id, period_start in due:
        tasks.charge_subscription.delay(subscription_id, period_start.isoformat())
    return [(subscription_id, period_start.isoformat()) for subscription_id, period_start in due]


# --- Webhooks -------------------------------------------------------------------------


def _verify_signature(*, secret: str, body: bytes, header: str, tolerance: int, now: float | None = None) -> None:
    parts = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    try:
        timestamp = int(parts["t"])
        signature = parts["v1"]
    except (KeyError, ValueError) as exc:
        raise WebhookRejected("malformed signature header") from exc
    now = time.time() if now is None else now
    if abs(now - timestamp) > tolerance:
        raise WebhookRejected("signature timestamp outside the tolerance")
    expected = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, signature):
        raise WebhookRejected("signature does not match")


def receive_webhook(*, body: bytes, signature_header: str, secret: str, tolerance: int) -> tuple[WebhookEvent, bool]:
    """Verify and store a provider event once; dispatch its processing after commit.

    Returns the event and whether it was new. A replayed event id is a no-op.
    """
    from . import tasks

    if not signature_header:
        raise WebhookRejected("missing signature header")
    _verify_signature(secret=secret, body=body, header=signature_header, tolerance=tolerance)
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
            tasks.process_webhook.delay_on_commit(event.pk)
    return event, created


HANDLED_EVENTS = ("charge.succeeded", "charge.declined")


def process_webhook(*, event_id: int) -> WebhookEvent | None:
    """Reconcile our Payment with the charge the event names, as the provider reports it.

    Raises ValidationError for an event we cannot act on (never worth a retry) and
    gateway.ProviderUnavailable when the provider cannot be asked (retry).
    """
    event = WebhookEvent.objects.filter(pk=event_id).first()
    if event is None or event.status == WebhookEvent.Status.PROCESSED:
        return event
    try:
        charge_id = _validated_charge_id(event)
    except ValidationError as exc:
        WebhookEvent.objects.filter(pk=event.pk).update(status=WebhookEvent.Status.INVALID, error=str(exc)[:500])
        raise
    charge = gateway.retrieve_charge(charge_id=charge_id)
    payment = Payment.objects.filter(provider_charge_id=charge.id).first()
    if payment is None:
        payment = Payment.objects.filter(idempotency_key=charge.reference).first()
    if payment is not None and payment.status == Payment.Status.PROCESSING:
        # Our own task crashed between the provider's answer and our commit: finish it.
        outcome = charge if charge.status == "succeeded" else gateway.CardDeclined(charge.id, "card_declined")
        with transaction.atomic():
            payment = _record(payment.pk, outcome)
            if payment.subscription_id:
                _apply_to_subscription(payment.subscription_id, payment, date.fromisoformat(payment.billing_period))
        if payment.order_id:
            charge_order(order_id=payment.order_id)
    WebhookEvent.objects.filter(pk=event.pk).update(status=WebhookEvent.Status.PROCESSED, processed_at=timezone.now())
    event.refresh_from_db()
    return event


def _validated_charge_id(event: WebhookEvent) -> str:
    if event.type not in HANDLED_EVENTS:
        raise ValidationError(f"unhandled event type {event.type!r}")
    data = event.payload.get("data")
    charge = data.get("charge") if isinstance(data, dict) else None
    charge_id = charge.get("id") if isinstance(charge, dict) else None
    if not isinstance(charge_id, str) or not charge_id or len(charge_id) > 100:
        raise ValidationError("event has no data.charge.id")
    return charge_id
