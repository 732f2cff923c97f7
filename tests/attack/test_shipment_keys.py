"""The warehouse's idempotency key, `shipment-order-<id>`, across shop databases that share one warehouse account.

Issue 12 finding 6 made the provider's keys random because `order-<id>` repeats across databases;
the warehouse key has the same shape.
"""

import pytest

from orders.models import Order
from orders.services import charge_order, place_order, process_order, sync_to_fulfillment
from tests.factories import ProductFactory, UserFactory

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("broker")]


def test_an_order_with_the_id_of_one_shipped_elsewhere_gets_its_own_shipment(sandbox):
    ProductFactory(sku="MUG-001", price="9.00", stock=5)
    order = place_order(owner=UserFactory(), items=[("MUG-001", 1)])
    process_order(order_id=order.pk)
    charge_order(order_id=order.pk)
    # Another shop database on the same warehouse account (staging, a second deployment, a developer's
    # database) already shipped its own order with this id and the same popular item.
    elsewhere = sandbox.post(
        "/v1/shipments",
        {"order_id": order.pk, "items": [{"sku": "MUG-001", "quantity": 1}]},
        key=f"shipment-order-{order.pk}",
    )
    assert elsewhere.status_code == 201

    sync_to_fulfillment(order_id=order.pk)

    order.refresh_from_db()
    shipments = sandbox.summary()["shipments"]
    assert order.status == Order.Status.FULFILLED
    assert shipments["total"] == 2, (
        f"fulfilled by the other database's shipment {elsewhere.json()['id']}: nothing shipped for it ({shipments})"
    )
