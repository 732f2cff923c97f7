"""process_order is an outbox item of the order's commit: one per order, published after commit, relayed if missed."""

from unittest import mock

import pytest
from django.db import transaction
from django.utils import timezone

from core.models import OutboxItem
from core.outbox import relay
from orders import tasks
from orders.models import Order, OrderEvent
from orders.services import cancel_order, place_order, process_order
from tests.ops.support import queued
from tests.stack import unreachable_broker

pytestmark = pytest.mark.django_db

PROCESS = "orders.tasks.process_order"
CHARGE = "orders.tasks.charge_order"


class Boom(Exception):
    pass


def outbox_items(task_name: str, order: Order):
    return OutboxItem.objects.filter(task_name=task_name, args=[order.pk])


def message_ids(broker, queue: str = "critical") -> list[str]:
    """The task ids of the messages waiting in a queue of the real broker, oldest first."""
    return [message["headers"]["id"] for message in queued(broker, queue)]


def make_due(item: OutboxItem) -> None:
    """Time passes: the item's next attempt is due now."""
    OutboxItem.objects.filter(pk=item.pk).update(next_attempt_at=timezone.now())


def test_api_order_enqueues_process_order_once_and_publishes_it_after_commit(
    api_client, user, product, broker, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        response = api_client.post(
            "/api/orders/", {"items": [{"sku": "MUG-001", "quantity": 2}]}, content_type="application/json"
        )
        assert response.status_code == 201, response.content
        # Still inside the transaction: the item is written, nothing is published yet.
        assert list(OutboxItem.objects.values_list("task_name", "state")) == [(PROCESS, OutboxItem.State.PENDING)]
        assert message_ids(broker) == []

    order = Order.objects.get(owner=user)
    assert response.json()["id"] == order.id
    assert len(callbacks) == 1
    item = OutboxItem.objects.get()
    # Published, and nothing written back: the item stays pending until its task finishes.
    assert (item.task_name, item.args, item.state, item.attempts) == (PROCESS, [order.id], OutboxItem.State.PENDING, 1)
    [message] = queued(broker, "critical")
    assert message["headers"]["id"] == str(item.task_id)
    assert message["headers"]["task"] == PROCESS
    assert message["body"][0] == [order.id]


def test_page_order_enqueues_process_order_once_and_publishes_it_after_commit(
    client, user, product, broker, django_capture_on_commit_callbacks
):
    client.force_login(user)

    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        response = client.post("/orders/new/", {"qty-MUG-001": "2", "idempotency_key": "form-1"})
        assert response.status_code == 302, response.content.decode()
        assert OutboxItem.objects.get().state == OutboxItem.State.PENDING
        assert message_ids(broker) == []

    order = Order.objects.get(owner=user)
    assert response["Location"] == f"/orders/{order.id}/"
    assert list(order.items.values_list("sku", "quantity")) == [("MUG-001", 2)]
    assert len(callbacks) == 1
    item = OutboxItem.objects.get()
    assert (item.task_name, item.args, item.state, item.attempts) == (PROCESS, [order.id], OutboxItem.State.PENDING, 1)
    assert message_ids(broker) == [str(item.task_id)]


def test_repeated_idempotency_key_enqueues_nothing_more(
    api_client, product, broker, django_capture_on_commit_callbacks
):
    body = {"items": [{"sku": "MUG-001", "quantity": 1}]}
    for expected_callbacks in (1, 0):
        with django_capture_on_commit_callbacks(execute=True) as callbacks:
            response = api_client.post(
                "/api/orders/", body, content_type="application/json", HTTP_IDEMPOTENCY_KEY="same-key"
            )
        assert response.status_code == 201, response.content
        assert len(callbacks) == expected_callbacks

    order = Order.objects.get()
    item = outbox_items(PROCESS, order).get()
    assert OutboxItem.objects.count() == 1
    assert message_ids(broker) == [str(item.task_id)]


def test_rolled_back_transaction_enqueues_nothing(user, product, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        with pytest.raises(Boom):
            with transaction.atomic():
                place_order(owner=user, items=[("MUG-001", 1)])
                assert OutboxItem.objects.filter(task_name=PROCESS).count() == 1
                raise Boom

    assert callbacks == []
    assert not OutboxItem.objects.exists()
    assert not Order.objects.exists()


def test_task_error_after_commit_is_raised_not_swallowed(user, product, django_capture_on_commit_callbacks):
    # Eager mode re-raises task errors; the after-commit publish must not hide them
    # (only an unreachable broker is tolerated there).
    with mock.patch("orders.services.process_order", side_effect=Boom):
        with pytest.raises(Boom):
            with django_capture_on_commit_callbacks(execute=True):
                order = place_order(owner=user, items=[("MUG-001", 1)])

    # Not marked published: the relay tries it again.
    assert outbox_items(PROCESS, order).get().state == OutboxItem.State.PENDING


# --- Redelivery ---------------------------------------------------------------


@pytest.fixture
def pending_order(user, product):
    # The after-commit publish is not run: the order waits for its message.
    return place_order(owner=user, items=[("MUG-001", 3)])


def test_duplicate_delivery_reserves_stock_once(pending_order, product):
    assert tasks.process_order.delay(pending_order.id).get() == Order.Status.CONFIRMED
    assert tasks.process_order.delay(pending_order.id).get() == Order.Status.CONFIRMED

    product.refresh_from_db()
    assert product.stock == 7
    assert OrderEvent.objects.filter(order=pending_order, to_status=Order.Status.CONFIRMED).count() == 1
    assert pending_order.events.count() == 2
    # The step after confirmed is enqueued once, not once per delivery.
    assert outbox_items(CHARGE, pending_order).count() == 1


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
    assert not outbox_items(CHARGE, order).exists()


def test_redelivery_after_cancellation_does_not_reserve(pending_order, user, product):
    cancel_order(order_id=pending_order.id, owner=user)

    assert tasks.process_order.delay(pending_order.id).get() == Order.Status.CANCELLED

    product.refresh_from_db()
    assert product.stock == 10
    assert not OrderEvent.objects.filter(order=pending_order, to_status=Order.Status.CONFIRMED).exists()
    assert not outbox_items(CHARGE, pending_order).exists()


def test_delivery_for_a_missing_order_is_a_no_op(pending_order, product):
    missing_id = pending_order.id + 1000

    assert tasks.process_order.delay(missing_id).get() is None
    product.refresh_from_db()
    assert product.stock == 10


# --- Work the fast path missed: the relay --------------------------------------


def test_relay_processes_an_order_whose_commit_never_published_once_its_grace_is_over(user, product):
    # Given two committed orders whose after-commit publish never ran (the process died right after commit)
    missed = place_order(owner=user, items=[("MUG-001", 2)])
    fresh = place_order(owner=user, items=[("MUG-001", 1)])
    make_due(outbox_items(PROCESS, missed).get())

    # When the relay runs (tasks run eagerly here)
    counts = relay()

    # Then only the item past its grace is published, and its order is processed
    assert counts["published"] == 1
    missed.refresh_from_db()
    assert missed.status == Order.Status.CONFIRMED
    assert outbox_items(PROCESS, missed).get().state == OutboxItem.State.DONE
    fresh.refresh_from_db()
    assert fresh.status == Order.Status.PENDING
    assert outbox_items(PROCESS, fresh).get().state == OutboxItem.State.PENDING
    product.refresh_from_db()
    assert product.stock == 8

    # And a second run finds nothing due
    assert relay()["published"] == 0
    product.refresh_from_db()
    assert product.stock == 8


def test_relay_leaves_a_published_charge_alone_until_the_broker_loses_its_message(
    user, product, broker, django_capture_on_commit_callbacks
):
    # Given a confirmed order whose charge was published (queued, running or waiting for a Celery retry)
    order = place_order(owner=user, items=[("MUG-001", 1)])
    with django_capture_on_commit_callbacks(execute=True):
        process_order(order_id=order.pk)
    charge = outbox_items(CHARGE, order).get()
    assert charge.state == OutboxItem.State.PENDING
    assert message_ids(broker).count(str(charge.task_id)) == 1

    # While the broker holds its message, the relay publishes nothing, however long it waits: once due, the
    # item is marked published
    make_due(charge)
    assert relay()["published"] == 0
    charge.refresh_from_db()
    assert charge.state == OutboxItem.State.PUBLISHED
    assert relay()["published"] == 0
    assert message_ids(broker).count(str(charge.task_id)) == 1

    # Once the broker lost its data (a restart without persistence), it is published again, under the same task id
    broker.flushdb()
    assert relay()["published"] == 1
    charge.refresh_from_db()
    assert (charge.state, charge.attempts) == (OutboxItem.State.PUBLISHED, 2)
    assert message_ids(broker).count(str(charge.task_id)) == 1
    # So is the confirmation email's item, whose message went too, once its grace is over
    email = OutboxItem.objects.get(task_name="notifications.tasks.send_notification")
    assert (email.state, relay()["published"]) == (OutboxItem.State.PENDING, 0)
    make_due(email)
    assert relay()["published"] == 1
    email.refresh_from_db()
    assert (email.state, email.attempts) == (OutboxItem.State.PUBLISHED, 2)


# --- Broker down after commit ---------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_order_committed_while_the_broker_is_down_answers_and_the_relay_publishes_it_later(
    api_client, user, product, broker, caplog
):
    # Given the broker is unreachable when the order commits (a real commit: the fast path runs in the request)
    with unreachable_broker():
        response = api_client.post(
            "/api/orders/", {"items": [{"sku": "MUG-001", "quantity": 2}]}, content_type="application/json"
        )
        failed_at = timezone.now()

    # Then the request still answers, and the item stays pending for a later attempt
    assert response.status_code == 201, response.content
    order = Order.objects.get(owner=user)
    assert order.status == Order.Status.PENDING
    item = outbox_items(PROCESS, order).get()
    assert item.state == OutboxItem.State.PENDING
    assert item.attempts == 0
    assert item.last_error.startswith("broker unreachable")
    assert item.next_attempt_at > failed_at
    assert f"outbox item {item.pk} ({PROCESS}) stays pending" in caplog.text
    assert relay()["published"] == 0
    assert message_ids(broker) == []

    # When the broker is back and the item is due, the relay publishes it once, under the item's task id
    make_due(item)
    assert relay()["published"] == 1
    item.refresh_from_db()
    assert (item.state, item.attempts) == (OutboxItem.State.PUBLISHED, 1)
    [message] = queued(broker, "critical")
    assert message["headers"]["id"] == str(item.task_id)
    assert message["body"][0] == [order.pk]

    # And a worker running that message processes the order and finishes the item
    tasks.process_order.apply(args=message["body"][0], task_id=message["headers"]["id"])
    order.refresh_from_db()
    assert order.status == Order.Status.CONFIRMED
    item.refresh_from_db()
    assert item.state == OutboxItem.State.DONE
