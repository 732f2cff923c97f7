"""A broker outage with real processes: orders placed while the broker is down are kept and processed once it is
back. On Redis and on RabbitMQ.

The test runs its own broker (a redis-server, or a one-node RabbitMQ: tests.brokers.PrivateBroker) on a
free port, so stopping it disturbs nothing else.
gunicorn, a critical and a default worker and beat run with the Procfile's commands against it.
The outbox relay (core.tasks.relay_outbox, sent by beat to the default queue) publishes what
the fast path after commit could not.
"""

import time

import pytest
import requests

from accounts.services import issue_api_token
from config.celery import app
from core.models import OutboxItem
from orders.models import Order
from orders.services import place_order
from tests.brokers import PrivateBroker
from tests.factories import ProductFactory, UserFactory
from tests.stack import RedisServer, wait_for

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True)]

# Work committed while the broker is down is published by the relay about OUTBOX_RELAY_SECONDS
# after it is back (5 s by default). The test runs the relay every second.
RELAY_ENV = {"OUTBOX_RELAY_SECONDS": "1", "OUTBOX_FAST_PATH_GRACE_SECONDS": "2"}


def first_step_states(orders) -> list[str]:
    """The states of the orders' process_order outbox items."""
    ids = set(orders.values_list("pk", flat=True))
    items = OutboxItem.objects.filter(task_name="orders.tasks.process_order").order_by("id")
    return [item.state for item in items if item.args[0] in ids]


@pytest.fixture(params=["redis", "rabbitmq"])
def private_broker(request, tmp_path):
    broker = PrivateBroker(request.param, tmp_path / request.param)
    yield broker
    broker.stop()


def test_orders_placed_while_the_broker_is_down_are_kept_and_processed_when_it_returns(
    private_broker, processes, start_worker, worker_env
):
    ProductFactory(sku="OUTAGE", stock=50)
    shopper = UserFactory()
    token = issue_api_token(user=shopper)
    env = {**worker_env, **RELAY_ENV, **private_broker.env()}
    base = processes.web(env)
    processes.beat(env)
    start_worker("critical", concurrency=2, env=env)
    start_worker("default", env=env)  # runs the relay

    private_broker.kill()
    assert requests.get(f"{base}/readyz", timeout=10).status_code == 503

    answers = []
    for n in range(5):
        started = time.monotonic()
        response = requests.post(
            f"{base}/api/orders/",
            json={"items": [{"sku": "OUTAGE", "quantity": 1}]},
            headers={"Authorization": f"Bearer {token}", "Idempotency-Key": f"outage-{n}"},
            timeout=30,
        )
        answers.append((response.status_code, time.monotonic() - started))
    # Committed now, dispatched later: every request answers 201, quickly, and never 500.
    assert [status for status, _ in answers] == [201] * 5
    assert max(seconds for _, seconds in answers) < 10  # against the client's 30 s: no request waits on the broker
    placed = Order.objects.filter(owner=shopper)
    assert placed.count() == 5
    assert set(placed.values_list("status", flat=True)) == {"pending"}
    # Each order's first step is a committed outbox item that no broker has accepted yet.
    assert first_step_states(placed) == ["pending"] * 5

    # Back with its data (Redis's AOF, RabbitMQ's queues on disk): neither holds the orders' messages, which
    # were never published. Only the relay can send them.
    private_broker.start()
    wait_for(
        lambda: set(placed.values_list("status", flat=True)) == {"fulfilled"},
        60,
        "every order placed during the outage to be fulfilled",
    )
    assert requests.get(f"{base}/readyz", timeout=10).status_code == 200
    # Published by the relay and finished: one item per order, no second one.
    wait_for(lambda: first_step_states(placed) == ["done"] * 5, 10, "the first steps' items to be done")


def test_worker_losing_redis_mid_task_survives_and_the_task_completes(tmp_path, start_worker, worker_env, sandbox):
    """Redis restarts while a charge is in flight: the worker reconnects, and the charge completes once.

    When the connection drops at an unlucky moment kombu 5.7 stops the worker instead
    ("Unrecoverable error" from QoS.restore_unacked; seen in CI); core/broker.py guards
    that path. This test does not hit that timing every run: it proves the recovery, not the guard.
    """
    from payments.models import Payment
    from tests.factories import ProductFactory, UserFactory

    redis_server = RedisServer(tmp_path, aof=True)  # as in compose: the queues survive the restart
    redis_server.start()
    try:
        env = {
            **worker_env,
            "REDIS_URL": redis_server.url,
            "CELERY_VISIBILITY_TIMEOUT": "5",
            "CELERY_UNACKED_RESTORE_INTERVAL": "1",
            "CELERY_UNACKED_RESTORE_THROTTLE": "1",
        }
        ProductFactory(sku="MIDTASK", stock=5)
        sandbox.set_faults(latency_ms=3000)  # the charge is in flight, its message unacked, when Redis goes
        worker = start_worker("critical", env=env, name="midtask")
        order = place_order(owner=UserFactory(), items=[("MIDTASK", 1)])  # its message goes to the test broker
        [item] = OutboxItem.objects.filter(task_name="orders.tasks.process_order", args=[order.pk])
        with app.connection_for_write(redis_server.url) as connection:  # this worker's broker: the same message
            app.send_task(
                "orders.tasks.process_order", args=[order.pk], task_id=str(item.task_id), connection=connection
            )
        wait_for(lambda: Payment.objects.filter(order=order).exists(), 20, "the charge to be in flight")

        redis_server.kill()
        time.sleep(1)
        redis_server.start()
        sandbox.set_faults(latency_ms=0)

        wait_for(lambda: Order.objects.get(pk=order.pk).status == "fulfilled", 60, "the order to be fulfilled")
        assert worker.process.poll() is None, worker.log()[-3000:]
        assert "Unrecoverable error" not in worker.log()
        payment = Payment.objects.get(order=order)
        assert len(sandbox.charges(reference=payment.idempotency_key)) == 1
        assert sandbox.summary()["shipments"]["by_order_id"] == {str(order.pk): 1}
    finally:
        redis_server.kill()
