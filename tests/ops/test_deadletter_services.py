"""Dead-letter services: recorded once and outside the failing transaction; requeued onto the routed queue."""

from datetime import timedelta

import pytest
from django.db import transaction
from django.utils import timezone

from ops.models import FailedTask
from ops.services import (
    NotRequeueable,
    record_failure,
    requeue_failed_task,
    requeueable_failed_tasks,
    resolve_failed_task,
)
from orders.models import Product
from tests.factories import FailedTaskFactory, ProductFactory
from tests.ops.support import queued

pytestmark = pytest.mark.django_db


def failure(**overrides) -> dict:
    return {
        "task_id": "task-1",
        "task_name": "orders.tasks.process_order",
        "queue": "critical",
        "args": [7],
        "exception": "ValueError: boom",
        "traceback": "Traceback ...",
        "attempts": 2,
        **overrides,
    }


# record_failure writes on its own connection: its rows are committed, so these tests run in transaction mode.


@pytest.mark.django_db(transaction=True)
def test_a_failure_is_recorded_once_per_task_id():
    first, created = record_failure(**failure())
    again, created_again = record_failure(**failure(exception="TimeLimitExceeded: 1", attempts=5))

    assert (created, created_again) == (True, False)
    assert again.pk == first.pk
    row = FailedTask.objects.get()
    assert (row.exception, row.attempts, row.args, row.queue) == ("ValueError: boom", 2, [7], "critical")
    assert (row.kind, row.resolved) == (FailedTask.Kind.FAILED, False)


@pytest.mark.django_db(transaction=True)
def test_the_record_survives_the_rollback_of_the_failing_transaction():
    with pytest.raises(ValueError), transaction.atomic():
        ProductFactory(sku="ROLLED-BACK")
        record_failure(**failure())
        raise ValueError("boom")

    assert not Product.objects.filter(sku="ROLLED-BACK").exists()
    assert FailedTask.objects.filter(task_id="task-1").exists()


@pytest.mark.django_db(transaction=True)
def test_a_failure_is_recorded_from_a_transaction_already_marked_for_rollback():
    with transaction.atomic():
        transaction.set_rollback(True)  # as after a caught database error: this connection can write nothing more
        record_failure(**failure())

    assert FailedTask.objects.filter(task_id="task-1").exists()


@pytest.mark.django_db(transaction=True)
def test_hostile_headers_are_stored_as_json_without_nul_characters():
    row, _ = record_failure(
        **failure(task_id="id\x00" + "x" * 400, task_name="<unknown>"),
        kind=FailedTask.Kind.REFUSED,
        headers={"task": "evil\x00name", "raw": b"\x80\x00bytes", "nested": {"when": timezone.now()}},
    )

    row.refresh_from_db()
    assert row.kind == FailedTask.Kind.REFUSED
    assert row.headers["task"] == "evil\ufffdname"
    assert isinstance(row.headers["raw"], str) and "\x00" not in row.headers["raw"]
    assert len(row.task_id) == 255 and "\x00" not in row.task_id


def test_requeue_sends_the_same_task_and_arguments_to_its_routed_queue_as_a_new_task(
    broker, django_capture_on_commit_callbacks
):
    failed = FailedTaskFactory(task_name="orders.tasks.process_order", queue="critical", args=[42], kwargs={})

    with django_capture_on_commit_callbacks(execute=True):  # the outbox publishes after commit
        requeued = requeue_failed_task(failed_task_id=failed.pk)

    [message] = queued(broker, "critical")
    assert message["headers"]["task"] == "orders.tasks.process_order"
    assert message["body"][:2] == [[42], {}]
    assert message["headers"]["id"] == requeued.requeued_as != failed.task_id
    failed.refresh_from_db()
    assert failed.resolved and failed.requeued_at and failed.resolved_at
    assert failed.requeued_as == requeued.requeued_as
    assert broker.llen("default") == 0


def test_requeue_follows_the_routing_table_not_the_recorded_queue(broker, django_capture_on_commit_callbacks):
    failed = FailedTaskFactory(task_name="notifications.tasks.send_notification", queue="critical", args=[3])

    with django_capture_on_commit_callbacks(execute=True):
        requeue_failed_task(failed_task_id=failed.pk)

    assert [m["headers"]["task"] for m in queued(broker, "default")] == ["notifications.tasks.send_notification"]
    assert broker.llen("critical") == 0


