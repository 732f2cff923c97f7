"""`python manage.py requeue_failed [--task NAME] [--since WHEN] [--dry-run]`."""

from datetime import UTC, datetime, timedelta
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.test import TestCase
from django.utils import timezone

from ops.models import FailedTask
from tests.factories import FailedTaskFactory
from tests.ops.support import queued

pytestmark = pytest.mark.django_db


def requeue_failed(*args: str) -> tuple[str, str]:
    out, err = StringIO(), StringIO()
    # Each replay is an outbox item, published after the command's transaction commits.
    with TestCase.captureOnCommitCallbacks(execute=True):
        call_command("requeue_failed", *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def test_dry_run_prints_what_it_would_requeue_and_changes_nothing(broker):
    failed = FailedTaskFactory(task_name="orders.tasks.process_order")
    FailedTaskFactory(task_name="orders.tasks.renamed_long_ago")

    out, err = requeue_failed("--dry-run")

    assert f"would requeue orders.tasks.process_order[{failed.task_id}] -> critical" in out
    assert "Would requeue 1 task(s)." in out
    assert "would skip orders.tasks.renamed_long_ago" in err
    assert broker.dbsize() == 0
    assert not FailedTask.objects.filter(resolved=True).exists()


def test_requeues_the_unresolved_failures_onto_their_queues(broker):
    order = FailedTaskFactory(task_name="orders.tasks.process_order", args=[1])
    report = FailedTaskFactory(task_name="reports.tasks.generate_report", queue="bulk", args=[2])
    FailedTaskFactory(resolved=True)
    FailedTaskFactory(kind=FailedTask.Kind.REFUSED, task_name="<unknown>")

    out, _ = requeue_failed()

    assert "Requeued 2 task(s)." in out
    assert f"requeued orders.tasks.process_order[{order.task_id}] -> critical as " in out
    assert f"requeued reports.tasks.generate_report[{report.task_id}] -> bulk as " in out
    assert [m["body"][0] for m in queued(broker, "critical")] == [[1]]
    assert [m["body"][0] for m in queued(broker, "bulk")] == [[2]]


def test_task_and_since_narrow_the_replay(broker):
    now = timezone.now()
    FailedTaskFactory(task_name="orders.tasks.process_order", args=[1], failed_at=now - timedelta(days=2))
    FailedTaskFactory(task_name="orders.tasks.process_order", args=[2], failed_at=now - timedelta(minutes=10))
    FailedTaskFactory(task_name="orders.tasks.charge_order", args=[3], failed_at=now - timedelta(minutes=10))

    out, _ = requeue_failed("--task", "orders.tasks.process_order", "--since", "2h")

    assert "Requeued 1 task(s)." in out
    assert [m["body"][0] for m in queued(broker, "critical")] == [[2]]


@pytest.mark.parametrize(
    ("value", "expected_args"),
    [("30m", [[2]]), ("1d", [[2]]), ("3d", [[1], [2]]), ("2000-01-01T00:00:00", [[1], [2]]), ("2999-01-01", [])],
)
def test_since_takes_durations_and_iso_datetimes(broker, value, expected_args):
    FailedTaskFactory(args=[1], failed_at=timezone.now() - timedelta(days=2))
    FailedTaskFactory(args=[2], failed_at=timezone.now() - timedelta(minutes=1))

    requeue_failed("--since", value)

    assert [m["body"][0] for m in queued(broker, "critical")] == expected_args


def test_a_naive_since_is_utc(broker):
    FailedTaskFactory(args=[1], failed_at=datetime(2030, 1, 1, 12, 0, tzinfo=UTC))

    after, _ = requeue_failed("--since", "2030-01-01T12:00:01", "--dry-run")
    before, _ = requeue_failed("--since", "2030-01-01T11:59:59", "--dry-run")

    assert "Would requeue 0 task(s)." in after
    assert "Would requeue 1 task(s)." in before


@pytest.mark.parametrize("value", ["yesterday", "2h30", "-1h", "2025-13-45"])
def test_an_unreadable_since_is_an_error(value):
    with pytest.raises(CommandError, match="--since"):
        requeue_failed("--since", value)
