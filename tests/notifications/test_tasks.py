"""The send_notification task: a redelivery sends nothing, transient mail errors are retried."""

import smtplib

import pytest
from django.core import mail
from django.db import InterfaceError, OperationalError

from config.celery import app
from notifications import tasks
from notifications.models import Notification
from tests.factories import NotificationFactory

pytestmark = pytest.mark.django_db


def test_second_delivery_of_the_task_sends_nothing():
    notification = NotificationFactory()

    assert tasks.send_notification(notification.pk) == Notification.Status.SENT
    assert tasks.send_notification(notification.pk) == Notification.Status.SENT

    assert len(mail.outbox) == 1


def test_task_for_a_missing_notification_sends_nothing():
    assert tasks.send_notification(999_999) is None
    assert mail.outbox == []


def test_task_is_on_the_default_queue_and_retries_only_transient_errors():
    route = app.amqp.router.route({}, tasks.send_notification.name)
    assert route["queue"].name == "default"
    # The mail server or the database being briefly unavailable; a template bug is not retried.
    assert set(tasks.send_notification.autoretry_for) == {
        ConnectionError,
        smtplib.SMTPException,
        TimeoutError,
        OperationalError,
        InterfaceError,
    }
    assert tasks.send_notification.max_retries == 10
    assert tasks.send_notification.retry_backoff
    assert tasks.send_notification.retry_backoff_max == 120
    assert tasks.send_notification.retry_jitter


def test_task_runs_under_the_default_queues_time_limits(settings):
    soft, hard = settings.TASK_TIME_LIMITS["default"]

    assert (tasks.send_notification.soft_time_limit, tasks.send_notification.time_limit) == (soft, hard)
