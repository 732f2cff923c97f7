"""Flower, as the operator sees it: behind basic auth, fed by worker events, showing all three queues."""

import sys
import time

import pytest
import requests

from config.celery import app
from orders.services import place_order
from tests.brokers import celery_broker
from tests.factories import ProductFactory, UserFactory
from tests.rabbitmq import RabbitCluster
from tests.stack import free_port, http_ok, wait_for

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True)]

AUTH = ("operator", "flower-e2e-pass")
# As the Procfile starts it: a worker busy starting may answer Flower's first look after its default 1 s.
FLOWER = [sys.executable, "-m", "celery", "-A", "config", "flower", "--address=127.0.0.1", "--inspect_timeout=5000"]


def test_flower_shows_every_queue_and_the_tasks_workers_report(processes, start_worker, worker_env, sandbox):
    for queue in ("critical", "bulk", "default"):
        start_worker(queue, name=f"{queue}-flower")
    port = free_port()
    processes.spawn(
        "flower",
        [*FLOWER, f"--port={port}"],
        {**worker_env, "FLOWER_BASIC_AUTH": ":".join(AUTH)},
    )
    base = f"http://127.0.0.1:{port}"
    wait_for(lambda: requests.get(base, timeout=2).status_code == 401 if _up(base) else False, 30, "Flower to answer")
    assert not http_ok(f"{base}/api/workers")  # no credentials, no data

    def queues() -> set[str]:
        # Flower asks the workers for their queues when it starts, and again on a refresh of its workers view:
        # a worker that missed the first look is known after one.
        requests.get(f"{base}/api/workers", params={"refresh": 1}, auth=AUTH, timeout=15)
        response = requests.get(f"{base}/api/queues/length", auth=AUTH, timeout=10)
        if response.status_code != 200:
            return set()
        return {queue["name"] for queue in response.json()["active_queues"]}

    assert wait_for(lambda: queues() >= {"critical", "bulk", "default"}, 30, "Flower to list the three queues")

    def seen_task_names() -> set[str]:
        response = requests.get(f"{base}/api/tasks", auth=AUTH, timeout=10)
        return {task["name"] for task in response.json().values()} if response.status_code == 200 else set()

    def probe_seen() -> bool:
        # Events sent before Flower's receiver is bound are gone: probe until the stream is live.
        # The probe is the outbox relay, harmless to run at any time.
        app.send_task("core.tasks.relay_outbox", queue="default")
        time.sleep(0.5)
        return "core.tasks.relay_outbox" in seen_task_names()

    wait_for(probe_seen, 30, "Flower to receive worker events")

    ProductFactory(sku="FLOWER", stock=3)
    order = place_order(owner=UserFactory(), items=[("FLOWER", 1)])

    # Worker events reach Flower: the order's tasks appear with their names.
    names = wait_for(
        lambda: (
            (seen := seen_task_names()) >= {"orders.tasks.process_order", "orders.tasks.charge_order"}
            and seen & {"notifications.tasks.send_notification", "orders.tasks.sync_to_fulfillment"}
            and seen
        ),
        30,
        f"Flower to see order {order.pk}'s tasks on two queues",
    )
    assert "notifications.tasks.send_notification" in names or "orders.tasks.sync_to_fulfillment" in names


def _up(base: str) -> bool:
    try:
        requests.get(base, timeout=2)
        return True
    except requests.ConnectionError:
        return False


def test_flower_shows_queue_lengths_on_rabbitmq_through_its_management_api(processes, worker_env, tmp_path):
    """On RabbitMQ Flower reads queue lengths from the management plugin's HTTP API (FLOWER_BROKER_API).

    On a named virtual host: Flower 2.2 encodes the default one ("/", %2F in the URL) twice and gets a 404.
    Flower asks for the queues its workers consume, or with no worker online every queue of the settings.
    """
    with RabbitCluster(tmp_path / "rabbitmq", nodes=1, management=True) as cluster:
        cluster.add_vhost("shop")
        url = cluster.url("shop")
        with celery_broker(url):
            for number in range(2):
                app.send_task("reports.tasks.generate_report", args=[number])  # declares bulk; no worker takes them
        port = free_port()
        processes.spawn(
            "flower",
            [*FLOWER, f"--port={port}"],
            {
                **worker_env,
                "CELERY_BROKER_URL": url,
                "FLOWER_BASIC_AUTH": ":".join(AUTH),
                "FLOWER_BROKER_API": cluster.management_api(),
            },
        )
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: _up(base), 30, "Flower to answer")

        def bulk_length() -> int | None:
            response = requests.get(f"{base}/api/queues/length", auth=AUTH, timeout=10)
            if response.status_code != 200:
                return None
            # The management API's own queue objects: "messages" appears once its statistics are collected
            # (every few seconds).
            return {queue["name"]: queue.get("messages") for queue in response.json()["active_queues"]}.get("bulk")

        wait_for(lambda: bulk_length() == 2, 45, "Flower to show bulk's 2 messages")
