"""The dead-letter signal handlers, fed the way the worker feeds them (real workers: tests/e2e/test_dead_letters.py)."""

import pickle

import pytest
from celery import signals
from kombu.exceptions import ContentDisallowed
from kombu.message import Message

from ops.models import FailedTask
from payments.models import Payment
from payments.services import needs_attention
from tests.e2e import deadletter_tasks
from tests.factories import PaymentFactory


class CreatesFileWhenUnpickled:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def message(body: bytes, headers, content_type="application/x-python-serialize") -> Message:
    return Message(
        body=body,
        content_type=content_type,
        content_encoding="binary",
        delivery_info={"exchange": "critical", "routing_key": "critical"},
        properties={},
        headers=headers,
        accept=["application/json"],
    )


@pytest.mark.django_db
def test_a_task_run_in_process_leaves_no_dead_letter():
    # apply() and eager mode: nothing was queued, so nothing is dead-lettered (nor committed behind the test's back).
    result = deadletter_tasks.write_then_fail.apply(args=["IN-PROCESS"], throw=False)

    assert result.failed()
    assert not FailedTask.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_a_refused_message_is_recorded_with_its_raw_headers_and_never_decoded(tmp_path):
    marker = tmp_path / "unpickled"
    body = pickle.dumps(CreatesFileWhenUnpickled(marker))
    headers = {"task": "orders.tasks.process_order", "id": "poison-1", "origin": "somewhere@host"}

    signals.task_rejected.send(
        sender=None,
        message=message(body, headers),
        exc=ContentDisallowed("Refusing to deserialize untrusted content of type pickle"),
    )

    row = FailedTask.objects.get(task_id="poison-1")
    assert (row.kind, row.task_name, row.queue) == ("refused", "<undecodable>", "critical")
    assert row.exception == "ContentDisallowed: Refusing to deserialize untrusted content of type pickle"
    assert row.headers == headers
    assert f"body ({len(body)} bytes): b'" in row.traceback
    assert not marker.exists()


@pytest.mark.django_db(transaction=True)
def test_a_message_of_unknown_format_without_an_id_still_gets_a_row():
    signals.task_rejected.send(sender=None, message=message(b"\x00garbage", None, content_type=None), exc=None)
    signals.task_rejected.send(sender=None, message=message(b"more garbage", {}, content_type=None), exc=None)

    rows = FailedTask.objects.order_by("id")
    assert [(row.task_name, row.exception) for row in rows] == [("<undecodable>", "unknown message format")] * 2
    assert all(row.task_id.startswith("refused-") for row in rows)


@pytest.mark.django_db(transaction=True)
def test_an_unknown_task_is_recorded_under_its_name():
    signals.task_unknown.send(
        sender=None,
        message=message(b"[[], {}, {}]", {"task": "orders.tasks.typo", "id": "u-1"}, content_type="application/json"),
        exc=KeyError("orders.tasks.typo"),
        name="orders.tasks.typo",
        id="u-1",
    )

    row = FailedTask.objects.get(task_id="u-1")
    assert (row.kind, row.task_name) == ("refused", "orders.tasks.typo")
    assert row.exception == "NotRegistered: no task named 'orders.tasks.typo'"


@pytest.mark.django_db(transaction=True)
def test_a_payment_needing_attention_is_one_dead_letter_however_often_it_is_reported():
    payment = PaymentFactory(status=Payment.Status.PROCESSING)

    needs_attention.send(sender=Payment, payment=payment, reason="mismatch: amount 3.00 != 20.00")
    needs_attention.send(sender=Payment, payment=payment, reason="unfinished: retries spent")

    row = FailedTask.objects.get()
    assert (row.task_name, row.args, row.queue, row.kind) == ("payments.needs_attention", [payment.pk], "", "failed")
    assert row.exception == "PaymentNeedsAttention: mismatch: amount 3.00 != 20.00"
    assert not row.resolved
