"""Regressions the stateful model (tests/test_model_stateful.py) found, each as a short fixed sequence of steps."""

import contextlib
import json
import time
import uuid

import pytest
from django.conf import settings

from core import outbox
from core.models import OutboxItem
from integrations.errors import ProviderUnavailable
from orders import services as order_services
from orders.models import Order
from payments import services as payment_services
from payments.models import Payment, Subscription
from sandbox.signing import sign
from tests.factories import PlanFactory, ProductFactory, UserFactory

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("broker")]


def deliver_event_of(sandbox, charge_id: str) -> None:
    """Receive and process, as the webhook view and its task would, the event the provider made for the charge."""
    [event] = sandbox.get("/v1/events", charge_id=charge_id).json()["data"]
    body = json.dumps(event["payload"]).encode()
    stored, _ = payment_services.receive_webhook(
        body=body,
        signature_header=sign(settings.WEBHOOK_SECRET, body, int(time.time())),
        secret=settings.WEBHOOK_SECRET,
        tolerance=settings.WEBHOOK_TOLERANCE_SECONDS,
    )
    payment_services.process_webhook(event_id=stored.pk)


def an_order_whose_charge_fails(sandbox, fault: str = "fail_after_charge_next"):
    """A confirmed order (2 x EUR 12.50) whose charge step failed: the provider charged and the answer was lost
    (`fail_after_charge_next`), or the call never reached it (`fail_next`)."""
    product = ProductFactory(sku="MUG", price="12.50", stock=5)
    order = order_services.place_order(owner=UserFactory(), items=[("MUG", 2)])
    order_services.process_order(order_id=order.pk)
    sandbox.set_faults(**{fault: 1})
    with pytest.raises(ProviderUnavailable):
        order_services.charge_order(order_id=order.pk)
    return product, order, Payment.objects.get(order=order)


def a_subscription_whose_first_charge_answer_was_lost(sandbox):
    """A monthly subscription whose first period the provider charged, the answer lost on the way back."""
    owner = UserFactory()
    subscription = payment_services.subscribe(owner=owner, plan_code=PlanFactory(code="monthly").code)
    period = subscription.current_period_start.isoformat()
    sandbox.set_faults(fail_after_charge_next=1)
    with pytest.raises(ProviderUnavailable):
        payment_services.charge_subscription(subscription_id=subscription.pk, billing_period=period)
    return owner, subscription, period, Payment.objects.get(subscription=subscription)


def test_staff_cannot_fail_an_order_the_provider_was_paid_for(sandbox):
    # Given a confirmed order whose charge answer was lost: the provider charged, the shop did not hear it
    product, order, payment = an_order_whose_charge_fails(sandbox)
    [charge] = sandbox.charges(reference=payment.idempotency_key)
    # and the provider's webhook then recorded the payment as succeeded (the charge step has not applied it yet)
    deliver_event_of(sandbox, charge["id"])
    payment.refresh_from_db()
    assert payment.status == Payment.Status.SUCCEEDED

    # When the charge task's retries run out (the outbox's work_failed puts the order on hold)
    order_services.hold_stuck_order(order_id=order.pk, task_name="orders.tasks.charge_order", reason="retries spent")
    # and staff, reading "payment could not be completed", give up on the charge
    with contextlib.suppress(order_services.OrderError):
        order_services.fail_held_order(order_id=order.pk)

    # Then the order the shopper paid for is not failed, nor its stock given back
    order.refresh_from_db()
    product.refresh_from_db()
    payment.refresh_from_db()
    assert payment.status == Payment.Status.SUCCEEDED
    assert order.status != Order.Status.PAYMENT_FAILED, "the provider holds EUR 25.00 for an order the shop failed"
    assert product.stock == 3


def test_cancelling_while_a_charge_outcome_is_unknown_never_records_a_later_charge_as_a_plain_success(sandbox):
    # Given a subscription whose first charge reached the provider (it charged) but whose answer was lost,
    owner, subscription, period, payment = a_subscription_whose_first_charge_answer_was_lost(sandbox)
    # and whose charge task then failed for good (retries spent: the outbox's work_failed, as the worker sends it)
    [item] = OutboxItem.objects.filter(task_name="payments.tasks.charge_subscription", args=[subscription.pk, period])
    failed, parked = outbox.finish_failed(task_id=str(item.task_id), reason="ProviderUnavailable: retries spent")
    outbox.work_failed.send(sender=OutboxItem, item=failed, reason=failed.last_error, by_relay=False, parked=parked)
    payment = Payment.objects.get(subscription=subscription)
    assert payment.status == Payment.Status.NEEDS_ATTENTION  # "unfinished": its outcome is unknown

    # When the owner cancels (told whether a charge was in flight) and the provider's webhook arrives afterwards
    outcome = payment_services.cancel_subscription(subscription_id=subscription.pk, owner=owner)
    [charge] = sandbox.charges(reference=payment.idempotency_key)
    deliver_event_of(sandbox, charge["id"])

    # Then the money taken after the owner was told "nothing in flight" is not booked as a plain success:
    # either the cancel voided the unfinished charge (and said so) and the late charge is a refund for staff,
    # or the cancel reported it in flight.
    payment.refresh_from_db()
    subscription.refresh_from_db()
    assert subscription.status == Subscription.Status.CANCELLED
    assert outcome.voided_charge or payment.status != Payment.Status.SUCCEEDED, (
        f"cancel said no charge was in flight, then the provider's charge was recorded {payment.status}"
    )
    assert payment.status == Payment.Status.NEEDS_ATTENTION, payment.status


