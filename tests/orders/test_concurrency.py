"""Concurrent orders against the real PostgreSQL: no oversell, one order per idempotency key.

Every commit publishes its outbox items to the real broker (the `broker` fixture: eager mode
off), where they wait: orders stop at confirmed here; the charge is tested elsewhere.
"""

import pytest

from core.models import OutboxItem
from orders.models import Order, OrderEvent
from orders.services import place_order, process_order
from tests.concurrency import run_concurrently
from tests.factories import ProductFactory, UserFactory
from tests.ops.support import queued

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("broker")]


# tests/test_model_stateful.py imports the helper from here, by its old name.
run_at_once = run_concurrently


def test_concurrent_orders_never_oversell():
    product = ProductFactory(sku="LAST-TEN", stock=10)
    shoppers = UserFactory.create_batch(4)

    def place_and_process(i: int) -> Order:
        # What a worker does with the order's process_order message, in this thread, on its own connection.
        order = place_order(owner=shoppers[i % 4], items=[("LAST-TEN", 1)])
        return process_order(order_id=order.pk)

    orders = run_concurrently(40, place_and_process)

    assert len({order.pk for order in orders}) == 40
    statuses = list(Order.objects.values_list("status", flat=True))
    assert statuses.count(Order.Status.CONFIRMED) == 10
    assert statuses.count(Order.Status.REJECTED) == 30
    product.refresh_from_db()
    assert product.stock == 0
    assert OrderEvent.objects.filter(to_status=Order.Status.CONFIRMED).count() == 10
    confirmed = set(Order.objects.filter(status=Order.Status.CONFIRMED).values_list("pk", flat=True))
    charges = OutboxItem.objects.filter(task_name="orders.tasks.charge_order").values_list("args", flat=True)
    assert sorted(args[0] for args in charges) == sorted(confirmed)


def test_concurrent_requests_with_the_same_idempotency_key_make_one_order_processed_once(broker):
    product = ProductFactory(sku="MUG", stock=100)
    shopper = UserFactory()

    orders = run_concurrently(
        10, lambda i: place_order(owner=shopper, items=[("MUG", 2)], idempotency_key="double-click")
    )

    order = Order.objects.get()
    assert {placed.pk for placed in orders} == {order.pk}
    # One process_order item, published once: the order is reserved once.
    item = OutboxItem.objects.get(task_name="orders.tasks.process_order")
    assert item.args == [order.pk]
    assert [message["headers"]["id"] for message in queued(broker, "critical")] == [str(item.task_id)]
    process_order(order_id=order.pk)
    product.refresh_from_db()
    assert product.stock == 98
    assert OrderEvent.objects.filter(to_status=Order.Status.CONFIRMED).count() == 1
