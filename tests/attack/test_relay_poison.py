"""The relay against an item it cannot publish (a task name no worker registers, e.g. after a rename).

`relay()` publishes inside one transaction and lets any error but kombu's OperationalError escape it.
"""

import contextlib
import json
from datetime import timedelta

import pytest
from django.utils import timezone

from core import outbox
from core.models import OutboxItem
from tests.factories import OutboxItemFactory

pytestmark = pytest.mark.django_db(transaction=True)

GOOD = "notifications.tasks.send_notification"  # default queue
# The charge task's name before this change; any renamed or removed task gives the same.
RENAMED = "payments.tasks.charge_order"


def due(task_name: str, seconds_ago: int) -> OutboxItem:
    return OutboxItemFactory(
        task_name=task_name, args=[1], next_attempt_at=timezone.now() - timedelta(seconds=seconds_ago)
    )


def message_ids(broker, queue: str = "default") -> list[str]:
    return [json.loads(raw)["headers"]["id"] for raw in broker.lrange(queue, 0, -1)]


def relay_runs(count: int) -> None:
    for _ in range(count):
        with contextlib.suppress(Exception):
            outbox.relay()


def test_one_unpublishable_item_does_not_stop_the_relay_for_everything_behind_it(broker):
    poison = due(RENAMED, 60)
    good = due(GOOD, 30)

    relay_runs(3)

    good.refresh_from_db()
    poison.refresh_from_db()
    assert good.state == OutboxItem.State.PUBLISHED, "the relay publishes nothing while one item cannot be published"
    # And the item that cannot be published ends somewhere visible instead of pending forever.
    assert poison.state == OutboxItem.State.FAILED or poison.attempts > 0


def test_an_item_published_by_a_relay_run_that_then_fails_is_not_published_again(broker):
    good = due(GOOD, 60)
    due(RENAMED, 30)

    relay_runs(3)

    good.refresh_from_db()
    assert message_ids(broker).count(str(good.task_id)) == 1, (
        f"{message_ids(broker).count(str(good.task_id))} messages of one item queued; item is {good.state}"
    )


def test_messages_still_queued_after_a_long_worker_outage_are_not_published_again(broker):
    # Given work committed and published by the fast path, while no worker consumes (workers down after a bad
    # deploy; the web and Redis are fine): the messages wait in the queue.
    from django.db import transaction

    with transaction.atomic():
        items = [outbox.enqueue(GOOD, n) for n in range(5)]
    assert len(message_ids(broker)) == 5
    assert set(OutboxItem.objects.values_list("state", flat=True)) == {OutboxItem.State.PENDING}

    # When the workers come back after more than OUTBOX_LOST_AFTER_SECONDS (what the relay sees of that time)
    OutboxItem.objects.update(next_attempt_at=timezone.now() - timedelta(seconds=1))
    outbox.relay()

    # Then the backlog is not doubled: every message is still in the queue, none was lost
    ids = message_ids(broker)
    assert len(ids) == len(items), f"{len(ids)} messages for {len(items)} items: the whole backlog published again"
    # and the relay, having found them on the broker, marked them published
    assert set(OutboxItem.objects.values_list("state", flat=True)) == {OutboxItem.State.PUBLISHED}
