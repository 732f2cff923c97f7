"""Hostile review of the RabbitMQ support: the dead-letter queue's consumer, the queues' arguments, the delivery
limit, countdown retries (Celery's native delayed delivery) on quorum queues.

Fast tests call ops.deadletters.record_dead_lettered with the message a worker's DeadLetterQueue step hands it
(ops/rabbitmq.py: on_dead_letter acknowledges only when it returns, and leaves the message unacknowledged on
the queue when it raises); the `worker` tests run real workers on a virtual host of their own.
"""
# ruff: noqa: F811  (start_worker: the e2e fixture, imported so the worker tests can use it)

import json
import subprocess
import time
import uuid
from datetime import timedelta
from types import SimpleNamespace

import pytest
from django.conf import settings
from django.db import transaction
from django.utils import timezone
from kombu import Connection, Exchange, Producer

from config.celery import app
from config.settings.celery import task_queues
from core import outbox
from core.models import OutboxItem
from ops.deadletters import record_dead_lettered
from ops.models import FailedTask
from tests.attack import rabbitmq_tasks as tasks
from tests.brokers import rabbitmq_queues_with_delivery_limit
from tests.e2e.conftest import start_worker, worker_env  # noqa: F401 (the e2e fixtures, for the worker tests)
from tests.factories import OutboxItemFactory
from tests.stack import wait_for

on_rabbitmq = pytest.mark.parametrize("broker", ["rabbitmq"], indirect=True)

REAL_TASK = "notifications.tasks.send_notification"


@pytest.fixture(autouse=True)
def task_modules_imported():
    """As in a worker, whose DeadLetterQueue step runs record_dead_lettered: every task module is imported."""
    app.loader.import_default_modules()
    assert REAL_TASK in app.tasks


def dead_letter(headers=None, body=b"", content_type="application/json", properties=None):
    """What kombu hands DeadLetterQueue.on_dead_letter (accept=[]: never decoded)."""
    return SimpleNamespace(
        headers=headers,
        body=body,
        content_type=content_type,
        content_encoding="utf-8",
        properties=properties or {},
        delivery_info={"routing_key": "", "exchange": settings.DEAD_LETTER_EXCHANGE},
    )


def x_death(reason="delivery_limit", queue="default"):
    return [{"reason": reason, "queue": queue, "count": 1, "exchange": queue, "routing-keys": [queue]}]


def task_body(args, kwargs=None) -> bytes:
    return json.dumps(
        [args, kwargs or {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]
    ).encode()


# --- The dead-letter consumer against messages it cannot record: left unacknowledged, forever ---------------


@pytest.mark.django_db(transaction=True)
def test_a_dead_letter_naming_a_real_task_without_an_id_header_is_recorded():
    """A task message that carries no `id` header (protocol 1 puts it in the body; any foreign producer may omit
    it): record_dead_lettered invents `dead-<uuid>` and hands it to outbox.finish_failed, whose filter on the
    UUIDField raises ValidationError. The consumer then leaves the message unacknowledged: it sits in that
    worker's prefetch until the channel closes, then goes to the next worker, forever, and ten of them stop
    the worker's dead-letter consumer (PREFETCH=10)."""
    message = dead_letter({"task": REAL_TASK, "x-death": x_death()}, task_body([1]))
    record_dead_lettered(message)  # raises django.core.exceptions.ValidationError on the current code
    assert FailedTask.objects.filter(task_name=REAL_TASK).count() == 1


@pytest.mark.django_db(transaction=True)
def test_a_dead_letter_whose_id_is_not_a_uuid_is_recorded():
    """The same with any non-UUID task id (Celery accepts any string as task_id: `apply_async(task_id="report-7")`)."""
    message = dead_letter({"task": REAL_TASK, "id": "report-7", "x-death": x_death()}, task_body([1]))
    record_dead_lettered(message)
    assert FailedTask.objects.filter(task_id="report-7").exists()


@pytest.mark.django_db(transaction=True)
def test_a_dead_letter_whose_arguments_hold_nan_is_recorded():
    """json.loads accepts NaN/Infinity (kombu's json serializer writes them); PostgreSQL's jsonb refuses them:
    record_failure raises DataError, the message is left unacknowledged and comes back forever. Worse, the outbox
    item was failed first, so the order is on hold with no dead letter to replay or resolve."""
    task_id = str(uuid.uuid4())
    body = b'[[NaN, Infinity], {}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]'
    message = dead_letter({"task": REAL_TASK, "id": task_id, "x-death": x_death()}, body)
    record_dead_lettered(message)  # raises django.db.utils.DataError on the current code
    row = FailedTask.objects.get(task_id=task_id)
    assert row.task_name == REAL_TASK


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    "headers",
    [
        None,
        {},
        {"x-death": "delivery_limit"},
        {"x-death": ["delivery_limit", "default"]},
        {"x-death": [{"reason": ["nested", {"deep": b"\x00bytes"}], "queue": 7}], "task": {"not": "a string"}},
        {"x-first-death-reason": "delivery_limit", "task": "\x00" * 10, "id": "\x00"},
        {"task": "tests.no_such_task", "id": str(uuid.uuid4()), "x-death": x_death()},
    ],
    ids=["no-headers", "empty", "x-death-string", "x-death-strings", "nested-garbage", "nul-bytes", "unknown-task"],
)
def test_hostile_headers_are_recorded_as_refused_and_never_raise(headers):
    """Pinned: garbage headers on a forged dead letter become one refused row under no task name a replay could run."""
    before = FailedTask.objects.count()
    record_dead_lettered(dead_letter(headers, b"\x00\xff not json", content_type="application/x-python-serialize"))
    assert FailedTask.objects.count() == before + 1
    assert FailedTask.objects.latest("failed_at").kind == FailedTask.Kind.REFUSED


