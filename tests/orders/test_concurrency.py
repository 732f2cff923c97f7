"""Concurrent orders against the real PostgreSQL: no oversell, one order per idempotency key."""

import threading
from collections.abc import Callable
from unittest import mock

import pytest
from django.db import connection

from orders.models import Order, OrderEvent
from orders.services import place_order
from tests.factories import ProductFactory, UserFactory

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def charge_dispatch():
    """Orders stop at confirmed here: the charge that follows is the payments tests' business."""
    with mock.patch("payments.tasks.charge_order.delay") as patched:
        yield patched


def run_at_once(count: int, work: Callable[[int], object]) -> list[object]:
    """Run work(i) in `count` threads released together; return the results, raise the first error."""
    barrier = threading.Barrier(count, timeout=10)
    results: list[object] = [None] * count
    errors: list[BaseException] = []

    def target(i: int) -> None:
        try:
            barrier.wait()
            results[i] = work(i)
        except BaseException as exc:
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=target, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads), "a thread is stuck"
    if errors:
        raise errors[0]
    return results


def test_concurrent_orders_never_oversell():
    product = ProductFactory(sku="LAST-TEN", stock=10)
    shoppers = UserFactory.create_batch(4)

    # Each commit runs process_order eagerly in its own thread, on its own connection.
    orders = run_at_once(40, lambda i: place_order(owner=shoppers[i % 4], items=[("LAST-TEN", 1)]))

    assert len({order.pk for order in orders}) == 40
    statuses = list(Order.objects.values_list("status", flat=True))
    assert statuses.count(Order.Status.CONFIRMED) == 10
    assert statuses.count(Order.Status.REJECTED) == 30
    product.refresh_from_db()
    assert product.stock == 0
    assert OrderEvent.objects.filter(to_status=Order.Status.CONFIRMED).count() == 10


def test_concurrent_requests_with_the_same_idempotency_key_make_one_order():
    product = ProductFactory(sku="MUG", stock=100)
    shopper = UserFactory()

    orders = run_at_once(10, lambda i: place_order(owner=shopper, items=[("MUG", 2)], idempotency_key="double-click"))

    assert {order.pk for order in orders} == {Order.objects.get().pk}
    product.refresh_from_db()
    assert product.stock == 98
    assert OrderEvent.objects.filter(to_status=Order.Status.CONFIRMED).count() == 1
