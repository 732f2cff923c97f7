"""Customer emails, each sent at most once.

`notify` records the intent (one Notification per kind and object, enforced by a
unique constraint) and dispatches the send after commit. `send_notification` sends
while holding the row lock and marks the row sent in that same transaction, so two
deliveries of the task, concurrent or not, send one email.
"""

import logging
import smtplib

from django.conf import settings
from django.core.mail import EmailMultiAlternatives
from django.db import models, transaction
from django.template.loader import render_to_string
from django.utils import timezone

from core import outbox
from core.db import insert_unless_exists, set_prefetched
from core.task_base import TRANSIENT_ERRORS
from orders.models import Order, OrderItem
from payments.models import Payment, Refund, Subscription

from .models import Notification, OutgoingEmail

logger = logging.getLogger(__name__)

# Failures of the mail server or the network on the way to it: worth another attempt.
DELIVERY_ERRORS = (ConnectionError, smtplib.SMTPException, TimeoutError)
# What the send task retries: the mail server or the database being briefly unavailable.
RETRYABLE_ERRORS = (*DELIVERY_ERRORS, *TRANSIENT_ERRORS)

ORDER_STATUS_KINDS: dict[str, str] = {
    Order.Status.CONFIRMED: Notification.Kind.ORDER_CONFIRMED,
    Order.Status.PAID: Notification.Kind.ORDER_PAID,
    Order.Status.PAYMENT_FAILED: Notification.Kind.ORDER_PAYMENT_FAILED,
    Order.Status.FULFILLED: Notification.Kind.ORDER_FULFILLED,
    Order.Status.EXPIRED: Notification.Kind.ORDER_EXPIRED,
}
REFUND_KINDS: dict[str, str] = {
    Refund.Status.REQUESTED: Notification.Kind.REFUND_REQUESTED,
    Refund.Status.SUCCEEDED: Notification.Kind.REFUND_SUCCEEDED,
}
SUBSCRIPTION_PAYMENT_KINDS: dict[str, str] = {
    Payment.Status.SUCCEEDED: Notification.Kind.SUBSCRIPTION_CHARGED,
    Payment.Status.DECLINED: Notification.Kind.SUBSCRIPTION_DECLINED,
}


def notify(*, kind: str, object_type: str, object_id: int, recipient_id: int) -> Notification:
    """Record that the recipient gets the `kind` email about this object; dispatch the send after commit.

    Safe inside the caller's transaction: if it rolls back, neither the row nor the
    send survives. A second call for the same kind and object is a no-op. Two statements
    when new (the row, its outbox item; on a status change the item joins the change's one
    INSERT, `outbox.batched`) and no savepoint: it runs under the order's row lock on every
    status change.
    """
    notification = Notification(kind=kind, object_type=object_type, object_id=object_id, recipient_id=recipient_id)
    with transaction.atomic(savepoint=False):
        if insert_unless_exists(notification, unique=("kind", "object_type", "object_id")):
            outbox.enqueue("notifications.tasks.send_notification", notification.pk)
            return notification
        return Notification.objects.get(kind=kind, object_type=object_type, object_id=object_id)


def _load_object(notification: Notification) -> models.Model | None:
    if notification.object_type == Notification.ObjectType.ORDER:
        # The order and its lines in one SELECT (the lines joined to it): three emails an order (issue 18).
        items = list(OrderItem.objects.select_related("order").filter(order_id=notification.object_id))
        if not items:  # every order has a line; without one, read the order alone
            return Order.objects.filter(pk=notification.object_id).first()
        order = items[0].order
        for item in items:
            item.order = order
        set_prefetched(order, items=items)
        return order
    if notification.object_type == Notification.ObjectType.PAYMENT:
        return Payment.objects.select_related("subscription__plan").filter(pk=notification.object_id).first()
    if notification.object_type == Notification.ObjectType.REFUND:
        return Refund.objects.select_related("payment__payment_method").filter(pk=notification.object_id).first()
    if notification.object_type == Notification.ObjectType.SUBSCRIPTION:
        return Subscription.objects.select_related("plan").filter(pk=notification.object_id).first()
    return None


def _render(notification: Notification, obj: models.Model) -> tuple[str, str, str]:
    """Subject, text body and HTML body from notifications/<kind>_subject.txt, <kind>.txt and <kind>.html."""
    context = {"recipient": notification.recipient, "notification": notification, notification.object_type: obj}
    name = f"notifications/{notification.kind}"
    # A header cannot hold a line break (Django refuses it): the subject is one line.
    subject = " ".join(render_to_string(f"{name}_subject.txt", context).split())
    return subject, render_to_string(f"{name}.txt", context), render_to_string(f"{name}.html", context)


