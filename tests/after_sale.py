"""Fixtures and helpers for the tests of what happens after the sale (refunds, cancelling a paid order).

Loaded for every test as a pytest plugin (tests/conftest.py): orders of 2 mugs and 1 tee (25.00)
paid at the sandbox, and a staff API client to refund them.
"""

import json
import threading

import pytest
from django.db import connections
from django.test import Client

from accounts.services import issue_api_token
from ops.models import FailedTask
from orders import services
from orders.models import Order, Product
from orders.services import place_order
from payments.models import Refund
from tests.factories import ProductFactory, UserFactory


@pytest.fixture
def products(db):
    """A mug at 10.00 and a tee at 5.00, ten of each in stock."""
    return ProductFactory(sku="MUG", price="10.00", stock=10), ProductFactory(sku="TEE", price="5.00", stock=10)


@pytest.fixture
def fulfilled(user, products, sandbox):
    """An order of 2 mugs and 1 tee (25.00), charged at the sandbox and handed to the warehouse.

    Each step's service is called in turn, as `paid` does. In a unit test what their commits dispatch is not run: the
    steps' outbox items (each step, already run here, the three emails, the payment deadline) stay pending, as after
    a delivery whose success was not recorded yet. Run through the outbox it cost 160 ms a test, for 130 tests. In
    a transactional test the first commit runs the whole pipeline at once, and the later calls find it done.
    """
    order = place_order(owner=user, items=[("MUG", 2), ("TEE", 1)])
    services.process_order(order_id=order.pk)
    services.charge_order(order_id=order.pk)
    services.sync_to_fulfillment(order_id=order.pk)
    order.refresh_from_db()
    assert order.status == Order.Status.FULFILLED
    return order


@pytest.fixture
def paid(user, products, sandbox):
    """An order paid at the sandbox whose hand-over to the warehouse has not begun (its outbox item waits)."""
    order = place_order(owner=user, items=[("MUG", 2), ("TEE", 1)])
    services.process_order(order_id=order.pk)
    services.charge_order(order_id=order.pk)
    order.refresh_from_db()
    assert order.status == Order.Status.PAID and not order.fulfillment_key
    return order


def stock_of(sku: str) -> int:
    return Product.objects.get(sku=sku).stock


def refund_now(captured, **kwargs) -> Refund:
    """orders.services.refund_order, and what its commit dispatched run at once (the refund task, at the sandbox)."""
    with captured(execute=True):
        refund = services.refund_order(**kwargs)
    refund.refresh_from_db()
    return refund


def bearer(user) -> Client:
    """A client that authenticates to the API with a new token of the user's."""
    client = Client()
    client.defaults["HTTP_AUTHORIZATION"] = f"Bearer {issue_api_token(user=user)}"
    return client


@pytest.fixture
def staff_api_client(db) -> Client:
    return bearer(UserFactory(is_staff=True))


def post_refund(client: Client, order: Order, body, key: str | None = None):
    """POST /api/orders/<id>/refunds/ with `body` (an object, or raw text as it is) and an Idempotency-Key."""
    headers = {"HTTP_IDEMPOTENCY_KEY": key} if key is not None else {}
    raw = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return client.post(f"/api/orders/{order.pk}/refunds/", raw, content_type="application/json", **headers)


@pytest.fixture
def dead_letters_forgotten():
    """Deletes, after the test, the dead letters it recorded: ops.services.record_failure commits them on a
    connection of its own, so the test's rollback keeps them and later tests would see them."""
    yield

    def delete() -> None:
        try:
            FailedTask.objects.all().delete()
        finally:
            connections.close_all()

    thread = threading.Thread(target=delete, name="forget-dead-letters")
    thread.start()
    thread.join(30)
