"""What payments do when their own work fails for good (core.outbox.work_failed)."""

from typing import Any

from django.conf import settings
from django.db import transaction
from django.dispatch import receiver

from core import outbox
from core.models import OutboxItem

from . import services
from .models import Payment, Subscription

CHARGE_SUBSCRIPTION = "payments.tasks.charge_subscription"
PROCESS_WEBHOOK = "payments.tasks.process_webhook"
REFUND_PAYMENT = "payments.tasks.refund_payment"

# A provider event is processed once the provider answers again, however long it was away:
# its charge may be one the shop does not know about yet.
outbox.resume_after_failure(PROCESS_WEBHOOK, seconds=settings.WEBHOOK_RESUME_SECONDS)
# A refund stays owed however long the provider is away: asked again, with the same key, until it answers.
outbox.resume_after_failure(REFUND_PAYMENT, seconds=settings.WEBHOOK_RESUME_SECONDS)


@receiver(outbox.work_failed, dispatch_uid="payments.receivers.subscription_charge_failed")
def subscription_charge_failed(sender: Any, item: OutboxItem, reason: str, **kwargs: Any) -> None:
    """A period's charge failed for good: its payment needs attention and the subscription is past due, once.

    The message carries (subscription id, period) or, for a retry (payments/dunning.py), the attempt too.
    """
    if item.task_name != CHARGE_SUBSCRIPTION or len(item.args) not in (2, 3):
        return
    subscription_id, billing_period, *rest = item.args
    attempt = rest[0] if rest else 1
    # mark_needs_attention takes the period's newest try: only when it is this one (not a later try in flight).
    newest = (
        Payment.objects.filter(subscription_id=subscription_id, billing_period=billing_period)
        .order_by("-attempt")
        .values_list("attempt", flat=True)
        .first()
    )
    if newest is not None and newest != attempt:
        return
    services.mark_needs_attention(reason=reason, subscription_id=subscription_id, billing_period=billing_period)
    with transaction.atomic():
        Subscription.objects.filter(pk=subscription_id, status=Subscription.Status.ACTIVE).update(
            status=Subscription.Status.PAST_DUE
        )
