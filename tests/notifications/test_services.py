"""notify and send_notification: one row and one email per kind and object, from the status changes that promise one."""

import smtplib
from datetime import timedelta
from decimal import Decimal
from unittest import mock

import pytest
from django.core import mail
from django.db import transaction
from django.utils import timezone

from core.models import OutboxItem
from core.outbox import relay
from integrations import provider as gateway
from notifications.models import Notification
from notifications.services import notify, send_notification
from orders.models import Order
from orders.services import charge_order, place_order, process_order
from payments.models import Subscription
from payments.services import charge_subscription
from tests.factories import NotificationFactory, OrderFactory, ProductFactory, SubscriptionFactory, UserFactory

pytestmark = pytest.mark.django_db

SEND = "notifications.tasks.send_notification"


def test_notify_twice_makes_one_row_and_one_email(django_capture_on_commit_callbacks):
    order = OrderFactory()

    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        first = notify(kind="order_confirmed", object_type="order", object_id=order.pk, recipient_id=order.owner_id)
        again = notify(kind="order_confirmed", object_type="order", object_id=order.pk, recipient_id=order.owner_id)

    assert again.pk == first.pk
    assert len(callbacks) == 1
    assert Notification.objects.count() == 1
    assert OutboxItem.objects.filter(task_name=SEND, args=[first.pk]).count() == 1
    assert len(mail.outbox) == 1
    first.refresh_from_db()
    assert first.status == Notification.Status.SENT
    assert first.sent_at is not None


def test_notify_in_a_transaction_that_rolls_back_leaves_no_row_and_sends_nothing(django_capture_on_commit_callbacks):
    order = OrderFactory()

    with django_capture_on_commit_callbacks(execute=True), pytest.raises(RuntimeError):
        with transaction.atomic():
            notify(kind="order_confirmed", object_type="order", object_id=order.pk, recipient_id=order.owner_id)
            raise RuntimeError("the caller's work failed")

    assert not Notification.objects.exists()
    assert not OutboxItem.objects.exists()
    assert mail.outbox == []


def _emails_of_kind(kind: str) -> list[mail.EmailMessage]:
    subjects = set(
        Notification.objects.filter(kind=kind, status=Notification.Status.SENT).values_list("subject", flat=True)
    )
    return [message for message in mail.outbox if message.subject in subjects]


def test_confirmed_order_emails_its_owner_once_in_text_and_html(django_capture_on_commit_callbacks):
    owner = UserFactory(email="ada@example.com")
    ProductFactory(sku="MUG-001", name="Mug & Saucer", price=Decimal("12.50"), stock=10)
    order = place_order(owner=owner, items=[("MUG-001", 2)])

    with django_capture_on_commit_callbacks(execute=True):
        process_order(order_id=order.pk)

    # The order may go on to be charged and fulfilled in the same commit; those have their own emails.
    [message] = _emails_of_kind("order_confirmed")
    assert message.to == ["ada@example.com"]
    assert f"#{order.pk}" in message.subject
    assert "confirmed" in message.subject
    # Plain text is not HTML-escaped; the HTML part is.
    assert "2 x Mug & Saucer (MUG-001)" in message.body
    assert "Total: 25.00 EUR" in message.body
    [(html, mimetype)] = message.alternatives
    assert mimetype == "text/html"
    assert f"#{order.pk}" in html
    assert "Mug &amp; Saucer" in html
    notification = Notification.objects.get(kind="order_confirmed")
    assert (notification.object_type, notification.object_id) == ("order", order.pk)
    assert notification.recipient == owner
    assert notification.subject == message.subject
    assert notification.body_text == message.body


def test_processing_the_same_order_again_sends_no_second_email(django_capture_on_commit_callbacks):
    ProductFactory(sku="MUG-001", stock=10)
    order = place_order(owner=UserFactory(), items=[("MUG-001", 1)])

    with django_capture_on_commit_callbacks(execute=True):
        process_order(order_id=order.pk)
    sent = len(mail.outbox)
    with django_capture_on_commit_callbacks(execute=True):
        process_order(order_id=order.pk)

    assert len(mail.outbox) == sent
    assert len(_emails_of_kind("order_confirmed")) == 1


def test_rejected_order_sends_no_email(django_capture_on_commit_callbacks):
    ProductFactory(sku="MUG-001", stock=0)
    order = place_order(owner=UserFactory(), items=[("MUG-001", 1)])

    with django_capture_on_commit_callbacks(execute=True):
        process_order(order_id=order.pk)

    order.refresh_from_db()
    assert order.status == Order.Status.REJECTED
    assert not Notification.objects.exists()
    assert mail.outbox == []


def test_declined_payment_emails_the_owner(sandbox, django_capture_on_commit_callbacks):
    order = OrderFactory()
    sandbox.set_faults(decline_rate=1.0)

    with django_capture_on_commit_callbacks(execute=True):
        charge_order(order_id=order.pk)

    order.refresh_from_db()
    assert order.status == Order.Status.PAYMENT_FAILED
    [message] = mail.outbox
    assert message.subject == f"Payment failed for order #{order.pk}"
    assert message.to == [order.owner.email]


