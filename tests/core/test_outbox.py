"""The outbox (core/outbox.py) against the real PostgreSQL and Redis: the row commits with the change,
the message follows the commit once, the relay publishes what was missed, and every item ends."""

import contextlib
import json
from datetime import timedelta

import pytest
import redis
from django.db import transaction
from django.utils import timezone
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from config.celery import app
from core import outbox
from core.models import OutboxItem
from ops.models import FailedTask
from tests.factories import FailedTaskFactory, OutboxItemFactory
from tests.stack import unreachable_broker

pytestmark = pytest.mark.django_db

TASK = "notifications.tasks.send_notification"  # routed to the default queue; its argument is a pk


def queued(broker, queue: str = "default") -> list[dict]:
    """The messages waiting on a queue, as (task name, task id, args)."""
    messages = []
    for raw in broker.lrange(queue, 0, -1):
        message = json.loads(raw)
        headers = message["headers"]
        messages.append({"task": headers["task"], "id": headers["id"], "args": headers["argsrepr"]})
    return messages


def enqueue_committed(*args, **kwargs) -> OutboxItem:
    with transaction.atomic():
        item = outbox.enqueue(TASK, *args, **kwargs)
    return item


def enqueue_published(*args) -> OutboxItem:
    """Committed, and published by the fast path (as its on-commit callback does)."""
    item = enqueue_committed(*args)
    outbox._publish_after_commit(item.pk, str(item.task_id), TASK, list(args), {})
    return item


def test_enqueue_outside_a_transaction_is_refused():
    with pytest.raises(RuntimeError, match="inside transaction.atomic"):
        outbox.enqueue(TASK, 1)


