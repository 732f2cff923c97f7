"""process_order is dispatched once per placed order, only after commit, and survives redelivery."""

from contextlib import contextmanager
from datetime import timedelta
from unittest import mock

import pytest
from django.db import transaction
from django.utils import timezone

from orders import tasks
from orders.models import Order, OrderEvent
from orders.services import cancel_order, place_order, redispatch_stale_orders
from project.celery import app

pytestmark = pytest.mark.django_db


class Boom(Exception):
    pass


@pytest.fixture(autouse=True)
def charge_dispatch():
    """Orders stop at confirmed here: the charge that follows is the payments tests' business."""
    with mock.patch("payments.tasks.charge_order.delay") as patched:
        yield patched


@pytest.fixture
def delay():
    with mock.patch("orders.tasks.process_order.delay") as patched:
        yield patched


def test_api_order_dispatches_process_order_once_after_commit(
    api_client, user, product, delay, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        response = api_client.post(
            "/api/orders/", {"items": [{"sku": "MUG-001", "quantity": 2}]}, content_type="application/json"
        )
        assert response.status_code == 201, response.content
        # Still inside the transaction: nothing may be published yet.
        delay.assert_not_called()

    order = Order.objects.get(owner=user)
    assert response.json()["id"] == order.id
    assert len(callbacks) == 1
    delay.assert_called_once_with(order.id)


def test_page_order_dispatches_process_order_once_after_commit(
    client, user, product, delay, django_capture_on_commit_callbacks
):
    client.force_login(user)

    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        response = client.post("/orders/new/", {"qty-MUG-001": "2", "idempotency_key": "form-1"})
        assert response.status_code == 302, response.content.decode()
        delay.assert_not_called()

    order = Order.objects.get(owner=user)
    assert response["Location"] == f"/orders/{order.id}/"
    assert list(order.items.values_list("sku", "quantity")) == [("MUG-001", 2)]
    assert len(callbacks) == 1
    delay.assert_called_once_with(order.id)


def test_repeated_idempotency_key_dispatches_nothing_more(
    api_client, product, delay, django_capture_on_commit_callbacks
):
    body = {"items": [{"sku": "MUG-001", "quantity": 1}]}
    for _ in range(2):
        with django_capture_on_commit_callbacks(execute=True):
            response = api_client.post(
                "/api/orders/", body, content_type="application/json", HTTP_IDEMPOTENCY_KEY="same-key"
            )
        assert response.status_code == 201, response.content

    order = Order.objects.get()
    delay.assert_called_once_with(order.id)


def test_rolled_back_transaction_dispatches_nothing(user, product, delay, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        with pytest.raises(Boom):
            with transaction.atomic():
                place_order(owner=user, items=[("MUG-001", 1)])
                raise Boom

    assert callbacks == []
    delay.assert_not_called()
    assert not Order.objects.exists()


def test_task_error_after_commit_is_raised_not_swallowed(user, product, django_capture_on_commit_callbacks):
    # Eager mode re-raises task errors; the after-commit publish must not hide them
    # (only an unreachable broker is tolerated there).
    with mock.patch("orders.services.process_order", side_effect=Boom):
        with pytest.raises(Boom):
            with django_capture_on_commit_callbacks(execute=True):
                place_order(owner=user, items=[("MUG-001", 1)])


# --- Redelivery ---------------------------------------------------------------


@pytest.fixture
def pending_order(user, product):
    # The on-commit dispatch is not run: the order waits for its message.
    return place_order(owner=user, items=[("MUG-001", 3)])


def test_duplicate_delivery_reserves_stock_once(pending_order, product):
    assert tasks.process_order.delay(pending_order.id).get() == Order.Status.CONFIRMED
    assert tasks.process_order.delay(pending_order.id).get() == Order.Status.CONFIRMED

    product.refresh_from_db()
    assert product.stock == 7
    assert OrderEvent.objects.filter(order=pending_order, to_status=Order.Status.CONFIRMED).count() == 1
    assert pending_order.events.count() == 2


def test_duplicate_delivery_of_rejected_order_changes_nothing(user, product):
    order = place_order(owner=user, items=[("MUG-001", 11)])

    assert tasks.process_order.delay(order.id).get() == Order.Status.REJECTED
    product.refresh_from_db()
    product.stock = 11
    product.save(update_fields=["stock"])
    assert tasks.process_order.delay(order.id).get() == Order.Status.REJECTED

    product.refresh_from_db()
    assert product.stock == 11
    assert order.events.count() == 2


def test_redelivery_after_cancellation_does_not_reserve(pending_order, user, product):
    cancel_order(order_id=pending_order.id, owner=user)

    assert tasks.process_order.delay(pending_order.id).get() == Order.Status.CANCELLED

    product.refresh_from_db()
    assert product.stock == 10
    assert not OrderEvent.objects.filter(order=pending_order, to_status=Order.Status.CONFIRMED).exists()


def test_delivery_for_a_missing_order_is_a_no_op(pending_order, product):
    missing_id = pending_order.id + 1000

    assert tasks.process_order.delay(missing_id).get() is None
    product.refresh_from_db()
    assert product.stock == 10


# --- Broker down after commit ---------------------------------------------------


@contextmanager
def unreachable_broker():
    """Publishing goes to a port where nothing listens, as when Redis is down."""
    saved_conf = {key: app.conf[key] for key in ("task_always_eager", "broker_url")}
    saved_pools = (app._pool, app.amqp._producer_pool)
    app.conf.update(task_always_eager=False, broker_url="redis://127.0.0.1:9/15")
    # Drop the cached connection pools so the next publish connects to that URL.
    app._pool = app.amqp._producer_pool = None
    try:
        yield
    finally:
        app.conf.update(saved_conf)
        app._pool, app.amqp._producer_pool = saved_pools


def test_order_committed_while_broker_is_down_answers_and_is_swept_later(
    api_client, user, product, caplog, django_capture_on_commit_callbacks
):
    with unreachable_broker(), django_capture_on_commit_callbacks(execute=True):
        response = api_client.post(
            "/api/orders/", {"items": [{"sku": "MUG-001", "quantity": 2}]}, content_type="application/json"
        )

    assert response.status_code == 201, response.content
    order = Order.objects.get(owner=user)
    assert order.status == Order.Status.PENDING
    assert f"orders.tasks.process_order({order.id},) not published after commit" in caplog.text

    # The broker is back: the sweep finds the order and it is processed.
    Order.objects.filter(pk=order.pk).update(updated_at=timezone.now() - timedelta(hours=1))
    assert redispatch_stale_orders() == [order.id]
    order.refresh_from_db()
    assert order.status == Order.Status.CONFIRMED
