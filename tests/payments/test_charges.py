"""Charging orders and subscriptions against the real sandbox provider (eager tasks)."""

import threading
from datetime import date, timedelta
from unittest import mock

import pytest
from django.db import connection
from django.utils import timezone

from orders.models import Order
from orders.services import place_order
from payments import gateway, services
from payments.models import Payment, Plan, Subscription
from tests.factories import ProductFactory, UserFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def plan(db):
    return Plan.objects.create(code="basic", name="Basic", price="9.00")


def make_subscription(owner, plan, *, period_start: date) -> Subscription:
    return Subscription.objects.create(
        owner=owner, plan=plan, current_period_start=period_start, current_period_end=period_start
    )


def test_confirmed_order_is_charged_once_and_fulfilled(user, sandbox, django_capture_on_commit_callbacks):
    ProductFactory(sku="CHG", price="12.50", stock=5)
    with django_capture_on_commit_callbacks(execute=True):
        order = place_order(owner=user, items=[("CHG", 2)])
    order.refresh_from_db()
    assert order.status == Order.Status.FULFILLED
    payment = order.payments.get()
    assert (payment.status, payment.amount, payment.idempotency_key) == ("succeeded", 25, f"order-{order.pk}")
    [charge] = sandbox.charges(reference=f"order-{order.pk}")
    assert charge["id"] == payment.provider_charge_id and charge["amount"] == "25.00"
    assert len(sandbox.get("/v1/shipments", order_id=order.pk).json()["data"]) == 1


def test_declined_order_fails_payment_and_releases_stock(user, sandbox, django_capture_on_commit_callbacks):
    product = ProductFactory(sku="DCL", stock=5)
    sandbox.set_faults(decline_rate=1.0)
    with django_capture_on_commit_callbacks(execute=True):
        order = place_order(owner=user, items=[("DCL", 2)])
    order.refresh_from_db()
    product.refresh_from_db()
    assert order.status == Order.Status.PAYMENT_FAILED
    assert product.stock == 5
    assert order.payments.get().status == Payment.Status.DECLINED
    assert sandbox.get("/v1/shipments", order_id=order.pk).json()["data"] == []


def test_charge_order_delivered_again_charges_once(user, sandbox, django_capture_on_commit_callbacks):
    ProductFactory(sku="TWICE", stock=5)
    with django_capture_on_commit_callbacks(execute=True):
        order = place_order(owner=user, items=[("TWICE", 1)])
    services.charge_order(order_id=order.pk)
    services.charge_order(order_id=order.pk)
    assert Payment.objects.filter(order=order).count() == 1
    assert len(sandbox.charges(reference=f"order-{order.pk}")) == 1


def test_charging_a_cancelled_order_charges_nothing(user, sandbox, django_capture_on_commit_callbacks):
    ProductFactory(sku="CXL", stock=5)
    with mock.patch("payments.tasks.charge_order.delay"):
        with django_capture_on_commit_callbacks(execute=True):
            order = place_order(owner=user, items=[("CXL", 1)])
    from orders.services import cancel_order

    cancel_order(order_id=order.pk, owner=user)
    assert services.charge_order(order_id=order.pk) is None
    assert sandbox.charges(reference=f"order-{order.pk}") == []


def test_subscription_charge_succeeds_and_moves_the_period(user, plan, sandbox):
    start = date(2026, 1, 31)
    subscription = make_subscription(user, plan, period_start=start)
    payment = services.charge_subscription(subscription_id=subscription.pk, billing_period=start.isoformat())
    subscription.refresh_from_db()
    assert payment.status == Payment.Status.SUCCEEDED
    assert payment.idempotency_key == f"sub-{subscription.pk}-2026-01-31"
    assert (subscription.current_period_start, subscription.current_period_end) == (start, date(2026, 2, 28))
    assert subscription.status == Subscription.Status.ACTIVE


def test_subscription_decline_makes_it_past_due(user, plan, sandbox):
    sandbox.set_faults(decline_rate=1.0)
    subscription = make_subscription(user, plan, period_start=date(2026, 3, 1))
    payment = services.charge_subscription(subscription_id=subscription.pk, billing_period="2026-03-01")
    subscription.refresh_from_db()
    assert payment.status == Payment.Status.DECLINED
    assert subscription.status == Subscription.Status.PAST_DUE


def test_duplicate_delivery_charges_once(user, plan, sandbox):
    subscription = make_subscription(user, plan, period_start=date(2026, 4, 1))
    first = services.charge_subscription(subscription_id=subscription.pk, billing_period="2026-04-01")
    second = services.charge_subscription(subscription_id=subscription.pk, billing_period="2026-04-01")
    assert first.pk == second.pk
    assert Payment.objects.filter(subscription=subscription).count() == 1
    assert len(sandbox.charges(reference=first.idempotency_key)) == 1