def _fail(notification: Notification, error: str) -> Notification:
    notification.status = Notification.Status.FAILED
    notification.error = error[:500]
    notification.save(update_fields=["status", "error"])
    logger.warning("notification %s not sent: %s", notification.pk, error)
    return notification


def send_notification(*, notification_id: int) -> Notification | None:
    """Send the notification's email unless it was already sent; returns None when the row is gone.

    Raises one of DELIVERY_ERRORS when the mail server cannot take the message (the
    row records the error and stays unsent, so retrying is safe). A recipient without
    an address or an object that no longer exists marks the row failed without sending.
    """
    try:
        with transaction.atomic():
            # The lock is held while sending, and the row is marked sent before it is
            # released: a concurrent delivery waits here, then finds it sent.
            notification = (
                Notification.objects.select_for_update(of=("self",))
                .select_related("recipient")
                .filter(pk=notification_id)
                .first()
            )
            if notification is None:
                logger.warning("send_notification: notification %s does not exist", notification_id)
                return None
            if notification.status == Notification.Status.SENT:
                return notification
            if not notification.recipient.email:
                return _fail(notification, "recipient has no email address")
            obj = _load_object(notification)
            if obj is None:
                return _fail(notification, f"{notification.object_type} {notification.object_id} does not exist")
            subject, body_text, body_html = _render(notification, obj)
            message = EmailMultiAlternatives(
                subject=subject,
                body=body_text,
                from_email=settings.DEFAULT_FROM_EMAIL,
                to=[notification.recipient.email],
            )
            message.attach_alternative(body_html, "text/html")
            message.send()
            notification.subject = subject
            notification.body_text = body_text
            notification.status = Notification.Status.SENT
            notification.sent_at = timezone.now()
            notification.error = ""
            notification.save(update_fields=["subject", "body_text", "status", "sent_at", "error"])
    except DELIVERY_ERRORS as exc:
        # Recorded after the failed transaction rolled back; the caller decides about retrying.
        Notification.objects.filter(pk=notification_id).exclude(status=Notification.Status.SENT).update(
            status=Notification.Status.FAILED, error=f"{type(exc).__name__}: {exc}"[:500]
        )
        raise
    return notification


# --- Emails rendered when asked for (accounts) ----------------------------------------------


def queue_email(*, kind: str, to: str, subject: str, body_text: str, body_html: str = "") -> OutgoingEmail:
    """Store a rendered email; its send follows the commit (the outbox), of the caller's transaction or its own."""
    with transaction.atomic():
        email = OutgoingEmail.objects.create(
            kind=kind[:100], to=to, subject=subject[:255], body_text=body_text, body_html=body_html
        )
        outbox.enqueue("notifications.tasks.send_email", email.pk)
    return email


def send_email(*, email_id: int) -> OutgoingEmail | None:
    """Send a stored email unless it was already sent, then wipe its bodies; None when the row is gone.

    As send_notification: the row lock is held while sending and the row is marked sent in the
    same transaction, so two deliveries send one email. Raises one of DELIVERY_ERRORS when the
    mail server cannot take it (the row stays unsent, retrying is safe).
    """
    try:
        with transaction.atomic():
            email = OutgoingEmail.objects.select_for_update().filter(pk=email_id).first()
            if email is None:
                logger.warning("send_email: email %s does not exist", email_id)
                return None
            if email.status == OutgoingEmail.Status.SENT:
                return email
            message = EmailMultiAlternatives(
                subject=email.subject, body=email.body_text, from_email=settings.DEFAULT_FROM_EMAIL, to=[email.to]
            )
            if email.body_html:
                message.attach_alternative(email.body_html, "text/html")
            message.send()
            # Its one-time link is the recipient's alone: the database keeps no usable copy.
            email.body_text = email.body_html = ""
            email.status = OutgoingEmail.Status.SENT
            email.sent_at = timezone.now()
            email.error = ""
            email.save(update_fields=["body_text", "body_html", "status", "sent_at", "error"])
    except DELIVERY_ERRORS as exc:
        OutgoingEmail.objects.filter(pk=email_id).exclude(status=OutgoingEmail.Status.SENT).update(
            status=OutgoingEmail.Status.FAILED, error=f"{type(exc).__name__}: {exc}"[:500]
        )
        raise
    return email
