"""Done outbox items are deleted after OUTBOX_KEEP_DONE_DAYS (core.outbox.prune, beat's `prune-outbox`): the
table holds what is open, what failed, and a recent history, not every task the shop ever ran."""

from datetime import timedelta

import pytest
from django.conf import settings
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from config.celery import app
from core import outbox
from core.models import OutboxItem
from tests.factories import OutboxItemFactory
from tests.security.test_settings import PRODUCTION, run_django

pytestmark = pytest.mark.django_db

State = OutboxItem.State


def item(state: str, *, finished_days_ago: float | None = None, created_days_ago: float = 0) -> OutboxItem:
    now = timezone.now()
    made = OutboxItemFactory(state=state, next_attempt_at=now + timedelta(days=30))
    finished = now - timedelta(days=finished_days_ago) if finished_days_ago is not None else None
    OutboxItem.objects.filter(pk=made.pk).update(
        created_at=now - timedelta(days=created_days_ago), finished_at=finished
    )
    return made


def test_done_items_past_the_retention_are_deleted_and_nothing_else(settings):
    settings.OUTBOX_KEEP_DONE_DAYS = 7
    old_done = item(State.DONE, finished_days_ago=7.1, created_days_ago=8)
    kept = {
        "recent done": item(State.DONE, finished_days_ago=6.9, created_days_ago=30),
        "old failed": item(State.FAILED, finished_days_ago=60, created_days_ago=60),
        "old pending (a delayed step)": item(State.PENDING, created_days_ago=60),
        "old published (a long backlog)": item(State.PUBLISHED, created_days_ago=60),
        "done, no finish time": item(State.DONE, finished_days_ago=None, created_days_ago=60),
    }

    assert outbox.prune() == 1

    assert not OutboxItem.objects.filter(pk=old_done.pk).exists()
    left = set(OutboxItem.objects.values_list("pk", flat=True))
    assert left == {made.pk for made in kept.values()}, {name for name, made in kept.items() if made.pk not in left}


def test_prune_deletes_in_batches_of_one_statement_each_until_none_is_left(settings):
    settings.OUTBOX_KEEP_DONE_DAYS = 1
    for _ in range(25):
        item(State.DONE, finished_days_ago=2, created_days_ago=2)
    recent = item(State.DONE, finished_days_ago=0.5)

    with CaptureQueriesContext(connection) as queries:
        assert outbox.prune(batch=10) == 25

    deletes = [query["sql"] for query in queries.captured_queries if query["sql"].startswith("DELETE")]
    assert len(deletes) == 3, deletes  # 10 + 10 + 5: the last batch was short, so nothing more is asked
    assert len(queries.captured_queries) == 3, queries.captured_queries
    assert list(OutboxItem.objects.values_list("pk", flat=True)) == [recent.pk]


def test_prune_stops_at_its_time_budget_and_the_next_run_goes_on(settings):
    settings.OUTBOX_KEEP_DONE_DAYS = 1
    for _ in range(6):
        item(State.DONE, finished_days_ago=3)

    assert outbox.prune(batch=2, budget_seconds=0) == 2  # one batch, then the budget is spent
    assert OutboxItem.objects.count() == 4
    assert outbox.prune(batch=2) == 4
    assert not OutboxItem.objects.exists()


def test_prune_with_nothing_to_delete_asks_once():
    item(State.DONE, finished_days_ago=0)
    with CaptureQueriesContext(connection) as queries:
        assert outbox.prune() == 0
    assert len(queries.captured_queries) == 1
    assert OutboxItem.objects.count() == 1


def test_beat_prunes_hourly_on_the_default_queue():
    entry = settings.CELERY_BEAT_SCHEDULE["prune-outbox"]
    assert entry["task"] == "core.tasks.prune_outbox"
    assert entry["schedule"] == 3600.0
    assert entry["options"]["expires"] == 3600.0  # copies queued during an outage do not all run when it ends
    app.loader.import_default_modules()
    assert app.amqp.router.route({}, "core.tasks.prune_outbox")["queue"].name == "default"


def test_the_prune_task_runs_prune(settings):
    from core.tasks import prune_outbox

    settings.OUTBOX_KEEP_DONE_DAYS = 1
    item(State.DONE, finished_days_ago=2)
    assert prune_outbox.delay().get() == 1
    assert not OutboxItem.objects.exists()


@pytest.mark.process
@pytest.mark.parametrize("days", ["0.5", "-1", "1000000"])
def test_a_retention_under_a_day_or_beyond_a_century_stops_the_site_from_starting(tmp_path, days):
    """Under a day, a broker's late verdict on a delivery that succeeded finds no item (its dead letter stays open);
    a million days overflows the date arithmetic at every run."""
    result = run_django(
        tmp_path, ["-c", "import django; django.setup()"], {**PRODUCTION, "OUTBOX_KEEP_DONE_DAYS": days}
    )
    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr and "OUTBOX_KEEP_DONE_DAYS" in result.stderr


def test_the_prune_budget_follows_the_default_queues_soft_limit(settings):
    """Half of it by default: lowered by the environment, the soft limit lowers the budget with it, so the task ends
    itself and is never stopped by its limit. (A soft limit of 0 cannot start a site; here it means no time.)"""
    settings.OUTBOX_KEEP_DONE_DAYS = 1
    settings.TASK_TIME_LIMITS = {**settings.TASK_TIME_LIMITS, "default": (0, 16)}
    for _ in range(6):
        item(State.DONE, finished_days_ago=3)

    assert outbox.prune(batch=2) == 2  # one batch, then the budget (0 s) is spent
    assert OutboxItem.objects.count() == 4
