"""Queue adapters for payment services (routed to the critical queue).

Retries: only transient errors (the provider unreachable: gateway.ProviderUnavailable
is a ConnectionError; the database restarting) are retried, with exponential backoff
and jitter; a decline or a validation error fails at once.
"""

from celery import shared_task
from django.core.exceptions import ValidationError

from project.celery import TRANSIENT_ERRORS

from . import services

RETRY_POLICY = {
    "autoretry_for": TRANSIENT_ERRORS,
    "retry_backoff": True,
    "retry_backoff_max": 600,
    "retry_jitter": True,
}


@shared_task(bind=True, max_retries=8, **RETRY_POLICY)
def charge_order(self, order_id: int) -> str | None:
    payment = services.charge_order(order_id=order_id)
    return payment.status if payment else None


@shared_task(bind=True, max_retries=8, **RETRY_POLICY)
def charge_subscription(self, subscription_id: int, billing_period: str) -> str | None:
    payment = services.charge_subscription(subscription_id=subscription_id, billing_period=billing_period)
    return payment.status if payment else None


@shared_task
def bill_due_subscriptions() -> int:
    return len(services.bill_due_subscriptions())


@shared_task(
    bind=True,
    autoretry_for=TRANSIENT_ERRORS,
    dont_autoretry_for=(ValidationError,),
    max_retries=3,
    retry_backoff=True,
)
def process_webhook(self, event_id: int) -> str | None:
    event = services.process_webhook(event_id=event_id)
    return event.status if event else None
