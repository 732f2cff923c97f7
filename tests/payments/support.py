"""Helpers shared by the payments tests: a claim that stops, a real webhook delivered."""

import re

from django.db import transaction

from orders.models import Order
from payments import services
from payments.models import Payment
from tests.sandbox_fixtures import ReceivedWebhook, WebhookReceiver

# What every provider idempotency key looks like (payments.services.new_idempotency_key).
PAYMENT_KEY = re.compile(r"pay_[0-9a-f]{32}")

WEBHOOK_URL = "/payments/webhooks/provider/"


def claim_and_stop(order: Order) -> Payment:
    """Claim the order's payment as orders.services.charge_order does, and go no further.

    The worker that claimed it died before it called the provider: the payment stays `processing`.
    """
    with transaction.atomic():
        locked = Order.objects.select_for_update().get(pk=order.pk)
        return services.claim_order_payment(order=locked)


def post_webhook(client, hook: ReceivedWebhook):
    """POST to the shop, unchanged, a webhook the sandbox sent (body and signature)."""
    return client.post(
        WEBHOOK_URL,
        data=hook.body,
        content_type="application/json",
        HTTP_SANDBOX_SIGNATURE=hook.headers["Sandbox-Signature"],
    )


def deliver_webhook(client, webhook_receiver: WebhookReceiver, *, charge_id: str):
    """POST to the shop, unchanged, the event the sandbox sent for `charge_id` (body and signature)."""
    [hook] = webhook_receiver.wait_for(lambda event: event["data"]["charge"]["id"] == charge_id)
    return post_webhook(client, hook)
