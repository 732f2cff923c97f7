"""Charging orders and subscriptions against the real sandbox provider (eager tasks)."""

import time
from datetime import date, timedelta
from decimal import Decimal
from unittest import mock

import pytest
from django.db import IntegrityError, transaction
from django.utils import timezone

from core.models import OutboxItem
from integrations import provider as gateway
from notifications.models import Notification
from ops.deadletters import PAYMENT_NEEDS_ATTENTION
from ops.models import FailedTask
from orders import services as order_services
from orders.models import Order
from orders.services import place_order
from payments import services
from payments.models import Payment, Subscription
from tests.concurrency import run_concurrently
from tests.factories import OrderFactory, PlanFactory, ProductFactory, SubscriptionFactory, UserFactory
from tests.payments.support import PAYMENT_KEY, claim_and_stop

pytestmark = pytest.mark.django_db

CHARGE_SUBSCRIPTION = "payments.tasks.charge_subscription"


@pytest.fixture
def plan(db):
    return PlanFactory(code="basic", name="Basic", price="9.00")


# --- Orders -----------------------------------------------------------------------------


def test_confirmed_order_is_charged_once_and_fulfilled(user, sandbox, django_capture_on_commit_callbacks):
    ProductFactory(sku="CHG", price="12.50", stock=5)
    with django_capture_on_commit_callbacks(execute=True):
        order = place_order(owner=user, items=[("CHG", 2)])
    order.refresh_from_db()
    assert order.status == Order.Status.FULFILLED
    payment = order.payments.get()
    assert (payment.status, payment.amount) == ("succeeded", 25)
    [charge] = sandbox.charges(reference=payment.idempotency_key)
    assert charge["id"] == payment.provider_charge_id and charge["amount"] == "25.00"
    assert charge["idempotency_key"] == payment.idempotency_key
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


def test_charge_order_delivered_again_charges_once(sandbox):
    order = OrderFactory(total=Decimal("20.00"))

    first = order_services.charge_order(order_id=order.pk)
    second = order_services.charge_order(order_id=order.pk)

    assert first.pk == second.pk == order.pk
    assert second.status == Order.Status.PAID
    payment = Payment.objects.get(order=order)
    assert (payment.status, payment.attempts) == (Payment.Status.SUCCEEDED, 1)
    assert len(sandbox.charges(reference=payment.idempotency_key)) == 1
    assert sandbox.summary()["charges"]["total"] == 1
    # The hand-over to the warehouse is dispatched once, by the delivery that moved the order to paid.
    assert OutboxItem.objects.filter(task_name="orders.tasks.sync_to_fulfillment", args=[order.pk]).count() == 1


def test_crash_after_the_provider_charged_an_order_does_not_charge_twice(sandbox):
    """The provider charged, then the worker died before our commit; the redelivery finishes it with the same key."""
    order = OrderFactory(total=Decimal("20.00"))
    with mock.patch.object(services, "record_outcome", side_effect=SystemExit("worker killed")):
        with pytest.raises(SystemExit):
            order_services.charge_order(order_id=order.pk)
    claimed = Payment.objects.get(order=order)
    assert claimed.status == Payment.Status.PROCESSING
    assert len(sandbox.charges(reference=claimed.idempotency_key)) == 1

    redelivered = order_services.charge_order(order_id=order.pk)

    payment = Payment.objects.get(order=order)
    [charge] = sandbox.charges(reference=claimed.idempotency_key)
    assert redelivered.status == Order.Status.PAID
    assert (payment.status, payment.provider_charge_id, payment.attempts) == ("succeeded", charge["id"], 2)
    assert payment.idempotency_key == claimed.idempotency_key


def test_charging_a_cancelled_order_charges_nothing(user, sandbox):
    order = OrderFactory(owner=user, total=Decimal("20.00"))
    order_services.cancel_order(order_id=order.pk, owner=user)

    charged = order_services.charge_order(order_id=order.pk)

    assert charged.status == Order.Status.CANCELLED
    assert not Payment.objects.filter(order=order).exists()
    assert sandbox.summary()["charges"]["total"] == 0