def a_foreign_charge_under(sandbox, payment: Payment) -> str:
    """Someone else's charge of another amount, with our payment's key as its reference; its webhook is received."""
    response = sandbox.charge(
        key=f"foreign_{uuid.uuid4().hex}", reference=payment.idempotency_key, amount=str(payment.amount + 1)
    )
    assert response.status_code == 201, response.text
    deliver_event_of(sandbox, response.json()["id"])
    return response.json()["id"]


def test_a_charge_of_another_amount_under_our_reference_does_not_hide_our_own_charge_from_staff(sandbox):
    # Given an order whose own charge the provider made (answer lost), and a charge of another amount
    # under its reference whose webhook made the payment "mismatch" (needs attention)
    product, order, payment = an_order_whose_charge_fails(sandbox)
    foreign = a_foreign_charge_under(sandbox, payment)
    payment.refresh_from_db()
    assert payment.status == Payment.Status.NEEDS_ATTENTION and payment.failure_reason.startswith("mismatch:")

    # When the charge task's retries run out and staff give up on the charge
    order_services.hold_stuck_order(order_id=order.pk, task_name="orders.tasks.charge_order", reason="retries spent")
    with pytest.raises(order_services.PaymentTaken):
        order_services.fail_held_order(order_id=order.pk)

    # Then the provider's own charge under our key is found: the order is paid, its stock kept
    order.refresh_from_db()
    product.refresh_from_db()
    payment.refresh_from_db()
    [own] = [c for c in sandbox.charges(reference=payment.idempotency_key) if c["id"] != foreign]
    assert payment.status == Payment.Status.SUCCEEDED
    assert payment.provider_charge_id == own["id"]
    assert order.status != Order.Status.PAYMENT_FAILED, "the provider holds EUR 25.00 for an order the shop failed"
    assert product.stock == 3


def test_staff_can_fail_an_order_whose_only_charge_under_its_reference_is_someone_elses(sandbox):
    # Given an order whose charge never reached the provider, and someone else's charge under its reference
    product, order, payment = an_order_whose_charge_fails(sandbox, "fail_next")
    a_foreign_charge_under(sandbox, payment)

    # When staff give up on the held charge
    order_services.hold_stuck_order(order_id=order.pk, task_name="orders.tasks.charge_order", reason="retries spent")
    order_services.fail_held_order(order_id=order.pk)

    # Then the order fails and its stock comes back; the foreign charge stays for staff (needs attention)
    order.refresh_from_db()
    product.refresh_from_db()
    payment.refresh_from_db()
    assert order.status == Order.Status.PAYMENT_FAILED
    assert product.stock == 5
    assert payment.status == Payment.Status.NEEDS_ATTENTION and payment.failure_reason.startswith("mismatch:")


def test_our_own_charge_arriving_after_a_foreign_one_under_its_reference_pays_the_order(sandbox):
    # Given an order whose charge answer was lost, and a foreign charge under its reference received first
    product, order, payment = an_order_whose_charge_fails(sandbox)
    a_foreign_charge_under(sandbox, payment)
    payment.refresh_from_db()
    assert payment.failure_reason.startswith("mismatch:")

    # When the provider's event for our own charge arrives
    [own] = [
        c for c in sandbox.charges(reference=payment.idempotency_key) if c["idempotency_key"] == payment.idempotency_key
    ]
    deliver_event_of(sandbox, own["id"])
    # and the charge step it hands on runs
    assert OutboxItem.objects.filter(task_name="orders.tasks.charge_order", args=[order.pk]).exists()
    order_services.charge_order(order_id=order.pk)

    # Then the payment is our charge's and the order is paid
    payment.refresh_from_db()
    order.refresh_from_db()
    assert (payment.status, payment.provider_charge_id) == (Payment.Status.SUCCEEDED, own["id"])
    assert order.status == Order.Status.PAID


def test_cancelling_a_subscription_whose_charge_met_a_foreign_one_voids_it(sandbox):
    # Given a subscription whose first charge's answer was lost, and a foreign charge under its reference
    owner, subscription, period, payment = a_subscription_whose_first_charge_answer_was_lost(sandbox)
    a_foreign_charge_under(sandbox, payment)

    # When the owner cancels and then our own charge's event arrives
    outcome = payment_services.cancel_subscription(subscription_id=subscription.pk, owner=owner)
    [own] = [
        c for c in sandbox.charges(reference=payment.idempotency_key) if c["idempotency_key"] == payment.idempotency_key
    ]
    deliver_event_of(sandbox, own["id"])

    # Then the cancel said a charge was in flight, and the money taken is a refund for staff, not a success
    payment.refresh_from_db()
    assert outcome.voided_charge
    assert payment.status == Payment.Status.NEEDS_ATTENTION
    assert payment.failure_reason.startswith("charged after it was voided")


def test_a_foreign_charge_processed_after_a_cancel_does_not_unvoid_the_payment(sandbox):
    # Given a subscription whose first charge the provider made (answer lost), and the owner cancelling it
    owner, subscription, period, payment = a_subscription_whose_first_charge_answer_was_lost(sandbox)
    assert payment_services.cancel_subscription(subscription_id=subscription.pk, owner=owner).voided_charge

    # When someone else's charge under its reference is processed, then our own charge's event
    a_foreign_charge_under(sandbox, payment)
    payment.refresh_from_db()
    assert payment.status == Payment.Status.VOIDED, "a foreign charge is no news about our own charge"
    [own] = [
        c for c in sandbox.charges(reference=payment.idempotency_key) if c["idempotency_key"] == payment.idempotency_key
    ]
    deliver_event_of(sandbox, own["id"])

    # Then the money taken after the cancellation is a refund for staff, never a plain success
    payment.refresh_from_db()
    assert payment.status == Payment.Status.NEEDS_ATTENTION, payment.status
    assert payment.failure_reason.startswith("charged after it was voided")
