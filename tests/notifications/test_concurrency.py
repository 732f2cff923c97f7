"""Concurrent deliveries of one notification against the real PostgreSQL: one email."""

import pytest
from django.core import mail

from notifications import tasks
from notifications.models import Notification
from tests.concurrency import run_concurrently
from tests.factories import NotificationFactory

pytestmark = pytest.mark.django_db(transaction=True)


def test_concurrent_duplicate_deliveries_send_one_email():
    notification = NotificationFactory()
    count = 5

    results = run_concurrently(count, lambda i: tasks.send_notification(notification.pk))

    assert results == [Notification.Status.SENT] * count
    assert len(mail.outbox) == 1
    notification.refresh_from_db()
    assert notification.status == Notification.Status.SENT
