"""LOG_FORMAT=json: a real worker writes JSON lines, and its task lines carry the task id and order id."""

import json
import time

import pytest

from orders.models import Order
from orders.services import place_order
from tests.factories import ProductFactory, UserFactory
from tests.stack import wait_for

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True)]


def test_worker_logs_json_lines_with_task_and_order_ids(start_worker, sandbox):
    ProductFactory(sku="LOGS", stock=5)
    worker = start_worker("critical", env={"LOG_FORMAT": "json"})
    order = place_order(owner=UserFactory(), items=[("LOGS", 1)])
    wait_for(lambda: Order.objects.get(pk=order.pk).status == Order.Status.FULFILLED, 30, "the order to be fulfilled")
    time.sleep(0.5)

    records = []
    for line in worker.log().splitlines():
        if line.startswith("{"):
            records.append(json.loads(line))  # a log line that is not valid JSON fails here
    task_lines = [record for record in records if record["task_id"] != "-"]
    assert {record["task_name"] for record in task_lines} >= {
        "orders.tasks.process_order",
        "orders.tasks.charge_order",
        "orders.tasks.sync_to_fulfillment",
    }
    # Lines written while a task runs (Celery's "succeeded" line among them) name the order.
    running = [r for r in task_lines if "succeeded" in r["message"] and r["task_name"].startswith("orders.tasks")]
    assert running and all(record["order_id"] == str(order.pk) for record in running), running
    assert all({"time", "level", "logger", "message"} <= record.keys() for record in records)
