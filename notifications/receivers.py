"""Emails follow what happens elsewhere: order status changes and subscription charges, through signals.

Each receiver runs inside the transaction of the change, so the Notification row and its
outbox item commit (or roll back) with it.
"""

from typing import Any

from django.conf import settings
from django.dispatch import receiver

from core import outbox
from orders.models import Order
from orders.pipeline import status_changed
from payments.models import Payment, Refund, Subscription
from payments.refunds import refund_requested, refund_settled
from payments.services import subscription_cancelled_unpaid, subscription_charged

from . import services
from .models import Notification

# A failed send is tried again this much later, by itself, once the retries are spent (a mail outage).
outbox.resume_after_failure("notifications.tasks.send_notification", seconds=settings.NOTIFICATION_RESUME_SECONDS)
outbox.resume_after_failure("notifications.tasks.send_email", seconds=settings.NOTIFICATION_RESUME_SECONDS)


@receiver(status_changed, dispatch_uid="notifications.order_status_changed")
def order_status_changed(sender: Any, order: Order, to_status: str, **kwargs: Any) -> None:
    kind = services.ORDER_STATUS_KINDS.get(to_status)
    if kind:
        services.notify(kind=kind, object_type="order", object_id=order.pk, recipient_id=order.owner_id)


@receiver(subscription_charged, dispatch_uid="notifications.subscription_charged")
def subscription_payment(sender: Any, payment: Payment, subscription: Subscription, **kwargs: Any) -> None:
    kind = services.SUBSCRIPTION_PAYMENT_KINDS.get(payment.status)
    if kind:
        services.notify(kind=kind, object_type="payment", object_id=payment.pk, recipient_id=subscription.owner_id)


@receiver(refund_requested, dispatch_uid="notifications.refund_requested")
@receiver(refund_settled, dispatch_uid="notifications.refund_settled")
def refund_changed(sender: Any, refund: Refund, **kwargs: Any) -> None:
    """The shopper hears of an order's refund when it is asked for and when it is done, once each."""
    kind = services.REFUND_KINDS.get(refund.status)
    order = refund.payment.order if refund.payment.order_id else None
    if kind and order is not None:
        services.notify(kind=kind, object_type="refund", object_id=refund.pk, recipient_id=order.owner_id)


@receiver(subscription_cancelled_unpaid, dispatch_uid="notifications.subscription_cancelled_unpaid")
def subscription_cancelled(sender: Any, subscription: Subscription, **kwargs: Any) -> None:
    services.notify(
        kind=Notification.Kind.SUBSCRIPTION_CANCELLED_UNPAID,
        object_type=Notification.ObjectType.SUBSCRIPTION,
        object_id=subscription.pk,
        recipient_id=subscription.owner_id,
    )
