"""What payments do when their own work fails for good (core.outbox.work_failed)."""

from typing import Any

from django.conf import settings
from django.db import transaction
from django.dispatch import receiver

from core import outbox
from core.models import OutboxItem

from . import services
from .models import Subscription

CHARGE_SUBSCRIPTION = "payments.tasks.charge_subscription"
PROCESS_WEBHOOK = "payments.tasks.process_webhook"

# A provider event is processed once the provider answers again, however long it was away:
# its charge may be one the shop does not know about yet.
outbox.resume_after_failure(PROCESS_WEBHOOK, seconds=settings.WEBHOOK_RESUME_SECONDS)


@receiver(outbox.work_failed, dispatch_uid="payments.receivers.subscription_charge_failed")
def subscription_charge_failed(sender: Any, item: OutboxItem, reason: str, **kwargs: Any) -> None:
    """A period's charge failed for good: its payment needs attention and the subscription is past due, once."""
    if item.task_name != CHARGE_SUBSCRIPTION or len(item.args) != 2:
        return
    subscription_id, billing_period = item.args
    services.mark_needs_attention(reason=reason, subscription_id=subscription_id, billing_period=billing_period)
    with transaction.atomic():
        Subscription.objects.filter(pk=subscription_id, status=Subscription.Status.ACTIVE).update(
            status=Subscription.Status.PAST_DUE
        )
