"""Order service rules, with tasks run eagerly after commit."""

from datetime import timedelta
from unittest import mock

import pytest
from django.utils import timezone

from orders.models import Order
from orders.services import (
    IdempotencyKeyReused,
    OrderNotCancellable,
    cancel_order,
    place_order,
    process_order,
    redispatch_stale_orders,
)
from tests.factories import ProductFactory

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def charge_dispatch():
    """Orders stop at confirmed here: the charge that follows is the payments tests' business."""
    with mock.patch("payments.tasks.charge_order.delay") as patched:
        yield patched


@pytest.fixture
def place(django_capture_on_commit_callbacks):
    """place_order, then run what its commit dispatches (process_order, eagerly)."""

    def _place(**kwargs) -> Order:
        with django_capture_on_commit_callbacks(execute=True):
            order = place_order(**kwargs)
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


def _age(order: Order, seconds: int) -> None:
    """Make the order look untouched for that long (the sweep looks at updated_at)."""
    Order.objects.filter(pk=order.pk).update(updated_at=timezone.now() - timedelta(seconds=seconds))


def test_redispatch_picks_only_stuck_orders_older_than_the_cutoff(user, product, settings, charge_dispatch):
    settings.STALE_ORDER_SECONDS = 60
    # None of these runs its on-commit dispatch: as if the broker had been down.
    stale_pending = place_order(owner=user, items=[("MUG-001", 1)])
    fresh_pending = place_order(owner=user, items=[("MUG-001", 1)])
    stale_confirmed = place_order(owner=user, items=[("MUG-001", 1)])
    process_order(order_id=stale_confirmed.pk)
    old_cancelled = place_order(owner=user, items=[("MUG-001", 1)])
    cancel_order(order_id=old_cancelled.pk, owner=user)
    old_rejected = place_order(owner=user, items=[("MUG-001", 100)])
    process_order(order_id=old_rejected.pk)
    for order in (stale_pending, stale_confirmed):
        _age(order, 61)
    for order in (old_cancelled, old_rejected):
        _age(order, 3600)
    _age(fresh_pending, 59)

    with mock.patch("orders.tasks.process_order.delay") as process_dispatch:
        redispatched = redispatch_stale_orders()

    assert redispatched == [stale_pending.pk, stale_confirmed.pk]
    process_dispatch.assert_called_once_with(stale_pending.pk)
    charge_dispatch.assert_called_once_with(stale_confirmed.pk)


def test_redispatched_pending_order_is_processed(user, product):
    order = place_order(owner=user, items=[("MUG-001", 2)])
    _age(order, 3600)

    assert redispatch_stale_orders() == [order.pk]

    order.refresh_from_db()
    assert order.status == Order.Status.CONFIRMED
    product.refresh_from_db()
    assert product.stock == 8
    assert redispatch_stale_orders() == []


def test_redispatch_honours_an_explicit_cutoff(user, product):
    older = place_order(owner=user, items=[("MUG-001", 1)])
    newer = place_order(owner=user, items=[("MUG-001", 1)])
    _age(older, 6 * 60)
    _age(newer, 4 * 60)

    with mock.patch("orders.tasks.process_order.delay") as process_dispatch:
        assert redispatch_stale_orders(older_than=timedelta(minutes=5)) == [older.pk]
        assert redispatch_stale_orders(older_than=timedelta(minutes=3)) == [older.pk, newer.pk]

    assert process_dispatch.call_args_list == [mock.call(older.pk), mock.call(older.pk), mock.call(newer.pk)]


def test_redispatch_leaves_a_charge_that_is_still_retrying_alone(user, product, settings, charge_dispatch):
    from payments.models import Payment

    settings.CHARGE_RETRY_WINDOW_SECONDS = 1800
    retrying = place_order(owner=user, items=[("MUG-001", 1)])
    abandoned = place_order(owner=user, items=[("MUG-001", 1)])
    for order in (retrying, abandoned):
        process_order(order_id=order.pk)
        Payment.objects.create(order=order, amount=order.total, idempotency_key=f"order-{order.pk}")
        _age(order, 3600)
    Payment.objects.filter(order=abandoned).update(updated_at=timezone.now() - timedelta(seconds=1801))

    assert redispatch_stale_orders() == [abandoned.pk]
    charge_dispatch.assert_called_once_with(abandoned.pk)
