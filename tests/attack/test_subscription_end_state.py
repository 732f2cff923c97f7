"""A subscription charge that fails for good (the provider down for the whole retry window)."""

import pytest
from django.utils import timezone

from core import outbox
from core.models import OutboxItem
from integrations.errors import ProviderUnavailable
from payments import services
from payments.models import Payment
from tests.factories import PlanFactory, SubscriptionFactory

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("broker")]

CHARGE_SUBSCRIPTION = "payments.tasks.charge_subscription"


def fail_for_good(item: OutboxItem, reason: str) -> None:
    """What core.outbox._task_failed does with the task's final failure (retries spent)."""
    failed, parked = outbox.finish_failed(task_id=str(item.task_id), reason=reason)
    outbox.work_failed.send(sender=OutboxItem, item=failed, reason=reason, by_relay=False, parked=parked)


def test_a_subscription_charge_that_failed_for_good_ends_once_in_a_visible_state(user, sandbox):
    plan = PlanFactory(code="basic", name="Basic", price="9.00")
    today = timezone.localdate()
    subscription = SubscriptionFactory(owner=user, plan=plan, current_period_start=today)
    sandbox.set_faults(error_rate=1.0)  # the provider is down for longer than the task's retry window

    rounds = 0
    for _ in range(3):  # three billing sweeps (every BILLING_SWEEP_SECONDS = 5 min)
        services.bill_due_subscriptions(today=today)
        open_items = OutboxItem.objects.filter(task_name=CHARGE_SUBSCRIPTION, state__in=OutboxItem.OPEN)
        for item in open_items:
            rounds += 1
            with pytest.raises(ProviderUnavailable):
                services.charge_subscription(subscription_id=subscription.pk, billing_period=today.isoformat())
            fail_for_good(item, "ProviderUnavailable: HTTP 503")

    payment = Payment.objects.get(subscription=subscription)
    failed_items = OutboxItem.objects.filter(task_name=CHARGE_SUBSCRIPTION, state=OutboxItem.State.FAILED).count()
    # Each failed item is one task's final failure: one dead letter (FailedTask) each.
    assert (failed_items, payment.status) == (1, Payment.Status.NEEDS_ATTENTION), (
        f"{failed_items} items failed for good for one period (a dead letter each), the payment still {payment.status}"
    )


def test_a_charge_recorded_before_its_worker_died_still_moves_the_subscription_on(user, sandbox):
    from django.db import transaction

    from payments.models import Subscription

    plan = PlanFactory(code="basic", name="Basic", price="9.00")
    today = timezone.localdate()
    subscription = SubscriptionFactory(owner=user, plan=plan, current_period_start=today)

    # Given charge_subscription claimed and settled the period's payment (the provider charged, the success is
    # recorded in its own transaction) and its worker died before the subscription was moved on
    # (hard time limit, OOM kill, a deploy's SIGKILL): services.charge_subscription, up to _apply_to_subscription.
    with transaction.atomic():
        locked = Subscription.objects.select_for_update().get(pk=subscription.pk)
        payment = services._claim(
            natural_key={"subscription": locked, "billing_period": today.isoformat(), "attempt": 1},
            amount=plan.price,
            currency=plan.currency,
        )
    assert services.settle_payment(payment_id=payment.pk).status == Payment.Status.SUCCEEDED

    # When the message is delivered again (acks late), and the billing sweep runs as it does every 5 minutes
    services.charge_subscription(subscription_id=subscription.pk, billing_period=today.isoformat())
    services.bill_due_subscriptions(today=today)

    # Then the paid period is applied: the next one is due later, and nothing is enqueued for this one again
    subscription.refresh_from_db()
    again = OutboxItem.objects.filter(task_name=CHARGE_SUBSCRIPTION, args=[subscription.pk, today.isoformat()]).count()
    assert (subscription.current_period_end > today, again) == (True, 0), (
        f"period still ends {subscription.current_period_end} after it was paid; {again} more charge item(s) enqueued"
    )