def test_paid_order_records_its_notification_for_after_commit(sandbox, django_capture_on_commit_callbacks):
    order = OrderFactory()

    # Not executed: the commit also enqueues the warehouse sync, which is not under test here.
    with django_capture_on_commit_callbacks() as callbacks:
        charge_order(order_id=order.pk)

    order.refresh_from_db()
    assert order.status == Order.Status.PAID
    notification = Notification.objects.get(kind=Notification.Kind.ORDER_PAID)
    assert (notification.object_id, notification.recipient_id) == (order.pk, order.owner_id)
    assert notification.status == Notification.Status.PENDING
    assert mail.outbox == []
    assert len(callbacks) == 2  # the email and the warehouse sync
    assert sorted(OutboxItem.objects.values_list("task_name", "args")) == [
        (SEND, [notification.pk]),
        ("orders.tasks.sync_to_fulfillment", [order.pk]),
    ]


@pytest.mark.parametrize("kind", [kind for kind, _ in Notification.Kind.choices if kind.startswith("order_")])
def test_every_order_email_renders_with_the_order_number(kind):
    notification = NotificationFactory(kind=kind)

    send_notification(notification_id=notification.pk)

    [message] = mail.outbox
    assert f"#{notification.object_id}" in message.subject
    assert f"#{notification.object_id}" in message.body
    assert message.alternatives


@pytest.fixture
def subscription(user):
    return SubscriptionFactory(owner=user, plan__code="coffee-monthly", plan__name="Coffee Club")


def _charge(subscription: Subscription, django_capture_on_commit_callbacks, provider_answer) -> None:
    """Charge the subscription's current period; the provider answers with `provider_answer` (a mock side effect)."""
    period = subscription.current_period_end.isoformat()
    with mock.patch("integrations.provider.charge", side_effect=provider_answer):
        with django_capture_on_commit_callbacks(execute=True):
            charge_subscription(subscription_id=subscription.pk, billing_period=period)


def _succeeded(*, amount, currency, reference, idempotency_key, payment_method="") -> gateway.Charge:
    """The provider's answer to a charge it made: its amount, currency and reference are the request's."""
    return gateway.Charge(id="ch_1", status="succeeded", amount=amount, currency=currency, reference=reference)


def test_subscription_charge_emails_the_subscriber(subscription, django_capture_on_commit_callbacks):
    _charge(subscription, django_capture_on_commit_callbacks, _succeeded)

    [message] = mail.outbox
    assert message.to == [subscription.owner.email]
    assert message.subject == "Your Coffee Club subscription: payment received"
    next_due = subscription.current_period_end + timedelta(days=1)  # at least a month later
    assert "9.00 EUR" in message.body
    assert str(next_due.year) in message.body
    notification = Notification.objects.get()
    assert (notification.kind, notification.object_type) == ("subscription_charged", "payment")
    assert notification.object_id == subscription.payments.get().pk


def test_subscription_decline_emails_the_subscriber(subscription, django_capture_on_commit_callbacks):
    _charge(subscription, django_capture_on_commit_callbacks, gateway.CardDeclined("ch_2", "insufficient_funds"))

    [message] = mail.outbox
    assert message.subject == "Your Coffee Club subscription: payment declined"
    assert "insufficient_funds" in message.body
    assert Notification.objects.get().kind == Notification.Kind.SUBSCRIPTION_DECLINED


def test_recipient_without_an_address_is_marked_failed_without_sending():
    notification = NotificationFactory(order=OrderFactory(owner=UserFactory(email="")))

    send_notification(notification_id=notification.pk)

    notification.refresh_from_db()
    assert notification.status == Notification.Status.FAILED
    assert notification.error == "recipient has no email address"
    assert mail.outbox == []


def test_notification_for_a_vanished_object_is_marked_failed_without_sending():
    notification = NotificationFactory(object_id=999_999)

    send_notification(notification_id=notification.pk)

    notification.refresh_from_db()
    assert notification.status == Notification.Status.FAILED
    assert notification.error == "order 999999 does not exist"
    assert mail.outbox == []


def test_mail_server_error_is_recorded_and_raised_and_a_retry_sends():
    notification = NotificationFactory()
    refused = smtplib.SMTPServerDisconnected("Connection unexpectedly closed")

    with mock.patch("django.core.mail.backends.locmem.EmailBackend.send_messages", side_effect=refused):
        with pytest.raises(smtplib.SMTPServerDisconnected):
            send_notification(notification_id=notification.pk)

    notification.refresh_from_db()
    assert notification.status == Notification.Status.FAILED
    assert notification.error == "SMTPServerDisconnected: Connection unexpectedly closed"
    assert notification.sent_at is None

    send_notification(notification_id=notification.pk)

    notification.refresh_from_db()
    assert notification.status == Notification.Status.SENT
    assert notification.error == ""
    assert len(mail.outbox) == 1


def test_notification_whose_commit_never_published_is_sent_once_by_the_relay():
    # Given two notifications whose after-commit publish never ran (the process died right after commit)
    left_behind, fresh = (
        notify(kind="order_confirmed", object_type="order", object_id=order.pk, recipient_id=order.owner_id)
        for order in OrderFactory.create_batch(2)
    )
    item = OutboxItem.objects.get(task_name=SEND, args=[left_behind.pk])
    assert relay()["published"] == 0  # still within the fast path's grace
    assert mail.outbox == []

    # When the left-behind item is due and the relay runs (tasks run eagerly here)
    OutboxItem.objects.filter(pk=item.pk).update(next_attempt_at=timezone.now())
    counts = relay()

    # Then its email is sent once; the fresh one waits for its own message
    assert counts["published"] == 1
    [message] = mail.outbox
    assert f"#{left_behind.object_id}" in message.subject
    left_behind.refresh_from_db()
    fresh.refresh_from_db()
    assert (left_behind.status, fresh.status) == (Notification.Status.SENT, Notification.Status.PENDING)
    assert relay()["published"] == 0
    assert len(mail.outbox) == 1
