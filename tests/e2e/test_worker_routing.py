"""Routing, proven with a real worker: the critical worker processes orders and nothing else."""

import pytest

from config.celery import app
from orders.models import Order, OrderEvent
from orders.services import place_order
from tests.brokers import on_both_brokers
from tests.factories import ProductFactory, UserFactory
from tests.stack import wait_for


def queue_of(task_name: str) -> str:
    return app.amqp.router.route({}, task_name)["queue"].name


def test_task_routes():
    assert queue_of("orders.tasks.process_order") == "critical"
    assert queue_of("orders.tasks.charge_order") == "critical"
    assert queue_of("orders.tasks.sync_to_fulfillment") == "critical"
    assert queue_of("payments.tasks.charge_subscription") == "critical"
    assert queue_of("payments.tasks.process_webhook") == "critical"
    assert queue_of("reports.tasks.generate_report") == "bulk"
    assert queue_of("notifications.tasks.send_notification") == "default"
    # The relay must not wait behind a backlog of the work it publishes.
    assert queue_of("core.tasks.relay_outbox") == "default"
    assert queue_of("anything.else") == "default"


@pytest.mark.worker
@pytest.mark.django_db(transaction=True)
@on_both_brokers
def test_critical_worker_carries_orders_to_fulfilled_and_leaves_other_queues_alone(start_worker, broker, sandbox):
    product = ProductFactory(sku="ROUTED", stock=5)
    shopper = UserFactory()
    worker = start_worker("critical")
    queues = app.control.inspect([worker.nodename], timeout=15, limit=1).active_queues()
    assert [queue["name"] for queue in queues[worker.nodename]] == ["critical"]

    app.send_task("notifications.tasks.nothing", queue="default")
    wait_for(lambda: broker.depth("default") == 1, 5, "the message on default")

    order = place_order(owner=shopper, items=[("ROUTED", 2)])  # commits: the message goes to critical

    # process_order, charge_order and sync_to_fulfillment all run on the critical worker.
    wait_for(
        lambda: Order.objects.get(pk=order.pk).status == Order.Status.FULFILLED,
        timeout=30,
        what=f"the worker to carry order {order.pk} to fulfilled",
    )
    assert list(OrderEvent.objects.filter(order=order).values_list("to_status", flat=True)) == [
        "pending",
        "confirmed",
        "paid",
        "fulfilled",
    ]
    product.refresh_from_db()
    assert product.stock == 3
    # The worker has been consuming all along, yet every message on default is untouched:
    # the one sent first, then the order's notification emails, all waiting for a default worker.
    waiting = broker.task_names("default")
    assert waiting[0] == "notifications.tasks.nothing"
    assert set(waiting) <= {"notifications.tasks.nothing", "notifications.tasks.send_notification"}
