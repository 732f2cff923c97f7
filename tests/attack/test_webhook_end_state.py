"""A provider webhook whose processing meets the provider's API down for longer than process_webhook's retries."""

from datetime import timedelta

import pytest
from django.db import transaction
from django.test import override_settings
from django.utils import timezone

from core import outbox
from core.models import OutboxItem
from integrations.errors import ProviderUnavailable
from orders.models import Order
from orders.services import place_order, process_order
from payments import services
from payments.models import WebhookEvent
from tests.factories import ProductFactory, UserFactory
from tests.payments.support import post_webhook

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("broker")]

PROCESS_WEBHOOK = "payments.tasks.process_webhook"


def test_a_webhook_whose_processing_failed_during_a_provider_outage_is_processed_once_it_is_back(
    client, sandbox, webhook_receiver
):
    ProductFactory(sku="HOOK", price="6.00", stock=5)
    order = process_order(order_id=place_order(owner=UserFactory(), items=[("HOOK", 1)]).pk)
    with transaction.atomic():
        payment = services.claim_order_payment(order=Order.objects.select_for_update().get(pk=order.pk))
    # The provider charges, its answer is lost, and its webhook reaches the shop (answered 200, stored once).
    sandbox.set_faults(fail_after_charge_next=1)
    with pytest.raises(ProviderUnavailable):
        services.settle_payment(payment_id=payment.pk)
    [hook] = webhook_receiver.wait_for(lambda event: event["data"]["charge"]["reference"] == payment.idempotency_key)
    response = post_webhook(client, hook)
    assert response.status_code == 200
    event = WebhookEvent.objects.get()
    item = OutboxItem.objects.get(task_name=PROCESS_WEBHOOK, args=[event.pk])

    # The provider's API is then down for longer than process_webhook's retries (5, capped at 16 s: ~30 s in all)
    with override_settings(PAYMENT_PROVIDER_URL="http://127.0.0.1:9"), pytest.raises(ProviderUnavailable):
        services.process_webhook(event_id=event.pk)  # the last of its retries
    outbox.finish_failed(task_id=str(item.task_id), reason="ProviderUnavailable: retrieve")  # core.outbox._task_failed

    # When the provider is back and the relay has run for a while
    for _ in range(3):
        OutboxItem.objects.filter(pk=item.pk).update(next_attempt_at=timezone.now() - timedelta(seconds=1))
        outbox.relay()

    item.refresh_from_db()
    event.refresh_from_db()
    assert item.state in OutboxItem.OPEN, (
        f"the event stays {event.status} and its work item {item.state}: nothing will ever process it"
    )