def test_a_zero_amount_claim_is_refused_instead_of_returning_another_row():
    """The amount check is not a lost race: no row of the natural key exists, so the IntegrityError is raised."""
    claim_and_stop(OrderFactory(total=Decimal("20.00")))  # another order's payment is no answer either
    free = OrderFactory(total=Decimal("0.00"))

    with pytest.raises(IntegrityError), transaction.atomic():
        services.claim_order_payment(order=Order.objects.select_for_update().get(pk=free.pk))

    assert not Payment.objects.filter(order=free).exists()
    assert Payment.objects.count() == 1


@pytest.mark.django_db(transaction=True)
def test_a_provider_refusal_puts_the_payment_in_needs_attention_and_the_order_on_hold(sandbox):
    # Given a claimed payment whose key the provider already holds for other parameters (it answers 422)
    order = OrderFactory(total=Decimal("20.00"))
    payment = claim_and_stop(order)
    assert sandbox.charge(key=payment.idempotency_key, reference="someone-else", amount="99.00").status_code == 201

    # When the charge step runs
    held = order_services.charge_order(order_id=order.pk)

    # Then nothing is charged, the payment waits for staff, and the order says so
    payment.refresh_from_db()
    assert payment.status == Payment.Status.NEEDS_ATTENTION
    assert payment.failure_reason.startswith("rejected:") and "422" in payment.failure_reason
    order.refresh_from_db()
    assert held.status == order.status == Order.Status.ON_HOLD
    assert order.hold_reason == order_services.HOLD_MESSAGES[Order.Status.CONFIRMED]
    assert FailedTask.objects.filter(task_name=PAYMENT_NEEDS_ATTENTION, args=[payment.pk]).count() == 1
    assert sandbox.charges(reference=payment.idempotency_key) == []
    assert sandbox.summary()["charges"]["total"] == 1


@pytest.mark.django_db(transaction=True)
def test_staff_retry_after_a_refusal_charges_under_a_fresh_key(sandbox):
    order = OrderFactory(total=Decimal("20.00"))
    refused_key = claim_and_stop(order).idempotency_key
    sandbox.charge(key=refused_key, reference="someone-else", amount="99.00")
    order_services.charge_order(order_id=order.pk)

    order_services.retry_held_order(order_id=order.pk)

    payment = Payment.objects.get(order=order)
    assert payment.status == Payment.Status.SUCCEEDED
    assert payment.idempotency_key != refused_key and PAYMENT_KEY.fullmatch(payment.idempotency_key)
    [charge] = sandbox.charges(reference=payment.idempotency_key)
    assert (charge["amount"], charge["id"]) == ("20.00", payment.provider_charge_id)
    order.refresh_from_db()
    assert order.status == Order.Status.FULFILLED and order.hold_reason == ""


# --- Provider idempotency keys ------------------------------------------------------------


def test_payment_keys_are_random_and_unique(plan, sandbox):
    orders = OrderFactory.create_batch(10, total=Decimal("20.00"))
    order_keys = [claim_and_stop(order).idempotency_key for order in orders]
    subscription = SubscriptionFactory(plan=plan, current_period_start=date(2026, 1, 1))
    sub_keys = [
        services.charge_subscription(subscription_id=subscription.pk, billing_period=period).idempotency_key
        for period in ("2026-01-01", "2026-02-01")
    ]

    keys = order_keys + sub_keys
    assert all(PAYMENT_KEY.fullmatch(key) for key in keys), keys
    assert len(set(keys)) == len(keys)


def test_an_order_with_the_id_of_one_charged_elsewhere_gets_its_own_charge(sandbox):
    """Two databases (or a database started again) share the provider account, and their ids overlap."""
    # Given order #N charged, then gone from this database, as if it had been another database's
    first = OrderFactory(total=Decimal("20.00"))
    order_services.charge_order(order_id=first.pk)
    first_payment = Payment.objects.get(order=first)
    reused_id = first.pk
    first_payment.delete()
    first.delete()

    # When a new order with the same id and the same total is charged
    second = OrderFactory(id=reused_id, total=Decimal("20.00"))
    charged = order_services.charge_order(order_id=second.pk)

    # Then the provider makes a second charge instead of replaying the first one
    payment = Payment.objects.get(order=second)
    assert charged.status == Order.Status.PAID
    assert payment.idempotency_key != first_payment.idempotency_key
    assert payment.provider_charge_id != first_payment.provider_charge_id
    assert len(sandbox.charges(reference=payment.idempotency_key)) == 1
    assert sandbox.summary()["charges"]["total"] == 2


