"""Queue adapters for payment services (routed to the critical queue, under its time limits).

Retries: only transient errors (the provider unreachable: integrations.errors.ProviderUnavailable
is a ConnectionError; the database restarting) are retried, with exponential backoff and
jitter; a decline, a refusal or an ApplicationError (core.errors: an event or a period we
cannot act on) fails at once.
"""

from celery import shared_task

from core.task_base import retry_policy

from . import reconciliation, refunds, services


# `attempt` is the period's try (payments/dunning.py); messages from before dunning carry two arguments: the first.
@shared_task(**retry_policy(retries=8, backoff_max=60))
def charge_subscription(subscription_id: int, billing_period: str, attempt: int = 1) -> str | None:
    payment = services.charge_subscription(
        subscription_id=subscription_id, billing_period=billing_period, attempt=attempt
    )
    return payment.status if payment else None


# Its retries spent, it starts again WEBHOOK_RESUME_SECONDS later with the same key (payments/receivers.py).
@shared_task(**retry_policy(retries=8, backoff_max=60))
def refund_payment(refund_id: int) -> str:
    return refunds.settle_refund(refund_id=refund_id).status


@shared_task
def bill_due_subscriptions() -> int:
    return len(services.bill_due_subscriptions())


@shared_task
def retry_due_renewals() -> int:
    return len(services.retry_due_renewals())


# Its retries spent, it starts again WEBHOOK_RESUME_SECONDS later (payments/receivers.py).
@shared_task(**retry_policy(retries=8, backoff_max=60))
def process_webhook(event_id: int) -> str | None:
    event = services.process_webhook(event_id=event_id)
    return event.status if event else None


# Daily (beat). Safe to retry: a mismatch is stored once, whatever run finds it.
@shared_task(**retry_policy(retries=8, backoff_max=60))
def reconcile_payments() -> int:
    return len(reconciliation.reconcile_payments().new)