def test_crash_after_provider_charged_does_not_charge_twice(user, plan, sandbox):
    """The provider charged, then the process died before our commit; the redelivery finishes it."""
    subscription = make_subscription(user, plan, period_start=date(2026, 5, 1))
    with mock.patch.object(services, "_record", side_effect=SystemExit("worker killed")):
        with pytest.raises(SystemExit):
            services.charge_subscription(subscription_id=subscription.pk, billing_period="2026-05-01")
    claimed = Payment.objects.get(subscription=subscription)
    assert claimed.status == Payment.Status.PROCESSING
    assert len(sandbox.charges(reference=claimed.idempotency_key)) == 1

    payment = services.charge_subscription(subscription_id=subscription.pk, billing_period="2026-05-01")
    [charge] = sandbox.charges(reference=claimed.idempotency_key)
    assert payment.pk == claimed.pk and payment.status == Payment.Status.SUCCEEDED
    assert payment.provider_charge_id == charge["id"]
    assert payment.attempts == 2


@pytest.mark.django_db(transaction=True)
def test_twenty_concurrent_deliveries_give_one_payment_and_one_charge(sandbox):
    owner = UserFactory()
    plan = Plan.objects.create(code="conc", name="Concurrent", price="9.00")
    subscription = make_subscription(owner, plan, period_start=date(2026, 6, 1))
    # Slow charges keep every delivery in flight at once.
    sandbox.set_faults(latency_ms=300)
    barrier = threading.Barrier(20)
    outcomes: list[str] = []

    def deliver():
        try:
            barrier.wait()
            for _ in range(20):  # what autoretry does for ProviderUnavailable (409: same key in flight)
                try:
                    payment = services.charge_subscription(subscription_id=subscription.pk, billing_period="2026-06-01")
                    outcomes.append(payment.status)
                    return
                except gateway.ProviderUnavailable:
                    threading.Event().wait(0.1)
            outcomes.append("gave up")
        finally:
            connection.close()

    threads = [threading.Thread(target=deliver) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert outcomes == ["succeeded"] * 20
    assert Payment.objects.filter(subscription=subscription).count() == 1
    summary = sandbox.summary()["charges"]
    assert summary["total"] == 1
    assert summary["references_charged_more_than_once"] == []


def test_bill_due_subscriptions_dispatches_only_due_active_ones(user, plan):
    today = timezone.localdate()
    due = make_subscription(user, plan, period_start=today)
    later = make_subscription(UserFactory(), plan, period_start=today + timedelta(days=3))
    cancelled = make_subscription(UserFactory(), plan, period_start=today)
    cancelled.status = Subscription.Status.CANCELLED
    cancelled.save()
    with mock.patch("payments.tasks.charge_subscription.delay") as delay:
        dispatched = services.bill_due_subscriptions(today=today)
    assert dispatched == [(due.pk, today.isoformat())]
    delay.assert_called_once_with(due.pk, today.isoformat())
    assert later.pk not in [pk for pk, _ in dispatched]


def test_subscribe_charges_the_first_period(user, plan, sandbox, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        subscription = services.subscribe(owner=user, plan_code="basic")
    payment = subscription.payments.get()
    assert payment.status == Payment.Status.SUCCEEDED
    assert payment.billing_period == timezone.localdate().isoformat()
    with pytest.raises(services.SubscriptionError):
        services.subscribe(owner=user, plan_code="basic")
    with pytest.raises(services.SubscriptionError):
        services.subscribe(owner=user, plan_code="no-such-plan")


def test_cancelled_subscription_is_not_charged(user, plan, sandbox):
    subscription = make_subscription(user, plan, period_start=date(2026, 7, 1))
    services.cancel_subscription(subscription_id=subscription.pk, owner=user)
    assert services.charge_subscription(subscription_id=subscription.pk, billing_period="2026-07-01") is None
    assert sandbox.summary()["charges"]["total"] == 0


@pytest.mark.parametrize("period", ["", "2026-13-01", "yesterday", "2026-01-01T00:00"])
def test_malformed_billing_period_is_a_validation_error(user, plan, period):
    from django.core.exceptions import ValidationError

    subscription = make_subscription(user, plan, period_start=date(2026, 1, 1))
    with pytest.raises(ValidationError):
        services.charge_subscription(subscription_id=subscription.pk, billing_period=period)
