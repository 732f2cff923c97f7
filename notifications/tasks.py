"""Queue adapters for notification services (routed to the default queue).

Retries: only the mail server or the network being unavailable is retried, with
exponential backoff and jitter; anything else (a template bug) fails at once.
"""

from celery import shared_task

from . import services


@shared_task(
    autoretry_for=services.RETRYABLE_ERRORS,
    max_retries=5,
    retry_backoff=True,
    retry_backoff_max=600,
    retry_jitter=True,
)
def send_notification(notification_id: int) -> str | None:
    notification = services.send_notification(notification_id=notification_id)
    return notification.status if notification else None


@shared_task
def redispatch_pending_notifications() -> int:
    return len(services.redispatch_pending())
