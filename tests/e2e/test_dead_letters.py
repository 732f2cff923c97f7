"""Dead letters, proven with a real worker: final failures, lost workers and poison messages.

The worker imports the test-only tasks of tests/e2e/deadletter_tasks.py through
CELERY_EXTRA_IMPORTS. Poison messages are published raw with kombu, the way any
producer on the broker could, with Celery's protocol 2 headers
(celery/app/amqp.py, as_task_v2).
"""

import json
import pickle
import time
import uuid
from pathlib import Path

import pytest
from django.conf import settings
from django.db import transaction

from config.celery import app
from core import outbox
from core.models import OutboxItem
from ops.models import FailedTask
from orders.models import Product
from tests.brokers import on_both_brokers
from tests.e2e import deadletter_tasks as tasks
from tests.stack import wait_for

# Each test runs on Redis and on RabbitMQ, where a refused message also passes through the dead-letter
# exchange (reason `rejected`: recorded once, by the worker that refused it, ops/rabbitmq.py).
pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True), on_both_brokers]

WORKER_ENV = {
    "CELERY_EXTRA_IMPORTS": tasks.__name__,
    # A dead pool process is declared lost after 1 s instead of 10, to keep the test short.
    "CELERY_WORKER_LOST_WAIT": "1",
}


def dead_letter(task_id: str) -> FailedTask | None:
    return FailedTask.objects.filter(task_id=task_id).first()


def test_final_failures_are_recorded_once_with_their_attempts(start_worker, broker):
    worker = start_worker("default", env=WORKER_ENV)
    unreachable = tasks.always_unreachable.delay()
    invalid = tasks.write_then_fail.delay("ROLLED-BACK")
    timed_out = tasks.outlive_time_limit.delay()

    for result in (unreachable, invalid, timed_out):
        wait_for(lambda result=result: dead_letter(result.id), 30, f"the dead letter of {result.id}")

    retried = dead_letter(unreachable.id)
    assert (retried.task_name, retried.queue, retried.kind) == (tasks.always_unreachable.name, "default", "failed")
    assert retried.attempts == 3  # the first run and max_retries=2 retries
    assert retried.exception == "ConnectionError: provider unreachable"
    assert "raise ConnectionError" in retried.traceback
    assert worker.log().count(f"[{unreachable.id}] retry:") == 2

    failed = dead_letter(invalid.id)
    assert (failed.attempts, failed.exception, failed.args) == (1, "ValueError: invalid: ROLLED-BACK", ["ROLLED-BACK"])
    # The task's transaction rolled back; its dead letter, written on another connection, did not.
    assert not Product.objects.filter(sku="ROLLED-BACK").exists()

    killed = dead_letter(timed_out.id)
    assert (killed.exception, killed.queue, killed.attempts) == ("TimeLimitExceeded(1,)", "default", 1)
    # Celery sends task_failure twice for a hard time limit (Request.on_failure, then on_timeout): still one row.
    # The dead letter is written by the first, so the second's log line may come a moment later: wait for both.
    expected = (
        "Task handler raised error: TimeLimitExceeded(1)",
        f"Hard time limit (1s) exceeded for {tasks.outlive_time_limit.name}[{timed_out.id}]",
    )
    wait_for(lambda: all(line in worker.log() for line in expected), 10, f"the log lines {expected}")
    time.sleep(1)
    assert FailedTask.objects.count() == 3


