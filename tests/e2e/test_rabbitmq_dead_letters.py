"""RabbitMQ's own bound on redelivery: the quorum queues' delivery limit, shared by every worker node.

On Redis the bound is ops.worker's count of lost pool processes per task id, kept in Redis for every worker;
on RabbitMQ that count stays in each worker, and the broker's `x-delivery-limit` bounds a message that kills
whichever worker takes it. The dead-lettered message reaches the ops dead letters through the dead-letter
queue (ops/rabbitmq.py), and its outbox item ends failed like any final failure.
"""

import time

import pytest
from django.conf import settings
from django.db import transaction

from core import outbox
from core.models import OutboxItem
from ops.models import FailedTask
from tests.brokers import rabbitmq_queues_with_delivery_limit
from tests.e2e import deadletter_tasks as tasks
from tests.stack import wait_for

pytestmark = [
    pytest.mark.worker,
    pytest.mark.django_db(transaction=True),
    pytest.mark.parametrize("broker", ["rabbitmq"], indirect=True),
]

DELIVERY_LIMIT = 2
WORKER_ENV = {
    "CELERY_EXTRA_IMPORTS": tasks.__name__,
    "CELERY_WORKER_LOST_WAIT": "1",
    # Each worker alone would requeue it 9 times: the broker's limit must act first.
    "TASK_MAX_WORKER_LOST": "10",
    "RABBITMQ_DELIVERY_LIMIT": str(DELIVERY_LIMIT),
}


@pytest.fixture(autouse=True)
def queues_with_the_test_limit(broker):
    """This process declares the queues as the workers do (a queue's arguments must match everywhere)."""
    with rabbitmq_queues_with_delivery_limit(DELIVERY_LIMIT):
        yield


def test_a_message_that_kills_every_worker_taking_it_is_dead_lettered_by_the_broker_once(
    start_worker, broker, tmp_path
):
    first = start_worker("default", name="default-a", env=WORKER_ENV)
    second = start_worker("default", name="default-b", env=WORKER_ENV)
    runs = tmp_path / "runs.log"
    with transaction.atomic():
        item = outbox.enqueue(tasks.kill_own_process.name, str(runs))

    wait_for(lambda: OutboxItem.objects.get(pk=item.pk).state == OutboxItem.State.FAILED, 60, "the item to end failed")
    dead = FailedTask.objects.get(task_id=str(item.task_id))  # recorded first
    assert dead.exception.startswith(f"DeliveryLimitExceeded: delivered {DELIVERY_LIMIT + 1} times")
    assert "RabbitMQ's reason: delivery_limit" in dead.exception
    assert (dead.task_name, dead.queue, dead.kind, dead.attempts) == (
        tasks.kill_own_process.name,
        "default",
        "failed",
        3,
    )
    assert dead.args == [str(runs)]  # the call is kept, so it can be replayed
    # The first delivery and DELIVERY_LIMIT more, each killing the pool process that took it; never again.
    assert runs.read_text().count("start") == DELIVERY_LIMIT + 1
    item.refresh_from_db()
    assert item.state == OutboxItem.State.FAILED
    assert item.last_error.startswith("DeliveryLimitExceeded")
    assert broker.depth(settings.DEAD_LETTER_QUEUE) == 0

    # Both workers live on and consume the next message; the dead-lettered one is not delivered again.
    after = tmp_path / "after.log"
    tasks.append_line.delay(str(after), "still consuming")
    wait_for(after.exists, 15, "a worker to run the next task")
    assert first.process.poll() is None and second.process.poll() is None
    assert runs.read_text().count("start") == DELIVERY_LIMIT + 1
    assert FailedTask.objects.count() == 1
    assert broker.depth("default") == 0
    wait_for(lambda: broker.unacked() == 0, 10, "the last task's late acknowledgement")


def test_a_message_that_expired_as_its_sender_asked_is_no_dead_letter(start_worker, broker, tmp_path):
    """Celery turns `expires` into the message's TTL on RabbitMQ, which then dead-letters it (reason `expired`).

    Beat sends the outbox relay so (expires: twice its interval): found by the chaos suite on RabbitMQ, where a
    default worker busy for a while left 58 relay messages expired, each recorded as a dead letter.
    """
    ran = tmp_path / "ran.log"
    # A worker of another queue declares the dead-letter exchange and drains its queue; none consumes default yet.
    start_worker("critical", env=WORKER_ENV)
    expiring = tasks.append_line.apply_async((str(ran), "too late"), expires=1)
    time.sleep(2)  # it expires in the queue
    tasks.append_line.delay(str(ran), "on time")
    start_worker("default", env=WORKER_ENV)
    wait_for(ran.exists, 15, "the worker to run the task sent on time")
    wait_for(lambda: broker.depth(settings.DEAD_LETTER_QUEUE) == 0, 10, "the dead-letter queue to drain")
    assert ran.read_text() == "on time\n"
    assert not FailedTask.objects.filter(task_id=expiring.id).exists()
    assert FailedTask.objects.count() == 0