# --- A dead letter settles an item whose work may still be running -----------------------------------------


@pytest.mark.django_db(transaction=True)
def test_work_that_succeeds_after_its_message_was_dead_lettered_ends_done():
    """The broker dead-letters a message whose delivery is still running: a worker that lost its connection
    keeps running its task (CELERY_WORKER_CANCEL_LONG_RUNNING_TASKS_ON_CONNECTION_LOSS=False) while the
    broker counts each lost connection as one more delivery (and so does any producer with write access to
    shop.dead-letter, which can forge the same message). record_dead_lettered fails the item (the order goes on
    hold), the task then succeeds, and _finish_done updates only OPEN items: the item stays failed, with an
    unresolved dead letter, for work that was done. The e2e version: test_innocent_connection_losses_...
    """
    step = "orders.tasks.process_order"  # an order step: its final failure puts the order on hold
    item = OutboxItemFactory(task_name=step, args=[424242], state=OutboxItem.State.PUBLISHED)
    task_id = str(item.task_id)
    record_dead_lettered(
        dead_letter(
            {"task": step, "id": task_id, "x-death": x_death("delivery_limit", "critical")}, task_body([424242])
        )
    )
    item.refresh_from_db()
    assert item.state == OutboxItem.State.FAILED  # what the broker's verdict does at once

    # The delivery that was still running finishes: task_success.
    outbox._finish_done(task_id)

    item.refresh_from_db()
    assert item.state == OutboxItem.State.DONE, f"the work was done, the item says {item.state}: {item.last_error}"
    assert not FailedTask.objects.filter(task_id=task_id, resolved=False).exists()


@pytest.mark.django_db(transaction=True)
def test_a_dead_letter_drained_after_its_work_finished_is_resolved_at_once():
    """The other order: the delivery that was still running finishes first (the item is done), and the dead-letter
    consumer, behind on its queue, reads the broker's verdict afterwards. Found in the final review: it recorded an
    unresolved dead letter for work that was done."""
    step = "orders.tasks.process_order"
    item = OutboxItemFactory(task_name=step, args=[434343], state=OutboxItem.State.DONE)
    task_id = str(item.task_id)

    record_dead_lettered(
        dead_letter(
            {"task": step, "id": task_id, "x-death": x_death("delivery_limit", "critical")}, task_body([434343])
        )
    )

    item.refresh_from_db()
    assert item.state == OutboxItem.State.DONE
    assert not FailedTask.objects.filter(task_id=task_id, resolved=False).exists()


# --- Queue arguments that differ between processes ------------------------------------------------------------


@on_rabbitmq
@pytest.mark.django_db(transaction=True)
def test_a_request_whose_queue_was_declared_with_another_delivery_limit_commits_and_answers(broker):
    """The workers run with RABBITMQ_DELIVERY_LIMIT=2, the web with the default (5) (a rolling change of the
    setting, or one process's env forgotten). Celery declares the queue on its first publish over a connection:
    PRECONDITION_FAILED, a channel error (amqp.exceptions.PreconditionFailed), not the OperationalError that
    _publish treats as "broker unreachable", so it escapes transaction.on_commit after the order committed."""
    with Connection(broker.url) as connection:
        for queue in task_queues("rabbitmq", delivery_limit=2):
            queue(connection.default_channel).declare()  # as the workers did

    with transaction.atomic():
        item = outbox.enqueue(REAL_TASK, 1)  # raises amqp.exceptions.PreconditionFailed at commit

    item.refresh_from_db()
    assert item.state == OutboxItem.State.PENDING
    assert "PRECONDITION_FAILED" in item.last_error


