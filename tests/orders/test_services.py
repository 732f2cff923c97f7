"""Order service rules, with process_order run eagerly after commit."""

import pytest

from orders.models import Order
from orders.services import (
    IdempotencyKeyReused,
    OrderNotCancellable,
    cancel_order,
    place_order,
)
from tests.factories import ProductFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def place(django_capture_on_commit_callbacks):
    """place_order, then publish what its commit enqueued (process_order, run eagerly).

    What process_order enqueues in turn (the charge) is never run: orders stop at confirmed
    or rejected here; the charge is tested in test_pipeline.py and the payments tests.
    """

    def _place(**kwargs) -> Order:
        with django_capture_on_commit_callbacks() as callbacks:
            order = place_order(**kwargs)
        for publish in callbacks:
            publish()
        order.refresh_from_db()
        return order

    return _place


def _statuses(order: Order) -> list[tuple[str, str]]:
    return list(order.events.values_list("from_status", "to_status"))


def test_place_order_confirms_and_decrements_stock(place, user, product):
    order = place(owner=user, items=[("MUG-001", 3)])

    assert order.status == Order.Status.CONFIRMED
    assert order.total == product.price * 3
    product.refresh_from_db()
    assert product.stock == 7
    assert _statuses(order) == [("", "pending"), ("pending", "confirmed")]


def test_order_with_one_short_line_is_rejected_without_partial_reservation(place, user):
    plenty = ProductFactory(sku="A-PLENTY", stock=50)
    short = ProductFactory(sku="B-SHORT", stock=1)
    also_plenty = ProductFactory(sku="C-PLENTY", stock=50)

    order = place(owner=user, items=[("A-PLENTY", 5), ("B-SHORT", 2), ("C-PLENTY", 5)])

    assert order.status == Order.Status.REJECTED
    for product, stock in ((plenty, 50), (short, 1), (also_plenty, 50)):
        product.refresh_from_db()
        assert product.stock == stock, product.sku
    assert order.events.last().note == "out of stock: B-SHORT"


def test_same_idempotency_key_returns_the_same_order(place, user, product):
    first = place(owner=user, items=[("MUG-001", 2)], idempotency_key="key-1")
    again = place(owner=user, items=[("MUG-001", 2)], idempotency_key="key-1")

    assert again.pk == first.pk
    assert Order.objects.count() == 1
    product.refresh_from_db()
    assert product.stock == 8


def test_same_idempotency_key_from_another_owner_is_another_order(place, user, other_user, product):
    mine = place(owner=user, items=[("MUG-001", 1)], idempotency_key="key-1")
    theirs = place(owner=other_user, items=[("MUG-001", 1)], idempotency_key="key-1")

    assert theirs.pk != mine.pk
    assert theirs.owner == other_user


def test_same_idempotency_key_with_other_items_is_refused(place, user, product):
    place(owner=user, items=[("MUG-001", 2)], idempotency_key="key-1")

    with pytest.raises(IdempotencyKeyReused):
        place(owner=user, items=[("MUG-001", 3)], idempotency_key="key-1")

    assert Order.objects.count() == 1
    product.refresh_from_db()
    assert product.stock == 8


def test_cancel_pending_order(user, product):
    # Not executing the on-commit callbacks leaves the order pending.
    order = place_order(owner=user, items=[("MUG-001", 2)])

    cancelled = cancel_order(order_id=order.pk, owner=user)

    assert cancelled.status == Order.Status.CANCELLED
    order.refresh_from_db()
    assert order.status == Order.Status.CANCELLED
    assert _statuses(order)[-1] == ("pending", "cancelled")
    product.refresh_from_db()
    assert product.stock == 10


def test_cancel_confirmed_order_releases_stock(place, user):
    mug = ProductFactory(sku="MUG", stock=10)
    cup = ProductFactory(sku="CUP", stock=4)
    order = place(owner=user, items=[("MUG", 3), ("CUP", 4)])
    assert order.status == Order.Status.CONFIRMED

    cancel_order(order_id=order.pk, owner=user)

    order.refresh_from_db()
    assert order.status == Order.Status.CANCELLED
    assert _statuses(order)[-1] == ("confirmed", "cancelled")
    mug.refresh_from_db()
    cup.refresh_from_db()
    assert (mug.stock, cup.stock) == (10, 4)


def test_cancel_rejected_order_is_refused_and_changes_nothing(place, user, product):
    order = place(owner=user, items=[("MUG-001", 11)])
    assert order.status == Order.Status.REJECTED

    with pytest.raises(OrderNotCancellable):
        cancel_order(order_id=order.pk, owner=user)

    order.refresh_from_db()
    assert order.status == Order.Status.REJECTED
    assert order.events.count() == 2
    product.refresh_from_db()
    assert product.stock == 10


def test_cancel_twice_releases_stock_once(place, user, product):
    order = place(owner=user, items=[("MUG-001", 4)])
    cancel_order(order_id=order.pk, owner=user)

    with pytest.raises(OrderNotCancellable):
        cancel_order(order_id=order.pk, owner=user)

    product.refresh_from_db()
    assert product.stock == 10


def test_cancel_someone_elses_order_is_not_found(user, other_user, product):
    order = place_order(owner=user, items=[("MUG-001", 1)])

    with pytest.raises(Order.DoesNotExist):
        cancel_order(order_id=order.pk, owner=other_user)

    order.refresh_from_db()
    assert order.status == Order.Status.PENDING