def test_a_task_that_kills_its_pool_process_is_redelivered_then_dead_lettered_after_the_bound(
    start_worker, broker, tmp_path
):
    limit = settings.TASK_MAX_WORKER_LOST
    worker = start_worker("default", env={**WORKER_ENV, "TASK_MAX_WORKER_LOST": str(limit)})

    # Killed once: the message goes back to the queue and the second delivery completes.
    once = tmp_path / "once.log"
    recovered = tasks.kill_own_process.delay(str(once), kills=1)
    wait_for(lambda: "done" in once.read_text() if once.exists() else False, 30, "the redelivered task to complete")
    starts = [line.split()[1] for line in once.read_text().splitlines() if line.startswith("start")]
    assert len(starts) == 2 and starts[0] != starts[1]  # two pool processes: the first one died
    assert dead_letter(recovered.id) is None

    # Killed on every delivery: after `limit` losses it is failed, not requeued again.
    always = tmp_path / "always.log"
    doomed = tasks.kill_own_process.delay(str(always))
    failed = wait_for(lambda: dead_letter(doomed.id), 30, "the task killing its worker to be dead-lettered")
    assert failed.exception.startswith("WorkerLostTooOften: WorkerLostError(")
    assert failed.attempts == limit
    assert f"not requeued again (TASK_MAX_WORKER_LOST={limit})" in failed.exception

    # The worker is alive and consumes the next message; the doomed task never runs again.
    after = tmp_path / "after.log"
    tasks.append_line.delay(str(after), "still consuming")
    wait_for(after.exists, 15, "the worker to run the next task")
    assert worker.process.poll() is None
    assert always.read_text().count("start") == limit
    assert broker.depth("default") == 0
    if broker.kind == "redis":  # the count lives in Redis, shared by every worker (ops.worker.LossCounter)
        assert broker.exists(f"ops:worker-lost:{doomed.id}") == 0


def test_outbox_items_that_fail_for_good_end_failed_with_one_dead_letter_wherever_the_failure_is_reported(
    start_worker, broker, tmp_path
):
    """A final failure reaches the item from the pool process (an error) and from the worker's parent process
    (the hard time limit, a pool process lost too often): each item ends `failed`, once, with its dead letter."""
    limit = settings.TASK_MAX_WORKER_LOST
    start_worker("default", env={**WORKER_ENV, "TASK_MAX_WORKER_LOST": str(limit)})
    with transaction.atomic():
        raised = outbox.enqueue(tasks.write_then_fail.name, "OUTBOX-ROLLED-BACK")
        killed = outbox.enqueue(tasks.outlive_time_limit.name)
        lost = outbox.enqueue(tasks.kill_own_process.name, str(tmp_path / "lost.log"))
    items = (raised, killed, lost)

    wait_for(
        lambda: (
            set(OutboxItem.objects.filter(pk__in=[item.pk for item in items]).values_list("state", flat=True))
            == {OutboxItem.State.FAILED}
        ),
        40,
        "the three items to end failed",
    )
    reasons = {}
    for item in items:
        item.refresh_from_db()
        dead = wait_for(lambda item=item: dead_letter(str(item.task_id)), 10, f"the dead letter of {item}")
        assert item.attempts == 1  # published once: the broker redelivered the lost one, never the outbox
        assert item.finished_at is not None
        reasons[item.task_name] = (item.last_error, dead.exception)
    assert reasons[tasks.write_then_fail.name] == ("ValueError: invalid: OUTBOX-ROLLED-BACK",) * 2
    assert reasons[tasks.outlive_time_limit.name][0].startswith("TimeLimitExceeded")
    assert reasons[tasks.kill_own_process.name][0].startswith("WorkerLostTooOften")
    time.sleep(1)
    assert FailedTask.objects.count() == 3  # the hard limit reports twice: still one row, one failed item


# --- Poison messages ------------------------------------------------------------------


