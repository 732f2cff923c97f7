"""A paid order whose hand-over to the warehouse keeps failing: on hold, "we keep trying automatically"."""

from datetime import timedelta

import pytest
from django.utils import timezone

from core import outbox
from core.models import OutboxItem
from orders.services import charge_order, place_order, process_order
from tests.factories import ProductFactory, UserFactory

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("broker")]

SYNC = "orders.tasks.sync_to_fulfillment"


def final_failure(item: OutboxItem, reason: str) -> None:
    """What core.outbox._task_failed does when sync_to_fulfillment has spent its retries."""
    failed, parked = outbox.finish_failed(task_id=str(item.task_id), reason=reason)
    if failed is not None:
        outbox.work_failed.send(sender=OutboxItem, item=failed, reason=reason, by_relay=False, parked=parked)


def test_an_order_told_we_keep_trying_is_still_being_tried(sandbox):
    ProductFactory(sku="SHIP", price="4.00", stock=5)
    order = place_order(owner=UserFactory(), items=[("SHIP", 1)])
    process_order(order_id=order.pk)
    charge_order(order_id=order.pk)
    item = OutboxItem.objects.get(task_name=SYNC, args=[order.pk])

    # The warehouse stays unreachable: every round spends its retries, is parked, and is published again.
    for _ in range(20):
        item.refresh_from_db()
        if item.state == OutboxItem.State.FAILED:
            break
        final_failure(item, "ProviderUnavailable: warehouse unreachable")
        OutboxItem.objects.filter(pk=item.pk, state=OutboxItem.State.PENDING).update(
            next_attempt_at=timezone.now() - timedelta(seconds=1)
        )
        outbox.relay()

    item.refresh_from_db()
    order.refresh_from_db()
    still_tried = OutboxItem.objects.filter(task_name=SYNC, args=[order.pk], state__in=OutboxItem.OPEN).exists()
    print(item.state, item.attempts, order.status, order.hold_reason)
    assert still_tried or "automatically" not in order.hold_reason, (
        f"item {item.state} after {item.attempts} publishes, nothing will try again, "
        f"yet the shopper reads: {order.hold_reason!r}"
    )