@on_rabbitmq
@pytest.mark.django_db(transaction=True)
def test_an_order_placed_while_the_web_and_the_workers_disagree_on_the_delivery_limit_answers_201(
    broker, api_client, user, product
):
    """The same through the API: the order commits, then the publish after commit raises PreconditionFailed out of
    the view: the shopper gets a 500 for an order that exists (and retries it: a second order)."""
    from orders.models import Order

    with Connection(broker.url) as connection:
        for queue in task_queues("rabbitmq", delivery_limit=2):
            queue(connection.default_channel).declare()
    api_client.raise_request_exception = False
    response = api_client.post(
        "/api/orders/", {"items": [{"sku": product.sku, "quantity": 1}]}, content_type="application/json"
    )
    orders = Order.objects.filter(owner=user).count()
    assert response.status_code == 201, f"{response.status_code} with {orders} order(s) committed"


@on_rabbitmq
@pytest.mark.django_db(transaction=True)
def test_the_relay_keeps_an_item_it_cannot_publish_for_mismatched_queue_arguments_pending(broker):
    """The relay's view of the same: each run costs the item an attempt (the generic `except Exception`), and after
    OUTBOX_MAX_ATTEMPTS runs the order step is failed for good, though the broker was never unreachable."""
    with Connection(broker.url) as connection:
        for queue in task_queues("rabbitmq", delivery_limit=2):
            queue(connection.default_channel).declare()
    item = OutboxItemFactory(task_name=REAL_TASK, args=[1], next_attempt_at=timezone.now() - timedelta(seconds=5))
    counts = outbox.relay()
    item.refresh_from_db()
    print(counts, item.state, item.attempts, item.last_error)
    assert item.state == OutboxItem.State.PENDING
    # Expected: not counted as an attempt (the item is not at fault: a deployment is), as an unreachable broker.
    assert item.attempts == 0, f"attempts {item.attempts}: {item.last_error}"


# --- Real workers --------------------------------------------------------------------------------------------

WORKER_ENV = {"CELERY_EXTRA_IMPORTS": tasks.__name__, "CELERY_WORKER_LOST_WAIT": "1"}


def publish_dead_letter(url: str, body: bytes, headers: dict | None, content_type: str = "application/json") -> None:
    with Connection(url) as connection:
        exchange = Exchange(settings.DEAD_LETTER_EXCHANGE, type="fanout", durable=True)
        Producer(connection.default_channel).publish(
            body,
            exchange=exchange,
            routing_key="",
            headers=headers,
            content_type=content_type,
            content_encoding="binary",
            serializer=None,
        )


@pytest.mark.worker
@on_rabbitmq
@pytest.mark.django_db(transaction=True)
def test_hostile_bytes_on_the_dead_letter_queue_neither_stop_nor_jam_the_workers(start_worker, broker, tmp_path):
    """Pinned where defended (garbage, pickle, 8 MB, NUL bytes, x-death of every wrong type: refused rows, the
    queue drains); fails on the two messages the consumer cannot record (no id, NaN): they stay unacknowledged."""
    worker = start_worker("default", env=WORKER_ENV)
    url = broker.url
    defended = [
        (b"\x80\x04garbage pickle", {"task": REAL_TASK, "id": str(uuid.uuid4())}, "application/x-python-serialize"),
        (b"not json", None, "application/json"),
        (b"{}" + b" " * (8 * 1024 * 1024), {"x-death": "delivery_limit"}, "application/json"),
        (b"\x00\x00", {"x-death": ["a", "b"], "task": "\x00"}, "text/plain"),
        (task_body([1]), {"x-death": [{"reason": {"x": 1}}], "task": "tests.nope", "id": "x"}, "application/json"),
    ]
    for body, headers, content_type in defended:
        publish_dead_letter(url, body, headers, content_type)
    wait_for(lambda: FailedTask.objects.count() == len(defended), 30, "a refused row for each hostile dead letter")
    assert broker.depth(settings.DEAD_LETTER_QUEUE) == 0

    # Two it cannot record, then a good task behind them on the task queue.
    publish_dead_letter(url, task_body([1]), {"task": REAL_TASK, "x-death": x_death()})
    nan = b'[[NaN], {}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]'
    publish_dead_letter(url, nan, {"task": REAL_TASK, "id": str(uuid.uuid4()), "x-death": x_death()})
    ran = tmp_path / "ran"
    tasks.sleep_then_note.delay(str(ran), 0)
    wait_for(ran.exists, 20, "the worker to keep running tasks")
    assert worker.process.poll() is None
    time.sleep(3)
    # Expected: both recorded and acknowledged. Observed: both held unacknowledged by the worker, for good.
    assert broker.unacked() == 0, "dead letters left unacknowledged on the dead-letter queue"
    assert FailedTask.objects.count() == len(defended) + 2