def test_a_dead_letter_is_requeued_at_most_once(broker, django_capture_on_commit_callbacks):
    failed = FailedTaskFactory()
    with django_capture_on_commit_callbacks(execute=True):
        requeue_failed_task(failed_task_id=failed.pk)

    with pytest.raises(NotRequeueable, match="already resolved"):
        requeue_failed_task(failed_task_id=failed.pk)
    assert broker.llen("critical") == 1


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"kind": FailedTask.Kind.REFUSED, "task_name": "<unknown>"}, "refused and never ran"),
        ({"resolved": True}, "already resolved"),
        ({"task_name": "orders.tasks.renamed_long_ago"}, "no task of that name"),
        # A payment that needs attention has no task to replay: staff use the order's hold actions.
        ({"task_name": "payments.needs_attention"}, "no task of that name"),
    ],
)
def test_requeue_refuses_what_cannot_run_again(broker, fields, reason):
    failed = FailedTaskFactory(**fields)

    with pytest.raises(NotRequeueable, match=reason):
        requeue_failed_task(failed_task_id=failed.pk)
    assert broker.dbsize() == 0
    failed.refresh_from_db()
    assert failed.requeued_as == ""


def test_resolve_marks_the_dead_letter_resolved_without_sending_anything(broker):
    failed = FailedTaskFactory()

    resolve_failed_task(failed_task_id=failed.pk)

    failed.refresh_from_db()
    assert failed.resolved and failed.resolved_at and not failed.requeued_at
    assert broker.dbsize() == 0


def test_requeueable_failed_tasks_are_the_unresolved_failures_oldest_first():
    now = timezone.now()
    old = FailedTaskFactory(failed_at=now - timedelta(days=2))
    recent = FailedTaskFactory(failed_at=now - timedelta(minutes=5))
    other = FailedTaskFactory(task_name="orders.tasks.charge_order", failed_at=now - timedelta(minutes=1))
    FailedTaskFactory(resolved=True)
    FailedTaskFactory(kind=FailedTask.Kind.REFUSED, task_name="<unknown>")

    assert list(requeueable_failed_tasks()) == [old, recent, other]
    assert list(requeueable_failed_tasks(task_name="orders.tasks.process_order")) == [old, recent]
    assert list(requeueable_failed_tasks(since=now - timedelta(hours=1))) == [recent, other]


def test_a_requeue_while_the_broker_is_down_is_kept_in_the_outbox_and_relayed_later(
    broker, django_capture_on_commit_callbacks
):
    from core import outbox
    from core.models import OutboxItem
    from tests.stack import unreachable_broker

    failed = FailedTaskFactory(task_name="orders.tasks.process_order", queue="critical", args=[42], kwargs={})

    # The operator replays it while Redis is down: the replay is recorded, nothing is lost
    with unreachable_broker(), django_capture_on_commit_callbacks(execute=True):
        requeued = requeue_failed_task(failed_task_id=failed.pk)
    assert broker.llen("critical") == 0
    [item] = OutboxItem.objects.filter(task_id=requeued.requeued_as)
    assert (item.task_name, item.args, item.state) == ("orders.tasks.process_order", [42], OutboxItem.State.PENDING)

    # and once the broker is back the relay publishes it, under the id the dead letter names
    OutboxItem.objects.filter(pk=item.pk).update(next_attempt_at=timezone.now())
    outbox.relay()
    [message] = queued(broker, "critical")
    assert message["headers"]["id"] == requeued.requeued_as and message["body"][:2] == [[42], {}]


def test_a_dead_letter_with_arguments_that_are_not_a_list_is_not_requeued(broker):
    failed = FailedTaskFactory(task_name="orders.tasks.process_order", args={"order_id": 1})

    with pytest.raises(NotRequeueable, match="not a list"):
        requeue_failed_task(failed_task_id=failed.pk)
    assert broker.dbsize() == 0


@pytest.mark.django_db(transaction=True)
def test_two_operators_requeueing_the_same_dead_letter_at_once_replay_it_once(broker):
    from core.models import OutboxItem
    from tests.concurrency import run_concurrently

    failed = FailedTaskFactory(task_name="orders.tasks.process_order", queue="critical", args=[7], kwargs={})

    def requeue(_: int) -> str:
        try:
            return requeue_failed_task(failed_task_id=failed.pk).requeued_as
        except NotRequeueable as refused:
            return f"refused: {refused}"

    outcomes = run_concurrently(2, requeue)

    assert sum(outcome.startswith("refused") for outcome in outcomes) == 1, outcomes
    assert OutboxItem.objects.filter(task_name="orders.tasks.process_order", args=[7]).count() == 1
