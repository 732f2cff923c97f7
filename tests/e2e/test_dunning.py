"""Failed-renewal recovery (payments/dunning.py) with real worker, beat, Redis, PostgreSQL and sandbox processes.

The schedule runs in seconds: DUNNING_RETRY_UNIT_SECONDS=1 makes DUNNING_RETRY_DAYS seconds, and
beat sweeps every half second. The declines come from the sandbox's own decline fault, switched
while the system runs; emails go to a small SMTP server in this process (MailServer).
"""

import email
import time
from email.header import decode_header, make_header

import pytest
from django.db import transaction

from core.models import OutboxItem
from notifications.models import Notification
from payments import services
from payments.models import Payment, Subscription
from tests.factories import PlanFactory, UserFactory
from tests.stack import MailServer, wait_for

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True), pytest.mark.timeout(180)]

CHARGE_SUBSCRIPTION = "payments.tasks.charge_subscription"
# Tries 2, 3 and 4 run 2, 5 and 8 s after the first decline; the sweep every half second.
DUNNING = {
    "DUNNING_RETRY_DAYS": "2,5,8",
    "DUNNING_RETRY_UNIT_SECONDS": "1",
    "DUNNING_SWEEP_SECONDS": "0.5",
    "OUTBOX_RELAY_SECONDS": "1",
    "OUTBOX_FAST_PATH_GRACE_SECONDS": "2",
    "SHOP_URL": "https://shop.example",
}


@pytest.fixture
def stack(start_worker, processes, worker_env, mail, broker):
    """A worker on the critical and default queues, and beat, with the fast schedule; emails to `mail`."""
    env = {**worker_env, **DUNNING, "EMAIL_URL": mail.url}
    start_worker("critical", "default", concurrency=2, env=env)
    processes.beat(env)
    return env


def texts(mail: MailServer) -> list[tuple[str, str]]:
    """(subject, plain-text body) of each email received, in order."""
    found = []
    with mail.lock:
        raw_messages = list(mail.messages)
    for raw in raw_messages:
        message = email.message_from_bytes(raw)
        subject = str(make_header(decode_header(message["Subject"] or "")))
        body = next(
            part.get_payload(decode=True).decode() for part in message.walk() if part.get_content_type() == "text/plain"
        )
        found.append((subject, body))
    return found


def subscribe(plan_code: str) -> Subscription:
    with transaction.atomic():
        owner = UserFactory()
    return services.subscribe(owner=owner, plan_code=plan_code)


def test_a_renewal_declined_twice_is_paid_on_the_third_try(stack, sandbox, mail):
    # Given a provider that declines every charge, and a new subscription whose first period is due
    plan = PlanFactory(code="dunning-paid", name="Coffee Club", price="9.00")
    sandbox.set_faults(decline_rate=1.0)
    started = time.monotonic()
    subscription = subscribe(plan.code)

    # When the first try and beat's retry 2 s later are declined, and the card works again before the next one
    wait_for(lambda: Subscription.objects.get(pk=subscription.pk).failed_attempts == 2, 30, "two declined tries", 0.1)
    sandbox.set_faults(decline_rate=0.0)

    # Then the third try, 5 s after the first decline, pays the period
    wait_for(
        lambda: (
            Subscription.objects.get(pk=subscription.pk).status == Subscription.Status.ACTIVE
            and Subscription.objects.get(pk=subscription.pk).failed_attempts == 0
        ),
        30,
        "the third try to pay the period",
    )
    paid_after = time.monotonic() - started
    subscription.refresh_from_db()
    assert subscription.current_period_end > subscription.current_period_start
    assert subscription.next_retry_at is None
    payments = list(subscription.payments.order_by("attempt"))
    assert [(p.attempt, p.status) for p in payments] == [(1, "declined"), (2, "declined"), (3, "succeeded")]
    # Each try its own key, charged once at the provider; the tries followed the schedule
    assert len({p.idempotency_key for p in payments}) == 3
    assert [len(sandbox.charges(reference=p.idempotency_key)) for p in payments] == [1, 1, 1]
    first_decline = payments[0].updated_at
    assert 2 <= (payments[1].created_at - first_decline).total_seconds() < 2 + 3
    assert 5 <= (payments[2].created_at - first_decline).total_seconds() < 5 + 3
    # One email per try: two declines (with the next try and the link to change the card), then the receipt
    wait_for(lambda: len(mail.messages) >= 3, 20, "three emails")
    time.sleep(2)  # a few more sweeps: nothing more is tried or sent
    subjects = [subject for subject, _ in texts(mail)]
    assert sorted(subjects) == sorted(
        ["Your Coffee Club subscription: payment declined"] * 2 + ["Your Coffee Club subscription: payment received"]
    ), subjects
    declined_bodies = [body for subject, body in texts(mail) if subject.endswith("declined")]
    assert all("https://shop.example/subscriptions/" in body for body in declined_bodies)
    assert any("tried again on" in body for body in declined_bodies)
    assert Payment.objects.filter(subscription=subscription).count() == 3
    assert sandbox.summary()["charges"]["total"] == 3
    items = OutboxItem.objects.filter(task_name=CHARGE_SUBSCRIPTION, args__0=subscription.pk)
    assert sorted(len(item.args) for item in items) == [2, 3, 3]  # the first try, then one item per retry
    assert {item.state for item in items} == {OutboxItem.State.DONE}
    print(f"paid on the third try {paid_after:.1f} s after subscribing")


def test_a_renewal_declined_to_the_end_is_cancelled_and_each_email_is_sent_once(stack, sandbox, mail):
    # Given a provider that declines every charge
    plan = PlanFactory(code="dunning-cancelled", name="Tea Club", price="7.00")
    sandbox.set_faults(decline_rate=1.0)
    started = time.monotonic()

    # When a subscription starts and its four tries are declined (at 0, 2, 5 and 8 s)
    subscription = subscribe(plan.code)
    wait_for(
        lambda: Subscription.objects.get(pk=subscription.pk).status == Subscription.Status.CANCELLED,
        40,
        "the subscription to be cancelled",
    )
    cancelled_after = time.monotonic() - started
    wait_for(lambda: len(mail.messages) >= 5, 20, "five emails")
    time.sleep(3)  # six more sweeps: nothing more is tried or sent

    # Then it is cancelled after the fourth decline, and each email was sent once
    subscription.refresh_from_db()
    assert (subscription.failed_attempts, subscription.next_retry_at) == (4, None)
    assert subscription.cancelled_at is not None
    payments = list(subscription.payments.order_by("attempt"))
    assert [(p.attempt, p.status) for p in payments] == [(n, "declined") for n in (1, 2, 3, 4)]
    assert sandbox.summary()["charges"]["total"] == 4
    assert [len(sandbox.charges(reference=p.idempotency_key)) for p in payments] == [1, 1, 1, 1]
    subjects = [subject for subject, _ in texts(mail)]
    assert sorted(subjects) == sorted(
        ["Your Tea Club subscription: payment declined"] * 4
        + ["Your Tea Club subscription is cancelled: payment declined"]
    ), subjects
    sent = Notification.objects.filter(recipient=subscription.owner)
    assert sent.filter(kind=Notification.Kind.SUBSCRIPTION_DECLINED, status="sent").count() == 4
    assert sent.filter(kind=Notification.Kind.SUBSCRIPTION_CANCELLED_UNPAID, status="sent").count() == 1
    bodies = dict(texts(mail))
    assert "declined 4 times" in bodies["Your Tea Club subscription is cancelled: payment declined"]
    assert 8 <= cancelled_after < 8 + 15
    print(f"cancelled {cancelled_after:.1f} s after subscribing")
