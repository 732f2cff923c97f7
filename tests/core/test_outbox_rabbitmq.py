"""The outbox on RabbitMQ: an item is marked published only once the broker has confirmed its message.

Publisher confirms (config/settings/celery.py: confirm_publish) make a publish wait for the broker's ack, and
turn its nack into an error. A queue that refuses messages is made here with a policy (max-length 0 on a
queue whose overflow is reject-publish, as ours are): RabbitMQ then nacks every publish to it, as it does
when a quorum queue has no majority of its nodes. The item stays pending, the request that committed it is
not failed, and the relay publishes it once the queue takes messages again.
"""

import pytest
from django.db import transaction
from django.utils import timezone

from core import outbox
from core.models import OutboxItem
from tests.brokers import rabbitmqctl
from tests.stack import unreachable_broker

pytestmark = [pytest.mark.django_db, pytest.mark.parametrize("broker", ["rabbitmq"], indirect=True)]

TASK = "notifications.tasks.send_notification"  # routed to the default queue


def publish_committed(number: int) -> OutboxItem:
    """Enqueued in a transaction, then published as its on-commit callback does; the item as it is now."""
    with transaction.atomic():
        item = outbox.enqueue(TASK, number)
    outbox._publish_after_commit(item.pk, str(item.task_id), TASK, [number], {})
    item.refresh_from_db()
    return item


def test_a_confirmed_publish_marks_the_item_published_and_the_relay_never_sends_it_again(broker):
    item = publish_committed(1)
    # RabbitMQ cannot be searched by the relay (it has no index of held messages): the fast path records
    # the confirmed publish itself, and the broker owns the message from then on.
    assert (item.state, item.attempts) == (OutboxItem.State.PUBLISHED, 1)
    assert item.published_at is not None
    assert broker.task_names("default") == [TASK]
    OutboxItem.objects.filter(pk=item.pk).update(next_attempt_at=timezone.now())
    assert outbox.relay() == {"published": 0, "failed": 0, "deferred": 0}
    assert broker.depth("default") == 1  # the one message (task_names gave it back); the relay sent nothing more


def test_a_publish_the_broker_refuses_leaves_the_item_pending_and_the_relay_publishes_it_when_it_is_taken(broker):
    publish_committed(0)  # declares the queue with its arguments (reject-publish overflow); one message in it
    rabbitmqctl("set_policy", "-p", broker.vhost.name, "--apply-to", "queues", "full", "^default$", '{"max-length": 0}')
    try:
        refused = publish_committed(2)
        assert refused.state == OutboxItem.State.PENDING  # nacked: not confirmed, so not published
        assert refused.attempts == 0  # the broker's refusal costs no attempt, like an outage
        assert "broker unreachable" in refused.last_error
        assert broker.depth("default") == 1
    finally:
        rabbitmqctl("clear_policy", "-p", broker.vhost.name, "full")

    OutboxItem.objects.filter(pk=refused.pk).update(next_attempt_at=timezone.now())
    assert outbox.relay()["published"] == 1
    refused.refresh_from_db()
    assert (refused.state, refused.attempts) == (OutboxItem.State.PUBLISHED, 1)
    assert broker.task_names("default") == [TASK, TASK]


def test_work_committed_while_rabbitmq_is_unreachable_is_kept_and_published_by_the_relay(broker):
    with unreachable_broker(url="amqp://guest:guest@127.0.0.1:9/"):
        with transaction.atomic():
            item = outbox.enqueue(TASK, 3)
        outbox._publish_after_commit(item.pk, str(item.task_id), TASK, [3], {})
    item.refresh_from_db()
    assert (item.state, item.attempts) == (OutboxItem.State.PENDING, 0)
    OutboxItem.objects.filter(pk=item.pk).update(next_attempt_at=timezone.now())
    assert outbox.relay()["published"] == 1
    assert broker.task_names("default") == [TASK]