class CreatesFileWhenUnpickled:
    """A pickle that runs code: unpickling it calls open(path, "w")."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def protocol2_headers(task_name: str, task_id: str) -> dict:
    return {
        "lang": "py",
        "task": task_name,
        "id": task_id,
        "shadow": None,
        "eta": None,
        "expires": None,
        "group": None,
        "group_index": None,
        "retries": 0,
        "timelimit": [None, None],
        "root_id": task_id,
        "parent_id": None,
        "argsrepr": "",
        "kwargsrepr": "",
        "origin": "poison@test",
        "ignore_result": True,
        "replaced_task_nesting": 0,
        "stamped_headers": None,
        "stamps": {},
    }


def publish_raw(
    body: bytes,
    *,
    task_name: str = tasks.append_line.name,
    content_type: str = "application/json",
    content_encoding: str = "utf-8",
    queue: str = "default",
) -> str:
    task_id = str(uuid.uuid4())
    with app.connection_for_write() as connection:
        connection.Producer().publish(
            body,
            exchange=queue,
            routing_key=queue,
            content_type=content_type,
            content_encoding=content_encoding,
            headers=protocol2_headers(task_name, task_id),
            correlation_id=task_id,
        )
    return task_id


def json_body(args: list, kwargs: dict) -> bytes:
    embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
    return json.dumps([args, kwargs, embed]).encode()


def test_poison_messages_are_refused_logged_and_recorded_and_the_worker_keeps_consuming(start_worker, broker, tmp_path):
    # The payload is real: unpickled, it creates its file.
    control = tmp_path / "control-unpickled"
    pickle.loads(pickle.dumps(CreatesFileWhenUnpickled(control)))  # noqa: S301 (proving the payload works)
    assert control.exists()
    marker = tmp_path / "worker-unpickled"
    ran = tmp_path / "ran.log"

    worker = start_worker("default", env=WORKER_ENV)
    pickled = publish_raw(
        pickle.dumps(CreatesFileWhenUnpickled(marker)),
        content_type="application/x-python-serialize",
        content_encoding="binary",
    )
    invalid_json = publish_raw(b'[["' + str(ran).encode() + b'", "x"], {')
    unknown = publish_raw(json_body([], {}), task_name="tests.e2e.no_such_task")
    wrong_arguments = publish_raw(json_body([str(ran)], {"colour": "red"}))
    # Two that stop a bare Celery 5.7 worker ("Unrecoverable error"), see ops.worker.DeadLetterConsumer:
    # a content type kombu trusts without decoding, and JSON that is not [args, kwargs, embed].
    trusted_bytes = publish_raw(
        json_body([str(ran), "x"], {}), content_type="application/data", content_encoding="binary"
    )
    wrong_shape = publish_raw(b"{}")
    # Then an ordinary task on the same queue, behind them.
    tasks.append_line.delay(str(ran), "after the poison")

    wait_for(ran.exists, 20, "the worker to run the task published after the poison")
    assert ran.read_text() == "after the poison\n"  # none of the poison ran
    assert not marker.exists()  # the pickle was never unpickled
    assert worker.process.poll() is None
    ids = (pickled, invalid_json, unknown, wrong_arguments, trusted_bytes, wrong_shape)
    wait_for(lambda: FailedTask.objects.filter(task_id__in=ids).count() == len(ids), 10, "a dead letter for each")

    def refused(task_id: str) -> tuple[str, str, str]:
        row = dead_letter(task_id)
        assert row.headers["id"] == task_id  # the raw headers, for tracing the producer
        return row.kind, row.task_name, row.queue

    assert refused(pickled) == refused(invalid_json) == ("refused", "<undecodable>", "default")
    assert refused(trusted_bytes) == refused(wrong_shape) == ("refused", "<undecodable>", "default")
    assert refused(unknown) == ("refused", "tests.e2e.no_such_task", "default")

    assert dead_letter(pickled).exception.startswith("ContentDisallowed: Refusing to deserialize untrusted content")
    assert "content-type: application/x-python-serialize" in dead_letter(pickled).traceback
    assert dead_letter(invalid_json).exception.startswith("DecodeError:")
    assert dead_letter(unknown).exception == "NotRegistered: no task named 'tests.e2e.no_such_task'"
    assert dead_letter(trusted_bytes).exception.startswith(
        "ContentDisallowed: Refusing content of type 'application/data'"
    )
    assert dead_letter(wrong_shape).exception == "InvalidTaskError: task message body is not [args, kwargs, embed]: {}"

    # Wrong arguments reach the task, which fails: an ordinary dead letter, arguments kept as JSON.
    wrong = dead_letter(wrong_arguments)
    assert (wrong.kind, wrong.task_name, wrong.args, wrong.kwargs) == (
        "failed",
        tasks.append_line.name,
        [str(ran)],
        {"colour": "red"},
    )
    assert wrong.exception.startswith("TypeError:")

    log = worker.log()
    assert "Refusing to deserialize untrusted content of type pickle" in log
    assert "Can't decode message body" in log
    assert "Received unregistered task of type 'tests.e2e.no_such_task'" in log
    assert log.count("Received invalid task message") == 3  # pickle, trusted bytes, wrong shape
    assert "Unrecoverable error" not in log
    assert broker.depth("default") == 0
    wait_for(lambda: broker.unacked() == 0, 10, "the last task's late acknowledgement")
    if broker.kind == "rabbitmq":  # refused messages went on to the dead-letter queue and were drained
        wait_for(lambda: broker.depth(settings.DEAD_LETTER_QUEUE) == 0, 10, "the dead-letter queue to drain")
        assert FailedTask.objects.count() == len(ids)  # recorded once, by the worker that refused them