@pytest.mark.worker
@on_rabbitmq
@pytest.mark.django_db(transaction=True)
def test_a_countdown_retry_on_a_quorum_queue_comes_back_to_its_queue_and_runs_once_per_retry(
    start_worker,
    broker,
    tmp_path,
):
    """Pinned: Celery's native delayed delivery (topic exchanges, quorum delay queues) brings each retry back to
    its queue, once, and the final failure is one dead letter. (Celery re-routes a countdown retry by the task's
    route, not by the queue it was delivered from: a task sent with an explicit other queue= comes back on its
    routed queue. Nothing in the app sends with an explicit queue, so the routed queue is the one it came from.)"""
    start_worker("default", env=WORKER_ENV)
    runs = tmp_path / "runs.log"
    result = tasks.retry_with_countdown.apply_async((str(runs), 2))
    dead = wait_for(lambda: FailedTask.objects.filter(task_id=result.id).first(), 60, "the final failure")
    time.sleep(3)  # any duplicate would have run by now
    # Each retry came back through celery_delayed_*: its routing key is the 28 delay bits + ".default".
    lines = runs.read_text().splitlines()
    assert [line.split()[1] for line in lines] == ["0", "1", "2"], lines
    assert all(line.endswith("default") for line in lines), lines
    assert dead.exception.startswith("ConnectionError")
    # ops.deadletters.record_task_failure takes the delivery's routing key as the dead letter's queue: after a
    # countdown retry on RabbitMQ that is "0.0.0.(...).1.0.default", not a queue (admin list, queue filter).
    assert dead.queue == "default", dead.queue
    assert broker.depth("bulk") == broker.depth("default") == broker.depth(settings.DEAD_LETTER_QUEUE) == 0


LIMIT = 2


@pytest.fixture
def queues_with_limit(broker):
    with rabbitmq_queues_with_delivery_limit(LIMIT):
        yield


def close_worker_connections(vhost: str) -> int:
    """Close every connection on the vhost (the workers'): as a network blip or a node lost would."""
    out = subprocess.run(
        ["rabbitmqctl", "-q", "close_all_connections", "-p", vhost, "attack: blip"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return out.returncode


@pytest.mark.worker
@on_rabbitmq
@pytest.mark.django_db(transaction=True)
def test_innocent_connection_losses_during_a_long_task_do_not_fail_work_that_succeeds(
    start_worker,
    broker,
    tmp_path,
    queues_with_limit,
):
    """A task runs 25 s; its worker's connection is lost LIMIT+1 times meanwhile (a flapping network, a rolling
    restart of the cluster). The task keeps running and succeeds, but each lost connection counted one more
    delivery: the broker dead-letters the message and the dead-letter consumer fails the item while its work is
    still in progress; the success that follows must settle it done and resolve its dead letter."""
    start_worker("default", env={**WORKER_ENV, "RABBITMQ_DELIVERY_LIMIT": str(LIMIT)})
    notes = tmp_path / "notes.log"
    with transaction.atomic():
        item = outbox.enqueue(tasks.sleep_then_note.name, str(notes), 25)
    wait_for(notes.exists, 20, "the task to start")
    for _ in range(LIMIT + 1):
        close_worker_connections(broker.vhost.name)
        time.sleep(5)  # the worker reconnects and the message comes back to it
    wait_for(lambda: "done" in notes.read_text(), 40, "the long task to finish")
    time.sleep(3)
    item.refresh_from_db()
    print("notes:", notes.read_text(), "item:", item.state, item.last_error)
    print("failed:", list(FailedTask.objects.values_list("task_name", "exception")))
    assert notes.read_text().count("done") >= 1
    assert item.state == OutboxItem.State.DONE, f"work done, item {item.state}: {item.last_error}"
    # The broker's verdict may have been recorded meanwhile: the success resolved it.
    assert not FailedTask.objects.filter(task_id=str(item.task_id), resolved=False).exists()
