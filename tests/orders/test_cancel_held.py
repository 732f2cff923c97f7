"""A shopper cancels an order held on the way where nothing of theirs is at stake: held before its stock was
reserved (process_order failed for good), or paid and held before the warehouse has it (refunded in full, as a
paid order is). Held on the way to payment, the charge needs staff first: refused, as before.

The API's and the page's `can_cancel` say what `cancel_order` does (before, the model said no to every hold, so a
paid order held before the hand-over was cancellable by the API but offered no button, and one held from
pending was not cancellable at all).
"""

import pytest

from orders import services
from orders.models import Order, StockMovement
from orders.selectors import order_get_for
from payments.models import Refund
from tests.concurrency import run_concurrently
from tests.factories import OrderEventFactory, OrderFactory

pytestmark = pytest.mark.django_db

ORDERS = "/api/orders/"


def held(user, step: str, *, before: tuple[str, ...] = ()) -> Order:
    """An order of 2 mugs whose `step` failed for good, after the steps `before` ran."""
    order = services.place_order(owner=user, items=[("MUG-001", 2)])
    if "process" in before:
        services.process_order(order_id=order.pk)
    if "charge" in before:
        services.charge_order(order_id=order.pk)
    services.hold_stuck_order(order_id=order.pk, task_name=f"orders.tasks.{step}", reason="ConnectionError")
    order.refresh_from_db()
    assert order.status == Order.Status.ON_HOLD
    return order


def can_cancel(api_client, order: Order) -> bool:
    return api_client.get(f"{ORDERS}{order.pk}/").json()["can_cancel"]


def test_an_order_held_before_its_stock_was_reserved_is_cancelled_by_its_owner_and_staff_cannot_retry_it(
    api_client, user, product
):
    order = held(user, "process_order")
    assert can_cancel(api_client, order) is True
    assert order_get_for(owner=user, order_id=order.pk).can_cancel is True

    response = api_client.post(f"{ORDERS}{order.pk}/cancel/")

    assert response.status_code == 200, response.content
    assert (response.json()["status"], response.json()["can_cancel"]) == ("cancelled", False)
    product.refresh_from_db()
    assert product.stock == 10 and not StockMovement.objects.filter(order=order).exists()
    with pytest.raises(services.NotOnHold):
        services.retry_held_order(order_id=order.pk)
    assert Order.objects.get(pk=order.pk).status == Order.Status.CANCELLED


def test_the_order_page_offers_cancel_for_an_order_held_before_its_stock_was_reserved(client, user, product):
    order = held(user, "process_order")
    client.force_login(user)

    page = client.get(f"/orders/{order.pk}/").content.decode()

    assert f'<form method="post" action="/orders/{order.pk}/cancel/" id="cancel-form" >' in page


def test_an_order_held_on_the_way_to_payment_is_not_cancellable(api_client, user, product):
    order = held(user, "charge_order", before=("process",))
    assert can_cancel(api_client, order) is False

    response = api_client.post(f"{ORDERS}{order.pk}/cancel/")

    assert response.status_code == 409, response.content
    assert Order.objects.get(pk=order.pk).status == Order.Status.ON_HOLD
    with pytest.raises(services.OrderNotCancellable):
        services.cancel_order(order_id=order.pk, owner=user)


def test_a_paid_order_held_before_the_hand_over_offers_cancel_and_is_refunded_in_full(
    api_client, user, product, sandbox
):
    order = held(user, "sync_to_fulfillment", before=("process", "charge"))
    assert not order.fulfillment_key
    assert can_cancel(api_client, order) is True

    response = api_client.post(f"{ORDERS}{order.pk}/cancel/")

    assert response.status_code == 200, response.content
    assert response.json()["status"] == "cancelled"
    assert [refund.amount for refund in Refund.objects.filter(payment__order=order)] == [order.total]


def test_a_paid_order_held_once_the_hand_over_began_is_not_cancellable(api_client, user, product, sandbox):
    order = held(user, "sync_to_fulfillment", before=("process", "charge"))
    Order.objects.filter(pk=order.pk).update(fulfillment_key="ship_" + "0" * 32)
    assert can_cancel(api_client, order) is False

    assert api_client.post(f"{ORDERS}{order.pk}/cancel/").status_code == 409


@pytest.mark.django_db(transaction=True)
def test_the_owner_cancelling_while_staff_retry_the_held_order_releases_what_was_reserved_once(user, product):
    """Both take the order's lock. The cancel first: the retry is refused and nothing was reserved. The retry first:
    the order goes back to pending and its next steps run after the commit (here at once, in the retrying thread);
    the cancel then finds it pending, confirmed (stock released) or already handed over (refused)."""
    outcomes = set()
    for _ in range(6):
        # Made directly: here each commit runs what it dispatches, so place_order would run the whole pipeline.
        order = OrderFactory(owner=user, status=Order.Status.ON_HOLD, item__product=product, item__quantity=2)
        OrderEventFactory(order=order, from_status=Order.Status.PENDING, to_status=Order.Status.ON_HOLD)

        def act(i: int, order_id: int = order.pk) -> str:
            try:
                if i == 0:
                    return services.cancel_order(order_id=order_id, owner=user).status
                services.retry_held_order(order_id=order_id)
                return "retried"
            except (services.NotOnHold, services.OrderNotCancellable) as refused:
                return type(refused).__name__

        cancel, retry = run_concurrently(2, act)
        outcomes.add((cancel, retry))
        assert (cancel, retry) in {
            ("cancelled", "NotOnHold"),
            ("cancelled", "retried"),
            ("OrderNotCancellable", "retried"),
        }
        order.refresh_from_db()
        moved = sum(StockMovement.objects.filter(order=order).values_list("delta", flat=True))
        if cancel == "cancelled":
            assert (order.status, moved) == (Order.Status.CANCELLED, 0)
        else:
            assert order.status != Order.Status.CANCELLED and moved == -2
    product.refresh_from_db()
    assert product.stock == 10 + sum(StockMovement.objects.values_list("delta", flat=True)), outcomes
