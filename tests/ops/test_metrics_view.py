"""Web /metrics: the bearer token, queue depth from the real broker, dead letters from the database."""

import pytest
from django.test import override_settings

from config.celery import app
from tests.factories import FailedTaskFactory
from tests.metrics import samples

pytestmark = pytest.mark.django_db

TOKEN = "metrics-test-token"  # noqa: S105


@override_settings(METRICS_TOKEN=TOKEN)
@pytest.mark.parametrize(
    "authorization",
    [None, "", "Bearer", "Bearer wrong-token", TOKEN, f"Basic {TOKEN}", f"Bearer {TOKEN}x", f"bearer {TOKEN}"],
)
def test_metrics_refuse_a_missing_or_wrong_token(client, authorization):
    headers = {} if authorization is None else {"HTTP_AUTHORIZATION": authorization}
    response = client.get("/metrics", **headers)
    assert response.status_code == 401
    assert response["WWW-Authenticate"].startswith("Bearer")
    assert b"celery_" not in response.content


@override_settings(METRICS_TOKEN=TOKEN)
def test_metrics_answer_the_token(client):
    response = client.get("/metrics", HTTP_AUTHORIZATION=f"Bearer {TOKEN}")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain")
    depth = samples(response.content.decode(), "celery_queue_depth")
    assert set(depth) == {(("queue", "critical"),), (("queue", "bulk"),), (("queue", "default"),)}
    assert b"django_http_requests_total_by_view_transport_method_total" in response.content


@override_settings(METRICS_TOKEN="")
def test_metrics_are_open_when_no_token_is_set(client):
    response = client.get("/metrics")
    assert response.status_code == 200
    assert b"celery_queue_depth" in response.content


@override_settings(METRICS_TOKEN="")
def test_queue_depth_counts_each_queue_with_its_priority_lists(client, broker):
    app.send_task("orders.tasks.process_order", args=[1])
    app.send_task("orders.tasks.process_order", args=[2], priority=9)
    app.send_task("orders.tasks.process_order", args=[3], priority=5)
    app.send_task("reports.tasks.generate_report", args=[4], priority=3)
    # kombu's Redis transport keeps a list per priority step next to the queue's own.
    assert broker.llen("critical") == 1
    assert broker.llen("critical\x06\x169") == 1
    assert broker.llen("critical\x06\x163") == 1
    assert broker.llen("bulk\x06\x163") == 1

    depth = samples(client.get("/metrics").content.decode(), "celery_queue_depth")

    assert depth == {(("queue", "critical"),): 3, (("queue", "bulk"),): 1, (("queue", "default"),): 0}


@override_settings(METRICS_TOKEN="")
@pytest.mark.parametrize("broker", ["rabbitmq"], indirect=True)
def test_queue_depth_on_rabbitmq_counts_waiting_messages_and_zero_for_queues_not_declared_yet(client, broker):
    # A new virtual host: no queue exists yet. Each missing one (a 404 that closes its channel) reads 0.
    assert samples(client.get("/metrics").content.decode(), "celery_queue_depth") == {
        (("queue", "critical"),): 0,
        (("queue", "bulk"),): 0,
        (("queue", "default"),): 0,
    }
    for number in range(3):
        app.send_task("orders.tasks.process_order", args=[number])  # declares critical (quorum) on the way
    app.send_task("reports.tasks.generate_report", args=[4])

    depth = samples(client.get("/metrics").content.decode(), "celery_queue_depth")

    assert depth == {(("queue", "critical"),): 3, (("queue", "bulk"),): 1, (("queue", "default"),): 0}
    assert broker.depth("critical") == 3
    ready = client.get("/readyz")
    assert (ready.status_code, ready.json()["checks"]["broker"]) == (200, "ok")


@override_settings(METRICS_TOKEN="")
def test_dead_letters_count_unresolved_failures_by_task(client):
    for number, (name, resolved) in enumerate(
        [
            ("orders.tasks.process_order", False),
            ("orders.tasks.process_order", False),
            ("orders.tasks.process_order", True),
            ("reports.tasks.generate_report", False),
            ("made.up.by.a.producer", False),
            ("payments.needs_attention", False),
        ]
    ):
        FailedTaskFactory(task_id=f"t-{number}", task_name=name, resolved=resolved, exception="boom")

    dead = samples(client.get("/metrics").content.decode(), "celery_dead_letters")

    assert dead[(("name", "orders.tasks.process_order"),)] == 2
    assert dead[(("name", "reports.tasks.generate_report"),)] == 1
    # A task with none has a series at 0; a name that is not a task is not a label of its own.
    assert dead[(("name", "orders.tasks.charge_order"),)] == 0
    assert dead[(("name", "unknown"),)] == 1
    assert (("name", "made.up.by.a.producer"),) not in dead
    # A payment needing attention is a dead letter of its own kind, named so the alert says what it is.
    assert dead[(("name", "payments.needs_attention"),)] == 1
