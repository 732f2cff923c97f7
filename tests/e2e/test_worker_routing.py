"""Routing, proven with a real worker: the critical worker processes orders and nothing else."""

import json
import time
from collections.abc import Callable

import pytest

from orders.models import Order, OrderEvent
from orders.services import place_order
from project.celery import app
from tests.factories import ProductFactory, UserFactory

# Charges that follow a confirmation go nowhere: this test must not touch a running sandbox.
NO_PROVIDER = {"PAYMENT_PROVIDER_URL": "http://127.0.0.1:9", "FULFILLMENT_API_URL": "http://127.0.0.1:9"}


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


def queue_of(task_name: str) -> str:
    return app.amqp.router.route({}, task_name)["queue"].name


def test_task_routes():
    assert queue_of("orders.tasks.process_order") == "critical"
    assert queue_of("orders.tasks.redispatch_stale_orders") == "critical"
    assert queue_of("payments.tasks.charge_order") == "critical"
    assert queue_of("reports.tasks.generate_report") == "bulk"
    assert queue_of("notifications.tasks.send_notification") == "default"
    assert queue_of("anything.else") == "default"


@pytest.mark.worker
@pytest.mark.django_db(transaction=True)
def test_critical_worker_confirms_orders_and_leaves_other_queues_alone(start_worker, broker):
    product = ProductFactory(sku="ROUTED", stock=5)
    shopper = UserFactory()
    worker = start_worker("critical", env=NO_PROVIDER)
    queues = app.control.inspect([worker.nodename], timeout=5, limit=1).active_queues()
    assert [queue["name"] for queue in queues[worker.nodename]] == ["critical"]

    app.send_task("notifications.tasks.nothing", queue="default")
    assert broker.llen("default") == 1

    order = place_order(owner=shopper, items=[("ROUTED", 2)])  # commits: the message goes to critical

    wait_until(
        lambda: OrderEvent.objects.filter(order=order, to_status=Order.Status.CONFIRMED).exists(),
        timeout=30,
        what=f"the worker to confirm order {order.pk}",
    )
    product.refresh_from_db()
    assert product.stock == 3
    # The worker has been consuming all along, yet the default queue's message is untouched.
    assert broker.llen("default") == 1
    assert json.loads(broker.lindex("default", 0))["headers"]["task"] == "notifications.tasks.nothing"
