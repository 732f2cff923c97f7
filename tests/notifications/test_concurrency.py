"""Concurrent deliveries of one notification against the real PostgreSQL: one email."""

import threading

import pytest
from django.core import mail
from django.db import connection

from notifications import tasks
from notifications.models import Notification
from tests.factories import NotificationFactory

pytestmark = pytest.mark.django_db(transaction=True)


def test_concurrent_duplicate_deliveries_send_one_email():
    notification = NotificationFactory()
    count = 5
    barrier = threading.Barrier(count, timeout=10)
    results: list[str | None] = [None] * count
    errors: list[BaseException] = []

    def deliver(i: int) -> None:
        try:
            barrier.wait()
            results[i] = tasks.send_notification(notification.pk)
        except BaseException as exc:
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=deliver, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert not any(thread.is_alive() for thread in threads), "a thread is stuck"
    assert not errors, errors
    assert results == [Notification.Status.SENT] * count
    assert len(mail.outbox) == 1
    notification.refresh_from_db()
    assert notification.status == Notification.Status.SENT