def test_a_retry_of_a_payment_reuses_its_stored_key(sandbox):
    order = OrderFactory(total=Decimal("20.00"))
    sandbox.set_faults(fail_next=1)
    with pytest.raises(gateway.ProviderUnavailable):
        order_services.charge_order(order_id=order.pk)
    claimed = Payment.objects.get(order=order)
    assert (claimed.status, claimed.attempts) == (Payment.Status.PROCESSING, 1)
    assert PAYMENT_KEY.fullmatch(claimed.idempotency_key)

    order_services.charge_order(order_id=order.pk)

    payment = Payment.objects.get(order=order)
    assert (payment.status, payment.attempts) == (Payment.Status.SUCCEEDED, 2)
    assert payment.idempotency_key == claimed.idempotency_key
    [charge] = sandbox.charges()
    assert charge["idempotency_key"] == charge["reference"] == claimed.idempotency_key


# --- Subscriptions ------------------------------------------------------------------------


def test_subscription_charge_succeeds_and_moves_the_period(user, plan, sandbox):
    start = date(2026, 1, 31)
    subscription = SubscriptionFactory(owner=user, plan=plan, current_period_start=start)
    payment = services.charge_subscription(subscription_id=subscription.pk, billing_period=start.isoformat())
    subscription.refresh_from_db()
    assert payment.status == Payment.Status.SUCCEEDED
    [charge] = sandbox.charges(reference=payment.idempotency_key)
    assert (charge["id"], charge["amount"]) == (payment.provider_charge_id, "9.00")
    assert (subscription.current_period_start, subscription.current_period_end) == (start, date(2026, 2, 28))
    assert subscription.status == Subscription.Status.ACTIVE
    # The owner hears of it: notifications follow the subscription_charged signal.
    assert Notification.objects.filter(
        kind=Notification.Kind.SUBSCRIPTION_CHARGED, object_id=payment.pk, recipient=user
    ).exists()


def test_subscription_decline_makes_it_past_due(user, plan, sandbox):
    sandbox.set_faults(decline_rate=1.0)
    subscription = SubscriptionFactory(owner=user, plan=plan, current_period_start=date(2026, 3, 1))
    payment = services.charge_subscription(subscription_id=subscription.pk, billing_period="2026-03-01")
    subscription.refresh_from_db()
    assert payment.status == Payment.Status.DECLINED
    assert subscription.status == Subscription.Status.PAST_DUE
    assert Notification.objects.filter(kind=Notification.Kind.SUBSCRIPTION_DECLINED, object_id=payment.pk).exists()


def test_duplicate_delivery_charges_once(user, plan, sandbox):
    subscription = SubscriptionFactory(owner=user, plan=plan, current_period_start=date(2026, 4, 1))
    first = services.charge_subscription(subscription_id=subscription.pk, billing_period="2026-04-01")
    second = services.charge_subscription(subscription_id=subscription.pk, billing_period="2026-04-01")
    assert first.pk == second.pk
    assert Payment.objects.filter(subscription=subscription).count() == 1
    assert len(sandbox.charges(reference=first.idempotency_key)) == 1
    assert sandbox.summary()["charges"]["total"] == 1


def test_crash_after_provider_charged_does_not_charge_twice(user, plan, sandbox):
    """The provider charged, then the process died before our commit; the redelivery finishes it."""
    subscription = SubscriptionFactory(owner=user, plan=plan, current_period_start=date(2026, 5, 1))
    with mock.patch.object(services, "record_outcome", side_effect=SystemExit("worker killed")):
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
    assert sandbox.summary()["charges"]["total"] == 1


