"""Two actors at once against the real PostgreSQL (threads, each on its own connection)."""

from datetime import timedelta

import pytest
from django.db import transaction
from django.utils import timezone

from core import outbox
from core.models import OutboxItem
from integrations.errors import ProviderUnavailable
from orders.models import Order
from orders.services import (
    OrderNotCancellable,
    cancel_order,
    charge_order,
    hold_stuck_order,
    place_order,
    process_order,
    retry_held_order,
)
from payments import services
from payments.models import Payment, Subscription, WebhookEvent
from tests.concurrency import run_concurrently
from tests.factories import PlanFactory, ProductFactory, SubscriptionFactory, UserFactory

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("broker")]


def test_cancel_order_racing_charge_order_never_cancels_a_charged_order(sandbox):
    sandbox.set_faults(latency_ms=150)
    product = ProductFactory(sku="RACE", price="5.00", stock=100)
    for _ in range(6):
        owner = UserFactory()
        order = process_order(order_id=place_order(owner=owner, items=[("RACE", 2)]).pk)

        def act(i, order=order, owner=owner):
            if i == 0:
                return charge_order(order_id=order.pk)
            try:
                return cancel_order(order_id=order.pk, owner=owner)
            except OrderNotCancellable:
                return "refused"

        run_concurrently(2, act)
        order.refresh_from_db()
        payments = list(Payment.objects.filter(order=order))
        if order.status == Order.Status.CANCELLED:
            assert payments == []
        else:
            assert order.status == Order.Status.PAID and [p.status for p in payments] == ["succeeded"]
    product.refresh_from_db()
    paid = Order.objects.filter(status=Order.Status.PAID).count()
    assert product.stock == 100 - 2 * paid
    assert sandbox.summary()["charges"]["total"] == paid


def test_cancel_subscription_racing_its_charge_never_charges_silently(sandbox):
    sandbox.set_faults(latency_ms=150)
    plan = PlanFactory(code="race", name="Race", price="9.00")
    today = timezone.localdate()
    for i in range(6):
        owner = UserFactory()
        subscription = SubscriptionFactory(owner=owner, plan=plan, current_period_start=today)

        def act(i, subscription=subscription, owner=owner):
            if i == 0:
                return services.charge_subscription(subscription_id=subscription.pk, billing_period=today.isoformat())
            return services.cancel_subscription(subscription_id=subscription.pk, owner=owner)

        _, outcome = run_concurrently(2, act)
        payment = Payment.objects.filter(subscription=subscription).first()
        charged = payment is not None and any(
            c["status"] == "succeeded" for c in sandbox.charges(reference=payment.idempotency_key)
        )
        if charged:
            # Money taken: the shop knows it (succeeded before the cancellation, or a refund to make after it).
            assert payment.status in (Payment.Status.SUCCEEDED, Payment.Status.NEEDS_ATTENTION)
            if payment.status == Payment.Status.NEEDS_ATTENTION:
                assert outcome.voided_charge
        subscription.refresh_from_db()
        assert subscription.status == Subscription.Status.CANCELLED


def test_two_relays_at_once_publish_each_item_once(broker):
    with transaction.atomic():
        items = [outbox.enqueue("notifications.tasks.send_notification", n, delay=60) for n in range(60)]
    OutboxItem.objects.update(next_attempt_at=timezone.now() - timedelta(seconds=1))

    run_concurrently(4, lambda i: outbox.relay())

    import json

    ids = [json.loads(raw)["headers"]["id"] for raw in broker.lrange("default", 0, -1)]
    assert sorted(ids) == sorted(str(item.task_id) for item in items)


def test_staff_retry_racing_the_late_webhook_of_the_same_charge_charges_once(client, sandbox, webhook_receiver):
    product = ProductFactory(sku="LATE", price="7.00", stock=10)
    owner = UserFactory()
    order = process_order(order_id=place_order(owner=owner, items=[("LATE", 1)]).pk)
    with transaction.atomic():
        payment = services.claim_order_payment(order=Order.objects.select_for_update().get(pk=order.pk))
    sandbox.set_faults(fail_after_charge_next=1)
    with pytest.raises(ProviderUnavailable):
        services.settle_payment(payment_id=payment.pk)
    hold_stuck_order(order_id=order.pk, task_name="orders.tasks.charge_order", reason="ProviderUnavailable")
    [charge] = sandbox.charges(reference=payment.idempotency_key)
    [hook] = webhook_receiver.wait_for(lambda event: event["data"]["charge"]["id"] == charge["id"])
    response = client.post(
        "/payments/webhooks/provider/",
        data=hook.body,
        content_type="application/json",
        HTTP_SANDBOX_SIGNATURE=hook.headers["Sandbox-Signature"],
    )
    assert response.status_code == 200
    event = WebhookEvent.objects.get()

    def act(i):
        if i == 0:
            retry_held_order(order_id=order.pk)
            return charge_order(order_id=order.pk)
        services.process_webhook(event_id=event.pk)
        return charge_order(order_id=order.pk)

    run_concurrently(2, act)
    order.refresh_from_db()
    payment.refresh_from_db()
    assert (order.status, payment.status) == (Order.Status.PAID, Payment.Status.SUCCEEDED)
    assert len([c for c in sandbox.charges() if c["status"] == "succeeded"]) == 1
    product.refresh_from_db()
    assert product.stock == 9


def test_the_webhook_overtaking_the_charge_tasks_answer_pays_once(client, sandbox, webhook_receiver):
    import time

    ProductFactory(sku="FAST", price="3.00", stock=10)
    order = process_order(order_id=place_order(owner=UserFactory(), items=[("FAST", 1)]).pk)
    sandbox.set_faults(latency_ms=1500)  # the charge's answer is slow; the sandbox sends its webhook at once

    def act(i):
        if i == 0:
            return charge_order(order_id=order.pk)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with webhook_receiver.lock:
                hooks = list(webhook_receiver.received)
            if hooks:
                break
            time.sleep(0.02)
        [hook] = hooks
        client.post(
            "/payments/webhooks/provider/",
            data=hook.body,
            content_type="application/json",
            HTTP_SANDBOX_SIGNATURE=hook.headers["Sandbox-Signature"],
        )
        services.process_webhook(event_id=WebhookEvent.objects.get().pk)
        return charge_order(order_id=order.pk)

    run_concurrently(2, act)
    order.refresh_from_db()
    assert order.status == Order.Status.PAID
    assert order.events.filter(to_status=Order.Status.PAID).count() == 1
    assert Payment.objects.get(order=order).status == Payment.Status.SUCCEEDED
    assert sandbox.summary()["charges"]["total"] == 1