def test_rolled_back_work_leaves_no_row_and_no_message(broker, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        with pytest.raises(ZeroDivisionError), transaction.atomic():
            outbox.enqueue(TASK, 1)
            1 / 0  # noqa: B018 (the business change fails)
    assert callbacks == []
    assert not OutboxItem.objects.exists()
    assert queued(broker) == []


def test_committed_work_is_published_once_right_after_commit_under_the_items_task_id(
    broker, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True):
        item = enqueue_committed(7)
    item.refresh_from_db()
    # The fast path counted its publish when the item was written, and writes nothing after it.
    assert (item.state, item.attempts, item.published_at) == (OutboxItem.State.PENDING, 1, None)
    assert queued(broker) == [{"task": TASK, "id": str(item.task_id), "args": "[7]"}]
    # Not finished when its grace is over (a backlog): the relay finds the message on the broker and
    # marks the item published instead of publishing it again.
    OutboxItem.objects.filter(pk=item.pk).update(next_attempt_at=timezone.now())
    assert outbox.relay() == {"published": 0, "failed": 0, "deferred": 0}
    item.refresh_from_db()
    assert (item.state, item.attempts) == (OutboxItem.State.PUBLISHED, 1)
    assert item.published_at > item.created_at
    assert len(queued(broker)) == 1
    # The relay leaves a published item to the broker.
    assert outbox.relay() == {"published": 0, "failed": 0, "deferred": 0}
    assert len(queued(broker)) == 1


def test_a_publish_sends_the_task_and_no_task_sent_event(broker, django_capture_on_commit_callbacks):
    # Every dispatch is one message: a task-sent event beside it (CELERY_TASK_SEND_SENT_EVENT) was a second
    # publish on the event exchange for every task of every order, about 40 % of a publish's time on Redis
    # (bench/hops.py's profile); Flower shows a task from its worker's task-received event on.
    client = redis.Redis.from_url(broker.url)
    events = client.pubsub()
    # Pub/sub spans a server's databases; kombu names the channel after its own.
    events.psubscribe(f"/{client.connection_pool.connection_kwargs['db']}.celeryev/*")
    assert events.get_message(timeout=5)["type"] == "psubscribe"
    try:
        with django_capture_on_commit_callbacks(execute=True):
            item = enqueue_committed(8)
        assert queued(broker) == [{"task": TASK, "id": str(item.task_id), "args": "[8]"}]
        heard = [events.get_message(timeout=0.5) for _ in range(3)]
        assert [message for message in heard if message] == []
        # The channel is the one events take: an event sent by hand is heard.
        with app.events.default_dispatcher() as dispatcher:
            dispatcher.send("task-sent", uuid="by-hand")
        assert events.get_message(timeout=5)["channel"].endswith(b".celeryev/task.sent")
    finally:
        events.close()


def test_work_committed_while_the_broker_is_down_is_kept_and_the_relay_publishes_it_once(
    broker, django_capture_on_commit_callbacks, caplog
):
    with unreachable_broker(), django_capture_on_commit_callbacks(execute=True):
        item = enqueue_committed(8)  # the commit succeeds; only the publish fails
    item.refresh_from_db()
    assert item.state == OutboxItem.State.PENDING
    assert item.attempts == 0  # an unreachable broker costs no attempt
    assert "broker unreachable" in item.last_error
    assert item.next_attempt_at > timezone.now()
    assert queued(broker) == []

    # Not due yet: the relay waits for the backoff.
    assert outbox.relay()["published"] == 0
    OutboxItem.objects.filter(pk=item.pk).update(next_attempt_at=timezone.now())
    assert outbox.relay()["published"] == 1
    assert outbox.relay()["published"] == 0
    item.refresh_from_db()
    assert item.state == OutboxItem.State.PUBLISHED
    assert [message["id"] for message in queued(broker)] == [str(item.task_id)]


def test_the_relay_leaves_a_new_item_to_the_fast_path_for_its_grace_period(broker):
    # A process that died between commit and publish: no on_commit callback ran.
    item = enqueue_committed(9)
    assert outbox.relay()["published"] == 0
    OutboxItem.objects.filter(pk=item.pk).update(next_attempt_at=timezone.now() - timedelta(seconds=1))
    assert outbox.relay()["published"] == 1
    assert [message["id"] for message in queued(broker)] == [str(item.task_id)]


def test_the_relay_stops_at_the_first_unreachable_broker_error_and_counts_no_attempt(broker):
    items = [enqueue_committed(n) for n in range(3)]
    OutboxItem.objects.update(next_attempt_at=timezone.now() - timedelta(seconds=1))
    with unreachable_broker():
        counts = outbox.relay()
    assert counts == {"published": 0, "failed": 0, "deferred": 3}
    # Only the fast path's attempt, counted when each item was written (that process died before publishing).
    assert set(OutboxItem.objects.values_list("attempts", flat=True)) == {1}
    assert OutboxItem.objects.filter(state=OutboxItem.State.PENDING).count() == len(items)


def test_a_published_item_is_left_to_the_broker_however_long_it_waits(broker):
    item = enqueue_committed(10)
    OutboxItem.objects.filter(pk=item.pk).update(next_attempt_at=timezone.now() - timedelta(seconds=1))
    outbox.relay()
    # A backlog of days on a broker that kept its data: still queued, never published again.
    broker.set(outbox.BROKER_EPOCH_KEY, repr((timezone.now() - timedelta(days=4)).timestamp()))
    OutboxItem.objects.filter(pk=item.pk).update(
        published_at=timezone.now() - timedelta(days=3), next_attempt_at=timezone.now() - timedelta(days=3)
    )
    assert outbox.relay()["published"] == 0
    assert [message["id"] for message in queued(broker)] == [str(item.task_id)]


def test_a_published_item_whose_message_the_broker_lost_is_published_again_under_the_same_task_id(broker):
    item = enqueue_published(10)
    OutboxItem.objects.filter(pk=item.pk).update(next_attempt_at=timezone.now() - timedelta(seconds=1))
    assert outbox.relay()["published"] == 0  # held by the broker: marked published
    assert OutboxItem.objects.get(pk=item.pk).state == OutboxItem.State.PUBLISHED
    assert broker.exists(outbox.BROKER_EPOCH_KEY)
    broker.flushdb()  # the broker lost its data (a Redis restart without persistence): the epoch key too
    assert outbox.relay()["published"] == 1
    item.refresh_from_db()
    assert (item.state, item.attempts) == (OutboxItem.State.PUBLISHED, 2)
    assert [message["id"] for message in queued(broker)] == [str(item.task_id)]
    assert outbox.relay()["published"] == 0


@pytest.mark.django_db(transaction=True)  # its dead letter is committed on a connection of its own
def test_an_item_whose_task_no_worker_registers_fails_at_once_and_stops_nothing_else(broker):
    with transaction.atomic():
        renamed = OutboxItemFactory(task_name="payments.tasks.charge_order", args=[1])
        good = OutboxItemFactory(task_name=TASK, args=[2])
    OutboxItem.objects.update(next_attempt_at=timezone.now() - timedelta(seconds=1))
    assert outbox.relay() == {"published": 1, "failed": 1, "deferred": 0}
    renamed.refresh_from_db()
    good.refresh_from_db()
    assert renamed.state == OutboxItem.State.FAILED
    assert "no task named" in renamed.last_error
    assert good.state == OutboxItem.State.PUBLISHED


# The dead letter is written on a connection of its own (ops.services.record_failure): a real commit.
@pytest.mark.django_db(transaction=True)
def test_the_relay_gives_up_after_the_attempt_budget_with_one_dead_letter(broker, settings):
    settings.OUTBOX_MAX_ATTEMPTS = 2
    seen = []
    outbox.work_failed.connect(lambda sender, **kw: seen.append(kw), weak=False, dispatch_uid="test-seen")
    try:
        with transaction.atomic():
            item = OutboxItemFactory(task_name=TASK, args=[11])
        OutboxItem.objects.filter(pk=item.pk).update(attempts=2, next_attempt_at=timezone.now())
        assert outbox.relay()["failed"] == 1
        assert outbox.relay()["failed"] == 0
    finally:
        outbox.work_failed.disconnect(dispatch_uid="test-seen")
    item.refresh_from_db()
    assert item.state == OutboxItem.State.FAILED
    assert item.finished_at is not None
    assert [(kw["item"].pk, kw["by_relay"]) for kw in seen] == [(item.pk, True)]
    dead = FailedTask.objects.get(task_id=str(item.task_id))
    assert dead.task_name == TASK
    assert dead.args == [11]
    assert queued(broker) == []


# As above: a real commit, since the dead letter would be written on a connection of its own.
@pytest.mark.django_db(transaction=True)
def test_an_item_whose_task_finishes_while_the_relay_gives_up_on_it_stays_done_with_no_dead_letter(
    broker, settings, monkeypatch
):
    """The relay claims an item whose publishes are spent and commits the claim; before it marks the item failed,
    the task of an earlier publish finishes (the item is done). Giving up must not turn done work into a failure
    with a dead letter, which staff could replay."""
    settings.OUTBOX_MAX_ATTEMPTS = 2
    with transaction.atomic():
        item = OutboxItemFactory(task_name=TASK, args=[17])
    OutboxItem.objects.filter(pk=item.pk).update(attempts=2, next_attempt_at=timezone.now())
    claim = outbox._claim_due

    def claimed_then_the_task_finishes(**kwargs):
        due = claim(**kwargs)
        outbox._finish_done(str(item.task_id))
        return due

    monkeypatch.setattr(outbox, "_claim_due", claimed_then_the_task_finishes)
    seen = []
    outbox.work_failed.connect(lambda sender, **kw: seen.append(kw), weak=False, dispatch_uid="test-seen-done")
    try:
        counts = outbox.relay()
    finally:
        outbox.work_failed.disconnect(dispatch_uid="test-seen-done")

    item.refresh_from_db()
    assert item.state == OutboxItem.State.DONE
    assert seen == []
    assert not FailedTask.objects.filter(task_id=str(item.task_id)).exists()
    assert counts["failed"] == 0


def test_a_finished_task_marks_its_item_done():
    item = enqueue_committed(12)
    # The task runs (in-process here) under the item's task id; it finds no such notification.
    app.tasks[TASK].apply(args=[12], task_id=str(item.task_id))
    item.refresh_from_db()
    assert item.state == OutboxItem.State.DONE
    assert item.finished_at is not None


def test_a_final_failure_ends_the_item_failed_unless_its_task_resumes_later(settings):
    with transaction.atomic():
        failed = outbox.enqueue("reports.tasks.generate_report", 13)
    item, parked = outbox.finish_failed(task_id=str(failed.task_id), reason="ProviderRejected: HTTP 422")
    assert (item.state, parked) == (OutboxItem.State.FAILED, False)
    # A second report of the same failure changes nothing.
    assert outbox.finish_failed(task_id=str(failed.task_id), reason="again") == (None, False)

    outbox.resume_after_failure("tests.resuming", seconds=120)
    with transaction.atomic():
        resuming = OutboxItemFactory(task_name="tests.resuming", args=[1], state=OutboxItem.State.PUBLISHED)
    item, parked = outbox.finish_failed(task_id=str(resuming.task_id), reason="ConnectionError: warehouse down")
    assert parked
    assert item.state == OutboxItem.State.PENDING
    assert timedelta(seconds=110) < item.next_attempt_at - timezone.now() <= timedelta(seconds=120)
    # Its budget spent, it ends failed after all.
    OutboxItem.objects.filter(pk=item.pk).update(attempts=settings.OUTBOX_MAX_ATTEMPTS)
    item, parked = outbox.finish_failed(task_id=str(resuming.task_id), reason="ConnectionError: still down")
    assert (item.state, parked) == (OutboxItem.State.FAILED, False)


def test_parked_work_that_finishes_by_itself_resolves_its_dead_letter():
    item = enqueue_committed(14)
    FailedTaskFactory(task_id=str(item.task_id), task_name=TASK, exception="ConnectionError: mail down")
    OutboxItem.objects.filter(pk=item.pk).update(last_error="ConnectionError: mail down")
    app.tasks[TASK].apply(args=[14], task_id=str(item.task_id))
    assert FailedTask.objects.get(task_id=str(item.task_id)).resolved


def test_enqueue_once_skips_work_that_is_still_open():
    with transaction.atomic():
        first = outbox.enqueue_once(TASK, 15, "2026-01-31")
        second = outbox.enqueue_once(TASK, 15, "2026-01-31")
        other = outbox.enqueue_once(TASK, 16, "2026-01-31")
    assert first is not None and other is not None
    assert second is None
    OutboxItem.objects.filter(pk=first.pk).update(state=OutboxItem.State.DONE)
    with transaction.atomic():
        assert outbox.enqueue_once(TASK, 15, "2026-01-31") is not None


def _outbox_writes(queries) -> list[str]:
    table = OutboxItem._meta.db_table
    return [q["sql"].split()[0].upper() for q in queries if table in q["sql"] and not q["sql"].startswith("SELECT")]


def test_the_outbox_costs_one_insert_per_dispatch_and_one_update_when_done(broker, django_capture_on_commit_callbacks):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    with CaptureQueriesContext(connection) as dispatch, django_capture_on_commit_callbacks(execute=True):
        item = enqueue_committed(17)
    assert _outbox_writes(dispatch.captured_queries) == ["INSERT"]
    assert [message["id"] for message in queued(broker)] == [str(item.task_id)]
    with CaptureQueriesContext(connection) as run:
        app.tasks[TASK].apply(args=[17], task_id=str(item.task_id))
    assert _outbox_writes(run.captured_queries) == ["UPDATE"]
    item.refresh_from_db()
    assert item.state == OutboxItem.State.DONE


def test_on_a_broker_the_relay_cannot_search_the_fast_path_marks_the_item_published_itself(
    broker, settings, django_capture_on_commit_callbacks
):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    # What `make run` uses; the app in this process still publishes to the test's Redis.
    settings.CELERY_BROKER_URL = "filesystem://localhost/"
    with CaptureQueriesContext(connection) as dispatch, django_capture_on_commit_callbacks(execute=True):
        item = enqueue_committed(23)
    assert _outbox_writes(dispatch.captured_queries) == ["INSERT", "UPDATE"]
    item.refresh_from_db()
    assert (item.state, item.attempts) == (OutboxItem.State.PUBLISHED, 1)
    assert [message["id"] for message in queued(broker)] == [str(item.task_id)]


def test_published_messages_carry_no_time_limits_so_the_consuming_worker_decides(
    broker, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True):
        enqueue_committed(18)
    (raw,) = broker.lrange("default", 0, -1)
    assert json.loads(raw)["headers"]["timelimit"] == [None, None]


def test_a_database_error_after_the_publish_does_not_fail_the_committed_request(broker, settings):
    from unittest import mock

    from django.db import OperationalError

    settings.CELERY_BROKER_URL = "filesystem://localhost/"  # where the fast path writes after publishing

    item = enqueue_committed(19)  # committed; its after-commit publish is run by hand below
    failing = mock.Mock()
    failing.update.side_effect = OperationalError("the database went away")
    with mock.patch.object(OutboxItem.objects, "filter", return_value=failing):
        outbox._publish_after_commit(item.pk, str(item.task_id), TASK, [19], {})  # does not raise
    assert [message["id"] for message in queued(broker)] == [str(item.task_id)]
    item.refresh_from_db()
    assert item.state == OutboxItem.State.PENDING  # the relay publishes it once more after the grace period


def test_a_message_lost_in_transit_is_published_again_after_the_horizon_and_a_held_one_is_not(broker, settings):
    """A worker killed between taking a message off its queue and recording it unacknowledged: Redis kept
    its data, but not that message. After OUTBOX_LOST_AFTER_SECONDS the relay looks for it on the broker."""
    held, lost, running = (enqueue_published(n) for n in (20, 21, 22))
    OutboxItem.objects.update(next_attempt_at=timezone.now() - timedelta(seconds=1))
    assert outbox.relay()["published"] == 0  # all three held: marked published
    assert set(OutboxItem.objects.values_list("state", flat=True)) == {OutboxItem.State.PUBLISHED}
    by_id = {json.loads(raw)["headers"]["id"]: raw for raw in broker.lrange("default", 0, -1)}
    broker.lrem("default", 0, by_id[str(lost.task_id)])  # taken off the queue, then the worker died
    broker.lrem("default", 0, by_id[str(running.task_id)])
    broker.hset("unacked", "tag-1", json.dumps([json.loads(by_id[str(running.task_id)]), "default", "default"]))

    # Before the horizon: nothing is looked for.
    assert outbox.relay()["published"] == 0
    past = timezone.now() - timedelta(seconds=settings.OUTBOX_LOST_AFTER_SECONDS + 1)
    OutboxItem.objects.update(published_at=past, next_attempt_at=past)
    broker.set(outbox.BROKER_EPOCH_KEY, repr((past - timedelta(hours=1)).timestamp()))  # Redis kept its data

    assert outbox.relay()["published"] == 1
    for item in (held, lost, running):
        item.refresh_from_db()
    assert [message["id"] for message in queued(broker)].count(str(lost.task_id)) == 1
    assert lost.attempts == 2
    # The queued one and the running one are left alone, and not looked for again before the horizon.
    assert (held.attempts, running.attempts) == (1, 1)
    assert held.next_attempt_at > timezone.now() and running.next_attempt_at > timezone.now()
    assert outbox.relay()["published"] == 0


# --- Several items of one change in one INSERT (outbox.batched, issue 18) ----------------------------------------


def test_a_batch_writes_its_items_in_one_insert_and_publishes_them_after_commit_in_the_order_given(
    broker, django_capture_on_commit_callbacks
):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    with CaptureQueriesContext(connection) as dispatch, django_capture_on_commit_callbacks(execute=True):
        with transaction.atomic(), outbox.batched():
            first = outbox.enqueue(TASK, 1)
            later = outbox.enqueue(TASK, 2, delay=60)  # the relay's, a minute from now: no fast path
            last = outbox.enqueue(TASK, 3)
            assert not OutboxItem.objects.exists()  # nothing written before the block ends
    assert _outbox_writes(dispatch.captured_queries) == ["INSERT"]
    items = {item.pk: item for item in OutboxItem.objects.all()}
    assert sorted(items) == sorted([first.pk, later.pk, last.pk])
    assert first.pk < later.pk < last.pk
    assert [(items[i.pk].args, items[i.pk].attempts) for i in (first, later, last)] == [([1], 1), ([2], 0), ([3], 1)]
    assert items[later.pk].next_attempt_at > timezone.now() + timedelta(seconds=50)
    # Published in the order enqueued: kombu pushes each message at the list's head, so the oldest is last.
    assert [message["id"] for message in queued(broker)] == [str(last.task_id), str(first.task_id)]


def test_a_batch_that_raises_writes_nothing_and_the_next_enqueue_is_its_own_again(
    broker, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True), transaction.atomic():
        with pytest.raises(ZeroDivisionError), outbox.batched():
            outbox.enqueue(TASK, 1)
            1 / 0  # noqa: B018 (the change fails; the caller's transaction would roll back)
        assert not OutboxItem.objects.exists()
        alone = outbox.enqueue(TASK, 2)  # no batch left open: written at once
        assert OutboxItem.objects.get().pk == alone.pk
    assert [message["args"] for message in queued(broker)] == ["[2]"]


def test_a_batch_inside_a_batch_joins_it_and_enqueue_once_sees_what_it_holds(broker):
    with transaction.atomic(), outbox.batched():
        outer = outbox.enqueue(TASK, 1)
        with outbox.batched():
            inner = outbox.enqueue(TASK, 2)
            assert outbox.enqueue_once(TASK, 1) is None  # held by the batch, not yet written
        assert not OutboxItem.objects.exists()  # the inner block wrote nothing: the outer one writes both
    assert list(OutboxItem.objects.order_by("pk").values_list("pk", "args")) == [(outer.pk, [1]), (inner.pk, [2])]


def test_a_batch_rolled_back_with_its_transaction_leaves_no_row_and_no_message(
    broker, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        with pytest.raises(ZeroDivisionError), transaction.atomic():
            with outbox.batched():
                outbox.enqueue(TASK, 1)
            1 / 0  # noqa: B018 (the change fails after the batch wrote its items)
    assert callbacks == []
    assert not OutboxItem.objects.exists()
    assert queued(broker) == []


_examples = iter(range(1, 10**6))
# A program of enqueue calls (the argument, and whether it is due now or delayed), enqueue_once calls, batched()
# blocks (that end normally or raise, caught just outside), and savepoints (atomic blocks that commit or roll
# back), holding more of them, nested.
_calls = st.one_of(
    st.tuples(st.just("enqueue"), st.integers(0, 3), st.booleans()),
    st.tuples(st.just("once"), st.integers(0, 3)),
)
_programs = st.lists(
    st.recursive(
        _calls,
        lambda inner: st.tuples(st.sampled_from(["batch", "savepoint"]), st.lists(inner, max_size=4), st.booleans()),
        max_leaves=12,
    ),
    max_size=8,
)


class _Raised(Exception):
    pass


@pytest.mark.fuzz  # 120 programs on PostgreSQL, about 3 s: out of the unit tier
@hypothesis_settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(program=_programs)
def test_batched_blocks_write_and_publish_what_a_model_of_the_rules_says(program, django_capture_on_commit_callbacks):
    """Whatever the nesting, the items written, their order, the INSERTs and the publishes are what the rules say:
    an item is written when enqueued, unless a batch begun at the same savepoint is open (then when the outermost
    such batch ends, all its items in one INSERT); a batch that raises writes nothing of what it enqueued; a
    savepoint that rolls back takes what was written inside it; enqueue_once sees written and held items; the
    due items are published after commit in the order written."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    base = next(_examples) * 10  # this example's own arguments: enqueue_once must not see another example's items
    written: list[tuple[int, bool]] = []  # the model: (argument, due now) of each item in the table, in pk order
    held: list[list[tuple[int, bool]]] = []  # the items of each open outermost batch, outer first
    inserts = 0

    def run(calls, batch: list | None) -> None:
        """Run the calls; `batch` is the model's batch of this savepoint, if one is open."""
        nonlocal inserts
        for call in calls:
            if call[0] == "savepoint":
                mark = len(written)
                with contextlib.suppress(_Raised), transaction.atomic():
                    run(call[1], None)  # a batch outside this savepoint does not take its items
                    if call[2]:
                        raise _Raised
                if call[2]:
                    del written[mark:]
            elif call[0] == "batch":
                own = batch if batch is not None else []
                mark = len(own)
                if batch is None:
                    held.append(own)
                try:
                    with contextlib.suppress(_Raised), outbox.batched():
                        run(call[1], own)
                        if call[2]:
                            raise _Raised
                finally:
                    if batch is None:
                        held.pop()
                if call[2]:
                    del own[mark:]
                elif batch is None and own:
                    written.extend(own)
                    inserts += 1
            else:
                argument, due = base + call[1], call[0] == "once" or call[2]
                is_open = any(seen == argument for seen, _ in [*written, *(i for b in held for i in b)])
                if call[0] == "enqueue":
                    outbox.enqueue(TASK, argument, delay=0 if due else 60)
                else:
                    assert (outbox.enqueue_once(TASK, argument) is None) == is_open, (argument, written, held)
                    if is_open:
                        continue
                if batch is not None:
                    batch.append((argument, due))
                else:
                    written.append((argument, due))
                    inserts += 1

    last = OutboxItem.objects.order_by("-pk").values_list("pk", flat=True).first() or 0
    with CaptureQueriesContext(connection) as captured, django_capture_on_commit_callbacks() as callbacks:
        with transaction.atomic():
            run(program, None)
    items = list(OutboxItem.objects.filter(pk__gt=last).order_by("pk"))
    assert [(item.args, item.attempts) for item in items] == [([arg], int(due)) for arg, due in written]
    assert _outbox_writes(captured.captured_queries).count("INSERT") == inserts
    due = [item.pk for item in items if item.attempts == 1]
    assert [callback.args[0] for callback in callbacks] == due


# --- A hostile review of outbox.batched (each of these failed on c8d45cd) -----------------------------------------


class Boom(Exception):
    pass


def test_a_nested_batch_that_raises_writes_nothing_even_when_the_outer_block_goes_on(
    django_capture_on_commit_callbacks,
):
    with django_capture_on_commit_callbacks() as callbacks:
        with transaction.atomic(), outbox.batched():
            kept = outbox.enqueue(TASK, 1)
            with pytest.raises(Boom), outbox.batched():
                outbox.enqueue(TASK, 2)
                raise Boom  # "A block that raises writes nothing"
    assert list(OutboxItem.objects.values_list("args", flat=True)) == [[1]]
    assert [callback.args[0] for callback in callbacks] == [kept.pk]


def test_work_rolled_back_to_a_savepoint_inside_a_batch_leaves_no_item(django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks() as callbacks:
        with transaction.atomic(), outbox.batched():
            kept = outbox.enqueue(TASK, 1)
            with pytest.raises(Boom), transaction.atomic():
                outbox.enqueue(TASK, 2)  # before the change: its row rolled back with the savepoint
                raise Boom
    assert list(OutboxItem.objects.values_list("args", flat=True)) == [[1]]
    assert [callback.args[0] for callback in callbacks] == [kept.pk]


def test_a_status_change_rolled_back_to_its_savepoint_inside_an_outer_batch_dispatches_nothing():
    from orders import pipeline, services
    from orders.models import Order
    from tests.factories import ProductFactory, UserFactory

    ProductFactory(sku="REV-B1", stock=5)
    order = services.place_order(owner=UserFactory(), items=[("REV-B1", 1)])
    with transaction.atomic(), outbox.batched():
        with pytest.raises(Boom), transaction.atomic():
            locked = Order.objects.select_for_update().get(pk=order.pk)
            pipeline.set_status(locked, Order.Status.CONFIRMED, note="rolled back")  # joins the outer batch
            raise Boom
    order.refresh_from_db()
    assert order.status == Order.Status.PENDING
    steps = OutboxItem.objects.filter(task_name__in=["orders.tasks.charge_order", "orders.tasks.expire_order"])
    assert list(steps.values_list("task_name", flat=True)) == []  # the order never was confirmed


def test_a_batch_opened_outside_a_transaction_cannot_let_a_change_commit_without_its_items():
    from orders.models import Product
    from tests.factories import ProductFactory

    with pytest.raises(RuntimeError):
        with outbox.batched():
            with transaction.atomic():  # commits (here: releases its savepoint) before the batch writes
                ProductFactory(sku="REV-B2", stock=1)
                outbox.enqueue(TASK, 1)
    committed_change = Product.objects.filter(sku="REV-B2").exists()
    assert not (committed_change and not OutboxItem.objects.exists()), "the change is kept, its item dropped"