@pytest.mark.django_db(transaction=True)
def test_twenty_concurrent_deliveries_give_one_payment_and_one_charge(sandbox):
    owner = UserFactory()
    plan = PlanFactory(code="conc", name="Concurrent", price="9.00")
    subscription = SubscriptionFactory(owner=owner, plan=plan, current_period_start=date(2026, 6, 1))
    # Slow charges keep every delivery in flight at once.
    sandbox.set_faults(latency_ms=300)

    def deliver(i: int) -> str:
        for _ in range(20):  # what autoretry does for ProviderUnavailable (409: same key in flight)
            try:
                payment = services.charge_subscription(subscription_id=subscription.pk, billing_period="2026-06-01")
                return payment.status
            except gateway.ProviderUnavailable:
                time.sleep(0.1)
        return "gave up"

    outcomes = run_concurrently(20, deliver)

    assert outcomes == ["succeeded"] * 20
    assert Payment.objects.filter(subscription=subscription).count() == 1
    summary = sandbox.summary()["charges"]
    assert summary["total"] == 1
    assert summary["references_charged_more_than_once"] == []


def test_bill_due_subscriptions_dispatches_only_due_active_ones_once(user, plan):
    today = timezone.localdate()
    due = SubscriptionFactory(owner=user, plan=plan, current_period_start=today)
    SubscriptionFactory(plan=plan, current_period_start=today + timedelta(days=3))
    cancelled = SubscriptionFactory(plan=plan, current_period_start=today)
    cancelled.status = Subscription.Status.CANCELLED
    cancelled.save()

    dispatched = services.bill_due_subscriptions(today=today)
    again = services.bill_due_subscriptions(today=today)

    assert dispatched == [(due.pk, today.isoformat())]
    # The second sweep finds the first one's item still open: one item per period.
    assert again == []
    items = OutboxItem.objects.filter(task_name=CHARGE_SUBSCRIPTION)
    assert list(items.values_list("args", flat=True)) == [[due.pk, today.isoformat()]]


def test_subscribe_charges_the_first_period_once(user, plan, sandbox, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        subscription = services.subscribe(owner=user, plan_code="basic")
    payment = subscription.payments.get()
    assert payment.status == Payment.Status.SUCCEEDED
    assert payment.billing_period == timezone.localdate().isoformat()

    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        again = services.subscribe(owner=user, plan_code="basic")

    assert again.pk == subscription.pk
    assert callbacks == []
    assert OutboxItem.objects.filter(task_name=CHARGE_SUBSCRIPTION, args__0=subscription.pk).count() == 1
    assert Payment.objects.filter(subscription__owner=user).count() == 1
    assert sandbox.summary()["charges"]["total"] == 1


def test_subscribing_to_an_unknown_plan_is_an_error(user, plan):
    with pytest.raises(services.SubscriptionError, match="unknown plan"):
        services.subscribe(owner=user, plan_code="no-such-plan")
    assert not Subscription.objects.exists()


def test_cancelled_subscription_is_not_charged(user, plan, sandbox):
    subscription = SubscriptionFactory(owner=user, plan=plan, current_period_start=date(2026, 7, 1))
    outcome = services.cancel_subscription(subscription_id=subscription.pk, owner=user)
    assert (outcome.subscription.status, outcome.voided_charge) == (Subscription.Status.CANCELLED, False)
    assert services.charge_subscription(subscription_id=subscription.pk, billing_period="2026-07-01") is None
    assert not Payment.objects.filter(subscription=subscription).exists()
    assert sandbox.summary()["charges"]["total"] == 0


@pytest.mark.parametrize("period", ["", "2026-13-01", "yesterday", "2026-01-01T00:00"])
def test_malformed_billing_period_is_an_application_error(user, plan, period):
    from core.errors import ApplicationError

    subscription = SubscriptionFactory(owner=user, plan=plan, current_period_start=date(2026, 1, 1))
    with pytest.raises(ApplicationError):
        services.charge_subscription(subscription_id=subscription.pk, billing_period=period)
