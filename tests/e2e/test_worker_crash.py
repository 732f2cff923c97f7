"""SIGKILL of a whole worker mid-task: the message was never acknowledged, so it is delivered again."""

import os
import signal
import time

import pytest

from core.models import OutboxItem
from orders.models import Order
from orders.services import place_order
from payments.models import Payment
from tests.brokers import on_both_brokers
from tests.factories import ProductFactory, UserFactory
from tests.stack import wait_for

# On Redis the message comes back after the visibility timeout (shortened here); on RabbitMQ as soon as the
# killed worker's connection closes.
pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True), on_both_brokers]

# Short enough for a test; production keeps an hour (longer than any countdown plus time limit).
FAST_REDELIVERY = {
    "CELERY_VISIBILITY_TIMEOUT": "5",
    "CELERY_UNACKED_RESTORE_INTERVAL": "1",
    "CELERY_UNACKED_RESTORE_THROTTLE": "1",
}


def test_charge_interrupted_by_killing_the_whole_worker_completes_after_a_worker_returns(start_worker, broker, sandbox):
    ProductFactory(sku="CRASH", stock=5)
    order = place_order(owner=UserFactory(), items=[("CRASH", 1)])  # queued until a worker starts
    # Keeps the charge in flight long enough to kill the worker, with slack for a starved machine between
    # seeing the payment and the kill.
    sandbox.set_faults(latency_ms=6000)
    first = start_worker("critical", name="doomed", env=FAST_REDELIVERY)

    wait_for(lambda: Payment.objects.filter(order=order).exists(), 20, "the charge to be in flight")
    time.sleep(0.5)
    os.killpg(first.process.pid, signal.SIGKILL)  # main process and pool children, no warm shutdown
    first.process.wait(5)
    assert Order.objects.get(pk=order.pk).status == Order.Status.CONFIRMED

    start_worker("critical", name="survivor", env=FAST_REDELIVERY)
    wait_for(
        lambda: Order.objects.get(pk=order.pk).status == Order.Status.FULFILLED,
        60,
        "the redelivered charge to pay and fulfil the order",
    )
    # The provider was called twice with the same key and charged once.
    payment = Payment.objects.get(order=order)
    assert len(sandbox.charges(reference=payment.idempotency_key)) == 1
    assert payment.attempts >= 2
    # The broker redelivered the charge's message: its one outbox item, never published a second time.
    [charge] = OutboxItem.objects.filter(task_name="orders.tasks.charge_order", args=[order.pk])
    assert charge.attempts == 1
