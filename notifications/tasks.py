"""Queue adapters for notification services (routed to the default queue, under its time limits).

Retries: only the mail server or the network being unavailable is retried, with
exponential backoff and jitter; anything else (a template bug) fails at once. When the
retries are spent, the outbox tries again NOTIFICATION_RESUME_SECONDS later (notifications/receivers.py).
"""

from celery import shared_task

from core.task_base import retry_policy

from . import services


@shared_task(**retry_policy(retries=10, backoff_max=120, errors=services.RETRYABLE_ERRORS))
def send_notification(notification_id: int) -> str | None:
    notification = services.send_notification(notification_id=notification_id)
    return notification.status if notification else None


@shared_task(**retry_policy(retries=10, backoff_max=120, errors=services.RETRYABLE_ERRORS))
def send_email(email_id: int) -> str | None:
    email = services.send_email(email_id=email_id)
    return email.status if email else None
